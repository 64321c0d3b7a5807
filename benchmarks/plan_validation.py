"""Check `distthink plan`'s memory estimate against the measured peak of real training runs on CPU.

    python benchmarks/plan_validation.py [--quick] [--cases NAME,...]

Each case launches the real recipe (`distthink.train.run`, 1 or 2 gloo ranks, plain / DeepSpeed ZeRO-2 /
ZeRO-3, LoRA / full, fp32 on CPU) with a live-tensor-bytes tracker installed in every rank, then compares
each rank's measured peak with `distthink.launch.plan.estimate(...)` for the same shape. The last line is JSON.

What is measured, and why it is the quantity the estimate models
-----------------------------------------------------------------
`LiveTensorBytes` is a TorchDispatchMode entered before the process builds anything. Every tensor an
aten op returns is looked up by its storage; a storage seen for the first time adds its size to the live
total, and a weakref callback subtracts it when the storage dies (storage resizes are tracked too). The
peak of that total is the CPU analogue of `torch.cuda.max_memory_allocated()`: the bytes of every live
tensor storage (parameters, gradients, optimizer states, DeepSpeed flat buffers and partitions,
activations saved for backward, loss buffers, communication buckets), and nothing else. The planner's
`allocated` figure is exactly that sum; the CUDA context and the caching allocator's fragmentation margin
are GPU-only terms, so they are excluded on both sides of the comparison (`Estimate.allocated_bytes`).

Peak RSS was the alternative. It also contains the Python heap, the shared libraries and glibc arena
caching, which are not what a GPU runs out of, and untouched `torch.empty` pages are not resident, so
it over- and under-counts in ways that depend on the allocator rather than on the model.

The peak is taken over the training steps only: the tracker's peak is frozen when the recipe calls
`save_checkpoint` for the first time (the final checkpoint/export are not training memory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# The tracker (runs inside each rank).
# ----------------------------------------------------------------------------------------------------

def _make_tracker():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LiveTensorBytes(TorchDispatchMode):
        """Live and peak bytes of the CPU tensor storages created while the mode is active."""

        def __init__(self):
            super().__init__()
            self.live = 0
            self.peak = 0
            self.frozen_peak = None
            self._sizes: dict[int, int] = {}  # id(storage key) -> bytes counted
            self._refs: dict[int, weakref.ref] = {}
            self._origin: dict[int, str] = {}
            self.debug = bool(os.environ.get("PLAN_VALIDATION_DEBUG"))
            self.at_peak: list = []
            self._last_snapshot = 0
            self.op = ""

        def _forget(self, key: int, _ref=None) -> None:
            self.live -= self._sizes.pop(key, 0)
            self._refs.pop(key, None)
            self._origin.pop(key, None)

        def _see(self, t) -> None:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.is_meta:
                return
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                return
            key = st._cdata  # one StorageImpl per storage, whatever Python wrapper we get
            n = st.nbytes()
            old = self._sizes.get(key)
            if old is None:
                self._sizes[key] = n
                self._refs[key] = weakref.ref(st, lambda r, k=key: self._forget(k))
                self.live += n
                if self.debug:
                    import traceback

                    frames = [f for f in traceback.extract_stack(limit=25)[:-3] if "plan_validation" not in f.filename]
                    self._origin[key] = f"{self.op} @ " + " < ".join(
                        f"{Path(f.filename).name}:{f.lineno}" for f in frames[-4:][::-1])
            elif old != n:  # resized in place (aten::resize_, set_)
                self._sizes[key] = n
                self.live += n - old
            if self.live > self.peak:
                self.peak = self.live
                if self.debug and self.frozen_peak is None and self.peak > self._last_snapshot + 2**20:
                    self._last_snapshot = self.peak
                    self.at_peak = sorted(((self._sizes[k], self._origin.get(k, "?")) for k in self._sizes
                                           if self._sizes[k] > 2**20), reverse=True)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.op = str(func)
            for t in tree_leaves(out):
                self._see(t)
            if func in (torch.ops.aten.resize_.default, torch.ops.aten.set_.source_Storage):
                for t in tree_leaves(args):
                    self._see(t)
            return out

        # UntypedStorage.resize_ is not an aten op, so the mode never sees it (DeepSpeed 0.19 does not
        # use it, but other code may): wrap it while the mode is active.
        def __enter__(self):
            self._orig_resize = torch.UntypedStorage.resize_
            tracker = self

            def resize_(st, size):
                out = tracker._orig_resize(st, size)
                tracker._see(torch.empty(0, dtype=torch.uint8).set_(st) if st.device.type == "cpu" else None)
                return out

            torch.UntypedStorage.resize_ = resize_
            return super().__enter__()

        def __exit__(self, *exc):
            torch.UntypedStorage.resize_ = self._orig_resize
            return super().__exit__(*exc)

        def freeze(self) -> None:
            if self.frozen_peak is None:
                self.frozen_peak = self.peak

    return LiveTensorBytes()


def child_main(result_path: str, overrides: list[str]) -> int:
    """Run the real recipe in this process with the tracker on; write this rank's figures as JSON."""
    import torch

    from distthink.config import load_config
    from distthink.engine import batching as train_data
    from distthink import train as recipe
    from distthink.engine import checkpoint as ckpt

    cfg = load_config(None, overrides)
    tracker = _make_tracker()
    seen = {"max_T": 0, "max_learned": 0}

    orig_save, orig_export, orig_collator = ckpt.save_checkpoint, recipe.export_model, train_data.make_collator

    def save(*a, **k):
        tracker.freeze()
        return orig_save(*a, **k)

    def export(*a, **k):
        tracker.freeze()
        return orig_export(*a, **k)

    def make_collator(*a, **k):
        collate = orig_collator(*a, **k)

        def wrapped(samples):
            mb = collate(samples)
            seen["max_T"] = max(seen["max_T"], int(mb["input_ids"].numel()))
            seen["max_learned"] = max(seen["max_learned"], int(mb["num_target_tokens"]))
            return mb

        return wrapped

    ckpt.save_checkpoint, recipe.export_model, train_data.make_collator = save, export, make_collator
    # Diagnostics: live bytes right after accelerator.prepare (the persistent states) and at the start
    # of each backward (states + saved activations + loss buffers).
    import accelerate

    orig_prepare, orig_backward = accelerate.Accelerator.prepare, accelerate.Accelerator.backward
    marks: dict[str, int] = {}

    def prepare(self, *a, **k):
        marks["before_prepare"] = tracker.live
        out = orig_prepare(self, *a, **k)
        marks["after_prepare"] = tracker.live
        return out

    def backward(self, loss, **k):
        marks["backward_start_max"] = max(marks.get("backward_start_max", 0), tracker.live)
        return orig_backward(self, loss, **k)

    accelerate.Accelerator.prepare, accelerate.Accelerator.backward = prepare, backward
    rank = int(os.environ.get("RANK", "0"))
    with tracker:
        rc = recipe.run(cfg)
    tracker.freeze()
    out = {"rank": rank, "rc": rc, "peak_bytes": tracker.frozen_peak, "max_T": seen["max_T"],
           "max_learned": seen["max_learned"], "marks": marks, "torch": torch.__version__}
    if tracker.debug:
        out["at_peak"] = [(round(n / 2**20, 2), o) for n, o in tracker.at_peak]
    Path(f"{result_path}.rank{rank}.json").write_text(json.dumps(out))
    return rc


# ----------------------------------------------------------------------------------------------------
# Cases and the comparison (runs in the parent).
# ----------------------------------------------------------------------------------------------------

# A "small" model whose training states dominate: Qwen3 shape, hidden 512, 8 layers, 16k vocab (33M params).
SMALL = ["model.config_overrides={hidden_size: 512, num_hidden_layers: 8, num_attention_heads: 8, "
         "num_key_value_heads: 4, head_dim: 64, intermediate_size: 1536, vocab_size: 16384, "
         "layer_types: [" + ", ".join(["full_attention"] * 8) + "]}"]
TINY: list[str] = []  # the default tiny-qwen3 (hidden 64, 2 layers)
LONG = ["batch.max_tokens=2048", "data.max_length=2048"]  # rows of ~37 bundled samples

COMMON = ["logging.progress=false", "logging.tensorboard=false", "logging.plot=false", "eval.every_steps=0",
          "data.eval=null", "checkpoint.export=none", "checkpoint.resume=never", "checkpoint.every_steps=0", "model.dtype=float32",
          "train.device=cpu", "batch.max_tokens=512", "data.max_length=512", "train.max_steps=2"]

# name -> (nproc, overrides)
CASES: dict[str, tuple[int, list[str]]] = {
    "tiny_1r_plain_full": (1, TINY + ["lora.enabled=false"]),
    "small_1r_plain_full": (1, SMALL + ["lora.enabled=false"]),
    "small_1r_plain_lora": (1, SMALL + ["lora.enabled=true", "lora.dropout=0.0"]),
    "small_2r_zero2_full": (2, SMALL + ["lora.enabled=false", "distributed.deepspeed=ds_configs/zero2.json"]),
    "small_2r_zero3_full": (2, SMALL + ["lora.enabled=false", "distributed.deepspeed=ds_configs/zero3.json"]),
    "small_2r_zero3_lora": (2, SMALL + ["lora.enabled=true", "lora.dropout=0.0",
                                        "distributed.deepspeed=ds_configs/zero3.json"]),
    "small_1r_plain_full_ckpt": (1, SMALL + ["lora.enabled=false", "model.gradient_checkpointing=true"]),
    "small_1r_plain_full_hf": (1, SMALL + ["lora.enabled=false", "loss.impl=hf"]),
    # bf16 on CPU: the GPU dtype, so the mixed-precision terms (fp32 master copies, fp32 upcasts in the
    # norms and the loss workspace, peft's fp32 adapters) run through the real code paths too.
    "small_1r_plain_full_bf16": (1, SMALL + ["lora.enabled=false", "model.dtype=bfloat16"]),
    "small_2r_zero3_full_bf16": (2, SMALL + ["lora.enabled=false", "model.dtype=bfloat16",
                                             "distributed.deepspeed=ds_configs/zero3.json"]),
    "small_2r_zero2_lora_bf16": (2, SMALL + ["lora.enabled=true", "lora.dropout=0.05", "model.dtype=bfloat16",
                                             "distributed.deepspeed=ds_configs/zero2.json"]),
    # Sequence parallelism: one 2048-token packed row on 2 ranks, as 2 data-parallel rows (SP 1) or shared by
    # both ranks (SP 2: half the per-token activations, the sdpa mask of the whole row on each), and with the
    # MLP tiled. Same ZeRO-3 states in all three, so the difference is the activation estimate's.
    "small_2r_zero3_full_long": (2, SMALL + LONG + ["lora.enabled=false", "distributed.deepspeed=ds_configs/zero3.json"]),
    "small_2r_zero3_full_long_sp2": (2, SMALL + LONG + ["lora.enabled=false", "distributed.sequence_parallel=2",
                                                         "distributed.deepspeed=ds_configs/zero3.json"]),
    "small_2r_zero3_full_long_sp2_tiled": (2, SMALL + LONG + ["lora.enabled=false", "distributed.sequence_parallel=2",
                                                               "model.tiled_mlp=4",
                                                               "distributed.deepspeed=ds_configs/zero3.json"]),
}
QUICK = ["small_1r_plain_lora"]  # one real run: about 30 s on 2 cores (the process start dominates)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(name: str, workdir: str, timeout: float = 600) -> dict:
    """Launch one case; returns {"ranks": [per-rank child figures], "overrides": [...], "nproc": n}."""
    nproc, extra = CASES[name]
    out_dir = Path(workdir) / name
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    overrides = COMMON + extra + [f"train.output_dir={out_dir}"]
    result = str(Path(workdir) / f"{name}.result")
    me = str(Path(__file__).resolve())
    if nproc == 1:
        cmd = [sys.executable, me, "--child", result, "--", *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
               f"--master_port={_free_port()}", "--master_addr=127.0.0.1", me, "--child", result, "--", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    ranks = [json.loads(Path(f"{result}.rank{r}.json").read_text()) for r in range(nproc)]
    return {"name": name, "nproc": nproc, "overrides": overrides, "ranks": ranks, "wall_s": time.time() - t0}


def compare(measured: dict) -> dict:
    """The planner's estimate for the same config and the observed micro-batch size, vs the peak."""
    from distthink.config import load_config
    from distthink.launch.hardware import GPUS
    from distthink.launch.plan import (
        candidate_of_config,
        estimate,
        memory_terms,
        model_shape_from_config,
        run_shape_from_config,
    )

    cfg = load_config(None, measured["overrides"])
    shape = model_shape_from_config(cfg)
    # The estimate is fed the largest micro-batch the run really had (the packer fills up to the budget).
    max_t = max(r["max_T"] for r in measured["ranks"])
    learned = max(r["max_learned"] for r in measured["ranks"])
    run = run_shape_from_config(cfg, tokens_per_micro_batch=max_t, device="cpu", learned_fraction=learned / max_t)
    candidate = candidate_of_config(cfg)
    n = measured["nproc"]
    est = estimate(shape, run, nodes=1, gpus_per_node=n, gpu=GPUS["h100"], candidate=candidate)
    peak = max(r["peak_bytes"] for r in measured["ranks"])
    ratio = est.allocated_bytes / peak
    terms = memory_terms(shape, run, n=n, candidate=candidate)
    return {"name": measured["name"], "candidate": candidate, "ranks": n, "max_T": max_t,
            "params": shape.num_params, "measured_peak_MiB": round(peak / 2**20, 2),
            "estimate_MiB": round(est.allocated_bytes / 2**20, 2), "ratio": round(ratio, 3),
            "terms_MiB": {k: round(v / 2**20, 2) for k, v in terms.items() if v},
            "wall_s": round(measured["wall_s"], 1)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        sep = argv.index("--")
        return child_main(argv[1], argv[sep + 1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK}")
    ap.add_argument("--cases", default=None, help=f"comma-separated subset of {list(CASES)}")
    ap.add_argument("--tolerance", type=float, default=0.10)
    args = ap.parse_args(argv)
    names = args.cases.split(",") if args.cases else (QUICK if args.quick else list(CASES))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = compare(measure(name, tmp))
            row["within_tolerance"] = abs(row["ratio"] - 1) <= args.tolerance
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"benchmark": "plan_validation", "tolerance": args.tolerance, "cases": rows,
                      "all_within_tolerance": all(r["within_tolerance"] for r in rows)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
