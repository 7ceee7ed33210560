"""Tests for the `iwarp` command line, run in-process through `iwarp.cli.main`."""

from __future__ import annotations

import argparse
import json

import pytest

from iwarp.cli import build_parser, main


def test_info_prints_parameters_and_gflop(capsys) -> None:
    assert main(["info", "--config", "tiny_flow"]) == 0
    out = capsys.readouterr().out
    assert "config tiny_flow at 256x256" in out
    assert "parameters" in out and " M" in out
    assert "GFLOP per driving frame" in out and "GFLOP per source image" in out
    for module in ("keypoint_detector", "query_encoder", "generator"):
        assert module in out


def test_info_json_parses(capsys) -> None:
    assert main(["info", "--config", "tiny_flow", "--size", "128", "--sources", "2", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["config"] == "tiny_flow" and stats["size"] == 128 and stats["sources"] == 2
    assert stats["parameters"] > 0 and stats["gflop_per_frame"] > 0
    assert stats["query_tokens"] == 16 * 16
    # Two sources of 16x16 tokens plus the extra tokens.
    assert stats["key_tokens"] == 2 * 16 * 16 + 32


def assert_one_line_error(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("iwarp ")
    for word in words:
        assert word in lines[0]


def test_unknown_config_is_a_one_line_error(capsys) -> None:
    assert main(["info", "--config", "nope"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(captured.err, "nope", "tiny")


def test_train_on_missing_folder_is_a_one_line_error(capsys, tmp_path) -> None:
    code = main(
        [
            "train",
            "--data",
            "/nonexistent/iwarp-data",
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "1",
            "--cache",
            str(tmp_path / "cache"),
        ]
    )
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "/nonexistent/iwarp-data")


def test_train_with_unknown_loss_is_a_one_line_error(capsys, tmp_path) -> None:
    code = main(
        ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--loss", "nope=1"]
    )
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "nope")


def test_missing_subcommand_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_subcommand_has_help(capsys) -> None:
    commands = _subcommands()
    assert {"info", "train", "animate"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0, name
        out = capsys.readouterr().out
        assert out.startswith(f"usage: iwarp {name}"), name
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in commands:
        assert name in out


def test_version_prints_the_package_version(capsys) -> None:
    from iwarp import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"iwarp {__version__}"


def test_help_shows_the_defaults_a_run_gets(capsys) -> None:
    """`--help` names each default a run gets (`--port 8080`), and none that says nothing."""
    for command, expected in (
        ("serve", ["(default: 127.0.0.1)", "(default: 8080)", "(default: 4)"]),
        ("animate", ["(default: auto)", "(default: iwarp_animation.mp4)"]),
    ):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for text in expected:
            assert text in out, (command, text)
        assert "(default: None)" not in out and "(default: False)" not in out, command
