"""`--help` explains every option of every subcommand, and says nothing meant for developers only.

Walks the argparse parsers that `distthink` builds (distthink.cli.build_parser), subcommands of subcommands
included."""

from __future__ import annotations

import argparse
import re

import pytest

from distthink.cli import build_parser, main

# What marks a developer's note rather than help for a user.
INTERNAL = re.compile(r"\b(TODO|FIXME|XXX|HACK|noqa)\b|heavy imports?|imports? happen|parsed args|lazy import|"
                      r"internal note|\bpragma\b", re.IGNORECASE)


def parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("distthink",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, (*path, name))


def test_every_option_of_every_subcommand_has_help():
    missing, count = [], 0
    for path, parser in parsers(build_parser()):
        parser.format_help()  # renders (a stray % in a help text would raise here)
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{' '.join(path)} {c.dest}" for c in action._choices_actions if not c.help]
                continue
            count += 1
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert count > 100  # the walk really reached the subcommands
    assert not missing, f"options without a help text: {missing}"


def test_no_help_text_carries_internal_notes():
    found = []
    for path, parser in parsers(build_parser()):
        texts = [parser.description or "", parser.epilog or ""]
        for action in parser._actions:
            texts.append(action.help if isinstance(action.help, str) else "")
            if isinstance(action, argparse._SubParsersAction):
                texts += [c.help or "" for c in action._choices_actions]
        found += [f"{' '.join(path)}: {m.group(0)!r}" for text in texts for m in INTERNAL.finditer(text)]
    assert not found, found


def test_generate_help_explains_sampling_and_device(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag, words in [("--temperature", "logits"), ("--top-p", "nucleus"), ("--top-k", "most likely"),
                        ("--batch-size", "rows generated together"), ("--seed", "seed"), ("--device", "cuda")]:
        assert flag in out and words in out, flag
