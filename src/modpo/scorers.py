"""Installed scorers: any function of an installed package that maps a response (or a prompt and a response) to a
number, named by its import path, so it can be a margin source (`modpo.scorer_margins`) or a front's evaluator.

    {type: scorer, preset: vader_sentiment}                       # a shipped name for a known scorer
    {type: scorer, callable: "profanity_check:predict_prob",       # module:attribute
     batched: true, negate: true, name: non_profanity}             # batched: a list of texts in, a list out
    {type: scorer, callable: "vaderSentiment.vaderSentiment:SentimentIntensityAnalyzer",
     construct: true, method: polarity_scores, field: compound}     # an object built once, a method, a field of it

The package that provides the module is found with `importlib.metadata`; its name and version are part of every
cache key, so upgrading a scorer recomputes its margins. A module that is not installed is refused before anything
loads, in one line naming the `pip install` that provides it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
import dataclasses

from modpo.errors import ConfigError

INPUTS = ("response", "prompt_response")


@dataclasses.dataclass(frozen=True)
class ScorerSpec:
    callable: str                      # "package.module:attribute"
    name: str = ""                     # the objective's name (default: the attribute's, or the preset's)
    construct: bool | dict = False     # call the attribute once (with these kwargs) and score with the object made
    method: str | None = None          # score with this method of the object
    field: str | int | None = None     # take this key (or index) of what the scorer returns
    kwargs: dict = dataclasses.field(default_factory=dict)  # keyword arguments of every scoring call
    batched: bool = False              # the scorer takes a list of inputs and returns one value per input
    inputs: str = "response"           # "response": f(response); "prompt_response": f(prompt, response)
    negate: bool = False               # score = -value (e.g. a toxicity probability as a non-toxicity reward)
    package: str | None = None         # the pip name that provides the module (default: found by importlib.metadata)

    @property
    def module(self) -> str:
        return self.callable.split(":", 1)[0]

    def record(self) -> dict:
        return dataclasses.asdict(self)


# Scorers shipped by name; each is the package's own public API, used unmodified.
PRESETS: dict[str, dict] = {
    # VADER's compound sentiment in [-1, 1] (lexicon and rules; pip install vaderSentiment)
    "vader_sentiment": {"callable": "vaderSentiment.vaderSentiment:SentimentIntensityAnalyzer", "construct": True,
                        "method": "polarity_scores", "field": "compound", "name": "sentiment",
                        "package": "vaderSentiment"},
    # minus the profanity probability of a trained linear classifier (pip install alt-profanity-check)
    "non_profanity": {"callable": "profanity_check:predict_prob", "batched": True, "negate": True,
                      "name": "non_profanity", "package": "alt-profanity-check"},
}
KEYS = {"preset", *ScorerSpec.__dataclass_fields__}


def parse_spec(spec: dict, where: str) -> ScorerSpec:
    """A scorer's settings (the mapping without `type`/`scale`), checked without importing the scorer: unknown
    keys, the callable's form, the inputs, and that its module is installed."""
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} for a scorer (known: {', '.join(sorted(KEYS))})")
    spec = dict(spec)
    preset = spec.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"{where}: unknown preset {preset!r} ({', '.join(PRESETS)})")
        spec = {**PRESETS[preset], **spec}
    target = spec.get("callable")
    if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
        raise ConfigError(f"{where}: callable = {target!r}: give 'package.module:attribute' (or a preset: "
                          f"{', '.join(PRESETS)})")
    for key in ("batched", "negate"):
        if not isinstance(spec.get(key, False), bool):
            raise ConfigError(f"{where}: {key} = {spec[key]!r}: expected true or false")
    if not isinstance(spec.get("construct", False), (bool, dict)):
        raise ConfigError(f"{where}: construct = {spec['construct']!r}: expected true, false or a mapping of kwargs")
    if not isinstance(spec.get("kwargs", {}), dict):
        raise ConfigError(f"{where}: kwargs = {spec['kwargs']!r}: expected a mapping")
    if spec.get("inputs", "response") not in INPUTS:
        raise ConfigError(f"{where}: inputs = {spec['inputs']!r}: expected one of {', '.join(INPUTS)}")
    spec.setdefault("name", target.split(":")[1].split(".")[-1])
    parsed = ScorerSpec(**spec)
    top = parsed.module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        raise ConfigError(f"{where}: scorer {target} needs the Python package that provides '{top}', which is not "
                          f"installed: pip install {parsed.package or top}")
    return parsed


def package_of(spec: ScorerSpec) -> tuple[str, str]:
    """(distribution name, version) of the installed package that provides the scorer's module."""
    top = spec.module.split(".")[0]
    names = [spec.package] if spec.package else importlib.metadata.packages_distributions().get(top, [])
    for name in names:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return top, "unknown"  # a module on the path but not installed as a distribution (e.g. a local file)


def text(value) -> str:
    """A prompt or response as the text a scorer reads: a chat conversation gives its last message's content."""
    if isinstance(value, list):
        return str(value[-1].get("content", "")) if value and isinstance(value[-1], dict) else ""
    return str(value)


class ScoreError(ValueError):
    """A scorer's output that is no finite number: `row` is the 0-based input it came from (None: the whole call)."""

    def __init__(self, row: int | None, message: str):
        self.row, self.message = row, message
        super().__init__(message if row is None else f"row {row + 1}: {message}")


class Scorer:
    """The scorer a spec names, imported and (where `construct`) built once; `scores(prompts, responses)` gives one
    finite float per response, or raises ScoreError naming the first bad one."""

    def __init__(self, spec: ScorerSpec):
        self.spec = spec
        module, attribute = spec.callable.split(":")
        target = importlib.import_module(module)
        for part in attribute.split("."):
            target = getattr(target, part)
        if spec.construct is not False:
            target = target(**(spec.construct if isinstance(spec.construct, dict) else {}))
        self.fn = getattr(target, spec.method) if spec.method else target

    def _value(self, raw):
        if self.spec.field is not None:
            try:
                raw = raw[self.spec.field]
            except (KeyError, IndexError, TypeError):
                return None
        if hasattr(raw, "item"):  # a numpy or torch scalar
            raw = raw.item()
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
            return None
        return -float(raw) if self.spec.negate else float(raw)

    def scores(self, prompts: list, responses: list) -> list[float]:
        responses = [text(r) for r in responses]
        args = (responses,) if self.spec.inputs == "response" else ([text(p) for p in prompts], responses)
        if self.spec.batched:
            raw = list(self.fn(*args, **self.spec.kwargs))
            if len(raw) != len(responses):
                raise ScoreError(None, f"scorer {self.spec.callable} returned {len(raw)} values for {len(responses)} "
                                       "inputs")
        else:
            raw = [self.fn(*one, **self.spec.kwargs) for one in zip(*args)]
        out = []
        for row, value in enumerate(raw):
            number = self._value(value)
            if number is None:
                at = "" if self.spec.field is None else f" at {self.spec.field!r}"
                raise ScoreError(row, f"scorer {self.spec.callable} returned {value!r}; expected a finite number{at}")
            out.append(number)
        return out
