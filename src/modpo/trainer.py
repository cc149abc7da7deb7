"""MODPOTrainer: transformers.Trainer with the MODPO loss.

Follow one batch: preference rows are checked and tokenized (`data.formats`), reference log-probs and
margin rewards are computed once and cached (`precompute_columns`), the collator lays out chosen then
rejected sequences (padded rows, one packed row, or one packed row with each prompt once: `packing`) and
says which hidden state scores which response token, and `compute_loss` scores both sides with one forward
pass (`logps.sequence_logps`) and applies `loss.modpo_loss`. Only the policy is on the device while training.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections import defaultdict

import torch
from transformers import Trainer, TrainerCallback
from transformers.training_args import ParallelMode

from modpo.batch import PreferenceCollator
from modpo.conditioning import Conditioner, WeightSampler, save_record
from modpo.config import MODPOConfig
from modpo.errors import ConfigError
from modpo.logps import sequence_logps
from modpo.loss import modpo_loss
from modpo.margin_scale import weight_warnings
from modpo.models import load_policy_and_reference
from modpo.packing import use_padding_free
from modpo.precompute import check_packed_layout, chunked_head_agrees_on, precompute_columns
from modpo.reference import is_peft_model, prepare_policy
from modpo.resolved import ResolvedSettings, chunked_logps_conflict
from modpo.weight_embedding import (ATTRIBUTE, CONFIG_FILE, WEIGHTS_FILE, WeightEmbedding, applied, detached,
                                    token_weights)

logger = logging.getLogger(__name__)



def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout: nn.Dropout modules and the functional attention dropout of transformers models."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    config = getattr(model, "config", None)
    for name in list(vars(config)) if config is not None else []:
        if "dropout" in name and isinstance(getattr(config, name), float):
            setattr(config, name, 0.0)


class EpochToConditioner(TrainerCallback):
    """Tells the conditioner which epoch begins, so each row's weights are drawn anew (and reproducibly)."""

    def __init__(self, conditioner: Conditioner):
        self.conditioner = conditioner

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.conditioner.epoch = int(state.epoch or 0)


class MODPOTrainer(Trainer):
    """Trains a policy with the MODPO loss for one weight vector `args.weights`.

    The reference pi_ref is `ref_model` when given (as loaded, an adapter on), else the policy as it starts
    training (see `modpo.reference`). A LoRA adapter folder as `model` (e.g. LoRA SFT) is the SFT model: with a
    new `peft_config` it is merged into its base first and the new adapter trains on top (`start_merged` is
    then True), without one its own adapter keeps training. A new adapter on a merged base cannot be saved as
    an adapter (its base exists in no folder): save such a run with `save_merged_model(output_dir)`, a
    standalone model that loads without peft, as `modpo train`/`modpo dpo` do.
    """

    def __init__(self, model, ref_model=None, args: MODPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, margin_rewards=None, peft_config=None, data_names=(None, None), **kwargs):
        """`data_names` (train, eval) name the data in error messages, e.g. the files they were read from.

        Construction is a sequence of named steps; `args` is never changed: what the start-up checks decide is
        in `self.settings` (`modpo.resolved`), and the Trainer runs with a copy of `args` that carries it."""
        args = args or MODPOConfig(output_dir="modpo-output")
        model, ref_model, processing_class = load_policy_and_reference(model, ref_model, processing_class)
        model, self.start = prepare_policy(model, peft_config, seed=args.seed)  # pi_ref = the policy as it starts
        disable_dropout(model)
        self.margin_sources = list(margin_rewards or [])
        self.conditioner = self._conditioner(processing_class, args)  # its prefix is fitted inside max_length
        train_dataset, eval_dataset, self.margin_scales = self._precompute(
            model, ref_model, processing_class, args, train_dataset, eval_dataset, data_names)
        self.settings = self._start_up_checks(model, processing_class, args, train_dataset, eval_dataset)
        self.weight_embedding = self._weight_embedding(model, args)
        collator = PreferenceCollator(processing_class.pad_token_id, args.padding_free, args.pad_to_multiple_of,
                                      args.prefix_sharing, self.conditioner)
        super().__init__(model=model, args=self.settings.applied_to(args), data_collator=collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss is a mean over pairs; Trainer scales for accumulation
        self._check_chunked_logps()  # needs the accelerator's view of the distributed setup
        self._check_merged_start()
        if self.conditioner is not None:
            self.add_callback(EpochToConditioner(self.conditioner))
        if self.margin_scales is not None and self.is_world_process_zero():  # before training starts, once
            for line in weight_warnings(args.weights, self.margin_scales):
                logger.warning(line)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        # Compute accounting: non-pad tokens through forward (and backward) passes of the policy.
        self.token_counts = {"forward": 0, "backward": 0}

    def _precompute(self, model, ref_model, tokenizer, args, train_dataset, eval_dataset, data_names):
        """Token ids, reference log-probs and margins of both datasets, once (`modpo.precompute`); the evaluation
        margins scaled as the training margins are."""
        train_name, eval_name = data_names
        reserved = self.conditioner.room if self.conditioner is not None else 0
        scales = None  # what the precompute measured of the training margins (`margin_scale`)
        if train_dataset is not None:
            train_dataset, scales = precompute_columns(train_dataset, model, ref_model, tokenizer, args,
                                                       self.margin_sources, train_name or "train_dataset", self.start,
                                                       reserved=reserved)
        if eval_dataset is not None:
            eval_dataset, _ = precompute_columns(eval_dataset, model, ref_model, tokenizer, args, self.margin_sources,
                                                 eval_name or "eval_dataset", self.start,
                                                 scales.factors if scales is not None else None, reserved)
        return train_dataset, eval_dataset, scales

    @staticmethod
    def _start_up_checks(model, tokenizer, args, train_dataset, eval_dataset) -> ResolvedSettings:
        """Score the first rows two ways: the chunked LM head against the full logits, packed layouts against
        padded ones (refused where they differ); the result decides the settings training runs with."""
        rows = train_dataset if train_dataset is not None else eval_dataset
        settings = ResolvedSettings.from_config(args, chunked_head_agrees_on(model, rows, tokenizer.pad_token_id, args))
        if args.padding_free or args.prefix_sharing:
            check_packed_layout(model, rows, tokenizer.pad_token_id, args, settings.chunked_logps)
            use_padding_free(model, prefix_sharing=args.prefix_sharing)
        return settings

    @staticmethod
    def _conditioner(tokenizer, args) -> Conditioner | None:
        """Weight-conditioned MODPO (`modpo.conditioning`): each row's w, drawn by the sampler and shown to the
        policy as a prompt prefix (rows are fitted to max_length less the longest prefix), or as c(w)."""
        if args.weight_sampling is None:
            return None
        conditioner = Conditioner(WeightSampler(len(args.weights), args.weight_sampling, args.weight_concentration,
                                                args.weight_list or [], args.min_first_weight, args.seed),
                                  tokenizer, args.conditioning)
        if args.max_length - conditioner.room < 2:
            raise ConfigError(f"max_length = {args.max_length} leaves no room for a row after the weight prefix "
                              f"({conditioner.room} tokens); raise max_length")
        return conditioner

    @staticmethod
    def _weight_embedding(model, args) -> WeightEmbedding | None:
        """In the `embedding` format, c(w): a submodule of the policy (trained and placed with it, saved beside it)."""
        if args.weight_sampling is None or args.conditioning != "embedding":
            return None
        embedding = WeightEmbedding.for_model(model, len(args.weights), seed=args.seed)
        model.add_module(ATTRIBUTE, embedding)
        return embedding

    def _check_chunked_logps(self) -> None:
        """Turn `chunked_logps` off, with a warning, where the distributed setup does not support it."""
        if not self.settings.chunked_logps:
            return
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None) if self.is_deepspeed_enabled else None
        zero3 = plugin is not None and (getattr(plugin, "zero_stage", None) == 3 or plugin.hf_ds_config.is_zero3())
        ddp = (self.args.parallel_mode == ParallelMode.DISTRIBUTED
               and not (self.is_deepspeed_enabled or self.is_fsdp_enabled))
        reason = chunked_logps_conflict(self.model, zero3=zero3, fsdp=self.is_fsdp_enabled,
                                        ddp_find_unused=ddp and bool(self.args.ddp_find_unused_parameters))
        if reason:
            logger.warning("chunked_logps turned off: %s; scoring with the model's full logits instead", reason)
            self.settings = self.settings.without_chunked_logps(reason)
            self.args.chunked_logps = False  # the trainer's own copy of the arguments

    @property
    def start_merged(self) -> bool:
        """True when the starting adapter was merged into its base under the new one: save with `save_merged_model`."""
        return self.start.merged

    def _check_merged_start(self) -> None:
        if self.start_merged and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            raise ConfigError("a LoRA adapter folder as model with a new lora config is merged into its base, and "
                              "the result saved as one standalone model, which DeepSpeed/FSDP runs cannot do here; "
                              "merge the adapter first (peft merge_and_unload) and start from the merged folder")

    def save_merged_model(self, output_dir: str | None = None) -> None:
        """Save the policy as one standalone model, the trained adapter merged into its base (a plain model as is)."""
        output_dir = output_dir or self.args.output_dir
        if not self.is_world_process_zero():
            return
        with detached(self.accelerator.unwrap_model(self.model)) as embedding:
            model = self.accelerator.unwrap_model(self.model)
            if is_peft_model(model):  # merged in a copy: the trainer keeps its adapter
                model = copy.deepcopy(model).merge_and_unload()
            model.save_pretrained(output_dir)
        self._save_conditioning(output_dir, embedding)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The model as transformers saves it; a weight embedding (`conditioning: embedding`) in its own files beside."""
        output_dir = output_dir or self.args.output_dir
        with detached(self.accelerator.unwrap_model(self.model)) as embedding:
            super().save_model(output_dir, _internal_call=_internal_call)
        if self.is_world_process_zero():
            self._save_conditioning(output_dir, embedding)

    def conditioning_record(self) -> dict | None:
        """What steering a conditioned policy needs (`modpo.conditioning.RECORD_FILE`): the conditioner's record,
        the objectives' names, and in the `embedding` format the files of c(w); None for a fixed-weight run."""
        if self.conditioner is None:
            return None
        names = [name for source in self.margin_sources for name in source.objective_names()]
        if len(names) != self.conditioner.sampler.num_objectives - 1:  # margins from data columns carry no names
            names = [f"objective_{k}" for k in range(1, self.conditioner.sampler.num_objectives)]
        files = {"weight_embedding": [WEIGHTS_FILE, CONFIG_FILE]} if self.weight_embedding is not None else {}
        return {**self.conditioner.record(), "objectives": ["preference", *names], **files}

    def _save_conditioning(self, output_dir: str, embedding: WeightEmbedding | None) -> None:
        """A conditioned policy's record and its weight embedding, beside the model files."""
        if self.conditioner is None:
            return
        if embedding is not None:
            embedding.save(output_dir)
        save_record(self.conditioning_record(), output_dir)

    def load_weight_embedding(self, folder: str) -> None:
        """Resuming from a checkpoint: its weight embedding too (the Trainer restores only the model's own files)."""
        if self.weight_embedding is not None:
            self.weight_embedding.load_state_dict(WeightEmbedding.load(folder).state_dict())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: MODPOConfig = self.args
        pairs = inputs["ref_chosen_logps"].shape[0]
        layout = inputs["layout"]  # a `batch.PreferenceBatch`: the layout goes to the model, the rest to the loss
        # accelerate autocasts only inside the model's forward; the chunked LM head runs after it, so autocast it
        # too: the same numerics as the precompute, which runs entirely under autocast.
        shown = contextlib.nullcontext()  # in the `embedding` format, c(w) of each token's pair is added to it
        if self.weight_embedding is not None:
            embeddings = self.accelerator.unwrap_model(model).get_input_embeddings()
            shown = applied(embeddings, self.weight_embedding, token_weights(layout, inputs["weights"]))
        with self.accelerator.autocast(), shown:
            logps = sequence_logps(model, chunked=self.settings.chunked_logps, num_sequences=2 * pairs, **layout)
        losses, chosen_rewards, rejected_rewards = modpo_loss(
            logps[:pairs], logps[pairs : 2 * pairs], inputs["ref_chosen_logps"], inputs["ref_rejected_logps"],
            inputs.get("chosen_margins"), inputs.get("rejected_margins"), inputs.get("weights", args.weights),
            beta=args.beta, label_smoothing=args.label_smoothing, loss_type=args.loss_type,
            validate="weights" not in inputs)  # per-row weights come checked from the sampler
        if "loss_weight" in inputs:  # per-row weights, e.g. the DPO-LW baseline's w_k per objective's rows
            losses = losses * inputs["loss_weight"]
        if "weights" in inputs and args.equalize_steps:  # d loss / d logratio is beta * sigma'(.) for every w
            losses = losses * inputs["weights"][:, 0]
        loss = losses.mean()
        # Tokens the model ran on: packed sequences 0..2B-1 (not the length filler), else the attention mask.
        tokens = (layout["sequence_index"] < 2 * pairs) if "sequence_index" in layout else layout["attention_mask"]
        values = self._metric_values(inputs, logps[:pairs], logps[pairs : 2 * pairs], chosen_rewards, rejected_rewards)
        # One device-to-host transfer per step for the loss check, the token count and every metric.
        numbers = torch.stack([loss.detach().float(), tokens.sum().float(), *values.values()]).tolist()
        if not math.isfinite(numbers[0]):
            rows = (inputs["row_index"] + 1).tolist()
            raise FloatingPointError(f"non-finite MODPO loss ({numbers[0]}) at step {self.state.global_step}, "
                                     f"batch of data rows {rows}")
        self.token_counts["forward"] += int(numbers[1])
        if model.training:
            self.token_counts["backward"] += int(numbers[1])
        metrics = self._metrics["train" if self.model.training else "eval"]
        for name, value in zip(values, numbers[2:]):
            metrics[name].append(value)
        return (loss, {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}) if return_outputs else loss

    @staticmethod
    @torch.no_grad()
    def _metric_values(inputs, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards) -> dict:
        values = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": chosen_logps.detach().mean(),
            "logps/rejected": rejected_logps.detach().mean(),
        }
        if "chosen_margins" in inputs:
            differences = inputs["chosen_margins"] - inputs["rejected_margins"]
            for k in range(differences.shape[1]):
                values[f"margins/objective_{k + 1}"] = differences[:, k].mean()
        return {name: value.float() for name, value in values.items()}

    def floating_point_ops(self, inputs) -> int:
        """transformers' 6 * parameters * tokens estimate, from the tokens of the batch's layout."""
        return super().floating_point_ops(inputs["layout"])

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def train(self, *args, **kwargs):
        """transformers.Trainer.train; afterwards `token_counts` hold the sum over all processes."""
        before = dict(self.token_counts)
        output = super().train(*args, **kwargs)
        if self.args.world_size > 1:  # each process counted its own share of every batch
            local = torch.tensor([self.token_counts[k] - before[k] for k in ("forward", "backward")],
                                 dtype=torch.int64, device=self.args.device)
            total = self.accelerator.reduce(local, reduction="sum").tolist()
            self.token_counts = {"forward": before["forward"] + total[0], "backward": before["backward"] + total[1]}
        return output

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        names = [name for name, values in self._metrics[mode].items() if values]
        means = [sum(self._metrics[mode][name]) / len(self._metrics[mode][name]) for name in names]
        if means and self.args.world_size > 1:  # every process logs in step; average their shares of the batches
            means = self.accelerator.reduce(torch.tensor(means, device=self.args.device), reduction="mean").tolist()
        logs.update({prefix + name: value for name, value in zip(names, means)})
        self._metrics[mode].clear()
        super().log(logs, *args, **kwargs)
