"""Submit a compiled kdflow pipeline to a Kubeflow Pipelines API: one run, or a recurring run on a cron schedule.

Talks to KFP through `kfp.Client` (REST API v2beta1). Everything the user typed is checked before the first
request (package, run parameters, cron, host URL), so bad input fails fast with a message naming the bad value.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from kdflow import tracking
from kdflow.config import Config, ConfigError, config_from_json, yaml_problem

# kfp.Client reads no token from the environment; this is kdflow's name, in kfp's KF_PIPELINES_* family.
TOKEN_ENV = "KF_PIPELINES_TOKEN"
# Where kfp.client.ServiceAccountTokenVolumeCredentials looks for the projected, audience-bound SA token.
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
# The pod's namespace, what kfp.Client itself falls back to on a multi-user deployment.
POD_NAMESPACE_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
UI_ENDPOINT_ENV = "KF_PIPELINES_UI_ENDPOINT"  # kfp.Client's override for the links it prints

SUCCEEDED = "SUCCEEDED"
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED"})
CRON_DESCRIPTORS = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})
_CRON_FIELD = re.compile(r"^[0-9A-Za-z*?/,\-]+$")
_GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


class SubmitError(ValueError):
    """Bad input (package, parameter, cron, host, token file); the message names the bad value."""


class KfpError(RuntimeError):
    """The KFP API could not be reached, refused a request, or a followed run did not finish in time."""


@dataclass(frozen=True)
class Auth:
    """How requests authenticate: a fixed bearer token, or a token file re-read on every request (it rotates)."""

    token: str | None = None
    token_file: str | None = None
    source: str = "none"

    def header(self) -> dict[str, str]:
        if self.token:
            return {"Authorization": f"Bearer {self.token}"}
        if self.token_file:
            return {"Authorization": f"Bearer {Path(self.token_file).read_text().strip()}"}
        return {}


@dataclass(frozen=True)
class Submission:
    """What was created: a run (`recurring=False`) or a recurring run, in which experiment, and its UI link."""

    id: str
    name: str
    url: str
    experiment: str
    experiment_id: str
    experiment_created: bool
    recurring: bool
    parameters: dict[str, Any]
    cron: str | None = None


# --- auth ------------------------------------------------------------------------------------------------------


def resolve_auth(token: str | None = None, environ: dict[str, str] | None = None) -> Auth:
    """--token, else $KF_PIPELINES_TOKEN, else the in-cluster service-account token file, else no auth."""
    env = os.environ if environ is None else environ
    if token:
        return Auth(token=token, source="--token")
    if env.get(TOKEN_ENV):
        return Auth(token=env[TOKEN_ENV], source=f"${TOKEN_ENV}")
    path = env.get(SA_TOKEN_PATH_ENV)
    if path:
        if not Path(path).is_file():
            raise SubmitError(f"${SA_TOKEN_PATH_ENV} points to {path!r}, which is not a file")
        return Auth(token_file=path, source=f"service-account token {path}")
    if Path(SA_TOKEN_PATH).is_file():
        return Auth(token_file=SA_TOKEN_PATH, source=f"service-account token {SA_TOKEN_PATH}")
    return Auth()


# --- package and parameters --------------------------------------------------------------------------------------


def read_package(path: str | Path) -> dict:
    """The pipeline spec (first YAML document) of a compiled package, checked to be a KFP pipeline."""
    p = Path(path)
    if not p.is_file():
        raise SubmitError(f"pipeline package not found: {p}")
    if p.suffix not in (".yaml", ".yml"):
        raise SubmitError(f"pipeline package {p} must be the .yaml that `kdflow compile` writes")
    try:
        docs = list(yaml.safe_load_all(p.read_text()))
    except yaml.YAMLError as err:
        raise SubmitError(f"pipeline package {p} is not valid YAML: {yaml_problem(err)}") from None
    spec = docs[0] if docs else None
    if not isinstance(spec, dict) or "pipelineInfo" not in spec or "root" not in spec:
        raise SubmitError(f"{p} is not a compiled KFP pipeline (no pipelineInfo/root)")
    return spec


def package_parameters(spec: dict) -> dict[str, dict]:
    """The pipeline's run parameters: name → IR definition (parameterType, defaultValue, isOptional)."""
    return dict(spec["root"].get("inputDefinitions", {}).get("parameters", {}))


def parse_params(pairs: list[str] | None) -> dict[str, str]:
    """`k=v` strings → {k: raw v}; values are typed later against the pipeline's declared parameter types."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SubmitError(f"--param expects key=value, got {pair!r}")
        out[key.strip()] = value
    return out


_PYTHON_TYPES = {"LIST": list, "STRUCT": dict, "BOOLEAN": bool, "NUMBER_INTEGER": int, "NUMBER_DOUBLE": (int, float)}


def _typed(name: str, kind: str, raw: str) -> Any:
    if kind == "STRING":
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = None
    expected = _PYTHON_TYPES.get(kind)
    bad_bool = kind.startswith("NUMBER") and isinstance(value, bool)
    if expected is None or not isinstance(value, expected) or bad_bool:
        raise SubmitError(f"--param {name}={raw!r}: the pipeline declares {name} as {kind}")
    return value


def run_parameters(spec: dict, overrides: dict[str, str]) -> tuple[dict[str, Any], Config | None]:
    """Every run parameter: the package's defaults with `overrides` applied, plus the kdflow config they carry.

    All values are sent explicitly, so the run's page in the KFP UI shows exactly what ran."""
    declared = package_parameters(spec)
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        raise SubmitError(
            f"unknown pipeline parameter {', '.join(unknown)}; "
            f"the pipeline's parameters are {', '.join(sorted(declared))}"
        )
    params: dict[str, Any] = {}
    for name, definition in declared.items():
        if name in overrides:
            params[name] = _typed(name, definition.get("parameterType", "STRING"), overrides[name])
        elif "defaultValue" in definition:
            params[name] = definition["defaultValue"]
        elif not definition.get("isOptional"):
            raise SubmitError(f"pipeline parameter {name} has no default: pass --param {name}=...")
    if any(part is not None for part in tracking.split_credentials(str(params.get("tracking_uri", "")))[1:]):
        raise SubmitError(
            f"run parameter tracking_uri={tracking.redact(str(params['tracking_uri']))!r} carries credentials, which "
            "a run's parameters would show to everyone: put them in the cluster's secret (MLFLOW_TRACKING_USERNAME, "
            "MLFLOW_TRACKING_PASSWORD) instead"
        )
    cfg = None
    if "config_json" in params:
        try:
            cfg = config_from_json(params["config_json"])
        except (ConfigError, ValueError) as err:
            raise SubmitError(f"run parameter config_json is not a valid kdflow config: {err}") from None
    if cfg is not None and "candidates" in params:
        known = [c.name for c in cfg.candidates()]
        # items are candidate names, or names joined by "," to train together in one step
        missing = [n for item in params["candidates"] for n in str(item).split(",") if n.strip() not in known]
        if missing:
            raise SubmitError(
                f"candidates {', '.join(map(str, missing))} are not in the config; "
                f"its candidates are {', '.join(known)}"
            )
        if not params["candidates"]:
            raise SubmitError("run parameter candidates is empty: name at least one candidate")
    return params, cfg


# --- schedule ----------------------------------------------------------------------------------------------------


def kfp_cron(expr: str) -> str:
    """A cron expression in the form KFP's scheduler parses (robfig/cron: seconds first, evaluated in UTC).

    Six fields pass as they are; a standard five-field expression gets seconds=0 prepended, because KFP would
    otherwise read its first field as seconds ("0 3 * * *" would fire every hour at minute 3 instead of daily).
    Descriptors (@daily, @every 24h, ...) pass as they are."""
    expr = " ".join(expr.split())
    if expr.startswith("@"):
        every = expr.removeprefix("@every ").strip() if expr.startswith("@every ") else None
        if expr in CRON_DESCRIPTORS or (every and _GO_DURATION.match(every)):
            return expr
        raise SubmitError(f"--schedule {expr!r}: unknown descriptor; use one of {', '.join(sorted(CRON_DESCRIPTORS))}")
    fields = expr.split(" ") if expr else []
    if len(fields) not in (5, 6) or not all(_CRON_FIELD.match(f) for f in fields):
        raise SubmitError(
            f"--schedule {expr!r}: expected a cron expression with 6 fields (sec min hour day month weekday), "
            "or 5 standard fields"
        )
    return expr if len(fields) == 6 else "0 " + expr


# --- the API -------------------------------------------------------------------------------------------------------


def check_host(host: str) -> str:
    """The API base URL without a trailing slash; it must say http:// or https:// (kfp would guess https)."""
    if not re.match(r"^https?://[^/\s]+", host or ""):
        raise SubmitError(f"--host must be a URL starting with http:// or https://, got {host!r}")
    return host.rstrip("/")


def check_api(host: str, auth: Auth, timeout: float = 15.0) -> dict:
    """GET /apis/v2beta1/healthz with a timeout, so a wrong or unreachable host fails fast and clearly.

    (kfp.Client's own requests have no timeout, and a login page would only show up as a JSON error later.)"""
    url = f"{host}/apis/v2beta1/healthz"
    try:
        headers = {"Accept": "application/json", **auth.header()}
    except OSError as err:
        raise SubmitError(f"cannot read the token file {auth.token_file}: {err}") from None
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body, ctype = response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise KfpError(
                f"the KFP API at {host} refused the credentials (HTTP {err.code}; auth: {auth.source})"
            ) from None
        raise KfpError(f"{url} answered HTTP {err.code} {err.reason}: is {host} the Kubeflow Pipelines API?") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise KfpError(f"cannot reach the KFP API at {host}: {reason}") from None
    try:
        return json.loads(body)
    except ValueError:
        raise KfpError(
            f"{url} did not answer JSON ({ctype or 'no content type'}): a login page? "
            "Pass a token (--token or $KF_PIPELINES_TOKEN) or check the URL"
        ) from None


def _as_kfp_error(err: Exception, what: str, host: str) -> KfpError:
    import kfp_server_api

    if isinstance(err, kfp_server_api.ApiException):
        if err.status in (401, 403):
            return KfpError(f"{what} failed: the KFP API at {host} refused the credentials (HTTP {err.status})")
        return KfpError(f"{what} failed: HTTP {err.status} {err.reason}{_api_message(err.body)}")
    return KfpError(f"{what} failed: cannot reach the KFP API at {host}: {err}")


def _transport_errors() -> tuple[type[Exception], ...]:
    import kfp_server_api
    import urllib3

    return kfp_server_api.ApiException, urllib3.exceptions.HTTPError, OSError


@contextlib.contextmanager
def _kfp_call(what: str, host: str) -> Iterator[None]:
    """Turn kfp/kfp_server_api failures into a KfpError that says what failed; keep kfp's prints off stdout."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", FutureWarning)  # kfp.Client warns on every construction
            yield
    except _transport_errors() as err:
        raise _as_kfp_error(err, what, host) from None


def _api_message(body: Any) -> str:
    if not body:
        return ""
    try:
        data = json.loads(body)
        message = data.get("message") or data.get("error") or ""
    except (ValueError, AttributeError):
        message = str(body)[:300]
    return f": {message}" if message else ""


def connect(host: str, auth: Auth, namespace: str | None = None):
    """A kfp.Client for `host` with `auth`; a token file is re-read on every request, like kfp does in-cluster."""
    import kfp
    from kfp.client import ServiceAccountTokenVolumeCredentials

    kwargs: dict[str, Any] = {"host": host}
    if auth.token:
        kwargs["existing_token"] = auth.token
    elif auth.token_file:
        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(path=auth.token_file)
    if namespace:
        kwargs["namespace"] = namespace
    with _kfp_call("connecting", host):
        return kfp.Client(**kwargs)


def resolve_namespace(namespace: str | None, multi_user: bool) -> str | None:
    """The profile namespace: --namespace, else the pod's own on a multi-user deployment (as kfp.Client does)."""
    if namespace or not multi_user:
        return namespace
    if Path(POD_NAMESPACE_PATH).is_file():
        return Path(POD_NAMESPACE_PATH).read_text().strip()
    raise SubmitError("this Kubeflow Pipelines is multi-user: pass --namespace with your profile's namespace")


def ensure_experiment(client, host: str, name: str, namespace: str | None) -> tuple[str, bool]:
    """The experiment's id, creating it when no experiment has that name; and whether it was created."""
    with _kfp_call(f"looking up experiment {name!r}", host):
        try:
            return client.get_experiment(experiment_name=name, namespace=namespace).experiment_id, False
        except ValueError as err:
            if not str(err).startswith("No experiment is found"):
                raise KfpError(f"looking up experiment {name!r} failed: {err}") from None
    with _kfp_call(f"creating experiment {name!r}", host):
        return client.create_experiment(name=name, namespace=namespace).experiment_id, True


def ui_base(host: str) -> str:
    return os.environ.get(UI_ENDPOINT_ENV, host).rstrip("/")


def run_url(host: str, run_id: str) -> str:
    return f"{ui_base(host)}/#/runs/details/{run_id}"


def recurring_run_url(host: str, recurring_run_id: str) -> str:
    return f"{ui_base(host)}/#/recurringrun/details/{recurring_run_id}"


def default_run_name(experiment: str) -> str:
    return f"{experiment}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


@dataclass(frozen=True)
class Plan:
    """A submission checked offline: the package, every run parameter, the experiment, run name and cron."""

    package: Path
    parameters: dict[str, Any]
    experiment: str
    name: str
    cron: str | None = None
    # the run's config reads s3:// data: no step may come from KFP's cache, whatever config the package was
    # compiled with (the objects can change while the config, KFP's cache key, stays the same)
    uncached: bool = False


def plan(
    package: str | Path,
    params: dict[str, str] | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    schedule: str | None = None,
) -> Plan:
    """Check everything about a submission that needs no server; SubmitError names the first bad value.

    `experiment` defaults to the experiment of the kdflow config in the run parameters, `run_name` to
    <experiment>-<UTC timestamp>."""
    spec = read_package(package)
    values, cfg = run_parameters(spec, params or {})
    cron = kfp_cron(schedule) if schedule is not None else None
    experiment = experiment or (cfg.experiment if cfg else None)
    if not experiment:
        raise SubmitError("no experiment: pass --experiment (the package carries no kdflow config to take it from)")
    uncached = cfg is not None and cfg.data.from_object_store
    return Plan(Path(package), values, experiment, run_name or default_run_name(experiment), cron, uncached)


def open_client(host: str, auth: Auth, namespace: str | None = None):
    """(kfp.Client, namespace) after a health check that fails fast on a wrong host or refused credentials."""
    health = check_api(host, auth)
    namespace = resolve_namespace(namespace, bool(health.get("multi_user")))
    return connect(host, auth, namespace), namespace


def without_caching(package: Path, out: Path) -> Path:
    """A copy of `package` with caching off for every task, in every DAG (kfp.Client's `enable_caching` only
    reaches the root DAG's tasks, and kdflow's steps sit inside the exit handler's)."""
    docs = list(yaml.safe_load_all(package.read_text()))
    spec = docs[0]
    for dag in [spec["root"].get("dag", {}), *(c.get("dag", {}) for c in spec.get("components", {}).values())]:
        for task in dag.get("tasks", {}).values():
            task["cachingOptions"] = {}  # what the compiler writes for a task with caching off
    out.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return out


def submit(client, host: str, plan: Plan, namespace: str | None = None) -> Submission:
    """Create the run (or, with a cron, the recurring run) in the plan's experiment, creating the experiment."""
    if plan.uncached:
        import dataclasses
        import tempfile

        with tempfile.TemporaryDirectory(prefix="kdflow-submit-") as tmp:
            package = without_caching(plan.package, Path(tmp) / plan.package.name)
            return submit(client, host, dataclasses.replace(plan, package=package, uncached=False), namespace)
    experiment_id, created = ensure_experiment(client, host, plan.experiment, namespace)
    common = dict(
        name=plan.name,
        experiment=plan.experiment,
        experiment_id=experiment_id,
        experiment_created=created,
        parameters=plan.parameters,
    )
    if plan.cron is None:
        with _kfp_call(f"creating run {plan.name!r}", host):
            run = client.run_pipeline(
                experiment_id=experiment_id,
                job_name=plan.name,
                pipeline_package_path=str(plan.package),
                params=plan.parameters,
            )
        return Submission(id=run.run_id, url=run_url(host, run.run_id), recurring=False, **common)
    with _kfp_call(f"creating recurring run {plan.name!r}", host):
        job = client.create_recurring_run(
            experiment_id=experiment_id,
            job_name=plan.name,
            description=f"kdflow re-distillation on cron {plan.cron!r} (UTC)",
            cron_expression=plan.cron,
            max_concurrency=1,
            no_catchup=True,  # after a pause, run once, not once per missed slot
            params=plan.parameters,
            pipeline_package_path=str(plan.package),
        )
    rid = job.recurring_run_id
    return Submission(id=rid, url=recurring_run_url(host, rid), recurring=True, cron=plan.cron, **common)


def wait_for_run(
    client,
    host: str,
    run_id: str,
    *,
    timeout: float,
    poll_interval: float = 10.0,
    on_state: Callable[[str], None] | None = None,
    max_errors: int = 5,
):
    """Poll the run until it reaches a terminal state and return it (a V2beta1Run); KfpError on timeout.

    Unlike kfp's wait_for_run_completion this also stops on CANCELED, and rides out a few consecutive transient
    API errors (5xx, 429, connection resets) instead of abandoning a run that may take hours."""
    deadline = time.monotonic() + timeout
    last, errors = None, 0
    while True:
        try:
            run = client.get_run(run_id)
            errors = 0
        except _transport_errors() as err:
            status = getattr(err, "status", None)
            errors += 1
            # 4xx means this request is wrong and will stay wrong, except 429: the API asks to slow down
            if (status and status < 500 and status != 429) or errors >= max_errors:
                raise _as_kfp_error(err, f"getting run {run_id}", host) from None
            run = None
        if run is not None:
            state = str(run.state or "PENDING")
            if state != last and on_state:
                on_state(state)
            last = state
            if state in TERMINAL_STATES:
                return run
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise KfpError(f"run {run_id} still {last or 'unknown'} after {timeout:g} s (it goes on in the cluster)")
        time.sleep(min(poll_interval, remaining))


def run_error(run) -> str:
    """The message KFP gives for a failed run, or ''."""
    error = getattr(run, "error", None)
    message = getattr(error, "message", None) if error is not None else None
    return message or ""
