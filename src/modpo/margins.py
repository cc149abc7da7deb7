"""Margin reward sources r_1..r_{K-1}(x, y): the objectives that MODPO does not see as preference pairs.

Each source scores every response of the training data once, before training:

* `RewardModelMargins`    a sequence-classification model; a head with several outputs gives several objectives.
* `ImplicitRewardMargins` beta' * log(pi_dpo / pi_ref)(y|x) of a DPO-trained model (or a LoRA adapter over the base).
* `ColumnMargins`         numbers already in the data.
* `CallableMargins`       a Python function of (prompt, response), e.g. a length penalty.

`compute_margin_rewards` runs them and caches the result on disk keyed by content, so every weight vector
of a sweep reuses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
from collections.abc import Callable, Sequence

import torch

from modpo.batch import pad
from modpo.cache import columns_fingerprint, model_identity, tokenizer_fingerprint
from modpo.callable_identity import NoContentForm, function_identity, source_of, unkeyed_state
from modpo.data.encode import ENCODER_VERSION, scoring_ids, sequence_ids
from modpo.distributed_precompute import sharded_cached_tensors
from modpo.errors import DataError
from modpo.logps import batched_pair_logps, batched_sequence_logps
from modpo.margin_scale import check_scale
from modpo.models import load_model, load_tokenizer, whole_weights
from modpo.progress import bar

SIDES = ("chosen", "rejected")


class MarginSource:
    """Scores responses; `score(dataset, side)` returns a (N, num_objectives) float tensor."""

    name: str = "margin"
    num_objectives: int = 1
    scale: str | float = "none"  # how training scales the margins (`modpo.margin_scale`); evaluation stays raw
    # True where the margins are Bradley-Terry logits by construction, the preference objective's own scale (DPO's
    # implicit reward estimates its data's BT reward, whatever its beta'); others come with no such guarantee.
    bradley_terry: bool = False

    def scaled(self, scale) -> MarginSource:
        """This source with training margins scaled: 'none', a number c (m -> c m) or 'standardize' (m divided
        by the std of m(y_w) - m(y_l) over the training pairs). Returns self."""
        self.scale = check_scale(scale)
        return self

    def objective_names(self) -> list[str]:
        return [self.name] if self.num_objectives == 1 else [f"{self.name}_{k}" for k in range(self.num_objectives)]

    def identity(self) -> dict:
        """Everything that determines the scores, for the cache key."""
        raise NotImplementedError

    def score(self, dataset, side: str) -> torch.Tensor:
        raise NotImplementedError

    def score_pairs(self, dataset) -> dict[str, torch.Tensor]:
        """Both sides: {"chosen": (N, K), "rejected": (N, K)}. Sources that can share work across a pair
        (one pass per prompt) override this."""
        return {side: self.score(dataset, side) for side in SIDES}

    def describe(self) -> str:
        return self.name

    def models(self) -> list[torch.nn.Module]:
        """The models that score (moved to the training device while they do)."""
        return []

    @contextlib.contextmanager
    def on_device(self, device):
        """Move the scoring models to `device` (None: leave them) and back where they were afterwards,
        so they hold no device memory during training."""
        models = [m for m in self.models() if m is not None and next(m.parameters(), None) is not None]
        if device is None or not models:
            yield
            return
        before = [next(m.parameters()).device for m in models]
        for model in models:
            model.to(device)
        try:
            yield
        finally:
            for model, where in zip(models, before):
                model.to(where)
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()


class ColumnMargins(MarginSource):
    """Scores already in the data: `chosen[k]` / `rejected[k]` name the columns of objective k."""

    def __init__(self, chosen: Sequence[str], rejected: Sequence[str], name: str = "columns"):
        if len(chosen) != len(rejected) or not chosen:
            raise ValueError("ColumnMargins needs as many chosen columns as rejected columns (at least one)")
        self.columns = {"chosen": list(chosen), "rejected": list(rejected)}
        self.name, self.num_objectives = name, len(chosen)

    def identity(self) -> dict:
        return {"type": "columns", "columns": self.columns}

    def score(self, dataset, side):
        out = torch.zeros(len(dataset), self.num_objectives, dtype=torch.float64)
        for k, column in enumerate(self.columns[side]):
            if column not in dataset.column_names:
                raise DataError("dataset", None, column, "margin column not found")
            for row, value in enumerate(dataset[column]):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise DataError("dataset", row + 1, column, f"margin must be a finite number, got {value!r}")
                out[row, k] = value
        return out.float()


class CallableMargins(MarginSource):
    """A function of (prompt, response) returning a number, or a list of `num_objectives` numbers.

    Its scores are cached by its content (`modpo.callable_identity`): its name and source code, the functions of
    its own package it calls (transitively) and what it captured (closure cells, defaults) by a content digest. A
    function whose behaviour these do not decide (a bound method, a callable object, a function reading global
    values, one holding a value without a stable content form) needs `version`: a string that changes whenever
    its behaviour does; the key is then its name, version and code.
    """

    def __init__(self, fn: Callable, name: str | None = None, num_objectives: int = 1, version: str | None = None):
        self.fn, self.num_objectives = fn, num_objectives
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.version = None if version is None else str(version)
        self.content = None
        if version is None:
            reason = unkeyed_state(fn)
            try:
                self.content = function_identity(fn) if reason is None else None
            except NoContentForm as err:
                reason = str(err)
            if reason:
                raise ValueError(f"margin function {self.name}: {reason}; pass version= (a string that changes "
                                 "whenever its behaviour does)")

    def identity(self) -> dict:
        """Name and code, plus the version when given, else its helpers and what it captured, by content."""
        if self.version is not None:
            code = source_of(self.fn if inspect.isroutine(self.fn) else type(self.fn))
            return {"type": "callable", "name": self.name, "code": hashlib.sha256(code.encode()).hexdigest(),
                    "version": self.version}
        return {"type": "callable", "name": self.name, **self.content}

    def _numbers(self, value) -> list[float] | None:
        values = [value] if isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool) else value
        try:
            out = [float(v) for v in values if not isinstance(v, (str, bool))]
        except (TypeError, ValueError):
            return None
        if len(out) != self.num_objectives or len(out) != len(list(values)) or not all(map(math.isfinite, out)):
            return None
        return out

    def score(self, dataset, side):
        rows = []
        for row, (prompt, response) in enumerate(zip(dataset["prompt"], dataset[side])):
            value = self.fn(prompt, response)
            if isinstance(value, torch.Tensor):
                value = value.reshape(-1).tolist()
            numbers = self._numbers(value) if not isinstance(value, (str, bytes)) and value is not None else None
            if numbers is None:
                raise DataError("dataset", row + 1, side,
                                f"margin function {self.name} returned {value!r}; expected {self.num_objectives} finite numbers")
            rows.append(numbers)
        return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), self.num_objectives)


def length_penalty(prompt, response) -> float:
    """Rule-based margin: minus the number of words in the response (rewards brevity). Its unit is one word, so
    its differences between two responses are often tens: see `modpo.margin_scale` before giving it a weight."""
    text = response if isinstance(response, str) else " ".join(m["content"] for m in response)
    return -float(len(text.split()))


def length_penalty_per(per: float) -> Callable:
    """Minus the number of words per `per` words (e.g. 100): `length_penalty` / `per`."""

    def penalty(prompt, response) -> float:
        return length_penalty(prompt, response) / per

    return penalty


def _load(kind: str, model, **kwargs):
    if not isinstance(model, str):
        return model

    with whole_weights():  # scored with plain forward passes, also under ZeRO-3
        return load_model(model, kind=kind, trained_head=kind == "reward", **kwargs)


class RewardModelMargins(MarginSource):
    """A transformers sequence-classification model; `outputs` picks heads (default: all of them)."""

    def __init__(self, model, tokenizer=None, outputs: Sequence[int] | None = None, batch_size: int = 16,
                 max_length: int = 1024, name: str = "reward_model"):

        self.path = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
        self.model = _load("reward", model)
        self.tokenizer = tokenizer or load_tokenizer(self.path)
        num_labels = self.model.config.num_labels
        self.outputs = list(outputs) if outputs is not None else list(range(num_labels))
        bad = [o for o in self.outputs if not 0 <= o < num_labels]
        if bad:
            raise ValueError(f"reward model {self.path or name} has {num_labels} outputs; outputs {bad} do not exist")
        self.num_objectives, self.batch_size, self.max_length, self.name = len(self.outputs), batch_size, max_length, name

    def models(self):
        return [self.model]

    def describe(self) -> str:
        outputs = "" if self.outputs == [0] else f", outputs {self.outputs}"
        return f"{self.name} ({self.path or 'model object'}{outputs})"

    def identity(self) -> dict:
        return {"type": "reward_model", "weights": model_identity(self.model), "outputs": self.outputs,
                "max_length": self.max_length, "tokenizer": tokenizer_fingerprint(self.tokenizer)}

    @torch.inference_mode()
    def score(self, dataset, side):
        # The tokens TRL's RewardTrainer trains on (`modpo.data.encode.sequence_ids`), the end kept when too long.
        sequences = [sequence_ids(p, r, self.tokenizer, self.max_length) for p, r in zip(dataset["prompt"], dataset[side])]
        device = next(self.model.parameters()).device
        self.model.eval()
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = pad_id
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out = torch.zeros(len(sequences), self.num_objectives)
        for start in bar(range(0, len(order), self.batch_size), desc=f"{self.name} ({side})", leave=False):
            rows = order[start : start + self.batch_size]
            input_ids = pad([sequences[i] for i in rows], pad_id).to(device)
            attention_mask = pad([[1] * len(sequences[i]) for i in rows], 0).to(device)
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
            out[rows] = logits[:, self.outputs].cpu()
        return out


class ImplicitRewardMargins(MarginSource):
    """beta' * (log pi_dpo(y|x) - log pi_ref(y|x)) of a DPO-trained model: the paper's margin, an estimate of the
    Bradley-Terry reward of the DPO model's preference data (so on the preference objective's scale).

    `model` is a path or model; `ref_model` its reference. A LoRA adapter folder as `model` needs no
    `ref_model`: the reference is the base with the adapter disabled.
    """

    bradley_terry = True

    def __init__(self, model, ref_model=None, tokenizer=None, beta: float = 0.1, batch_size: int = 16,
                 max_length: int = 1024, append_eos: bool = True, name: str = "implicit_reward",
                 prefix_sharing: bool = False):

        self.path = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
        self.model = _load("causal_lm", model)
        self.ref_model = _load("causal_lm", ref_model) if ref_model is not None else None
        if self.ref_model is None and not hasattr(self.model, "disable_adapter"):
            raise ValueError(f"implicit reward of {self.path or name}: give ref_model, or a LoRA adapter as model")
        self.tokenizer = tokenizer or load_tokenizer(self.path)
        self.beta, self.batch_size, self.max_length, self.name = beta, batch_size, max_length, name
        self.append_eos = append_eos
        self.prefix_sharing = prefix_sharing  # score both sides of a pair with each prompt run once

    def models(self):
        return [self.model, self.ref_model]

    def describe(self) -> str:
        ref_path = getattr(getattr(self.ref_model, "config", None), "_name_or_path", "") if self.ref_model is not None else ""
        reference = f"reference {ref_path or 'model object'}" if self.ref_model is not None else "adapter disabled as reference"
        return f"{self.name} ({self.path or 'model object'}; {reference}; beta {self.beta:g})"

    def identity(self) -> dict:
        ref = model_identity(self.ref_model) if self.ref_model is not None else "adapter-disabled"
        return {"type": "implicit_reward", "model": model_identity(self.model), "ref": ref, "beta": self.beta,
                "max_length": self.max_length, "append_eos": self.append_eos,
                "tokenizer": tokenizer_fingerprint(self.tokenizer)}

    def _token_ids(self, dataset, side) -> tuple[list, list]:
        """Prompt and response ids of one side, encoded as training encodes them (`modpo.data.encode`)."""
        pairs = [scoring_ids(p, [r], self.tokenizer, self.max_length, self.append_eos)
                 for p, r in zip(dataset["prompt"], dataset[side])]
        return [p for p, _ in pairs], [r for _, (r,) in pairs]

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def _both_models(self, logps):
        """beta' * (logps(policy) - logps(reference)), where `logps(model)` scores with one model."""
        policy = logps(self.model, "policy")
        if self.ref_model is not None:
            reference = logps(self.ref_model, "reference")
        else:
            with self.model.disable_adapter():
                reference = logps(self.model, "reference")
        return self.beta * (policy - reference)

    def score(self, dataset, side):
        prompt_ids, response_ids = self._token_ids(dataset, side)
        args = (prompt_ids, response_ids, self._pad_id(), self.batch_size)
        margins = self._both_models(lambda model, role: batched_sequence_logps(
            model, *args, desc=f"{self.name} {role} ({side})"))
        return margins[:, None]

    def score_pairs(self, dataset):
        if not self.prefix_sharing:
            return super().score_pairs(dataset)
        pairs = [scoring_ids(p, [c, r], self.tokenizer, self.max_length, self.append_eos)
                 for p, c, r in zip(dataset["prompt"], dataset["chosen"], dataset["rejected"])]
        prompt_ids = [p for p, _ in pairs]
        chosen_ids, rejected_ids = [c for _, (c, _) in pairs], [r for _, (_, r) in pairs]
        args = (prompt_ids, chosen_ids, rejected_ids, self._pad_id(), self.batch_size)
        both = self._both_models(lambda model, role: torch.stack(batched_pair_logps(
            model, *args, desc=f"{self.name} {role}")))
        return {"chosen": both[0][:, None], "rejected": both[1][:, None]}


def compute_margin_rewards(sources: Sequence[MarginSource], dataset, cache_dir=None, data_name: str = "dataset",
                           device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) margins, each (N, K-1): every source once per side, cached by content.

    Model sources score on `device` (the training device; None: where they are). In a distributed run each
    process scores its shard of the rows (`distributed_precompute`)."""
    for source in sources:
        missing = [c for side in SIDES for c in getattr(source, "columns", {}).get(side, []) if c not in dataset.column_names]
        if missing:
            raise DataError(data_name, None, missing[0], f"margin column not found (columns: {', '.join(dataset.column_names)})")
    data_key = columns_fingerprint(dataset, [c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names])
    chosen, rejected = [], []
    for source in sources:
        extra = [c for side in SIDES for c in getattr(source, "columns", {}).get(side, [])]
        key = {"source": source.identity(), "data": data_key, "encoder": ENCODER_VERSION,
               "extra": columns_fingerprint(dataset, extra) if extra else None}

        def compute(rows, source=source):
            with source.on_device(device):
                return source.score_pairs(dataset if len(rows) == len(dataset) else dataset.select(rows))

        scores = sharded_cached_tensors("margins", key, compute, len(dataset), cache_dir)
        chosen.append(scores["chosen"].float().reshape(len(dataset), -1))
        rejected.append(scores["rejected"].float().reshape(len(dataset), -1))
    return torch.cat(chosen, dim=1), torch.cat(rejected, dim=1)
