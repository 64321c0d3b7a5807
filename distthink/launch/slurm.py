"""Fill in the SLURM templates (what `distthink slurm render` prints).

The templates ship as package data in distthink/launch/templates/ (the repository's `slurm/` holds the same files,
checked byte-equal by tests/launch/test_slurm_render.py, for `sbatch slurm/sft.sbatch` from a checkout). The training
ones (`sft.sbatch`, `stage1..3.sbatch`) are ordinary sbatch scripts: `#SBATCH` lines,
`export DISTTHINK_*=...` defaults, then a launcher block that execs the shared `slurm/launch.sh`.
`render()` sets the chosen `#SBATCH` options and settings, and inlines `launch.sh` in place of the
launcher block, so the output is one self-contained script: what you read is exactly what runs, and
`distthink slurm render ... > job.sbatch && sbatch job.sbatch` works from any directory.

The per-node part of the launcher is a single-quoted here-doc (`<<'NODE_SCRIPT'`): `$SLURM_NODEID`
and `$SLURM_NNODES` in it expand inside each srun task, not once in the batch shell.
`node_script()` returns that part so tests can check it.

`prepare.sbatch` is a one-node CPU job that runs `distthink prepare` (the encoded-data cache, docs/data.md) before
the training job; it has no launcher block and is submitted as it is.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from distthink.errors import ConfigError
from distthink.resources import PACKAGE_DIR, SLURM_TEMPLATES

TEMPLATES = ("sft", "stage1", "stage2", "stage3")
LAUNCHER_BEGIN = "# >>> launcher"
LAUNCHER_END = "# <<< launcher"
NODE_SCRIPT_RE = re.compile(r"<<'NODE_SCRIPT'\n(.*?)\nNODE_SCRIPT\n", re.S)


@dataclass
class RenderOptions:
    """What `distthink slurm render` can fill in. None = keep the template's value."""

    template: str = "sft"
    nodes: int | None = None
    gpus_per_node: int | None = None          # 0 = CPU nodes (gloo)
    cpu_procs_per_node: int | None = None     # processes per node when gpus_per_node == 0
    config: str | None = None
    output_dir: str | None = None
    accelerate_config: str | None = None
    partition: str | None = None
    time: str | None = None
    job_name: str | None = None
    signal_grace_s: int | None = None         # --signal=B:USR1@<grace>
    setup: str | None = None                  # DISTTHINK_SETUP
    srun_args: str | None = None              # DISTTHINK_SRUN_ARGS (containers, ...)
    overrides: list[str] = field(default_factory=list)


def template_path(template: str) -> Path:
    """A template name (sft, stage1, ...) or a path to an .sbatch file."""
    if template in TEMPLATES:
        path = SLURM_TEMPLATES / f"{template}.sbatch"
    else:
        path = Path(template)
        if not path.suffix and not path.exists():
            raise ConfigError(f"unknown SLURM template '{template}'. Fix: use one of {', '.join(TEMPLATES)} "
                              "or a path to an .sbatch file")
    if not path.is_file():
        raise ConfigError(f"SLURM template {path} not found. Fix: use one of {', '.join(TEMPLATES)} or pass "
                          "--template path/to/file.sbatch")
    return path


def launcher_path() -> Path:
    return SLURM_TEMPLATES / "launch.sh"


def node_script(script: str) -> str:
    """The per-node part of a launcher or rendered script (the body of the <<'NODE_SCRIPT' here-doc)."""
    m = NODE_SCRIPT_RE.search(script)
    if not m:
        raise ConfigError("no <<'NODE_SCRIPT' here-doc found in the launcher")
    return m.group(1)


def _set_sbatch(lines: list[str], option: str, value: str | None) -> list[str]:
    """Set `#SBATCH --option=value` (replacing an existing line, else adding after the last #SBATCH);
    value None removes the line."""
    pattern = re.compile(rf"^#SBATCH\s+--{re.escape(option)}(=|\s|$)")
    out, done = [], False
    for line in lines:
        if pattern.match(line):
            if value is not None and not done:
                out.append(f"#SBATCH --{option}={value}")
                done = True
            continue
        out.append(line)
    if value is not None and not done:
        last = max((i for i, line in enumerate(out) if line.startswith("#SBATCH")), default=len(out) - 1)
        out.insert(last + 1, f"#SBATCH --{option}={value}")
    return out


def _set_env(lines: list[str], name: str, value: str) -> list[str]:
    """Replace the template's `export NAME=...` default with a fixed value (or add it before the launcher)."""
    new = f"export {name}={shlex.quote(value)}"
    pattern = re.compile(rf"^export {re.escape(name)}=")
    for i, line in enumerate(lines):
        if pattern.match(line):
            lines[i] = new
            return lines
    at = next((i for i, line in enumerate(lines) if line.startswith(LAUNCHER_BEGIN)), len(lines))
    lines.insert(at, new)
    return lines


def render(opts: RenderOptions) -> str:
    """The filled-in, self-contained sbatch script for `opts`."""
    for name in ("nodes", "signal_grace_s"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 (got {value})")
    for name in ("gpus_per_node", "cpu_procs_per_node"):
        value = getattr(opts, name)
        if value is not None and value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (got {value})")
    for item in opts.overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value. Fix: write e.g. train.lr=1e-4")

    lines = template_path(opts.template).read_text().splitlines()
    if opts.nodes is not None:
        lines = _set_sbatch(lines, "nodes", str(opts.nodes))
    if opts.gpus_per_node is not None:
        lines = _set_sbatch(lines, "gpus-per-node", str(opts.gpus_per_node) if opts.gpus_per_node > 0 else None)
        lines = _set_env(lines, "DISTTHINK_GPUS_PER_NODE", str(opts.gpus_per_node))
    if opts.cpu_procs_per_node is not None:
        lines = _set_env(lines, "DISTTHINK_CPU_PROCS_PER_NODE", str(opts.cpu_procs_per_node))
    for option, value in (("partition", opts.partition), ("time", opts.time), ("job-name", opts.job_name)):
        if value is not None:
            lines = _set_sbatch(lines, option, value)
    if opts.signal_grace_s is not None:
        lines = _set_sbatch(lines, "signal", f"B:USR1@{opts.signal_grace_s}")
    settings = (("DISTTHINK_CONFIG", opts.config), ("DISTTHINK_OUTPUT_DIR", opts.output_dir),
                ("DISTTHINK_ACCELERATE_CONFIG", opts.accelerate_config), ("DISTTHINK_SETUP", opts.setup),
                ("DISTTHINK_SRUN_ARGS", opts.srun_args),
                ("DISTTHINK_OVERRIDES", " ".join(opts.overrides) if opts.overrides else None))
    for name, value in settings:
        if value is not None:
            lines = _set_env(lines, name, value)
    # The rendered script runs from SLURM's spool dir; relative paths (the default accelerate config)
    # are looked up in the submit dir, then in DISTTHINK_ROOT (overridable: render here, run elsewhere).
    root = configs_root()
    lines = _set_env(lines, "DISTTHINK_ROOT", str(root))
    lines = [f'export DISTTHINK_ROOT="${{DISTTHINK_ROOT:-{root}}}"' if line.startswith("export DISTTHINK_ROOT=")
             else line for line in lines]
    return _inline_launcher("\n".join(lines) + "\n")


def configs_root() -> Path:
    """The folder that relative `configs/accelerate/...` paths resolve against: the checkout when distthink runs
    from one (its configs/ are the user-facing copies), else the installed package, which ships them."""
    checkout = PACKAGE_DIR.parent
    return checkout if (checkout / "configs" / "accelerate").is_dir() else PACKAGE_DIR


def _inline_launcher(script: str) -> str:
    begin, end = script.find(LAUNCHER_BEGIN), script.find(LAUNCHER_END)
    if begin < 0 or end < begin:
        raise ConfigError(f"template has no '{LAUNCHER_BEGIN}' ... '{LAUNCHER_END}' block to inline the launcher into")
    launcher = launcher_path().read_text()
    if launcher.startswith("#!"):
        launcher = launcher.split("\n", 1)[1]
    end_line = script.find("\n", end) + 1
    block = (f"# ===== slurm/launch.sh, inlined by `distthink slurm render` =====\n{launcher.rstrip()}\n"
             "# ===== end of slurm/launch.sh =====\n")
    return script[:begin] + block + script[end_line:]
