"""The one place that talks to MLflow: store location, experiments, nested runs, metrics, figures, models.

Pipeline steps are separate processes (separate pods on a cluster), so nothing here relies on process-global
state from another step: the experiment is looked up by name and created race-safely, and the pipeline's
parent run is found by a tag holding the pipeline job id, created by whichever step gets there first (the
teacher step, which runs alone after the store-free data prep, or the exit handler when data prep failed).
Child runs name their parent explicitly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PIPELINE_RUN_TAG = "kdflow.pipeline_run_id"
STEP_TAG = "kdflow.step"
PIPELINE_STEP = "pipeline"  # STEP_TAG value of the parent run; children carry their own step name
HOME_ENV = "KDFLOW_HOME"
LOCAL_RUN_ENV = "KDFLOW_LOCAL_RUN"  # set by a local `kdflow run` for its steps: its id
LOCAL_RUN_TAG = "kdflow.local_run"  # on the parent run of a local run: that id
FAILURE_TAG = "kdflow.failure_reason"
PROGRESS_PREFIX = "[kdflow]"


def kdflow_home() -> Path:
    """Where the embedded store lives: $KDFLOW_HOME, else ./kdflow-home under the working directory."""
    return Path(os.environ.get(HOME_ENV, "kdflow-home")).expanduser().resolve()


def embedded_tracking_uri(home: Path | None = None) -> str:
    return f"sqlite:///{(home or kdflow_home()) / 'mlflow.db'}"


CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # MLflow's own basic-auth variables


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """`http://user:pw@host:5000/x` → (`http://host:5000/x`, user, pw): a URI that is safe to print, pass on a
    command line or log, and the user-info to hand over by environment instead (MLflow reads
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD). A URI without user-info comes back unchanged."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if not parts.netloc or "@" not in parts.netloc:
        return uri, None, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    clean = urlunsplit(parts._replace(netloc=hostport))
    return clean, unquote(user) or None, unquote(password) if password else None


def redact(text: str) -> str:
    """`text` with the user-info of every URI in it replaced by `***` (`http://***@host`)."""
    from kdflow.secrets import redact as _redact

    return _redact(text)


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail within `timeout_s` when an http(s) tracking server does not answer its health endpoint (a stopped
    server, a wrong port or host), naming the URI without credentials; other stores are checked where opened."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    import ssl

    clean, _, _ = split_credentials(uri)
    context = None
    if clean.startswith("https://"):  # the TLS settings MLflow's own client honours
        context = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(clean.rstrip("/") + "/health", timeout=timeout_s, context=context) as resp:
            if resp.status >= 500:
                raise ConnectionError(f"HTTP {resp.status}")
    except urllib.error.HTTPError as err:  # 4xx (auth, a proxy without /health): something answers there
        if err.code >= 500:
            raise ConnectionError(f"MLflow tracking server {clean} answered HTTP {err.code}") from None
    except (OSError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise ConnectionError(f"MLflow tracking server {clean} is not reachable ({reason})") from None


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Explicit URI, else $MLFLOW_TRACKING_URI, else the embedded SQLite store."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking_uri()


def artifact_location_for(uri: str) -> str | None:
    """Beside a SQLite store, artifacts go to <store dir>/artifacts; a tracking server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "artifacts").as_uri()
    return None


def connect(uri: str | None = None) -> str:
    """Point this process's MLflow client at the store; create the SQLite file's folder if needed."""
    import mlflow

    uri = resolve_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """The experiment id for `name`, creating it if missing; safe when several processes race to create it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = connect(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location_for(uri))
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def parent_run_id(experiment_id: str, pipeline_run_id: str, run_name: str, params: dict[str, str]) -> str:
    """The pipeline's parent run (found by tag, created if missing), left RUNNING until the exit handler ends it."""
    import mlflow

    client = mlflow.MlflowClient()
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}' and tags.`{STEP_TAG}` = '{PIPELINE_STEP}'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    tags = {PIPELINE_RUN_TAG: pipeline_run_id, STEP_TAG: PIPELINE_STEP}
    if os.environ.get(LOCAL_RUN_ENV):  # a local `kdflow run`: the next run on its home can close what it left
        tags[LOCAL_RUN_TAG] = os.environ[LOCAL_RUN_ENV]
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    for chunk in _chunks(list(params.items()), 100):
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in chunk])
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    import mlflow

    mlflow.MlflowClient().set_terminated(run_id, status=status)


def close_pipeline_run(experiment_id: str, parent_id: str, succeeded: bool, detail: str = "") -> list[str]:
    """End the parent run with the pipeline's real outcome. A step whose pod was killed (OOM, eviction) never
    got to end its own run: children still RUNNING are marked FAILED, whatever the outcome (a retry may have
    succeeded after the kill). Returns their names."""
    import mlflow

    client = mlflow.MlflowClient()
    stale = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'RUNNING'",
    )
    # every step has ended by now: a child still RUNNING belongs to a pod that died, even when a retry of that
    # step then succeeded
    for run in stale:
        client.set_terminated(run.info.run_id, status="FAILED")
    client.set_tag(parent_id, "kdflow.outcome", "succeeded" if succeeded else "failed")
    if detail:
        client.set_tag(parent_id, "kdflow.outcome_detail", detail[:5000])
    client.set_terminated(parent_id, status="FINISHED" if succeeded else "FAILED")
    return [run.info.run_name for run in stale]


@contextlib.contextmanager
def child_run(experiment_id: str, parent_id: str, name: str, step: str, tags: dict[str, str] | None = None) -> Iterator:
    """A nested run under the pipeline's parent run; FAILED if the block raises."""
    import mlflow

    with mlflow.start_run(
        experiment_id=experiment_id, run_name=name, parent_run_id=parent_id, tags={STEP_TAG: step, **(tags or {})}
    ) as run:
        yield run


@contextlib.contextmanager
def reopen(run_id: str) -> Iterator:
    """Continue logging into an existing run from another step."""
    import mlflow

    with mlflow.start_run(run_id=run_id) as run:
        yield run


def log_params(params: dict[str, Any], run_id: str | None = None) -> None:
    """Log params to the active run, or to `run_id` without touching its status (a run still training stays
    RUNNING: a pod killed mid-training then leaves it RUNNING for the exit handler to mark FAILED). Credentials
    are redacted (`kdflow.secrets.scrub`: URIs' user-info, values under secret-looking keys)."""
    import mlflow

    from kdflow.secrets import scrub

    clipped = {k: str(scrub(v, k))[:6000] for k, v in params.items()}
    if run_id is None:
        mlflow.log_params(clipped)
        return
    items = [mlflow.entities.Param(k, v) for k, v in clipped.items()]
    for chunk in _chunks(items, 100):
        mlflow.MlflowClient().log_batch(run_id, params=chunk)


def set_tags(tags: dict[str, str]) -> None:
    import mlflow

    mlflow.set_tags(tags)


def log_metrics_to(run_id: str, metrics: dict[str, float]) -> None:
    """Log metrics to `run_id` without touching its status (a finished run stays FINISHED)."""
    import time

    import mlflow

    now = int(time.time() * 1000)
    items = [mlflow.entities.Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for chunk in _chunks(items, 1000):
        mlflow.MlflowClient().log_batch(run_id, metrics=chunk)


def set_tags_on(run_id: str, tags: dict[str, str]) -> None:
    """Tag `run_id` without touching its status."""
    import mlflow

    items = [mlflow.entities.RunTag(k, str(v)) for k, v in tags.items()]
    mlflow.MlflowClient().log_batch(run_id, tags=items)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def open_child_run(experiment_id: str, parent_id: str, name: str, step: str, tags: dict[str, str]) -> str:
    """A RUNNING child run that is not this process's active run: several students training side by side
    each log into their own (`epoch_logger(run_id=...)`, then `reopen`), and `end_run` closes it."""
    import mlflow

    run = mlflow.MlflowClient().create_run(
        experiment_id, run_name=name, tags={"mlflow.parentRunId": parent_id, STEP_TAG: step, **tags}
    )
    return run.info.run_id


class epoch_logger:  # noqa: N801 - called like the function it was
    """An `on_epoch` callback for `kdflow.engine.loop.fit`: prints one progress line (the local runner shows lines
    starting with PROGRESS_PREFIX) and logs each epoch's metrics to MLflow (the active run, or `run_id`).
    Metrics are sent in batches, at least every `flush_every_s` seconds, after the last epoch and on `close()`
    (the engine calls it when the student's training ends, early stopping included): one store round trip per
    epoch costs more than a small model's epoch."""

    def __init__(
        self, label: str, epochs: int, prefix: str = "", run_id: str | None = None, flush_every_s: float = 10.0
    ):
        import time

        self.label, self.epochs, self.prefix, self.run_id, self.flush_every_s = (
            label,
            epochs,
            prefix,
            run_id,
            flush_every_s,
        )
        self.pending: list = []
        self.last_flush = time.monotonic()

    def flush(self) -> None:
        import time

        import mlflow

        if self.pending:
            target = self.run_id or mlflow.active_run().info.run_id
            for chunk in _chunks(self.pending, 1000):
                mlflow.MlflowClient().log_batch(target, metrics=chunk)
        self.pending.clear()
        self.last_flush = time.monotonic()

    close = flush

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        import time

        import mlflow

        now = int(time.time() * 1000)
        self.pending.extend(
            mlflow.entities.Metric(f"{self.prefix}{k}", float(v), now, epoch) for k, v in metrics.items()
        )
        if epoch >= self.epochs or time.monotonic() - self.last_flush >= self.flush_every_s:
            self.flush()
        if epoch % max(1, self.epochs // 5) and epoch != self.epochs:
            return
        print(
            f"{PROGRESS_PREFIX} {self.label} epoch {epoch}/{self.epochs} "
            f"loss {metrics.get('train_loss', float('nan')):.4f} val_acc {metrics['val_acc']:.4f}",
            flush=True,
        )


def log_dict(data: dict, artifact_file: str) -> None:
    import mlflow

    mlflow.log_dict(data, artifact_file)


def log_figure(fig, artifact_file: str) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


def log_model(model, example, name: str = "model") -> str:
    """Log a servable PyTorch model (torch.export `pt2` format) with signature and input example; return its
    `models:/<id>` URI. `example` needs a batch of 2 or more so the exported batch dimension stays dynamic."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    model = model.to("cpu").eval()
    example = example.to("cpu").float()
    with torch.no_grad():
        out = model(example)
    sig = infer_signature(example.numpy(), out.numpy())
    info = mlflow.pytorch.log_model(
        model,
        name=name,
        input_example=example.numpy(),
        signature=sig,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        # MLflow would reload the pt2 file it just wrote and run the example through it, only to log a warning
        # if that failed: 0.3 s a model. The signature above came from running the same model on the example.
        validate_serving_input=False,
    )
    return info.model_uri


def log_onnx_model(path, example, classes: list[str], name: str = "onnx") -> str:
    """Log the ONNX file at `path` with MLflow's `onnx` flavor into the active run, with the same signature as
    the pt2 model (float32 (N, C, H, W) pixels in, (N, classes) logits out) and the class names in the model's
    metadata (`classes`, in logit order); served on the CPU provider. Returns its `models:/<id>` URI."""
    import mlflow
    import mlflow.onnx
    import onnx
    import onnxruntime
    from mlflow.models import infer_signature

    model = onnx.load(str(path))
    example = example.to("cpu").float().numpy()
    sess = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: example})[0]
    info = mlflow.onnx.log_model(
        model,
        name=name,
        signature=infer_signature(example, out),
        input_example=example,
        metadata={"classes": list(classes)},
        onnx_execution_providers=["CPUExecutionProvider"],
        save_as_external_data=False,  # one self-contained .onnx file
        pip_requirements=[
            f"onnx=={onnx.__version__}",
            f"onnxruntime=={onnxruntime.__version__}",
            f"mlflow=={mlflow.__version__}",
        ],
    )
    return info.model_uri


def load_logits_fn(model_uri: str):
    """A logged model (`models:/...`, either flavor kdflow logs: pt2 or ONNX) as a function of a float tensor of
    raw pixels (N, C, H, W) to its logits (N, K), for scoring a registered model whatever runtime it ships in."""
    import mlflow.pyfunc
    import mlflow.pytorch
    import torch
    from mlflow.models import get_model_info

    flavors = get_model_info(model_uri).flavors
    if "pytorch" in flavors:
        model = mlflow.pytorch.load_model(model_uri)
        return lambda x: model(x)
    served = mlflow.pyfunc.load_model(model_uri)
    return lambda x: torch.from_numpy(next(iter(served.predict(x.numpy()).values())))


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def client():
    """An MLflow client of this process's store."""
    import mlflow

    return mlflow.MlflowClient()


def load_pytorch_model(model_uri: str):
    """A logged PyTorch model (`models:/...`, `runs:/...`), loaded for scoring."""
    import mlflow.pytorch

    return mlflow.pytorch.load_model(model_uri)


def close_orphans(experiment: str, local_run: str, reason: str) -> list[str]:
    """End as FAILED, with `reason` as their `kdflow.failure_reason` tag, the runs a dead local run left RUNNING:
    its parent run (found by its `kdflow.local_run` tag) and that parent's children. Returns their names."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`{LOCAL_RUN_TAG}` = '{local_run}'")
    closed = []
    for parent in parents:
        children = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=10_000
        )
        for run in [*children, parent]:
            if run.info.status == "RUNNING":
                client.set_tag(run.info.run_id, FAILURE_TAG, reason)
                client.set_terminated(run.info.run_id, "FAILED")
                closed.append(run.info.run_name)
    return closed
