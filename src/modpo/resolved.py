"""What the trainer's start-up checks decided, in one record: the settings it trains with where they differ
from what was asked, and why.

The user's `MODPOConfig` is never changed. The trainer runs with a copy that carries these decisions
(`ResolvedSettings.applied_to`); the run record holds them (`record`) and the model card names the ones that
change the model's numerics (`card_lines`).
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from modpo.logps import output_head


def chunked_logps_conflict(model: torch.nn.Module, zero3: bool = False, fsdp: bool = False,
                            ddp_find_unused: bool = False) -> str | None:
    """Why the chunked LM head cannot run in this setup, or None where it can.

    The chunked head applies the LM head's weight outside the model's forward (`logps.sequence_logps`).
    DeepSpeed ZeRO-3 and FSDP shard that weight and gather it only inside forward. DDP that searches for
    unused parameters marks an untied head unused (its output is not reached from forward's) and then fails
    when the head's gradient arrives. A head tied to the input embeddings is used inside forward: no conflict.
    """
    if zero3:
        return "DeepSpeed ZeRO-3 shards the LM head weight and gathers it only inside the model's forward"
    if fsdp:
        return "FSDP shards the LM head weight and gathers it only inside the model's forward"
    if ddp_find_unused:
        head = output_head(model)
        inner = getattr(model, "module", model)
        embeddings = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
        tied = head is not None and getattr(embeddings, "weight", None) is head.weight
        if head is not None and head.weight.requires_grad and not tied:
            return ("DDP with ddp_find_unused_parameters=True marks the untied LM head unused, as the chunked head "
                    "applies it outside the model's forward")
    return None


@dataclasses.dataclass(frozen=True)
class ResolvedSettings:
    """The training settings the start-up checks fixed, each with the reason where it departs from the config."""

    chunked_logps: bool
    ddp_find_unused_parameters: bool | None
    reasons: tuple[tuple[str, str], ...] = ()  # (setting, why it is what it is)

    @classmethod
    def from_config(cls, args, chunked_head_agrees: bool) -> ResolvedSettings:
        """`chunked_head_agrees`: whether the chunked head reproduced the model's full logits on the first rows."""
        reasons = []
        chunked = bool(args.chunked_logps)
        if chunked and not chunked_head_agrees:
            chunked = False
            reasons.append(("chunked_logps", "the chunked LM head did not reproduce the model's full logits"))
        find_unused = args.ddp_find_unused_parameters
        if chunked and find_unused is None:
            # Transformers' DDP default (True without gradient checkpointing) breaks the chunked head of an untied
            # LM head (see chunked_logps_conflict); every trainable parameter of a causal LM is used.
            find_unused = False
            reasons.append(("ddp_find_unused_parameters", "every parameter of a causal LM is used; the chunked "
                                                           "head needs DDP not to search for unused ones"))
        return cls(chunked, find_unused, tuple(reasons))

    def without_chunked_logps(self, reason: str) -> ResolvedSettings:
        return dataclasses.replace(self, chunked_logps=False, reasons=self.reasons + (("chunked_logps", reason),))

    def applied_to(self, args):
        """A copy of `args` with these settings: what the Trainer runs with. `args` itself is left as it was."""
        resolved = copy.copy(args)
        resolved.chunked_logps = self.chunked_logps
        resolved.ddp_find_unused_parameters = self.ddp_find_unused_parameters
        return resolved

    def record(self) -> dict:
        return {"chunked_logps": self.chunked_logps, "ddp_find_unused_parameters": self.ddp_find_unused_parameters,
                "reasons": {setting: why for setting, why in self.reasons}}


def card_lines(record: dict) -> list[str]:
    """Model-card lines for the settings a check changed (from `ResolvedSettings.record`). DDP's unused-parameter
    search is left out: it changes how the run is distributed, not what the model is."""
    return [f"- {setting} = {record[setting]} (resolved at start-up: {why})"
            for setting, why in record["reasons"].items() if setting == "chunked_logps"]
