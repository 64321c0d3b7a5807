"""What a run reports: the metrics history, the loss plot, peak memory and the end-of-run summary."""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch

from distthink.config import Config


def tracker_config(cfg: Config) -> dict:
    """Flat scalar view of the config for TensorBoard hparams."""
    flat = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def read_history(metrics_path: Path, up_to_step: int) -> list[dict]:
    """The metrics records of steps <= up_to_step (a killed run may have logged steps after its checkpoint)."""
    if not metrics_path.exists():
        return []
    rows = (json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip())
    return [r for r in rows if r.get("step", 0) <= up_to_step]


def write_history(metrics_path: Path, history: list[dict]) -> None:
    metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))


def plot_losses(history: list[dict], path: Path) -> None:
    import matplotlib  # lazy: choose the headless backend before pyplot loads, without changing the caller's

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and math.isfinite(h["loss"])]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if train:
        ax.plot(*zip(*train), label="train loss (global, weighted)")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def peak_memory_mb(device) -> float:
    """Peak memory of this process: GPU allocator peak on CUDA, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def skipped_lines(data: dict) -> list[str]:
    """The run summary's lines about skipped records (data.on_error=skip): the count per split and the first
    message of its commonest reasons. Nothing when no record was skipped."""
    lines = []
    for split, d in (data or {}).items():
        if d and d.get("skipped"):
            reasons = ", ".join(f"{n} x {r}" for r, n in sorted(d["reasons"].items(), key=lambda kv: (-kv[1], kv[0])))
            lines.append(f"  skipped records    {d['skipped']} of {d['records']} {split} records ({reasons})")
            lines += [f"    e.g. {text}" for text in d["examples"].values()]
    return lines


def summary_text(s: dict) -> str:
    def fmt(x, spec):
        return format(x, spec) if isinstance(x, (int, float)) else ("n/a" if x is None else str(x))

    return "\n".join([
        "=" * 64,
        "distthink training summary",
        f"  steps              {s['steps']} on {s['world_size']} rank(s), {s['train_samples']} train samples",
        f"  final train loss   {fmt(s['final_loss'], '.4f')}",
        f"  eval loss          {fmt(s['eval_loss'], '.4f')}  ({s['eval_samples']} held-out samples)",
        f"  learned tokens     {s['learned_tokens']}",
        f"  throughput         {fmt(s['learned_tokens_per_s'], '.0f')} learned tokens/s "
        f"({fmt(s['tokens_per_s'], '.0f')} tokens/s), peak memory {fmt(s['peak_memory_mb'], '.0f')} MiB/rank",
        f"  checkpoint         {s['checkpoint']}",
        f"  export             {s['export']}",
        f"  wall time          {s['wall_s']} s",
        *skipped_lines(s.get("data", {})),
        "=" * 64,
    ])
