"""The compute-vs-quality curves: the fraction of the optimum, aggregation over seeds, the compute to reach a
threshold, the budgets read from checkpoints, the report's totals and claims, and the command line.

Every expected number is recomputed here by hand (rectangles for a 2-D hypervolume, `statistics` for the
spread, the interpolation formula written out), never taken from the code under test.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from modpo.baselines.best_of_n import first_of_groups
from modpo.baselines.morlhf import MORLHFSettings
from modpo.cli import main
from modpo.experiments.curve_maths import aggregate, compute, compute_to_reach, fraction_of_optimum, spread
from modpo.experiments.curves import budgets
from modpo.experiments.curves_report import claims, summarize_curves


def staircase_area(points, reference=(0.0, 0.0)) -> float:
    """2-D hypervolume by rectangles: sort by the first objective, each point adds the strip it alone covers."""
    area, x_prev = 0.0, reference[0]
    for x, y in sorted(points):
        higher = [q for q in points if q[0] >= x]
        area += (x - x_prev) * (max(q[1] for q in higher) - reference[1])
        x_prev = x
    return area


def test_fraction_of_optimum_is_the_ratio_of_the_two_hypervolumes():
    front = [(0.2, 0.6), (0.5, 0.3), (0.1, 0.1)]  # the last one is dominated
    optimal = [(0.3, 0.7), (0.6, 0.4), (0.45, 0.55)]
    expected = staircase_area(front) / staircase_area(optimal)
    assert staircase_area(front) == pytest.approx(0.2 * 0.6 + 0.3 * 0.3)
    assert fraction_of_optimum(front, optimal, [0.0, 0.0]) == pytest.approx(expected)
    assert fraction_of_optimum(optimal, optimal, [0.0, 0.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="dominate nothing"):
        fraction_of_optimum(front, [(-1.0, 0.5)], [0.0, 0.0])


def test_compute_to_reach_interpolates_linearly_at_the_first_crossing():
    xs, ys = [10.0, 100.0, 1000.0, 5000.0], [0.5, 0.8, 0.95, 0.85]
    # between (100, 0.8) and (1000, 0.95): 0.9 is two thirds of the way
    assert compute_to_reach(xs, ys, 0.9) == pytest.approx(100 + (0.9 - 0.8) / (0.95 - 0.8) * 900)
    assert compute_to_reach(xs, ys, 0.4) == 10.0  # the smallest budget already reaches it
    assert compute_to_reach(xs, ys, 0.95) == pytest.approx(1000.0)
    assert compute_to_reach(xs, ys, 0.96) is None
    dip = [0.5, 0.92, 0.7, 0.99]  # the first crossing counts, not a later one
    assert compute_to_reach(xs, dip, 0.9) == pytest.approx(10 + (0.4 / 0.42) * 90)


def test_aggregate_gives_mean_std_and_range_per_budget():
    seeds = [[{"compute": 10, "fraction": 0.5}, {"compute": 20, "fraction": 0.9}],
             [{"compute": 12, "fraction": 0.7}, {"compute": 22, "fraction": 0.8}],
             [{"compute": 14, "fraction": 0.6}, {"compute": 24, "fraction": 1.0}]]
    curve = aggregate(seeds)
    for i in range(2):
        for key in ("compute", "fraction"):
            values = [s[i][key] for s in seeds]
            assert curve[i][key]["mean"] == pytest.approx(statistics.mean(values))
            assert curve[i][key]["std"] == pytest.approx(statistics.stdev(values))
            assert (curve[i][key]["min"], curve[i][key]["max"]) == (min(values), max(values))
    assert spread([0.3])["std"] == 0.0
    with pytest.raises(ValueError, match="share their budgets"):
        aggregate([seeds[0], seeds[1][:1]])


def test_compute_counts_a_backward_pass_as_two_forwards():
    assert compute({"forward": 100, "backward": 30}) == 160


def test_budgets_are_the_checkpoints_before_the_end_then_the_final_model(tmp_path):
    for step in (32, 64, 96, 128):  # the trainer also saved at the last step: the final model stands for it
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"max_steps": 128}))
    assert budgets(tmp_path) == [(32, 128, tmp_path / "checkpoint-32"), (64, 128, tmp_path / "checkpoint-64"),
                                 (96, 128, tmp_path / "checkpoint-96"), (128, 128, tmp_path)]


def test_best_of_n_takes_the_first_n_of_each_pool():
    candidates = [{"g": g, "j": j} for g in range(3) for j in range(4)]
    scores = torch.arange(12.0).reshape(12, 1)
    kept, kept_scores = first_of_groups(candidates, scores, 4, 2)
    assert [(c["g"], c["j"]) for c in kept] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert kept_scores.flatten().tolist() == [0.0, 1.0, 4.0, 5.0, 8.0, 9.0]


def test_morlhf_settings_without_checkpoints_keep_their_identity():
    assert "save_fraction" not in MORLHFSettings().record()
    assert MORLHFSettings(save_fraction=0.25).record()["save_fraction"] == 0.25


# ------------------------------------------------------------------------------------------------ the report


def point(helpful: float, harmless: float) -> dict:
    return {"name": "p", "helpful": {"mean": helpful, "stderr": 0.0}, "harmless": {"mean": harmless, "stderr": 0.0}}


OPTIMAL = [[0.2, 0.8], [0.8, 0.2]]  # hypervolume 0.2 * 0.8 + 0.6 * 0.2 = 0.28


def record(method, seed, lr, fronts, tokens):
    """A curve record: per budget a front (list of (helpful, harmless)) and its own token counts."""
    return {"method": method, "seed": seed, "learning_rate": lr,
            "curve": [{"budget": i + 1, "points": [point(*p) for p in front], "tokens": t, "wall_seconds": 1.0 + i}
                      for i, (front, t) in enumerate(zip(fronts, tokens))]}


def test_summary_adds_prerequisites_chooses_the_learning_rate_and_states_the_claims():
    prerequisite = {"tokens": {"forward": 1000, "backward": 500}, "wall_seconds": 10.0}
    seeds = {s: {"optimal_points": OPTIMAL, "prerequisites": {"harmless_dpo": prerequisite, "helpful_dpo": prerequisite}}
             for s in (0, 1)}
    small, full = [(0.1, 0.4), (0.4, 0.1)], OPTIMAL  # fractions 0.07 / 0.28 = 0.25 and 1
    tokens = [{"forward": 100, "backward": 100}, {"forward": 200, "backward": 200}]  # compute 300 and 600
    records = [record("modpo", s, lr, [small, full if lr == 3e-3 else small], tokens) for s in (0, 1) for lr in (1e-3, 3e-3)]
    records += [record("morlhf", s, 1e-3, [small, [(0.2, 0.7), (0.7, 0.2)]], tokens) for s in (0, 1)]
    meta = {"reference_point": [0.0, 0.0], "prerequisites_of": {"modpo": ["harmless_dpo"],
                                                               "morlhf": ["helpful_dpo", "harmless_dpo"]}}
    summary = summarize_curves(records, seeds, meta)
    modpo, morlhf = summary["modpo"], summary["morlhf"]
    assert modpo["chosen_learning_rate"] == 3e-3  # its final fraction 1.0 beats 1e-3's 0.25
    first = modpo["chosen"]["per_seed"][0][0]
    assert first["fraction"] == pytest.approx(staircase_area(small) / staircase_area(full))
    assert first["compute"] == 300 + (1000 + 2 * 500)  # own + the margin model, fwd + 2 bwd
    assert first["wall_seconds"] == pytest.approx(1.0 + 10.0)
    assert morlhf["chosen"]["per_seed"][0][0]["compute"] == 300 + 2 * 2000
    morlhf_final = staircase_area([(0.2, 0.7), (0.7, 0.2)]) / 0.28
    assert morlhf["chosen"]["final"]["mean"] == pytest.approx(morlhf_final)
    # MODPO reaches 0.9 between 2300 (fraction 0.25) and 2600 (fraction 1), MORLHF never does
    q = 0.25
    assert modpo["chosen"]["compute_to_threshold"] == pytest.approx(2300 + (0.9 - q) / (1 - q) * 300)
    assert morlhf_final < 0.9 and morlhf["chosen"]["compute_to_threshold"] is None
    verdicts = claims(summary)
    assert verdicts["a"]["modpo_minus_morlhf"]["mean"] == pytest.approx(1 - morlhf_final)
    assert verdicts["a"]["holds"] and verdicts["b"]["holds"] and verdicts["b"]["ratio_modpo_over_morlhf"] is None


def test_bad_seed_and_learning_rate_options_are_one_line_errors(capsys, tmp_path):
    assert main(["compare", "--output-dir", str(tmp_path / "a"), "--seeds", "0,x"]) != 0
    assert "--seeds" in capsys.readouterr().err
    assert main(["compare", "--output-dir", str(tmp_path / "b"), "--learning-rates", "1e-3"]) != 0
    assert "only with --seeds" in capsys.readouterr().err
    assert main(["compare", "--output-dir", str(tmp_path / "c"), "--seeds", "0,0"]) != 0
    assert "distinct seeds" in capsys.readouterr().err
    assert main(["compare", "--output-dir", str(tmp_path / "d"), "--seeds", "0", "--learning-rates", "-1"]) != 0
    assert "--learning-rates" in capsys.readouterr().err


def test_work_seconds_sum_the_runs_at_their_largest_budget_the_prerequisites_and_the_evaluations():
    from modpo.experiments.curves_report import work_seconds

    sampled = {**point(0.1, 0.2), "sampling_seconds": 2.0}
    records = [{"curve": [{"budget": 0, "points": [sampled] * 5, "wall_seconds": 0.0},  # the SFT model: not counted
                          {"budget": 10, "points": [sampled] * 5, "wall_seconds": 4.0},
                          {"budget": 20, "points": [sampled] * 5, "wall_seconds": 8.0}]}]
    seeds = {0: {"sft_wall_seconds": 3.0, "prerequisites": {"harmless_dpo": {"wall_seconds": 5.0}}}}
    assert work_seconds(records, seeds) == {"training": 8.0 + 3.0 + 5.0, "evaluation": 2.0 * 10}
