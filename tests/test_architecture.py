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
