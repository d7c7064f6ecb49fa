"""The architecture registry and the training loop, on tiny inputs and a tiny separable task (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdflow import models
from kdflow.config import LossConfig, TrainConfig
from kdflow.data import ImageSet
from kdflow.data.augment import augment, augment_variant, augment_variants, augment_with_variant
from kdflow.engine.loop import fit
from kdflow.engine.stream import batch_bounds
from kdflow.evaluate import accuracy, predict
from tests.helpers.quadrants import CPU, NORM, SOURCE, TRAIN, VAL, cfg, cnn, quadrants, state, train_quadrants

pytestmark = pytest.mark.usefixtures("one_thread")
TORCHVISION = {"resnet18", "mobilenet_v3_small"}

# arch → (in_channels, image size) used to build and run it
INPUTS = {
    "cnn": (1, 8),
    "resnet20": (3, 16),
    "resnet32": (3, 16),
    "resnet56": (3, 16),
    "resnet8x4": (3, 16),
    "resnet32x4": (3, 16),
    "resnet18": (1, 32),
    "mobilenet_v3_small": (1, 32),
}


def test_every_registered_arch_has_an_input_spec():
    assert set(models.MODELS) == set(INPUTS)


# ------------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def built():
    """Every registry architecture, built once (torchvision ones offline: no weights, 1 input channel)."""
    torch.manual_seed(0)
    return {arch: models.build(arch, in_channels=c, num_classes=7) for arch, (c, _) in INPUTS.items()}


@pytest.mark.parametrize("arch", sorted(INPUTS))
def test_forward_shape(built, arch):
    c, size = INPUTS[arch]
    model = built[arch].eval()
    with torch.no_grad():
        out = model(torch.randn(2, c, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", sorted(INPUTS))
def test_replace_head_changes_output_size(arch):
    c, size = INPUTS[arch]
    torch.manual_seed(0)
    model = models.build(arch, in_channels=c, num_classes=10)
    same = models.replace_head(model, 3, arch)
    assert same is model
    head = model.get_submodule(models.MODELS[arch].head)
    assert isinstance(head, nn.Linear) and head.out_features == 3
    with torch.no_grad():
        assert model.eval()(torch.randn(2, c, size, size)).shape == (2, 3)


@pytest.mark.parametrize("arch", sorted(INPUTS))
def test_hint_layer_is_a_feature_map_submodule(built, arch):
    c, size = INPUTS[arch]
    model = built[arch].eval()
    name = models.hint_layer(arch)
    layer = model.get_submodule(name)  # raises AttributeError when the name is wrong
    seen = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    with torch.no_grad():
        model(torch.randn(2, c, size, size))
    handle.remove()
    assert len(seen) == 1 and len(seen[0]) == 4 and seen[0][0] == 2  # (N, C, H, W)


def test_torchvision_stem_takes_one_channel(built):
    for arch in TORCHVISION:
        first = next(m for m in built[arch].modules() if isinstance(m, nn.Conv2d))
        assert first.in_channels == 1


def test_small_cnn_width_sets_channels():
    m = models.build("cnn", in_channels=3, num_classes=5, width=4)
    assert m.features[0][0].out_channels == 4 and m.classifier.in_features == 8
    assert models.count_params(m) < models.count_params(models.build("cnn", 3, 5, width=8))


def test_unknown_arch_is_named():
    with pytest.raises(models.ModelError, match="'vgg_nope'"):
        models.build("vgg_nope", in_channels=1, num_classes=10)


def test_bad_arch_kwargs():
    with pytest.raises(models.ModelError, match="'cnn'"):
        models.build("cnn", in_channels=1, num_classes=10, depth=3)


def test_bad_resnet_depth():
    with pytest.raises(models.ModelError, match="6n\\+2"):
        models.CifarResNet(21, (16, 16, 32, 64))


def test_count_params():
    assert models.count_params(nn.Linear(4, 3)) == 15


# ---------------------------------------------------------------------------------------------- augment


def images(b=16, c=2, h=16, w=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (b, c, h, w), generator=g, dtype=torch.uint8)  # no zeros: padding is visible


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_augment_none_is_identity():
    x = images()
    assert augment(x, "none", gen()) is x


@pytest.mark.parametrize("kind", ["crop", "crop_flip"])
def test_augment_keeps_shape_and_dtype(kind):
    x = images(b=5, c=3, h=12, w=10)
    out = augment(x, kind, gen())
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.is_contiguous()


@pytest.mark.parametrize("kind", ["crop", "crop_flip"])
def test_augment_is_deterministic_per_generator_seed(kind):
    x = images(b=64)
    assert torch.equal(augment(x, kind, gen(5)), augment(x, kind, gen(5)))
    assert not torch.equal(augment(x, kind, gen(5)), augment(x, kind, gen(6)))


def windows(img: torch.Tensor, pad: int, flips: bool) -> list[torch.Tensor]:
    """Every crop of `img` (C, H, W) after zero padding by `pad`, and their mirror images when `flips`."""
    _, h, w = img.shape
    padded = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    out = [padded[:, dy : dy + h, dx : dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    return out + [o.flip(-1) for o in out] if flips else out


@pytest.mark.parametrize("kind", ["crop", "crop_flip"])
def test_crop_only_shifts_content(kind):
    x = images(b=32, c=2, h=16, w=16)  # pad = 16 // 8 = 2
    out = augment(x, kind, gen(1))
    shifted = 0
    for i in range(len(x)):
        assert out[i].sum() <= x[i].sum()  # zero padding can only drop content, never add it
        assert any(torch.equal(out[i], win) for win in windows(x[i], 2, flips=kind == "crop_flip"))
        shifted += not torch.equal(out[i], x[i])
    assert shifted > len(x) // 2  # the offsets really vary (P(centre crop) = 1/25 per sample)


def test_crop_on_tiny_images_pads_at_least_one_pixel():
    x = images(b=64, c=1, h=4, w=4)  # h // 8 == 0 → pad 1
    out = augment(x, "crop", gen(2))
    for i in range(len(x)):
        assert any(torch.equal(out[i], win) for win in windows(x[i], 1, flips=False))


def test_crop_flip_flips_some_samples():
    x = images(b=64, c=1, h=16, w=16)
    out = augment(x, "crop_flip", gen(3))
    crops_only = [any(torch.equal(out[i], win) for win in windows(x[i], 2, flips=False)) for i in range(len(x))]
    assert 0 < sum(crops_only) < len(x)


@pytest.mark.parametrize(
    ("kind", "size", "expected"),
    [("none", 8, 1), ("crop", 8, 9), ("crop", 16, 25), ("crop_flip", 16, 50), ("crop", 32, 81), ("crop", 4, 9)],
)
def test_augment_variants_counts_offsets_and_flips(kind, size, expected):
    assert augment_variants(kind, size) == expected


@pytest.mark.parametrize("kind", ["crop", "crop_flip"])
def test_variant_index_names_the_crop_each_sample_got(kind):
    """The index `augment_with_variant` returns rebuilds each sample's image (what a teacher-output table is
    looked up by), in the order `windows` lists them; the images and draws are `augment`'s."""
    x = images(b=400, c=2, h=16, w=16)
    out, variant = augment_with_variant(x, kind, gen(4))
    assert torch.equal(out, augment(x, kind, gen(4)))
    assert sorted(set(variant.tolist())) == list(range(augment_variants(kind, 16)))  # every variant drawn
    for i in range(len(x)):
        v = int(variant[i])
        assert torch.equal(out[i], augment_variant(x[i : i + 1], kind, v)[0])
        position = v if kind == "crop" else v // 2 + (v % 2) * 25
        assert torch.equal(out[i], windows(x[i], 2, flips=kind == "crop_flip")[position])


def test_augment_variant_rejects_an_index_out_of_range():
    with pytest.raises(ValueError, match="variant 25 out of range for 'crop' on 16-px"):
        augment_variant(images(b=1), "crop", 25)


# ------------------------------------------------------------------------------------------------- fit


def test_fit_cross_entropy_solves_the_task():
    model = cnn(4)
    seen = []
    res = train_quadrants(model, cfg(6), on_epoch=lambda e, m: seen.append(e))
    assert res.best_val_acc == 1.0
    assert 1 <= res.best_epoch <= 6
    assert seen == [1, 2, 3, 4, 5, 6] and len(res.history) == 6
    assert {"train_ce", "train_loss", "val_acc", "val_loss", "lr"} <= set(res.history[0])
    # the model is left holding its best-validation weights
    assert accuracy(predict(model, VAL.x, NORM), VAL.y) == res.best_val_acc


def test_fit_restores_the_best_epoch_weights():
    model = cnn(4)
    snapshots = {0: state(model)}
    res = train_quadrants(
        model,
        cfg(8, lr=0.5, augment="crop"),
        on_epoch=lambda e, m: snapshots.__setitem__(e, state(model)),
    )
    accs = [h["val_acc"] for h in res.history]
    assert res.best_epoch < 8  # later epochs never beat it (ties keep the earlier epoch), so the last is not kept
    assert res.best_val_acc == max(accs)
    assert res.best_epoch == 1 + accs.index(max(accs))  # the first epoch reaching the best accuracy
    final = model.state_dict()
    assert all(torch.equal(snapshots[res.best_epoch][k], final[k]) for k in final)


def test_fit_sgd_without_momentum_takes_a_plain_gradient_step():
    model = cnn(4)
    ref = copy.deepcopy(model)
    after: dict[str, torch.Tensor] = {}
    one_step = cfg(1, momentum=0.0, weight_decay=0.0, batch_size=len(TRAIN))  # one full batch, no augmentation
    res = train_quadrants(model, one_step, on_epoch=lambda e, m: after.update(state(model)))
    assert len(res.history) == 1
    ref.train()
    nn.functional.cross_entropy(ref(NORM(TRAIN.x)), TRAIN.y).backward()
    for name, p in ref.named_parameters():  # w <- w - lr * grad, nothing else
        torch.testing.assert_close(after[name], p.detach() - one_step.lr * p.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "n, size, expected",
    [
        (64, 64, [(0, 64)]),
        (65, 64, [(0, 65)]),  # a lone last sample joins the batch before it
        (129, 32, [(0, 32), (32, 64), (64, 96), (96, 129)]),
        (130, 64, [(0, 64), (64, 128), (128, 130)]),
        (1, 64, [(0, 1)]),
    ],
)
def test_batch_bounds(n, size, expected):
    assert batch_bounds(n, size) == expected


def test_fit_never_trains_batchnorm_on_a_lone_sample():
    """A layer whose output is 1×1 cannot batch-normalise one sample: 65 images at batch 64 must still train."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 8), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 4))
    sixty_five = ImageSet(TRAIN.x[:65], TRAIN.y[:65])
    res = fit(model, sixty_five, VAL, cfg(2, batch_size=64), NORM, seed=0, device=CPU)
    assert len(res.history) == 2


def test_fit_zero_epochs_keeps_the_initial_weights():
    model = cnn(4)
    before = state(model)
    res = train_quadrants(model, cfg(0))
    assert res.best_epoch == 0 and res.history == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fit_with_adamw_and_augmentation_trains():
    model = cnn(4)
    res = fit(
        model,
        TRAIN,
        VAL,
        TrainConfig(epochs=6, batch_size=32, lr=0.01, optimizer="adamw", augment="crop"),
        NORM,
        seed=0,
        device=CPU,
    )
    assert res.best_val_acc >= 0.9


def test_fit_kd_with_teacher_trains(teacher):
    teacher_before = state(teacher)
    model = cnn(4)
    res = train_quadrants(
        model,
        cfg(10),
        loss=LossConfig(name="kd", kind="kd"),
        teacher=teacher,
    )
    assert res.best_val_acc == 1.0
    assert {"train_ce", "train_kd"} <= set(res.history[0])
    # the teacher is frozen: in eval mode, without gradients, weights (and BN statistics) untouched
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())


def test_fit_hint_with_wider_teacher_trains(teacher):
    model = cnn(4)
    res = train_quadrants(
        model,
        cfg(10),
        loss=LossConfig(name="hint", kind="hint"),
        teacher=teacher,
        hint_layers=("features", "features"),
    )
    assert res.best_val_acc >= 0.9
    assert {"train_ce", "train_kd", "train_hint"} <= set(res.history[0])
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in res.history)
    assert not model.features._forward_hooks and not teacher.features._forward_hooks  # taps removed


@pytest.mark.parametrize("transfer", ["target", "source", "both"])
def test_kd_term_is_measured_on_the_configured_transfer_set(teacher, transfer):
    """One full-batch step: the logged KD term is exactly T²·KL(teacher ‖ student) of the initial student on
    the transfer set the config names (target images, source images, or both), and on no other."""
    from kdflow import objectives

    source = quadrants(len(TRAIN), 3)  # as many as the target: one full batch covers each source image once
    torch.manual_seed(0)  # no BatchNorm: train and eval mode give the same logits
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4)
    )
    start = copy.deepcopy(model).eval()
    loss = LossConfig(name="kd", kind="kd", alpha=1.0, temperature=3.0, transfer=transfer)
    res = fit(
        model,
        TRAIN,
        VAL,
        cfg(1, batch_size=len(TRAIN)),
        NORM,
        seed=0,
        device=CPU,
        loss=loss,
        teacher=teacher,
        source=source if transfer != "target" else None,
    )

    def kd_on(x):
        with torch.no_grad():
            return float(objectives.kd_kl(start(NORM(x)), teacher.eval()(NORM(x)), 3.0))

    expected = {"target": TRAIN.x, "source": source.x, "both": torch.cat([TRAIN.x, source.x])}
    values = {k: kd_on(x) for k, x in expected.items()}
    assert res.history[0]["train_kd"] == pytest.approx(values[transfer], rel=1e-5)
    others = [v for k, v in values.items() if k != transfer]
    assert all(abs(v - values[transfer]) > 1e-3 for v in others)  # the sets give distinguishable values


@pytest.mark.parametrize("kind", ["kd", "logit_mse", "hint"])
@pytest.mark.parametrize("transfer", ["source", "both"])
def test_fit_with_a_source_transfer_set_runs(teacher, kind, transfer):
    model = cnn(4)
    loss = LossConfig(name=kind, kind=kind, transfer=transfer)
    res = train_quadrants(
        model,
        cfg(2),
        loss=loss,
        teacher=teacher,
        source=SOURCE,
        hint_layers=("features", "features") if kind == "hint" else None,
    )
    assert len(res.history) == 2
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in res.history)


def test_same_seed_gives_identical_weights():
    def run(seed: int) -> dict[str, torch.Tensor]:
        model = cnn(4, seed=0)
        fit(model, TRAIN, VAL, cfg(2, augment="crop_flip"), NORM, seed=seed, device=CPU)
        return state(model)

    a, b, c = run(0), run(0), run(1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the seed does steer shuffling/augmentation


def test_same_seed_gives_identical_kd_weights(teacher):
    def run() -> dict[str, torch.Tensor]:
        model = cnn(4, seed=0)
        fit(
            model,
            TRAIN,
            VAL,
            cfg(2),
            NORM,
            seed=3,
            device=CPU,
            loss=LossConfig(name="kd", kind="kd"),
            teacher=teacher,
        )
        return state(model)

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["kd", "logit_mse", "hint"])
def test_distillation_loss_without_teacher_fails(kind):
    with pytest.raises(ValueError, match="needs a teacher"):
        train_quadrants(cnn(4), cfg(1), loss=LossConfig(name=kind, kind=kind))


@pytest.mark.parametrize("transfer", ["source", "both"])
def test_source_transfer_without_source_fails(teacher, transfer):
    loss = LossConfig(name="kd", kind="kd", transfer=transfer)
    with pytest.raises(ValueError, match="no source data"):
        train_quadrants(cnn(4), cfg(1), loss=loss, teacher=teacher)


def test_ce_ignores_transfer_and_needs_no_source():
    res = train_quadrants(
        cnn(4),
        cfg(1),
        loss=LossConfig(name="ce", kind="ce", transfer="source"),
    )
    assert len(res.history) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_with_teacher_on_cuda_uses_autocast_and_keeps_weights_on_device():
    from kdflow.config import LossConfig, TrainConfig
    from kdflow.data import ImageSet, Normalizer
    from kdflow.engine.loop import fit
    from kdflow.models import SmallCNN

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(256, 1, 8, 8, generator=g) * 255).to(torch.uint8)
    y = (x.float().mean(dim=(1, 2, 3)) > 127).long()
    device = torch.device("cuda")
    teacher = SmallCNN(1, 2, width=8).to(device).eval()
    student = SmallCNN(1, 2, width=4)
    result = fit(
        student,
        ImageSet(x, y),
        ImageSet(x, y),
        TrainConfig(epochs=2, batch_size=64),
        Normalizer([0.5], [0.25]),
        seed=0,
        device=device,
        loss=LossConfig(name="kd", kind="kd"),
        teacher=teacher,
    )
    assert next(student.parameters()).device.type == "cuda"
    assert len(result.history) == 2
