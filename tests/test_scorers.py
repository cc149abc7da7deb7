"""Installed scorers as margin sources and evaluators (`modpo.scorers`, `modpo.scorer_margins`)."""

from __future__ import annotations

import importlib
import sys

import pytest
from datasets import Dataset
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from modpo.errors import ConfigError, DataError
from modpo.front.evaluators import build_evaluators
from modpo.margin_specs import margin_sources
from modpo.margins import compute_margin_rewards
from modpo.scorers import parse_spec
from modpo.settings_check import check_margin_settings

TEXTS = ["I love this, it is wonderful!", "This is terrible and I hate it.", "The train leaves at noon.",
         "What a great, happy day.", "Awful. Just awful.", "Fine."]
PAIRS = Dataset.from_list([{"prompt": f"q{i}", "chosen": TEXTS[i], "rejected": TEXTS[-1 - i]} for i in range(3)])

FAKE = '''
CALLS = []

def words(text):
    CALLS.append(text)
    return float(len(text.split()))

def rated(prompts, responses, offset=0.0):
    return [{"score": len(p) - len(r) + offset} for p, r in zip(prompts, responses)]

def broken(text):
    return "n/a" if "awful" in text.lower() else 1.0
'''


def install_fake(root, version: str):
    """A package `fakescorer` installed as distribution fake-scorer==version (a dist-info folder on sys.path)."""
    (root / "fakescorer").mkdir(exist_ok=True)
    (root / "fakescorer" / "__init__.py").write_text(FAKE)
    for old in root.glob("fake_scorer-*.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    info = root / f"fake_scorer-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-scorer\nVersion: {version}\n")
    (info / "top_level.txt").write_text("fakescorer\n")
    importlib.invalidate_caches()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    install_fake(tmp_path, "1.0")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("fakescorer", None)


def test_vader_margin_equals_calling_vader_by_hand():
    (source,) = margin_sources([{"type": "scorer", "preset": "vader_sentiment"}], None, 512)
    scores = source.score_pairs(PAIRS)
    analyzer = SentimentIntensityAnalyzer()
    for side in ("chosen", "rejected"):
        by_hand = [analyzer.polarity_scores(text)["compound"] for text in PAIRS[side]]
        assert scores[side][:, 0].tolist() == pytest.approx(by_hand, abs=1e-6)
    assert source.identity()["package"] == "vaderSentiment" and source.identity()["version"] == "3.3.2"


def test_chat_responses_are_scored_on_their_content():
    chat = Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}],
                               "chosen": [{"role": "assistant", "content": TEXTS[0]}],
                               "rejected": [{"role": "assistant", "content": TEXTS[1]}]}])
    (source,) = margin_sources([{"type": "scorer", "preset": "vader_sentiment"}], None, 512)
    analyzer = SentimentIntensityAnalyzer()
    assert source.score(chat, "chosen")[0, 0].item() == pytest.approx(analyzer.polarity_scores(TEXTS[0])["compound"])


def test_profanity_preset_scores_profane_text_lower():
    (source,) = margin_sources([{"type": "scorer", "preset": "non_profanity"}], None, 512)
    clean, profane = source.score(Dataset.from_list([{"prompt": "", "r": "Have a nice day."},
                                                     {"prompt": "", "r": "fuck this shit"}]), "r")[:, 0].tolist()
    assert -1 <= profane < clean <= 0


def test_cache_identity_follows_the_package_version(fake, tmp_path):
    spec = [{"type": "scorer", "callable": "fakescorer:words"}]
    cache = tmp_path / "cache"
    first = compute_margin_rewards(margin_sources(spec, None, 512), PAIRS, cache_dir=cache)
    calls = importlib.import_module("fakescorer").CALLS
    assert len(calls) == 2 * len(PAIRS)
    again = compute_margin_rewards(margin_sources(spec, None, 512), PAIRS, cache_dir=cache)
    assert len(calls) == 2 * len(PAIRS), "same package version: the cached margins are reused"
    assert all((a == b).all() for a, b in zip(first, again))
    install_fake(fake, "2.0")
    (source,) = margin_sources(spec, None, 512)
    assert source.identity()["version"] == "2.0" and source.identity()["package"] == "fake-scorer"
    compute_margin_rewards([source], PAIRS, cache_dir=cache)
    assert len(calls) == 4 * len(PAIRS), "a new version of the scorer recomputes its margins"


def test_a_missing_package_is_refused_in_one_line_naming_the_install(tmp_path):
    with pytest.raises(ConfigError) as err:
        check_margin_settings([{"type": "scorer", "callable": "no_such_scorer_pkg.sub:score",
                                "package": "no-such-scorer"}])
    message = str(err.value)
    assert "\n" not in message and "pip install no-such-scorer" in message and "margins[0]" in message
    assert "no_such_scorer_pkg" not in sys.modules
    with pytest.raises(ConfigError, match="pip install no_such_scorer_pkg"):
        parse_spec({"callable": "no_such_scorer_pkg:score"}, "evaluation.evaluators[0]")


@pytest.mark.parametrize("spec, message", [
    ({"callable": "fakescorer:words", "kwarg": {}}, "unknown key(s) kwarg"),
    ({"callable": "fakescorer.words"}, "give 'package.module:attribute'"),
    ({"preset": "vader"}, "unknown preset 'vader'"),
    ({"callable": "fakescorer:words", "inputs": "prompt"}, "inputs = 'prompt'"),
    ({"callable": "fakescorer:words", "batched": "yes"}, "batched = 'yes'"),
])
def test_bad_scorer_specs_are_one_line(fake, spec, message):
    with pytest.raises(ConfigError) as err:
        parse_spec(spec, "margins[0]")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_batched_prompt_response_field_kwargs_and_negate(fake):
    (source,) = margin_sources([{"type": "scorer", "callable": "fakescorer:rated", "batched": True,
                                 "inputs": "prompt_response", "field": "score", "kwargs": {"offset": 0.5},
                                 "negate": True, "name": "rated"}], None, 512)
    assert source.objective_names() == ["rated"]
    scores = source.score_pairs(PAIRS)
    for side in ("chosen", "rejected"):
        expected = [-(len(p) - len(r) + 0.5) for p, r in zip(PAIRS["prompt"], PAIRS[side])]
        assert scores[side][:, 0].tolist() == pytest.approx(expected)


def test_a_scorer_that_returns_no_number_names_the_row(fake):
    (source,) = margin_sources([{"type": "scorer", "callable": "fakescorer:broken", "batch_size": 2}], None, 512)
    data = Dataset.from_list([{"prompt": "", "response": t} for t in TEXTS])
    with pytest.raises(DataError) as err:
        source.score(data, "response")
    assert "row 5" in str(err.value) and "'n/a'" in str(err.value) and "response" in str(err.value)


def test_the_scorer_as_evaluator_gives_the_margin_values():
    (evaluator,) = build_evaluators([{"type": "scorer", "preset": "vader_sentiment", "names": ["sentiment"]}])
    samples = [{"prompt": "q", "response": t} for t in TEXTS]
    scores, malformed = evaluator.score(samples)
    (source,) = margin_sources([{"type": "scorer", "preset": "vader_sentiment"}], None, 512)
    by_margin = source.score(Dataset.from_list(samples), "response")[:, 0]
    assert evaluator.objectives == ("sentiment",) and malformed == 0
    assert scores[:, 0].tolist() == pytest.approx(by_margin.tolist())

