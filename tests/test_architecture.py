"""The import layers of docs/architecture.md: packages import only packages below them, every module
imports only modules of lower layers of its own package (or of lower packages), and no swinv2 modules
import each other in a circle.

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

# Packages, lowest first: a package imports only packages below it. "" is the ground floor (the
# top-level modules every package may use); "top" the public API and the command line.
PACKAGES = ["", "model", "weights", "serve", "train", "tools", "top"]
TOP = {"__init__", "cli", "__main__"}

# Modules of each package, lowest layer first: a module imports only modules of strictly lower layers
# of its own package (a package's __init__ sits above its modules).
LAYERS: dict[str, list[set[str]]] = {
    "": [
        {"errors", "hardware", "timing"},  # error types; what this machine is; timing a call
        {"outputs", "preprocess", "units", "allocator"},  # result files; eval preprocessing; multi-file units
        {"config", "images", "plots"},  # the typed config; reading images; figures
    ],
    "model": [
        {"fast_paths"},  # which switchable fast paths run (the policy)
        {"kernels"},  # CPU kernels (fused linear, oneDNN bf16)
        {"windows"},  # window partition / shift masks
        {"attention"},  # attention kernels and their dispatch
        {"transformer"},  # the architecture and the official math
        {"cpb", "simmim"},  # CPB maps; SimMIM's network (mask token, decoder, loss)
    ],
    "weights": [
        {"registry", "formats", "messages"},  # variants; one record per weight format; quoting files in messages
        {"convert", "hf_config", "safe_load", "hub"},  # key maps; transformers' configs; weights_only; by name
        {"training_state", "files"},  # the training-state file; reading / writing weight files
        {"described"},  # what a weights file says about itself, checked
        {"factory"},  # create_model / load_model / load_weights / convert_file
    ],
    "serve": [
        {"decode", "metrics", "batching"},  # untrusted uploads; Prometheus text; dynamic batching
        {"dynamic_forward", "predict"},  # the size-free export forward; inference over files
        {"export", "backbone"},  # ONNX export; detection / segmentation backbone
        {"runtime"},  # inference runtimes
        {"service"},  # a classifier shared by concurrent callers
        {"app"},  # the HTTP endpoints (Starlette)
        {"server"},  # `swinv2 serve`: the process, signals, drain
    ],
    "train": [
        # data; process groups; faults; LR schedule; shard files in folders and object stores
        {"datasets", "distributed", "faults", "schedule", "store"},
        # metrics and `swinv2 eval`; the run directory; shard sets; the official list files
        {"evaluate", "rundir", "shards", "listfile", "hf_layout"},
        {"tasks", "pack"},  # classification and SimMIM: what the engine asks of a task; `swinv2 data pack`
        {"sources"},  # the data a config names
        {"engine"},  # training
        {"recipes"},  # multi-stage recipes over fit()
    ],
    "tools": [
        {"flops", "data_bench"},  # MACs; training-data throughput per JPEG decoder
        {"bench"},  # the side-by-side benchmark
    ],
    "top": [{"__init__", "cli"}, {"__main__"}],
}


def _name(path: Path) -> str:
    """'train.engine' for src/swinv2/train/engine.py; 'cli' for src/swinv2/cli.py; 'model.__init__'."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _resolve(parts: list[str]) -> str | None:
    """The module a dotted path inside swinv2 names: a module file, or a package's __init__."""
    if not parts:
        return "__init__"
    if (PACKAGE.joinpath(*parts[:-1]) / f"{parts[-1]}.py").is_file():
        return ".".join(parts)
    if (PACKAGE.joinpath(*parts) / "__init__.py").is_file():
        return ".".join([*parts, "__init__"])
    return None


def _imports(path: Path, package: list[str]) -> set[str]:
    """The swinv2 modules `path` (a module of the package `package`, e.g. ["train"]) imports anywhere in its
    source, relative or absolute; `from pkg import mod` counts as importing pkg.mod. The version string
    (`from swinv2 import __version__`) is not an import of the public API."""
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else list(package)
            elif node.module and node.module.split(".")[0] == "swinv2":
                base = []
            else:
                continue
            mod = base + (
                node.module.split(".")[1:]
                if not node.level and node.module
                else node.module.split(".")
                if node.module
                else []
            )
            for alias in node.names:
                if alias.name == "__version__" and not mod:  # a constant of the package, not its API
                    continue
                sub = _resolve([*mod, alias.name])
                found.add(sub if sub is not None else _resolve(mod))
        elif isinstance(node, ast.Import):
            found |= {_resolve(a.name.split(".")[1:]) for a in node.names if a.name.startswith("swinv2.")}
    return {m for m in found if m is not None}


def _graph() -> dict[str, set[str]]:
    modules = {_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, name.split(".")[:-1]) - {name} for name, path in modules.items()}


def _place(module: str) -> tuple[int, int] | None:
    """(package layer, module layer within it) of `module`, None where it has no place."""
    *pkg, leaf = module.split(".")
    package = "top" if not pkg and leaf in TOP else ".".join(pkg)
    if package not in LAYERS:
        return None
    layers = LAYERS[package]
    if leaf == "__init__" and pkg:
        return PACKAGES.index(package), len(layers)
    layer = next((i for i, names in enumerate(layers) if leaf in names), None)
    return None if layer is None else (PACKAGES.index(package), layer)


def test_every_module_has_a_layer():
    missing = sorted(m for m in _graph() if _place(m) is None)
    assert not missing, f"add {missing} to LAYERS here and to docs/architecture.md"


def test_imports_run_downward_only():
    upward = []
    for m, deps in sorted(_graph().items()):
        here = _place(m)
        for d in sorted(deps):
            there = _place(d)
            if here is None or there is None:
                continue
            if there[0] > here[0] or (there[0] == here[0] and there[1] >= here[1]):
                upward.append(f"{m} {here} imports {d} {there}")
    assert not upward, "imports against the layers of docs/architecture.md (package, layer):\n" + "\n".join(upward)


def test_serving_and_training_stand_side_by_side():
    """A served model needs nothing of training, and training nothing of serving: both build on the
    model and the weights (serve/ sits below train/ in PACKAGES only to give each a place)."""
    found = [
        f"{m} imports {d}"
        for m, deps in _graph().items()
        for d in deps
        if {m.split(".")[0], d.split(".")[0]} == {"serve", "train"}
    ]
    assert not found, "\n".join(found)


def test_the_model_imports_torch_and_itself_only():
    """model/ imports nothing of ours but itself and the ground floor's error types."""
    found = [
        f"{m} imports {d}"
        for m, deps in _graph().items()
        if m.startswith("model.")
        for d in deps
        if not d.startswith("model.") and d != "errors"
    ]
    assert not found, "\n".join(found)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
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


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": set()}, None),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert _cycle(graph) == expected


def test_lazy_relative_and_absolute_imports_are_read(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "from ..weights import hub\nimport swinv2.tools.bench\nfrom . import datasets as D\n\ndef f():\n"
        "    from ..weights.factory import x\n    from .engine import fit\n"
        "    from swinv2.train import engine\n    from swinv2.cli import main\n"
        "    from .. import errors, __version__\n    from ..model import SwinTransformerV2\n"
        "    import swinv2\n"
    )
    assert _imports(source, ["train"]) == {
        "weights.hub",
        "tools.bench",
        "train.datasets",
        "weights.factory",
        "train.engine",
        "cli",
        "errors",
        "model.__init__",
    }
