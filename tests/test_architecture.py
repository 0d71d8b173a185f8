"""The import layers of docs/architecture.md: every swinv2 module imports only modules of lower layers,
and no swinv2 modules import each other in a circle.

Imports are read from the source (ast), not by importing: module-level and function-level (lazy)
imports alike, and `if TYPE_CHECKING:` ones too. A lazy import still runs the other module's code on
first use, so a lazy circle is still a circle, and a lazy upward import still ties the lower module to
the higher one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "swinv2"

# Lowest first; a module may import modules of strictly lower layers only (docs/architecture.md).
LAYERS: list[set[str]] = [
    {"errors"},                         # the project's error types: imports nothing of ours
    {"outputs", "preprocess", "units"},  # writing result files; the eval preprocessing constants; multi-file units
    {"allocator", "config", "distributed", "faults", "fused", "hardware"},  # leaves
    {"data", "schedule", "windows"},    # data pipeline; optimiser + LR schedule; window layout (kernels)
    {"attention"},                      # attention kernels and their dispatch
    {"model"},                          # the architecture and the official math
    {"convert", "export_graph", "registry", "simmim"},  # foreign state-dict layouts; the size-free export
                                        # forward; variants; SimMIM pretraining (mask token, decoder, loss)
    {"cpb", "export", "flops", "hub"},  # CPB maps, ONNX export, MACs, published weights
    {"checkpoint"},                     # weights files, create_model / load_model
    {"backbone", "plots"},              # detection / segmentation backbone and heads; figures
    {"predict", "rundir"},              # inference over files, the run directory
    {"evaluate"},                       # metrics of a loader; `swinv2 eval` on a class folder
    {"bench", "engine"},                # measuring, training: neither imports the other
    {"recipes", "runtime"},             # recipe sweeps over fit(), inference runtimes
    {"__init__", "cli"},                # the public API, the command line
    {"__main__"},
]
LAYER = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _imports(path: Path) -> set[str]:
    """The swinv2 modules `path` imports anywhere in its source (relative or absolute)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.level == 0 and node.module and node.module.split(".")[0] == "swinv2":
                parts = node.module.split(".")
                found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("swinv2.")}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    return {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}


def test_every_module_has_a_layer():
    missing = sorted(set(_graph()) - set(LAYER))
    assert not missing, f"add {missing} to LAYERS here and to docs/architecture.md"


def test_imports_run_downward_only():
    upward = [f"{m} (layer {LAYER[m]}) imports {d} (layer {LAYER[d]})"
              for m, deps in sorted(_graph().items()) if m in LAYER
              for d in sorted(deps) if d in LAYER and LAYER[d] >= LAYER[m]]
    assert not upward, "imports against the layers of docs/architecture.md:\n" + "\n".join(upward)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set()}, None),
])
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert _cycle(graph) == expected


def test_lazy_and_absolute_imports_are_read(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from . import hub\nimport swinv2.bench\n\ndef f():\n    from .checkpoint import x\n"
                      "    from swinv2 import engine\n    from swinv2.cli import main\n")
    assert _imports(source) == {"hub", "bench", "checkpoint", "engine", "cli"}
