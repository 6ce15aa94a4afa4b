"""`segcompare --help` and every subcommand's: each says what it does, each option what it
takes; the shared words are the same everywhere."""

from __future__ import annotations

import argparse

import pytest

from segcompare.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands(build_parser()))


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_every_command_and_option_has_help(path):
    parser = COMMANDS[path]
    assert parser.description, f"segcompare {' '.join(path)} has no description"
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"segcompare {' '.join(path)} {name} has no help"
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
            # a default is said in the help, as "(19)", "(default 1024x2048)" and the like
            shown = action.default
            if isinstance(shown, tuple) and len(shown) == 2:
                shown = f"{shown[0]}x{shown[1]}"
            elif isinstance(shown, float):
                shown = f"{shown:g}"
            assert str(shown) in action.help, f"segcompare {' '.join(path)} {name}: {shown}"
        if action.dest == "device":
            assert "auto, cpu, cuda or mps" in action.help
        if action.dest == "size":
            assert action.metavar == "HxW", f"segcompare {' '.join(path)} --size"


def test_eval_without_a_model_names_every_way(capsys):
    assert main(["eval", "--data", "nowhere"]) == 1
    err = capsys.readouterr().err
    assert "--model" in err and "--weights" in err and "--pred-dir" in err
    assert len(err.strip().splitlines()) == 1
