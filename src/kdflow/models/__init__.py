"""Networks: the architecture zoo (`zoo`: name → builder, head swap, hint layer), weights-only checkpoints
(`checkpoint`) and structured channel pruning (`pruning`, which imports Torch-Pruning: import it by name)."""

from kdflow.errors import ModelError
from kdflow.models.zoo import (
    MODELS,
    Arch,
    BasicBlock,
    CifarResNet,
    SmallCNN,
    build,
    count_params,
    hint_layer,
    reinitialize,
    replace_head,
)

__all__ = [
    "MODELS",
    "Arch",
    "BasicBlock",
    "CifarResNet",
    "ModelError",
    "SmallCNN",
    "build",
    "count_params",
    "hint_layer",
    "reinitialize",
    "replace_head",
]
