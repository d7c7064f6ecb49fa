"""What a user sees after `kdflow run`, checked in a real browser: starts the MLflow UI on 127.0.0.1 over a kdflow
home's store, opens it and the last run's HTML report in headless Chromium (Playwright driving Debian's
`chromium`, no browser download), and checks that

- the experiment's runs table lists the pipeline run and its candidate runs, in the training (not GenAI) view;
- the registered model's page shows the `champion` alias on the version the registry gives it;
- the report page shows its table, the decision and the trade-off figure, loaded (non-zero size).

    apt-get install -y chromium && pip install playwright
    kdflow run --home /tmp/kd                      # or any home with a finished run
    python tools/browser_check.py --home /tmp/kd   # exit 0 when everything is there; screenshots in --out

Exit 1 naming what is missing, 2 when Chromium or Playwright is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
ML_VIEW = "workflowType=machine_learning"  # MLflow 3.17's Model training view


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM) if p), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(store_uri: str, log: Path):
    """`mlflow ui` on 127.0.0.1 (its own process group, stopped on exit); yields its URL once it answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store_uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow ui did not start: see {log}") from None
                time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@dataclass
class Expected:
    """What the store says the pages must show."""

    experiment_id: str
    pipeline_run: str  # the parent run's name
    candidates: list[str]  # its candidate runs' names
    model: str
    champion: int
    report: Path  # the last run's report.html, on disk


def expected(store_uri: str) -> Expected:
    """The latest pipeline run, its candidates, its model's champion and its report, read from the store."""
    from urllib.parse import unquote, urlsplit

    import mlflow

    from kdflow import catalog, tracking

    client = mlflow.MlflowClient(store_uri)
    parent = catalog.pipeline_run(client, None)
    summary = catalog.run_summary(client, parent)
    kids = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`{tracking.STEP_TAG}` = 'distill'",
    )
    model = summary["model_name"]
    champ = int(client.get_model_version_by_alias(model, "champion").version)
    uri = f"{parent.info.artifact_uri}/{tracking.REPORT_DIR}/report.html"
    return Expected(parent.info.experiment_id, parent.info.run_name, sorted(r.info.run_name for r in kids), model,
                    champ, Path(unquote(urlsplit(uri).path)))  # fmt: skip


def check(url: str, want: Expected, chromium: str, out: Path) -> list[str]:
    """Open the pages in headless Chromium; return what is missing (empty: all there)."""
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(60_000)

        # MLflow 3.17's UI takes the experiment's view from its GenAI / Model training switch (the
        # `workflowType` query parameter, else the browser's last choice), older 3.x from the experiment's
        # `mlflow.experimentKind` tag: kdflow sets the tag and prints links with the parameter
        page.goto(f"{url}/#/experiments/{want.experiment_id}/runs?{ML_VIEW}")
        page.get_by_text(want.pipeline_run, exact=True).first.wait_for()
        nav = page.inner_text("body").split(want.pipeline_run)[0]
        if "Evaluation runs" in nav or "Model training" not in nav:
            problems.append("the experiment opens in MLflow's GenAI view (Traces, Evaluation runs)")
        cell = page.locator("[role=gridcell]", has_text=want.pipeline_run).first
        cell.locator("button").first.click()  # expand the pipeline run: its step and candidate runs
        for name in want.candidates:
            try:
                page.get_by_text(name, exact=True).first.wait_for()
            except Exception:
                problems.append(f"runs table: no candidate run {name!r} under {want.pipeline_run}")
        page.screenshot(path=str(out / "runs.png"), full_page=True)

        page.goto(f"{url}/#/models/{want.model}?{ML_VIEW}")
        versions = page.locator("[role=row]", has=page.get_by_role("link", name=re.compile(r"^Version \d+$")))
        versions.first.wait_for()
        holders = [r.get_by_role("link", name=re.compile(r"^Version")).first.inner_text()
                   for r in versions.all() if "champion" in r.inner_text()]  # fmt: skip
        if holders != [f"Version {want.champion}"]:
            problems.append(f"model page {want.model}: champion shown on {holders}, not Version {want.champion}")
        page.screenshot(path=str(out / "model.png"), full_page=True)

        page.goto(want.report.as_uri())
        img = page.locator("img#tradeoff")
        width = img.evaluate("i => i.complete ? i.naturalWidth : 0") if img.count() else 0
        if width == 0:
            problems.append(f"report {want.report}: the trade-off figure did not load")
        if "champion" not in page.inner_text("table#candidates"):
            problems.append("report: no champion in its table")
        if not page.inner_text("ul#decision").strip():
            problems.append("report: no decision")
        page.screenshot(path=str(out / "report.png"), full_page=True)
        browser.close()
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=Path("kdflow-home"), help="kdflow home with a finished run")
    ap.add_argument("--out", type=Path, default=Path("browser-check"), help="where the screenshots go")
    args = ap.parse_args(argv)
    chromium = find_chromium()
    try:
        import playwright  # noqa: F401
    except ImportError:
        chromium = None
    if chromium is None:
        print("error: needs Chromium and Playwright: apt-get install -y chromium && pip install playwright")
        return 2
    db = args.home.resolve() / "mlflow.db"
    if not db.is_file():
        print(f"error: no kdflow store at {db}: run kdflow run --home {args.home} first")
        return 1
    store = f"sqlite:///{db}"
    want = expected(store)
    args.out.mkdir(parents=True, exist_ok=True)
    with mlflow_ui(store, args.out / "mlflow-ui.log") as url:
        problems = check(url, want, chromium, args.out)
    for p in problems:
        print(f"missing: {p}")
    if not problems:
        print(f"ok: runs ({want.pipeline_run} and {len(want.candidates)} candidates), {want.model} champion "
              f"v{want.champion}, report figure; screenshots in {args.out}")  # fmt: skip
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
