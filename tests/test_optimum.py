"""MODPOTrainer reaches the closed-form MODPO optimum, K = 3.

One-token prompts and responses; preference pairs for r_0 in exact Bradley-Terry proportions (r_0 = log k,
so pair (a, b) appears k_a times with a chosen and k_b times with b chosen); r_1, r_2 given as margin
columns. At the optimum beta * log(pi/pi_ref)(y|x) = w . r(x, y) + c(x).
"""

import itertools
import math

import torch
from datasets import Dataset

from modpo import MODPOConfig, MODPOTrainer
from modpo.logps import batched_sequence_logps
from modpo.models import tiny_causal_lm, word_tokenizer

PROMPTS = ["p0", "p1"]
RESPONSES = ["y0", "y1", "y2", "y3"]
K0 = {"p0": [1, 2, 3, 4], "p1": [4, 1, 3, 2]}  # r_0 = log k
R1 = {"p0": [0.5, -0.5, 1.0, 0.0], "p1": [-1.0, 0.25, 0.0, 0.75]}
R2 = {"p0": [0.0, 1.0, -1.0, 0.5], "p1": [0.5, 0.0, -0.5, 1.0]}


def bradley_terry_rows():
    rows = []
    for prompt in PROMPTS:
        for a, b in itertools.combinations(range(len(RESPONSES)), 2):
            for winner, loser, count in ((a, b, K0[prompt][a]), (b, a, K0[prompt][b])):
                for _ in range(count):
                    rows.append({
                        "prompt": prompt, "chosen": RESPONSES[winner], "rejected": RESPONSES[loser],
                        "chosen_margins": [R1[prompt][winner], R2[prompt][winner]],
                        "rejected_margins": [R1[prompt][loser], R2[prompt][loser]],
                    })
    return rows


def implicit_rewards(model, reference_logps, tokenizer, beta):
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS for _ in RESPONSES]
    response_ids = [tokenizer(r)["input_ids"] for _ in PROMPTS for r in RESPONSES]
    logps = batched_sequence_logps(model, prompt_ids, response_ids, tokenizer.pad_token_id)
    return (beta * (logps - reference_logps)).reshape(len(PROMPTS), len(RESPONSES)).double()


def test_trainer_reaches_closed_form_optimum(tmp_path):
    tokenizer = word_tokenizer(PROMPTS + RESPONSES)
    model = tiny_causal_lm(len(tokenizer), hidden_size=32, layers=1, heads=2, seed=0)
    weights, beta = [0.5, 0.3, 0.2], 0.5
    rows = bradley_terry_rows()
    args = MODPOConfig(output_dir=str(tmp_path), weights=weights, beta=beta, per_device_train_batch_size=len(rows),
                       max_steps=400, learning_rate=2e-2, lr_scheduler_type="constant", report_to=[],
                       logging_steps=50, save_strategy="no", use_cpu=True, seed=0, max_length=8,
                       append_eos=False)  # one-token responses without eos: log pi(y|x) is one softmax over y
    trainer = MODPOTrainer(model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    reference = torch.tensor(trainer.train_dataset["ref_chosen_logps"])  # one per row: rebuild per (x, y)
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS for _ in RESPONSES]
    response_ids = [tokenizer(r)["input_ids"] for _ in PROMPTS for r in RESPONSES]
    reference_logps = batched_sequence_logps(model, prompt_ids, response_ids, tokenizer.pad_token_id)
    trainer.train()

    learned = implicit_rewards(trainer.model, reference_logps, tokenizer, beta)
    target = torch.tensor([[weights[0] * math.log(K0[p][y]) + weights[1] * R1[p][y] + weights[2] * R2[p][y]
                            for y in range(len(RESPONSES))] for p in PROMPTS], dtype=torch.float64)
    centred = lambda t: t - t.mean(dim=1, keepdim=True)  # equal up to a per-prompt constant
    assert torch.allclose(centred(learned), centred(target), atol=2e-3), (centred(learned), centred(target))
    # The precomputed reference matches the model before training, row by row.
    first = rows[0]
    i = PROMPTS.index(first["prompt"]) * len(RESPONSES) + RESPONSES.index(first["chosen"])
    assert abs(reference[0].item() - reference_logps[i].item()) < 1e-5
