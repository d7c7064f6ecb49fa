"""Multi-process teacher training on the CPU: DDP inside `fit` (gloo, 2 spawned processes) and the teacher step
launching 2 torchrun workers.

Sockets stay on loopback: the spawned group meets through a file (no store server) and gloo binds to `lo`.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kdflow import models
from kdflow.config import LossConfig, TrainConfig, load_config
from kdflow.data import ImageSet, Normalizer
from kdflow.engine import ddp
from kdflow.engine.loop import fit
from kdflow.evaluate import accuracy, predict
from kdflow.steps import teacher_ddp
from tests.helpers.config import tiny_overrides
from tests.helpers.quadrants import CPU, NORM, quadrants, state

WORLD = 2
HINT = LossConfig(name="hint", kind="hint", transfer="both")
# batches of 32 from 99 samples end with 3 (2 on rank 0, 1 on rank 1: unequal shares weigh differently),
# from 65 samples with 1 (rank 1 gets none and must still take part)
CE_CFG = TrainConfig(epochs=4, batch_size=32, lr=0.5, augment="crop")
KD_CFG = TrainConfig(epochs=3, batch_size=32, lr=0.5)  # SGD: AdamW would amplify float rounding differences


TRAIN, KD_TRAIN, VAL, SOURCE = quadrants(99, 1), quadrants(65, 4), quadrants(40, 2), quadrants(50, 3)


def plain(width: int, seed: int) -> nn.Module:
    """A network without BatchNorm, so DDP over 2 shards must match one process on the whole batch."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),  # one cell per quadrant
        nn.Flatten(),
        nn.Linear(4 * width, 4),
    )


def ce_run(sizes: list[int] | None = None, **kw):
    """`sizes` collects the batch size of every training forward pass."""
    model = plain(6, seed=0)
    if sizes is not None:
        model.register_forward_pre_hook(lambda m, inputs: sizes.append(len(inputs[0])) if m.training else None)
    return model, fit(model, TRAIN, VAL, CE_CFG, NORM, seed=0, device=CPU, **kw)


def hint_run(teacher: nn.Module, **kw):
    student = plain(4, seed=1)
    result = fit(
        student,
        KD_TRAIN,
        VAL,
        KD_CFG,
        NORM,
        seed=2,
        device=CPU,
        loss=HINT,
        teacher=teacher,
        source=SOURCE,
        hint_layers=("2", "2"),
        **kw,
    )
    return student, result


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    """One spawned rank: a plain fit, a hint distillation and a BatchNorm fit, each under 2-process DDP;
    results to a file."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        wrapped: list[nn.Module] = []

        class Recording(ddp.DistributedDataParallel):
            def __init__(self, module, *args, **kwargs):
                wrapped.append(module)
                super().__init__(module, *args, **kwargs)

        ddp.DistributedDataParallel = Recording  # this process only: see what fit wraps
        epochs: list[int] = []
        sizes: list[int] = []
        model, ce = ce_run(sizes, on_epoch=lambda e, m: epochs.append(e))
        ce_wrapped = [type(m).__name__ for m in wrapped]

        wrapped.clear()
        teacher = plain(8, seed=5)
        teacher_before = state(teacher)
        student, kd = hint_run(teacher)
        kd_wrapped = ["student" if m is student else "teacher" if m is teacher else type(m).__name__ for m in wrapped]
        try:
            fit(plain(4, 1), TRAIN, VAL, KD_CFG, NORM, seed=2, device=CPU, loss=HINT, teacher=Recording(plain(8, 5)))
            ddp_teacher_error = ""
        except ValueError as err:
            ddp_teacher_error = str(err)
        bn_model = models.build("cnn", in_channels=1, num_classes=4, width=4)  # BatchNorm: per-rank batch stats
        bn = fit(bn_model, TRAIN, VAL, CE_CFG, NORM, seed=0, device=CPU)
        out = {
            "ce": (state(model), ce.history, ce.best_epoch, epochs, ce_wrapped),
            "sizes": sizes,
            "bn": (state(bn_model), bn.history, bn.best_epoch),
            "kd": (state(student), kd.history, kd.best_epoch),
            "kd_wrapped": kd_wrapped,
            "teacher_unchanged": all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items()),
            "teacher_frozen": not any(p.requires_grad for p in teacher.parameters()) and teacher.training is False,
            "ddp_teacher_error": ddp_teacher_error,
        }
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results from one 2-process gloo group."""
    tmp = tmp_path_factory.mktemp("ddp")
    with pytest.MonkeyPatch.context() as mp_env:
        mp_env.setenv("GLOO_SOCKET_IFNAME", "lo")  # inherited by the spawned ranks
        mp.start_processes(_rank_main, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    """The same trainings in this one process, no process group."""
    torch.set_num_threads(1)
    ce_model, ce = ce_run()
    kd_model, kd = hint_run(plain(8, seed=5))
    return {"ce": (state(ce_model), ce), "kd": (state(kd_model), kd)}


def assert_close_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def assert_close_history(ddp: list[dict], one: list[dict]) -> None:
    assert len(ddp) == len(one)
    for d, o in zip(ddp, one):
        assert d.keys() == o.keys()
        assert d["val_acc"] == o["val_acc"] and d["lr"] == o["lr"]
        for k in d:
            assert d[k] == pytest.approx(o[k], rel=1e-5, abs=1e-6), k


@pytest.mark.slow  # 2 spawned ranks
def test_ddp_fit_equals_one_process_on_the_global_batch(ranks, single):
    """Sharding + gradient averaging + loss weighting: 2 ranks on halves of each global batch (random crops, a
    1-sample last batch) train the same weights and log the same train/val numbers as one process."""
    weights, history, best_epoch, _, wrapped = ranks[0]["ce"]
    one_weights, one = single["ce"]
    assert wrapped == ["Sequential"]
    assert one.best_val_acc == 1.0 and best_epoch == one.best_epoch
    assert_close_history(history, one.history)
    assert_close_states(weights, one_weights)
    # each rank ran its share of every global batch of 32, 32, 32, 3: 16 + 16, ..., then 2 + 1
    assert ranks[0]["sizes"] == [16, 16, 16, 2] * CE_CFG.epochs
    assert ranks[1]["sizes"] == [16, 16, 16, 1] * CE_CFG.epochs


@pytest.mark.slow  # 2 spawned ranks
def test_ddp_ranks_end_identical_and_only_rank_0_reports(ranks):
    for key in ("ce", "kd", "bn"):  # bn: running statistics too, though each rank normalised its own share
        a, b = ranks[0][key][0], ranks[1][key][0]
        assert all(torch.equal(a[k], b[k]) for k in a), key
        assert ranks[0][key][1] == ranks[1][key][1] and ranks[0][key][2] == ranks[1][key][2]
    assert ranks[0]["ce"][3] == list(range(1, CE_CFG.epochs + 1))  # on_epoch: rank 0 only
    assert ranks[1]["ce"][3] == []


@pytest.mark.slow  # 2 spawned ranks
def test_ddp_distillation_never_wraps_the_teacher(ranks, single):
    for r in ranks:
        assert r["kd_wrapped"] == ["student", "HintAdapter"]  # the teacher is not among what DDP wrapped
        assert r["teacher_unchanged"] and r["teacher_frozen"]
        assert "not a DDP wrapper" in r["ddp_teacher_error"]
    weights, history, best_epoch = ranks[0]["kd"]
    one_weights, one = single["kd"]
    assert one.best_epoch > 0 and best_epoch == one.best_epoch  # trained weights kept, not the initial ones
    assert_close_history(history, one.history)
    assert_close_states(weights, one_weights)


class Killed(RuntimeError):
    """Stands for a kill after an epoch: raised on every rank by the fit's `halt` callback."""


def dropped(seed: int) -> nn.Module:
    """`plain` with dropout before its head: each rank draws masks for its own share of a batch (1 or 2 images
    in the last), so the ranks' RNG streams part ways and a resume must give each rank its own."""
    net = plain(6, seed)
    return nn.Sequential(*net[:-1], nn.Dropout(0.3), net[-1])


def _resume_rank_main(rank: int, init_file: str, out_dir: str, kill_at: int) -> None:
    """One spawned rank: a fit left alone, then the same fit killed after epoch `kill_at` (checkpoints after
    every epoch, into one folder) and run again from its checkpoint; both results to a file."""
    from kdflow.engine.loop import Student, fit_many
    from kdflow.engine.resume import Checkpoints, DirStore

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:

        def run(checkpoints=None, halt=None):
            model = dropped(seed=0)
            kw = dict(seed=0, device=CPU, checkpoints=checkpoints, halt=halt)
            (result,) = fit_many([Student(model, LossConfig(name="ce", kind="ce"))], TRAIN, VAL, CE_CFG, NORM, **kw)
            return state(model), result.history

        def kill(epoch, _standing):
            if epoch == kill_at:
                raise Killed(epoch)
            return set()

        whole = run()
        store = DirStore(Path(out_dir) / "ckpt")
        try:
            run(Checkpoints(store, "fit", every_s=0, max_share=float("inf")), kill)
        except Killed:
            pass
        resumed = Checkpoints(store, "fit", every_s=0, max_share=float("inf"))
        again = run(resumed)
        files = sorted(p.name for p in (Path(out_dir) / "ckpt" / "fit").iterdir())
        out = {"whole": whole, "again": again, "resumed_from": resumed.resumed_from, "files": files}
        torch.save(out, Path(out_dir) / f"resume-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # 2 spawned ranks
def test_a_ddp_fit_killed_mid_training_resumes_to_identical_weights(tmp_path, monkeypatch):
    """Under 2-process DDP, rank 0 writes each checkpoint with every rank's RNG states and sends it to every
    rank on resume: each rank continues its own random draws, and the result is bit-identical."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    args = (str(tmp_path / "init"), str(tmp_path), 2)
    mp.start_processes(_resume_rank_main, args=args, nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"resume-rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in ranks:
        assert r["resumed_from"] == 1  # killed in epoch 2, before its checkpoint
        assert r["files"] == ["latest.json", "slot-0.pt", "slot-1.pt"]  # rank 0 alone writes; no stray slot
        assert r["again"][1] == r["whole"][1]
        assert r["again"][0].keys() == r["whole"][0].keys()
        assert all(torch.equal(r["again"][0][k], v) for k, v in r["whole"][0].items())
    assert all(torch.equal(ranks[0]["again"][0][k], v) for k, v in ranks[1]["again"][0].items())


def test_sync_batchnorm_swap_is_undone_with_the_trained_values():
    model = models.build("cnn", in_channels=1, num_classes=4, width=4)
    before = {name: type(m) for name, m in model.named_modules()}
    swaps = ddp.use_sync_batchnorm(model)
    assert len(swaps) == 4 and sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == 4
    with torch.no_grad():
        for _, _, _, sync in swaps:
            sync.running_mean.add_(1.0)
            sync.weight.mul_(2.0)
    trained = state(model)
    ddp.restore_batchnorm(swaps)
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())
    assert model.features[0][1].running_mean.eq(1.0).all()


# ------------------------------------------------------------------------------------- process count, launch


def test_teacher_processes_defaults_to_one_per_gpu(monkeypatch, tiny_config):
    assert teacher_ddp.teacher_processes(tiny_config) == 1  # CPU here
    cpu3 = tiny_config.model_copy(update={"cluster": tiny_config.cluster.model_copy(update={"teacher_processes": 3})})
    assert teacher_ddp.teacher_processes(cpu3) == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert teacher_ddp.teacher_processes(tiny_config) == 2
    with pytest.raises(ValueError, match=r"cluster.teacher_processes=3 but only 2 GPU"):
        teacher_ddp.teacher_processes(cpu3)
    on_cpu = tiny_config.model_copy(update={"device": "cpu"})
    assert teacher_ddp.teacher_processes(on_cpu) == 1  # device: cpu never fans out over the GPUs


@pytest.mark.slow  # torchrun workers
def test_launch_failure_names_rank_errors_and_exit_code(tmp_path):
    missing = str(tmp_path / "missing.json")
    args = ["teacher", "--context", missing, "--data-dir", "d", "--out-dir", "o", "--run-id", "r"]
    with pytest.raises(teacher_ddp.WorkerError) as err:
        teacher_ddp.launch(2, [*args, "--error-dir", str(tmp_path)], tmp_path)
    msg = str(err.value)
    assert "torchrun exit code 1" in msg
    assert f"FileNotFoundError: [Errno 2] No such file or directory: '{missing}'" in msg
    assert "rank 0:" in msg or "rank 1:" in msg


@pytest.mark.slow  # torchrun workers
def test_teacher_step_trains_in_two_torchrun_workers(tmp_path):
    """The real step with cluster.teacher_processes=2: one MLflow run logged by rank 0 only, one checkpoint
    whose weights are those the reported metrics were computed from."""
    import mlflow  # here, not at the top: the spawned ranks above import this module and need none of it

    from kdflow import data
    from kdflow.models import checkpoint
    from kdflow.steps import context
    from kdflow.steps import teacher as teacher_step

    cfg = load_config(
        None,
        tiny_overrides(
            **{
                "teacher.arch_kwargs": {"width": 8},
                "teacher.pretrain": {"epochs": 2},
                "teacher.finetune": {"epochs": 2},
                "cluster.teacher_processes": 2,
            }
        ),
    )
    data_dir, out_dir = str(tmp_path / "data"), tmp_path / "teacher"
    data.prepare(cfg.data, cfg.seed, data_dir)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = context.StepContext.open(
        config_json=cfg.to_json(),
        tracking_uri=uri,
        pipeline_run_id=f"ddp-{uuid.uuid4().hex[:8]}",
        pipeline_run_name="ddp-test",
    )

    metrics = teacher_step.train_teacher(ctx, data_dir, str(out_dir))

    info = context.read_info(out_dir)
    assert info["processes"] == 2 and info["metrics"] == metrics
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == ["info.json", "model.pt", "spec.json", teacher_step.TEACHER_OUTPUTS_FILE]
    net, _ = checkpoint.load(out_dir)
    norm = Normalizer.from_manifest(data.read_manifest(data_dir))
    # the logits every distill step reuses belong to exactly the saved teacher and data
    cached = teacher_step.load_teacher_outputs(net, data.read_manifest(data_dir), str(out_dir))
    x_train, _ = data.load_split(data_dir, "target", "train")
    torch.testing.assert_close(cached.target, predict(net, x_train, norm), rtol=1e-5, atol=1e-5)
    val = ImageSet(*data.load_split(data_dir, "target", "val"))
    assert accuracy(predict(net, val.x, norm), val.y) == metrics["val_top1"]

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([ctx.experiment_id], filter_string="tags.`kdflow.step` = 'teacher'")
    assert [r.info.run_id for r in runs] == [info["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["kdflow.teacher_processes"] == "2"
    assert run.data.params["arch"] == cfg.teacher.arch
    assert run.data.metrics["val_top1"] == pytest.approx(metrics["val_top1"])
    for name in ("pretrain/val_top1", "finetune/val_top1"):  # one point per epoch: rank 1 logged nothing
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2]
    logged = mlflow.search_logged_models(
        experiment_ids=[ctx.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list"
    )
    assert [m.model_uri for m in logged] == [info["model_uri"]]
