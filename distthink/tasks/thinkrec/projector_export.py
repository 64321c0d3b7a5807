"""The ThinkRec projector as part of a stage's export: ``export/projector.safetensors`` + ``export/projector.json``.

Stage 2 trains the projector (CF vectors -> embedding rows); `save_projector_export` writes it at the end of the
run (collective under ZeRO-3), and a later stage or `rec eval` reloads it by path with `load_projector_export`,
which checks the shape and the CF space it was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from distthink.errors import CheckpointError, ConfigError
from distthink.logging_utils import get_logger
from distthink.tasks.thinkrec.cf_source import INLINE, open_cf_source
from distthink.zero3 import gathered, is_partitioned

if TYPE_CHECKING:
    from distthink.tasks.thinkrec.options import ThinkRecOptions

log = get_logger(__name__)

PROJECTOR_FILE = "projector.safetensors"
PROJECTOR_META = "projector.json"
PROJECTOR_FORMAT = "distthink.thinkrec.projector/1"


# Exports written before the activation was recorded used GELU (the projector had no other).
LEGACY_ACTIVATION = "gelu"


def projector_shape(projector) -> dict:
    """{d_in, hidden_size, mult, k, activation} of a Projector (attributes only: valid on ZeRO-3 partitioned
    modules too). ``mult`` is task.options.mid_mult."""
    return {"d_in": int(projector.d_in), "hidden_size": int(projector.hidden_size),
            "mult": int(projector.net[0].out_features // projector.d_in), "k": int(projector.k),
            "activation": str(projector.activation)}


def check_projector_export(folder: str, option: str = "task.options.init_projector") -> dict:
    """The meta of a projector export folder, or a ConfigError naming `option` and the fix."""
    d = Path(folder)
    fix = ("Fix: pass the train.output_dir/export folder of a prompt_mode=ids stage (stage 2) run with "
           "checkpoint.export=adapter (it writes projector.safetensors + projector.json)")
    if not d.is_dir():
        raise ConfigError(f"{option}={folder!r} is not a folder. {fix}")
    missing = [n for n in (PROJECTOR_FILE, PROJECTOR_META) if not (d / n).is_file()]
    if missing:
        raise ConfigError(f"{option}={folder!r} has no {' / '.join(missing)}. {fix}")
    try:
        meta = json.loads((d / PROJECTOR_META).read_text())
    except ValueError as err:
        raise ConfigError(f"{option}: {d / PROJECTOR_META} is not valid JSON ({err}). {fix}") from None
    if meta.get("format") != PROJECTOR_FORMAT:
        raise ConfigError(f"{option}: {d / PROJECTOR_META} has format {meta.get('format')!r}, expected "
                          f"{PROJECTOR_FORMAT!r}. {fix}")
    return meta


def save_projector_export(projector, export_dir, opt: ThinkRecOptions, *, is_main: bool = True) -> None:
    """Collective under ZeRO-3 (every rank calls; the partitioned parameters are gathered, rank 0 writes).

    export_dir/projector.safetensors: the projector's state dict in fp32 (keys ``net.0.weight`` ...);
    export_dir/projector.json: format, shape ({d_in, hidden_size, mult (= mid_mult), k, activation}), the cf_export
    it was trained with and its fingerprint (CFSource.fingerprint; None for inline vectors), so a later stage can
    check it gets the same CF space.
    """
    was_partitioned = is_partitioned(projector)
    with gathered(projector.parameters()):
        if not is_main:
            return
        sd = {k: v.detach().float().cpu().contiguous().clone() for k, v in projector.state_dict().items()}
    shape = projector_shape(projector)
    want = _projector_tensor_shapes(shape)
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if got != want:  # e.g. ZeRO-3 shards saved without gathering
        raise CheckpointError(f"projector export: tensor shapes {got} differ from {want} (ungathered shards?)")
    out = Path(export_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / PROJECTOR_FILE), metadata={"format": PROJECTOR_FORMAT})
    cf_path, fp = opt.cf_export, None
    if cf_path:
        fp = open_cf_source(cf_path).fingerprint()  # None for inline vectors (they live in the rows)
    if cf_path and cf_path != INLINE:
        cf_path = str(Path(cf_path).resolve())
    meta = {"format": PROJECTOR_FORMAT, **shape, "cf_export": cf_path,
            "cf_fingerprint": fp, "trained": bool(opt.train_projector),
            "init_projector": opt.init_projector}
    (out / PROJECTOR_META).write_text(json.dumps(meta, indent=1) + "\n")
    log.info("exported the projector %s to %s%s", shape, out / PROJECTOR_FILE,
             " (gathered from its ZeRO-3 partitions)" if was_partitioned else "")


def _projector_tensor_shapes(shape: dict) -> dict:
    d, m, h, k = (shape[key] for key in ("d_in", "mult", "hidden_size", "k"))
    return {"net.0.weight": (m * d, d), "net.0.bias": (m * d,), "net.2.weight": (h * k, m * d), "net.2.bias": (h * k,)}


def load_projector_export(projector, folder: str, opt: ThinkRecOptions | None = None, *, cf=None,
                          option: str = "task.options.init_projector") -> dict:
    """Load export/projector.safetensors into `projector` (a plain, not yet partitioned module) after checking
    its shape against projector.json; ConfigError naming `option` and the fix on any mismatch.

    With `cf` (the CF export in use): a different CF space than the one the projector was trained on is an
    error when the projector stays frozen (it would map foreign vectors), a warning when it is trained further.
    Returns the export's meta."""
    meta = check_projector_export(folder, option)
    have = projector_shape(projector)
    saved = {k: meta.get(k, LEGACY_ACTIVATION if k == "activation" else None) for k in have}
    if saved != have:
        diff = ", ".join(f"{k}: export {saved[k]} vs this config {have[k]}" for k in have if saved[k] != have[k])
        raise ConfigError(f"{option}={folder!r}: the exported projector does not fit this stage ({diff}). Fix: use "
                          f"the stage-2 settings (task.options.mid_mult={saved['mult']}, activation="
                          f"{saved['activation']}, proj_token_num={saved['k']}), the same base model (hidden "
                          f"{saved['hidden_size']}) and a CF export of dim {saved['d_in']} (the stage-2 one: "
                          f"{meta.get('cf_export')})")
    sd = load_file(str(Path(folder) / PROJECTOR_FILE))
    want = _projector_tensor_shapes(have)
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if got != want:
        raise ConfigError(f"{option}={folder!r}: {PROJECTOR_FILE} holds {got}, projector.json says {want}. Fix: "
                          "re-export the stage (the file was modified or truncated)")
    fp = cf.fingerprint() if cf is not None else None
    if fp and meta.get("cf_fingerprint") and meta["cf_fingerprint"] != fp:
        msg = (f"{option}={folder!r} was trained on the CF export {meta.get('cf_export')}, whose vectors differ from "
               f"task.options.cf_export={cf.spec}")
        if opt is None or not opt.train_projector:  # None: scoring, nothing can adapt it
            raise ConfigError(msg + ". Fix: set task.options.cf_export to the CF export of stage 2, or train the "
                              "projector again (train_projector: true)")
        log.warning("%s: the projector is trained further from there", msg)
    with torch.no_grad():
        projector.load_state_dict(sd)
    log.info("loaded the projector from %s (%s)", folder, have)
    return meta

