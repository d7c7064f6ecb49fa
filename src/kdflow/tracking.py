"""The one place that talks to MLflow: store location, experiments, nested runs, metrics, figures, models.

Pipeline steps are separate processes (separate pods on a cluster), so nothing here relies on process-global
state from another step: the experiment is looked up by name and created race-safely, and the pipeline's
parent run is found by a tag holding the pipeline job id, created by whichever step gets there first (the
teacher step, which runs alone after the store-free data prep, or the exit handler when data prep failed).
Child runs name their parent explicitly.
"""

from __future__ import annotations

import contextlib
import functools
import json
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
RESUME_ENV = "KDFLOW_RESUME"  # set by `kdflow run --resume` for its steps: JSON, the run it continues
FAILURE_TAG = "kdflow.failure_reason"
PROGRESS_PREFIX = "[kdflow]"
# a machine-readable progress line: the prefix and one JSON object (a training phase's start, each epoch, its end),
# printed instead of the epoch lines in a local run, whose console renders them (`kdflow.runner.progress`)
PROGRESS_EVENT = "[kdflow-progress]"


def progress_event(phase: str, epoch: int, of: int, **extra: float | bool) -> None:
    """Print one progress event: `phase` at `epoch` of at most `of`, with this process's clock."""
    import json
    import time

    event = {"phase": phase, "epoch": epoch, "of": of, "time": round(time.time(), 3), **extra}
    print(f"{PROGRESS_EVENT} {json.dumps(event)}", flush=True)


# the experiment kind MLflow 3's UI reads (its JS bundle: the `mlflow.experimentKind` tag; without it the UI
# infers GenAI from an empty experiment): "custom_model_development" opens it as a machine-learning experiment
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
VERSION_TAG = "kdflow.version"
SUMMARY_ARTIFACT = "kdflow_summary.json"  # the register step's summary on the parent run (`kdflow show` reads it)
REPORT_DIR = "report"  # the parent run's report: trade-off figure, report.md, report.html
GIT_COMMIT_ENV = "KDFLOW_GIT_COMMIT"  # set it where the source has no .git (an image): the commit it was built from


def current_user() -> str:
    """Who runs or moves things: $KDFLOW_USER, else the login name."""
    import getpass

    try:
        return os.environ.get("KDFLOW_USER") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        return "unknown"


def git_commit() -> str | None:
    """The commit of the kdflow source this process runs: $KDFLOW_GIT_COMMIT, else `git rev-parse HEAD` in the
    package's checkout (None outside a git checkout)."""
    return os.environ.get(GIT_COMMIT_ENV) or _git_head(str(Path(__file__).resolve().parent))


@functools.lru_cache(maxsize=4)
def _git_head(where: str) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance_tags() -> dict[str, str]:
    """What every kdflow run carries: the kdflow version, the git commit of its source and the user
    (MLflow's own `mlflow.user` and `mlflow.source.git.commit`, which the UI shows)."""
    from kdflow import __version__

    tags = {VERSION_TAG: __version__, "mlflow.user": current_user()}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


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
    server, a wrong port or host), naming the URI without credentials; a URI MLflow has no store for and an
    SQLite store that is not a database fail here too."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        _check_store(uri)
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


def _check_store(uri: str) -> None:
    """A URI MLflow has no store for, or an SQLite file that is not a database: one line naming it, before the
    store is opened (and before anything is written beside it)."""
    import sqlite3

    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    clean, _, _ = split_credentials(uri)
    try:
        _tracking_store_registry.get_store_builder(uri)
    except MlflowException:
        scheme = clean.partition(":")[0]
        raise ConnectionError(f"tracking URI {clean}: MLflow has no tracking store for the scheme {scheme!r}") from None
    if uri.startswith("sqlite:///") and Path(uri[len("sqlite:///") :]).is_file():
        path = uri[len("sqlite:///") :]
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                db.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.DatabaseError as err:
            raise ConnectionError(f"MLflow store {path} is not a readable SQLite database ({err})") from None


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
        if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # made before kdflow tagged its kind
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=artifact_location_for(uri), tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
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
        run = found[0]
        if run.info.status != "RUNNING" and os.environ.get(RESUME_ENV):  # `kdflow run --resume` goes on in it
            _continue(run.info.run_id, "the pipeline")
            for tag in ("kdflow.outcome", "kdflow.outcome_detail"):
                if tag in run.data.tags:
                    client.delete_tag(run.info.run_id, tag)
        if os.environ.get(LOCAL_RUN_ENV) and run.data.tags.get(LOCAL_RUN_TAG) != os.environ[LOCAL_RUN_ENV]:
            client.set_tag(run.info.run_id, LOCAL_RUN_TAG, os.environ[LOCAL_RUN_ENV])  # now this local run's
        return run.info.run_id
    tags = {PIPELINE_RUN_TAG: pipeline_run_id, STEP_TAG: PIPELINE_STEP, **provenance_tags()}
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


def unfinished_child(experiment_id: str, parent_id: str, name: str, step: str) -> str | None:
    """The child run `name` of step `step` that an earlier attempt of the step left unfinished (FAILED, KILLED,
    or RUNNING after a kill), if any: a retried or resumed step continues logging into it, so the run's curves
    go on from the epoch its checkpoint holds."""
    import mlflow

    found = mlflow.MlflowClient().search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{STEP_TAG}` = '{step}' "
            f"and attributes.run_name = '{name}' and attributes.status != 'FINISHED'"
        ),
        max_results=1,
    )
    return found[0].info.run_id if found else None


def _continue(run_id: str, name: str) -> None:
    """Make an unfinished run of an earlier attempt RUNNING again, without the reason it was ended with."""
    import mlflow

    client = mlflow.MlflowClient()
    print(f"{PROGRESS_PREFIX} {name}: continuing the MLflow run {run_id} of an earlier attempt", flush=True)
    client.update_run(run_id, status="RUNNING")
    if FAILURE_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, FAILURE_TAG)


@contextlib.contextmanager
def child_run(experiment_id: str, parent_id: str, name: str, step: str, tags: dict[str, str] | None = None) -> Iterator:
    """A nested run under the pipeline's parent run (the one an earlier attempt left unfinished, if any:
    `unfinished_child`); FAILED if the block raises."""
    import mlflow

    earlier = unfinished_child(experiment_id, parent_id, name, step)
    if earlier is not None:
        _continue(earlier, name)
        with mlflow.start_run(run_id=earlier, tags={STEP_TAG: step, **(tags or {})}) as run:
            yield run
        return
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=name,
        parent_run_id=parent_id,
        tags={STEP_TAG: step, **provenance_tags(), **(tags or {})},
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

    client = mlflow.MlflowClient()
    earlier = unfinished_child(experiment_id, parent_id, name, step)
    if earlier is not None:  # an earlier attempt's: continued (`unfinished_child`)
        _continue(earlier, name)
        set_tags_on(earlier, {STEP_TAG: step, **tags})
        return earlier
    run = client.create_run(
        experiment_id,
        run_name=name,
        tags={"mlflow.parentRunId": parent_id, STEP_TAG: step, **provenance_tags(), **tags},
    )
    return run.info.run_id


# MLflow names of the training engine's per-epoch metrics, where they differ: one name per quantity (the
# evaluate step's `val_top1` is the same quantity for the kept weights)
CURVE_NAMES = {"val_acc": "val_top1"}


def logged_steps(client, run_id: str, keys: set[str]) -> dict[str, set[int]]:
    """The steps at which run `run_id` already holds each of `keys` (those it holds at all): one call for a run
    without them, one more per key it has."""
    present = set(client.get_run(run_id).data.metrics) & keys
    return {k: {m.step for m in client.get_metric_history(run_id, k)} for k in sorted(present)}


class epoch_logger:  # noqa: N801 - called like the function it was
    """An `on_epoch` callback for `kdflow.engine.loop.fit`: prints progress and logs each epoch's metrics to MLflow
    (the active run, or `run_id`). In a local `kdflow run` (LOCAL_RUN_ENV set) the progress is an event a line
    (PROGRESS_EVENT: the start, every epoch with its time, the end), which the run's console renders; elsewhere
    (a pod's log) a readable PROGRESS_PREFIX line every fifth of the epochs.
    Metrics are sent in batches, at least every `flush_every_s` seconds, after the last epoch and on `close()`
    (the engine calls it when the student's training ends, early stopping included): one store round trip per
    epoch costs more than a small model's epoch. An epoch the run already holds (a resumed fit trains again the
    epochs a killed one had logged after its last checkpoint, with the same values) is not logged twice."""

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
        self.logged: dict[str, set[int]] | None = None  # (metric → epochs) the run held before: see flush
        self.last_flush, self.last_epoch = time.monotonic(), 0
        # a local run's console renders events (every epoch, with its time); a pod's log gets readable lines
        self.events = bool(os.environ.get(LOCAL_RUN_ENV))
        if self.events:
            progress_event(label, 0, epochs)

    def flush(self) -> None:
        import time

        import mlflow

        if self.pending:
            target = self.run_id or mlflow.active_run().info.run_id
            client = mlflow.MlflowClient()
            if self.logged is None:  # a resumed fit trains again the epochs after its checkpoint: those the
                self.logged = logged_steps(client, target, {m.key for m in self.pending})  # killed one sent stay
            fresh = [m for m in self.pending if m.step not in self.logged.get(m.key, ())]
            for chunk in _chunks(fresh, 1000):
                client.log_batch(target, metrics=chunk)
        self.pending.clear()
        self.last_flush = time.monotonic()

    def close(self) -> None:
        """The phase ended (its last epoch, early stopping or a search's rung): the buffered epochs go out."""
        self.flush()
        if self.events:
            progress_event(self.label, self.last_epoch, self.epochs, done=True)

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        import time

        import mlflow

        now = int(time.time() * 1000)
        self.last_epoch = epoch
        self.pending.extend(
            mlflow.entities.Metric(f"{self.prefix}{CURVE_NAMES.get(k, k)}", float(v), now, epoch)
            for k, v in metrics.items()
        )
        if epoch >= self.epochs or time.monotonic() - self.last_flush >= self.flush_every_s:
            self.flush()
        if self.events:
            shown = {
                k: round(float(v), 4)
                for k, v in (("loss", metrics.get("train_loss")), ("val_acc", metrics.get("val_acc")))
                if v is not None
            }
            progress_event(self.label, epoch, self.epochs, **shown)
            return
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


def log_dict_to(run_id: str, data: dict, artifact_file: str) -> None:
    """`data` as a JSON artifact of `run_id`, without touching its status."""
    import mlflow

    mlflow.MlflowClient().log_dict(run_id, data, artifact_file)


def log_artifacts_to(run_id: str, local_dir: str, artifact_path: str) -> str:
    """The files of `local_dir` as artifacts of `run_id` under `artifact_path`; returns that folder's URI."""
    import mlflow

    client = mlflow.MlflowClient()
    client.log_artifacts(run_id, local_dir, artifact_path)
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"


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


def find_local_parent(experiment: str, local_run: str) -> tuple[str, str] | None:
    """The KFP run id and name of the parent run that local run `local_run` opened (`kdflow.local_run` tag)."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{LOCAL_RUN_TAG}` = '{local_run}' and tags.`{STEP_TAG}` = '{PIPELINE_STEP}'",
        max_results=1,
    )
    return (found[0].data.tags[PIPELINE_RUN_TAG], found[0].info.run_name) if found else None


def close_orphans(
    experiment: str, local_run: str, reason: str, status: str = "FAILED", uri: str | None = None
) -> list[str]:
    """End as `status` (FAILED; KILLED for an interrupted run), with `reason` as their `kdflow.failure_reason`
    tag, the runs a local run left RUNNING: its parent run (found by its `kdflow.local_run` tag) and that
    parent's children, in the store at `uri` (default: this process's). Returns their names."""
    import mlflow

    client = mlflow.MlflowClient(uri)
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
                client.set_terminated(run.info.run_id, status)
                closed.append(run.info.run_name)
    return closed


def resumed(pipeline_run_id: str, run_name: str) -> tuple[str, str]:
    """The KFP run id and name a step files its MLflow runs under: its own, or in a resumed local run
    (`kdflow run --resume`) those of the run it continues, so it finds that run's parent run again."""
    plan = os.environ.get(RESUME_ENV)
    if not plan:
        return pipeline_run_id, run_name
    earlier = json.loads(plan)
    return earlier["pipeline_run_id"], earlier["run_name"]


def delete_run_artifacts(run_id: str, path: str) -> None:
    """Remove the artifact folder `path` of run `run_id` (best effort: not every artifact store deletes)."""
    import mlflow
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(mlflow.MlflowClient().get_run(run_id).info.artifact_uri)
    try:
        repo.delete_artifacts(path)
    except (NotImplementedError, OSError) as err:
        print(f"{PROGRESS_PREFIX} could not delete the artifacts {path} of run {run_id}: {err}", flush=True)
