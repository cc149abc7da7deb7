"""`modpo front` end to end on the demo task (tiny model, few steps), and the front statistics by hand.

The report's numbers are recomputed here from what the sweep recorded (the samples in each point's
evaluation.json, scored with the task's exact rewards), and the non-dominated set and hypervolume from the
report's points by an independent method (brute force, inclusion-exclusion, grid counting).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import random
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

import tiny
from modpo.cli import main
from modpo.demo import task
from modpo.front.report import hypervolume, mean_and_stderr, non_dominated

WEIGHTS = [[0.2, 0.8], [0.8, 0.2]]
NAMES = ["w0.2_0.8", "w0.8_0.2"]
SFT_STEPS = 40
PROMPTS, SAMPLES = 6, 2  # 12 samples per point: all of them are kept in evaluation.json (it keeps 20)
TRAINING = {"use_cpu": True, "report_to": [], "save_strategy": "no", "max_steps": 2, "per_device_train_batch_size": 8,
            "disable_tqdm": True, "seed": 0, "append_eos": False, "max_length": 8, "learning_rate": 1e-2}


# ------------------------------------------------------------------------------------- independent maths


def box_union_volume(points: list[list[float]], reference: list[float]) -> float:
    """Volume of the union of the boxes [reference, p], by inclusion-exclusion over every subset."""
    total = 0.0
    for size in range(1, len(points) + 1):
        for subset in itertools.combinations(points, size):
            corner = [min(values) for values in zip(*subset)]
            total += (-1) ** (size + 1) * math.prod(max(0.0, c - r) for c, r in zip(corner, reference))
    return total


def grid_volume(points: list[list[int]], reference: list[int]) -> int:
    """Dominated volume for integer points: count the unit cells whose centre some point dominates."""
    top = [max(p[k] for p in points) for k in range(len(reference))]
    cells = itertools.product(*[range(r, t) for r, t in zip(reference, top)])
    return sum(any(all(c + 0.5 < x for c, x in zip(cell, p)) for p in points) for cell in cells)


def brute_non_dominated(points: list[list[float]]) -> list[int]:
    def beaten(p, q):  # q at least as good everywhere and not the same point
        return all(b >= a for a, b in zip(p, q)) and list(q) != list(p)

    return [i for i, p in enumerate(points) if not any(beaten(p, q) for q in points)]


# ------------------------------------------------------------------------------------- report unit tests


def test_hypervolume_hand_checked_2d():
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [0, 0]) == pytest.approx(6.0)  # staircase 3 + 2 + 1
    assert hypervolume([[2, 1], [1, 2]], [0, 0]) == pytest.approx(2 + 2 - 1)  # two boxes, overlap 1x1
    assert hypervolume([[2, 1], [1, 2]], [0.5, 0.5]) == pytest.approx(0.75 + 0.75 - 0.25)  # 1.5 x 0.5 each
    assert hypervolume([[1, 1]], [0, 0]) == pytest.approx(1.0)


def test_hypervolume_hand_checked_3d():
    assert hypervolume([[1, 1, 1]], [0, 0, 0]) == pytest.approx(1.0)
    # three 2x1x1 boxes along different axes: 3 * 2 - 3 * 1 + 1 = 4
    assert hypervolume([[2, 1, 1], [1, 2, 1], [1, 1, 2]], [0, 0, 0]) == pytest.approx(4.0)
    assert hypervolume([[3, 2, 1], [1, 1, 4]], [0, 0, 0]) == pytest.approx(6 + 4 - 1)


def test_hypervolume_edge_cases():
    assert hypervolume([], [0, 0]) == 0.0
    assert hypervolume([[1, 0], [0, 5], [-1, 9]], [0, 0]) == 0.0  # not strictly above the reference
    assert hypervolume([[4.0], [2.5]], [1.0]) == pytest.approx(3.0)
    # a dominated point and a duplicate add nothing
    assert hypervolume([[2, 2], [1, 1], [2, 2]], [0, 0]) == pytest.approx(4.0)


def test_hypervolume_matches_grid_counting():
    rng = random.Random(0)
    for dims, n in ((2, 6), (3, 8), (3, 3), (4, 5)):
        points = [[rng.randint(1, 5) for _ in range(dims)] for _ in range(n)]
        assert hypervolume(points, [0] * dims) == pytest.approx(grid_volume(points, [0] * dims)), points


def test_hypervolume_matches_inclusion_exclusion():
    rng = random.Random(1)
    for dims, n in ((2, 7), (3, 6), (4, 5)):
        reference = [rng.uniform(-1, 0) for _ in range(dims)]
        points = [[rng.uniform(-1.5, 1) for _ in range(dims)] for _ in range(n)]  # some below the reference
        assert hypervolume(points, reference) == pytest.approx(box_union_volume(points, reference), rel=1e-9)


def test_non_dominated():
    points = [[1, 3], [2, 2], [3, 1], [1, 1], [2, 2], [0, 3]]
    assert non_dominated(points) == [0, 1, 2, 4]  # equal points do not dominate each other
    rng = random.Random(2)
    for dims in (2, 3):
        for _ in range(20):
            points = [[rng.randint(0, 3) for _ in range(dims)] for _ in range(rng.randint(1, 8))]
            assert non_dominated(points) == brute_non_dominated(points), points


def test_mean_and_stderr():
    values = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]
    mean, stderr = mean_and_stderr(values)
    assert mean == pytest.approx(5.0)
    assert stderr == pytest.approx(math.sqrt(32 / 7 / 8))  # sample variance 32/7, n = 8
    assert stderr == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
    assert mean_and_stderr([3.5]) == (3.5, 0.0)
    assert mean_and_stderr([1.0, 1.0, 1.0]) == (1.0, 0.0)


# ------------------------------------------------------------------------------------------- modpo front


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    """`modpo sft` (so that most samples are well-formed), then `modpo front` on the demo task: two weight
    vectors, two MODPO steps each, helpfulness as preference pairs and harmlessness as margin columns."""
    folder = tmp_path_factory.mktemp("front")
    tok = task.tokenizer()
    init = tiny.save(tiny.model(len(tok), seed=0), tok, folder / "init")
    sft_data, data = folder / "sft.jsonl", folder / "helpful.jsonl"
    sft_data.write_text("".join(json.dumps(r) + "\n" for r in task.sft_rows(SFT_STEPS * 16, seed=0)))
    data.write_text("".join(json.dumps(r) + "\n" for r in task.preference_rows(16, "helpful", seed=1)))
    sft = {"use_cpu": True, "report_to": [], "save_strategy": "no", "disable_tqdm": True, "seed": 0,
           "max_steps": SFT_STEPS, "per_device_train_batch_size": 16, "learning_rate": 3e-3, "max_length": 16}
    harmless = {"chosen_harmless": "chosen_harmless", "rejected_harmless": "rejected_harmless"}
    config = {
        "output_dir": str(folder / "report"),
        "weights": WEIGHTS,
        "train": {"model": str(folder / "sft"),
                  "train_data": {"loader": "jsonl", "path": str(data), "columns": harmless},
                  "margins": [{"type": "columns", "chosen": ["chosen_harmless"], "rejected": ["rejected_harmless"]}],
                  "training": TRAINING},
        "evaluation": {"prompts": task.eval_prompts(PROMPTS, seed=3), "samples_per_prompt": SAMPLES,
                       "max_new_tokens": task.RESPONSE_LENGTH, "min_new_tokens": task.RESPONSE_LENGTH,
                       "temperature": 1.0, "seed": 0, "evaluators": [{"type": "demo_exact"}]},
    }
    path = folder / "front.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MODPO_CACHE", str(folder / "cache"))
        assert main(["sft", f"model={init}", f"output_dir={folder / 'sft'}", f"train_data={sft_data}",
                     f"training={json.dumps(sft)}"]) == 0
        assert main(["front", "--config", str(path)]) == 0
    return str(path), Path(config["output_dir"]), config


def load_report(out: Path) -> dict:
    return json.loads((out / "front.json").read_text())


def point_files(out: Path) -> dict[str, int]:
    return {f"{name}/{file}": (out / "points" / name / file).stat().st_mtime_ns
            for name in NAMES for file in ("modpo_run.json", "evaluation.json", "model.safetensors")}


def test_front_writes_the_report(front):
    _, out, config = front
    for name in ("front.md", "front.json", "front.csv", "front.png"):
        assert (out / name).is_file(), name
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = load_report(out)
    assert doc["objectives"] == list(task.OBJECTIVES)
    assert [p["name"] for p in doc["points"]] == NAMES
    assert [p["weights"] for p in doc["points"]] == WEIGHTS
    assert doc["num_prompts"] == PROMPTS
    assert all(p["n"] == PROMPTS * SAMPLES for p in doc["points"])
    for name, weights in zip(NAMES, WEIGHTS):
        record = json.loads((out / "points" / name / "modpo_run.json").read_text())
        assert record["stage"] == "train" and record["weights"] == weights


def test_front_points_recomputed_from_the_samples(front):
    """Each point's mean, standard error and malformed count, from its recorded samples and exact rewards."""
    _, out, config = front
    for point in load_report(out)["points"]:
        record = json.loads((out / "points" / point["name"] / "evaluation.json").read_text())
        samples = record["samples"]
        assert len(samples) == point["n"]
        assert [s["prompt"] for s in samples] == [p for p in config["evaluation"]["prompts"] for _ in range(SAMPLES)]
        scores = [task.rewards(s["prompt"], s["response"]) for s in samples]
        assert point["malformed"] == sum(s is None for s in scores)
        assert point["malformed"] < point["n"], "after SFT most samples should be well-formed"
        for k, objective in enumerate(task.OBJECTIVES):
            values = [0.0 if s is None else s[k] for s in scores]
            assert point[objective]["mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
            assert point[objective]["stderr"] == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)),
                                                               abs=1e-12)


def test_front_json_csv_and_table_agree(front):
    _, out, _ = front
    doc = load_report(out)
    with open(out / "front.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["point"] for r in rows] == NAMES
    for row, point in zip(rows, doc["points"]):
        assert [float(w) for w in row["weights"].split()] == point["weights"]
        assert int(row["n"]) == point["n"] and int(row["malformed"]) == point["malformed"]
        for objective in doc["objectives"]:
            for stat in ("mean", "stderr"):
                assert float(row[f"{objective}_{stat}"]) == point[objective][stat]  # written exactly
    table = (out / "front.md").read_text()
    for point in doc["points"]:
        (line,) = [line for line in table.splitlines() if line.startswith(f"| {point['name']} |")]
        cells = [c.strip() for c in line.strip("|").split("|")]
        for cell, objective in zip(cells[2:4], doc["objectives"]):
            assert cell == f"{point[objective]['mean']:.3f} ± {point[objective]['stderr']:.3f}"
        assert cells[4] == ("yes" if point["name"] in doc["non_dominated"] else "")
    assert f"Hypervolume {doc['hypervolume']:.4f}" in table


def test_front_statistics_recomputed(front):
    _, out, _ = front
    doc = load_report(out)
    means = [[p[o]["mean"] for o in doc["objectives"]] for p in doc["points"]]
    assert doc["reference_point_rule"] == "per-objective minimum over points"
    assert doc["reference_point"] == [min(column) for column in zip(*means)]
    assert doc["non_dominated"] == [doc["points"][i]["name"] for i in brute_non_dominated(means)]
    assert doc["hypervolume"] == pytest.approx(box_union_volume(means, doc["reference_point"]), abs=1e-12)


def test_front_rerun_trains_and_samples_nothing(capsys, monkeypatch, front):
    from modpo.trainer import MODPOTrainer

    path, out, _ = front
    before, points = point_files(out), load_report(out)["points"]

    def forbidden(*args, **kwargs):
        raise AssertionError("a rerun of a finished front must not train or sample")

    monkeypatch.setattr(MODPOTrainer, "train", forbidden)
    monkeypatch.setattr("modpo.front.sweep.sample_responses", forbidden)
    assert main(["front", "--config", path]) == 0
    stdout = capsys.readouterr().out
    assert stdout.strip() == (out / "front.md").read_text().strip()
    assert point_files(out) == before
    assert load_report(out)["points"] == points


def test_front_redoes_only_a_deleted_point(capsys, monkeypatch, front):
    from modpo.front import sweep
    from modpo.trainer import MODPOTrainer

    path, out, _ = front
    before, points = point_files(out), load_report(out)["points"]
    shutil.rmtree(out / "points" / NAMES[1])
    trained, sampled = [], []
    real_train, real_sample = MODPOTrainer.train, sweep.sample_responses

    def train(self, *args, **kwargs):
        trained.append(self.args.weights)
        return real_train(self, *args, **kwargs)

    def sample(*args, **kwargs):
        sampled.append(kwargs.get("desc"))
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(MODPOTrainer, "train", train)
    monkeypatch.setattr(sweep, "sample_responses", sample)
    assert main(["front", "--config", path]) == 0
    capsys.readouterr()
    assert trained == [WEIGHTS[1]]
    assert sampled == [f"sampling {NAMES[1]}"]
    after = point_files(out)
    assert {k: v for k, v in after.items() if k.startswith(NAMES[0])} == \
           {k: v for k, v in before.items() if k.startswith(NAMES[0])}
    assert all(after[k] != before[k] for k in after if k.startswith(NAMES[1]))
    # same seed, same data: the redone point is the point it replaced
    redone = load_report(out)["points"]
    for old, new in zip(points, redone):
        for objective in task.OBJECTIVES:
            assert new[objective] == pytest.approx(old[objective], abs=1e-12)


def test_front_samples_again_for_a_torn_evaluation_record(capsys, monkeypatch, front):
    """evaluation.json is a record of work done: a torn one is ignored (with a warning) and made again."""
    from modpo.front import sweep
    from modpo.trainer import MODPOTrainer

    path, out, _ = front
    points = load_report(out)["points"]
    record = out / "points" / NAMES[0] / "evaluation.json"
    record.write_text(record.read_text()[:50])
    sampled, real_sample = [], sweep.sample_responses

    def sample(*args, **kwargs):
        sampled.append(kwargs.get("desc"))
        return real_sample(*args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("the trained points are intact: nothing to train")

    monkeypatch.setattr(MODPOTrainer, "train", forbidden)
    monkeypatch.setattr(sweep, "sample_responses", sample)
    assert main(["front", "--config", path]) == 0
    capsys.readouterr()
    assert sampled == [f"sampling {NAMES[0]}"]
    assert json.loads(record.read_text())["point"][task.OBJECTIVES[0]] == points[0][task.OBJECTIVES[0]]
