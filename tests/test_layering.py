"""The package's layering, checked on its import graph: arrows point one way, down the layers below.

A module imports only modules of its own layer or of lower ones (and the graph has no cycle); every import of a
`modpo` module sits at the top of its file; no file is longer than one sitting's read. A new module must be given
a layer here, which is the point: its place in the design is decided, not found out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "modpo"
MAX_LINES = 400

# Bottom first. A batch travels up this table: JSONL -> data.loaders -> data.formats (checks) -> data.encode (ids)
# -> [precompute: reference, margins] -> batch (layouts) -> logps -> loss, driven by trainer.
LAYERS = [
    ("core", ["errors", "guard", "loss", "cache", "data.encode", "packing", "settings_check", "margin_scale",
              "conditioning", "weight_embedding", "progress", "scorers", "callable_identity"]),
    ("layouts", ["batch", "data.formats", "data.loaders.*"]),
    ("log-probs", ["logps"]),
    ("loading and settings", ["models", "config", "run_config", "run_records", "distributed_precompute", "preflight",
                              "resolved"]),
    ("precompute", ["reference", "margins", "scorer_margins", "margin_specs", "demo.task", "demo.optimum", "precompute"]),
    ("trainer", ["trainer"]),
    ("stages", ["stages", "front.generate", "front.divergence", "front.report"]),
    ("fronts", ["front.evaluators", "front.sweep", "front.steer", "labeling"]),
    ("recipes and demo", ["recipes", "demo.pipeline", "demo.evaluator"]),
    ("baselines (clients)", ["baselines.*"]),
    ("experiments (clients)", ["experiments.*"]),
    ("command line", ["cli"]),
]
FACADES = {"modpo", "modpo.data", "modpo.data.loaders", "modpo.demo", "modpo.front", "modpo.baselines",
           "modpo.experiments"}  # package __init__ files: re-exports only


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def layer_of(name: str) -> int | None:
    short = name.removeprefix("modpo.")
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            if short == member or (member.endswith(".*") and short.startswith(member[:-1])):
                return index
    return None


def imports(path: Path, known: set[str]) -> tuple[set[str], list[int]]:
    """(modpo modules imported at the top of the file, line numbers of modpo imports anywhere else)."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found, local = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "modpo":
            # `from modpo.demo import task` imports the module modpo.demo.task
            targets = {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                       for a in node.names}
        elif isinstance(node, ast.Import):
            targets = {a.name for a in node.names if a.name.split(".")[0] == "modpo"}
        else:
            continue
        if not targets:
            continue
        if id(node) in top_level:
            found |= targets
        else:
            local.append(node.lineno)
    return found, local


def graph() -> dict[str, set[str]]:
    known = set(modules())
    return {name: imports(path, known)[0] for name, path in modules().items()}


def test_every_module_has_a_layer():
    missing = [name for name in modules() if name not in FACADES and layer_of(name) is None]
    assert not missing, f"give these modules a layer in LAYERS: {missing}"


def climbs(edges: dict[str, set[str]]) -> list[str]:
    out = []
    for name, targets in edges.items():
        if name in FACADES:
            continue
        for target in sorted(targets - FACADES):
            if layer_of(target) > layer_of(name):
                out.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    return out


def test_no_module_imports_one_above_it():
    found = climbs(graph())
    assert not found, "\n".join(found)


def test_facades_import_no_client():
    """`import modpo` loads the core a user needs, never the command line, experiments or baselines."""
    clients = {i for i, (label, _) in enumerate(LAYERS) if "clients" in label or label == "command line"}
    for name in FACADES:
        leaks = [t for t in graph().get(name, set()) if t not in FACADES and layer_of(t) in clients]
        assert not leaks, (name, leaks)


DEMO_CLIENTS = ("modpo.demo", "modpo.experiments", "modpo.cli")  # the demo, the experiments built on it, the CLI


def test_the_library_does_not_know_the_demo():
    """No import of `modpo.demo` outside the demo, the experiments built on it and the command line: the demo
    plugs into the library (its evaluator by registration), not the library into the demo."""
    knows = {name: sorted(t for t in targets if t == "modpo.demo" or t.startswith("modpo.demo."))
             for name, targets in graph().items()
             if not any(name == client or name.startswith(client + ".") for client in DEMO_CLIENTS)}
    knows = {name: targets for name, targets in knows.items() if targets}
    assert not knows, f"modules importing the demo: {knows}"


def test_the_import_graph_has_no_cycle():
    edges = {name: targets - FACADES for name, targets in graph().items()}
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_modpo_imports_sit_at_the_top_of_their_module():
    known = set(modules())
    local = {name: lines for name, path in modules().items() if (lines := imports(path, known)[1])}
    assert not local, f"function-local imports of modpo modules (module: lines): {local}"


def test_no_file_is_longer_than_one_sitting():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_the_checks_see_a_climb(tmp_path):
    """The checker itself: an import of a higher layer is reported, and so is a function-local import."""
    assert climbs({"modpo.logps": {"modpo.trainer", "modpo.batch"}, "modpo.cli": {"modpo.loss"}}) == [
        "modpo.logps (log-probs) imports modpo.trainer (trainer)"]
    assert layer_of("modpo.data.loaders.hh_rlhf") == layer_of("modpo.batch") and layer_of("modpo.new") is None
    source = tmp_path / "m.py"
    source.write_text("from modpo.loss import modpo_loss\n\ndef f():\n    from modpo.cli import main\n")
    assert imports(source, {"modpo.loss", "modpo.cli"}) == ({"modpo.loss"}, [4])
