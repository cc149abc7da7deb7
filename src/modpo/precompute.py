"""Everything computed once before training: token ids, reference log-probs and margin rewards (cached by
content), and the start-up checks that score the first rows two ways (chunked head, packed layouts).

`precompute_columns` is one batch's history before the trainer sees it: rows checked and encoded
(`data.formats`, `data.encode`), margins from their sources (`margins`) measured and scaled (`margin_scale`),
reference log-probs of the model `reference.reference_for` picks, each process scoring its shard
(`distributed_precompute`).
"""

from __future__ import annotations

from contextlib import nullcontext

import logging

import torch

from modpo.batch import concatenated_inputs, to_device
from modpo.cache import columns_fingerprint
from modpo.config import MODPOConfig
from modpo.data.formats import tokenize_preferences
from modpo.distributed_precompute import sharded_cached_tensors
from modpo.errors import ConfigError
from modpo.logps import batched_pair_logps, batched_sequence_logps, chunked_head_agrees, sequence_logps
from modpo.margin_scale import measure
from modpo.margins import compute_margin_rewards
from modpo.packing import packed_attention
from modpo.reference import StartInfo, reference_for

logger = logging.getLogger(__name__)


def precompute_autocast_dtype(args) -> torch.dtype | None:
    """The autocast dtype training will use (None: none), from bf16/fp16 or accelerate's mixed_precision."""
    if args.bf16 or args.fp16:
        return torch.bfloat16 if args.bf16 else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(getattr(args, "mixed_precision", None))


def precompute_columns(dataset, model, ref_model, tokenizer, args: MODPOConfig, margin_sources, name: str,
                       start: StartInfo | None = None, margin_factors: list[float] | None = None,
                       reserved: int = 0):
    """Tokenize `dataset` and add `ref_chosen_logps`, `ref_rejected_logps` and the margin columns; returns the
    dataset and what was measured of its margins (`margin_scale.MarginScales`, None without margin objectives).

    The reference is `ref_model`, else `model` as it starts training (`reference.reference_for`; `start` says how
    `reference.prepare_policy` set it up). Margins are scaled as their sources ask (`margin_scale`), with
    `margin_factors` when given (the training data's, for evaluation data). `reserved` tokens of `max_length` are
    left free for the weight prefix of a conditioned run (`conditioning.Conditioner.room`)."""
    num_margins = len(args.weights) - 1
    has_columns = "chosen_margins" in dataset.column_names
    if margin_sources and has_columns:
        raise ConfigError(f"{name}: margins come both from columns and from margin_rewards sources; use one")
    if num_margins and not (margin_sources or has_columns):
        raise ConfigError(f"{name}: weights {args.weights} need {num_margins} margin rewards, but the data has no "
                          "chosen_margins/rejected_margins columns and no margin_rewards sources were given")
    if has_columns and not num_margins:
        dataset = dataset.remove_columns([c for c in ("chosen_margins", "rejected_margins") if c in dataset.column_names])
    tokenized = tokenize_preferences(dataset, tokenizer, args.max_length, file=name,
                                     num_margins=num_margins if has_columns else None, append_eos=args.append_eos,
                                     long_prompts=args.long_prompts, max_prompt_length=args.max_prompt_length,
                                     reserved=reserved)
    scales = None
    if margin_sources:  # on the rows training keeps (a dropped long prompt leaves its row out everywhere)
        chosen, rejected = compute_margin_rewards(margin_sources, tokenized, args.cache_dir, data_name=name,
                                                  device=args.device)
        if chosen.shape[1] != num_margins:
            raise ConfigError(f"margin sources give {chosen.shape[1]} objectives but weights {args.weights} "
                              f"expect {num_margins}")
        names = [n for source in margin_sources for n in source.objective_names()]
        asked = [source.scale for source in margin_sources for _ in range(source.num_objectives)]
        try:
            calibrated = [source.bradley_terry for source in margin_sources for _ in range(source.num_objectives)]
            chosen, rejected, scales = measure(chosen, rejected, names, asked, margin_factors, calibrated)
        except ValueError as err:
            raise ConfigError(f"{name}: {err}") from None
        tokenized = tokenized.add_column("chosen_margins", chosen.tolist()).add_column("rejected_margins", rejected.tolist())
    elif num_margins:  # margins given as data columns: measured, used as they are
        _, _, scales = measure(torch.tensor(tokenized["chosen_margins"]), torch.tensor(tokenized["rejected_margins"]),
                               [f"column {k + 1}" for k in range(num_margins)], ["none"] * num_margins)

    ref = reference_for(model, ref_model, start)
    reference = ref.module
    # Same numerics as training: mixed precision when the trainer uses it, whether set by bf16/fp16 or by
    # `accelerate launch` (its config's mixed_precision reaches args.mixed_precision, not args.bf16).
    half = precompute_autocast_dtype(args)
    key = {"model": ref.key,
           "data": columns_fingerprint(tokenized, ["prompt_ids", "chosen_ids", "rejected_ids"]),
           "dtype": str(next(reference.parameters()).dtype), "autocast": str(half)}

    def compute(rows: range):  # this process's rows: all of them, or its shard in a distributed run
        ids = {column: tokenized[column][rows.start : rows.stop]
               for column in ("prompt_ids", "chosen_ids", "rejected_ids")}
        device_before = next(reference.parameters()).device
        reference.to(args.device)  # the policy as reference stays there: training places it on this device too
        pad_id = tokenizer.pad_token_id
        autocast = torch.autocast(args.device.type, dtype=half) if half else nullcontext()
        with ref.context(), autocast:
            if args.prefix_sharing:  # each prompt once, as in training
                chosen, rejected = batched_pair_logps(reference, ids["prompt_ids"], ids["chosen_ids"],
                                                      ids["rejected_ids"], pad_id, args.precompute_batch_size,
                                                      desc="reference log-probs", chunked=args.chunked_logps)
                out = {"chosen": chosen, "rejected": rejected}
            else:
                out = {side: batched_sequence_logps(reference, ids["prompt_ids"], ids[f"{side}_ids"], pad_id,
                                                    args.precompute_batch_size, desc=f"reference log-probs ({side})",
                                                    chunked=args.chunked_logps)
                       for side in ("chosen", "rejected")}
        if ref.separate:
            reference.to(device_before)
        return out

    logps = sharded_cached_tensors("reference_logps", key, compute, len(tokenized), args.cache_dir)
    return (tokenized.add_column("ref_chosen_logps", logps["chosen"].tolist())
            .add_column("ref_rejected_logps", logps["rejected"].tolist())), scales


@torch.no_grad()
def chunked_head_agrees_on(model, tokenized, pad_token_id: int, args: MODPOConfig, pairs: int = 1) -> bool:
    """Whether the chunked LM head reproduces the model's full logits on the first `pairs` rows (True when
    `chunked_logps` is off or there are no rows: nothing to check).

    The list of configurations in `logps.output_head` cannot know every model that changes its logits in
    forward (e.g. a soft cap not declared in its config), so the first rows are scored both ways
    (`logps.chunked_head_agrees`, which warns naming the model class).
    """
    if not args.chunked_logps or tokenized is None or len(tokenized) == 0:
        return True
    rows = tokenized.select(range(min(pairs, len(tokenized))))
    prompts = [list(p) for p in rows["prompt_ids"]]
    responses = [list(r) for r in rows["chosen_ids"]] + [list(r) for r in rows["rejected_ids"]]
    half = precompute_autocast_dtype(args)
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=half) if half else nullcontext():
        return chunked_head_agrees(model, prompts + prompts, responses, pad_token_id)


@torch.no_grad()
def check_packed_layout(model, tokenized, pad_token_id: int, args: MODPOConfig, chunked: bool, pairs: int = 2) -> None:
    """Refuse `padding_free`/`prefix_sharing` for a model whose attention does not honour packed sequences.

    Packing relies on the model routing attention through transformers' attention interface (where
    `modpo_varlen` is registered). A model that does not would attend across sequences and return wrong
    log-probs without any error, so the first `pairs` rows are scored both padded and packed first.
    """

    if tokenized is None or len(tokenized) == 0:
        return
    rows = tokenized.select(range(min(pairs, len(tokenized))))
    ids = [list(map(list, rows[name])) for name in ("prompt_ids", "chosen_ids", "rejected_ids")]
    device = next(model.parameters()).device
    half = precompute_autocast_dtype(args)
    autocast = torch.autocast(device.type, dtype=half) if half else nullcontext()
    layout = {"prefix_sharing": True} if args.prefix_sharing else {"padding_free": True}

    def score(**kwargs):
        batch = to_device(concatenated_inputs(*ids, pad_token_id, **kwargs), device)
        return sequence_logps(model, chunked=chunked, num_sequences=2 * len(rows), **batch).float()

    was_training = model.training
    model.eval()
    with autocast:
        padded = score()
        with packed_attention(model, prefix_sharing=args.prefix_sharing):
            packed = score(**layout)
    model.train(was_training)
    difference = ((packed - padded).abs() / padded.abs().clamp(min=1)).max().item()
    if not difference <= (2e-2 if half else 1e-3):
        name = "prefix_sharing" if args.prefix_sharing else "padding_free"
        raise ConfigError(f"{name}: {type(getattr(model, 'module', model)).__name__} does not keep packed sequences "
                          f"apart (log-probs differ from padded batches by {difference:.2g} relative); its attention "
                          f"does not go through transformers' attention interface. Set {name}=false")
