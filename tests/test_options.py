"""Every subcommand's options are its dataclass's fields (iwarp.options): each field is an
option, each option a field, and parsing gives back the dataclass, for defaults and for values
unlike the defaults. Parsing only (no command runs)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

import pytest

from iwarp.cli import COMMANDS, build_parser
from iwarp.options import (
    CommandParser,
    add_options,
    cli_fields,
    comma_list,
    flag_of,
    from_args,
    none_if_empty,
    option,
    option_of,
)


def _parsers() -> dict[str, CommandParser]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


PARSERS = _parsers()


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_field_is_an_option_and_every_option_a_field(name: str) -> None:
    parser = PARSERS[name]
    cls = parser.options_class()
    declared = {flag_of(f) for f, _ in cli_fields(cls)}
    flags = _flags(parser)
    # BooleanOptionalAction adds --no-X next to --X.
    flags -= {"--no-" + s[2:] for s in flags if "--no-" + s[2:] in flags and s in declared}
    assert flags == declared, f"iwarp {name}: options {flags ^ declared} not both declared"
    skipped = [f.name for f in dataclasses.fields(cls) if not option_of(f).cli]
    for f, _ in cli_fields(cls):
        assert option_of(f).help, f"iwarp {name} {flag_of(f)}: no help text"
    assert all(not _flags_for(parser, n) for n in skipped)


def _flags_for(parser: argparse.ArgumentParser, dest: str) -> list[str]:
    return [s for a in parser._actions if a.dest == dest for s in a.option_strings]


def _required(cls: type) -> list[str]:
    argv = []
    for f, _ in cli_fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            argv += [flag_of(f), f"given-{f.name}"]
    return argv


def _built(cls: type, argv: list[str]) -> object:
    parser = argparse.ArgumentParser()
    add_options(parser, cls)
    return from_args(cls, parser.parse_args(argv))


def _with_required(cls: type) -> object:
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            values[f.name] = f"given-{f.name}"
        elif dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = _with_required(hints[f.name])
    return cls(**values)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_defaults_round_trip(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IWARP_TOKEN", raising=False)
    cls = PARSERS[name].options_class()
    assert _built(cls, _required(cls)) == _with_required(cls)


def _other_value(f: dataclasses.Field, hint: object) -> tuple[object, list[str]]:
    """A value unlike the field's default, and the argv that sets it."""
    opt, flag = option_of(f), flag_of(f)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    base = hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None -> X
        base = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(base)
    if opt.choices:
        value = next(c for c in opt.choices if c != default)
        return value, [flag, str(value)]
    if base is bool:
        if opt.action is not None:  # --x / --no-x
            return True, [flag]
        return (not default), [flag]
    if origin is list and (opt.repeat is None or opt.repeat):
        item = ["a.jpg", "b.jpg"] if opt.parse is not None else "a.jpg"
        texts = ["a.jpg,b.jpg", "c.jpg"] if opt.parse is not None else ["a.jpg", "c.jpg"]
        value = [item, ["c.jpg"]] if opt.parse is not None else [item, "c.jpg"]
        return value, [flag, texts[0], flag, texts[1]]
    if origin in (list, tuple):
        return (list if origin is list else tuple)((2, 5)), [flag, "2,5"]
    if base is int:
        return 7, [flag, "7"]
    if base is float:
        return 2.5, [flag, "2.5"]
    return "some-text", [flag, "some-text"]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_values_round_trip(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IWARP_TOKEN", raising=False)
    cls = PARSERS[name].options_class()
    argv: list[str] = []
    changed: dict[str, object] = {}
    for f, hint in cli_fields(cls):
        value, words = _other_value(f, hint)
        changed[f.name] = value
        argv += words
    built = _built(cls, argv)
    flat = {}
    stack = [built]
    while stack:
        obj = stack.pop()
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                stack.append(value)
            else:
                flat[f.name] = value
    for field_name, value in changed.items():
        assert flat[field_name] == value, f"iwarp {name}: {field_name}"
    # Through the real command parser too: same dataclass.
    parsed = build_parser().parse_args([name, *argv])
    assert from_args(cls, parsed) == built


@dataclasses.dataclass
class _Example:
    name: str = option(help="required: no default")
    count: int = option(3, help="a number")
    on: bool = option(True, flag="--no-on", help="switch off")
    split: str | None = option("train", parse=none_if_empty, help="'' = none")
    sizes: list[int] = option(
        default_factory=lambda: [1], parse=comma_list(int), repeat=False, help="1,2"
    )
    token: str | None = option(None, env="EXAMPLE_TOKEN", help="or $EXAMPLE_TOKEN")
    hidden: int = option(5, cli=False)


def test_the_helper_on_a_small_dataclass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXAMPLE_TOKEN", raising=False)
    assert _built(_Example, ["--name", "x"]) == _Example(name="x")
    built = _built(_Example, ["--name", "x", "--no-on", "--split", "", "--sizes", "2,4"])
    assert built == _Example(name="x", on=False, split=None, sizes=[2, 4])
    monkeypatch.setenv("EXAMPLE_TOKEN", "from-env")
    assert _built(_Example, ["--name", "x"]).token == "from-env"
    assert _built(_Example, ["--name", "x", "--token", "given"]).token == "given"
    with pytest.raises(SystemExit):  # required, and not an option: hidden
        _built(_Example, [])
    with pytest.raises(SystemExit):
        _built(_Example, ["--name", "x", "--hidden", "1"])
    with pytest.raises(SystemExit):  # a clear argparse error, not a traceback
        _built(_Example, ["--name", "x", "--sizes", "1,a"])


def test_only_the_chosen_subcommand_loads_its_options() -> None:
    parser = build_parser()
    parser.parse_args(["export", "--out", "o"])
    loaded = {
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, p in action.choices.items()
        if p._options_class is not None
    }
    assert loaded == {"export"}
