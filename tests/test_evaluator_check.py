"""A learned evaluator is checked before a front trusts it: its held-out pairwise accuracy, against a floor.

The accuracy is recomputed here from the pairs themselves, with a rule evaluator (minus the word count) whose
score of every response is known."""

from __future__ import annotations

import json
import logging
import math

import pytest

from modpo.errors import ConfigError
from modpo.front.evaluators import build_evaluators
from modpo.front.report import write_report
from modpo.front.sweep import check_evaluators

# (chosen, rejected): the shorter response wins under minus-words in rows 0, 1 and 3; row 2 is a tie
ROWS = [("yes", "yes it is"), ("no", "no it is not"), ("a b", "c d"), ("one two three", "one two three four five")]


def pairs_file(tmp_path):
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": c, "rejected": r}) + "\n"
                            for i, (c, r) in enumerate(ROWS)))
    return path


def expected_accuracy() -> float:
    wins = sum(len(c.split()) < len(r.split()) for c, r in ROWS)
    ties = sum(len(c.split()) == len(r.split()) for c, r in ROWS)
    return (wins + 0.5 * ties) / len(ROWS)


@pytest.mark.parametrize("floor", [0.6, 0.95])
def test_held_out_accuracy_against_the_floor(tmp_path, caplog, floor):
    evaluators = build_evaluators([{"type": "length_penalty", "names": ["brevity"],
                                    "check": {"pairs": str(pairs_file(tmp_path)), "floor": floor}}])
    said = []
    with caplog.at_level(logging.WARNING, logger="modpo.front.sweep"):
        (check,) = check_evaluators(evaluators, tmp_path / "front", said.append)
    accuracy = expected_accuracy()  # 3.5 / 4
    assert check["accuracy"] == pytest.approx(accuracy)
    assert check["stderr"] == pytest.approx(math.sqrt(accuracy * (1 - accuracy) / len(ROWS)))
    assert check["pairs"] == len(ROWS) and check["objective"] == "brevity"
    assert check["usable"] == (accuracy >= floor)
    assert said == [f"evaluator brevity: held-out pairwise accuracy {accuracy:.3f} ± {check['stderr']:.3f} on "
                    f"{len(ROWS)} pairs (floor {floor:g})"]
    assert ("is not usable" in caplog.text) == (accuracy < floor)
    # the report shows it beside the front
    points = [{"name": "a", "weights": [1.0], "n": 1, "malformed": 0, "brevity": {"mean": -1.0, "stderr": 0.0}}]
    document = write_report(tmp_path / "report", points, ("brevity",), [-2.0], {"evaluator_checks": [check]})
    assert document["evaluator_checks"] == [check]
    text = (tmp_path / "report" / "front.md").read_text()
    assert f"| {accuracy:.3f} ± {check['stderr']:.3f} | {floor:g} |" in text
    assert ("does not rank the points" in text) == (accuracy < floor)


def test_a_check_is_measured_once(tmp_path, monkeypatch):
    spec = [{"type": "length_penalty", "check": {"pairs": str(pairs_file(tmp_path))}}]
    first = check_evaluators(build_evaluators(spec), tmp_path / "front", lambda line: None)
    monkeypatch.setattr("modpo.front.sweep.pairwise_accuracy", lambda *a: pytest.fail("measured again"))
    assert check_evaluators(build_evaluators(spec), tmp_path / "front", lambda line: None) == first
    assert first[0]["floor"] == 0.6  # the default


@pytest.mark.parametrize("check, message", [
    ({"floor": 0.6}, "check: give {pairs: <held-out preference rows>, floor: 0.6}"),
    ({"pairs": "x.jsonl", "flor": 0.6}, "check: give {pairs"),
    ({"pairs": "x.jsonl", "floor": 1.5}, "check.floor: an accuracy between 0 and 1, got 1.5"),
])
def test_a_malformed_check_is_refused(check, message):
    with pytest.raises(ConfigError, match="evaluation.evaluators\\[0\\]." + message.replace("{", "\\{").replace("[", "\\[")):
        build_evaluators([{"type": "length_penalty", "check": check}])
