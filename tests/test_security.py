"""Security: what modpo writes and loads, and what it will not do.

* weights are written as safetensors only; the pickles transformers keeps in checkpoints (optimizer,
  scheduler, RNG state) are read back only with `torch.load(weights_only=True)`;
* the source never unpickles, never `yaml.load`s, never runs a shell, never turns trust_remote_code on;
* a model folder that brings its own Python code is refused, and its code does not run;
* a YAML config or recipe variable with a Python tag is refused, and nothing runs;
* output paths come from the config's folders and from numbers: a front's point names are made from the
  weights alone, and the names of extra models never reach a path.
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import re
from pathlib import Path

import pytest
import torch

import modpo
import tiny
from tiny import run_cli as cli, write_jsonl, write_yaml
from modpo.errors import ConfigError
from modpo.front.sweep import point_name
from modpo.models import load_model, load_tokenizer
from modpo.run_config import StageConfig

SRC = Path(modpo.__file__).parent
TRAINING = {"use_cpu": True, "report_to": [], "disable_tqdm": True, "save_strategy": "no", "max_steps": 1,
            "per_device_train_batch_size": 2, "seed": 0}
# Files transformers' Trainer writes with torch.save: checkpoint state, and the TrainingArguments record.
TRAINER_PICKLES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt", "training_args.bin"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy")





def snapshot(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    tok = tiny.tokenizer()
    return tiny.save(tiny.model(len(tok), seed=0), tok, tmp_path_factory.mktemp("base") / "lm")


# ------------------------------------------------------------------------------------- weights on disk


def check_weight_files(folder: Path) -> None:
    """Every model folder holds safetensors weights; the only pickles are the Trainer's own state files."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    pickles = sorted(p.relative_to(folder).as_posix() for p in files
                     if p.name.endswith(PICKLE_SUFFIXES) and p.name not in TRAINER_PICKLES)
    assert pickles == [], f"pickled files in {folder}: {pickles}"
    assert not any(p.name.startswith(("pytorch_model", "adapter_model")) and not p.name.endswith(".safetensors")
                   for p in files)
    model_folders = {p.parent for p in files if p.name in ("config.json", "adapter_config.json")}
    assert model_folders, folder
    for model_folder in model_folders:
        names = {p.name for p in model_folder.iterdir()}
        assert names & {"model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json"}, \
            f"{model_folder} has no safetensors weights: {sorted(names)}"


def test_every_stage_saves_safetensors_and_resume_loads_no_pickled_code(capsys, tmp_path, monkeypatch, base):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", tiny.rows(4, seed=1))
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": r["prompt"], "completion": " " + r["chosen"]}
                                               for r in tiny.rows(4, seed=2)])
    runs = {
        "sft": ("sft", sft, {}, None),
        "reward": ("reward", pairs, {"max_length": 32}, None),
        "dpo": ("dpo", pairs, {"save_strategy": "steps", "save_steps": 1, "max_steps": 2}, None),
        "dpo_lora": ("dpo", pairs, {}, {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}),
    }
    for name, (stage, data, training, lora) in runs.items():
        config = {"model": base, "output_dir": str(tmp_path / name), "train_data": data,
                  "training": {**TRAINING, **training}, "lora": lora}
        code, _, err = cli(capsys, stage, "--config", write_yaml(tmp_path / f"{name}.yaml", config))
        assert code == 0, f"{name}: {err[-3000:]}"
        check_weight_files(tmp_path / name)
    assert (tmp_path / "dpo" / "checkpoint-2" / "model.safetensors").exists()
    assert (tmp_path / "dpo_lora" / "adapter_model.safetensors").exists()

    # Resuming reads the checkpoint's pickled optimizer/scheduler/RNG state: only with weights_only=True.
    loads = []
    original = torch.load

    def recording_load(*args, **kwargs):
        loads.append((str(args[0]) if args else kwargs.get("f"), kwargs.get("weights_only")))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    config = {"model": base, "output_dir": str(tmp_path / "dpo"), "train_data": pairs,
              "training": {**TRAINING, "save_strategy": "steps", "save_steps": 1, "max_steps": 3}}
    code, _, err = cli(capsys, "dpo", "--config", write_yaml(tmp_path / "dpo-more.yaml", config), "--resume", "--overwrite")
    assert code == 0, err[-3000:]
    loaded = {Path(path).name for path, _ in loads}
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= loaded, loads
    assert all(weights_only is True for _, weights_only in loads), loads
    assert "training_args.bin" not in loaded  # written by transformers for the record, never read back
    check_weight_files(tmp_path / "dpo")


def test_a_pickled_model_folder_is_refused_without_unpickling(tmp_path, monkeypatch):
    """A folder whose weights are only `pytorch_model.bin` (a pickle) is not loaded: load_model asks for
    safetensors, and torch.load is never called."""
    tok = tiny.tokenizer()
    folder = tmp_path / "pickled"
    model = tiny.model(len(tok), seed=0)
    model.config.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a model folder")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ConfigError, match=f"cannot load a model from {folder}"):
        load_model(str(folder))
    with pytest.raises(ConfigError, match=f"cannot load a model from {folder}"):
        load_model(str(folder), kind="reward")


# ----------------------------------------------------------------------------------------- source scan


def _call_name(node: ast.Call) -> str:
    """Dotted name of what is called: `torch.load`, `yaml.safe_load`, `eval`, ..."""
    parts, target = [], node.func
    while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
    if isinstance(target, ast.Name):
        parts.append(target.id)
    return ".".join(reversed(parts))


def _keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


FORBIDDEN_IMPORTS = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib", "subprocess", "pty", "commands"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "os.system", "os.popen", "os.execv", "os.execvp",
                   "os.spawnv", "os.spawnl", "yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.unsafe_load_all",
                   "yaml.full_load", "yaml.full_load_all", "numpy.load", "np.load", "torch.jit.load"}
FORBIDDEN_TEXT = [r"shell\s*=\s*True", r"os\.system", r"yaml\.load\(", r"yaml\.(Unsafe|Full)?Loader\b",
                  r"trust_remote_code\s*=\s*True", r"weights_only\s*=\s*False", r"safe_serialization\s*=\s*False",
                  r"use_safetensors\s*=\s*False", r"allow_pickle\s*=\s*True"]


def scan(source: str, where: str) -> list[str]:
    """Security findings in one Python file's text."""
    findings = [f"{where}: matches {pattern!r}" for pattern in FORBIDDEN_TEXT if re.search(pattern, source)]
    for node in ast.walk(ast.parse(source)):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            findings += [f"{line}: imports {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_IMPORTS]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in FORBIDDEN_IMPORTS:
                findings.append(f"{line}: imports from {module}")
            if module in ("torch", "yaml", "os") and any(a.name in ("load", "system", "popen", "unsafe_load",
                                                                    "full_load") for a in node.names):
                findings.append(f"{line}: imports {module}.{', '.join(a.name for a in node.names)} (use the module)")
        elif isinstance(node, ast.Call):
            name = _call_name(node)
            if name in FORBIDDEN_CALLS:
                findings.append(f"{line}: calls {name}")
            if name.endswith("torch.load") or name == "torch.load":
                if _keyword(node, "weights_only") is not True:
                    findings.append(f"{line}: torch.load without weights_only=True")
            if _keyword(node, "shell") is True:
                findings.append(f"{line}: shell=True")
            if _keyword(node, "trust_remote_code") is True:
                findings.append(f"{line}: trust_remote_code=True")
            if name.endswith("from_pretrained") and _keyword(node, "use_safetensors") is False:
                findings.append(f"{line}: use_safetensors=False")
    return findings


def test_scanner_finds_what_it_is_meant_to_find():
    bad = """
import pickle
import subprocess
from torch import load
import os, yaml, torch
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
yaml.load(open("c.yaml"), Loader=yaml.Loader)
os.system("rm -rf " + user_input)
subprocess.run(cmd, shell=True)
eval(text)
AutoModel.from_pretrained(path, trust_remote_code=True, use_safetensors=False)
"""
    findings = "\n".join(scan(bad, "bad.py"))
    for expected in ("imports pickle", "imports subprocess", "imports torch.load", "bad.py:6: torch.load without",
                     "bad.py:7: torch.load without", "calls yaml.load", "calls os.system", "shell=True", "calls eval",
                     "trust_remote_code=True", "use_safetensors=False", "'yaml\\\\.load\\\\('"):
        assert expected in findings, f"{expected!r} not found in:\n{findings}"
    assert scan("import torch, yaml\ntorch.load(p, weights_only=True)\nyaml.safe_load(s)\n", "good.py") == []


def test_source_has_no_unsafe_loading_or_shell():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20 and SRC / "cli.py" in files
    findings = [f for path in files for f in scan(path.read_text(), str(path.relative_to(SRC.parent)))]
    assert findings == [], "\n".join(findings)
    # YAML is read with safe_load only, and there is YAML reading to check.
    text = "\n".join(path.read_text() for path in files)
    assert text.count("yaml.safe_load(") >= 3


# ------------------------------------------------------------------------------------ trust_remote_code


def test_trust_remote_code_is_off_by_default():
    assert StageConfig(model="m", output_dir="o", train_data="d").trust_remote_code is False
    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    assert inspect.signature(load_tokenizer).parameters["trust_remote_code"].default is False


def evil_model(folder: Path, marker: Path) -> str:
    """A local model folder whose config points at its own Python code, which would create `marker`."""
    folder.mkdir()
    auto_map = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel",
                "AutoModelForSequenceClassification": "modeling_evil.EvilModel",
                "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "config.json").write_text(json.dumps({"model_type": "evil_remote", "auto_map": auto_map}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "EvilTokenizer",
                                                              "auto_map": {"AutoTokenizer": auto_map["AutoTokenizer"]}}))
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'a').write({module!r})\n")
    return str(folder)


def test_model_code_in_a_model_folder_never_runs(capsys, tmp_path):
    marker = tmp_path / "code-ran"
    model = evil_model(tmp_path / "evil", marker)
    for load in (load_model, load_tokenizer):
        with pytest.raises(ConfigError, match="trust_remote_code: true"):
            load(model)
    with pytest.raises(ConfigError):
        load_model(model, kind="reward")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", tiny.rows(4, seed=1))
    out = tmp_path / "out"
    config = write_yaml(tmp_path / "c.yaml", {"model": model, "output_dir": str(out), "train_data": pairs,
                                              "training": TRAINING})
    code, stdout, err = cli(capsys, "dpo", "--config", config)
    assert code == 2 and stdout == ""
    assert err.strip().splitlines()[-1] == (f"modpo: error: {model} needs its own Python code to load; modpo runs it "
                                            "only with trust_remote_code: true (off by default)")
    assert not marker.exists(), "the model folder's code ran"
    assert not out.exists()


# --------------------------------------------------------------------------------- YAML with Python tags


def test_yaml_with_python_tags_is_refused_and_runs_nothing(capsys, tmp_path):
    marker = tmp_path / "pwned"
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tag}\noutput_dir: {tmp_path / 'out'}\ntrain_data: x.jsonl\n")
    code, _, err = cli(capsys, "dpo", "--config", str(config))
    assert code == 2 and err.startswith(f"modpo: error: {config}: not valid YAML")
    code, _, err = cli(capsys, "dpo", f"model={tag}")
    assert code == 2 and "modpo: error: override 'model=" in err and "not valid YAML" in err
    recipe = write_yaml(tmp_path / "r.yaml", {"variables": {"root": str(tmp_path)}, "stages": []})
    code, _, err = cli(capsys, "recipe", recipe, f"root={tag}")
    assert code == 2 and err.strip() == f"modpo: error: variable 'root={tag}': value is not valid YAML"
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ output paths


@pytest.mark.parametrize("weights, name", [
    ([0.2, 0.8], "w0.2_0.8"), ([1.0], "w1"), ([1, 0], "w1_0"), ([1e-300, 1.0], "w1e-300_1"),
    ([1e300], "w1e+300"), ([float("nan"), 1.0], "wnan_1"), ([float("inf"), -float("inf")], "winf_-inf"),
    ([-0.0, 1.0], "w-0_1"), ([1 / 3, 2 / 3], "w0.333333_0.666667"), ([0.1 + 0.2, 0.7], "w0.3_0.7"),
])
def test_point_names_are_made_of_numbers(weights, name):
    assert point_name(weights) == name
    assert re.fullmatch(r"w[0-9a-z.+\-_]+", name) and ".." not in name and "/" not in name and "\\" not in name


@pytest.mark.parametrize("weights", [["../../escape", 1.0], [0.5, "/etc"], [True, 0.0], [None], "0.5", [[0.5], 0.5]])
def test_point_names_refuse_anything_but_numbers(weights):
    with pytest.raises(ConfigError, match="a weight vector is a list of numbers"):
        point_name(weights)


FRONT_TRAINING = {**TRAINING, "per_device_train_batch_size": 4, "max_length": 16}


def front_config(tmp_path: Path, base: str, out: Path, weights, extra_models=None) -> str:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", tiny.rows(4, seed=3))
    evaluation = {"prompts": ["p0 p1", "p2"], "max_new_tokens": 3, "seed": 0,
                  "evaluators": [{"type": "length_penalty", "names": ["brevity"]},
                                 {"type": "length_penalty", "names": ["brevity_again"]}],
                  "reference_point": [-10.0, -10.0]}
    if extra_models:
        evaluation["extra_models"] = extra_models
    return write_yaml(tmp_path / "front.yaml", {"output_dir": str(out), "weights": weights, "evaluation": evaluation,
                                                "train": {"model": base, "train_data": pairs,
                                                          "training": FRONT_TRAINING}})


@pytest.mark.parametrize("weights, message", [
    ([["../../escape", 1.0]], "weights ['../../escape', 1.0]: a weight vector is a list of numbers"),
    ([[0.30000000000000004, 0.7], [0.3, 0.7]],
     "weights: [0.30000000000000004, 0.7] and [0.3, 0.7] both give the point name w0.3_0.7 (6 significant digits); "
     "make them differ more"),
])
def test_front_refuses_weights_that_would_misname_a_folder(capsys, tmp_path, base, weights, message):
    out = tmp_path / "front"
    config = front_config(tmp_path, base, out, weights)
    before = snapshot(tmp_path)
    code, stdout, err = cli(capsys, "front", "--config", config)
    assert code == 2 and stdout == ""
    assert err.strip() == f"modpo: error: {message}"
    assert snapshot(tmp_path) == before


def test_front_writes_only_inside_its_output_folder(capsys, tmp_path, monkeypatch, base):
    """A sweep with an extra model named like a path: every file it creates is in output_dir, except the
    extra model's evaluation record, kept beside that model (its own folder); the name is only a label."""
    import shutil

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    extra = tmp_path / "models" / "extra"
    shutil.copytree(base, extra)
    out = tmp_path / "a" / "b" / "front"
    config = front_config(tmp_path, base, out, [[1.0]], extra_models={"../../escape": str(extra)})
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "front", "--config", config)
    assert code == 0, err[-3000:]
    created = snapshot(tmp_path) - before
    cache = tmp_path / "modpo-cache"
    outside = sorted(str(p) for p in created
                     if not (p.is_relative_to(out) or out.is_relative_to(p) or p.is_relative_to(cache)))
    assert outside == []  # the extra model's evaluation is kept in the front's folder, not the model's
    from modpo.front.sweep import extra_model_record

    record = json.loads(extra_model_record(out, extra).read_text())
    assert record["model"] == str(extra)
    assert out.parent.exists() and sorted(p.name for p in out.parent.iterdir()) == ["front"]
    assert list(cwd.iterdir()) == []
    report = json.loads((out / "front.json").read_text())
    assert [p["name"] for p in report["points"]] == ["../../escape", "w1"]
    assert sorted(p.name for p in (out / "points").iterdir()) == ["w1"]
    assert math.isfinite(report["points"][1]["brevity"]["mean"])
