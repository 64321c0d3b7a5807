"""`distthink train [--config C.yaml] [key=value ...]`: the training recipe in this process.

For several processes use `accelerate launch [--config_file ...] -m distthink.train ...` (docs/training.md).
"""

from __future__ import annotations

from distthink.cli import add_run_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train (embedded default run when no --config is given)",
                              description="Run the training recipe (distthink/train.py) in this process. "
                                          "Multi-process: accelerate launch -m distthink.train.")
    add_run_arguments(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from distthink.config import load_config
    from distthink.engine.distributed import launched_rank, leave
    from distthink.train import main, run

    if not launched_rank():
        return run(load_config(args.config, args.overrides))
    # `accelerate launch -m distthink train ...`: a rank, which ends as one of `-m distthink.train` does (its one
    # error line and status file, its process group left alive: engine/distributed.py)
    leave(main([*(["--config", args.config] if args.config else []), *args.overrides], ends_process=True))
