"""Bad input through the real CLI: does each one fail fast, once, with one line naming it, and leave nothing behind?

Every case runs `python -m kdflow.cli run|compile|submit ...` in a fresh temporary folder (its own `--home`, its
own bad data built from the real MNIST/USPS files in `../shared/data` or by hand), and records the exit code, the
wall time, the error line the command printed, whether that message is one line and names the bad key, value or
file, and what the home's MLflow store holds afterwards (registered model versions, aliases, RUNNING runs).

    python benchmarks/bad_inputs.py                  # every case (minutes: data cases start the pipeline)
    python benchmarks/bad_inputs.py --only lr,alias  # cases whose id contains one of these
    python benchmarks/bad_inputs.py --list

Prints a markdown table and writes `benchmarks/results/bad_inputs.json`.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
SHARED_DATA = REPO.parent / "shared" / "data"
if not SHARED_DATA.is_dir():
    SHARED_DATA = Path("/work/shared/data")
FAST_S = 10.0
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# the lines where the CLI states why it stopped: its own error line, or the failed step's error
MESSAGE_START = ("error:", "pipeline failed:")


@dataclass
class Case:
    id: str
    what: str  # the bad input, as the README names it
    args: list[str]  # after `python -m kdflow.cli`; {tmp}, {home} and {data} are filled in
    names: str  # what the message must contain (the key, value or file), after {…} filling
    fixture: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    server: str | None = None  # "s3": a moto S3 server on loopback, its endpoint in the environment


# ------------------------------------------------------------------------------------------------ fixtures


def _idx(dtype_code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    import struct

    return bytes([0, 0, dtype_code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + payload


def _mnist_copy(tmp: Path) -> Path:
    d = tmp / "mnist"
    d.mkdir()
    for f in (SHARED_DATA / "mnist").glob("t10k-*"):
        shutil.copy(f, d / f.name)
    return d


def mnist_label_42(tmp: Path) -> None:
    d = _mnist_copy(tmp)
    path = d / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[8 + 1234] = 42  # one label of the 10,000
    path.write_bytes(gzip.compress(bytes(raw)))


def mnist_truncated_gzip(tmp: Path) -> None:
    d = _mnist_copy(tmp)
    path = d / "t10k-images-idx3-ubyte.gz"
    packed = path.read_bytes()
    path.write_bytes(packed[: len(packed) // 2])  # a download cut in half


def mnist_bad_magic(tmp: Path) -> None:
    d = _mnist_copy(tmp)
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"<html>404 Not Found</html>"))


def mnist_count_mismatch(tmp: Path) -> None:
    d = _mnist_copy(tmp)
    path = d / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(_idx(0x08, (9000,), raw[8 : 8 + 9000])))


def mnist_empty_dir(tmp: Path) -> None:
    (tmp / "mnist").mkdir()
    (tmp / "mnist" / "README.txt").write_text("the files were never downloaded\n")


def usps_truncated(tmp: Path) -> None:
    d = tmp / "usps"
    d.mkdir()
    packed = (SHARED_DATA / "usps" / "usps.t.bz2").read_bytes()
    (d / "usps.t.bz2").write_bytes(packed[: len(packed) // 2])


def usps_not_bz2(tmp: Path) -> None:
    d = tmp / "usps"
    d.mkdir()
    (d / "usps.t.bz2").write_bytes(bz2.compress(b"not a libsvm line\n")[:10] + b"garbage")


def _tree(tmp: Path, classes: dict[str, int], size: int = 8) -> Path:
    from PIL import Image

    root = tmp / "tree"
    for cls, n in classes.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (size, size), (37 * i) % 256).save(root / cls / f"{i}.png")
    return root


def tree_one_class(tmp: Path) -> None:
    _tree(tmp, {"cat": 40})


def tree_empty(tmp: Path) -> None:
    (tmp / "tree" / "cat").mkdir(parents=True)
    (tmp / "tree" / "dog").mkdir(parents=True)


def tree_corrupt_image(tmp: Path) -> None:
    root = _tree(tmp, {"cat": 20, "dog": 20})
    (root / "dog" / "7.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG header, then nothing


def a_file(tmp: Path) -> None:
    (tmp / "a-file").write_text("not a folder\n")


def corrupt_store(tmp: Path) -> None:
    (tmp / "home").mkdir()
    (tmp / "home" / "mlflow.db").write_bytes(b"SQLite format 3\x00" + os.urandom(4080))


def empty_home(tmp: Path) -> None:
    (tmp / "home").mkdir()


def config_list(tmp: Path) -> None:
    (tmp / "cfg.yaml").write_text("- distill\n- train\n")


def config_bad_yaml(tmp: Path) -> None:
    (tmp / "cfg.yaml").write_text("distill:\n  train: {epochs: 3\nseed: 1\n")


def config_tabs(tmp: Path) -> None:
    (tmp / "cfg.yaml").write_text("distill:\n\ttrain:\n\t\tepochs: 3\n")


def config_unknown_key(tmp: Path) -> None:
    (tmp / "cfg.yaml").write_text("distill:\n  train:\n    epocs: 3\n")


def config_dir(tmp: Path) -> None:
    (tmp / "cfg.yaml").mkdir()


def package_garbage(tmp: Path) -> None:
    (tmp / "pipe.yaml").write_text("this: is not\n- a pipeline\n")


def s3_tree(tmp: Path) -> None:
    """Three images of two classes under s3://kdflow/tree/ (on the benchmark's moto server)."""
    import boto3
    from PIL import Image

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    for key in ("tree/cat/0.png", "tree/cat/1.png", "tree/dog/0.png"):
        local = tmp / "img.png"
        Image.new("L", (8, 8), 7).save(local)
        s3.upload_file(str(local), "kdflow", key)


# ----------------------------------------------------------------------------------------------------- cases

D = "--set"
CROSS = [D, "data.setup=cross_dataset", D, "data.image_size=8", D, "data.channels=1"]


def _cases() -> list[Case]:
    run = ["run", "--home", "{home}"]
    c = [
        # --- config keys and values (--set)
        Case("unknown-key", "unknown key `distill.train.epochz`", [*run, D, "distill.train.epochz=3"],
             "distill.train.epochz: unknown key"),
        Case("unknown-section", "unknown section `trainer.epochs`", [*run, D, "trainer.epochs=3"],
             "trainer: unknown key"),
        Case("epochs-type", "wrong type: `distill.train.epochs=many`", [*run, D, "distill.train.epochs=many"],
             "distill.train.epochs"),
        Case("epochs-negative", "negative epochs", [*run, D, "distill.train.epochs=-1"], "distill.train.epochs"),
        Case("epochs-huge", "epochs 10^9", [*run, D, "teacher.finetune.epochs=1000000000"],
             "teacher.finetune.epochs"),
        Case("lr-zero", "`lr` 0", [*run, D, "distill.train.lr=0"], "distill.train.lr"),
        Case("momentum-one", "momentum 1.0", [*run, D, "distill.train.momentum=1.0"], "distill.train.momentum"),
        Case("batch-zero", "batch size 0", [*run, D, "distill.train.batch_size=0"], "distill.train.batch_size"),
        Case("warmup-too-long", "`warmup_epochs` ≥ `epochs`", [*run, D, "distill.train.warmup_epochs=50"],
             "warmup_epochs=50"),
        Case("optimizer", "unknown optimizer `adam`", [*run, D, "distill.train.optimizer=adam"],
             "distill.train.optimizer"),
        Case("temperature-zero", "loss temperature 0",
             [*run, D, "distill.losses=[{name: kd, kind: kd, temperature: 0}]"], "distill.losses[0].temperature"),
        Case("alpha-above-one", "loss alpha 1.5", [*run, D, "distill.losses=[{name: kd, kind: kd, alpha: 1.5}]"],
             "distill.losses[0].alpha"),
        Case("loss-kind", "unknown loss kind `kl`", [*run, D, "distill.losses=[{name: x, kind: kl}]"],
             "distill.losses[0].kind"),
        Case("loss-dup", "duplicate loss names", [*run, D, "distill.losses=[{name: a, kind: kd}, {name: a, kind: ce}]"],
             "distill.losses names must be unique"),
        Case("loss-standardize", "`standardize` on a `ce` loss",
             [*run, D, "distill.losses=[{name: c, kind: ce, standardize: true}]"], "standardize: true"),
        Case("losses-empty", "empty loss list", [*run, D, "distill.losses=[]"],
             "distill.students and distill.losses must each list at least one entry"),
        Case("students-empty", "empty student list", [*run, D, "distill.students=[]"],
             "distill.students and distill.losses must each list at least one entry"),
        Case("student-dup", "duplicate student names",
             [*run, D, "distill.students=[{name: s, arch: cnn}, {name: s, arch: resnet20}]"],
             "distill.students names must be unique"),
        Case("student-arch", "unknown student arch `vgg99`", [*run, D, "distill.students=[{name: s, arch: vgg99}]"],
             "distill.students[0].arch"),
        Case("student-name", "student name with `/`", [*run, D, "distill.students=[{name: a/b, arch: cnn}]"],
             "distill.students[0].name"),
        Case("student-two-origins", "student with both `arch` and `from_pruned`",
             [*run, D, "distill.students=[{name: s, arch: cnn, from_pruned: 0.75}]"], "exactly one of"),
        Case("prune-ratio", "prune ratio 1.5", [*run, D, "prune.ratios=[1.5]"], "got 1.5"),
        Case("from-pruned", "`from_pruned` not in `prune.ratios`",
             [*run, D, "distill.students=[{name: p, from_pruned: 0.5}]"], "from_pruned=0.5"),
        Case("teacher-arch", "unknown teacher arch", [*run, D, "teacher.arch=resnet1000"], "teacher.arch"),
        Case("alias-latest", "reserved alias `latest`", [*run, D, "registry.alias=latest"], "'latest'"),
        Case("alias-version", "reserved alias `v3`", [*run, D, "registry.alias=v3"], "'v3'"),
        Case("alias-chars", "alias with a space", [*run, D, "registry.alias=my champ"], "registry.alias"),
        Case("model-slash", "model name `team/student`", [*run, D, "registry.model_name=team/student"],
             "'team/student'"),
        Case("model-dotdot", "model name `../x`", [*run, D, "registry.model_name=../x"], "'../x'"),
        Case("model-same", "student and teacher model names equal", [*run, D, "registry.model_name=m",
             D, "registry.teacher_model_name=m"], "registry.model_name and registry.teacher_model_name"),
        Case("gate-metric", "significance gate on `test_top5`",
             [*run, D, "registry.gate=significance", D, "registry.champion_metric=test_top5"],
             "registry.champion_metric='test_top5'"),
        Case("device", "device `tpu`", [*run, D, "device=tpu"], "device"),
        Case("seed-negative", "seed −1", [*run, D, "seed=-1"], "seed"),
        Case("setup", "unknown `data.setup`", [*run, D, "data.setup=zero_shot"], "data.setup"),
        Case("target-missing", "`cross_dataset` without a target", [*run, D, "data.setup=cross_dataset"],
             "data.target is required"),
        Case("val-fraction", "`val_fraction` 0.7", [*run, D, "data.val_fraction=0.7"], "data.val_fraction"),
        Case("class-overlap", "overlapping source/target classes",
             [*run, D, "data.setup=class_split", D, "data.source_classes=[0,1,2]", D, "data.target_classes=[2,3]"],
             "overlap: [2]"),
        Case("latency-batch", "latency batch sizes without 1", [*run, D, "evaluate.latency_batch_sizes=[64]"],
             "must include 1"),
        Case("search-kinds", "search over `ce` only",
             [*run, D, "distill.search={kinds: [ce]}"], "search kinds must be logit objectives"),
        # --- the command line itself
        Case("set-yaml", "malformed `--set` YAML `epochs=[1`", [*run, D, "distill.train.epochs=[1"],
             "'distill.train.epochs=[1'"),
        Case("set-no-equals", "`--set` without `=`", [*run, D, "distill.train.epochs"], "'distill.train.epochs'"),
        Case("set-into-value", "`--set seed.x=1` (seed is a value)", [*run, D, "seed.x=1"],
             "--set seed.x"),
        Case("home-file", "`--home` that is a file", ["run", "--home", "{tmp}/a-file"], "{tmp}/a-file", a_file),
        Case("uri-refused", "`--tracking-uri http://127.0.0.1:9` (refused)",
             [*run, "--tracking-uri", "http://127.0.0.1:9"], "http://127.0.0.1:9"),
        Case("uri-env", "`MLFLOW_TRACKING_URI` refused", run, "http://127.0.0.1:9",
             env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}),
        Case("uri-dns", "tracking host that does not resolve",
             [*run, "--tracking-uri", "http://no-such-host.invalid:5000"], "no-such-host.invalid"),
        Case("uri-scheme", "tracking URI with an unknown scheme", [*run, "--tracking-uri", "ftp://127.0.0.1/x"],
             "ftp://127.0.0.1/x"),
        Case("store-corrupt", "corrupt SQLite store in the home", run, "{home}/mlflow.db", corrupt_store),
        Case("resume-nothing", "`--resume` on a home with no run", [*run, "--resume"], "--resume", empty_home),
        # --- config files (-c)
        Case("config-missing", "missing config file", [*run, "-c", "{tmp}/nope.yaml"], "{tmp}/nope.yaml"),
        Case("config-dir", "config path that is a folder", [*run, "-c", "{tmp}/cfg.yaml"], "{tmp}/cfg.yaml",
             config_dir),
        Case("config-list", "config file that is a list, not a mapping", [*run, "-c", "{tmp}/cfg.yaml"],
             "top level must be a mapping", config_list),
        Case("config-yaml", "config file with unclosed `{`", [*run, "-c", "{tmp}/cfg.yaml"], "{tmp}/cfg.yaml",
             config_bad_yaml),
        Case("config-tabs", "config file indented with tabs", [*run, "-c", "{tmp}/cfg.yaml"], "{tmp}/cfg.yaml",
             config_tabs),
        Case("config-key", "config file with a misspelt key", [*run, "-c", "{tmp}/cfg.yaml"],
             "distill.train.epocs: unknown key", config_unknown_key),
        # --- data (checked in data prep, before any training)
        Case("source-unknown", "unknown data source `mnistt`", [*run, D, "data.source=mnistt"], "'mnistt'"),
        Case("mnist-dir-missing", "missing mnist-idx directory", [*run, D, "data.source=mnist-idx:{tmp}/nope"],
             "{tmp}/nope"),
        Case("mnist-dir-empty", "mnist-idx folder without IDX files", [*run, D, "data.source=mnist-idx:{tmp}/mnist"],
             "{tmp}/mnist", mnist_empty_dir),
        Case("mnist-label-42", "MNIST label 42 (one of 10,000)", [*run, D, "data.source=mnist-idx:{tmp}/mnist"],
             "label 42", mnist_label_42),
        Case("mnist-gzip-cut", "MNIST images gzip cut in half", [*run, D, "data.source=mnist-idx:{tmp}/mnist"],
             "{tmp}/mnist/t10k-images-idx3-ubyte.gz", mnist_truncated_gzip),
        Case("mnist-magic", "an HTML page saved as an IDX file", [*run, D, "data.source=mnist-idx:{tmp}/mnist"],
             "{tmp}/mnist/t10k-images-idx3-ubyte.gz", mnist_bad_magic),
        Case("mnist-count", "9,000 labels for 10,000 images", [*run, D, "data.source=mnist-idx:{tmp}/mnist"],
             "t10k-labels-idx1-ubyte.gz", mnist_count_mismatch),
        Case("usps-cut", "USPS bz2 cut in half",
             [*run, D, "data.source=digits", D, "data.target=usps:{tmp}/usps", *CROSS], "{tmp}/usps/usps.t.bz2",
             usps_truncated),
        Case("usps-missing", "USPS folder without its files",
             [*run, D, "data.source=digits", D, "data.target=usps:{tmp}", *CROSS], "{tmp}"),
        Case("tree-missing", "missing imagefolder path",
             [*run, D, "data.source=digits", D, "data.target=imagefolder:{tmp}/nope", *CROSS], "{tmp}/nope"),
        Case("tree-one-class", "imagefolder with one class",
             [*run, D, "data.source=digits", D, "data.target=imagefolder:{tmp}/tree", *CROSS], "only one class",
             tree_one_class),
        Case("tree-empty", "imagefolder whose class folders are empty",
             [*run, D, "data.source=digits", D, "data.target=imagefolder:{tmp}/tree", *CROSS], "{tmp}/tree",
             tree_empty),
        Case("tree-corrupt", "imagefolder with an undecodable PNG",
             [*run, D, "data.source=digits", D, "data.target=imagefolder:{tmp}/tree", *CROSS], "7.png",
             tree_corrupt_image),
        Case("tree-no-size", "imagefolder without `data.image_size`",
             [*run, D, "data.source=digits", D, "data.target=imagefolder:{tmp}/tree", D, "data.setup=cross_dataset"],
             "data.image_size", tree_one_class),
        Case("class-range", "class index 42 of 10", [*run, D, "data.setup=class_split", D,
             "data.source_classes=[0,1,2,3,4]", D, "data.target_classes=[5,42]"], "[42]"),
        # --- s3 (a moto server on loopback)
        Case("s3-bucket", "s3 URI with an invalid bucket name",
             [*run, D, "data.source=digits", D, "data.target=s3://Bad_Bucket/tree/", *CROSS], "'Bad_Bucket'",
             server="s3"),
        Case("s3-empty-prefix", "s3 prefix with no objects",
             [*run, D, "data.source=digits", D, "data.target=s3://kdflow/nothing-here/", *CROSS],
             "s3://kdflow/nothing-here/", server="s3"),
        Case("s3-max-files", "s3 tree over `KDFLOW_S3_MAX_FILES=2`",
             [*run, D, "data.source=digits", D, "data.target=s3://kdflow/tree/", *CROSS], "KDFLOW_S3_MAX_FILES",
             s3_tree, env={"KDFLOW_S3_MAX_FILES": "2"}, server="s3"),
        Case("s3-limit-value", "`KDFLOW_S3_MAX_BYTES=lots`",
             [*run, D, "data.source=digits", D, "data.target=s3://kdflow/tree/", *CROSS], "KDFLOW_S3_MAX_BYTES",
             s3_tree, env={"KDFLOW_S3_MAX_BYTES": "lots"}, server="s3"),
        # --- compile and submit
        Case("compile-quantity", "`kdflow compile`: memory limit `lots`",
             ["compile", "-o", "{tmp}/p.yaml", D, "cluster.gpu_resources.memory_limit=lots"],
             "cluster.gpu_resources.memory_limit"),
        Case("compile-backoff", "`kdflow compile`: retry backoff `30`",
             ["compile", "-o", "{tmp}/p.yaml", D, "cluster.retry.backoff=30"], "cluster.retry.backoff"),
        Case("submit-no-host", "`kdflow submit` without a host", ["submit"], "--host"),
        Case("submit-host", "`kdflow submit --host localhost:8080`", ["submit", "--host", "localhost:8080"],
             "'localhost:8080'"),
        Case("submit-param", "`kdflow submit --param` without `=`",
             ["submit", "--host", "http://127.0.0.1:9", "--param", "tracking_uri"], "'tracking_uri'"),
        Case("submit-cron", "`kdflow submit --schedule` bad cron",
             ["submit", "--host", "http://127.0.0.1:9", "--schedule", "every day"], "'every day'"),
        Case("submit-package", "`kdflow submit --package` missing file",
             ["submit", "--host", "http://127.0.0.1:9", "--package", "{tmp}/nope.yaml"], "{tmp}/nope.yaml"),
        Case("submit-garbage", "`kdflow submit --package` not a pipeline",
             ["submit", "--host", "http://127.0.0.1:9", "--package", "{tmp}/pipe.yaml"], "{tmp}/pipe.yaml",
             package_garbage),
        Case("submit-secret", "`kdflow submit`: credentials in `tracking_uri`",
             ["submit", "--host", "http://127.0.0.1:9", "--param", "tracking_uri=http://u:pw@mlflow:5000"],
             "tracking_uri"),
    ]  # fmt: skip
    return c


# --------------------------------------------------------------------------------------------------- running


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{home}", str(tmp / "home"))


def _message(out: str) -> tuple[str, int]:
    """The message the command stopped with, and how many lines it spans (a config error lists one line per key
    under its first line)."""
    lines = [ANSI.sub("", line).rstrip() for line in out.splitlines()]
    for i, line in enumerate(lines):
        if line.lstrip().startswith(MESSAGE_START):
            n = 1
            while i + n < len(lines) and lines[i + n].startswith("  ") and lines[i].startswith("error:"):
                n += 1
            return " ".join(x.strip() for x in lines[i : i + n]), n
    tail = [line for line in lines if line.strip()]
    return (tail[-1] if tail else ""), 0  # no error line: the last line printed


def _store(home: Path) -> dict:
    """What the home's MLflow store holds: registered versions, aliases, RUNNING runs (None: no store)."""
    db = home / "mlflow.db"
    if not db.is_file():
        return {"store": False}
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    try:
        client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
        models = client.search_registered_models()
        versions = sum(len(client.search_model_versions(f"name='{m.name}'")) for m in models)
        aliases = sum(len(m.aliases) for m in models)
        exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
        runs = client.search_runs(exps, run_view_type=ViewType.ALL) if exps else []
        running = sum(r.info.status == "RUNNING" for r in runs)
        return {"store": True, "versions": versions, "aliases": aliases, "running": running, "runs": len(runs)}
    except Exception as err:  # the corrupt-store case: nothing can have been written to it
        return {"store": True, "unreadable": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"}


def run_case(case: Case, timeout: float, keep: Path | None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"kdflow-bad-{case.id}-"))
    try:
        if case.fixture is not None:
            case.fixture(tmp)
        drop = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "KDFLOW_HOME")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update({k: _fill(v, tmp) for k, v in case.env.items()})
        cmd = [sys.executable, "-m", "kdflow.cli", *[_fill(a, tmp) for a in case.args]]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env, timeout=timeout)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            rc, out = None, (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
        took = time.monotonic() - t0
        message, lines = _message(out)
        names = _fill(case.names, tmp)
        row = {
            "id": case.id,
            "what": case.what,
            "command": " ".join(cmd[2:]).replace(str(tmp), "<tmp>"),
            "exit_code": rc,
            "seconds": round(took, 2),
            "message": message.replace(str(tmp), "<tmp>"),
            "message_lines": lines,
            "one_line": lines == 1,
            "names_it": names in message,
            "expected": names.replace(str(tmp), "<tmp>"),
            "traceback_in_output": "Traceback" in out,
            "home": _store(tmp / "home"),
        }
        if keep is not None:
            (keep / f"{case.id}.txt").write_text(out)
        return row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _leaks(row: dict) -> bool:
    h = row["home"]
    return bool(h.get("versions") or h.get("aliases") or h.get("running"))


def ok(row: dict) -> bool:
    return bool(row["exit_code"]) and row["one_line"] and row["names_it"] and not _leaks(row)


def _table(rows: list[dict]) -> str:
    out = ["| # | bad input | message (the line printed) | s | exit | one line, names it | left behind |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for i, r in enumerate(rows, 1):
        h = r["home"]
        left = (
            "no store"
            if not h["store"]
            else h.get("unreadable", "")
            and "store unreadable (the fixture)"
            or f"{h['versions']} versions, {h['aliases']} aliases, {h['running']} RUNNING of {h['runs']} runs"
        )
        msg = r["message"].replace("|", "\\|")
        mark = "yes" if r["one_line"] and r["names_it"] else f"**no** ({r['message_lines']} lines, {r['names_it']=})"
        out.append(f"| {i} | {r['what']} | `{msg}` | {r['seconds']:.1f} | {r['exit_code']} | {mark} | {left} |")
    return "\n".join(out)


def readme_table(rows: list[dict]) -> str:
    """The compact table of README.md's "Bad inputs tried": input, message (without `error: `), seconds, exit."""
    out = ["| # | bad input | message | s | exit |", "|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        msg = r["message"].removeprefix("error: ").replace("<tmp>", "…")
        msg = (msg if len(msg) <= 160 else msg[:157] + "…").replace("|", "\\|")  # shortened: the JSON has all
        out.append(f"| {i} | {r['what']} | `{msg}` | {r['seconds']:.1f} | {r['exit_code']} |")
    return "\n".join(out)


def summary(rows: list[dict]) -> dict:
    n = len(rows)
    return {
        "cases": n,
        "nonzero_exit": sum(bool(r["exit_code"]) for r in rows),
        "one_line_naming_it": sum(r["one_line"] and r["names_it"] for r in rows),
        "under_10s": sum(r["seconds"] < FAST_S for r in rows),
        "share_under_10s": round(sum(r["seconds"] < FAST_S for r in rows) / max(n, 1), 3),
        "leaving_versions_aliases_or_running_runs": sum(_leaks(r) for r in rows),
        "traceback_in_output": sum(r["traceback_in_output"] for r in rows),
        "median_s": sorted(r["seconds"] for r in rows)[n // 2] if n else None,
        "max_s": max((r["seconds"] for r in rows), default=None),
        "all_ok": all(ok(r) for r in rows),
    }


def _s3_env(stack) -> dict[str, str]:
    sys.path.insert(0, str(REPO))
    from tests.helpers import servers

    s3 = stack.enter_context(servers.s3_server(Path(tempfile.mkdtemp(prefix="kdflow-bad-moto-"))))
    return {
        "AWS_ENDPOINT_URL_S3": s3.endpoint,
        "AWS_ACCESS_KEY_ID": servers.S3_KEY,
        "AWS_SECRET_ACCESS_KEY": servers.S3_SECRET,
        "AWS_DEFAULT_REGION": servers.S3_REGION,
    }


def main() -> None:
    import contextlib

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated substrings of case ids")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds before a case is stopped")
    ap.add_argument("--keep-output", type=Path, default=None, help="write each case's full output here")
    ap.add_argument("--out", type=Path, default=RESULTS / "bad_inputs.json")
    ap.add_argument("--merge", action="store_true", help="with --only: replace those cases' rows in --out")
    ap.add_argument("--readme", action="store_true", help="print README.md's table from --out and exit")
    args = ap.parse_args()
    if args.readme:
        print(readme_table(json.loads(args.out.read_text())["cases"]))
        return
    cases = _cases()
    if args.only:
        cases = [c for c in cases if any(s in c.id for s in args.only.split(","))]
    if args.list:
        for c in cases:
            print(f"{c.id:20s} {c.what}")
        return
    if args.keep_output is not None:
        args.keep_output.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t0 = time.time()
    rows = []
    with contextlib.ExitStack() as stack:
        if any(c.server == "s3" for c in cases):
            os.environ.update(_s3_env(stack))
        for c in cases:
            row = run_case(c, args.timeout, args.keep_output)
            rows.append(row)
            flag = "ok" if ok(row) else "FAIL"
            print(f"[{len(rows)}/{len(cases)}] {flag:4s} {row['seconds']:6.1f}s rc={row['exit_code']} {c.id}: "
                  f"{row['message'][:150]}", flush=True)  # fmt: skip
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
            "nice": os.nice(0),
        },
        "total_s": round(time.time() - t0, 1),
        "summary": summary(rows),
        "cases": rows,
    }
    print()
    print(_table(rows))
    print()
    print(json.dumps(result["summary"], indent=1))
    if args.only and args.merge:  # the earlier full run's rows, these cases rerun
        earlier = json.loads(args.out.read_text())
        fresh = {r["id"]: r for r in rows}
        earlier["cases"] = [{**fresh[r["id"]], "rerun": result["date"]} if r["id"] in fresh else r
                            for r in earlier["cases"]]  # fmt: skip
        earlier["summary"] = summary(earlier["cases"])
        earlier.setdefault("reruns", []).append({"date": result["date"], "cases": sorted(fresh),
                                                 "machine": result["machine"]})  # fmt: skip
        result = earlier
    if not args.only or args.merge:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
