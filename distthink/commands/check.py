"""`distthink check PATH`: validate a training checkpoint or an exported model/adapter."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("check", help="validate a checkpoint or export (files, shapes, loads, generation)",
                              description="Validate a checkpoint (output_dir, checkpoints/, step-* dir) or an "
                                          "export dir: files present, tensors (count, shapes, dtypes) non-empty "
                                          "and finite, loads with plain transformers/peft with every tensor in "
                                          "place, tokenizer and chat template, a forward pass and a short timed "
                                          "generation. Prints one line per check, then OK (exit 0), or the "
                                          "problems (exit 1).")
    p.add_argument("path", help="output_dir, checkpoints/ dir, step-* checkpoint, or export dir")
    p.add_argument("--no-generate", action="store_true",
                   help="skip the generation smoke (a few greedy tokens); the other checks still run")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from distthink.engine.check import run_checks

    report = run_checks(args.path, generate=not args.no_generate)
    print(f"checking {args.path}")
    width = max((len(name) for name, _ in report.checks), default=0)
    for name, text in report.checks:
        print(f"  {name:<{width}}  {text}")
    if report.problems:
        print(f"{args.path}: {len(report.problems)} problem(s)")
        for prob in report.problems:
            print(f"  - {prob}")
        return 1
    print(f"{args.path}: OK")
    return 0
