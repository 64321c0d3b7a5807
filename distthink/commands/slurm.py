"""`distthink slurm render`: print the filled-in SLURM script for given options, so you can read
exactly what will run (the shared launcher is inlined), then sbatch it.

    distthink slurm render --template sft --nodes 2 --gpus-per-node 8 --config configs/my_sft.yaml
    distthink slurm render --template stage1 --nodes 4 --partition gpu --time 48:00:00 -o stage1.sbatch
    distthink slurm render --template sft --nodes 1 --gpus-per-node 0 --cpu-procs-per-node 2   # CPU, gloo

See docs/slurm.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(subparsers) -> None:
    from distthink.launch.slurm import TEMPLATES

    p = subparsers.add_parser("slurm", help="SLURM templates: render the sbatch script that will run",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="slurm_command", metavar="ACTION")
    r = sub.add_parser("render", help="print the filled-in, self-contained sbatch script")
    r.add_argument("--template", default="sft",
                   help=f"{', '.join(TEMPLATES)} or a path to an .sbatch file (default sft)")
    r.add_argument("--nodes", type=int, help="nodes (one launcher task per node)")
    r.add_argument("--gpus-per-node", type=int, help="GPUs = training processes per node; 0 = CPU nodes (gloo)")
    r.add_argument("--cpu-procs-per-node", type=int, help="processes per node when --gpus-per-node 0 (default 1)")
    r.add_argument("--config", help="run config YAML (relative to the directory you will run sbatch from)")
    r.add_argument("--output-dir", help="train.output_dir (default: the config's); keep it the same to resume")
    r.add_argument("--accelerate-config", help="accelerate config (default configs/accelerate/multi_node.yaml)")
    r.add_argument("--partition", help="SLURM partition")
    r.add_argument("--time", help="wall-time limit, e.g. 48:00:00")
    r.add_argument("--job-name", help="job name (also names the job log %%x-%%j.out)")
    r.add_argument("--signal-grace", type=int, dest="signal_grace_s",
                   help="seconds before the time limit at which USR1 asks training to save and requeue")
    r.add_argument("--setup", help="shell code run on every node first (module load ..., source venv)")
    r.add_argument("--srun-args", help="extra srun options, e.g. '--container-image=IMAGE --container-mounts=...'")
    r.add_argument("-o", "--out", help="write the script here (executable) instead of printing it")
    r.add_argument("overrides", nargs="*", help="config overrides key=value (DISTTHINK_OVERRIDES)")
    r.set_defaults(func=_render)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _render(args) -> int:
    from distthink.launch.slurm import RenderOptions, render

    opts = RenderOptions(
        template=args.template, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        cpu_procs_per_node=args.cpu_procs_per_node, config=args.config, output_dir=args.output_dir,
        accelerate_config=args.accelerate_config, partition=args.partition, time=args.time,
        job_name=args.job_name, signal_grace_s=args.signal_grace_s, setup=args.setup,
        srun_args=args.srun_args, overrides=list(args.overrides))
    if args.config and not Path(args.config).exists():
        print(f"warning: --config {args.config} does not exist here; it must exist where you run sbatch",
              file=sys.stderr)
    text = render(opts)
    if args.out:
        Path(args.out).write_text(text)
        os.chmod(args.out, 0o755)
        print(f"wrote {args.out}: submit with `sbatch {args.out}`", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
