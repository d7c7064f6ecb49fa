"""The two baselines kdflow's distillation is compared against, each written the way its users write it.

- `plain_kd`: a hand-written PyTorch KD loop: a torchvision transform pipeline per sample in a Dataset, a
  shuffling DataLoader, the teacher's forward pass under no_grad on every step, Hinton's loss written out.
- `torchdistill_kd`: torchdistill's own machinery: a `DistillationBox` built from a config dict (what its YAML
  files hold), its `KDLoss` inside a `WeightedSumLoss`, its optimiser/scheduler registry, its data-loader builder,
  and the box's pre-epoch / forward / post-forward / post-epoch hooks driven by the loop of its example script.

Both use the recipe kdflow's `fit` uses (see benchmarks/common.py `Recipe`): SGD with Nesterov momentum and weight
decay, a cosine learning rate stepped every batch over all steps, loss (1 - a)·CE + a·T²·KL(teacher ‖ student)
with batch-mean KL, random-crop augmentation (zero padding H/8) when the recipe asks for it, a validation pass
before training and after every epoch, and the best validation epoch kept (accuracy, ties to the lower loss).
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
import torch.nn.functional as F
from common import Recipe, Task, amp_dtype
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler, TensorDataset
from torchvision.transforms import v2

from kdflow.data import ImageSet
from kdflow.engine.device import seed_everything


class AugmentedImages(Dataset):
    """uint8 (N, C, H, W) images through a torchvision v2 transform per sample, as a torchvision user writes it."""

    def __init__(self, split: ImageSet, transform):
        self.x, self.y, self.transform = split.x, split.y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.x[i]), self.y[i]


def train_dataset(task: Task, recipe: Recipe) -> Dataset:
    """The training set with the recipe's augmentation. Without augmentation: a TensorDataset of images
    normalised once up front (the fastest plain option)."""
    mean = task.manifest["normalization"]["mean"]
    std = task.manifest["normalization"]["std"]
    if recipe.augment == "none":
        return TensorDataset(task.normalizer(task.train.x), task.train.y)
    size = task.image_size
    steps = [v2.RandomCrop(size, padding=max(1, size // 8))]  # same padding as kdflow.data.augment
    if recipe.augment == "crop_flip":
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return AugmentedImages(task.train, v2.Compose(steps))


def val_dataset(task: Task) -> Dataset:
    return TensorDataset(task.normalizer(task.val.x), task.val.y)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    dtype = amp_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def _validate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over a loader, in eval mode."""
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x).float()
        correct += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        n += len(y)
    return correct / n, loss / n


class BestKeeper:
    """Keeps the best validation weights, by the rule kdflow's fit uses: accuracy, ties to the lower loss."""

    def __init__(self, model: nn.Module, acc: float, loss: float):
        self.key, self.state = (acc, -loss), copy.deepcopy(model.state_dict())

    def offer(self, model: nn.Module, acc: float, loss: float) -> None:
        if (acc, -loss) > self.key:
            self.key, self.state = (acc, -loss), copy.deepcopy(model.state_dict())


# ------------------------------------------------------------------------------------------------- plain loop


def plain_kd(
    student: nn.Module,
    teacher: nn.Module,
    task: Task,
    recipe: Recipe,
    *,
    seed: int,
    device: torch.device,
    workers: int = 0,
) -> None:
    """A hand-written PyTorch distillation loop; leaves `student` holding its best-validation weights."""
    seed_everything(seed)
    pin = device.type == "cuda"
    train_loader = DataLoader(
        train_dataset(task, recipe),
        batch_size=recipe.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
    )
    val_loader = DataLoader(val_dataset(task), batch_size=512, num_workers=0, pin_memory=pin)
    student.to(device)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(
        student.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        nesterov=recipe.momentum > 0,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, recipe.epochs * len(train_loader)))
    t, a = recipe.temperature, recipe.alpha

    best = BestKeeper(student, *_validate(student, val_loader, device))
    for _ in range(recipe.epochs):
        student.train()
        running_loss = 0.0
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device):
                with torch.no_grad():
                    t_logits = teacher(x)
                s_logits = student(x)
                hard = F.cross_entropy(s_logits, y)
                soft = F.kl_div(
                    F.log_softmax(s_logits.float() / t, dim=1),
                    F.softmax(t_logits.float() / t, dim=1),
                    reduction="batchmean",
                )
                loss = (1 - a) * hard + a * t * t * soft
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running_loss += loss.item()  # the per-step loss readout every training loop has
        best.offer(student, *_validate(student, val_loader, device))
    student.load_state_dict(best.state)


# ----------------------------------------------------------------------------------------------- torchdistill


def torchdistill_config(task: Task, recipe: Recipe, seed: int, workers: int, pin: bool) -> dict:
    """The `train:` section of a torchdistill YAML config for Hinton KD, as a dict (classes in place of the
    `!import_get` tags). torchdistill's KDLoss is `alpha·CE + beta·T²·KL`, so kdflow's `(1 - a)·CE + a·T²·KL`
    is alpha = 1 - a, beta = a."""
    steps = recipe.steps_per_epoch(len(task.train))
    return {
        "num_epochs": recipe.epochs,
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": RandomSampler, "kwargs": {"generator": torch.Generator().manual_seed(seed)}},
            "kwargs": {
                "batch_size": recipe.batch_size,
                "num_workers": workers,
                "pin_memory": pin,
                "persistent_workers": workers > 0,
            },
            "requires_supp": True,
        },
        "val_data_loader": {
            "dataset_id": "val",
            "sampler": {"class_or_func": SequentialSampler, "kwargs": {}},
            "kwargs": {"batch_size": 512, "num_workers": 0, "pin_memory": pin},
        },
        "teacher": {
            "forward_proc": "forward_batch_only",
            "sequential": [],
            "forward_hook": {"input": [], "output": []},
            "requires_grad": False,
        },
        "student": {
            "forward_proc": "forward_batch_only",
            "sequential": [],
            "forward_hook": {"input": [], "output": []},
            "requires_grad": True,
        },
        "optimizer": {
            "key": "SGD",
            "kwargs": {
                "lr": recipe.lr,
                "momentum": recipe.momentum,
                "weight_decay": recipe.weight_decay,
                "nesterov": recipe.momentum > 0,
            },
        },
        "scheduler": {
            "key": "CosineAnnealingLR",
            "kwargs": {"T_max": max(1, recipe.epochs * steps)},
            "scheduling_step": 1,  # step-wise, as kdflow's fit
        },
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {
                "sub_terms": {
                    "kd": {
                        "criterion": {
                            "key": "KDLoss",
                            "kwargs": {
                                "student_module_path": ".",
                                "student_module_io": "output",
                                "teacher_module_path": ".",
                                "teacher_module_io": "output",
                                "temperature": recipe.temperature,
                                "alpha": 1 - recipe.alpha,
                                "beta": recipe.alpha,
                                "reduction": "batchmean",
                            },
                        },
                        "weight": 1.0,
                    }
                }
            },
        },
    }


def torchdistill_kd(
    student: nn.Module,
    teacher: nn.Module,
    task: Task,
    recipe: Recipe,
    *,
    seed: int,
    device: torch.device,
    workers: int = 0,
) -> None:
    """Hinton KD through torchdistill's DistillationBox; the epoch loop follows torchdistill's
    examples/torchvision/image_classification.py (`train` / `train_one_epoch`), keeping the best validation
    weights in memory instead of a checkpoint file."""
    from torchdistill.common.main_util import set_seed
    from torchdistill.core.distillation import get_distillation_box

    logging.getLogger("torchdistill").setLevel(logging.WARNING)
    set_seed(seed)
    student.to(device)
    teacher.to(device).eval()  # torchdistill leaves the teacher's mode to the caller; frozen BN = eval
    dataset_dict = {"train": train_dataset(task, recipe), "val": val_dataset(task)}
    train_config = torchdistill_config(task, recipe, seed, workers, device.type == "cuda")
    box = get_distillation_box(teacher, student, dataset_dict, train_config, device, None, False, 1)

    best = BestKeeper(student, *_validate(student, box.val_data_loader, device))
    for epoch in range(box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            sample_batch, targets = sample_batch.to(device), targets.to(device)
            with _autocast(device):
                loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            if not torch.isfinite(loss):  # the example's per-step check (it also logs loss.item())
                raise ValueError(f"torchdistill KD loss became {loss.item()}")
        best.offer(student, *_validate(student, box.val_data_loader, device))
        box.post_epoch_process()
    box.clean_modules()
    student.load_state_dict(best.state)
