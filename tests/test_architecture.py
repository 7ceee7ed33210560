"""The map in docs/ARCHITECTURE.md is the code's: every import inside iwarp/ is read (ast) and
checked against the doc's package table.

Each table row names a part of iwarp (a module or a folder: a module belongs to the row with
the longest matching path), its layer, and what it imports from iwarp. An import must be
documented in its row and go to a lower layer; a row's documented imports must all be used
(no stale rows). An item marked `(lazy)` is the one exception to the layering (a documented
seam such as `streaming` starting `cluster` for `--engine ray`): it may go up, but only from
inside a function, so importing the lower layer never loads the upper one.
"""

from __future__ import annotations

import ast
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "iwarp"
DOC = REPO / "docs" / "ARCHITECTURE.md"


@dataclass
class Row:
    unit: str  # dotted, without the leading "iwarp.": "runtime.backends", "cli", "" (iwarp/)
    layer: int
    imports: dict[str, bool] = field(default_factory=dict)  # documented item -> lazy


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module, e.g. "iwarp.runtime.animator"
    target: str  # dotted module imported, e.g. "iwarp.face"
    in_function: bool
    line: int


def _unit_of_path(cell: str) -> str:
    path = cell.strip().strip("`").rstrip("/")
    path = path.removesuffix(".py").removesuffix("/__init__")
    return ".".join(path.split("/")[1:])


def documented_rows() -> dict[str, Row]:
    rows: dict[str, Row] = {}
    for line in DOC.read_text().splitlines():
        if not line.startswith("| `iwarp/"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 4, (
            f"ARCHITECTURE.md row needs 4 cells (path|layer|what|imports): {line}"
        )
        path, layer, _what, imports = cells
        row = Row(_unit_of_path(path), int(layer))
        if imports not in ("—", "-", ""):
            for item in imports.split(","):
                name = item.strip()
                lazy = name.endswith("(lazy)")
                name = name.removesuffix("(lazy)").strip().strip("`")
                row.imports["" if name == "iwarp" else name] = lazy  # "iwarp": its __init__
        rows[row.unit] = row
    assert rows, f"no package table found in {DOC}"
    return rows


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, names: list[str]) -> list[str]:
    """`from iwarp.x import y`: iwarp.x.y when y is a module, else iwarp.x."""
    out = []
    for name in names:
        sub = f"{module}.{name}"
        as_path = REPO / sub.replace(".", "/")
        out.append(sub if as_path.with_suffix(".py").is_file() or as_path.is_dir() else module)
    return out


@functools.cache
def actual_imports() -> tuple[Import, ...]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        importer = _module_name(path)
        functions = [
            n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        inside = {id(n) for f in functions for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = _resolve(node.module, [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom):
                pytest.fail(f"{path}:{node.lineno}: relative import; iwarp imports absolutely")
            else:
                continue
            for target in targets:
                if target == "iwarp" or target.startswith("iwarp."):
                    found.append(Import(importer, target, id(node) in inside, node.lineno))
    return tuple(found)


def unit_of(module: str, rows: dict[str, Row]) -> str:
    """The row a dotted module belongs to: the longest documented prefix."""
    name = module.removeprefix("iwarp").removeprefix(".")
    parts = name.split(".") if name else []
    for n in range(len(parts), -1, -1):
        candidate = ".".join(parts[:n])
        if candidate in rows:
            return candidate
    raise AssertionError(f"{module} is in no row of {DOC.name}'s package table: add one")


def _matches(target: str, item: str) -> bool:
    """Does the documented item (a unit or a module under it) cover this imported module?"""
    name = target.removeprefix("iwarp").removeprefix(".")
    return name == item or name.startswith(item + ".")


def _item_unit(item: str, rows: dict[str, Row]) -> str:
    return unit_of(f"iwarp.{item}" if item else "iwarp", rows)


def test_every_module_has_a_row():
    rows = documented_rows()
    for path in PACKAGE.rglob("*.py"):
        unit_of(_module_name(path), rows)


def test_documented_imports_go_down_the_layers():
    rows = documented_rows()
    for row in rows.values():
        for item, lazy in row.imports.items():
            target = rows[_item_unit(item, rows)]
            if not lazy:
                assert target.layer < row.layer, (
                    f"ARCHITECTURE.md: {row.unit or 'iwarp'} (layer {row.layer}) imports {item} "
                    f"(layer {target.layer}): not down the layers"
                )


def test_imports_are_the_documented_ones():
    rows = documented_rows()
    used: dict[str, set[str]] = {u: set() for u in rows}
    problems = []
    for imp in actual_imports():
        here = unit_of(imp.importer, rows)
        there = unit_of(imp.target, rows)
        if there == here:
            continue  # inside its own row (a folder's modules import one another)
        row = rows[here]
        items = [i for i in row.imports if _matches(imp.target, i)]
        where = f"{imp.importer.replace('.', '/')}.py:{imp.line}"
        if not items:
            problems.append(f"{where} imports {imp.target}: not in the row of {here or 'iwarp'}")
            continue
        item = max(items, key=len)
        used[here].add(item)
        if row.imports[item] and not imp.in_function:
            problems.append(f"{where} imports {imp.target} at module level; it is a (lazy) seam")
    for unit, row in rows.items():
        for item in set(row.imports) - used[unit]:
            problems.append(
                f"ARCHITECTURE.md: {unit or 'iwarp'} lists {item}, which it never imports"
            )
    assert not problems, "docs/ARCHITECTURE.md and the imports disagree:\n" + "\n".join(problems)


def test_nothing_imports_the_cli():
    importers = {i.importer for i in actual_imports() if i.target == "iwarp.cli"}
    assert not importers, f"iwarp.cli is the top: imported by {sorted(importers)}"


@pytest.mark.parametrize(
    ("change", "check", "message"),
    [
        # A part moved above one that imports it: the layering check fails.
        (("| `iwarp/model/` | 2 |", "| `iwarp/model/` | 7 |"), "layers", "not down the layers"),
        # An import the row does not list (streaming starting the cluster): fails.
        (("| cluster (lazy), errors", "| errors"), "imports", "not in the row of streaming"),
        # A row listing what it never imports: fails.
        (
            ("| errors |\n| `iwarp/media.py`", "| errors, system |\n| `iwarp/media.py`"),
            "imports",
            "config lists system",
        ),
    ],
)
def test_the_check_can_fail(tmp_path, monkeypatch, change, check, message):
    text = DOC.read_text()
    assert change[0] in text, "the example row changed: update this test"
    doc = tmp_path / "ARCHITECTURE.md"
    doc.write_text(text.replace(change[0], change[1], 1))
    monkeypatch.setattr(sys.modules[__name__], "DOC", doc)
    test = {
        "layers": test_documented_imports_go_down_the_layers,
        "imports": test_imports_are_the_documented_ones,
    }[check]
    with pytest.raises(AssertionError, match=message):
        test()


# -- the prose rules of docs/ARCHITECTURE.md ------------------------------------------------
# Each rule reads sources (path relative to the repository -> text) and returns its violations,
# so that `test_each_rule_can_fail` can plant one in a copy and see the rule catch it.

Sources = dict[str, str]


def _sources(*folders: str) -> Sources:
    return {
        str(p.relative_to(REPO)): p.read_text()
        for folder in folders
        for p in sorted((REPO / folder).rglob("*.py"))
    }


def _imports_of(path: str, text: str) -> list[tuple[str, int]]:
    """(dotted iwarp module imported, line) of one source file."""
    out = []
    for node in ast.walk(ast.parse(text, path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = _resolve(node.module, [a.name for a in node.names])
        else:
            continue
        out += [(t, node.lineno) for t in targets if t == "iwarp" or t.startswith("iwarp.")]
    return out


def _importing(sources: Sources, under: str, forbidden: tuple[str, ...]) -> list[str]:
    """Imports of `forbidden` units (dotted, without "iwarp.") from files under `under`."""
    bad = []
    for path, text in sources.items():
        if not path.startswith(under):
            continue
        for target, line in _imports_of(path, text):
            if any(_matches(target, f) for f in forbidden):
                bad.append(f"{path}:{line} imports {target}")
    return bad


def rule_graph_names_only_in_graphs(sources: Sources) -> list[str]:
    """The graphs' names are `graphs`' (nobody spells them again): no graph name as a string
    used as a key, an index, an argument or in a comparison outside iwarp/graphs.py."""
    from iwarp.graphs import GRAPHS

    bad = []
    for path, text in sources.items():
        if path == "iwarp/graphs.py" or not path.startswith("iwarp/"):
            continue  # bench/ scripts name their own stages ("keypoints" smoothing)
        for node in ast.walk(ast.parse(text, path)):
            if isinstance(node, ast.Subscript):
                used = [node.slice]
            elif isinstance(node, ast.Dict):
                used = [k for k in node.keys if k is not None]
            elif isinstance(node, ast.Compare):
                used = [node.left, *node.comparators]
            elif isinstance(node, ast.Call):
                used = [*node.args, *(k.value for k in node.keywords)]
            else:
                continue
            bad += [
                f"{path}:{u.lineno} spells the graph name {u.value!r}"
                for u in used
                if isinstance(u, ast.Constant) and u.value in GRAPHS
            ]
    return bad


def rule_model_knows_only_config(sources: Sources) -> list[str]:
    """`model` knows only `config` (and the layer-0 basics `errors` and `paths`);
    `model/stats.py` (`iwarp info`) also declares its command-line options."""
    allowed = {"config", "errors", "paths", "model"}
    bad = []
    for path, text in sources.items():
        if not path.startswith("iwarp/model/"):
            continue
        extra = {"options"} if path == "iwarp/model/stats.py" else set()
        for target, line in _imports_of(path, text):
            if not any(_matches(target, a) for a in allowed | extra):
                bad.append(f"{path}:{line} imports {target}")
    return bad


def rule_runtime_reaches_the_network_through_backends(sources: Sources) -> list[str]:
    """Only `runtime/backends/` imports `model` or `engine_build` within `runtime`."""
    return [
        b
        for b in _importing(sources, "iwarp/runtime/", ("model", "engine_build", "checkpoint"))
        if not b.startswith("iwarp/runtime/backends/")
    ]


# What `streaming` and `cam` may know below `runtime`: the plain utilities of layers 0-1.
_BELOW_RUNTIME = (
    "model",
    "engine_build",
    "runtime.backends",
    "face",
    "landmarks",
    "graphs",
    "checkpoint",
    "train",
    "evaluation",
    "calibration",
    "config",
)


def rule_streaming_and_cam_know_runtime_only(sources: Sources) -> list[str]:
    """`streaming` and `cam` know `runtime` (the Animator, its DrivingStream and FaceCropper)
    and nothing below it but the utilities (errors, media, metrics, options, paths)."""
    return _importing(sources, "iwarp/streaming/", _BELOW_RUNTIME) + _importing(
        sources, "iwarp/cam/", _BELOW_RUNTIME
    )


def _calls_or_defines(sources: Sources, names: tuple[str, ...], home: str) -> list[str]:
    """Definitions of functions named like `names`, and calls of attributes named `names`
    (np.log10, np.percentile, ...), outside the `home` file."""
    bad = []
    for path, text in sources.items():
        if path == home:
            continue
        for node in ast.walk(ast.parse(text, path)):
            if isinstance(node, ast.FunctionDef) and any(n in node.name for n in names):
                bad.append(f"{path}:{node.lineno} defines {node.name}")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in names
            ):
                bad.append(f"{path}:{node.lineno} calls {node.func.attr}")
    return bad


def rule_metrics_are_computed_once(sources: Sources) -> list[str]:
    """PSNR and latency percentiles live in iwarp/metrics.py: nothing else computes a log10
    of an error or a percentile, nor defines a psnr or percentile function."""
    return _calls_or_defines(sources, ("psnr", "log10", "percentile"), "iwarp/metrics.py")


def _number_literals(sources: Sources, value: float, home: str) -> list[str]:
    bad = []
    for path, text in sources.items():
        if path == home:
            continue
        for node in ast.walk(ast.parse(text, path)):
            if isinstance(node, ast.Constant) and type(node.value) is float and node.value == value:
                bad.append(f"{path}:{node.lineno} writes {value} again")
    return bad


def rule_one_crop_scale(sources: Sources) -> list[str]:
    """The face crop's scale (1.8 x the face box) is written once, in iwarp/face.py."""
    return _number_literals(sources, 1.8, "iwarp/face.py")


def rule_one_cache_folder(sources: Sources) -> list[str]:
    """The user cache folder is chosen once, in iwarp/paths.py (`user_cache_dir`)."""
    return [
        f"{path} names the cache folder"
        for path, text in sources.items()
        if path != "iwarp/paths.py" and ("XDG_CACHE_HOME" in text or '".cache"' in text)
    ]


_CLI_FUNCTIONS = {"_declared", "build_parser", "main"}


def rule_cli_is_dispatch_only(sources: Sources) -> list[str]:
    """`cli` is dispatch only: it parses, imports the command's function named in `COMMANDS`
    and calls it; it defines no function of its own beyond that (no handler that builds a
    report or prints a result: the command's package does)."""
    bad = []
    for path, text in sources.items():
        if path != "iwarp/cli.py":
            continue
        for node in ast.parse(text, path).body:
            if isinstance(node, ast.FunctionDef) and node.name not in _CLI_FUNCTIONS:
                bad.append(f"{path}:{node.lineno} defines {node.name}: not dispatch")
    return bad


def test_every_command_runs_a_function_of_its_package():
    from iwarp.cli import COMMANDS, _declared

    for name, (_help, options, runs) in COMMANDS.items():
        assert runs.split(":")[0].startswith("iwarp."), name
        assert callable(_declared(runs)()), f"iwarp {name}: {runs} is not a function"
        assert isinstance(_declared(options)(), type), f"iwarp {name}: {options} is not a class"


RULES = {
    "graph names": (rule_graph_names_only_in_graphs, 'x = results["animator"]\n'),
    "model imports": (rule_model_knows_only_config, "from iwarp.face import FaceTracker\n"),
    "runtime via backends": (
        rule_runtime_reaches_the_network_through_backends,
        "from iwarp.model import ImplicitWarpingNetwork\n",
    ),
    "streaming and cam": (
        rule_streaming_and_cam_know_runtime_only,
        "from iwarp.face import FaceTracker\n",
    ),
    "metrics once": (rule_metrics_are_computed_once, "import math\nx = math.log10(2.0)\n"),
    "crop scale": (rule_one_crop_scale, "SCALE = 1.8\n"),
    "cache folder": (rule_one_cache_folder, 'CACHE = Path.home() / ".cache"\n'),
    "cli dispatch": (
        rule_cli_is_dispatch_only,
        "def _cmd_eval(o):\n    print(o)\n",
    ),
}
# Where each planted violation goes (a file the rule reads).
_PLANT_IN = {
    "graph names": "iwarp/runtime/planted.py",
    "model imports": "iwarp/model/planted.py",
    "runtime via backends": "iwarp/runtime/planted.py",
    "streaming and cam": "iwarp/cam/planted.py",
    "metrics once": "bench/planted.py",
    "crop scale": "iwarp/train/planted.py",
    "cache folder": "iwarp/model/planted.py",
    "cli dispatch": "iwarp/cli.py",
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_the_prose_rule_holds(rule):
    check, _ = RULES[rule]
    bad = check(_sources("iwarp", "bench"))
    assert not bad, f"docs/ARCHITECTURE.md's rule ({check.__doc__.split(':')[0]}):\n" + "\n".join(
        bad
    )


@pytest.mark.parametrize("rule", sorted(RULES))
def test_each_rule_can_fail(rule):
    check, planted = RULES[rule]
    sources = {_PLANT_IN[rule]: planted}
    assert len(check(sources)) == 1, f"the {rule} rule misses a planted violation"
