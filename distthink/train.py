"""The training recipe. Read it top to bottom: this file *is* the training method.

    accelerate launch [--config_file configs/accelerate/X.yaml] -m distthink.train [--config C.yaml] [k=v ...]
    python -m distthink.train [--config C.yaml] [k=v ...]          # one process
    distthink train [--config C.yaml] [k=v ...]                     # same as python -m

With no --config it runs the embedded default (tiny Qwen3 from config, offline tiny tokenizer, bundled
sample data with reasoning, CPU) and ends with a summary.

What differs between reasoning SFT, ThinkRec and molecule captioning (data, side inputs, extra modules,
objectives) is a *task* (distthink/engine/task.py); this loop is shared.

One optimizer step:
  1. take this rank's GA micro-batches of the step (deterministic plan indexed by (epoch, position));
  2. all-reduce their normalisers -> W_k per objective k (for SFT: the global token-weight total W), and
     the preemption flag, so that every rank stops at the same step boundary;
  3. for each micro-batch: sums_k = sum w*loss (inside the engine forward), backward(sum_k sums_k * world*GA/W_k);
     accelerate/DeepSpeed divide by GA and average over ranks, so the gradient is exactly d(L)/dθ with
     L = global sum / W (see distthink/engine/lm_loss.py; with sequence parallelism the rows are sharded and
     DeepSpeed's divisor depends on the ZeRO stage: distthink/engine/sequence_parallel.py);
  4. clip, NaN/Inf guard (an fp16 loss-scale overflow is not a NaN step), optimizer + scheduler step, log, maybe
     evaluate / checkpoint.

Exit codes: 0 done; 2 user error (config/data/checkpoint, message says the fix); 3 stopped by the
NaN/Inf guard; 75 (REQUEUE_EXIT_CODE, EX_TEMPFAIL) preempted by SIGTERM/SIGUSR1 after saving a
checkpoint: requeue the job with `checkpoint.resume=auto`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distthink.cli import add_run_arguments
from distthink.config import Config, deepspeed_config, load_config, param_dtype, resolve_dtype, world_size_of_launch
from distthink.data.packing import batch_to
from distthink.engine import batching as train_data
from distthink.engine import checkpoint as ckpt
from distthink.engine import distributed as dist
from distthink.engine import faults, overflow, probes, reshard
from distthink.engine import sequence_parallel as seqpar
from distthink.engine.exit_status import report_error, write_status
from distthink.engine.export import export_model
from distthink.engine.lm_loss import loss_parts, micro_batch_scale
from distthink.engine.preemption import REQUEUE_EXIT_CODE, PreemptionFlag
from distthink.engine.report import (
    peak_memory_mb,
    plot_losses,
    read_history,
    summary_text,
    tracker_config,
    write_history,
)
from distthink.engine.resume_guard import check_resume, data_digests
from distthink.engine.schedule import lr_lambda
from distthink.engine.task import make_task
from distthink.errors import DistthinkError
from distthink.logging_utils import get_logger
from distthink.models.attention import attn_implementation_of
from distthink.models.load import load_model, load_tokenizer
from distthink.zero3 import is_partitioned

log = get_logger("distthink.train")

NAN_STOP_EXIT_CODE = 3


# ----------------------------------------------------------------------------------------------------
# The recipe.
# ----------------------------------------------------------------------------------------------------

def run(cfg: Config, *, ends_process: bool = False) -> int:
    """Train as `cfg` says; returns the exit code. ends_process: this process exits (dist.leave) right after, as a
    rank of a launch does; its process group is then left alive rather than destroyed (engine/distributed.py)."""
    t_start = time.time()
    out_dir = Path(cfg.train.output_dir)
    # 0. Everything a user can get wrong is checked before any process group, model or data exists.
    task = make_task(cfg)  # what this recipe variant reads, trains and sums; validates task.options
    train_data.chat_policy(cfg)  # data.policy
    if cfg.distributed.deepspeed:
        deepspeed_config(cfg, world_size_of_launch())  # batch fields, stage vs offload
    resume_from = ckpt.resolve_resume(cfg.checkpoint.resume, str(out_dir))
    if resume_from is not None:
        check_resume(cfg, resume_from)  # a relaunch with another model / data / seed must not resume silently
    digests = data_digests(cfg)
    preempt = PreemptionFlag()

    # 1. Process group first: under ZeRO-3 the DeepSpeed config must exist before the model is built.
    trackers = (["tensorboard"] if cfg.logging.tensorboard else []) + (["wandb"] if cfg.logging.wandb else [])
    # A ZeRO checkpoint saved at another world size is loaded from its universal form (engine/reshard.py).
    universal = bool(cfg.distributed.deepspeed) and reshard.layout_changed(resume_from, world_size_of_launch())
    accelerator = dist.setup(cfg, log_with=trackers, project_dir=str(out_dir), load_universal=universal)
    try:
        device, dtype = accelerator.device, param_dtype(cfg)
        world, rank, ga = accelerator.num_processes, accelerator.process_index, cfg.batch.gradient_accumulation
        is_main = accelerator.is_main_process
        use_ds = bool(cfg.distributed.deepspeed)
        fp16 = resolve_dtype(cfg, device.type) == torch.float16  # loss scaling: GradScaler or DeepSpeed's scaler
        if is_main:
            out_dir.mkdir(parents=True, exist_ok=True)

        # 2. Data: both splits from the shared encoded-data cache (encoded once, by one writer, if missing);
        #    the micro-batch plan per rank comes from the lengths alone, rows are read when collated.
        tokenizer = load_tokenizer(cfg)
        keys = task.loss_keys
        task.prepare_tokenizer(tokenizer)
        # Sequence parallelism (distributed.sequence_parallel): ranks of one SP group share each micro-batch.
        sp = seqpar.run_layout(cfg, task, tokenizer, world, rank)
        train_set = train_data.load_split(cfg, task, "train", tokenizer)
        eval_set = train_data.load_split(cfg, task, "eval", tokenizer) if cfg.data.eval else []
        sampler = train_data.make_sampler(cfg, train_set, world=sp.dp_size, rank=sp.dp_rank, grad_accumulation=ga,
                                          shuffle=cfg.batch.shuffle)
        eval_sampler = (train_data.make_sampler(cfg, eval_set, world=sp.dp_size, rank=sp.dp_rank,
                                                grad_accumulation=1, shuffle=False)
                        if len(eval_set) >= sp.dp_size else None)
        collate = task.collator(tokenizer)
        mixture = getattr(train_set, "names", None)  # sources of a mixture: per-source counts in the metrics
        steps_per_epoch = len(sampler.rank_batches(0)) // ga
        total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
        if resume_from is not None:  # on other data-parallel ranks / GA: continue at the same global sample
            saved = ckpt.read_state(resume_from)
            sampler, resume_micro = train_data.continue_plan(cfg, train_set, sampler, saved, world=sp.dp_size,
                                                             rank=sp.dp_rank, grad_accumulation=ga,
                                                             shuffle=cfg.batch.shuffle)
            if not cfg.train.max_steps and isinstance(sampler, train_data.RemainderOfEpoch):
                # train.epochs on a new layout: the resumed epoch's remainder, then whole epochs
                total_steps = (saved["step"] + (len(sampler.rank_batches(saved["epoch"])) - resume_micro) // ga
                               + (cfg.train.epochs - saved["epoch"] - 1) * steps_per_epoch)

        # 3. Model (partitioned at construction under ZeRO-3), loss wrapper, optimizer, schedule.
        model = load_model(cfg, tokenizer, device.type, dtype, compute_dtype=resolve_dtype(cfg, device.type))
        partitioned = is_partitioned(model)
        if use_ds and dist.zero_stage(accelerator) == 3:
            log.info("ZeRO-3: parameters partitioned at construction: %s", partitioned)
        wrapped = task.wrap_model(model, tokenizer)  # the loss runs inside this module's (engine) forward
        # A mixture reports its loss per source: the LM-head loss part keeps per-sample sums of each micro-batch.
        tracked = loss_parts(wrapped) if mixture else []
        for part in tracked:
            part.track_segments = True
        params = [p for p in wrapped.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                      weight_decay=cfg.train.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
        seqpar.before_prepare(sp, wrapped)
        wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
        # Different dropout streams per rank, reproducible per (seed, rank); restored exactly on resume.
        torch.manual_seed(cfg.train.seed * 1000 + rank + 1)
        attn_impl = seqpar.after_prepare(sp, wrapped, attn_implementation_of(model))
        grad_divisor = seqpar.gradient_divisor(cfg, sp)  # what DeepSpeed/DDP divide the summed gradients by
        if trackers:
            # The hyperparameters are stored once, at the run's first launch: TensorBoard writes them into a new
            # timestamped folder each time, and a resumed run is the same run.
            accelerator.init_trackers("tb", config=None if resume_from else tracker_config(cfg))

        # 4. Resume (model, optimizer, RNG of every rank, data position, schedule, counters).
        step, epoch, micro_index, nan_streak, history = 0, 0, 0, 0, []
        # whole-run counters, kept in the trainer state so that a resumed run reports the whole run
        run_totals = {"learned_tokens": 0, "tokens": 0, "train_time_s": 0.0}
        metrics_path = out_dir / "metrics.jsonl"
        if resume_from is not None:
            state = ckpt.load_checkpoint(accelerator, resume_from, universal)
            probes.optimizer_state("load", state["step"], wrapped)
            step, epoch, micro_index = state["step"], state["epoch"], resume_micro
            nan_streak = state.get("nan_streak", 0)
            run_totals.update(state.get("run_totals") or {"learned_tokens": state.get("learned_tokens_total", 0)})
            scheduler.load_state_dict(state["scheduler"])
            if is_main:  # the metrics history lives in metrics.jsonl, not the checkpoint
                history = read_history(metrics_path, step)
        if is_main:  # keep exactly the records up to the resumed step (a killed run may have logged more)
            write_history(metrics_path, history)

        def trainer_state() -> dict:
            return {"step": step, "epoch": epoch, "micro_index": micro_index, "nan_streak": nan_streak,
                    "scheduler": scheduler.state_dict(), "run_totals": dict(run_totals), "world_size": world,
                    "dp_size": sp.dp_size, "sequence_parallel": sp.size, "grad_accumulation": ga,
                    "sampler_seed": cfg.train.seed, "data_digests": digests}

        def save() -> Path:
            probes.optimizer_state("save", step, wrapped)
            return ckpt.save_checkpoint(accelerator, str(out_dir), step, trainer_state(), cfg.to_dict(),
                                        keep_last=cfg.checkpoint.keep_last)

        def evaluate() -> float | None:
            if eval_sampler is None:
                return None
            wrapped.eval()
            batches = eval_sampler.rank_batches(0)
            if cfg.eval.max_batches:
                batches = batches[:cfg.eval.max_batches]
            sums, norms = [0.0] * len(keys), [0.0] * len(keys)
            with torch.no_grad():
                for b in batches:
                    mb = batch_to(seqpar.shard(collate([eval_set[i] for i in b]), sp), device)
                    out, mb_norms = task.forward(wrapped, mb, attn_impl, dtype), task.norms(mb)
                    for i, k in enumerate(keys):
                        sums[i] += float(out[k])
                        norms[i] += mb_norms[k]
            wrapped.train()
            reduced = dist.all_reduce_sum(sums + norms, device)
            if sum(reduced[len(keys):]) <= 0:
                return float("nan")
            return sum(_ratio(s, n) for s, n in zip(reduced[:len(keys)], reduced[len(keys):]))

        # 5. The loop.

        bar = tqdm(total=total_steps, initial=step, disable=not (is_main and cfg.logging.progress),
                   dynamic_ncols=True, desc="train")
        launch = {"learned_tokens": 0, "tokens": 0, "train_time_s": 0.0}  # this launch only
        first_step = step
        last_ckpt: Path | None = resume_from
        exit_code = 0
        wrapped.train()
        while step < total_steps:
            batches = sampler.rank_batches(epoch)
            if micro_index + ga > len(batches):
                epoch, micro_index = epoch + 1, 0
                continue
            faults.kill_before_step(step + 1, rank)
            t0 = time.time()
            # Prefetch this step's GA micro-batches, so the global weight total is known before backward.
            step_batches = batches[micro_index:micro_index + ga]
            if hasattr(task, "on_step_start"):  # optional hook: on-policy tasks refresh this step's samples
                task.on_step_start(step, accelerator.unwrap_model(wrapped), train_set,
                                   [i for b in step_batches for i in b])
            micro = [seqpar.shard(collate([train_set[i] for i in b]), sp) for b in step_batches]
            local_norms = [sum(task.norms(m)[k] for m in micro) for k in keys]
            local_n = sum(m["num_target_tokens"] for m in micro)
            local_tok = sum(int((m["segment_ids"] >= 0).sum()) for m in micro)  # real (non-pad) tokens
            local_mix = train_data.source_counts(train_set, step_batches, micro) if mixture else []
            reduced = dist.all_reduce_sum(local_norms + [local_n, local_tok, float(preempt.requested)] + local_mix,
                                          device)
            norms, (N, ntok, stop), mix = reduced[:len(keys)], reduced[len(keys):len(keys) + 3], reduced[len(keys) + 3:]
            W = sum(norms)  # > 0 iff this step has anything to learn
            if stop > 0:
                log.warning("preemption signal received (%s): saving at step %d and exiting with code %d",
                            preempt.signal_name or "on another rank", step, REQUEUE_EXIT_CODE)
                last_ckpt = save()
                exit_code = REQUEUE_EXIT_CODE
                break
            # Each objective k is normalised by its own global total (distthink/engine/task.py).
            scales = [micro_batch_scale(n, grad_divisor, ga) for n in norms]
            local_sums, local_bad, ds_skipped = [0.0] * len(keys), 0.0, False
            local_mix_loss = [0.0] * (2 * len(mixture or []))  # per source: sum of w * CE, sum of w
            for b, m in zip(step_batches, micro):
                mb = batch_to(m, device)
                with accelerator.accumulate(wrapped):
                    sums = task.forward(wrapped, mb, attn_impl, dtype)
                    if tracked:
                        train_data.add_source_sums(local_mix_loss, train_set, b, tracked)
                    if faults.nan_loss(step + 1):
                        sums = {k: v * float("nan") for k, v in sums.items()}
                    for i, k in enumerate(keys):
                        local_sums[i] += float(sums[k].detach())
                    if not all(bool(torch.isfinite(sums[k].detach())) for k in keys):
                        local_bad = 1.0
                    loss_sum = sum(sums[k] * s for k, s in zip(keys, scales))
                    if faults.inf_gradients(step + 1):
                        loss_sum = faults.InfGradient.apply(loss_sum)
                    if use_ds and accelerator.sync_gradients:
                        # DeepSpeed steps inside the boundary backward, so the NaN/Inf guard must decide
                        # before it: with a non-finite loss on any rank, back-propagate (DeepSpeed's
                        # reduction state stays consistent) and drop the gradients instead of stepping.
                        ds_skipped = dist.all_reduce_sum([local_bad], device)[0] > 0
                    if ds_skipped:
                        wrapped.set_gradient_accumulation_boundary(True)
                        wrapped.backward(loss_sum)
                        wrapped.optimizer.zero_grad()
                    else:
                        accelerator.backward(loss_sum)
            # The last accumulate() synchronised the gradients (DeepSpeed: the engine has stepped).
            if use_ds:
                grad_norm = None if ds_skipped else wrapped.get_global_grad_norm()
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            else:
                grad_norm = float(accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm or float("inf")))
            reduced = dist.all_reduce_sum(local_sums + [local_bad] + local_mix_loss, device)
            loss_totals, bad, mix_loss = reduced[:len(keys)], reduced[len(keys)], reduced[len(keys) + 1:]
            parts = {k: _ratio(t, n) for k, t, n in zip(keys, loss_totals, norms)}
            loss = sum(parts.values())
            # Applied, skipped as non-finite, or skipped as an fp16 loss-scale overflow (distthink/engine/overflow.py).
            scale = overflow.loss_scale_of(accelerator.scaler, wrapped.optimizer if use_ds else None) if fp16 else None
            kind = overflow.classify_step(W, bad == 0 and math.isfinite(loss), grad_norm, scale)
            overflow.finish_step(kind, optimizer, accelerator.scaler, deepspeed=use_ds)
            lr_used = scheduler.get_last_lr()[0]
            if kind == overflow.EMPTY:  # no learned token anywhere in this step: nothing to learn, not an error
                log.info("step %d has no learned tokens on any rank: no optimizer step", step + 1)
            elif kind == overflow.STEP:
                scheduler.step()
                nan_streak = 0
            elif kind == overflow.OVERFLOW:
                log.info("step %d: fp16 loss-scale overflow (finite loss, gradients not finite at scale %g): update "
                         "skipped, scale now %g; not counted as a non-finite step", step + 1, scale,
                         overflow.loss_scale_of(accelerator.scaler, wrapped.optimizer if use_ds else None))
            else:
                nan_streak += 1
                log.warning("step %d: non-finite loss=%s grad_norm=%s: step skipped (%d in a row, limit %d)%s",
                            step + 1, loss, grad_norm, nan_streak, cfg.train.nan_max_consecutive,
                            "" if not use_ds or ds_skipped else
                            " [finite loss, non-finite gradients: DeepSpeed's optimizer skipped it as an overflow]")
            optimizer.zero_grad(set_to_none=True)
            step += 1
            micro_index += ga
            probes.samples_seen(step, epoch, sp, [i for b in step_batches for i in b])
            dt = time.time() - t0
            for counters in (launch, run_totals):
                counters["learned_tokens"] += int(N)
                counters["tokens"] += int(ntok)
                counters["train_time_s"] += dt
            record = {"step": step, "epoch": epoch, "loss": loss, "grad_norm": grad_norm,
                      **({f"loss_{k}": v for k, v in parts.items()} if len(keys) > 1 else {}),
                      "lr": lr_used, "learned_tokens": int(N), "weight_sum": norms[0],
                      "tokens": int(ntok), "learned_tokens_per_s": N / dt if dt > 0 else 0.0,
                      "time_s": round(time.time() - t_start, 3)}
            for i, name in enumerate(mixture or []):  # mix/<source>/{samples, learned_tokens, weight_sum, loss}
                k = len(mixture)
                record.update({f"mix/{name}/samples": int(mix[i]), f"mix/{name}/learned_tokens": int(mix[k + i]),
                               f"mix/{name}/weight_sum": mix[2 * k + i]})
                if tracked:  # the LM loss of the source's tokens: sum of w * CE / sum of w (None: none in the step)
                    record[f"mix/{name}/loss"] = mix_loss[i] / mix_loss[k + i] if mix_loss[k + i] > 0 else None
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < total_steps:
                record["eval_loss"] = evaluate()
            history.append(record)
            if is_main:
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['learned_tokens_per_s']:.0f}",
                                lr=f"{record['lr']:.2e}")
                bar.update(1)
            if step % cfg.logging.every_steps == 0 and trackers:
                accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
            if nan_streak >= cfg.train.nan_max_consecutive:
                log.error("%d non-finite steps in a row: stopping (lower train.lr, check the data)", nan_streak)
                exit_code = NAN_STOP_EXIT_CODE
                break
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < total_steps:
                last_ckpt = save()
        bar.close()

        # 6. Final evaluation, checkpoint, export, plot and summary.
        if exit_code == 0:
            eval_loss = evaluate()
            if history and eval_loss is not None:
                history[-1]["eval_loss"] = eval_loss
                if trackers:  # the final evaluation belongs in TensorBoard too, at the last step
                    accelerator.log({"eval_loss": eval_loss}, step=step)
            if cfg.checkpoint.final and step > 0 and (last_ckpt is None or last_ckpt.name != ckpt.step_name(step)):
                last_ckpt = save()
            export_path = None
            kind = cfg.checkpoint.export
            if kind == "auto":
                kind = "adapter" if cfg.lora.enabled else "full"
            if kind != "none":
                export_dtype = getattr(torch, cfg.checkpoint.export_dtype)
                export_path = export_model(accelerator, wrapped, tokenizer, out_dir / "export", kind,
                                                export_dtype, from_config=bool(cfg.model.from_config))
                if hasattr(task, "save_extra"):  # optional hook: side modules next to the export (graph encoder)
                    task.save_extra(accelerator, wrapped, out_dir / "export")
            peak_mb = max(dist.all_gather_object(peak_memory_mb(device)))
            if is_main:
                write_history(metrics_path, history)
                if cfg.logging.plot and history:
                    plot_losses(history, out_dir / "loss.png")
                summary = {
                    "steps": step, "final_loss": history[-1]["loss"] if history else None,
                    "eval_loss": eval_loss, **throughput(**run_totals),
                    "this_launch": {"steps": step - first_step, **throughput(**launch),
                                    "resumed_from": str(resume_from) if resume_from else None},
                    "peak_memory_mb": peak_mb,
                    "world_size": world, "sequence_parallel": sp.size,
                    "checkpoint": str(last_ckpt) if last_ckpt else None,
                    "export": str(export_path) if export_path else None, "wall_s": round(time.time() - t_start, 1),
                    "train_samples": len(train_set), "eval_samples": len(eval_set),
                    "data": {"train": train_data.skips_summary(train_data.split_report(train_set)),
                             "eval": train_data.skips_summary(train_data.split_report(eval_set))},
                    "zero_stage": dist.zero_stage(accelerator), "zero3_partitioned": partitioned,
                }
                (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
                print(summary_text(summary), flush=True)
            # Leave together: a rank that tears down while rank 0 still writes the summary has been seen to
            # abort at exit ("terminate called without an active exception") after a stage-3 export.
            dist.barrier()
        if is_main:
            write_status(out_dir, exit_code, {0: "done", REQUEUE_EXIT_CODE: "preempted: saved, requeue to resume",
                                              NAN_STOP_EXIT_CODE: "stopped by the NaN/Inf guard"}[exit_code], step)
        return exit_code
    finally:
        preempt.close()
        dist.teardown(accelerator, destroy=not ends_process)


def throughput(learned_tokens: int, tokens: int, train_time_s: float) -> dict:
    """Token counts, training time and rates (None when no step ran)."""
    return {"learned_tokens": learned_tokens, "tokens": tokens, "train_time_s": round(train_time_s, 3),
            "learned_tokens_per_s": learned_tokens / train_time_s if train_time_s > 0 else None,
            "tokens_per_s": tokens / train_time_s if train_time_s > 0 else None}


def _ratio(total: float, norm: float) -> float:
    """One globally normalised loss term; a term with nothing to normalise this step contributes 0."""
    return total / norm if norm > 0 else 0.0


def main(argv: list[str] | None = None, *, ends_process: bool = False) -> int:
    parser = argparse.ArgumentParser(prog="distthink.train", description=__doc__.split("\n")[0])
    args = add_run_arguments(parser).parse_args(argv)
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        return run(cfg, ends_process=ends_process)
    except DistthinkError as err:
        if cfg is not None and os.environ.get("RANK", "0") == "0":
            write_status(cfg.train.output_dir, 2, str(err))
        report_error(f"error: {err}")  # the last line the user sees, once per launch (engine/exit_status.py)
        return 2


if __name__ == "__main__":
    if not dist.launched_rank():
        sys.exit(main())
    # A rank of a launch keeps its process group until os._exit (distthink/engine/distributed.py says why).
    try:
        exit_code = main(ends_process=True)
    except Exception:  # noqa: BLE001 - reported here, because leave() skips the interpreter's own report
        traceback.print_exc()
        exit_code = 1
    dist.leave(exit_code)
