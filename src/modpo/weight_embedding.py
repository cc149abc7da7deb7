"""Learned weight conditioning: the policy sees w as a vector added to every input embedding.

    e'_t = e_t + c(w),    c(w) = s W_2 tanh(W_1 w + b_1),    W_2 = 0 at the start,    s = rms(E) / sqrt(width)

Because W_2 starts at zero, the conditioned policy starts as the reference for every w: pi(y | x, w) = pi_ref(y | x)
at step 0, as MODPO's derivation assumes. s puts c(w) on the scale of the token embeddings E (rms(E) is the
root-mean-square of their entries): Adam moves every entry of W_2 by about the learning rate per step whatever its
scale, and without s a few hundred steps made c(w) hundreds of times larger than the 0.02-scale embeddings of a
freshly initialised model, which then could no longer tell its tokens apart. (The prompt-prefix conditioning of `modpo.conditioning` shows the policy
tokens the reference never saw, so its starting point differs from pi_ref by a different amount for every w.)

c(w) is added through a forward hook on the model's input embeddings (`applied`), so any transformers causal LM,
with or without LoRA, takes it without changes to its code; `token_weights` gives every token of a training layout
its pair's w (padded rows, packed rows, prefix sharing). It is saved beside the model as
`weight_embedding.safetensors` + `weight_embedding.json`.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS_FILE = "weight_embedding.safetensors"
CONFIG_FILE = "weight_embedding.json"
ATTRIBUTE = "modpo_weight_embedding"  # the submodule's name on the policy while it trains


class WeightEmbedding(torch.nn.Module):
    """c(w): (..., K) weights -> (..., hidden) offsets of the input embeddings; zero for every w at the start."""

    def __init__(self, num_objectives: int, hidden_size: int, scale: float, width: int = 64, seed: int = 0):
        super().__init__()
        self.config = {"num_objectives": num_objectives, "hidden_size": hidden_size, "scale": scale, "width": width}
        self.scale = scale
        generator = torch.Generator().manual_seed(seed)
        self.inner = torch.nn.Linear(num_objectives, width)
        self.outer = torch.nn.Linear(width, hidden_size, bias=False)
        with torch.no_grad():
            self.inner.weight.copy_(torch.randn(width, num_objectives, generator=generator))
            self.inner.bias.copy_(torch.randn(width, generator=generator))
            self.outer.weight.zero_()

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        return self.scale * self.outer(torch.tanh(self.inner(weights)))

    @classmethod
    def for_model(cls, model: torch.nn.Module, num_objectives: int, width: int = 64, seed: int = 0) -> "WeightEmbedding":
        """c(w) for `model`: its hidden size, on the scale of its input embeddings."""
        table = model.get_input_embeddings().weight
        rms = table.detach().float().pow(2).mean().sqrt().item()
        return cls(num_objectives, table.shape[1], rms / math.sqrt(width), width, seed)

    def save(self, folder: str | Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(Path(folder) / WEIGHTS_FILE))
        (Path(folder) / CONFIG_FILE).write_text(json.dumps(self.config) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "WeightEmbedding":
        embedding = cls(**json.loads((Path(folder) / CONFIG_FILE).read_text()))
        embedding.load_state_dict(load_file(str(Path(folder) / WEIGHTS_FILE)))
        return embedding


def saved_in(folder: str | Path) -> bool:
    return (Path(folder) / WEIGHTS_FILE).exists()


@contextlib.contextmanager
def applied(embeddings: torch.nn.Module, embedding: WeightEmbedding, weights: torch.Tensor):
    """Within the block, `embeddings` (the model's input embedding layer) returns e + c(w). `weights` broadcasts
    against its output's leading dimensions: (rows, tokens, K) per token, or (rows or 1, 1, K) per row."""

    def add(module, args, output):
        return output + embedding(weights.to(device=output.device, dtype=embedding.inner.weight.dtype)).to(output.dtype)

    handle = embeddings.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


def token_weights(layout: dict[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Each token's pair weights for a layout of `modpo.batch.concatenated_inputs` (sequences 0..B-1 chosen,
    B..2B-1 rejected; B = len(weights)): (2B, 1, K) for padded rows, (1, T, K) for packed ones (a length filler
    gets pair 0's, it is never scored)."""
    pairs = weights.shape[0]
    if "sequence_index" in layout:
        return weights[layout["sequence_index"].clamp(max=2 * pairs - 1) % pairs]
    return weights.repeat(2, 1)[:, None, :]


@contextlib.contextmanager
def detached(model: torch.nn.Module):
    """The model without its training-time weight embedding submodule (so that saving it saves the model only)."""
    embedding = model._modules.pop(ATTRIBUTE, None)
    try:
        yield embedding
    finally:
        if embedding is not None:
            model.add_module(ATTRIBUTE, embedding)
