"""Command-line options declared once, on the dataclass that a command's function takes.

A field declared with `option(...)` carries its flag, help, choices and parsing; `add_options`
turns a dataclass's fields into argparse options and `from_args` builds the dataclass back from
the parsed namespace, so `cli.py` only dispatches. The field's type says how it is parsed:

- `int`, `float`, `str` (or `X | None`): one value of that type (`parse=` overrides);
- `bool`: a switch; `--no-NAME` (or `invert=True`) stores False into a field that defaults to
  True; `action=argparse.BooleanOptionalAction` for `bool | None` (--x / --no-x / unset);
- `list[X]`: repeatable (`--avatar A --avatar B`), each value parsed by `parse` or `X`;
  `repeat=False` with `parse=comma_list(int)`: one comma-separated value (`--sources 1,3`);
- a nested dataclass (`gate: GateThresholds`): its own options, built back into it.

A field marked `option(..., cli=False)` is not a command-line option (set by code).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_KEY = "iwarp.option"


@dataclasses.dataclass(frozen=True)
class Option:
    help: str | None = None
    flag: str | None = None  # default: --field-name
    metavar: str | None = None  # default: the flag's name in capitals
    choices: tuple[Any, ...] | None = None
    parse: Callable[[str], Any] | None = None  # one command-line string -> the field's value
    action: Any = None  # e.g. argparse.BooleanOptionalAction
    invert: bool = False  # a bool switch that stores False (`--no-fp16` -> fp16=False)
    env: str | None = None  # an empty value falls back to this environment variable
    repeat: bool | None = None  # None: list fields are repeatable, others not
    cli: bool = True


def option(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    help: str | None = None,
    flag: str | None = None,
    metavar: str | None = None,
    choices: tuple[Any, ...] | None = None,
    parse: Callable[[str], Any] | None = None,
    action: Any = None,
    invert: bool = False,
    env: str | None = None,
    repeat: bool | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field with its command-line option (see the module's docstring)."""
    meta = Option(help, flag, metavar, choices, parse, action, invert, env, repeat, cli)
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={_KEY: meta}
    )


def comma_list(parse: Callable[[str], T]) -> Callable[[str], list[T]]:
    """A parser of 'A,B,C' into [parse(A), parse(B), parse(C)]."""

    def comma_separated(text: str) -> list[T]:
        return [parse(item.strip()) for item in text.split(",") if item.strip()]

    comma_separated.__name__ = f"comma-separated {getattr(parse, '__name__', 'value')}"
    return comma_separated


def comma_tuple(parse: Callable[[str], T]) -> Callable[[str], tuple[T, ...]]:
    """A parser of 'A,B,C' into (parse(A), parse(B), parse(C))."""
    as_list = comma_list(parse)

    def comma_separated(text: str) -> tuple[T, ...]:
        return tuple(as_list(text))

    comma_separated.__name__ = as_list.__name__
    return comma_separated


def none_if_empty(text: str) -> str | None:
    """'' -> None: `--split ''` means no split (every clip)."""
    return text or None


def option_of(f: dataclasses.Field) -> Option:
    return f.metadata.get(_KEY, Option())


def flag_of(f: dataclasses.Field) -> str:
    return option_of(f).flag or "--" + f.name.replace("_", "-")


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether it was a list)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0])  # `str | Path`: parsed as the first
    if origin is list:
        return (typing.get_args(hint) or (str,))[0], True
    return hint, False


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def cli_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, type) of every field of `cls` that is an option; nested dataclasses expanded."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not option_of(f).cli:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            out += cli_fields(hints[f.name])
        else:
            out.append((f, hints[f.name]))
    return out


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds one option per field of the dataclass `cls` (nested dataclasses included)."""
    for f, hint in cli_fields(cls):
        opt = option_of(f)
        flag = flag_of(f)
        kwargs: dict[str, Any] = {"dest": f.name, "help": _help_with_default(opt.help, f)}
        base, is_list = _base_type(hint)
        if base is bool and opt.action is None:
            inverted = opt.invert or (flag.startswith("--no-") and _default(f) is True)
            kwargs["action"] = "store_false" if inverted else "store_true"
            kwargs["default"] = _default(f) if _has_default(f) else not inverted
        else:
            if opt.action is not None:
                kwargs["action"] = opt.action
            elif is_list if opt.repeat is None else opt.repeat:
                kwargs["action"] = "append"
            if opt.action is None:
                kwargs["type"] = opt.parse or base
            if opt.choices is not None:
                kwargs["choices"] = opt.choices
            elif opt.action is None:
                kwargs["metavar"] = opt.metavar or flag.lstrip("-").upper().replace("-", "_")
            if kwargs.get("action") == "append":
                kwargs["default"] = None  # argparse appends to a given default list
            elif _has_default(f):
                kwargs["default"] = _default(f)
            else:
                kwargs["required"] = True
        parser.add_argument(flag, **kwargs)


def _help_with_default(text: str | None, f: dataclasses.Field) -> str | None:
    """The help with the field's default appended, unless the help already names one or the
    default says nothing (None, False, empty): `--help` then shows what a run gets."""
    if text is None or "default" in text.lower() or not _has_default(f):
        return text
    value = _default(f)
    if value is None or value is False or value in ("", [], ()):
        return text
    shown = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    return f"{text} (default: {shown.replace('%', '%%')})"


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass `cls` built from the namespace `add_options` filled."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        opt = option_of(f)
        if not opt.cli:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = from_args(hints[f.name], args)
            continue
        value = getattr(args, f.name)
        if value is None and _base_type(hints[f.name])[1] and _has_default(f):
            value = _default(f)  # a repeatable option not given
        if not value and opt.env:
            value = os.environ.get(opt.env) or None  # '' and unset: no value
        values[f.name] = value
    return cls(**values)


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser whose options come from a dataclass, loaded only when this
    subcommand is parsed: `iwarp serve` does not import the trainer (or torch for `--help`).

    `declare` returns the dataclass (importing its module); `options_class()` loads it.
    """

    def __init__(self, *args: Any, declare: Callable[[], type] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._declare = declare
        self._options_class: type | None = None

    def options_class(self) -> type:
        if self._options_class is None:
            assert self._declare is not None, "CommandParser needs declare="
            self._options_class = self._declare()
            add_options(self, self._options_class)
        return self._options_class

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.options_class()
        return super().parse_known_args(args, namespace)
