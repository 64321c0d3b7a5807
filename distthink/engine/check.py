"""`distthink check`: validate a checkpoint or an export (files, tensors, shapes, loads, a generation smoke)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from distthink.engine.checkpoint import COMPLETE, LATEST, STATE_FILE, read_latest
from distthink.engine.export import check_nonempty
from distthink.errors import CheckpointError
from distthink.logging_utils import get_logger

log = get_logger(__name__)

# ----------------------------------------------------------------------------------------------------
# Validation (`distthink check`).
# ----------------------------------------------------------------------------------------------------

ADAPTER_FILE = "adapter_model.safetensors"  # what PeftModel.save_pretrained writes (safe_serialization)
GENERATE_TOKENS = 4  # the generation smoke: a few greedy tokens prove the loaded model runs end to end


@dataclass
class CheckReport:
    """What `distthink check` verified, one (name, what held) line per check, and the problems it found."""

    path: Path
    checks: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def passed(self, name: str, text: str) -> None:
        self.checks.append((name, text))


def check_path(path: str | os.PathLike, generate: bool = True) -> list[str]:
    """Problems found in a training checkpoint or an export directory ([] = healthy)."""
    return run_checks(path, generate).problems


def check_export(p: Path, generate: bool = True) -> list[str]:
    """Problems found in an export directory ([] = healthy)."""
    report = CheckReport(Path(p))
    _check_export(Path(p), generate, report)
    return report.problems


def run_checks(path: str | os.PathLike, generate: bool = True) -> CheckReport:
    """Check a training checkpoint (output_dir, checkpoints/ root or step-* dir) or an export directory.

    Checkpoints: the COMPLETE marker, trainer state, config, RNG states and weights (safetensors: every tensor
    non-empty and finite), then the run's export if there is one. Exports (adapter_config.json or config.json
    + safetensors): files, tensors (count, shapes, dtypes, none empty), a load with plain transformers/peft
    in which every file tensor lands in the model unchanged, all finite; the tokenizer and its chat template;
    a forward pass; and a short greedy generation, timed.
    """
    p = Path(path)
    report = CheckReport(p)
    if not p.exists():
        report.problems.append(f"{p} does not exist. Fix: pass a step-* checkpoint, a checkpoints/ dir or an "
                               "export dir")
        return report
    if (p / "checkpoints" / LATEST).exists():
        p = p / "checkpoints"  # an output_dir
    if (p / LATEST).exists() and not (p / STATE_FILE).exists():  # a checkpoints/ root
        latest = read_latest(p)
        if latest is None:
            report.problems.append(f"{p / LATEST} points at an incomplete checkpoint. Fix: delete the pointer or "
                                   "resume from an older step-* directory")
            return report
        p = latest
    if (p / STATE_FILE).exists() or p.name.startswith(("step-", ".tmp-step-")):
        _check_checkpoint(p, report)
        export = p.parent.parent / "export"
        if not report.problems and export.exists():
            _check_export(export, generate, report)
        return report
    _check_export(p, generate, report)
    return report


def _check_checkpoint(p: Path, report: CheckReport) -> None:
    problems = report.problems
    n0 = len(problems)
    if not (p / COMPLETE).exists():
        problems.append(f"{p}: no {COMPLETE} marker: the save was interrupted. Fix: resume from the "
                        "checkpoint named in checkpoints/latest")
    for name in (STATE_FILE, "config.yaml"):
        if not (p / name).exists():
            problems.append(f"{p}: missing {name}")
    rng = list(p.glob("random_states_*.pkl"))
    if not rng:
        problems.append(f"{p}: no random_states_*.pkl (RNG) files: resume would not be exact")
    safetensors = sorted(p.rglob("*.safetensors"))
    pickled = sorted(p.rglob("pytorch_model*.bin")) + sorted(p.rglob("*model_states.pt"))  # DeepSpeed, torch
    if not safetensors and not pickled:
        problems.append(f"{p}: no model weights found")
    if len(problems) > n0:
        return
    state = json.loads((p / STATE_FILE).read_text())
    missing = [k for k in ("step", "epoch", "micro_index", "scheduler", "run_totals") if k not in state]
    if missing:
        problems.append(f"{p / STATE_FILE}: missing {', '.join(repr(k) for k in missing)}")
        return
    report.passed("checkpoint", f"{p.name}: {COMPLETE} marker, {STATE_FILE} (step {state['step']}, epoch "
                                f"{state['epoch']}), config.yaml, {len(rng)} RNG state file(s)")
    if safetensors:
        summary = _tensor_summary(p, safetensors, report, finite=True)
        if summary:
            report.passed("weights", summary)
    if pickled:  # DeepSpeed/torch pickles: listed, never unpickled by a diagnostic
        report.passed("weights", f"{len(pickled)} pickled file(s) ({_size(pickled)}), e.g. "
                                 f"{pickled[0].relative_to(p)}, present (not opened: pickle)")


def _size(files: list[Path]) -> str:
    n = sum(f.stat().st_size for f in files)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _tensor_summary(root: Path, files: list[Path], report: CheckReport, finite: bool) -> str | None:
    """'N tensors in F file(s), V values, dtypes ..., shapes ..., none empty[, all finite]', or None after
    recording a problem. Reads only the headers unless `finite` (then every tensor, once)."""
    count, values, dtypes, ranks, bad = 0, 0, Counter(), Counter(), []
    largest: tuple[int, ...] = ()
    largest_numel = -1
    for f in files:
        with safe_open(str(f), "pt") as fh:
            keys = list(fh.keys())
            if not keys:
                report.problems.append(f"{f}: holds no tensor")
                return None
            for k in keys:
                sl = fh.get_slice(k)
                shape = tuple(sl.get_shape())
                numel = 1
                for d in shape:
                    numel *= d
                if not shape or numel == 0:
                    report.problems.append(f"{f}: tensor {k} is empty {list(shape)} (ZeRO-3 shards saved without "
                                           "gathering?). Fix: export with stage3_gather_16bit_weights_on_model_save")
                    return None
                count, values = count + 1, values + numel
                dtypes[sl.get_dtype()] += 1
                ranks[len(shape)] += 1
                if numel > largest_numel:
                    largest, largest_numel = shape, numel
                if finite:
                    t = fh.get_tensor(k)
                    if torch.is_floating_point(t) and not torch.isfinite(t).all():
                        bad.append(k)
    if bad:
        report.problems.append(f"{root}: {len(bad)} tensor(s) hold NaN/Inf values, e.g. {bad[0]}")
        return None
    where = files[0].relative_to(root) if len(files) == 1 else f"{len(files)} files"
    return (f"{count} tensors in {where} ({_size(files)}): {values:,} values, dtype "
            + ", ".join(f"{d} x{n}" for d, n in dtypes.most_common())
            + ", shapes " + ", ".join(f"{r}-D x{n}" for r, n in sorted(ranks.items(), reverse=True))
            + f" (largest {list(largest)}), none empty" + (", all finite" if finite else ""))


def _files_line(p: Path) -> str:
    files = sorted(f for f in p.rglob("*") if f.is_file())
    names = [str(f.relative_to(p)) for f in files]
    return f"{', '.join(names)} ({len(files)} files, {_size(files)})"


def _loaded(model, info: dict, what: str, report: CheckReport) -> bool:
    """Every file tensor landed in a parameter of the same shape and no parameter was left unloaded."""
    for key, label in (("missing_keys", "parameters not in the files (left randomly initialised)"),
                       ("unexpected_keys", "file tensors the model has no parameter for"),
                       ("mismatched_keys", "tensors whose shape differs from the model's")):
        keys = sorted(str(k) for k in info.get(key) or ())
        if keys:
            report.problems.append(f"{what}: {len(keys)} {label}, e.g. {keys[0]}")
            return False
    return True


def _check_export(p: Path, generate: bool, report: CheckReport) -> None:
    problems = report.problems
    n0 = len(problems)
    try:
        check_nonempty(p)
    except CheckpointError as err:
        problems.append(str(err))
        return
    is_adapter = (p / "adapter_config.json").exists()
    if not is_adapter and not (p / "config.json").exists():
        problems.append(f"{p}: neither adapter_config.json nor config.json: not a checkpoint or an export. "
                        "Fix: pass an output_dir, a step-* checkpoint or the export dir")
        return
    report.passed("files", f"{p.name}/: {_files_line(p)}")
    summary = _tensor_summary(p, sorted(p.glob("*.safetensors")), report, finite=False)
    if summary is None:
        return
    report.passed("tensors", summary)
    try:
        if is_adapter:
            model = _load_adapter(p, report)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(str(p), output_loading_info=True)
            if _loaded(model, info, str(p), report):
                report.passed("load", f"{type(model).__name__} with plain transformers: every file tensor loaded "
                                      "into a parameter of the same shape, none missing")
        if model is None or len(problems) > n0:
            return
        bad = [n for n, t in model.state_dict().items() if torch.is_floating_point(t) and not torch.isfinite(t).all()]
        if bad:
            problems.append(f"{p}: {len(bad)} tensor(s) of the loaded model hold NaN/Inf values, e.g. {bad[0]}")
            return
        n_params = sum(t.numel() for t in model.parameters())
        report.passed("finite", f"all {len(model.state_dict())} tensors of the loaded model ({n_params:,} "
                                "parameters) are finite")
        tok = _check_tokenizer(p, model, report)
        if tok is None:
            return
        ids = _prompt_ids(tok)
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        dt = time.perf_counter() - t0
        if not torch.isfinite(logits).all():
            problems.append(f"{p}: the forward pass gives NaN/Inf logits")
            return
        report.passed("forward", f"{ids.shape[1]} prompt tokens -> logits {list(logits.shape)}, finite, in "
                                 f"{dt:.2f} s")
        if not generate:
            report.passed("generation", "skipped (--no-generate)")
        else:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=GENERATE_TOKENS, do_sample=False,
                                     pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
                                     else tok.eos_token_id)
            dt = time.perf_counter() - t0
            new = out.shape[1] - ids.shape[1]
            if new <= 0:
                problems.append(f"{p}: sanity generation produced no token")
                return
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False)
            report.passed("generation", f"{new} greedy token(s) in {dt:.2f} s: {text[:60]!r}")
    except Exception as err:  # noqa: BLE001 - report, do not crash: this is a diagnostic command
        problems.append(f"{p}: cannot be loaded by plain transformers/peft: {type(err).__name__}: {err}")


def _load_adapter(p: Path, report: CheckReport):
    """The base model with the adapter, or None after recording a problem. Checks that every adapter tensor of
    the file is in the model unchanged (shape and value) and that the base loaded completely."""
    pcfg = PeftConfig.from_pretrained(str(p))
    base_path = pcfg.base_model_name_or_path
    base_dir = Path(base_path) if base_path else None
    if (p / "base_model" / "config.json").exists():
        base_dir = p / "base_model"  # exported with the adapter (model built from config)
    if base_dir is None or not (base_dir / "config.json").exists():
        report.problems.append(f"{p}: adapter's base model '{base_path}' is not a local directory. Fix: download "
                               "it or check on a machine that has it")
        return None
    base, info = AutoModelForCausalLM.from_pretrained(str(base_dir), output_loading_info=True)
    if not _loaded(base, info, str(base_dir), report):
        return None
    model = PeftModel.from_pretrained(base, str(p))
    got = get_peft_model_state_dict(model)
    # peft's own file; other safetensors next to it belong to the task (projector.safetensors of ThinkRec,
    # graph_prefix.safetensors of the molecule task) and were counted in the tensors line
    with safe_open(str(p / ADAPTER_FILE), "pt") as fh:
        want = {k: fh.get_tensor(k) for k in fh.keys()}
    if set(got) != set(want):
        extra, lost = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        report.problems.append(f"{p}: the adapter file and the loaded model disagree: "
                               + (f"{len(extra)} file tensor(s) not used, e.g. {extra[0]}" if extra else
                                  f"{len(lost)} adapter tensor(s) not in the file, e.g. {lost[0]}"))
        return None
    changed = [k for k, t in want.items() if got[k].shape != t.shape or not torch.equal(got[k].to(t.dtype), t)]
    if changed:
        report.problems.append(f"{p}: {len(changed)} adapter tensor(s) differ once loaded, e.g. {changed[0]}")
        return None
    b = [k for k in want if "lora_B" in k]
    nonzero = sum(1 for k in b if bool(want[k].any()))
    targets = pcfg.target_modules
    targets = ", ".join(sorted(targets)) if isinstance(targets, (set, list, tuple)) else str(targets)
    kind = getattr(pcfg.peft_type, "value", pcfg.peft_type)
    report.passed("base", f"{base_dir.name}/: {type(base).__name__} with plain transformers, every tensor loaded, "
                          "none missing")
    rank, alpha = getattr(pcfg, "r", "?"), getattr(pcfg, "lora_alpha", "?")
    report.passed("adapter", f"{'LoRA' if kind == 'LORA' else kind} r={rank} alpha={alpha} on {targets}: "
                             f"{len(want)} tensors, all non-empty, loaded with plain peft unchanged (shape and "
                             f"value); {nonzero} of {len(b)} lora_B non-zero"
                             + ("" if nonzero or not b else " (all zero: the adapter changes nothing yet)"))
    return model


def _check_tokenizer(p: Path, model, report: CheckReport):
    """The export's tokenizer, or None after recording a problem; notes the chat template."""
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except Exception as err:  # noqa: BLE001 - a diagnostic: say what failed
        report.problems.append(f"{p}: the tokenizer does not load: {type(err).__name__}: {err}. Fix: save the "
                               "tokenizer next to the weights (tokenizer.save_pretrained)")
        return None
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        report.problems.append(f"{p}: the tokenizer has {len(tok)} tokens but the model's embedding only {rows} "
                               "rows. Fix: resize the embeddings to the tokenizer (model.resize_token_embeddings)")
        return None
    report.passed("tokenizer", f"{type(tok).__name__} loads: {len(tok)} tokens (embedding rows {rows}), eos "
                               f"{tok.eos_token!r}")
    template = getattr(tok, "chat_template", None)
    if template:
        try:
            tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                    add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001
            report.problems.append(f"{p}: the chat template does not render a user message: {err}")
            return None
        report.passed("chat template", f"present ({len(template)} characters), renders a user message with "
                                       "the generation prompt")
    else:
        report.passed("chat template", "none (fine for plain-text use; chat data and chat inference need one)")
    return tok


def _prompt_ids(tok) -> torch.Tensor:
    """A short prompt: a user message through the chat template when there is one, else plain text."""
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    return tok("Hello", return_tensors="pt").input_ids
