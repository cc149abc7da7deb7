"""The precompute split over processes: shards, gathering, one cache entry, nobody computing on a cache hit.

The two-process test launches MODPOTrainer set-up (reference log-probs and two margin sources) with
`accelerate launch` on two CPU processes (gloo) and once in one process, and compares them.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from modpo.distributed_precompute import process_group, shard, sharded_cached_tensors

from test_distributed import launch_both


@pytest.mark.parametrize("num_rows, world_size", [(5, 2), (4, 2), (1, 2), (7, 3), (0, 2)])
def test_shards_cover_the_rows_in_order(num_rows, world_size):
    shards = [shard(num_rows, rank, world_size) for rank in range(world_size)]
    assert [i for s in shards for i in s] == list(range(num_rows))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_one_process_is_the_plain_cache(tmp_path):
    assert process_group() == (0, 1)
    calls = []

    def compute(rows):
        calls.append(rows)
        return {"x": torch.arange(len(rows), dtype=torch.float32) * 2}

    first = sharded_cached_tensors("reference_logps", {"k": 1}, compute, 3, tmp_path)
    again = sharded_cached_tensors("reference_logps", {"k": 1}, compute, 3, tmp_path)
    assert calls == [range(3)] and first["x"].tolist() == again["x"].tolist() == [0.0, 2.0, 4.0]


SCRIPT = textwrap.dedent('''
    """MODPOTrainer set-up with reference log-probs and two margin sources; counts the rows each part scores."""
    import copy, json, os, sys

    from datasets import Dataset

    from modpo import MODPOConfig, MODPOTrainer
    from modpo import margins as margins_module, precompute as trainer_module
    from modpo.margins import CallableMargins, ImplicitRewardMargins
    import test_distributed, tiny

    out = sys.argv[1]
    rank = int(os.environ.get("RANK", "0"))
    scored = {"reference": [], "implicit": [], "callable": 0}

    def counting(module, part):
        original = module.batched_sequence_logps
        def count(model, prompt_ids, *args, **kwargs):
            scored[part].append(len(prompt_ids))
            return original(model, prompt_ids, *args, **kwargs)
        module.batched_sequence_logps = count

    counting(trainer_module, "reference")
    counting(margins_module, "implicit")

    def brevity(prompt, response):
        scored["callable"] += 1
        return -float(len(response.split()))

    tok = tiny.tokenizer()
    policy = test_distributed.untied_model(len(tok), seed=0)
    dpo = tiny.perturbed(policy, seed=5, scale=0.1)
    data = Dataset.from_list(tiny.rows(5, seed=4))
    args = MODPOConfig(output_dir=os.path.join(out, "trainer"), report_to=[], use_cpu=True, save_strategy="no",
                       weights=[0.5, 0.3, 0.2], max_length=32, per_device_train_batch_size=2, disable_tqdm=True,
                       precompute_batch_size=2)
    columns = ("ref_chosen_logps", "ref_rejected_logps", "chosen_margins", "rejected_margins")
    report = {"world_size": args.world_size}
    for attempt in ("first", "cached"):
        sources = [ImplicitRewardMargins(dpo, ref_model=policy, tokenizer=tok, beta=0.5, batch_size=2),
                   CallableMargins(brevity, version="1")]  # the counter it writes is not behaviour
        trainer = MODPOTrainer(copy.deepcopy(policy), args=args, train_dataset=data, processing_class=tok,
                               margin_rewards=sources)
        report[attempt] = {"scored": copy.deepcopy(scored),
                           "columns": {c: list(trainer.train_dataset[c]) for c in columns}}
        scored.update(reference=[], implicit=[], callable=0)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
''')


def test_two_processes_each_score_a_shard_and_write_one_entry(tmp_path):
    outs = launch_both(tmp_path, SCRIPT, [], [])
    single = json.loads((outs["single"] / "rank0.json").read_text())
    ranks = [json.loads((outs["ddp"] / f"rank{r}.json").read_text()) for r in range(2)]
    assert single["world_size"] == 1 and [r["world_size"] for r in ranks] == [2, 2]

    # 5 rows: rank 0 scores 3, rank 1 scores 2, one process all 5; each part once per side (implicit
    # reward: policy and reference per side).
    for report, rows in [(single, 5), (ranks[0], 3), (ranks[1], 2)]:
        scored = report["first"]["scored"]
        assert scored["reference"] == [rows] * 2 and scored["implicit"] == [rows] * 4, scored
        assert scored["callable"] == 2 * rows
        # Built again: every entry is cached, nobody scores anything.
        assert report["cached"]["scored"] == {"reference": [], "implicit": [], "callable": 0}

    # One entry per kind and source, as in one process.
    for run in ("ddp", "single"):
        cache = tmp_path / f"cache_{run}"
        assert len(list((cache / "reference_logps").iterdir())) == 1, run
        assert len(list((cache / "margins").iterdir())) == 2, run

    # Every rank holds all rows, the same values as one process.
    expected = single["first"]["columns"]
    for report in ranks:
        for attempt in ("first", "cached"):
            for column, values in report[attempt]["columns"].items():
                assert torch.allclose(torch.tensor(values), torch.tensor(expected[column]), atol=1e-5), column
    assert ranks[0]["first"]["columns"] == ranks[1]["first"]["columns"] == ranks[1]["cached"]["columns"]
    assert single["first"]["columns"] == single["cached"]["columns"]
    assert len(set(map(tuple, expected["chosen_margins"]))) > 1  # the margins really vary by row
