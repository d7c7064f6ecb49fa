"""The typed run configuration: defaults, error messages that name the key, YAML loading and overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kdflow.config import BUILTIN_RUN, Config, ConfigError, config_from_json, load_config, parse_config

DEFAULT_YAML = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
CIFAR_YAML = DEFAULT_YAML.with_name("cifar10_to_cifar100.yaml")


def error_of(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


# ----------------------------------------------------------------------------------------------- defaults


def test_schema_defaults_and_the_builtin_run():
    """`Config()` is the schema's defaults (what an empty file gives); the built-in run sets a few-shot target and
    two from-scratch students over them."""
    cfg = Config()
    assert cfg == parse_config({}) == parse_config(None)
    assert cfg.prune.ratios == [0.6, 0.75] and cfg.data.target_samples_per_class is None
    assert {s.from_pruned for s in cfg.distill.students} <= set(cfg.prune.ratios)
    run = load_config()
    assert run == parse_config(BUILTIN_RUN) != cfg
    assert (run.data.target_samples_per_class, run.data.source_fraction) == (10, 0.6)
    assert [c.name for c in run.candidates()] == [
        "cnn4-kd", "cnn4-logit_mse", "cnn4-ce", "cnn8-kd", "cnn8-logit_mse", "cnn8-ce",
    ]  # fmt: skip
    assert run.distill.train.epoch_over == "target" and run.distill.train.batch_size == 16
    assert run.teacher.pretrain == cfg.teacher.pretrain and run.registry == cfg.registry


def test_default_yaml_spells_out_the_builtin_default():
    assert load_config(DEFAULT_YAML) == load_config()


def test_config_names_exactly_the_architectures_models_builds():
    from kdflow import models
    from kdflow.config import ARCHITECTURES

    assert set(ARCHITECTURES) == set(models.MODELS)


# ------------------------------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize(
    "data, key",
    [
        ({"distill": {"train": {"epochz": 3}}}, "distill.train.epochz"),
        ({"experimnt": "x"}, "experimnt"),
        ({"registry": {"policy": {"max_param": 3}}}, "registry.policy.max_param"),
        ({"teacher": {"finetune": {"learning_rate": 0.1}}}, "teacher.finetune.learning_rate"),
        ({"distill": {"losses": [{"name": "kd", "kind": "kd", "temp": 2.0}]}}, "distill.losses[0].temp"),
    ],
)
def test_unknown_key_is_named(data, key):
    msg = error_of(data)
    assert f"{key}: unknown key" in msg


def test_every_bad_key_is_reported_at_once():
    msg = error_of({"seed": -1, "data": {"val_fraction": 0.7}, "prune": {"bogus": 1}})
    assert "seed" in msg and "data.val_fraction" in msg and "prune.bogus: unknown key" in msg


# -------------------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    "data, key, shown",
    [
        ({"prune": {"ratios": [1.5]}}, "prune.ratios", "1.5"),
        ({"prune": {"ratios": [0.0]}}, "prune.ratios", "0.0"),
        ({"prune": {"ratios": [0.5, 0.5]}}, "prune.ratios", "[0.5, 0.5]"),
        ({"distill": {"train": {"lr": -1}}}, "distill.train.lr", "got -1"),
        ({"data": {"val_fraction": 0.7}}, "data.val_fraction", "got 0.7"),
        ({"data": {"test_fraction": 0.0}}, "data.test_fraction", "got 0.0"),
        ({"teacher": {"pretrain": {"epochs": -3}}}, "teacher.pretrain.epochs", "got -3"),
        ({"registry": {"min_improvement": 2}}, "registry.min_improvement", "got 2"),
        ({"registry": {"alias": "1bad"}}, "registry.alias", "'1bad'"),
        ({"device": "tpu"}, "device", "'tpu'"),
        ({"distill": {"train": {"optimizer": "adam"}}}, "distill.train.optimizer", "'adam'"),
        ({"teacher": {"arch": "resnet19"}}, "teacher.arch", "'resnet19'"),
        ({"distill": {"students": [{"name": "s", "arch": "vgg"}]}}, "distill.students[0].arch", "'vgg'"),
        ({"evaluate": {"latency_batch_sizes": [64]}}, "evaluate.latency_batch_sizes", "must include 1"),
        ({"evaluate": {"latency_batch_sizes": [1, 0]}}, "evaluate.latency_batch_sizes", "[1, 0]"),
        ({"evaluate": {"latency_batch_sizes": [1, 1]}}, "evaluate.latency_batch_sizes", "must be distinct"),
        ({"data": {"target_classes": [3, 3, 4]}}, "data.target_classes", "must be distinct, got [3, 3, 4]"),
        ({"data": {"source_classes": [-1, 2]}}, "data.source_classes", "0 or more, got [-1, 2]"),
    ],
)
def test_out_of_range_value_names_key_and_value(data, key, shown):
    msg = error_of(data)
    assert key in msg
    assert shown in msg


def test_prune_ratio_message_is_readable():
    msg = error_of({"prune": {"ratios": [1.5]}})
    assert "each prune ratio must be in (0, 1), got 1.5" in msg


def test_from_pruned_must_be_a_prune_ratio():
    msg = error_of({"prune": {"ratios": [0.5, 0.75]}})  # default students use 0.6 and 0.75
    assert "distill.students[pruned60].from_pruned=0.6" in msg
    assert "prune.ratios=[0.5, 0.75]" in msg


def test_student_needs_exactly_one_origin():
    assert "exactly one of from_pruned or arch" in error_of(
        {"distill": {"students": [{"name": "s", "from_pruned": 0.6, "arch": "cnn"}]}}
    )
    assert "exactly one of from_pruned or arch" in error_of({"distill": {"students": [{"name": "s"}]}})


def test_duplicate_student_names_fail():
    msg = error_of({"distill": {"students": [{"name": "small", "arch": "cnn"}, {"name": "small", "arch": "resnet20"}]}})
    assert "distill.students names must be unique" in msg
    assert "'small'" in msg


def test_duplicate_loss_names_fail():
    msg = error_of({"distill": {"losses": [{"name": "x", "kind": "ce"}, {"name": "x", "kind": "kd"}]}})
    assert "distill.losses names must be unique" in msg


def test_empty_grid_fails():
    assert "at least one entry" in error_of({"distill": {"students": []}})


def _one_loss(**loss) -> dict:
    return {"distill": {"losses": [{"name": "l", **loss}]}}


@pytest.mark.parametrize("kind", ["ce", "logit_mse", "hint", "dist"])
def test_standardize_is_refused_outside_kd_and_dkd(kind):
    msg = error_of(_one_loss(kind=kind, standardize=True))
    assert "distill.losses[0]" in msg
    assert "standardize: true applies only to kinds kd, dkd" in msg
    assert f"loss 'l' has kind {kind!r}" in msg


@pytest.mark.parametrize("kind", ["kd", "dkd"])
def test_standardize_is_accepted_with_kd_and_dkd(kind):
    loss = parse_config(_one_loss(kind=kind, standardize=True)).distill.losses[0]
    assert loss.standardize is True
    assert parse_config(_one_loss(kind=kind)).distill.losses[0].standardize is False  # off by default


@pytest.mark.parametrize("transfer", ["source", "both"])
def test_dkd_needs_the_labelled_target_transfer_set(transfer):
    msg = error_of(_one_loss(kind="dkd", transfer=transfer))
    assert "distill.losses[0]" in msg
    assert "loss 'l' of kind 'dkd' needs the labels of its transfer images" in msg
    assert f"transfer must be 'target' (got transfer: {transfer!r})" in msg
    assert parse_config(_one_loss(kind="dkd", transfer="target")).distill.losses[0].transfer == "target"
    assert parse_config(_one_loss(kind="dist", transfer=transfer)).distill.losses[0].transfer == transfer


def test_gamma_is_checked_and_defaults_leave_other_kinds_alone():
    assert "distill.losses[0].gamma" in error_of(_one_loss(kind="dist", gamma=-1.0))
    loss = parse_config(_one_loss(kind="dkd")).distill.losses[0]
    # LossConfig's defaults are the other kinds' (a dkd config sets α and β itself)
    assert (loss.alpha, loss.beta, loss.gamma, loss.temperature) == (0.9, 1.0, 1.0, 4.0)


def test_cifar_config_carries_the_literature_losses():
    cfg = load_config(CIFAR_YAML)
    losses = {l.name: l for l in cfg.distill.losses}
    dkd, dist, kd_ls = losses["dkd"], losses["dist"], losses["kd_ls"]
    assert (dkd.kind, dkd.alpha, dkd.beta, dkd.temperature, dkd.transfer) == ("dkd", 1.0, 8.0, 4.0, "target")
    assert (dist.kind, dist.beta, dist.gamma, dist.temperature) == ("dist", 2.0, 2.0, 4.0)
    assert (kd_ls.kind, kd_ls.standardize, kd_ls.temperature) == ("kd", True, 2.0)
    assert not any(l.standardize for l in cfg.distill.losses if l.name != "kd_ls")


def test_data_setup_consistency():
    assert "data.target is required" in error_of({"data": {"setup": "cross_dataset"}})
    assert "data.target='usps'" in error_of({"data": {"target": "usps"}})  # domain_shift by default
    assert "overlap: [3]" in error_of(
        {"data": {"setup": "class_split", "source_classes": [1, 2, 3], "target_classes": [3, 4]}}
    )


def test_top_level_must_be_a_mapping():
    assert "top level must be a mapping" in error_of([1, 2])


# ------------------------------------------------------------------------------------------------ loading


def test_load_config_applies_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("experiment: mine\nseed: 7\ndistill:\n  train:\n    epochs: 30\n    lr: 0.01\n")
    cfg = load_config(path, overrides={"distill.train.epochs": 2, "registry.policy.max_params": 5000})
    assert cfg.distill.train.epochs == 2
    assert cfg.distill.train.lr == 0.01  # sibling keys from the file survive
    assert cfg.experiment == "mine" and cfg.seed == 7
    assert cfg.registry.policy.max_params == 5000  # a section the file did not mention is created


def test_load_config_without_file_uses_defaults_plus_overrides():
    cfg = load_config(None, overrides={"seed": 3, "teacher.arch": "resnet20"})
    assert cfg.seed == 3 and cfg.teacher.arch == "resnet20"
    assert cfg.distill == load_config().distill


def test_override_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"distill\.train\.epochz: unknown key"):
        load_config(None, overrides={"distill.train.epochz": 2})
    with pytest.raises(ConfigError, match=r"distill\.train\.epochs"):
        load_config(None, overrides={"distill.train.epochs": -2})
    path = tmp_path / "run.yaml"
    path.write_text("seed: 4\n")
    with pytest.raises(ConfigError, match="seed is not a section"):
        load_config(path, overrides={"seed.value": 1})


def test_error_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("prune:\n  ratios: [1.5]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "prune.ratios" in str(info.value)


def test_empty_file_is_the_default(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path)


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("distill: {train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_invalid_yaml_is_one_line_naming_the_file_and_the_place(tmp_path):
    path = tmp_path / "tabs.yaml"
    path.write_text("distill:\n\ttrain:\n\t\tepochs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"config file {path} is not valid YAML: found character '\\t' that cannot start any token at line 2, column 1"
    )


def test_one_bad_key_is_one_line_and_several_are_one_line_each():
    with pytest.raises(ConfigError) as one:
        load_config(None, {"distill.train.lr": 0})
    assert str(one.value) == (
        "invalid config (built-in default): distill.train.lr: Input should be greater than 0 (got 0)"
    )
    with pytest.raises(ConfigError) as two:
        load_config(None, {"distill.train.lr": 0, "seed": -1})
    assert str(two.value).splitlines() == [
        "invalid config (built-in default):",
        "  seed: Input should be greater than or equal to 0 (got -1)",
        "  distill.train.lr: Input should be greater than 0 (got 0)",
    ]


def test_non_mapping_yaml(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_non_mapping_yaml_with_overrides(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path, overrides={"seed": 1})  # today: TypeError (list indices must be integers)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path, overrides={"distill.train.epochs": 1})  # today: AttributeError (no setdefault)


# ------------------------------------------------------------------------------------- grid and round trip


def test_candidates_is_the_student_by_loss_grid():
    cfg = Config()
    grid = cfg.candidates()
    students = [s.name for s in cfg.distill.students]
    losses = [l.name for l in cfg.distill.losses]
    assert [c.name for c in grid] == [f"{s}-{l}" for s in students for l in losses]
    assert len(grid) == len(students) * len(losses) == 6
    first = grid[0]
    assert first.student.model_dump() == cfg.distill.students[0].model_dump()
    assert first.loss.model_dump() == cfg.distill.losses[0].model_dump()


def test_candidates_for_a_custom_grid():
    cfg = parse_config(
        {
            "distill": {
                "students": [{"name": "r8", "arch": "resnet8x4"}, {"name": "p", "from_pruned": 0.75}],
                "losses": [{"name": "hint", "kind": "hint", "beta": 2.0}],
            }
        }
    )
    grid = cfg.candidates()
    # no ce loss in the grid: each student also gets its plain-CE baseline (distill.ce_baseline)
    assert [c.name for c in grid] == ["r8-hint", "r8-ce", "p-hint", "p-ce"]
    assert grid[0].student.arch == "resnet8x4" and grid[2].student.from_pruned == 0.75
    assert grid[2].loss.beta == 2.0 and grid[3].loss.kind == "ce"


def test_json_round_trip():
    cfg = Config()
    assert config_from_json(cfg.to_json()) == cfg
    custom = load_config(
        None,
        overrides={
            "seed": 11,
            "prune.ratios": [0.3, 0.5],
            "prune.round_to": 8,
            "distill.students": [
                {"name": "p30", "from_pruned": 0.3},
                {"name": "c", "arch": "cnn", "arch_kwargs": {"width": 8}},
            ],
            "registry.policy.max_latency_ms": 1.5,
        },
    )
    assert config_from_json(custom.to_json()) == custom
    assert custom.to_json() == config_from_json(custom.to_json()).to_json()


def test_config_from_json_validates():
    with pytest.raises(ConfigError, match="pipeline parameter config_json"):
        config_from_json('{"distill": {"train": {"epochz": 1}}}')


def test_flat_gives_dotted_string_params():
    flat = Config().flat()
    assert flat["distill.train.epochs"] == "30"
    assert flat["prune.ratios"] == "[0.6, 0.75]"
    assert flat["registry.policy.max_params"] == "None"
    assert all(isinstance(v, str) for v in flat.values())


def test_candidate_looks_a_grid_cell_up_by_name():
    cfg = Config()
    grid = cfg.candidates()
    assert all(cfg.candidate(c.name) == c for c in grid)
    with pytest.raises(ConfigError, match="unknown candidate 'nope'") as err:
        cfg.candidate("nope")
    assert all(repr(c.name) in str(err.value) for c in grid)


def test_candidate_groups_keep_one_data_stream_per_step():
    from kdflow.objectives import candidate_groups

    cfg = load_config(
        None,
        {
            "prune.ratios": [0.6, 0.75],
            "distill.students": [{"name": "a", "from_pruned": 0.6}, {"name": "b", "from_pruned": 0.75}],
            "distill.losses": [
                {"name": "kd", "kind": "kd"},
                {"name": "src", "kind": "kd", "transfer": "source"},
                {"name": "ce", "kind": "ce"},
            ],
            "distill.candidates_per_step": 3,
        },
    )
    # four target-only candidates in groups of three, the two source-data ones apart
    assert candidate_groups(cfg) == ["a-kd,a-ce,b-kd", "b-ce", "a-src,b-src"]
    one = load_config(None, {"distill.candidates_per_step": 1})  # the built-in grid: ce on target images only
    assert candidate_groups(one) == ["cnn4-ce", "cnn8-ce", "cnn4-kd", "cnn4-logit_mse", "cnn8-kd", "cnn8-logit_mse"]


def test_candidate_groups_place_dkd_and_dist_by_their_data_stream():
    from kdflow.objectives import candidate_groups

    cfg = load_config(
        None,
        {
            "prune.ratios": [0.6, 0.75],
            "distill.students": [{"name": "a", "from_pruned": 0.6}],
            "distill.losses": [
                {"name": "dkd", "kind": "dkd", "alpha": 1.0, "beta": 8.0},
                {"name": "dist", "kind": "dist"},
                {"name": "dist_src", "kind": "dist", "transfer": "source"},
                {"name": "kd_ls", "kind": "kd", "standardize": True},
                {"name": "ce", "kind": "ce"},
            ],
            "distill.train": {"augment": "crop"},  # logits only: they share the crop-table step with kd
            "distill.candidates_per_step": 4,
        },
    )
    assert candidate_groups(cfg) == ["a-dkd,a-dist,a-kd_ls,a-ce", "a-dist_src"]


@pytest.mark.parametrize(
    ("augment", "groups"),
    [
        ("none", ["a-kd,a-hint,a-ce", "b-kd,b-hint,b-ce", "a-src,b-src"]),
        # random crops: the hint candidates (teacher features per batch) apart from the crop-table ones
        ("crop", ["a-kd,a-ce,b-kd", "b-ce", "a-hint,b-hint", "a-src,b-src"]),
    ],
)
def test_candidate_groups_put_hint_losses_apart_under_augmentation(augment, groups):
    from kdflow.objectives import candidate_groups

    cfg = load_config(
        None,
        {
            "prune.ratios": [0.6, 0.75],
            "distill.students": [{"name": "a", "from_pruned": 0.6}, {"name": "b", "from_pruned": 0.75}],
            "distill.losses": [
                {"name": "kd", "kind": "kd"},
                {"name": "hint", "kind": "hint"},
                {"name": "src", "kind": "kd", "transfer": "both"},
                {"name": "ce", "kind": "ce"},
            ],
            "distill.train": {"augment": augment},
        },
    )
    assert candidate_groups(cfg) == groups
    assert sorted(",".join(groups).split(",")) == sorted(c.name for c in cfg.candidates())


@pytest.mark.parametrize("path", sorted((DEFAULT_YAML.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.candidates()  # and every student trains with a ce baseline to compare against
    students = {c.student.name for c in cfg.candidates()}
    assert {c.student.name for c in cfg.candidates() if c.loss.kind == "ce"} == students


def test_the_few_shot_config_is_the_regime_where_the_teacher_matters():
    cfg = load_config(DEFAULT_YAML.with_name("mnist_to_usps_fewshot.yaml"))
    assert cfg.data.target_samples_per_class == 20 and cfg.data.target_val_samples_per_class == "train"
    assert [c.name for c in cfg.candidates()] == [
        "pruned60-kd",
        "pruned60-mse_src",
        "pruned60-ce",
        "cnn8-kd",
        "cnn8-mse_src",
        "cnn8-ce",
        "pruned60_scratch-ce",
        "pruned60-auto",
        "cnn8-auto",
    ]
    assert cfg.candidate("cnn8-mse_src").loss.transfer == "both" and cfg.registry.gate == "significance"
    assert cfg.distill.search.variants == 8 and cfg.distill.train.epoch_over == "source"


def test_the_few_shot_validation_cap_is_positive_train_or_null():
    assert load_config(None, {}).data.target_val_samples_per_class == "train"
    assert load_config(None, {"data.target_val_samples_per_class": None}).data.target_val_samples_per_class is None
    with pytest.raises(ConfigError, match=r"data.target_val_samples_per_class: .*must be 1 or more.*got 0"):
        load_config(None, {"data.target_val_samples_per_class": 0})


# -------------------------------------------------------------------------------------- registry names


BAD_REGISTRY = [
    ({"registry.alias": "latest"}, "registry.alias: Value error, MLflow reserves the alias 'latest'"),
    ({"registry.alias": "Latest"}, "registry.alias: Value error, MLflow reserves the alias 'Latest'"),
    ({"registry.alias": "v3"}, "registry.alias: Value error, MLflow reserves the alias 'v3'"),
    ({"registry.alias": "a" * 201}, "registry.alias: String should have at most 200 characters"),
    ({"registry.model_name": "team/student"}, "registry.model_name: Value error, MLflow model names cannot contain"),
    ({"registry.model_name": "a:b"}, "registry.model_name: Value error, MLflow model names cannot contain"),
    ({"registry.model_name": "a/../b"}, "registry.model_name: Value error, MLflow model names cannot contain"),
    ({"registry.model_name": "   "}, "registry.model_name: Value error, a registered model name cannot be blank"),
    ({"registry.teacher_model_name": ".."}, "registry.teacher_model_name: Value error, MLflow treats model names"),
    ({"registry.teacher_model_name": "kdflow-digits-student"}, "are both 'kdflow-digits-student'"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_REGISTRY)
def test_registry_names_mlflow_refuses_fail_at_validation(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_the_registry_name_rules_agree_with_mlflows():
    """Every name and alias the config refuses, MLflow refuses too, and the names it accepts MLflow accepts."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation as v

    def mlflow_ok(check, value) -> bool:
        try:
            check(value)
        except MlflowException:
            return False
        return True

    for overrides, _ in [b for b in BAD_REGISTRY[:-1] if b[0] != {"registry.alias": "a" * 201}]:
        ((key, value),) = overrides.items()
        if key == "registry.alias":
            assert not (
                mlflow_ok(v._validate_model_alias_name, value)
                and mlflow_ok(v._validate_model_alias_name_reserved, value)
            )
        else:
            assert not mlflow_ok(v._validate_model_name, value), value
    for name in ("kdflow-digits-student", "team.student_v2", "a b"):
        assert mlflow_ok(v._validate_model_name, name) and load_config(None, {"registry.model_name": name})
    for alias in ("champion", "prod-2", "v2a"):
        assert mlflow_ok(v._validate_model_alias_name_reserved, alias)
        assert load_config(None, {"registry.alias": alias}).registry.alias == alias
