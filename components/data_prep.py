from kfp import dsl
from kfp.dsl import Dataset, Output

from kdflow.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def data_prep(data: Output[Dataset], config_json: str):
    """Step 1: source and target tasks, hashed splits, manifest. Store-free, so KFP can cache it."""
    from kdflow import steps
    from kdflow.config import config_from_json

    manifest = steps.prepare_data(config_from_json(config_json), data.path)
    data.metadata.update({"content_hash": manifest["content_hash"], "setup": manifest["setup"]})
    data.metadata["origins"] = [t["origin"]["uri"] for t in manifest["tasks"].values() if "origin" in t]
