"""The committed responses of the sentiment_brevity results (docs/results/sentiment_brevity) re-scored.

Every evaluated point's samples are committed with the scores they were given. Here each response is scored again
twice, by the scorer package called by hand and by modpo's evaluator built from the recipe's own evaluator specs,
and the means and standard errors are recomputed from the text and held against methods.json.
"""

import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

import modpo
from modpo.front.evaluators import build_evaluators, score_samples

vader = pytest.importorskip("vaderSentiment.vaderSentiment")

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "sentiment_brevity"


def methods() -> dict:
    return json.loads((RESULTS / "methods.json").read_text())


def samples(point: dict) -> list[dict]:
    path = RESULTS / "samples" / f"{point['method']}_{point['name']}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """By the standard library, independently of `modpo.front.report`, which wrote the numbers under test."""
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def test_every_point_has_its_samples_committed():
    points = methods()["points"]
    assert {p["method"] for p in points} >= {"base", "modpo_rule", "morlhf", "soups"}
    for point in points:
        assert len(samples(point)) == point["n"] > 0


def test_means_recomputed_by_calling_the_scorer_by_hand():
    analyzer = vader.SentimentIntensityAnalyzer()
    for point in methods()["points"]:
        rows = samples(point)
        sentiment = [analyzer.polarity_scores(r["response"])["compound"] for r in rows]
        minus_words = [-float(len(r["response"].split())) for r in rows]
        for r, s, m in zip(rows, sentiment, minus_words):
            assert r["scores"]["sentiment"] == pytest.approx(s, abs=1e-6)  # scored through float32
            assert r["scores"]["minus_words"] == m
        for objective, values in (("sentiment", sentiment), ("minus_words", minus_words)):
            mean, stderr = mean_and_stderr(values)
            assert point[objective]["mean"] == pytest.approx(mean, abs=1e-6), (point["method"], point["name"])
            assert point[objective]["stderr"] == pytest.approx(stderr, rel=1e-4)


def test_means_recomputed_by_the_recipes_evaluators():
    recipe = yaml.safe_load((Path(modpo.__file__).parent / "recipes" / "sentiment_brevity.yaml").read_text())
    front = next(stage for stage in recipe["stages"] if stage["command"] == "front")
    evaluators = build_evaluators(front["config"]["evaluation"]["evaluators"])
    for point in methods()["points"]:
        scores, malformed, objectives = score_samples(evaluators, samples(point))
        assert malformed == 0 and objectives == ("sentiment", "minus_words")
        for k, objective in enumerate(objectives):
            assert point[objective]["mean"] == pytest.approx(scores[:, k].mean().item(), abs=1e-9)
