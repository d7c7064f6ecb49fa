"""The one place the runtime image reference is derived: `<repository>:<tag>`, the tag being the package version.

Set KDFLOW_IMAGE_REPOSITORY for your registry, and KDFLOW_IMAGE_TAG (e.g. the git commit) when you rebuild without
a version bump: nodes that already pulled a tag keep running it (Kubernetes' IfNotPresent). Set both the same way
when building (`make push`) and compiling."""

import os

from kdflow import __version__

IMAGE_REPOSITORY = os.environ.get("KDFLOW_IMAGE_REPOSITORY", "ghcr.io/kdflow/kdflow")
IMAGE_TAG = os.environ.get("KDFLOW_IMAGE_TAG") or __version__
IMAGE = f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"
