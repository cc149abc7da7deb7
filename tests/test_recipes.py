"""`modpo recipe`: every stage is checked before the first runs, shipped recipes find their data through the
data_dir variable, --overwrite/--resume reach the stages, and progress is shown by default."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import modpo.front.sweep
import modpo.models
import modpo.stages
from modpo.errors import ConfigError, ModpoError
from modpo.recipes import SHIPPED, load_recipe, run_recipe
from modpo.run_config import FrontConfig, StageConfig
from tiny import rows, run_cli as cli, tokenizer, write_jsonl, write_yaml

ENTRY_POINT = Path(sys.executable).with_name("modpo")


def stage_config(tmp_path: Path, name: str, data: str = "pairs.jsonl", model: str = "base") -> dict:
    """A stage on a few short preference rows and a model folder holding the tiny word tokenizer."""
    if not (tmp_path / data).exists():
        write_jsonl(tmp_path / data, rows(4))
    if not (tmp_path / model).exists():
        tokenizer().save_pretrained(str(tmp_path / model))
    return {"model": str(tmp_path / model), "output_dir": str(tmp_path / name),
            "train_data": str(tmp_path / data)}


def recipe(tmp_path: Path, stages: list) -> str:
    return write_yaml(tmp_path / "r.yaml", {"variables": {"root": str(tmp_path)}, "stages": stages})


@pytest.fixture
def calls(monkeypatch):
    """Every stage runner replaced by one that records its call and trains nothing."""
    seen = []

    def stage(command):
        def run(cfg, resume=False, overwrite=False):
            seen.append((command, cfg.output_dir, resume, overwrite))
            return Path(cfg.output_dir)
        return run

    def front(cfg, overwrite=False):
        seen.append(("front", cfg.output_dir, None, overwrite))

    def materialize(model, output_dir, dtype="fp32"):
        seen.append(("materialize", output_dir, model, dtype))
        return output_dir

    for command in ("sft", "reward", "dpo", "train"):
        monkeypatch.setitem(modpo.stages.STAGES, command, stage(command))
    monkeypatch.setattr(modpo.front.sweep, "run_front", front)
    monkeypatch.setattr(modpo.models, "materialize", materialize)
    return seen


# ------------------------------------------------------------------------------------------ stage checks


@pytest.mark.parametrize("stage, message", [
    ("dpo", "stages[1]: expected a mapping such as {command: dpo, config: {...}}, got str 'dpo'"),
    (["dpo"], "stages[1]: expected a mapping such as {command: dpo, config: {...}}, got list ['dpo']"),
    ({"command": "materialize", "output_dir": "x"}, "stages[1]: materialize stage is missing key(s) model"),
    ({"command": "materialize"}, "stages[1]: materialize stage is missing key(s) model, output_dir"),
    ({"command": "dpo"}, "stages[1]: dpo stage is missing key(s) config"),
    ({"config": {}}, "stages[1]: unknown command None (materialize, label, sft, reward, dpo, train, front)"),
    ({"command": "rlhf", "config": {}}, "stages[1]: unknown command 'rlhf'"),
    ({"command": "front", "config": {}, "dtype": "bf16"},
     "stages[1]: unknown key(s) dtype for a front stage (known: command, config)"),
    ({"command": "sft", "config": {"model": "m"}}, "stages[1]: missing required key(s) output_dir, train_data"),
])
def test_a_bad_stage_is_one_line_naming_file_and_index_and_nothing_runs(capsys, tmp_path, calls, stage, message):
    path = recipe(tmp_path, [{"command": "dpo", "config": stage_config(tmp_path, "dpo")}, stage])
    code, out, err = cli(capsys, "recipe", path)
    assert code == 2 and out == ""
    assert err.startswith(f"modpo: error: {path}: {message}") and err.count("\n") == 1, err
    assert calls == []  # the good stage 0 did not run either


def test_a_recipe_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- {command: dpo}\n")
    with pytest.raises(ConfigError, match=f"^{path}: expected a mapping with variables and stages, got list$"):
        load_recipe(str(path))


def test_unknown_variables_and_commands_are_refused(tmp_path, calls):
    config = {**stage_config(tmp_path, "dpo"), "output_dir": "${out}/dpo"}  # ${out} has no default: set it
    path = recipe(tmp_path, [{"command": "dpo", "config": config}])
    with pytest.raises(ConfigError, match=r"unknown variable\(s\) step \(known: root, out\)$"):
        run_recipe(path, {"step": 12})
    with pytest.raises(ConfigError, match=r"stages\[0\]: unknown variable \$\{out\}$"):
        run_recipe(path)
    assert run_recipe(path, {"out": str(tmp_path / "o")}) == [str(tmp_path / "o" / "dpo")]
    calls.clear()
    with pytest.raises(ConfigError, match=r"--only: unknown command\(s\) fronts"):
        run_recipe(path, only=["fronts"])
    assert calls == []


def test_stages_become_checked_configs(tmp_path):
    front = {"output_dir": "${root}/front", "weights": [[0.5, 0.5]], "train": {"model": "${root}/base"}}
    path = recipe(tmp_path, [{"command": "materialize", "model": "pkg:smollm2", "output_dir": "${root}/base"},
                             {"command": "train", "config": stage_config(tmp_path, "w")},
                             {"command": "front", "config": front}])
    _, stages = load_recipe(path)
    assert [command for command, _ in stages] == ["materialize", "train", "front"]
    assert stages[0][1] == {"command": "materialize", "model": "pkg:smollm2", "output_dir": f"{tmp_path}/base"}
    assert isinstance(stages[1][1], StageConfig) and stages[1][1].output_dir == str(tmp_path / "w")
    assert isinstance(stages[2][1], FrontConfig) and stages[2][1].train == {"model": f"{tmp_path}/base"}


# ------------------------------------------------------------------------------------- data_dir, shipped


@pytest.mark.parametrize("name", sorted(p.stem for p in SHIPPED.glob("*.yaml")))
def test_shipped_recipe_data_is_found_through_data_dir(monkeypatch, tmp_path, name):
    """From another directory the default data_dir is missing: the error names the variable; set, it is used."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"stages\[1\]: data file \.\./shared/data/\S+ does not exist; set data_dir "
                                          rf"on the command line \(modpo recipe {name} data_dir=\.\.\.\)$"):
        load_recipe(name)
    _, stages = load_recipe(name, {"data_dir": "/nowhere"}, only=["materialize"])  # only running stages need data
    paths = recipe_data_paths(stages)
    assert paths and all(Path(p).parent == Path("/nowhere") for p in paths)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for path in paths:
        (data_dir / Path(path).name).touch()
    _, stages = load_recipe(name, {"data_dir": str(data_dir)})
    assert {Path(p).parent for p in recipe_data_paths(stages)} == {data_dir}


def recipe_data_paths(stages) -> list[str]:
    """The data files of a recipe's training stages and fronts (train data, eval data, evaluation prompts)."""
    paths = []
    for command, cfg in stages:
        specs = [] if command == "materialize" else [cfg.prompts] if command == "label" else (
            [cfg.train.get("train_data"), cfg.train.get("eval_data"), cfg.evaluation.get("prompts")]
            if command == "front" else [cfg.train_data, cfg.eval_data])
        paths += [spec["path"] for spec in specs if isinstance(spec, dict)]
    return paths


# ----------------------------------------------------------------------------- --overwrite and --resume


def test_overwrite_and_resume_reach_the_stages(capsys, tmp_path, calls):
    front = {"output_dir": "${root}/front", "weights": [[0.5, 0.5]], "train": {"model": "${root}/base"}}
    path = recipe(tmp_path, [{"command": "materialize", "model": "pkg:smollm2", "output_dir": "${root}/base"},
                             {"command": "dpo", "config": stage_config(tmp_path, "dpo")},
                             {"command": "reward", "config": stage_config(tmp_path, "rm")},
                             {"command": "front", "config": front}])
    (tmp_path / "rm" / "checkpoint-4").mkdir(parents=True)  # only this stage has something to resume from
    code, out, _ = cli(capsys, "recipe", path, "--overwrite", "--resume")
    assert code == 0
    assert calls == [("materialize", f"{tmp_path}/base", "pkg:smollm2", "fp32"),
                     ("dpo", str(tmp_path / "dpo"), False, True),
                     ("reward", str(tmp_path / "rm"), True, True),
                     ("front", f"{tmp_path}/front", None, True)]
    assert out.splitlines() == [f"done: {tmp_path}/base", f"done: {tmp_path / 'dpo'}", f"done: {tmp_path / 'rm'}",
                                f"done: {tmp_path}/front"]
    calls.clear()
    code, out, _ = cli(capsys, "recipe", path, "--only", "front,dpo")
    assert code == 0
    assert calls == [("dpo", str(tmp_path / "dpo"), False, False), ("front", f"{tmp_path}/front", None, False)]


def test_progress_is_shown_by_default(tmp_path):
    """A stage's progress reaches stderr at INFO without -v (a materialized model is reused: nothing runs)."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / ".materialized").write_text("pkg:smollm2\n")
    path = recipe(tmp_path, [{"command": "materialize", "model": "pkg:smollm2", "output_dir": "${root}/base"}])
    result = subprocess.run([str(ENTRY_POINT), "recipe", path], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"done: {base}\n"
    lines = result.stderr.splitlines()
    assert "INFO modpo.recipes: recipe r.yaml: stage 0 (materialize)" in lines
    assert any(line.startswith("INFO modpo.recipes: recipe r.yaml: stage 0 (materialize) done in") for line in lines)
    assert not any(line.startswith("WARNING") for line in lines)


# ------------------------------------------------------------------- data encoded before the first stage

LONG_PROMPT = " ".join(["p0", "p1", "p2", "p3"] * 5)  # over max_length 12 (the short rows' prompts are 1-3 words)


def long_prompt_data(tmp_path: Path) -> str:
    """Preference rows whose 3rd file row has a prompt too long for max_length 12."""
    data = rows(4, seed=1)
    data[2]["prompt"] = LONG_PROMPT
    return write_jsonl(tmp_path / "long.jsonl", data)


def long_prompt_recipe(tmp_path: Path, **training) -> str:
    """Stage 0 materializes a tiny tokenizer's folder; stage 1 trains on it, on data with one long prompt."""
    source = tmp_path / "source"
    tokenizer().save_pretrained(str(source))  # what materialize will copy into ${root}/made: not there yet
    long_prompt_data(tmp_path)
    config = {**stage_config(tmp_path, "dpo", data="long.jsonl"), "model": "${root}/made",
              "training": {"max_length": 12, **training}}
    return recipe(tmp_path, [{"command": "materialize", "model": str(source), "output_dir": "${root}/made"},
                             {"command": "dpo", "config": config}])


def test_a_stage_that_would_refuse_a_long_prompt_is_refused_before_the_first_stage_runs(capsys, tmp_path, calls):
    path = long_prompt_recipe(tmp_path, long_prompts="refuse")
    tokens = len(tokenizer()(LONG_PROMPT)["input_ids"])  # as the materialized model's tokenizer counts them
    code, out, err = cli(capsys, "recipe", path)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"modpo: error: {path}: stages[1] (dpo): {tmp_path / 'long.jsonl'}, row 3, field 'prompt': "
                          f"{tokens} tokens, over the limit of 11 (max_length=12)"), err
    assert calls == []  # not even the materialize stage ran
    assert not (tmp_path / "made").exists()


def test_by_default_long_prompts_pass_with_their_warning_logged_before_anything_runs(caplog, tmp_path, calls):
    path = long_prompt_recipe(tmp_path)
    order = []
    calls_before = calls.copy()

    class Order(logging.Handler):
        def emit(self, record):
            order.append((record.levelname, record.getMessage(), len(calls)))

    handler = Order()
    logging.getLogger("modpo").addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="modpo"):
            run_recipe(path)
    finally:
        logging.getLogger("modpo").removeHandler(handler)
    assert calls_before == [] and [c[0] for c in calls] == ["materialize", "dpo"]
    warnings = [(message, ran) for level, message, ran in order if level == "WARNING"]
    assert warnings == [(f"{path}: stages[1] (dpo): {tmp_path / 'long.jsonl'}: 1 of 4 prompts were too long for "
                         "max_length=12 and were cut from the left, keeping their end (rows 3)", 0)]


def test_dropping_long_prompts_warns_and_a_stage_that_would_drop_every_row_is_refused(caplog, tmp_path, calls):
    path = long_prompt_recipe(tmp_path, long_prompts="drop")
    with caplog.at_level(logging.WARNING, logger="modpo"):
        run_recipe(path)
    assert "stages[1] (dpo): " in caplog.text and "1 of 4 rows were dropped" in caplog.text
    calls.clear()
    write_jsonl(tmp_path / "long.jsonl", [{**row, "prompt": LONG_PROMPT} for row in rows(4, seed=1)])
    with pytest.raises(ConfigError, match=r"stages\[1\] \(dpo\): \S+long.jsonl: every row would be dropped"):
        run_recipe(path)
    assert calls == []


def test_front_and_reward_stages_are_encoded_too(caplog, tmp_path, calls):
    long_prompt_data(tmp_path)
    train = {**stage_config(tmp_path, "unused", data="long.jsonl"), "training": {"max_length": 12}}
    del train["output_dir"]
    front = {"output_dir": "${root}/front", "weights": [[0.5, 0.5]], "train": train}
    reward = {**stage_config(tmp_path, "rm", data="long.jsonl"), "training": {"max_length": 12}}
    path = recipe(tmp_path, [{"command": "reward", "config": reward}, {"command": "front", "config": front}])
    with caplog.at_level(logging.WARNING, logger="modpo"):
        run_recipe(path)
    assert f"stages[0] (reward): {tmp_path / 'long.jsonl'}: 1 of 4 rows were longer than max_length=12" in caplog.text
    assert f"stages[1] (front): {tmp_path / 'long.jsonl'}: 1 of 4 prompts were too long" in caplog.text
    calls.clear()
    bad = rows(4)
    bad[1]["rejected"] = bad[1]["chosen"]  # no preference: a row no stage trains on
    write_jsonl(tmp_path / "long.jsonl", bad)
    with pytest.raises(ModpoError) as err:
        run_recipe(path)
    assert str(err.value) == (f"{path}: stages[0] (reward): {tmp_path / 'long.jsonl'}, row 2, field 'chosen': "
                              "identical to 'rejected': the pair carries no preference")
    assert calls == []
