"""`distthink train [--config C.yaml] [key=value ...]`: the training recipe in this process.

For several processes use `accelerate launch [--config_file ...] -m distthink.train ...` (docs/training.md).
"""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train (embedded default run when no --config is given)",
                              description="Run the training recipe (distthink/train.py) in this process. "
                                          "Multi-process: accelerate launch -m distthink.train.")
    p.add_argument("--config", default=None, help="YAML config (default: the embedded default run)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4 lora.r=16")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from distthink.config import load_config
    from distthink.train import run

    return run(load_config(args.config, args.overrides))
