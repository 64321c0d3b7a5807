"""Mixture of LoRA experts (MoLoRA): K group experts + 1 global adapter per targeted linear, mixed per sample.

**The layer.** A targeted ``nn.Linear`` (weight W, d_out x d_in) becomes `MoLoRALinear`, which holds the frozen
base layer and E = K + 1 adapters in two stacked parameters:

    lora_A  (E*r, d_in)   rows e*r:(e+1)*r are A_e
    lora_B  (d_out, E*r)  columns e*r:(e+1)*r are B_e
    adapter e < K is the expert of user group e; adapter K is the global adapter (stage-1 LoRA).

For a token of sample b with gate w(b) in R^E (sum 1 for the gate rules below, but any weights work):

    y = W x + sum_e w_e(b) * s * B_e A_e dropout(x),      s = alpha / r

computed as two GEMMs, h = dropout(x) A^T  (.., E*r); h_e *= s * w_e(b); y = W x + h B^T. This is exact
output-space mixing (sum_e w_e dW_e), unlike PEFT's ``add_weighted_adapter(combination_type="linear")``,
which mixes A and B separately (B_mix A_mix != sum w B A). There is no per-sample Python loop and no
adapter is created or deleted at run time. Dropout is one mask on the layer input shared by all adapters
(peft applies dropout to the input of each adapter's A).

**Gates.** Each forward reads the current gates from a `GateSlot` shared by all MoLoRA layers of a model:
per-token (B, T, E), or per-row (B, 1, E) broadcast over positions. `set_gates(model, sample_gates,
segment_ids=...)` maps per-*sample* gates to tokens with the batch contract's ``segment_ids`` (packed rows
hold several samples, each with its own gate; padding gets zero gates, i.e. the base output). The gates stay
set until replaced or cleared: with gradient checkpointing the forward is recomputed inside ``backward()``,
so keep them set (or keep the `molora_gates` context open) across forward *and* backward. A forward
without gates raises instead of silently using some default.

**Gate rules.** Generic ones live here: `hard_gate` one-hot routes by group id (stage-3 training), `global_gate`
selects the global adapter. A task's own rule that computes the weights (ThinkRec's entropy gate) lives with
the task (distthink.tasks.thinkrec.gate) and fills the same slot.

**Parameters are registered normally** (no ``.data`` tricks, no global state), so DeepSpeed ZeRO-3 partitions
them like any other trainable parameter when the engine is built after `apply_molora`. Shapes are taken
from ``in_features``/``out_features``, never from the (possibly partitioned) base weight.

Export/reload as standard PEFT adapter folders: `distthink.models.molora_export`.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from distthink._deprecated import moved
from distthink.errors import ConfigError, DistthinkError
from distthink.logging_utils import get_logger
from distthink.models.load import base_causal_lm
from distthink.zero3 import full_numel

log = get_logger(__name__)

# ----------------------------------------------------------------------------------------------------- gates
def hard_gate(group_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """One-hot routing by group (stage-3 training): (S,) ids -> (S, K+1) float32 gates.

    Ids 0..K-1 select that group's expert; -1 or K select the global adapter.
    """
    g = torch.as_tensor(group_ids).long()
    if g.ndim != 1:
        raise DistthinkError(f"hard_gate: group_ids must be 1-D (S,), got shape {tuple(g.shape)}")
    bad = (g < -1) | (g > num_experts)
    if bad.any():
        raise DistthinkError(f"hard_gate: group id {int(g[bad][0])} is outside -1..{num_experts} "
                             f"(K={num_experts} experts; -1 or K = global adapter)")
    g = torch.where(g < 0, torch.full_like(g, num_experts), g)
    return F.one_hot(g, num_experts + 1).to(torch.float32)


def global_gate(num_samples: int, num_experts: int, device=None) -> torch.Tensor:
    """(S, K+1) gates that select the global adapter for every sample."""
    return hard_gate(torch.full((num_samples,), num_experts, dtype=torch.long, device=device), num_experts)


# ----------------------------------------------------------------------------------------------- gate slot
def tokens_from_samples(sample_gates: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Per-sample gates (S, E) -> per-token gates (B, T, E) via the batch's segment_ids (B, T).

    segment_ids is the sample index within the micro-batch (0..S-1), -1 on padding (gate 0 there: base output).
    """
    if sample_gates.ndim != 2:
        raise DistthinkError(f"sample gates must be (S, E), got shape {tuple(sample_gates.shape)}")
    if segment_ids.ndim != 2:
        raise DistthinkError(f"segment_ids must be (B, T), got shape {tuple(segment_ids.shape)}")
    s = sample_gates.shape[0]
    seg = segment_ids.to(sample_gates.device).long()
    top = int(seg.max()) if seg.numel() else -1
    if top >= s:
        raise DistthinkError(f"segment_ids reference sample {top} but only {s} sample gates were given; "
                             "pass one gate row per sample of the micro-batch (batch['num_samples'])")
    valid = seg >= 0
    tok = sample_gates[seg.clamp_min(0)]                              # (B, T, E) gather, no loop
    return tok * valid.unsqueeze(-1).to(tok.dtype)


class GateSlot:
    """The current batch's gates, shared by every MoLoRA layer of one model (a plain object, not a global).

    Holds (B, T, E) per-token or (B, 1, E) per-row gates; `for_input` checks them against the layer input.
    """

    def __init__(self, num_adapters: int):
        self.num_adapters = num_adapters
        self.gates: torch.Tensor | None = None

    def set(self, gates: torch.Tensor) -> None:
        if gates.ndim != 3 or gates.shape[-1] != self.num_adapters:
            raise DistthinkError(f"MoLoRA gates must be (B, T, {self.num_adapters}) or (B, 1, {self.num_adapters}) "
                                 f"(K experts + 1 global), got shape {tuple(gates.shape)}")
        self.gates = gates

    def clear(self) -> None:
        self.gates = None

    def for_input(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gates
        if g is None:
            raise DistthinkError("a MoLoRA layer ran without gates. Fix: call distthink.models.molora.set_gates("
                                 "model, ...) (or use the molora_gates context) before the forward, and keep them "
                                 "set through backward when gradient checkpointing recomputes the forward")
        lead = x.shape[:-1]
        if x.ndim != 3 or g.shape[0] != lead[0] or g.shape[1] not in (1, lead[1]):
            raise DistthinkError(f"MoLoRA gates of shape {tuple(g.shape)} do not fit the layer input "
                                 f"{tuple(x.shape)}: expected (B, T, E) or (B, 1, E) with B, T of the batch. "
                                 "Fix: set the gates of *this* batch before its forward")
        if g.device != x.device:
            g = g.to(x.device)
            self.gates = g  # move once, not once per layer
        return g


# ---------------------------------------------------------------------------------------------------- layer
class MoLoRALinear(nn.Module):
    """A frozen nn.Linear plus K group experts and one global LoRA adapter, mixed per token (see module doc).

    base_layer: the nn.Linear (any dtype; its weight may be ZeRO-3 partitioned).
    lora_A (E*r, d_in), lora_B (d_out, E*r) with E = num_experts + 1; adapter E-1 is the global adapter.
    forward(x (B, T, d_in)) -> (B, T, d_out), reading the gates from `slot`.
    """

    def __init__(self, base_layer: nn.Linear, num_experts: int, r: int, alpha: float, dropout: float,
                 slot: GateSlot, adapter_dtype: torch.dtype | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ConfigError(f"MoLoRA wraps nn.Linear layers, got {type(base_layer).__name__}")
        if num_experts < 1 or r < 1:
            raise ConfigError(f"MoLoRA needs num_experts >= 1 and r >= 1, got {num_experts}, {r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.num_experts, self.num_adapters, self.r = num_experts, num_experts + 1, r
        self.alpha = float(alpha)
        self.scaling = self.alpha / r
        self.dropout_p = float(dropout)
        w = base_layer.weight
        dtype = adapter_dtype or (torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype)
        e_r = self.num_adapters * r
        self.lora_A = nn.Parameter(torch.empty(e_r, self.in_features, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, e_r, dtype=dtype, device=w.device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.slot = slot
        self.reset_adapters(generator)

    @torch.no_grad()
    def reset_adapters(self, generator: torch.Generator | None = None) -> None:
        """PEFT's default init for every adapter: A kaiming-uniform(a=sqrt(5)) per adapter, B = 0.

        Drawn on the CPU from `generator` (default: the global RNG): every rank must build identical
        adapters, because ZeRO-3 partitions each rank's local copy when the engine is built.
        """
        a = torch.empty(self.lora_A.shape, dtype=torch.float32)
        for e in range(self.num_adapters):
            nn.init.kaiming_uniform_(a[e * self.r:(e + 1) * self.r], a=math.sqrt(5), generator=generator)
        self.lora_A.copy_(a)
        self.lora_B.zero_()

    @torch.no_grad()
    def set_adapter_weights(self, index: int, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Copy one adapter: lora_A (r, d_in), lora_B (d_out, r) into slot `index` (K = global)."""
        if not 0 <= index < self.num_adapters:
            raise DistthinkError(f"adapter index {index} outside 0..{self.num_adapters - 1}")
        if tuple(lora_A.shape) != (self.r, self.in_features) or tuple(lora_B.shape) != (self.out_features, self.r):
            raise DistthinkError(f"adapter shapes A {tuple(lora_A.shape)} / B {tuple(lora_B.shape)} do not fit "
                                 f"r={self.r}, d_in={self.in_features}, d_out={self.out_features}")
        sl = slice(index * self.r, (index + 1) * self.r)
        self.lora_A[sl].copy_(lora_A)
        self.lora_B[:, sl].copy_(lora_B)

    def adapter_weights(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (A_e (r, d_in), B_e (d_out, r)) of adapter `index` (K = global)."""
        sl = slice(index * self.r, (index + 1) * self.r)
        return self.lora_A[sl], self.lora_B[:, sl]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        gates = self.slot.for_input(x)                                   # (B, T|1, E)
        a = self.lora_A
        h = F.linear(self.lora_dropout(x.to(a.dtype)), a)               # (B, T, E*r): all adapters, one GEMM
        g = (gates.to(h.dtype) * self.scaling).unsqueeze(-1)             # (B, T|1, E, 1)
        h = (h.unflatten(-1, (self.num_adapters, self.r)) * g).flatten(-2)
        return result + F.linear(h, self.lora_B).to(result.dtype)        # second GEMM sums the adapters

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}+global, r={self.r}, "
                f"alpha={self.alpha:g}, dropout={self.dropout_p:g}")


# ------------------------------------------------------------------------------------------- model-level API
def _is_peft_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer") and isinstance(getattr(module, "lora_A"),
                                                                                       nn.ModuleDict)


def _unwrap_peft(model: nn.Module) -> tuple[nn.Module, object | None]:
    """(the plain transformers model, the PeftModel or None)."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model(), model
    return model, None


def _read_adapter_folder(path: Path) -> tuple[dict, dict]:
    """adapter_config.json (dict) + {module path: (A, B)} from a PEFT LoRA adapter folder."""
    cfg_path, w_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise ConfigError(f"{path}: not a PEFT adapter folder (needs adapter_config.json and "
                          "adapter_model.safetensors). Fix: pass the folder the stage-1 export wrote")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key in ("use_dora", "use_rslora"):
        if cfg.get(key):
            raise ConfigError(f"{cfg_path}: {key}=true is not supported by MoLoRA. Fix: train the stage-1 adapter "
                              "as plain LoRA")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ConfigError(f"{cfg_path}: {key} (per-module ranks/alphas) is not supported by MoLoRA")
    if cfg.get("modules_to_save"):
        raise ConfigError(f"{cfg_path}: modules_to_save {cfg['modules_to_save']} are not supported by MoLoRA")
    tensors = load_file(str(w_path))
    pairs: dict[str, dict] = {}
    for key, t in tensors.items():
        for part in ("lora_A", "lora_B"):
            tag = f".{part}.weight"
            if key.endswith(tag):
                mod = key[: -len(tag)]
                mod = mod.removeprefix("base_model.model.")
                pairs.setdefault(mod, {})[part] = t
                break
        else:
            raise ConfigError(f"{w_path}: unexpected tensor {key!r} (only lora_A/lora_B weights are supported)")
    out = {}
    for mod, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ConfigError(f"{w_path}: module {mod} has only {sorted(ab)}")
        out[mod] = (ab["lora_A"], ab["lora_B"])
    return cfg, out


def apply_molora(model: nn.Module, num_experts: int, r: int | None = None, alpha: float | None = None,
                 dropout: float = 0.0, target_modules: list[str] | None = None,
                 init_from_peft_adapter: str | Path | None = None, *, freeze_base: bool = True,
                 adapter_dtype: torch.dtype | None = None, seed: int = 0) -> nn.Module:
    """Swap the targeted linears of a causal LM for `MoLoRALinear` layers (K experts + global). Returns the plain
    transformers model (a peft wrapper is removed: its LoRA layers become MoLoRA layers).

    model: a transformers causal LM, or a peft `PeftModel` with LoRA layers (e.g. the stage-1 model).
    target_modules: leaf module names (q_proj, v_proj, ...). Default: the modules peft adapted, when the model
        is peft-wrapped; required otherwise.
    init_from_peft_adapter: where every adapter (all K experts and the global one) starts from:
        - None: the peft model's active adapter when `model` is peft-wrapped; else PEFT's fresh init (B = 0);
        - a path to a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors);
        - the name of an adapter loaded in the peft-wrapped `model`.
        r and alpha default to the adapter's; given values that disagree raise ConfigError.
    freeze_base: every parameter but the MoLoRA adapters gets requires_grad=False (enable e.g. a projector
        again afterwards if it must train).
    adapter_dtype: dtype of the adapters (default: the base weight's; float32 for a bf16/fp16 base, as peft).
    seed: the fresh init (no initialising adapter) draws from a private generator with this seed, so every
        rank builds the same adapters whatever its global RNG state.
    Call before building the DeepSpeed engine / optimizer so the new parameters are partitioned and trained.
    """
    inner, peft_model = _unwrap_peft(model)
    peft_layers = {n: m for n, m in inner.named_modules() if _is_peft_lora_layer(m)}
    init_weights: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    init_scaling = None
    src_r = None
    if init_from_peft_adapter is not None and Path(str(init_from_peft_adapter)).is_dir():
        acfg, init_weights = _read_adapter_folder(Path(init_from_peft_adapter))
        src_r, src_alpha = int(acfg["r"]), float(acfg["lora_alpha"])
        init_scaling = src_alpha / src_r
        if target_modules is None:
            target_modules = sorted({m.rsplit(".", 1)[-1] for m in init_weights})
        if peft_layers:
            raise ConfigError("init_from_peft_adapter is a folder but the model already carries peft LoRA layers. "
                              "Fix: pass the plain base model, or init from the loaded adapter by name")
    elif peft_layers:
        name = init_from_peft_adapter
        if name is None:
            active = peft_model.active_adapters if peft_model is not None else ["default"]
            name = active[0] if isinstance(active, (list, tuple)) else active
        init_weights = {}
        for mname, m in peft_layers.items():
            if name not in m.lora_A:
                raise ConfigError(f"peft layer {mname} has no adapter {name!r} (has {sorted(m.lora_A.keys())})")
            if name in getattr(m, "lora_variant", {}):
                raise ConfigError(f"peft adapter {name!r} at {mname} is a LoRA variant (DoRA, ...), not supported")
            if getattr(m, "merged", False):
                raise ConfigError(f"peft layer {mname} has merged adapters. Fix: unmerge before apply_molora")
            init_weights[mname] = (m.lora_A[name].weight.detach(), m.lora_B[name].weight.detach())
            sc = float(m.scaling[name])
            if init_scaling is not None and abs(sc - init_scaling) > 1e-12:
                raise ConfigError(f"peft adapter {name!r} has different scalings per layer; MoLoRA needs one")
            init_scaling = sc
            src_r = m.r[name]
        if target_modules is None:
            target_modules = sorted({n.rsplit(".", 1)[-1] for n in peft_layers})
        log.info("molora: initialising every expert and the global adapter from peft adapter %r", name)
    elif init_from_peft_adapter is not None:
        raise ConfigError(f"init_from_peft_adapter={str(init_from_peft_adapter)!r} is neither an adapter folder nor "
                          "an adapter of a peft-wrapped model. Fix: pass the stage-1 adapter folder")
    if not target_modules:
        raise ConfigError("apply_molora needs target_modules (e.g. ['q_proj', 'v_proj'])")
    if src_r is not None:
        if r is not None and r != src_r:
            raise ConfigError(f"molora r={r} differs from the initialising adapter's r={src_r}")
        r = src_r
        src_alpha = init_scaling * src_r
        if alpha is not None and abs(float(alpha) - src_alpha) > 1e-9:
            raise ConfigError(f"molora alpha={alpha} differs from the initialising adapter's lora_alpha={src_alpha:g}")
        alpha = src_alpha
    if r is None:
        raise ConfigError("apply_molora needs r (LoRA rank) when no adapter initialises it")
    alpha = float(2 * r if alpha is None else alpha)

    targets = set(target_modules)
    out_emb = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    slot = GateSlot(num_experts + 1)
    generator = torch.Generator().manual_seed(seed)
    swapped = []
    for name, module in list(inner.named_modules()):
        if name.rsplit(".", 1)[-1] not in targets or isinstance(module, MoLoRALinear):
            continue
        if _is_peft_lora_layer(module):
            base = module.get_base_layer()
        elif isinstance(module, nn.Linear):
            base = module
        else:
            continue  # e.g. the base_layer inside a peft layer: handled through its parent
        if out_emb is not None and base is out_emb:
            raise ConfigError(f"target_modules includes the output head {name}: the fused loss reads its weight "
                              "directly and would ignore the adapters. Fix: adapt decoder projections only")
        layer = MoLoRALinear(base, num_experts, r, alpha, dropout, slot, adapter_dtype, generator)
        if init_weights is not None:
            if name not in init_weights:
                raise ConfigError(f"the initialising adapter has no weights for targeted module {name}. Fix: target "
                                  f"the adapter's modules ({sorted({m.rsplit('.', 1)[-1] for m in init_weights})})")
            a, b = init_weights[name]
            for e in range(layer.num_adapters):
                layer.set_adapter_weights(e, a, b)
        parent_name, _, child = name.rpartition(".")
        parent = inner.get_submodule(parent_name) if parent_name else inner
        setattr(parent, child, layer)
        swapped.append(name)
    if not swapped:
        raise ConfigError(f"target_modules {sorted(targets)} match no nn.Linear of {type(inner).__name__}. Fix: use "
                          "names such as q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")
    left = [n for n, m in inner.named_modules() if _is_peft_lora_layer(m)]
    if left:
        raise ConfigError(f"peft LoRA layers {left[:3]}... are not targeted and would keep adding the stage-1 "
                          "adapter. Fix: include their names in target_modules")
    if init_weights is not None:
        unused = sorted(set(init_weights) - set(swapped))
        if unused:
            raise ConfigError(f"the initialising adapter has weights for {unused[:3]}... that are not targeted. Fix: "
                              "target every module the adapter adapts")
    if freeze_base:
        # (peft's enable_input_require_grads hook, needed by gradient checkpointing with frozen embeddings,
        # lives on the embedding module, which the returned model keeps.)
        adapters = {id(p) for m in inner.modules() if isinstance(m, MoLoRALinear) for p in (m.lora_A, m.lora_B)}
        for p in inner.parameters():
            p.requires_grad_(id(p) in adapters)
    n_train = sum(full_numel(p) for p in inner.parameters() if p.requires_grad)
    log.info("molora: %d layers (%s), %d experts + global, r=%d, alpha=%g, %s trainable parameters", len(swapped),
             ",".join(sorted(targets)), num_experts, r, alpha, f"{n_train:,}")
    return inner


def molora_layers(model: nn.Module) -> dict[str, MoLoRALinear]:
    """{module path: layer} of every MoLoRA layer (paths relative to the plain transformers model)."""
    inner = base_causal_lm(model)  # through DeepSpeed / DDP wrappers
    return {n: m for n, m in inner.named_modules() if isinstance(m, MoLoRALinear)}


def gate_slot(model: nn.Module) -> GateSlot:
    """The GateSlot shared by the model's MoLoRA layers."""
    for m in model.modules():
        if isinstance(m, MoLoRALinear):
            return m.slot
    raise DistthinkError(f"{type(model).__name__} has no MoLoRA layers. Fix: call apply_molora first")


def set_gates(model: nn.Module, sample_gates: torch.Tensor | None = None, *, segment_ids: torch.Tensor | None = None,
              token_gates: torch.Tensor | None = None) -> None:
    """Give the next forward (and its backward recomputation) its gates. Exactly one of:

    - sample_gates (S, E) + segment_ids (B, T): per-sample gates of a packed micro-batch (the batch contract);
    - sample_gates (B, E) without segment_ids: one sample per row (padded batches, generation with a KV cache);
    - token_gates (B, T, E): per-token gates given directly.
    E = K + 1 (column K = global adapter). The gates stay set until replaced or `clear_gates`.
    """
    slot = gate_slot(model)
    if token_gates is not None:
        if sample_gates is not None or segment_ids is not None:
            raise DistthinkError("set_gates: pass token_gates alone, or sample_gates (+ segment_ids)")
        slot.set(token_gates)
    elif sample_gates is None:
        raise DistthinkError("set_gates: pass sample_gates (S, E) with segment_ids, or token_gates (B, T, E)")
    elif segment_ids is not None:
        slot.set(tokens_from_samples(sample_gates, segment_ids))
    else:
        if sample_gates.ndim != 2:
            raise DistthinkError(f"set_gates: per-row gates must be (B, E), got {tuple(sample_gates.shape)}")
        slot.set(sample_gates[:, None, :])


def clear_gates(model: nn.Module) -> None:
    gate_slot(model).clear()


@contextlib.contextmanager
def molora_gates(model: nn.Module, sample_gates: torch.Tensor | None = None, *,
                 segment_ids: torch.Tensor | None = None, token_gates: torch.Tensor | None = None):
    """`set_gates` for the body of a with-block (forward and backward), then `clear_gates`."""
    set_gates(model, sample_gates, segment_ids=segment_ids, token_gates=token_gates)
    try:
        yield
    finally:
        clear_gates(model)


# The ThinkRec gate rule lived here before the layering redesign.
__getattr__ = moved(__name__, {name: f"distthink.tasks.thinkrec.gate:{name}" for name in (
    "EntropyGate", "GateConfig", "GateDecision", "entropy_gate", "branch_counts", "BRANCH_EXPERT", "BRANCH_GLOBAL",
    "BRANCH_FUSE", "BRANCH_NAMES")})
