"""Unit tests for kdflow.models.pruning (structured channel pruning) and kdflow.models.checkpoint (weights-only
files)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kdflow import models
from kdflow.models import checkpoint, pruning

WIDTH = 8
IMPORTANCES = ("l1", "l2", "bn_scale", "lamp", "random", "taylor")


def expected_cnn_params(in_channels: int, num_classes: int, widths: tuple[int, int, int, int]) -> int:
    """SmallCNN by formula: four 3×3 convs without bias, BN (weight + bias) after each, a linear head."""
    c1, c2, c3, c4 = widths
    convs = 9 * (in_channels * c1 + c1 * c2 + c2 * c3 + c3 * c4)
    bns = 2 * (c1 + c2 + c3 + c4)
    head = c4 * num_classes + num_classes
    return convs + bns + head


def expected_cnn_conv_macs(in_channels: int, num_classes: int, widths, hw: int) -> int:
    """Multiply-accumulates of the convs and the head only (two convs at hw², max-pool, two at (hw/2)²)."""
    c1, c2, c3, c4 = widths
    full, half = hw * hw, (hw // 2) ** 2
    return 9 * (in_channels * c1 * full + c1 * c2 * full + c2 * c3 * half + c3 * c4 * half) + c4 * num_classes


def conv_out_channels(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def kept(c: int, ratio: float) -> int:
    return int(c * (1 - ratio))


@pytest.fixture
def example() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(4, 1, 8, 8)


@pytest.fixture
def calibration() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]


def make_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.SmallCNN(in_channels=1, num_classes=10, width=WIDTH)


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN affine parameters and running statistics, so a round trip really has to carry them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def weaken_first_filters(model: nn.Module, n: int) -> torch.Tensor:
    """Make the first conv's filters 0..n-1 1000x weaker, with their BN scale and shift and the next conv's
    matching inputs (the whole channel group a criterion scores); returns the other filters' weights."""
    conv1, bn1, conv2 = model.features[0][0], model.features[0][1], model.features[1][0]
    with torch.no_grad():
        conv1.weight[:n] *= 1e-3
        bn1.weight[:n] *= 1e-3
        bn1.bias[:n] *= 1e-3
        conv2.weight[:, :n] *= 1e-3
    return conv1.weight[n:].clone()


# --------------------------------------------------------------------------------------------- SmallCNN


def test_small_cnn_param_count_by_formula():
    model = make_cnn()
    # 9·(1·8 + 8·8 + 8·16 + 16·16) + 2·(8+8+16+16) + (16·10 + 10) = 4104 + 96 + 170
    assert expected_cnn_params(1, 10, (8, 8, 16, 16)) == 4370
    assert models.count_params(model) == 4370
    assert conv_out_channels(model) == [8, 8, 16, 16]


@pytest.mark.parametrize("importance", ["l1", "l2", "lamp", "bn_scale"])
def test_magnitude_criteria_remove_the_weakest_filters(importance, example):
    """Filters 0-3 of the first conv (with their BN scale and the next conv's matching inputs) are made 1000x
    weaker: every magnitude criterion must remove exactly those and keep filters 4-7 unchanged."""
    model = make_cnn()
    randomize_bn(model)
    strong = weaken_first_filters(model, 4)
    pruning.prune(model, example, 0.5, arch="cnn", importance=importance)
    assert torch.equal(model.features[0][0].weight, strong)


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_prune_small_cnn_half(importance, example, calibration):
    ratio = 0.5
    model = make_cnn()
    before = expected_cnn_params(1, 10, (WIDTH, WIDTH, 2 * WIDTH, 2 * WIDTH))
    assert models.count_params(model) == before

    report = pruning.prune(model, example, ratio, arch="cnn", importance=importance, calibration=calibration)

    widths = (kept(WIDTH, ratio), kept(WIDTH, ratio), kept(2 * WIDTH, ratio), kept(2 * WIDTH, ratio))
    assert widths == (4, 4, 8, 8)
    after = expected_cnn_params(1, 10, widths)
    assert after == 1182
    assert models.count_params(model) == after
    assert report.params_before == before
    assert report.params_after == after
    assert report.ratio == ratio and report.importance == importance
    assert report.param_reduction == pytest.approx(before / after)

    # the layers really shrank, the classifier kept its 10 outputs
    assert conv_out_channels(model) == list(widths)
    assert model.classifier.in_features == widths[-1] and model.classifier.out_features == 10
    assert [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == list(widths)

    # MACs: counted by Torch-Pruning (convs + head + elementwise layers); the convs/head are >85% of them
    macs_conv_before = expected_cnn_conv_macs(1, 10, (8, 8, 16, 16), 8)
    macs_conv_after = expected_cnn_conv_macs(1, 10, widths, 8)
    assert macs_conv_before <= report.macs_before <= 1.15 * macs_conv_before
    assert macs_conv_after <= report.macs_after <= 1.15 * macs_conv_after
    assert report.macs_after < report.macs_before
    # halving both sides of every conv but the first → about a quarter of the MACs
    assert 0.2 < report.macs_after / report.macs_before < 0.35
    assert report.mac_reduction == pytest.approx(report.macs_before / report.macs_after)

    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # still size-independent
    assert all(p.grad is None for p in model.parameters())  # gradients cleared after taylor


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.75])
def test_prune_keeps_int_c_times_one_minus_ratio(ratio, example):
    model = make_cnn()
    report = pruning.prune(model, example, ratio, arch="cnn")
    widths = tuple(kept(c, ratio) for c in (8, 8, 16, 16))
    assert conv_out_channels(model) == list(widths)
    assert models.count_params(model) == report.params_after == expected_cnn_params(1, 10, widths)
    assert model(example).shape == (4, 10)


def test_prune_global_pruning_ranks_channels_across_layers(example):
    """Six of the first conv's 8 filters are made 1000x weaker. Global pruning removes half of all 48 channels,
    ranked together, so it takes those six from the first layer; per-layer pruning takes half of each layer."""
    model = make_cnn()
    strong = weaken_first_filters(model, 6)
    local = copy.deepcopy(model)
    report = pruning.prune(model, example, 0.5, arch="cnn", global_pruning=True)
    widths = conv_out_channels(model)
    assert widths[0] == 2 and sum(widths) == 24
    assert torch.equal(model.features[0][0].weight, strong)
    assert report.params_after == models.count_params(model) == expected_cnn_params(1, 10, tuple(widths))
    pruning.prune(local, example, 0.5, arch="cnn", global_pruning=False)
    assert conv_out_channels(local) == [4, 4, 8, 8]
    assert model.classifier.out_features == 10 and model(example).shape == (4, 10)


def test_prune_round_to_keeps_multiples(example):
    model = models.SmallCNN(1, 10, width=16)
    pruning.prune(model, torch.randn(4, 1, 8, 8), 0.3, arch="cnn", round_to=4)
    # 16·0.7 = 11.2 → 11 → rounded down to 8; 32·0.7 = 22.4 → 22 → 20
    assert conv_out_channels(model) == [8, 8, 20, 20]


def test_prune_resnet20_handles_residual_coupling():
    torch.manual_seed(0)
    model = models.build("resnet20", in_channels=3, num_classes=10)
    before = models.count_params(model)
    x = torch.randn(2, 3, 32, 32)
    report = pruning.prune(model, x, 0.5, arch="resnet20")
    assert report.params_before == before
    assert models.count_params(model) == report.params_after < before
    assert report.macs_after < report.macs_before
    assert model(x).shape == (2, 10)
    assert model.fc.out_features == 10
    # channels that a residual addition couples were pruned together
    assert model.conv1.out_channels == 8
    for block in model.layer1:  # identity shortcuts: every block's output has the stem's channels
        assert block.conv2.out_channels == model.conv1.out_channels
    for stage in (model.layer2, model.layer3):
        first = stage[0]
        assert first.shortcut[0].out_channels == first.conv2.out_channels
        for block in stage:
            assert block.conv2.out_channels == first.conv2.out_channels
            assert block.bn1.num_features == block.conv1.out_channels == block.conv2.in_channels
            assert block.bn2.num_features == block.conv2.out_channels
    assert model.fc.in_features == model.layer3[-1].conv2.out_channels


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_prune_ratio_out_of_range(ratio, example):
    model = make_cnn()
    with pytest.raises(ValueError, match="ratio"):
        pruning.prune(model, example, ratio, arch="cnn")
    assert models.count_params(model) == 4370


def test_prune_unknown_importance(example):
    with pytest.raises(ValueError, match="fisher"):
        pruning.prune(make_cnn(), example, 0.5, arch="cnn", importance="fisher")


def test_prune_taylor_without_calibration(example):
    model = make_cnn()
    with pytest.raises(ValueError, match="calibration"):
        pruning.prune(model, example, 0.5, arch="cnn", importance="taylor")
    assert models.count_params(model) == 4370


def test_prune_round_to_that_removes_nothing(example):
    model = make_cnn()
    # round_to=16: 8·0.5 = 4 and 16·0.5 = 8 both round down to 0 kept channels, so no layer can be pruned
    with pytest.raises(ValueError, match="removed nothing"):
        pruning.prune(model, example, 0.5, arch="cnn", round_to=16)


# ------------------------------------------------------------------------------------------- checkpoint


def test_checkpoint_round_trip_of_pruned_cnn(tmp_path, example, calibration):
    model = make_cnn()
    randomize_bn(model)
    pruning.prune(model, example, 0.5, arch="cnn", importance="taylor", calibration=calibration)
    model.eval()
    spec = checkpoint.make_spec("cnn", 1, 10, {"width": 8})
    out = checkpoint.save(model, spec, tmp_path / "ckpt")
    assert out == tmp_path / "ckpt"

    loaded, loaded_spec = checkpoint.load(out)
    assert not loaded.training
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert models.count_params(loaded) == models.count_params(model) == 1182
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)

    # the weights file is a plain state dict: loadable weights-only, tensors only
    state = torch.load(out / checkpoint.WEIGHTS_FILE, weights_only=True)
    assert isinstance(state, dict)
    assert all(isinstance(k, str) and type(v) is torch.Tensor for k, v in state.items())
    assert set(state) == set(model.state_dict())
    assert checkpoint.file_size(out) == (out / "model.pt").stat().st_size > 0

    # spec.json records the pruned layer shapes
    spec_json = json.loads((out / checkpoint.SPEC_FILE).read_text())
    assert spec_json == loaded_spec
    assert spec_json["arch"] == "cnn" and spec_json["kwargs"] == {"width": 8}
    assert spec_json["in_channels"] == 1 and spec_json["num_classes"] == 10
    layers = spec_json["layers"]
    assert layers["features.0.0"] == {"in_channels": 1, "out_channels": 4, "groups": 1}
    assert layers["features.1.0"] == {"in_channels": 4, "out_channels": 4, "groups": 1}
    assert layers["features.3.0"] == {"in_channels": 4, "out_channels": 8, "groups": 1}
    assert layers["features.4.0"] == {"in_channels": 8, "out_channels": 8, "groups": 1}
    assert [layers[f"features.{i}.1"]["num_features"] for i in (0, 1, 3, 4)] == [4, 4, 8, 8]
    assert layers["classifier"] == {"in_features": 8, "out_features": 10}
    # the spec passed in is not mutated
    assert "layers" not in spec


def test_checkpoint_round_trip_of_pruned_resnet(tmp_path):
    torch.manual_seed(0)
    model = models.build("resnet20", in_channels=3, num_classes=10)
    randomize_bn(model, seed=3)
    x = torch.randn(2, 3, 16, 16)
    pruning.prune(model, x, 0.5, arch="resnet20", importance="l1")
    model.eval()
    out = checkpoint.save(model, checkpoint.make_spec("resnet20", 3, 10), tmp_path)
    loaded, spec = checkpoint.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert spec["layers"]["layer2.0.shortcut.0"]["out_channels"] == model.layer2[0].shortcut[0].out_channels
    assert models.count_params(loaded) == models.count_params(model)
    assert out == tmp_path


def test_checkpoint_round_trip_unpruned(tmp_path):
    model = make_cnn(seed=5)
    randomize_bn(model, seed=5)
    model.eval()
    checkpoint.save(model, checkpoint.make_spec("cnn", 1, 10, {"width": 8}), tmp_path)
    loaded, spec = checkpoint.load(tmp_path)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert spec["layers"]["features.0.0"]["out_channels"] == 8


def test_pruned_mobilenet_round_trip_keeps_depthwise_groups(tmp_path):
    """Depthwise convs (groups = channels) and squeeze-excitation blocks prune and rebuild from the spec."""
    torch.manual_seed(0)
    model = models.build("mobilenet_v3_small", in_channels=1, num_classes=10).eval()
    x = torch.randn(2, 1, 32, 32)
    rep = pruning.prune(model, x, 0.5, "mobilenet_v3_small")
    assert rep.params_after < rep.params_before / 3
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    checkpoint.save(model, checkpoint.make_spec("mobilenet_v3_small", 1, 10), tmp_path)
    loaded, _ = checkpoint.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_save_leaves_whole_files_or_none(tmp_path, monkeypatch):
    model = make_cnn()
    spec = checkpoint.make_spec("cnn", 1, 10, {"width": WIDTH})
    checkpoint.save(model, spec, tmp_path / "ok")
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == [checkpoint.WEIGHTS_FILE, checkpoint.SPEC_FILE]

    def disk_full(obj, f, *args, **kwargs):  # half the file written, then the disk is full
        Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(model, spec, tmp_path / "full")
    assert list((tmp_path / "full").iterdir()) == []  # no truncated model.pt, no leftovers
