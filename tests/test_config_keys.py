"""Config ergonomics: `--set` with list indices, "did you mean" for unknown keys at every level (overrides and
files), `kdflow config show` (the resolved config, round-trippable) and the generated reference docs/config.md."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdflow import cli
from kdflow.config import Config, ConfigError, TrainConfig, config_yaml, load_config, parse_config
from kdflow.configkeys import format_key, parse_key

ROOT = Path(__file__).resolve().parents[1]


def error(overrides=None, data=None, tmp_path=None) -> str:
    with pytest.raises(ConfigError) as info:
        if data is not None:
            parse_config(data)
        else:
            load_config(None, overrides)
    return str(info.value)


# --------------------------------------------------------------------------------------------- key paths


def test_keys_parse_and_format_with_list_indices():
    assert parse_key("distill.losses[0].alpha") == ["distill", "losses", 0, "alpha"]
    assert parse_key("a.b[2][10].c") == ["a", "b", 2, 10, "c"]
    assert format_key(["distill", "losses", 0, "alpha"]) == "distill.losses[0].alpha"
    assert format_key(["cluster", "tolerations", 0]) == "cluster.tolerations[0]"
    for bad in ("a[x]", "a..b", "[0].a", "a[-1]"):
        with pytest.raises(ConfigError, match=r"cannot read the key part"):
            parse_key(bad)


def test_set_addresses_a_list_entry():
    cfg = load_config(None, {"distill.losses[0].alpha": 0.3, "distill.students[1].arch_kwargs.width": 6})
    assert [(l.name, l.alpha) for l in cfg.distill.losses] == [("kd", 0.3), ("logit_mse", 0.9), ("ce", 0.9)]
    assert cfg.distill.losses[0].transfer == "both"  # the rest of the entry stays as the built-in run has it
    assert [s.arch_kwargs for s in cfg.distill.students] == [{"width": 4}, {"width": 6}]
    # the form pydantic's messages used before (a plain number) works too
    assert load_config(None, {"distill.losses.1.lam": 2.5}).distill.losses[1].lam == 2.5


def test_set_on_a_list_the_file_leaves_out_starts_from_the_schema_default(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("seed: 1\n")
    cfg = load_config(path, {"distill.losses[2].name": "plain", "cluster.tolerations[0].key": "gpu"})
    assert [l.name for l in cfg.distill.losses] == ["kd", "logit_mse", "plain"]  # Config()'s grid, renamed
    assert cfg.cluster.tolerations[0].key == "gpu" and cfg.cluster.tolerations[0].effect == "NoSchedule"


def test_set_in_a_section_the_file_leaves_out_keeps_that_sections_own_defaults(tmp_path):
    """teacher.pretrain defaults to 20 epochs, a warm-up and patience (not TrainConfig's plain defaults): a --set
    of one of its keys keeps the others."""
    path = tmp_path / "empty.yaml"
    path.write_text("")
    cfg = load_config(path, {"teacher.pretrain.lr": 0.1})
    assert cfg.teacher.pretrain == TrainConfig(epochs=20, lr=0.1, warmup_epochs=1, patience=5)
    assert load_config(path, {"distill.search.variants": 4}).distill.search.variants == 4  # a null section


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("distill.losses[3].alpha", "--set distill.losses[3].alpha: index 3 is out of range: distill.losses has 3 "
         "entries (indices 0 to 2)"),
        ("prune.ratios[1]", "--set prune.ratios[1]: index 1 is out of range: prune.ratios has 1 entry (indices 0 to "
         "0)"),
        ("distill.losses.alpha", "--set distill.losses.alpha: distill.losses is a list; address an entry by its "
         "index, e.g. distill.losses[0]"),
        ("distill.train[0]", "--set distill.train[0]: distill.train is a section, not a list"),
        ("seed.value", "--set seed.value: seed is not a section"),
        ("distill.losses[0].alpha.x", "--set distill.losses[0].alpha.x: distill.losses[0].alpha is not a section"),
    ],
)  # fmt: skip
def test_bad_override_paths_fail_naming_them(key, message):
    assert error({key: 0.3}) == message


# ------------------------------------------------------------------------------------------ did you mean


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        ({"experimnt": "x"}, "experimnt: unknown key; did you mean experiment?"),
        ({"distill.trian.epochs": 3}, "distill.trian: unknown key; did you mean distill.train?"),
        ({"distill.train.epoch": 3}, "distill.train.epoch: unknown key; did you mean distill.train.epochs?"),
        ({"distill.losses[1].lamm": 3}, "distill.losses[1].lamm: unknown key; did you mean distill.losses[1].lam?"),
        ({"registry.policy.max_param": 3}, "registry.policy.max_param: unknown key; did you mean "
         "registry.policy.max_params?"),
        ({"registry.policy.xyz": 3}, "registry.policy.xyz: unknown key; registry.policy has: metric, "
         "min_compression, max_params, max_latency_ms, min_teacher_retention, min_speedup"),
    ],
)  # fmt: skip
def test_unknown_keys_get_a_suggestion_at_every_level(overrides, line):
    assert error(overrides) == f"invalid config (built-in default): {line}"  # one bad key: one line


def test_a_files_typos_get_suggestions_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("distill:\n  losses:\n    - {name: kd, kind: kd, temprature: 2}\n  studnets: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).splitlines()[1:] == [
        "  distill.losses[0].temprature: unknown key; did you mean distill.losses[0].temperature?",
        "  distill.studnets: unknown key; did you mean distill.students?",
    ]


# ------------------------------------------------------------------------------------------- config show


def test_config_show_prints_the_resolved_config_and_reads_back_the_same(tmp_path):
    result = CliRunner().invoke(cli.app, ["config", "show", "--set", "distill.losses[0].alpha=0.3"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "# kdflow config: the built-in default --set distill.losses[0].alpha=0.3"
    assert "    momentum: 0.9" in lines and "  ratios: [0.75]" in lines  # defaults filled in; plain lists on one line
    path = tmp_path / "shown.yaml"
    path.write_text(result.output)
    assert load_config(path) == load_config(None, {"distill.losses[0].alpha": 0.3})
    again = CliRunner().invoke(cli.app, ["config", "show", "-c", str(path)])
    assert again.output.splitlines()[1:] == lines[1:]


@pytest.mark.parametrize("name", ["mnist_to_usps.yaml", "mnist_to_usps_fewshot.yaml", "cifar10_to_cifar100.yaml"])
def test_every_shipped_config_round_trips_through_show(tmp_path, name):
    cfg = load_config(ROOT / "configs" / name)
    path = tmp_path / name
    path.write_text(config_yaml(cfg, name))
    assert load_config(path) == cfg
    assert config_yaml(Config()).count("\n") > 150  # every key, one a line (sections as blocks)


def test_config_show_fails_naming_a_bad_key():
    result = CliRunner().invoke(cli.app, ["config", "show", "--set", "distill.train.epoch=3"])
    assert result.exit_code == 2
    assert "distill.train.epoch: unknown key; did you mean distill.train.epochs?" in result.output


# ------------------------------------------------------------------------------------- help, completion


def test_help_is_not_cut_at_80_columns_in_a_pipe(monkeypatch):
    import io
    import sys

    from typer import rich_utils

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(rich_utils, "MAX_WIDTH", None)  # as typer starts without $TERMINAL_WIDTH
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # a pipe, whatever runs the tests
    cli._help_width()
    assert rich_utils.MAX_WIDTH == cli.HELP_WIDTH
    monkeypatch.undo()
    monkeypatch.setattr(rich_utils, "MAX_WIDTH", cli.HELP_WIDTH)
    result = CliRunner().invoke(cli.app, ["submit", "--help"])
    assert result.exit_code == 0
    assert "https://<kubeflow>/pipeline." in result.output  # cut to "https://<kubeflow>/pipeli…" at 80
    assert max(len(l) for l in result.output.splitlines()) == cli.HELP_WIDTH


def test_shell_completion_is_offered():
    result = CliRunner().invoke(cli.app, ["--help"])
    assert "--install-completion" in result.output and "--show-completion" in result.output
    assert "config" in result.output


# ------------------------------------------------------------------------------------------ the reference


def test_docs_config_md_is_the_reference_of_the_schema():
    from kdflow.configdoc import REGENERATE, reference_markdown

    checked_in = (ROOT / "docs" / "config.md").read_text()
    assert checked_in == reference_markdown(), (
        f"docs/config.md is out of date with the schema in src/kdflow/config.py: regenerate it with `{REGENERATE}` "
        "(from the repository root) and commit it"
    )


def test_the_reference_gives_every_key_its_type_range_default_and_description():
    from kdflow.configdoc import reference_markdown, sections

    rows = {row[0]: row for _, _, section in sections(Config, "", Config(), load_config()) for row in section}
    undescribed = sorted(k for k, row in rows.items() if not row[5])
    assert undescribed == [], f"config keys without a docstring in src/kdflow/config.py: {undescribed}"
    assert len(rows) > 130 and "distill.losses[i].alpha" in rows and "cluster.tolerations[i].key" in rows
    # a section's own defaults (the teacher's pretrain is not TrainConfig's), and where the built-in run differs
    assert rows["teacher.pretrain.epochs"][1:5] == ("int", "≥ 0, ≤ 10000", "`20`", "")
    assert rows["distill.train.epochs"][3:5] == ("`30`", "`50`")
    assert rows["data.source_fraction"][1:5] == ("float", "> 0, < 1", "`0.4`", "`0.6`")
    assert rows["distill.losses[i].kind"][1:4] == (
        '"ce" \\| "kd" \\| "logit_mse" \\| "hint" \\| "dkd" \\| "dist"',
        "",
        "*required*",
    )
    assert rows["distill.students"][3:5] == ("2 entries: pruned60, pruned75", "2 entries: cnn4, cnn8")
    assert rows["registry.alias"][2] == "at most 200 long, matches `^[A-Za-z][A-Za-z0-9_-]*$`"
    assert rows["distill.search"][1:4] == ("section \\| null", "", "`null`")
    markdown = reference_markdown()
    assert "| `teacher.pretrain.patience` | int \\| null | ≥ 1, ≤ 10000 | `5` |  | Early stopping:" in markdown
    result = CliRunner().invoke(cli.app, ["config", "reference"])
    assert result.exit_code == 0 and result.output == markdown
