"""Distributed training: the accelerate configs, DDP on two CPU processes against one process, and the
trainer's choices under sharding (chunked LM head, mixed precision of the precompute).

The DDP test launches `accelerate launch --config_file configs/accelerate/cpu_2proc.yaml` (two processes,
gloo) and compares it with one process at the same global batch: same rows per step, same mean loss, same
metrics, same final weights.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch
from datasets import Dataset

from modpo import MODPOConfig, MODPOTrainer
from modpo.logps import batched_sequence_logps
from modpo.precompute import precompute_autocast_dtype
from modpo.resolved import chunked_logps_conflict

import tiny

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
TESTS = Path(__file__).resolve().parent

# file -> (distributed_type, mixed_precision, num_machines)
EXPECTED = {
    "ddp.yaml": ("MULTI_GPU", "bf16", 1),
    "deepspeed_zero2.yaml": ("DEEPSPEED", "bf16", 1),
    "deepspeed_zero3.yaml": ("DEEPSPEED", "bf16", 1),
    "fsdp2.yaml": ("FSDP", "bf16", 1),
    "multi_node_ddp.yaml": ("MULTI_GPU", "bf16", 2),
    "cpu_2proc.yaml": ("MULTI_GPU", "no", 1),
}


def config(tmp_path, **kwargs) -> MODPOConfig:
    settings = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no", seed=0,
                    max_length=32, per_device_train_batch_size=4, max_steps=1, lr_scheduler_type="constant",
                    disable_tqdm=True, logging_steps=1, train_sampling_strategy="sequential")
    settings.update(kwargs)
    return MODPOConfig(**settings)


def untied_model(vocab_size: int, seed: int = 0):
    """A tiny Llama whose LM head is its own weight (as in most large models), not the input embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        tie_word_embeddings=False))


# ------------------------------------------------------------------------------------------ accelerate configs

def test_every_config_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_config_loads_and_launches(name, monkeypatch):
    """Each file loads with accelerate's config classes, passes `accelerate launch`'s checks, and the
    environment launch would give the processes builds the DeepSpeed / FSDP plugin the file describes."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = CONFIGS / name
    loaded = load_config_from_file(str(path))
    assert isinstance(loaded, ClusterConfig)
    distributed_type, mixed_precision, machines = EXPECTED[name]
    assert loaded.distributed_type.value == distributed_type
    assert loaded.mixed_precision == mixed_precision and loaded.num_machines == machines
    assert loaded.num_processes >= 2 * machines
    # Nested keys are not checked by the config classes: each must be an `accelerate launch` option.
    parser = launch_command_parser()
    options = {action.dest for action in parser._actions}
    unknown = [key for key in [*loaded.deepspeed_config, *loaded.fsdp_config] if key not in options]
    assert not unknown, f"{name}: keys accelerate launch does not know: {unknown}"

    launch = parser.parse_args(["--config_file", str(path), "-m", "modpo.cli", "train"])
    args, defaults, _ = _validate_launch_command(launch)
    args.main_process_port = 0  # a free one: the check must not depend on what runs on this machine
    if distributed_type == "DEEPSPEED":
        args.deepspeed_fields_from_accelerate_config = ",".join([*defaults.deepspeed_config, "mixed_precision"])
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    assert args.num_processes == loaded.num_processes
    with mock.patch.dict(os.environ, env):
        if distributed_type == "DEEPSPEED":
            plugin = DeepSpeedPlugin()
            stage = 3 if "zero3" in name else 2
            assert plugin.zero_stage == stage and plugin.hf_ds_config.is_zero3() == (stage == 3)
            # Left to the training config, so DeepSpeed never refuses a mismatch with TrainingArguments.
            assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
            assert plugin.zero3_init_flag is False
        elif distributed_type == "FSDP":
            plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2 and plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
            assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
            assert plugin.cpu_ram_efficient_loading is False  # every rank needs real weights for the precompute
        else:
            assert env.get("ACCELERATE_USE_FSDP") is None and env["ACCELERATE_MIXED_PRECISION"] == mixed_precision
    if name == "multi_node_ddp.yaml":
        assert loaded.main_process_ip and loaded.main_process_port and args.nnodes == "2"
        assert args.nproc_per_node == str(loaded.num_processes // 2)
    if name == "cpu_2proc.yaml":
        assert loaded.use_cpu and args.nproc_per_node == "2"


# ------------------------------------------------------------------------------------- chunked head decision

def test_chunked_logps_conflict_decision():
    tok = tiny.tokenizer()
    tied, untied = tiny.model(len(tok)), untied_model(len(tok))
    for model in (tied, untied):
        assert chunked_logps_conflict(model) is None
        assert "ZeRO-3" in chunked_logps_conflict(model, zero3=True)
        assert "FSDP" in chunked_logps_conflict(model, fsdp=True)
    # DDP looking for unused parameters: only an untied, trainable head is used outside forward's graph.
    assert chunked_logps_conflict(tied, ddp_find_unused=True) is None
    assert "ddp_find_unused_parameters" in chunked_logps_conflict(untied, ddp_find_unused=True)

    class Wrapper(torch.nn.Module):  # DDP-style: the model is `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert chunked_logps_conflict(Wrapper(untied), ddp_find_unused=True) is not None
    frozen = copy.deepcopy(untied)
    frozen.lm_head.weight.requires_grad_(False)  # e.g. LoRA: the head is not trained
    assert chunked_logps_conflict(frozen, ddp_find_unused=True) is None


def test_trainer_turns_chunked_logps_off_under_sharding(tmp_path, caplog):
    tok = tiny.tokenizer()
    data = Dataset.from_list(tiny.rows(4, seed=1))
    trainer = MODPOTrainer(untied_model(len(tok)), args=config(tmp_path), train_dataset=data, processing_class=tok)
    assert trainer.args.chunked_logps is True
    # DDP default: find_unused_parameters off, so the untied head's gradient arrives once and is all-reduced.
    assert trainer.args.ddp_find_unused_parameters is False
    trainer.is_fsdp_enabled = True  # as under `accelerate launch --config_file configs/accelerate/fsdp2.yaml`
    with caplog.at_level(logging.WARNING, logger="modpo.trainer"):
        trainer._check_chunked_logps()
    assert trainer.args.chunked_logps is False
    assert "chunked_logps turned off" in caplog.text and "FSDP" in caplog.text

    explicit = MODPOTrainer(untied_model(len(tok)), args=config(tmp_path, ddp_find_unused_parameters=True),
                            train_dataset=data, processing_class=tok)
    assert explicit.args.ddp_find_unused_parameters is True  # a user's choice is kept
    assert explicit.args.chunked_logps is True  # one process: no DDP wrapper, nothing to turn off


# ------------------------------------------------------------------------------ ZeRO-3: models load whole

class ZeRO3Registered:
    """What transformers finds registered once training arguments for a ZeRO-3 config exist (an HfDeepSpeedConfig):
    from then on `from_pretrained` builds models already partitioned over the processes (deepspeed.zero.Init)."""

    config = {"zero_optimization": {"stage": 3}}

    def is_zero3(self) -> bool:
        return True


class Captured(Exception):
    pass


def test_models_for_the_precompute_load_whole_under_zero3(tmp_path, monkeypatch):
    """`modpo train` under a ZeRO-3 config: the policy, reference and margin models it precomputes with load
    whole (a plain forward pass and a weights fingerprint need every weight), and the ZeRO-3 config stays
    registered for the engine that partitions the policy when training starts."""
    from transformers.integrations import deepspeed as hf_deepspeed

    from modpo.models import load_model
    from modpo.run_config import StageConfig
    from modpo.stages import run_preference

    tok = tiny.tokenizer()
    base = tiny.save(tiny.model(len(tok), seed=0), tok, tmp_path / "base")
    dpo = tiny.save(tiny.model(len(tok), seed=1), tok, tmp_path / "dpo")
    data = tiny.write_jsonl(tmp_path / "pairs.jsonl", tiny.rows(4, seed=1))
    config = StageConfig(model=base, ref_model=base, output_dir=str(tmp_path / "out"), train_data=data,
                         margins=[{"type": "implicit_reward", "model": dpo, "ref_model": base}],
                         training={"use_cpu": True, "report_to": [], "weights": [0.5, 0.5]})
    seen = {}

    def capture(self, model, ref_model=None, margin_rewards=None, **kwargs):
        seen.update(policy=model, reference=ref_model, margin_model=margin_rewards[0].model,
                    margin_reference=margin_rewards[0].ref_model, zero3_after_loading=hf_deepspeed.is_deepspeed_zero3_enabled())
        raise Captured

    monkeypatch.setattr(MODPOTrainer, "__init__", capture)
    registered = ZeRO3Registered()
    hf_deepspeed.set_hf_deepspeed_config(registered)
    try:
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
        try:
            import deepspeed  # noqa: F401
        except ImportError:  # control: a plain load now asks for DeepSpeed's partitioning
            with pytest.raises(ImportError, match="deepspeed"):
                load_model(base)
        with pytest.raises(Captured):
            run_preference(config)
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()
    expected = {name: p for name, p in tiny.model(len(tok), seed=0).state_dict().items()}
    for role in ("policy", "reference", "margin_reference"):
        assert seen[role].state_dict().keys() == expected.keys(), role
        for name, value in seen[role].state_dict().items():
            assert torch.equal(value, expected[name]), (role, name)
    assert not torch.equal(seen["margin_model"].model.embed_tokens.weight, expected["model.embed_tokens.weight"])
    assert seen["zero3_after_loading"] is True


# ------------------------------------------------------------------------- mixed precision of the precompute

@pytest.mark.parametrize("source", ["accelerate", "bf16_flag"])
def test_precompute_uses_the_training_precision(tmp_path, monkeypatch, source):
    """At step 0 the policy is the reference, so the rewards are 0 when the precompute used the numerics of
    training, also when bf16 comes from `accelerate launch` (its config's mixed_precision): exactly 0 where the bf16
    kernels round alike at every batch shape, and on CPUs whose kernels round by shape (the precompute batches rows
    by length, training in data order) below the mean beta * |bf16 - fp32| gap an fp32 precompute would leave."""
    if source == "accelerate":
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    tok = tiny.tokenizer()
    data = Dataset.from_list(tiny.rows(8, seed=3))
    args = config(tmp_path, per_device_train_batch_size=8, bf16=source == "bf16_flag")
    assert args.mixed_precision == "bf16" and precompute_autocast_dtype(args) is torch.bfloat16
    trainer = MODPOTrainer(untied_model(len(tok)), args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    first = trainer.state.log_history[0]
    rows = trainer.train_dataset
    fp32 = batched_sequence_logps(untied_model(len(tok)), rows["prompt_ids"], rows["chosen_ids"], tok.pad_token_id)
    gap = args.beta * (torch.tensor(rows["ref_chosen_logps"]) - fp32).abs().mean().item()
    assert gap > 0 and abs(first["rewards/chosen"]) < gap and abs(first["rewards/rejected"]) < gap, (first, gap)
    # The precision is part of the cache key: an fp32 run does not reuse the bf16 entry.
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    fp32 = config(tmp_path, per_device_train_batch_size=8)
    assert precompute_autocast_dtype(fp32) is None
    MODPOTrainer(untied_model(len(tok)), args=fp32, train_dataset=data, processing_class=tok)
    assert len(list((tmp_path / "modpo-cache" / "reference_logps").iterdir())) == 2


# --------------------------------------------------------------------------- DDP on two CPU processes vs one

SCRIPT = textwrap.dedent('''
    """MODPO, K=2 (margin columns), on a tiny untied Llama: one process (batch 4) or DDP ranks (batch 2 each)."""
    import json, os, sys

    import torch
    from datasets import Dataset
    from safetensors.torch import save_file

    from modpo import MODPOConfig, MODPOTrainer
    from modpo import precompute as trainer_module  # where the reference precompute scores
    import test_distributed, tiny

    out, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rank = int(os.environ.get("RANK", "0"))
    calls = []
    original = trainer_module.batched_sequence_logps
    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return original(*args, **kwargs)
    trainer_module.batched_sequence_logps = counting

    tok = tiny.tokenizer()
    model = test_distributed.untied_model(len(tok), seed=0)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    data = Dataset.from_list(tiny.rows(4 * steps, seed=3, num_margins=1))
    records = []

    class Recording(MODPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            records.append({"step": self.state.global_step, "loss": loss.item(), "rows": inputs["row_index"].tolist()})
            return loss

    args = MODPOConfig(output_dir=os.path.join(out, "trainer"), report_to=[], use_cpu=True, save_strategy="no",
                       seed=0, weights=[0.6, 0.4], beta=0.5, max_length=32, per_device_train_batch_size=batch,
                       max_steps=steps, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
                       weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, dataloader_drop_last=True,
                       train_sampling_strategy="sequential", disable_tqdm=True)
    trainer = Recording(model, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    weights = {k: v.detach().contiguous().clone() for k, v in trainer.model.state_dict().items()}
    save_file(weights, os.path.join(out, f"weights_rank{rank}.safetensors"))
    moved = max((weights[k] - initial[k]).abs().max().item() for k in weights)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world_size": args.world_size, "records": records, "log_history": trainer.state.log_history,
                   "precompute_calls": calls, "token_counts": trainer.token_counts, "moved": moved,
                   "chunked_logps": trainer.args.chunked_logps,
                   "find_unused": trainer.args.ddp_find_unused_parameters}, f)
''')


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_both(tmp_path, source: str, ddp_args: list[str], single_args: list[str]) -> dict[str, Path]:
    """Run the script `source` with two DDP CPU processes and with one process, at once; their output folders."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    script = tmp_path / "script.py"
    script.write_text(source)
    base_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        base_env.pop(key, None)
    runs = {}
    for name, args, command in [
        ("ddp", ddp_args, [sys.executable, "-m", "accelerate.commands.launch",
                           "--config_file", str(CONFIGS / "cpu_2proc.yaml"), "--main_process_port", str(free_port())]),
        ("single", single_args, [sys.executable]),
    ]:
        out = tmp_path / name
        out.mkdir()
        env = {**base_env, "MODPO_CACHE": str(tmp_path / f"cache_{name}")}
        log = open(tmp_path / f"{name}.log", "w")
        runs[name] = (subprocess.Popen([*command, str(script), str(out), *args], cwd=ROOT, env=env,
                                       stdout=log, stderr=subprocess.STDOUT), log, out)
    for name, (process, log, _) in runs.items():
        try:
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
            log.close()
        assert process.returncode == 0, f"{name} run failed:\n" + (tmp_path / f"{name}.log").read_text()[-6000:]
    return {name: out for name, (_, _, out) in runs.items()}


def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    from safetensors.torch import load_file

    steps = 4
    outs = launch_both(tmp_path, SCRIPT, ["2", str(steps)], ["4", str(steps)])

    single = json.loads((outs["single"] / "rank0.json").read_text())
    ranks = [json.loads((outs["ddp"] / f"rank{r}.json").read_text()) for r in range(2)]
    assert single["world_size"] == 1 and [r["world_size"] for r in ranks] == [2, 2]

    # Each rank precomputed its shard of the rows; one cache entry was written.
    for rank in ranks:
        assert sorted(rank["precompute_calls"]) == ["reference log-probs (chosen)", "reference log-probs (rejected)"]
    assert len(list((tmp_path / "cache_ddp" / "reference_logps").iterdir())) == 1
    # The chunked head stays on under DDP (find_unused_parameters defaults to off for it).
    assert all(r["chunked_logps"] is True and r["find_unused"] is False for r in ranks)

    # Same rows per optimizer step: the ranks split the one-process batch between them.
    assert [r["step"] for r in single["records"]] == list(range(steps))
    for step in range(steps):
        whole = single["records"][step]
        halves = [r["records"][step] for r in ranks]
        assert all(h["step"] == step for h in halves)
        assert sorted(halves[0]["rows"] + halves[1]["rows"]) == sorted(whole["rows"])
        assert not set(halves[0]["rows"]) & set(halves[1]["rows"])
        # Loss per step averaged over the ranks is the one-process loss (the loss is a mean over pairs).
        assert (halves[0]["loss"] + halves[1]["loss"]) / 2 == pytest.approx(whole["loss"], abs=1e-5)

    # Logged curves: Trainer gathers the loss; MODPO's metrics are averaged over the ranks.
    def curve(history, key):
        return [entry[key] for entry in history if key in entry and "train_runtime" not in entry]

    metrics = ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "margins/objective_1")
    for key in metrics:
        expected = curve(single["log_history"], key)
        assert len(expected) == steps, key
        for rank in ranks:
            assert curve(rank["log_history"], key) == pytest.approx(expected, abs=1e-5), key
    assert len(set(curve(single["log_history"], "loss"))) > 1  # the loss moved: training did something

    # Token counts of the whole run, summed over the ranks, equal the one-process counts.
    assert ranks[0]["token_counts"] == ranks[1]["token_counts"] == single["token_counts"]

    # Final weights: identical on both ranks, and equal to the one-process weights.
    reference = load_file(str(outs["single"] / "weights_rank0.safetensors"))
    per_rank = [load_file(str(outs["ddp"] / f"weights_rank{r}.safetensors")) for r in range(2)]
    assert single["moved"] > 1e-2
    # Equal up to the order of float sums (gloo's all-reduce against one process's batch): within 0.5% of how far
    # training moved the weights.
    tolerance = 5e-3 * single["moved"]
    for name, tensor in reference.items():
        assert torch.equal(per_rank[0][name], per_rank[1][name]), name
        assert torch.allclose(per_rank[0][name], tensor, atol=tolerance, rtol=0), \
            f"{name}: max difference {(per_rank[0][name] - tensor).abs().max().item():.3g} (tolerance {tolerance:.3g})"
