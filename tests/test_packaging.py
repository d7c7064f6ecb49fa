"""What a non-editable install (the runtime image's `pip install .`) ships: every package of the source tree."""

from __future__ import annotations

import tomllib

from tests.helpers.paths import REPO


def test_pyproject_lists_every_package_under_src():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(("kdflow", *init.parent.relative_to(REPO / "src" / "kdflow").parts)).rstrip(".")
        for init in (REPO / "src" / "kdflow").rglob("__init__.py")
    }
    assert on_disk <= listed, f"missing from [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert listed - on_disk == {"kdflow.components", "kdflow.pipelines"}  # mapped from components/ and pipelines/
