"""The one place the runtime image tag is derived from the package version."""

import os

from kdflow import __version__

IMAGE_REPOSITORY = os.environ.get("KDFLOW_IMAGE_REPOSITORY", "ghcr.io/kdflow/kdflow")
IMAGE = f"{IMAGE_REPOSITORY}:{__version__}"
