"""`modpo front` with a weight-conditioned model beside the per-weight MODPO front: trained once, evaluated at
every weight vector asked for (more than the front trains), reported as its own method; `modpo generate` steers
it; a rerun trains and samples nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import tiny
from modpo import conditioning
from modpo.cli import main
from modpo.demo import task
from modpo.front.report import hypervolume
from modpo.models import word_tokenizer

WEIGHTS = [[0.2, 0.8], [0.8, 0.2]]
ASKED = [[0.1, 0.9], [0.2, 0.8], [0.5, 0.5], [0.8, 0.2], [0.9, 0.1]]  # the front's two among them
TRAINING = {"use_cpu": True, "report_to": [], "save_strategy": "no", "max_steps": 2, "per_device_train_batch_size": 8,
            "disable_tqdm": True, "seed": 0, "append_eos": False, "max_length": 12, "learning_rate": 1e-2}


@pytest.fixture(scope="module", params=["prefix", "embedding"])
def front(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp(f"conditioned_{request.param}")
    tok = word_tokenizer(task.vocabulary() + conditioning.vocabulary())  # the condition's words are known tokens
    base = tiny.save(tiny.model(len(tok), seed=0), tok, folder / "base")
    data = folder / "helpful.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in task.preference_rows(16, "helpful", seed=1)))
    harmless = {"chosen_harmless": "chosen_harmless", "rejected_harmless": "rejected_harmless"}
    config = {
        "output_dir": str(folder / "report"), "weights": WEIGHTS,
        "train": {"model": base, "train_data": {"loader": "jsonl", "path": str(data), "columns": harmless},
                  "margins": [{"type": "columns", "chosen": ["chosen_harmless"], "rejected": ["rejected_harmless"]}],
                  "training": TRAINING},
        "conditioned": {"weight_sampling": "dirichlet", "max_steps": 3, "conditioning": request.param},
        "conditioned_weights": ASKED,
        "evaluation": {"prompts": task.eval_prompts(4, seed=3), "samples_per_prompt": 2,
                       "max_new_tokens": task.RESPONSE_LENGTH, "min_new_tokens": task.RESPONSE_LENGTH,
                       "temperature": 1.0, "seed": 0, "evaluators": [{"type": "demo_exact"}],
                       "reference_point": [-1.0, -1.0]},  # below every score: no hypervolume is 0
    }
    path = folder / "front.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MODPO_CACHE", str(folder / "cache"))
        assert main(["front", "--config", str(path)]) == 0
    return path, Path(config["output_dir"])


def test_one_conditioned_model_is_evaluated_at_every_weight_asked_for(front):
    _, out = front
    report = json.loads((out / "front.json").read_text())
    methods = [p.get("method") for p in report["points"]]
    assert methods == ["modpo"] * len(WEIGHTS) + ["conditioned"] * len(ASKED)
    conditioned = [p for p in report["points"] if p["method"] == "conditioned"]
    assert [p["weights"] for p in conditioned] == ASKED
    assert (out / "conditioned" / "modpo_run.json").exists() and not (out / "points" / "w0.5_0.5").exists()
    record = json.loads((out / "conditioned" / "modpo_run.json").read_text())
    assert record["conditioning"]["num_objectives"] == 2 and record["conditioning"]["sampling"] == "dirichlet"
    means = [[p[o]["mean"] for o in report["objectives"]] for p in conditioned]
    assert report["methods"]["conditioned"]["hypervolume"] == pytest.approx(hypervolume(means, [-1.0, -1.0]))
    card = (out / "conditioned" / "README.md").read_text()
    assert "weight-conditioned on 2 objectives" in card and "modpo generate" in card
    steering = conditioning.read_record(out / "conditioned")  # what steering reads, as a Python API save writes it
    assert steering == record["conditioning"] and steering["objectives"][0] == "preference"
    assert f"One weight-conditioned model, trained once, at {len(ASKED)} weight vectors" in (out / "front.md").read_text()
    shown = record["conditioning"]["format"]
    assert (out / "conditioned" / "weight_embedding.safetensors").exists() == (shown == "embedding")


def test_the_conditioned_model_against_the_per_weight_models_at_their_weights(front):
    """Its hypervolume at the front's own weights over theirs, and its training tokens over theirs, recomputed."""
    _, out = front
    report = json.loads((out / "front.json").read_text())
    objectives = report["objectives"]
    mean = lambda p: [p[o]["mean"] for o in objectives]
    mine = [mean(p) for p in report["points"] if p["method"] == "conditioned" and p["weights"] in WEIGHTS]
    theirs = [mean(p) for p in report["points"] if p["method"] == "modpo"]
    reference = report["reference_point"]
    tokens = lambda run: sum(json.loads((run / "modpo_run.json").read_text())["token_counts"].values())
    spent = sum(tokens(out / "points" / f"w{a:g}_{b:g}") for a, b in WEIGHTS)
    against = report["methods"]["conditioned"]["against_per_weight"]
    volume, per_weight = hypervolume(mine, reference), hypervolume(theirs, reference)
    assert against["hypervolume"] == pytest.approx(volume) and against["per_weight_hypervolume"] == pytest.approx(per_weight)
    assert against["token_fraction"] == pytest.approx(tokens(out / "conditioned") / spent)
    if per_weight > 0:  # two steps from a random model: most samples are malformed (scored 0) and it may be 0
        assert against["fraction"] == pytest.approx(volume / per_weight)
        assert f"{100 * against['fraction']:.1f}% of the 2 separately trained models'" in (out / "front.md").read_text()
    else:
        assert against["fraction"] is None


def test_the_rerun_trains_and_samples_nothing(front, monkeypatch):
    from modpo.trainer import MODPOTrainer

    path, out = front

    def forbidden(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(MODPOTrainer, "train", forbidden)
    monkeypatch.setenv("MODPO_CACHE", str(out.parent / "cache"))
    before = (out / "front.json").read_text()
    assert main(["front", "--config", str(path)]) == 0
    assert json.loads((out / "front.json").read_text())["points"] == json.loads(before)["points"]


def test_generate_steers_the_conditioned_model_and_refuses_bad_weights(front, capsys):
    _, out = front
    model = str(out / "conditioned")
    assert main(["generate", "--model", model, "--weights", "0.3,0.7", "--max-new-tokens", "4", "topic1"]) == 0
    response = capsys.readouterr().out.strip()
    assert 1 <= len(response.split()) <= 4
    for bad, words in (("0.3,0.3,0.4", "3 entries"), ("0.3,0.6", "sum to 0.9")):
        assert main(["generate", "--model", model, "--weights", bad, "topic1"]) == 2
        assert words in capsys.readouterr().err
    assert main(["generate", "--model", str(out / "points" / "w0.2_0.8"), "--weights", "0.5,0.5", "topic1"]) == 2
    assert "is not weight-conditioned" in capsys.readouterr().err
