"""Shared pieces of the benchmarks: model shapes, a local tokenizer, synthetic preference pairs, FLOP counts.

Everything is built locally (no hub access): a Qwen2 model with random weights in the shape of a real
checkpoint, saved with `save_pretrained` together with a word-level tokenizer whose vocabulary has exactly the
model's size, so both trainers can load the same weights from one folder.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

# Shapes of real checkpoints (random weights). Qwen2.5 uses q/k/v biases, which Qwen2 modelling has built in.
SHAPES: dict[str, dict] = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768),
    # CPU speed comparisons: Qwen2.5's layout (GQA 2:1, biased q/k/v, tied head) at a size 2 cores can train
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=1024, vocab_size=16384, tie_word_embeddings=True, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=4096),
}
SPECIALS = 4  # <pad>, <bos>, <eos>, <unk> = ids 0..3 (modpo.models.word_tokenizer)
JITTER = 0.10


def set_offline_env() -> None:
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                       ("TOKENIZERS_PARALLELISM", "false"), ("TQDM_DISABLE", "1")):
        os.environ.setdefault(key, value)


def qwen2_config(shape: str):
    from transformers import Qwen2Config

    return Qwen2Config(**SHAPES[shape], rope_theta=1_000_000.0, rms_norm_eps=1e-6, use_sliding_window=False,
                       attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_tokenizer(vocab_size: int):
    """Word-level tokenizer over "w0".."w{V-5}" plus 4 specials: exactly `vocab_size` ids."""
    from modpo.models import word_tokenizer

    tokenizer = word_tokenizer([f"w{i}" for i in range(vocab_size - SPECIALS)])
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    return tokenizer


def build_model_dir(shape: str, folder: str | Path, seed: int = 0, save_dtype=None, device: str | None = None) -> Path:
    """Random-weight Qwen2 of `shape` saved in `folder`, its tokenizer in `folder/tokenizer`.

    Reused as is if `folder` already holds this shape, seed and dtype."""
    import torch
    from transformers import Qwen2ForCausalLM

    folder = Path(folder)
    marker = folder / "benchmark_shape.json"
    wanted = {"shape": shape, "seed": seed, "save_dtype": str(save_dtype), "layout": 2}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = qwen2_config(shape)
    torch.manual_seed(seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device(device):  # random init of 1.5B parameters is much faster on the GPU
        model = Qwen2ForCausalLM(config)
    if save_dtype is not None:
        model = model.to(save_dtype)
    model.save_pretrained(folder)
    # The tokenizer goes in a subfolder without config.json: given a folder whose config.json says qwen2,
    # transformers 5's AutoTokenizer builds a Qwen2 BPE tokenizer from the vocab and ignores our WordLevel model.
    build_tokenizer(config.vocab_size).save_pretrained(folder / "tokenizer")
    del model
    marker.write_text(json.dumps(wanted))
    return folder


def synthetic_pairs(n: int, prompt_len: int, response_len: int, vocab_size: int, seed: int = 0,
                    jitter: float = JITTER) -> list[dict]:
    """`n` preference rows of random words; lengths jittered by +-`jitter`, seeded.

    Responses start with a space, so TRL's `prompt + chosen` string concatenation keeps word boundaries; the
    whitespace tokenizer gives the same ids either way. K=2: one margin per side.
    """
    rng = random.Random(seed)
    words = vocab_size - SPECIALS

    def length(base: int) -> int:
        return max(1, round(base * rng.uniform(1 - jitter, 1 + jitter)))

    def text(k: int) -> str:
        return " ".join(f"w{rng.randrange(words)}" for _ in range(k))

    rows = []
    for _ in range(n):
        prompt = text(length(prompt_len))
        chosen = " " + text(length(response_len))
        rejected = " " + text(length(response_len))
        while rejected == chosen:
            rejected = " " + text(length(response_len))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "chosen_margins": [round(rng.uniform(-1, 1), 4)],
                     "rejected_margins": [round(rng.uniform(-1, 1), 4)]})
    return rows


def row_tokens(row: dict, max_length: int) -> int:
    """Non-pad tokens a row contributes to a step: prompt+chosen+eos and prompt+rejected+eos, each cut at max_length."""
    prompt = len(row["prompt"].split())
    return sum(min(prompt + len(row[side].split()) + 1, max_length) for side in ("chosen", "rejected"))


def tokens_per_step(rows: list[dict], pairs: int, max_length: int) -> list[int]:
    return [sum(row_tokens(r, max_length) for r in rows[i : i + pairs]) for i in range(0, len(rows), pairs)]


def max_sequence_length(prompt_len: int, response_len: int, jitter: float = JITTER) -> int:
    return math.ceil(prompt_len * (1 + jitter)) + math.ceil(response_len * (1 + jitter)) + 2


def flops_params(model) -> dict:
    """N for the 6N (train) / 2N (forward) FLOPs-per-token rule: non-embedding parameters + LM head parameters."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    seen, body = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p is not embed and p is not head:
            body += p.numel()
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"params_total": total, "params_non_embedding": body, "params_lm_head": head.numel(),
            "n_flops_params": body + head.numel(), "tied_embeddings": head is embed}


def write_json_atomic(path: str | Path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def device_info() -> dict:
    import platform

    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    for name in ("transformers", "trl", "datasets", "accelerate", "modpo"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001 - optional packages
            info[name] = None
    return info


def fmt(value, spec: str = ".3g", na: str = "n/a") -> str:
    if value is None:
        return na
    if isinstance(value, str):
        return value
    return format(value, spec)


def check_tokenizer(tokenizer, rows: list[dict]) -> None:
    """Every synthetic word must be one known token, so token counts can be recomputed from the text."""
    row = rows[0]
    for field in ("prompt", "chosen"):
        ids = tokenizer(row[field], add_special_tokens=False)["input_ids"]
        if len(ids) != len(row[field].split()) or tokenizer.unk_token_id in ids:
            raise RuntimeError(f"tokenizer {type(tokenizer).__name__} does not map the synthetic words one to one "
                               f"({len(row[field].split())} words -> {len(ids)} ids)")
