"""Thin KFP v2 components: each adapts typed KFP artifacts to one `kdflow.runner.entrypoints` function,
which opens the step's context and calls its `kdflow.steps` function(s).

Installed as `kdflow.components`. Bodies import inside the function because KFP ships only the function's
source to the container; the image already has kdflow and kfp (`install_kfp_package=False`).
"""

from kdflow.components.data_prep import data_prep
from kdflow.components.distill import distill
from kdflow.components.evaluate import evaluate
from kdflow.components.finalize import finalize
from kdflow.components.prune import prune
from kdflow.components.register import register
from kdflow.components.teacher import train_teacher

__all__ = ["data_prep", "train_teacher", "prune", "distill", "evaluate", "register", "finalize"]
