"""Baselines for the MODPO comparison (the paper's Section 4), run in the same harness as MODPO.

* `soups`      DPO soups: one DPO model per objective, parameters interpolated with the weights
               (full weights, or merged LoRA deltas).
* `dpo_lw`     DPO LW: DPO on the union of every objective's preference pairs, each row's loss weighted by
               its objective's weight (MODPOTrainer with weights [1.0] and a `loss_weight` column).
* `best_of_n`  Best-of-N: N samples of the SFT model, the one maximising w . r under the training-side
               rewards (never the evaluator).
* `morlhf`     MORLHF: on-policy RL (TRL's RLOOTrainer) on w . r from the same training-side rewards.
* `rewards`    those training-side rewards: implicit rewards beta * log(pi_dpo / pi_sft) of the per-objective
               DPO models, scored in batches with token accounting.

`modpo.experiments.compare` runs them all next to MODPO on the synthetic demo task and writes the comparison.
"""
