"""Several students over one data stream (`fit_many`) and the teacher's outputs computed once: the results must
be exactly those of training each student alone, and the teacher must not run per batch when it need not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdflow.config import LossConfig
from kdflow.data.augment import augment_variant, augment_with_variant
from kdflow.engine.loop import Student, fit, fit_many
from kdflow.engine.stream import batch_bounds
from kdflow.engine.teacher_outputs import TeacherOutputs, compute_teacher_outputs, teacher_outputs_key
from kdflow.steps import teacher as teacher_step
from tests.helpers.config import tiny_overrides
from tests.helpers.quadrants import CPU, NORM, SOURCE, TRAIN, VAL, cfg, cnn, state, train_quadrants

pytestmark = pytest.mark.usefixtures("one_thread")

KD = LossConfig(name="kd", kind="kd", temperature=4.0, alpha=0.9)
MSE = LossConfig(name="mse", kind="logit_mse", lam=0.1)
CE = LossConfig(name="ce", kind="ce")
HINT = LossConfig(name="hint", kind="hint", beta=1.0)


class Dropped(nn.Module):
    """A student whose training draws from the global RNG (dropout), to prove each keeps its own stream."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.body = cnn(4, seed=3)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(self.body(x))


def _grid(teacher, losses, augment="none"):
    """Each loss's student trained alone, then all together: (alone results, together results, models)."""
    config = cfg(3, augment=augment)
    alone, alone_models = [], []
    for loss in losses:
        m = Dropped() if loss is CE else cnn(4, seed=1)
        hint = ("features", "features") if loss.kind == "hint" else None
        alone.append(train_quadrants(m, config, loss=loss, teacher=teacher, source=SOURCE, hint_layers=hint))
        alone_models.append(m)
    together_models = [Dropped() if loss is CE else cnn(4, seed=1) for loss in losses]
    students = [
        Student(m, loss, ("features", "features") if loss.kind == "hint" else None)
        for m, loss in zip(together_models, losses)
    ]
    together = fit_many(students, TRAIN, VAL, config, NORM, seed=0, device=CPU, teacher=teacher, source=SOURCE)
    return alone, together, alone_models, together_models


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_students_together_equal_students_alone(teacher, augment):
    alone, together, a_models, t_models = _grid(teacher, [KD, MSE, CE, HINT], augment)
    for loss, a, t, am, tm in zip([KD, MSE, CE, HINT], alone, together, a_models, t_models):
        assert t.history == a.history, loss.name
        assert t.best_epoch == a.best_epoch, loss.name
        for k, v in state(am).items():
            assert torch.equal(v, tm.state_dict()[k]), (loss.name, k)


def test_source_transfer_students_together_equal_alone(teacher):
    both = LossConfig(name="both", kind="kd", transfer="both")
    src = LossConfig(name="src", kind="logit_mse", transfer="source")
    alone, together, a_models, t_models = _grid(teacher, [both, src])
    assert [r.history for r in together] == [r.history for r in alone]
    for am, tm in zip(a_models, t_models):
        assert all(torch.equal(v, tm.state_dict()[k]) for k, v in am.state_dict().items())


def test_one_stream_per_call(teacher):
    both = LossConfig(name="both", kind="kd", transfer="both")
    students = [Student(cnn(4), KD), Student(cnn(4), both)]
    with pytest.raises(ValueError, match="must agree on using source data"):
        fit_many(students, TRAIN, VAL, cfg(1), NORM, seed=0, device=CPU, teacher=teacher, source=SOURCE)


class Counting(nn.Module):
    """Wraps the teacher and counts the images it is run on."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.images = net, 0

    def forward(self, x):
        self.images += len(x)
        return self.net(x)


def drawn_pairs(epochs: int, augment: str, batch_size: int = 32, seed: int = 0) -> int:
    """How many distinct (image, crop variant) pairs of TRAIN `fit_many`'s epochs draw, by replaying its data
    generator: a permutation per epoch, then each batch's augmentation."""
    gen = torch.Generator().manual_seed(seed)
    seen = set()
    for _ in range(epochs):
        order = torch.randperm(len(TRAIN), generator=gen)
        for lo, hi in batch_bounds(len(TRAIN), batch_size):
            idx = order[lo:hi]
            _, variant = augment_with_variant(TRAIN.x[idx], augment, gen)
            seen.update(zip(idx.tolist(), variant.tolist()))
    return len(seen)


@pytest.mark.parametrize("augment", ["none", "crop"])
def test_teacher_runs_once_per_image_or_crop(teacher, augment):
    """No augmentation: one pass over the train split for 3 epochs and 3 students. With random crops: once per
    (image, crop) the epochs draw, shared by the students; a crop drawn again is looked up (plus one image that
    tells the table its class count)."""
    counting = Counting(teacher)
    students = [Student(cnn(4), KD), Student(cnn(4), MSE), Student(cnn(4), CE)]
    fit_many(students, TRAIN, VAL, cfg(3, augment=augment), NORM, seed=0, device=CPU, teacher=counting)
    expected = len(TRAIN) if augment == "none" else drawn_pairs(3, "crop") + 1
    assert counting.images == expected
    if augment == "crop":
        assert 2 * len(TRAIN) < expected - 1 < 3 * len(TRAIN)  # repeats were drawn and not recomputed


def test_precomputed_teacher_outputs_are_used_and_equal_on_the_fly(teacher):
    outputs = compute_teacher_outputs(teacher, NORM, "k", TRAIN.x)
    with torch.no_grad():
        direct = teacher.eval()(NORM(TRAIN.x))
    assert outputs.target.shape == (len(TRAIN), 4)
    torch.testing.assert_close(outputs.target, direct, rtol=1e-5, atol=1e-5)
    counting = Counting(teacher)
    a, b = cnn(4, seed=1), cnn(4, seed=1)
    fit(a, TRAIN, VAL, cfg(2), NORM, seed=0, device=CPU, loss=KD, teacher=counting, teacher_outputs=outputs)
    assert counting.images == 0  # every lookup served from the precomputed outputs
    fit(b, TRAIN, VAL, cfg(2), NORM, seed=0, device=CPU, loss=KD, teacher=teacher)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-4, atol=1e-5)


def test_crop_table_holds_the_teacher_on_every_crop(teacher):
    """Row i, column v of the table is the teacher's output on image i under augmentation variant v."""
    outputs = compute_teacher_outputs(teacher, NORM, "k", TRAIN.x, augment="crop_flip")
    assert outputs.augment == "crop_flip"
    assert outputs.target.shape == (len(TRAIN), 18, 4)  # 8-px images: pad 1, 3×3 offsets, ×2 flips
    with torch.no_grad():
        for v in range(18):
            direct = teacher.eval()(NORM(augment_variant(TRAIN.x, "crop_flip", v)))
            torch.testing.assert_close(outputs.target[:, v], direct, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="only the target split"):
        compute_teacher_outputs(teacher, NORM, "k", TRAIN.x, SOURCE.x, augment="crop")


@pytest.mark.parametrize("loss", [KD, LossConfig(name="both", kind="kd", transfer="both")])
def test_crop_table_serves_the_random_crops_exactly(teacher, loss):
    """Training on random crops with the table equals running the teacher on every batch, and the teacher then
    only sees source images (not tabulated), one per target image per epoch."""
    table = compute_teacher_outputs(teacher, NORM, "k", TRAIN.x, augment="crop")
    counting = Counting(teacher)
    a, b = cnn(4, seed=1), cnn(4, seed=1)
    config = cfg(2, augment="crop")  # without a given table, fit fills one as the crops are drawn
    ra = fit(
        a,
        TRAIN,
        VAL,
        config,
        NORM,
        seed=0,
        device=CPU,
        loss=loss,
        teacher=counting,
        source=SOURCE,
        teacher_outputs=table,
    )
    assert counting.images == (2 * len(TRAIN) if loss.transfer == "both" else 0)
    rb = fit(b, TRAIN, VAL, config, NORM, seed=0, device=CPU, loss=loss, teacher=teacher, source=SOURCE)
    assert ra.best_epoch == rb.best_epoch
    for ha, hb in zip(ra.history, rb.history):
        assert ha.keys() == hb.keys()
        for k in ha:
            assert ha[k] == pytest.approx(hb[k], rel=1e-4, abs=1e-6), k
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("epochs", [1, 9, 20])
def test_crop_table_fills_as_crops_are_drawn(teacher, epochs):
    """8-px crops have 9 variants. Without a given table the teacher runs once per distinct (image, crop) drawn:
    N in one epoch, fewer than epochs·N later, never more than the full table's 9·N."""
    counting = Counting(teacher)
    students = [Student(cnn(4), KD), Student(cnn(4), MSE)]
    fit_many(students, TRAIN, VAL, cfg(epochs, augment="crop"), NORM, seed=0, device=CPU, teacher=counting)
    pairs = drawn_pairs(epochs, "crop")
    assert counting.images == pairs + 1
    assert pairs == len(TRAIN) if epochs == 1 else pairs < min(epochs, 9) * len(TRAIN)


def test_a_table_for_other_augmentation_is_not_used(teacher):
    """A table for crop_flip cannot serve crop (or none): the teacher runs instead; without one it is an error."""
    table = compute_teacher_outputs(teacher, NORM, "k", TRAIN.x, augment="crop_flip")
    counting = Counting(teacher)
    fit(
        cnn(4),
        TRAIN,
        VAL,
        cfg(1, augment="crop"),
        NORM,
        seed=0,
        device=CPU,
        loss=KD,
        teacher=counting,
        teacher_outputs=table,
    )
    assert counting.images == len(TRAIN) + 1  # one epoch: each image's crop once, plus the class-count probe
    with pytest.raises(ValueError, match="augment='crop': the teacher's outputs are not all in teacher_outputs"):
        fit(cnn(4), TRAIN, VAL, cfg(1, augment="crop"), NORM, seed=0, device=CPU, loss=KD, teacher_outputs=table)


@pytest.mark.parametrize(
    ("train", "losses", "shape"),
    [
        ({"epochs": 2}, None, (None, 10)),  # no augmentation: logits once
        ({"epochs": 9, "augment": "crop"}, None, (None, 9, 10)),  # 9 epochs see the 9 crops of 8-px digits
        ({"epochs": 8, "augment": "crop", "epoch_over": "target"}, None, None),  # fewer epochs than crops
        ({"epochs": 9, "augment": "crop"}, [{"name": "h", "kind": "hint"}, {"name": "ce", "kind": "ce"}], None),
    ],
)
def test_teacher_step_writes_the_outputs_distill_steps_can_use(tmp_path, train, losses, shape):
    """The teacher step's `teacher_outputs.pt`: logits without augmentation, a crop table when the distill
    epochs would run the teacher on at least as many crops, nothing when hints need the features per batch."""
    from kdflow import data, models
    from kdflow.config import load_config
    from kdflow.data import Normalizer

    extra = {"distill.train": train, **({"distill.losses": losses} if losses else {})}
    config = load_config(None, tiny_overrides(**extra))
    data_dir = str(tmp_path / "data")
    data.prepare(config.data, config.seed, data_dir)
    manifest = data.read_manifest(data_dir)
    norm = Normalizer.from_manifest(manifest)
    assert manifest["tasks"]["target"]["num_classes"] == 10
    torch.manual_seed(2)
    net = models.build("cnn", in_channels=1, num_classes=10, width=8)
    teacher_step.save_teacher_outputs(config, net, norm, data_dir, manifest, str(tmp_path))
    loaded = teacher_step.load_teacher_outputs(net, manifest, str(tmp_path))
    if shape is None:
        assert loaded is None and not (tmp_path / teacher_step.TEACHER_OUTPUTS_FILE).exists()
        return
    x_train, _ = data.load_split(data_dir, "target", "train")
    assert loaded.augment == train.get("augment", "none")
    assert loaded.target.shape == (len(x_train), *shape[1:])
    expected = compute_teacher_outputs(net, norm, "", x_train, augment=loaded.augment).target
    torch.testing.assert_close(loaded.target, expected)


def _teacher_outputs_of(tmp_path, overrides: dict):
    from kdflow import data, models
    from kdflow.config import load_config
    from kdflow.data import Normalizer

    config = load_config(None, tiny_overrides(**overrides))
    data_dir = str(tmp_path / "data")
    data.prepare(config.data, config.seed, data_dir)
    manifest = data.read_manifest(data_dir)
    torch.manual_seed(2)
    net = models.build("cnn", in_channels=1, num_classes=10, width=8)
    teacher_step.save_teacher_outputs(
        config, net, Normalizer.from_manifest(manifest), data_dir, manifest, str(tmp_path)
    )
    return manifest, teacher_step.load_teacher_outputs(net, manifest, str(tmp_path))


def test_a_search_alone_gets_the_teacher_outputs_on_its_transfer_sets(tmp_path):
    """A grid of plain CE plus a search whose space includes `transfer: both`: the teacher's logits on the target
    and the source training images are computed for it."""
    manifest, out = _teacher_outputs_of(
        tmp_path, {"distill.losses": [{"name": "ce", "kind": "ce"}], "distill.search": {"variants": 3}}
    )
    counts = manifest["tasks"]
    assert out.target.shape == (counts["target"]["counts"]["train"], 10)
    assert out.source.shape == (counts["source"]["counts"]["train"], 10)


def test_epochs_over_the_source_split_count_their_passes_when_a_crop_table_pays(tmp_path):
    """10 target images per class and a source split over 5 times larger: with `epoch_over: source`, 2 epochs
    visit every target image 6 times each, 12 passes ≥ the 9 crops, so a table is built; over the target split
    they would be 2 passes and the teacher runs per batch."""
    few = {"data.target_samples_per_class": 10, "data.source_fraction": 0.6}
    manifest, out = _teacher_outputs_of(tmp_path / "source", {**few, "distill.train": {"epochs": 2, "augment": "crop"}})
    n, n_src = (manifest["tasks"][t]["counts"]["train"] for t in ("target", "source"))
    assert n == 100 and 5 * n < n_src <= 6 * n
    assert out.target.shape == (100, 9, 10)
    train = {"epochs": 2, "augment": "crop", "epoch_over": "target"}
    assert _teacher_outputs_of(tmp_path / "target", {**few, "distill.train": train})[1] is None


def test_teacher_outputs_key_follows_weights_and_data(teacher, tmp_path):
    key = teacher_outputs_key(teacher, "data-1")
    assert key == teacher_outputs_key(teacher, "data-1")
    assert key != teacher_outputs_key(teacher, "data-2")
    other = cnn(8, seed=5)
    assert key != teacher_outputs_key(other, "data-1")
    torch.save({"key": key, "target": torch.zeros(len(TRAIN), 4)}, tmp_path / teacher_step.TEACHER_OUTPUTS_FILE)
    manifest = {"content_hash": "data-1"}
    loaded = teacher_step.load_teacher_outputs(teacher, manifest, str(tmp_path))
    assert isinstance(loaded, TeacherOutputs) and loaded.key == key
    assert teacher_step.load_teacher_outputs(other, manifest, str(tmp_path)) is None  # stale: another teacher
    assert teacher_step.load_teacher_outputs(teacher, {"content_hash": "data-2"}, str(tmp_path)) is None


def test_one_teacher_pass_gives_logits_and_hint_features(teacher):
    """Without augmentation a hint student's teacher features come from the same single pass as the logits:
    the train split once, plus one image to size the feature cache and two to size the hint adapter."""
    counting = Counting(teacher)
    students = [Student(cnn(4), KD), Student(cnn(4), HINT, ("features", "net.features"))]
    fit_many(students, TRAIN, VAL, cfg(2), NORM, seed=0, device=CPU, teacher=counting)
    assert counting.images == len(TRAIN) + 1 + 2
