"""Small builders shared by the unit tests: a word tokenizer, a tiny Llama and a few preference rows.

Everything is built locally from scratch (no hub access), small enough to run in milliseconds on CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import yaml

from modpo.models import tiny_causal_lm, word_tokenizer

PROMPT_WORDS = ["p0", "p1", "p2", "p3"]
RESPONSE_WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"]
ROLE_WORDS = ["<user>", "<assistant>", "<system>"]
WORDS = PROMPT_WORDS + RESPONSE_WORDS + ROLE_WORDS

# A Jinja chat template the word tokenizer can read: every role marker and every word is one token.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def tokenizer(chat: bool = False, words: list[str] | None = None):
    """The word tokenizer over WORDS (<pad>=0, <bos>=1, <eos>=2, <unk>=3), optionally with CHAT_TEMPLATE."""
    tok = word_tokenizer(list(words or WORDS))
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def model(vocab_size: int, seed: int = 0, hidden_size: int = 32, layers: int = 1, heads: int = 2, **kwargs):
    """A tiny randomly initialised Llama causal LM (or classifier with num_labels=...)."""
    return tiny_causal_lm(vocab_size, hidden_size=hidden_size, layers=layers, heads=heads, seed=seed, **kwargs)


def perturbed(reference: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """A copy of `reference` with every parameter moved by seeded Gaussian noise: a policy that differs from it."""
    import copy

    out = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return out


def rows(n: int, seed: int = 0, num_margins: int = 0, max_words: int = 4) -> list[dict]:
    """`n` text preference rows over WORDS with responses of 1..max_words words (and K-1 margin columns)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(1, 3)))
        chosen = " ".join(rng.choice(RESPONSE_WORDS) for _ in range(rng.randint(1, max_words)))
        rejected = chosen
        while rejected == chosen:
            rejected = " ".join(rng.choice(RESPONSE_WORDS) for _ in range(rng.randint(1, max_words)))
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if num_margins:
            row["chosen_margins"] = [round(rng.uniform(-1, 1), 3) for _ in range(num_margins)]
            row["rejected_margins"] = [round(rng.uniform(-1, 1), 3) for _ in range(num_margins)]
        out.append(row)
    return out


def save(model_, tok, path) -> str:
    """save_pretrained model and tokenizer into `path`; returns the path as str."""
    model_.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


def write_jsonl(path: Path, rows: list) -> str:
    """Rows as JSONL (a str row is written as the raw line); returns the path as str."""
    Path(path).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_yaml(path: Path, config: dict) -> str:
    Path(path).write_text(yaml.safe_dump(config))
    return str(path)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`modpo ARGV` in-process: (exit code, stdout, stderr)."""
    from modpo.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def spy_placement(model, events: list, label: str):
    """Record the model's `.to(device)` calls (without moving it: the device asked for need not exist here)
    and its forward passes, in order."""
    def to(*args, **kwargs):
        events.append((label, "to", str(torch.device(args[0] if args else kwargs["device"]))))
        return model

    model.to = to
    model.register_forward_pre_hook(lambda module, args: events.append((label, "forward", None)))
    return model


def placement_of(events: list, label: str) -> list:
    """The model's events with runs of forward passes collapsed: e.g. [to cuda:1, forward, to cpu]."""
    out = []
    for _, what, device in [e for e in events if e[0] == label]:
        step = f"to {device}" if what == "to" else "forward"
        if not (out and step == out[-1] == "forward"):
            out.append(step)
    return out


def with_forward(transform, seed=4):
    """A tiny Llama (same weights for the same seed) whose forward passes its logits through `transform`;
    its config declares nothing unusual, so `output_head`'s list cannot tell."""
    from transformers import LlamaForCausalLM

    base = model(len(tokenizer()), seed=seed)

    class Transformed(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = transform(out.logits)
            return out

    Transformed.__name__ = "".join(part.capitalize() for part in transform.__name__.split("_"))  # e.g. SoftCapped
    out = Transformed(base.config)
    out.load_state_dict(base.state_dict())
    return out.eval()


def soft_capped(logits):
    """A soft cap (as Gemma's): not linear, so applying it to hidden states instead of logits changes the result."""
    return 2.0 * torch.tanh(logits / 2.0)


def doubled(logits):
    """A plain multiplier (as FalconH1's lm_head_multiplier): commutes with the LM head."""
    return 2.0 * logits
