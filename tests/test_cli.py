"""The `modpo` command line: --help of every subcommand, `key.path=value` overrides, the demo, and a
subprocess smoke test of the installed entry point."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from modpo.cli import main
from modpo.demo import task
from modpo.front.report import hypervolume
from modpo.errors import ConfigError
from modpo.run_config import FrontConfig, StageConfig, apply_overrides, load_config

STAGE_COMMANDS = ("sft", "reward", "dpo", "train")
MODPO_KEYS = ("weights", "beta", "loss_type", "label_smoothing", "max_length")
ENTRY_POINT = Path(sys.executable).with_name("modpo")


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def modpo_only_fields() -> list[str]:
    """MODPOConfig's own fields (those it adds to transformers.TrainingArguments)."""
    from transformers import TrainingArguments

    from modpo.config import MODPOConfig

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    return [f.name for f in dataclasses.fields(MODPOConfig) if f.name not in inherited]


# ----------------------------------------------------------------------------------------------- --help


def test_top_level_help_lists_every_subcommand(capsys):
    text = help_text(capsys)
    for command in (*STAGE_COMMANDS, "front", "recipe", "demo", "compare"):
        assert re.search(rf"^\s+{command}\s", text, re.MULTILINE), command


@pytest.mark.parametrize("command", STAGE_COMMANDS)
def test_stage_help_lists_every_config_key_the_stage_uses(capsys, command):
    text = help_text(capsys, command)
    used = {"ref_model": ("dpo", "train"), "margins": ("train",), "num_labels": ("reward",)}
    for field in dataclasses.fields(StageConfig):
        listed = re.search(rf"^  {field.name}\s+\S", text, re.MULTILINE) is not None
        assert listed == (command in used.get(field.name, STAGE_COMMANDS)), f"{command} --help and {field.name}"
    for option in ("--config", "--overwrite", "--resume", "KEY=VALUE"):
        assert option in text
    for key in MODPO_KEYS:  # the `training` key's help names the MODPO settings
        assert key in text


@pytest.mark.parametrize("command", ["dpo", "train"])
def test_preference_stage_help_lists_the_modpo_keys(capsys, command):
    text = help_text(capsys, command)
    fields = modpo_only_fields()
    assert set(MODPO_KEYS) <= set(fields)
    for name in fields:
        assert re.search(rf"^  training\.{name}\s", text, re.MULTILINE), f"{command} --help lacks training.{name}"


def test_front_help_lists_every_config_key(capsys):
    text = help_text(capsys, "front")
    for field in dataclasses.fields(FrontConfig):
        assert re.search(rf"^  {field.name}\s+\S", text, re.MULTILINE), f"front --help lacks {field.name}"
    for option in ("--config", "--overwrite", "KEY=VALUE"):
        assert option in text


def test_front_help_lists_every_evaluation_key(capsys):
    """Each key the sweep accepts under evaluation, with a description; the evaluators' names key too."""
    from modpo.front.generate import SamplingSettings
    from modpo.front.sweep import EVALUATION_KEYS

    text = help_text(capsys, "front")
    for key in EVALUATION_KEYS:
        line = re.search(rf"^  evaluation\.{key}\s+(\S.*)$", text, re.MULTILINE)
        assert line, f"front --help lacks evaluation.{key}"
        default = getattr(SamplingSettings, key, None)
        assert default is None or line.group(1).endswith(f"(default: {default!r})"), line.group(0)
    assert "names: [...]" in re.search(r"^  evaluation\.evaluators\s+(.*)$", text, re.MULTILINE).group(1)


@pytest.mark.parametrize("command", (*STAGE_COMMANDS, "front"))
def test_help_example_is_the_subcommands_own(capsys, command):
    text = help_text(capsys, command)
    examples = re.findall(r"^  (modpo \w+ --config \S+ .*)$", text, re.MULTILINE)
    assert len(examples) == 1 and examples[0].startswith(f"modpo {command} --config"), examples


def test_recipe_help_lists_the_shipped_recipes_and_options(capsys):
    from modpo.recipes import SHIPPED

    top, text = help_text(capsys), help_text(capsys, "recipe")
    for path in SHIPPED.glob("*.yaml"):
        variables = yaml.safe_load(path.read_text())["variables"]
        assert "data_dir" in variables
        listed = " ".join(f"{k}={v}" for k, v in variables.items())
        assert re.search(rf"^  {path.stem}\s+" + re.escape(listed) + "$", text,
                         re.MULTILINE), path.stem
        assert path.stem in top
    for option in ("--only", "--overwrite", "--resume", "NAME=VALUE"):
        assert option in text


def test_demo_help(capsys):
    text = help_text(capsys, "demo")
    for option in ("--output-dir", "--weights", "--seed", "--beta", "--overwrite"):
        assert option in text


def test_unknown_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--learning-rate", "0.1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: modpo")
    assert err[-1] == "modpo: error: unrecognized arguments: --learning-rate"


# ----------------------------------------------------------------------------------------- overrides


def test_overrides_nested_keys_and_yaml_values():
    data = {"training": {"beta": 0.5, "seed": 1}, "lora": None}
    apply_overrides(data, ["training.weights=[0.3, 0.7]", "training.beta=0.1", "training.lr_scheduler_type=constant"])
    assert data == {"training": {"beta": 0.1, "seed": 1, "weights": [0.3, 0.7], "lr_scheduler_type": "constant"},
                    "lora": None}
    apply_overrides(data, ["a.b.c=1", "margins=[{type: length_penalty}, {type: columns, chosen: [x], rejected: [y]}]",
                           "trust_remote_code=true", "tokenizer=null", "model='0.5'", "training.run_name=a=b",
                           "training.report_to=[]", "num_labels=2", "dtype=bf16"])
    assert data["a"] == {"b": {"c": 1}}
    assert data["margins"] == [{"type": "length_penalty"}, {"type": "columns", "chosen": ["x"], "rejected": ["y"]}]
    assert data["trust_remote_code"] is True and data["tokenizer"] is None
    assert data["model"] == "0.5"  # quoted: a string
    assert data["training"]["run_name"] == "a=b"  # split at the first '='
    assert data["training"]["report_to"] == [] and data["num_labels"] == 2 and data["dtype"] == "bf16"


def test_override_errors():
    with pytest.raises(ConfigError, match="not of the form key.path=value"):
        apply_overrides({}, ["training.beta"])
    with pytest.raises(ConfigError, match="value is not valid YAML"):
        apply_overrides({}, ["training.weights=[0.5, 0.5"])
    with pytest.raises(ConfigError, match="'model' is not a mapping"):
        apply_overrides({"model": "m"}, ["model.path=x"])
    with pytest.raises(ConfigError, match="'lora' is not a mapping"):
        apply_overrides({"lora": None}, ["lora.r=4"])


def test_load_config_merges_file_and_overrides(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "output_dir": "runs/a", "train_data": "d.jsonl",
                                    "training": {"beta": 0.5, "seed": 3, "weights": [1.0]}}))
    cfg = load_config(StageConfig, str(path), ["training.weights=[0.3,0.7]", "training.beta=0.1",
                                               "output_dir=runs/w03", "lora={r: 8, target_modules: [q_proj]}"])
    assert cfg == StageConfig(model="m", output_dir="runs/w03", train_data="d.jsonl",
                              lora={"r": 8, "target_modules": ["q_proj"]},
                              training={"beta": 0.1, "seed": 3, "weights": [0.3, 0.7]})
    # overrides alone make a config; the source named in errors is then "command line"
    cfg = load_config(StageConfig, None, ["model=m", "output_dir=o", "train_data={loader: jsonl, path: p.jsonl}"])
    assert cfg.train_data == {"loader": "jsonl", "path": "p.jsonl"}
    with pytest.raises(ConfigError, match="^command line: missing required key"):
        load_config(StageConfig, None, ["model=m"])


def test_overrides_reach_the_stage(capsys, monkeypatch, tmp_path):
    """Through `main`: the stage receives the file's config with the overrides applied."""
    import modpo.stages

    seen = {}

    def fake_stage(cfg, resume=False, overwrite=False):
        seen.update(cfg=cfg, resume=resume, overwrite=overwrite)
        return Path(cfg.output_dir)

    monkeypatch.setitem(modpo.stages.STAGES, "train", fake_stage)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "output_dir": str(tmp_path / "a"), "train_data": "d.jsonl",
                                    "training": {"seed": 3}}))
    out = tmp_path / "w03"
    code = main(["train", "--config", str(path), "training.weights=[0.3,0.7]", "training.beta=0.1",
                 f"output_dir={out}", "margins=[{type: length_penalty}]", "--overwrite", "--resume"])
    assert code == 0
    assert capsys.readouterr().out.strip() == f"saved to {out}"
    cfg = seen["cfg"]
    assert cfg.training == {"seed": 3, "weights": [0.3, 0.7], "beta": 0.1}
    assert cfg.output_dir == str(out) and cfg.margins == [{"type": "length_penalty"}]
    assert seen["resume"] is True and seen["overwrite"] is True


def test_overrides_reach_the_front(capsys, monkeypatch, tmp_path):
    import modpo.cli

    seen = {}

    def fake_front(cfg, overwrite=False, resume=False):
        seen.update(cfg=cfg, overwrite=overwrite, resume=resume)
        Path(cfg.output_dir).mkdir(parents=True)
        (Path(cfg.output_dir) / "front.md").write_text("| point |\n")

    monkeypatch.setattr(modpo.cli, "run_front", fake_front)
    code = main(["front", f"output_dir={tmp_path / 'f'}", "train={model: m, train_data: d.jsonl}",
                 "train.training.beta=0.2", "weights=[[0.2, 0.8], [0.8, 0.2]]",
                 "evaluation.evaluators=[{type: demo_exact}]", "evaluation.samples_per_prompt=4"])
    assert code == 0
    assert capsys.readouterr().out.strip() == "| point |"
    cfg = seen["cfg"]
    assert cfg.train == {"model": "m", "train_data": "d.jsonl", "training": {"beta": 0.2}}
    assert cfg.weights == [[0.2, 0.8], [0.8, 0.2]]
    assert cfg.evaluation == {"evaluators": [{"type": "demo_exact"}], "samples_per_prompt": 4}
    assert seen["overwrite"] is False


# ------------------------------------------------------------------------------------------ subprocess


def test_entry_point_help_subprocess():
    result = subprocess.run([str(ENTRY_POINT), "--help"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: modpo")
    for command in (*STAGE_COMMANDS, "front", "demo"):
        assert command in result.stdout


def test_entry_point_error_subprocess(tmp_path):
    """What a user sees in a terminal: exit code 2 and exactly one line on stderr, nothing on stdout."""
    missing = tmp_path / "absent.yaml"
    result = subprocess.run([str(ENTRY_POINT), "train", "--config", str(missing)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"modpo: error: config file {missing} does not exist\n"


# ------------------------------------------------------------------------------------------------- demo


def test_demo_inputs_follow_the_seed(tmp_path):
    """Data and initial model are made for the requested seed: reused for the same seed, replaced for another
    only with overwrite."""
    from safetensors.torch import load_file

    from modpo.demo import task
    from modpo.demo.pipeline import prepare_inputs

    def contents(paths):
        data = {name: [json.loads(line) for line in Path(paths[name]).read_text().splitlines()]
                for name in ("sft", "helpful", "harmless")}
        return data, load_file(str(Path(paths["init"]) / "model.safetensors"))

    out = tmp_path / "demo"
    paths = prepare_inputs(out, seed=0)
    data0, weights0 = contents(paths)
    assert data0["sft"] == task.sft_rows(3000, 0) and data0["harmless"] == task.preference_rows(2000, "harmless", 2)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert prepare_inputs(out, seed=0) == paths
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps  # reused, not rewritten

    with pytest.raises(ConfigError, match=r"made otherwise \(seed 0\); pass --overwrite to replace them with those "
                                          r"for seed 1"):
        prepare_inputs(out, seed=1)
    assert contents(paths)[0] == data0
    assert prepare_inputs(out, seed=1, overwrite=True) == paths
    data1, weights1 = contents(paths)
    assert data1["sft"] == task.sft_rows(3000, 1) and data1["helpful"] == task.preference_rows(2000, "helpful", 2)
    assert data1["helpful"] != data0["helpful"]
    assert weights1.keys() == weights0.keys() and any(not torch.equal(weights1[k], weights0[k]) for k in weights0)
    fresh = prepare_inputs(tmp_path / "fresh", seed=1)  # the same seed in a new folder: the same inputs
    assert all(torch.equal(contents(fresh)[1][k], weights1[k]) for k in weights1)


def test_demo(capsys, tmp_path):
    """The built-in demo at two weights: a report with a row per point plus sft, and the trade-off."""
    out = tmp_path / "demo"
    started = time.monotonic()
    code = main(["demo", "--output-dir", str(out), "--weights", "0.2,0.8"])
    elapsed = time.monotonic() - started  # reported, never asserted
    captured = capsys.readouterr()
    stdout = captured.out
    assert code == 0
    # one line per stage with its time, no progress bars or printed training logs (those come with -v)
    for stage in ("SFT (or reused): ", "margin model: DPO on harmlessness (or reused): ", "exact optimum under the "
                  "SFT model: ", "point w0.2_0.8: trained or reused in ", "point w0.8_0.2: trained or reused in "):
        assert stage in stdout, stage
    assert "it/s" not in captured.err and "%|" not in captured.err and "'loss':" not in stdout
    folder = out / "front"
    assert (folder / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (folder / "front.md").read_text()
    assert table.strip() in stdout and "Demo finished in" in stdout
    front_table = table.split("\n\n")[0]  # the front's table; the optimum's follows it
    rows = [line.split("|")[1].strip() for line in front_table.splitlines()
            if line.startswith("| ") and not line.startswith("| point")]
    assert rows == ["sft", "w0.2_0.8", "w0.8_0.2"]
    doc = json.loads((folder / "front.json").read_text())
    points = {p["name"]: p for p in doc["points"]}
    low, high = points["w0.2_0.8"], points["w0.8_0.2"]
    # more weight on helpfulness: more helpful, less harmless
    assert high["helpful"]["mean"] > low["helpful"]["mean"]
    assert high["harmless"]["mean"] < low["harmless"]["mean"]
    # the exact optimum beside the front: one optimal point per weight vector, gaps and distances from the points
    optimum = doc["optimum"]
    assert [r["name"] for r in optimum["points"]] == ["w0.2_0.8", "w0.8_0.2"] and len(optimum["curve"]) == 41
    for r in optimum["points"]:
        got = [points[r["name"]][o]["mean"] for o in task.OBJECTIVES]
        best = [r["optimum"][o] for o in task.OBJECTIVES]
        assert r["distance"] == pytest.approx(math.dist(best, got))
    assert optimum["points"][1]["optimum"]["helpful"] > optimum["points"][0]["optimum"]["helpful"]
    front_volume = hypervolume([[points[n][o]["mean"] for o in task.OBJECTIVES] for n in ("w0.2_0.8", "w0.8_0.2")],
                               [0.0, 0.0])
    assert optimum["fronts"]["MODPO"]["fraction"] == pytest.approx(front_volume / optimum["hypervolume"])
    assert "Optimum: exact optimum" in table
    print(f"demo wall time: {elapsed:.1f} s; hypervolume {100 * optimum['fronts']['MODPO']['fraction']:.0f}% of the "
          "optimum's")


def test_only_known_noisy_warnings_are_silenced(capsys, monkeypatch):
    """Without -v, the warnings libraries raise about modpo's own set-up are silenced by message; any other
    warning (here one a margin function or loader might raise) still reaches the user."""
    import warnings

    from modpo import cli

    def run(args):
        warnings.warn("margin column 'score' holds only zeros", UserWarning)
        warnings.warn("`gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("this option will change its default", FutureWarning)
        return 0

    monkeypatch.setattr(cli, "_run", run)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["generate", "--model", "m", "--weights", "0.5,0.5", "a prompt"]) == 0
    shown = [str(w.message) for w in seen]
    assert shown == ["margin column 'score' holds only zeros", "this option will change its default"]
