"""`distthink check PATH`: validate a training checkpoint or an exported model/adapter."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("check", help="validate a checkpoint or export (files, shapes, loads, generation)",
                              description="Validate a checkpoint (output_dir, checkpoints/, step-* dir) or an "
                                          "export dir: files present, tensors non-empty and finite, loads with "
                                          "plain transformers/peft, a short sanity generation.")
    p.add_argument("path", help="output_dir, checkpoints/ dir, step-* checkpoint, or export dir")
    p.add_argument("--no-generate", action="store_true", help="skip the sanity generation")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from distthink.engine.check import check_path

    problems = check_path(args.path, generate=not args.no_generate)
    if problems:
        print(f"{args.path}: {len(problems)} problem(s)")
        for prob in problems:
            print(f"  - {prob}")
        return 1
    print(f"{args.path}: OK")
    return 0
