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

# A Jinja chat template the word tokenizer can read: every role marker and every word is one token, and every
# turn ends with <eos>, as real templates end theirs with an end-of-turn token.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)

# Two real chat-template conventions, as their models ship them.
# ChatML (SmolLM2-135M-Instruct): a default system message; every turn ends "<|im_end|>\n"; eos = pad = <|im_end|>.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3: BOS written by the template (and also added by the tokenizer to plain text); turns end with <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
BPE_CORPUS = ("Hello friend, how are you today? I am fine, thank you. Tell me a story about a cat and a dog. "
              "The cat sat on the mat. The dog ran in the park! Write a short poem. Sure, here it is: roses are red.")


def tokenizer(chat: bool = False, words: list[str] | None = None):
    """The word tokenizer over WORDS (<pad>=0, <bos>=1, <eos>=2, <unk>=3), optionally with CHAT_TEMPLATE."""
    tok = word_tokenizer(list(words or WORDS))
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def bpe_tokenizer(convention: str):
    """A byte-level BPE tokenizer trained here on a few sentences, with the special tokens and chat template of
    `convention`: "chatml" (SmolLM2 style) or "llama3" (BOS inside the template, turns end with <|eot_id|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {"chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>", "<|finetune_right_pad_id|>"]}[convention]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator([BPE_CORPUS] * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if convention == "chatml":
        return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                       bos_token="<|im_start|>", chat_template=CHATML_TEMPLATE)
    bos = core.token_to_id("<|begin_of_text|>")
    core.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                        special_tokens=[("<|begin_of_text|>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|finetune_right_pad_id|>", chat_template=LLAMA3_TEMPLATE)


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
