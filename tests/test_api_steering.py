"""A weight-conditioned model trained through the Python API (`MODPOTrainer` + `save_model`, no `modpo train`, no
run record) carries what steering needs: its folder's conditioning record (K, format, objective names, c(w)'s
files), so `steer()` and `modpo generate` sample from it exactly as from the trained policy in memory, in both
formats; the same record as a `modpo train` folder's."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

import tiny
from modpo import MODPOConfig, MODPOTrainer, conditioning
from modpo.cli import main
from modpo.conditioning import RECORD_FILE, check_request, read_record
from modpo.demo import task
from modpo.front.generate import SamplingSettings, sample_responses
from modpo.front.steer import SteeredModel, shown, steer
from modpo.margins import ColumnMargins
from modpo.models import word_tokenizer
from modpo.run_records import RUN_FILE

PROMPTS = ["topic0", "topic1", "topic2"]
GREEDY = SamplingSettings(max_new_tokens=4, temperature=0.0, seed=0, batch_size=8)


@pytest.fixture(scope="module", params=["prefix", "embedding"])
def saved(tmp_path_factory, request):
    """A conditioned model trained a few steps on the demo's preference rows, saved by `trainer.save_model` only."""
    folder = tmp_path_factory.mktemp(f"api_{request.param}")
    tok = word_tokenizer(task.vocabulary() + conditioning.vocabulary())
    model = tiny.model(len(tok), seed=0)
    args = MODPOConfig(output_dir=str(folder / "run"), weights=[0.5, 0.5], weight_sampling="dirichlet",
                       conditioning=request.param, max_steps=6, per_device_train_batch_size=8, learning_rate=5e-2,
                       report_to=[], save_strategy="no", use_cpu=True, seed=0, max_length=12, append_eos=False,
                       cache_dir=str(folder / "cache"), disable_tqdm=True)
    margins = ColumnMargins(["chosen_harmless"], ["rejected_harmless"], name="harmless")
    trainer = MODPOTrainer(model, args=args, train_dataset=Dataset.from_list(task.preference_rows(32, "helpful", 1)),
                           processing_class=tok, margin_rewards=[margins])
    trainer.train()
    trainer.save_model(str(folder / "model"))
    return folder / "model", trainer


def test_the_saved_folder_says_how_to_steer_it(saved):
    model_dir, trainer = saved
    assert not (model_dir / RUN_FILE).exists()  # no run record: the model folder alone must do
    record = read_record(model_dir)
    assert record == json.loads(json.dumps(trainer.conditioning_record()))
    assert record["num_objectives"] == 2 and record["objectives"] == ["preference", "harmless"]
    assert record["format"] == trainer.args.conditioning
    if record["format"] == "embedding":
        assert all((model_dir / name).exists() for name in record["weight_embedding"])
    else:
        assert "weight_embedding" not in record


@pytest.mark.parametrize("weights", [[0.1, 0.9], [0.5, 0.5], [0.9, 0.1]])
def test_steer_samples_the_saved_folder_as_the_policy_in_memory(saved, weights):
    model_dir, trainer = saved
    policy = trainer.model.cpu()
    grid = check_request(weights, 2)
    with shown(policy, trainer.processing_class, grid, trainer.weight_embedding) as prefix:
        expected = sample_responses(policy, trainer.processing_class, PROMPTS, GREEDY, prefix=prefix)
    steered = steer(model_dir, PROMPTS, weights, GREEDY)
    assert [s["response"] for s in steered] == [s["response"] for s in expected]
    assert all(s["weights"] == grid for s in steered)


def test_the_weights_change_what_the_saved_model_says(saved):
    model_dir, _ = saved
    model = SteeredModel(model_dir)  # loaded once, steered per call
    prompts = PROMPTS * 4
    settings = SamplingSettings(max_new_tokens=4, temperature=1.0, seed=0, batch_size=16)
    low, high = (model.generate(prompts, w, settings) for w in ([0.05, 0.95], [0.95, 0.05]))
    assert [s["response"] for s in low] != [s["response"] for s in high]


def test_generate_on_the_saved_folder_prints_what_steer_gives(saved, capsys):
    model_dir, _ = saved
    (expected,) = steer(model_dir, ["topic1"], [0.3, 0.7], SamplingSettings(max_new_tokens=4, temperature=0.7,
                                                                         top_p=0.9, seed=0, batch_size=1))
    assert main(["generate", "--model", str(model_dir), "--weights", "0.3,0.7", "--max-new-tokens", "4",
                 "topic1"]) == 0
    assert capsys.readouterr().out.strip() == expected["response"].strip()
    assert main(["generate", "--model", str(model_dir), "--weights", "0.3,0.3,0.4", "topic1"]) == 2
    assert "3 entries" in capsys.readouterr().err


def test_an_unreadable_record_is_one_line_naming_the_file(saved, tmp_path, capsys):
    model_dir, _ = saved
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / RECORD_FILE).write_text('{"format": "sideways", "num_objectives": 2}')
    assert main(["generate", "--model", str(broken), "--weights", "0.5,0.5", "topic1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and RECORD_FILE in err and "format" in err
