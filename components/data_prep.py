from kfp import dsl
from kfp.dsl import Dataset, Output

from kdflow.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def data_prep(data: Output[Dataset], config_json: str):
    """Step 1: source and target tasks, hashed splits, manifest. Store-free, so KFP can cache it."""
    from kdflow.runner import entrypoints
    from kdflow.runner.stepserver import run_step

    data.metadata.update(run_step(entrypoints.data_prep, config_json=config_json, data=data.path))
