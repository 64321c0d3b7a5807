"""The `distthink` command. Each subcommand lives in distthink/commands/<name>.py and exposes
`register(subparsers)`, which adds its parser and sets `func`. Imports are lazy so that `--help`
stays fast and a subcommand's heavy dependencies load only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

from distthink.errors import DistthinkError

# name -> module under distthink.commands. Add a line here when a subcommand lands.
_COMMANDS = {
    "rec": "rec",
    "inspect": "inspect",
    "plan": "plan",
    "train": "train",
    "check": "check",
    "slurm": "slurm",
    "generate": "generate",
    "eval": "eval",
    "prepare": "prepare",
}


def add_run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command line of a config-driven run (`distthink train`, `python -m distthink.train`)."""
    parser.add_argument("--config", default=None, help="YAML config (default: the embedded default run)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4 lora.r=16")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distthink",
        description="Distributed fine-tuning of reasoning LLMs with an exact training signal.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _COMMANDS.items():
        importlib.import_module(f"distthink.commands.{module}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DistthinkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
