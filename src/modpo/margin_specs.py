"""Margin reward sources from their config mappings (`margins:` of a training config, `evaluators:` of a front).

    margins:
      - {type: implicit_reward, model: runs/dpo_safer, beta: 0.1}      # beta' * log(pi_dpo / pi_ref)
      - {type: reward_model, model: runs/rm_helpful, outputs: [0]}       # a sequence-classification model
      - {type: columns, chosen: [c_len], rejected: [r_len]}             # numbers already in the data
      - {type: length_penalty, per: 100}                                # minus words per 100 (default per: 1)
      - {type: scorer, preset: vader_sentiment}                         # an installed scorer (`modpo.scorers`)

Every source takes `scale`: none (default), a number, or standardize (`modpo.margin_scale`).
"""

from __future__ import annotations

import math

from modpo.errors import ConfigError
from modpo.margins import (CallableMargins, ColumnMargins, ImplicitRewardMargins, RewardModelMargins, length_penalty,
                           length_penalty_per)
from modpo.scorer_margins import ScorerMargins
from modpo.scorers import parse_spec


def margin_sources(specs: list[dict], tokenizer, max_length: int, prefix_sharing: bool = False, append_eos: bool = True):
    """Margin reward sources from their config mappings (see StageConfig.margins). Implicit rewards score responses
    as training does (with an eos when `append_eos`) and share each pair's prompt when training does
    (`prefix_sharing`), unless their mapping says otherwise."""
    sources = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        kind = spec.pop("type", None)
        scale = spec.pop("scale", "none")
        where = f"margins[{i}]"
        try:
            if kind == "implicit_reward":
                sources.append(ImplicitRewardMargins(spec.pop("model"), ref_model=spec.pop("ref_model", None),
                                                     beta=float(spec.pop("beta", 0.1)), max_length=max_length,
                                                     tokenizer=tokenizer if spec.pop("same_tokenizer", True) else None,
                                                     prefix_sharing=bool(spec.pop("prefix_sharing", prefix_sharing)),
                                                     append_eos=bool(spec.pop("append_eos", append_eos)),
                                                     **spec))
            elif kind == "reward_model":
                sources.append(RewardModelMargins(spec.pop("model"), outputs=spec.pop("outputs", None),
                                                  max_length=max_length, **spec))
            elif kind == "columns":
                sources.append(ColumnMargins(spec.pop("chosen"), spec.pop("rejected"), **spec))
            elif kind == "length_penalty":  # minus the word count, or minus words per `per` words
                per = float(spec.pop("per", 1))
                if not (math.isfinite(per) and per > 0):
                    raise ValueError(f"per = {per}: expected a number > 0 (e.g. 100: minus words per 100 words)")
                function = length_penalty if per == 1 else length_penalty_per(per)
                sources.append(CallableMargins(function, name=spec.pop("name", "length_penalty"),
                                               version=spec.pop("version", None)))
            elif kind == "scorer":
                batch_size = spec.pop("batch_size", 256)
                sources.append(ScorerMargins(parse_spec(spec, where), batch_size=batch_size))
            else:
                raise ConfigError(f"{where}: unknown type {kind!r} (implicit_reward, reward_model, columns, "
                                  "length_penalty, scorer)")
            sources[-1].scaled(scale)
        except KeyError as err:
            raise ConfigError(f"{where}: missing key {err}") from None
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: {err}") from None
    return sources
