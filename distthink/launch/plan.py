"""Will this run fit, and how fast will it go? An analytical planner that reads a model *config* only.

Every figure is per GPU and in bytes; docs/scaling.md derives each term and states the assumptions.
Memory (`memory_terms`) is modelled as persistent states + max(start of backward, optimizer step):

- persistent: params (ZeRO-3: the 1/N partition plus the gathered working set), the fp32 master copy,
  Adam m and v, the ZeRO gradient partition, DeepSpeed/DDP communication buckets, each as DeepSpeed
  0.19 (stage_1_and_2.py, stage3.py, partition_parameters.py) really allocates them, in bf16 or fp32;
- start of backward: activations of the packed micro-batch (counted from what transformers' layers save,
  full or LoRA, with or without per-layer checkpointing), LoRA branch activations, the loss (plain logits
  vs the fused loss's chunk workspace and the lm_head gradient it computes in forward), and ZeRO-3's
  all-gather buffer;
- optimizer step: full gradients (no ZeRO) and AdamW's temporaries;
- on GPU only: the CUDA context and a fragmentation margin.

The CPU/fp32 case is validated against measured peaks of real runs (benchmarks/plan_validation.py,
tests/launch/test_plan_validation.py); the GPU-only terms are not validated (no GPU in this project's CI).

Time: FLOPs per token (6 per weight for full fine-tuning, 4 for LoRA, +2 with recomputation, plus causal
attention), divided by the GPU's dense bf16 peak times an assumed utilisation (HFU); ZeRO collectives
over the slowest link a GPU uses, partly hidden behind compute; offload over PCIe.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import get_session
from transformers import AutoConfig

from distthink.errors import ConfigError
from distthink.launch import model_configs
from distthink.launch.hardware import CANDIDATES, DESCRIPTIONS, GiB, GpuSpec
from distthink.logging_utils import get_logger
from distthink.models.load import build_model_config, load_tokenizer

log = get_logger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a decoder-only transformer that memory and FLOPs depend on."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False

    @classmethod
    def from_hf_config(cls, cfg: Any) -> "ModelShape":
        """Accepts a transformers PretrainedConfig or its dict."""
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        if get("num_experts") or get("num_local_experts") or get("n_routed_experts"):
            raise ConfigError("distthink plan models dense decoders only; this config is a mixture-of-experts model. "
                              "Fix: plan with a dense model of the same width, and add the expert weights by hand")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if get(k) is None]
        if missing:
            raise ConfigError(f"model config lacks {missing}: distthink plan needs a decoder-only causal LM config "
                              "(Llama, Qwen2/3, Mistral, ...). Fix: point model.name_or_path at such a config.json")
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        model_type = str(get("model_type", ""))
        return cls(
            vocab_size=int(get("vocab_size")),
            hidden_size=hidden,
            num_layers=int(get("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            intermediate_size=int(get("intermediate_size")),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            # Qwen2 has q/k/v biases without saying so in the config.
            attention_bias=bool(get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type.startswith("qwen3"),
        )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection in one decoder layer, by the names peft targets."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def params_per_layer(self) -> int:
        n = sum(a * b for a, b in self.linear_shapes().values())
        if self.attention_bias:
            n += self.q_dim + 2 * self.kv_dim
        n += 2 * self.hidden_size  # the two RMSNorms
        if self.qk_norm:
            n += 2 * self.head_dim
        return n

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        lm_head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.embedding_params + lm_head + self.num_layers * self.params_per_layer + self.hidden_size

    def lora_params(self, rank: int, targets: list[str]) -> int:
        shapes = self.linear_shapes()
        unknown = [t for t in targets if t not in shapes]
        if unknown:
            raise ConfigError(f"lora.target_modules has {unknown}, which this planner does not know. "
                              f"Fix: use some of {sorted(shapes)}")
        return self.num_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)

    def activation_bytes_per_token_layer(self, dtype_bytes: int, attention: str = "flash", row_tokens: int = 0,
                                         lora_targets: list[str] | None = None, lora_dropout: float = 0.0,
                                         autocast: bool = False, adapters_fp32: bool = True) -> float:
        """Bytes one decoder layer keeps for backward, per token, with no checkpointing.

        Counted with `torch.autograd.graph.saved_tensors_hooks` on transformers' Llama/Qwen3 layers
        (tests/launch/test_plan_activations.py re-counts it on real models, full and LoRA, fp32 and bf16, so a
        transformers change that saves more fails a test). b = dtype size; `lora_targets` None = full
        fine-tuning (every weight trains), else the LoRA target modules (base weights frozen):
        - each RMSNorm keeps its input upcast to fp32 (4 B; the input itself when b = 4) and an fp32
          rsqrt per row; when its weight trains it also keeps the normed output (b);
        - the attention input (q/k/v) and the MLP input (gate/up) are kept when one of those projections
          trains (b H each), and silu(gate)*up when down_proj does (b I). Frozen projections keep nothing;
          under LoRA these inputs are shared with the adapters only in fp32 without dropout (otherwise
          each adapter keeps its own copy: `lora_bytes_per_token_layer`);
        - SwiGLU keeps gate, up and silu(gate) (3 b I);
        - attention, sdpa (CPU, and GPU without flash-attn): q, k and v repeated to all heads (GQA), the
          output: 4 b q, an fp32 log-sum-exp per head, and the packed block-diagonal mask converted per
          layer: b T per token. flash (varlen, GPU): q, k, v at their own width and the output:
          b (2 q + 2 kv) + 4 heads (derived, not validated: no GPU in this project's CI);
        - Qwen3's q/k norms: like the layer norms, over q + kv, with an rsqrt per head.
        The LoRA branches themselves are `lora_bytes_per_token_layer`.
        autocast=True: fp32 weights under torch.autocast(b = 2), what distthink runs for 16-bit full
        fine-tuning without DeepSpeed: the residual stream stays fp32, so the norms keep fp32 inputs and
        fp32 outputs (2 x 8 H), and q, k, v, gate and up each keep their own 16-bit cast of their input
        (5 b H instead of 2 b H). The 16-bit weight copies autocast keeps are counted by the caller.
        """
        h, q, kv, i, b = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size, dtype_bytes
        full = lora_targets is None
        shared = full or (lora_dropout == 0 and (b == 4 or not adapters_fp32))
        trains = (lambda name: full or (shared and name in lora_targets))
        norm_elem = 4 + (b if full else 0)
        if autocast:
            n = 2 * 8 * h + 8 + 5 * b * h
        else:
            n = 2 * norm_elem * h + 8
            if trains("q_proj") or trains("k_proj") or trains("v_proj"):
                n += b * h
            if trains("gate_proj") or trains("up_proj"):
                n += b * h
        n += 3 * b * i + (b * i if trains("down_proj") else 0)
        if attention == "flash":
            n += b * (2 * q + 2 * kv) + 4 * self.num_heads
        else:
            n += 4 * b * q + 4 * self.num_heads + b * row_tokens
        if self.qk_norm:
            n += norm_elem * (q + kv) + 4 * (self.num_heads + self.num_kv_heads)
        return n

    def mlp_bytes_per_token(self, dtype_bytes: int, lora_targets: list[str] | None = None, lora_dropout: float = 0.0,
                            adapters_fp32: bool = True) -> float:
        """The MLP's share of activation_bytes_per_token_layer (its input for gate/up, SwiGLU's gate, up and
        silu(gate), silu(gate)*up for down_proj): what a tiled MLP keeps for one tile only."""
        b, h, i = dtype_bytes, self.hidden_size, self.intermediate_size
        full = lora_targets is None
        shared = full or (lora_dropout == 0 and (b == 4 or not adapters_fp32))
        trains = (lambda name: full or (shared and name in lora_targets))
        n = 3 * b * i + (b * i if trains("down_proj") else 0)
        if trains("gate_proj") or trains("up_proj"):
            n += b * h
        return n

    def lora_bytes_per_token_layer(self, dtype_bytes: int, rank: int, targets: list[str], dropout: float,
                                   adapters_fp32: bool = True, molora_adapters: int = 0) -> float:
        """What the LoRA branches keep, per token and layer. peft keeps adapter weights in fp32 (its default
        autocast_adapter_dtype) and casts each branch's input to fp32: with b != 4 every target keeps its
        own fp32 input copy (4 B per input element); with dropout > 0 each target keeps its dropped fp32
        input and the fp32 dropout mask (8 B per input element); in fp32 without dropout the input is the
        base layer's (counted there). lora_A's output (r, fp32) is kept for lora_B. adapters_fp32=False
        (DeepSpeed's bf16 engine casts the whole module, adapters included): no cast, dropout output and
        mask in b, lora_A's output in b.
        molora_adapters=E (distthink.models.molora.MoLoRALinear): one input cast/dropout per target shared by
        the E adapters, and the (E r) lora_A output kept twice (before and after the gate multiply).
        Counted from the layer's code, not measured."""
        shapes = self.linear_shapes()
        b = dtype_bytes
        ab = 4 if adapters_fp32 else b  # the adapters' dtype (= the branch's compute dtype)
        total = 0.0
        for t in targets:
            fan_in = shapes[t][0]
            if dropout > 0:
                total += 2 * ab * fan_in
            elif ab != b:
                total += 4 * fan_in
            total += ab * rank * (2 * molora_adapters if molora_adapters else 1)
        return total


@dataclass
class RunShape:
    """What the training config says about one optimizer step on one GPU."""

    tokens_per_micro_batch: int  # the packed token budget of one micro-batch (one row) on one GPU
    seq_len: int  # typical sample length, for the attention FLOPs (causal: mean context = seq_len / 2)
    grad_accum: int = 1
    lora_rank: int | None = 8  # None = full fine-tuning
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_dropout: float = 0.0
    molora_adapters: int = 0  # MoLoRA: E = K group experts + 1 global adapter per target (0 = plain LoRA)
    gradient_checkpointing: bool = True
    fused_loss: bool = True
    fused_chunk_tokens: int = 1024  # loss.chunk_size
    learned_fraction: float = 1.0  # learned tokens / tokens: the fused loss only multiplies learned rows
    dtype_bytes: int = 2  # bf16 on GPU; 4 = fp32 (CPU runs)
    attention: str = "flash"  # "flash" (varlen, GPU) or "sdpa" (explicit block-diagonal mask)
    device: str = "cuda"  # "cpu": no CUDA context, no allocator fragmentation
    reduce_bucket_elems: float = 5e7  # what distthink.engine.distributed fills for reduce_bucket_size "auto"
    prefetch_bucket_elems: float = 5e7  # stage3_prefetch_bucket_size
    zero2_overlap_comm: bool = True  # ds_configs/zero2.json: two reduce buckets
    sequence_parallel: int = 1  # Ulysses SP degree N: the row is split over N GPUs (distributed.sequence_parallel)
    tiled_mlp: int = 0  # model.tiled_mlp: MLP activations one sequence tile at a time (0 = off)

    @property
    def full(self) -> bool:
        return self.lora_rank is None

    @property
    def local_tokens(self) -> int:
        """Tokens of the row one GPU holds: the row padded to a multiple of N, split in N shards."""
        return -(-self.tokens_per_micro_batch // self.sequence_parallel)


CUDA_CONTEXT_BYTES = 0.75 * GiB  # CUDA/NCCL context outside the torch allocator
FRAGMENTATION = 0.10  # caching-allocator margin on top of the peak of live tensors


@dataclass
class Estimate:
    candidate: str
    memory: dict[str, float]  # bytes per GPU, by term (see estimate())
    allocated_bytes: float  # peak of live tensor bytes (what torch.cuda.max_memory_allocated reports)
    total_bytes: float  # + CUDA context + fragmentation margin: compare with the GPU's memory
    capacity_bytes: float
    fits: bool
    step_seconds: float
    compute_seconds: float
    comm_seconds: float
    offload_seconds: float
    comm_bytes: float
    tokens_per_s: float  # whole job
    mfu: float  # model FLOPs (no recomputation) / peak, the figure public reports quote
    eta_seconds: float | None
    sequence_parallel: int = 1
    dp_size: int = 1  # GPUs that see different rows: N_gpus / sequence_parallel
    sp_comm_bytes: float = 0.0  # Ulysses all-to-alls per GPU per step (also in comm_bytes)
    sp_comm_seconds: float = 0.0  # on the critical path: not hidden behind compute

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def memory_terms(model: ModelShape, run: RunShape, *, n: int, candidate: str) -> dict[str, float]:
    """Bytes per GPU by term. The peak is modelled in two phases that do not overlap in time:

    peak = persistent states + max(start of backward, optimizer step)

    - persistent: params (+ ZeRO-3 gathered working set), fp32 master, Adam m and v, the ZeRO gradient
      partition, DeepSpeed/DDP communication buckets;
    - start of backward: saved activations, the loss buffers (fused: chunk workspace, grad of the hidden
      states, the lm_head gradient it computes in forward), LoRA branch activations;
    - optimizer step: the full gradients (no ZeRO) or the flattened gradient partition (ZeRO), and
      Adam's sqrt(v) temporary (torch's foreach AdamW allocates one state-sized buffer).
    """
    b = run.dtype_bytes
    mixed = b != 4
    p = model.num_params
    # distthink.engine.distributed.uses_autocast: 16-bit full fine-tuning without DeepSpeed keeps fp32 weights
    # (they are the optimizer's master copy) and runs the forward under torch.autocast.
    autocast = candidate == "ddp" and run.full and mixed
    wb = 4 if autocast else b  # bytes of a stored parameter, gradient and AdamW state element
    # Trainable elements without DeepSpeed: fp32 under autocast, and fp32 LoRA adapters (peft upcasts them;
    # DeepSpeed's bf16 engine casts the whole module to bf16, adapters included).
    tb = 4 if (candidate == "ddp" and (autocast or not run.full)) else b
    lora = 0 if run.full else model.lora_params(run.lora_rank, run.lora_targets) * max(1, run.molora_adapters)
    trainable = p if run.full else lora
    zero3 = candidate.startswith("zero3")
    m: dict[str, float] = {}

    # --- persistent states ---------------------------------------------------------------------
    # ZeRO-3 working set: parameters gathered whole while in use: the current layer plus what the
    # prefetcher gathers ahead (up to stage3_prefetch_bucket_size elements); with the fused loss the
    # lm_head is an external parameter of the loss module, whole for the model's forward.
    gathered = model.params_per_layer + min(run.prefetch_bucket_elems, (model.num_layers - 1) * model.params_per_layer)
    if run.fused_loss:
        gathered += model.embedding_params
    gathered = min(gathered, p)
    if candidate == "ddp":
        m["params"] = p * wb + lora * tb
    elif candidate == "zero2":
        m["params"] = (p + lora) * b
    elif candidate == "zero3_offload_params":
        m["params"] = gathered * b
    else:
        m["params"] = (p + lora) * b / n + gathered * b
    offload_opt = candidate.startswith("zero3_offload")
    if candidate == "ddp":
        master = 0.0  # torch AdamW updates the params in their own dtype (fp32 under autocast)
        optim = 2 * trainable * tb
    elif offload_opt:
        master = optim = 0.0
    else:
        # stage_1_and_2.py clones the partition into an fp32 master copy even in fp32; stage3.py shares it
        # when the params are already fp32 on the same device.
        master = trainable * 4 / n if (mixed or candidate == "zero2") else 0.0
        optim = 8 * trainable / n
    m["master_weights"] = master
    m["optimizer"] = optim
    # ZeRO keeps this rank's reduced gradient partition (grad_accum_dtype = param dtype by default).
    # ZeRO-3 allocates it at start-up (stage3.py grad_partitions_flat_buffer). ZeRO-2 allocates it when
    # the first gradient of this rank's partition is reduced, i.e. during backward after most activations
    # are freed (measured on CPU: absent at the peak), so it is counted with the optimizer-step phase.
    part = 0.0 if (candidate == "ddp" or offload_opt) else trainable * b / n
    m["grad_partition"] = part if zero3 else 0.0
    m["grad_partition_zero2"] = part if candidate == "zero2" else 0.0
    if candidate == "ddp":
        m["buckets"] = trainable * tb if n > 1 else 0.0  # DDP reducer buckets (gradient_as_bucket_view off)
    elif candidate == "zero2":
        # Allocated at the first gradient hook of each backward (stage_1_and_2.py setup_buckets), i.e. after
        # the forward's transient loss workspace is gone: counted in the backward and step phases.
        m["buckets"] = 0.0
    else:
        m["buckets"] = run.reduce_bucket_elems * b

    # --- start of backward ---------------------------------------------------------------------
    # Sequence parallelism: every per-token term counts this GPU's shard of the row (Ulysses attention holds
    # the whole row for heads / N: the same bytes as the shard with all heads), except sdpa's packed mask,
    # which covers the whole row (T x T) on every GPU: b T N per local token.
    t = run.local_tokens
    targets = None if run.full else list(run.lora_targets)
    adapters_fp32 = candidate == "ddp"  # peft's fp32 adapters; DeepSpeed's bf16 engine casts them to bf16
    row = t * run.sequence_parallel
    per_layer = model.activation_bytes_per_token_layer(b, run.attention, row * run.sequence_parallel, targets,
                                                       run.lora_dropout, autocast, adapters_fp32)
    final = t * model.hidden_size * (4 + b)  # final norm (fp32 copy + output), the hidden states
    # Tiled MLP (sequence_tiled_compute): a layer keeps only the MLP's input for backward; the MLP's own
    # activations exist for one tile at a time (the recomputation in backward).
    mlp_tile = 0.0
    if run.tiled_mlp > 1:
        mlp = model.mlp_bytes_per_token(b, targets, run.lora_dropout, adapters_fp32)
        per_layer -= mlp - b * model.hidden_size
        mlp_tile = mlp * -(-t // run.tiled_mlp)
    m["activations_no_ckpt"] = t * model.num_layers * per_layer + final + mlp_tile
    # Checkpointing: each layer keeps only its input; one layer is recomputed whole during backward.
    m["activations_ckpt"] = t * (model.num_layers * model.hidden_size * b + per_layer) + final + mlp_tile
    m["activations"] = m["activations_ckpt"] if run.gradient_checkpointing else m["activations_no_ckpt"]
    lora_act = 0.0
    if not run.full:
        lora_act = t * model.lora_bytes_per_token_layer(b, run.lora_rank, targets, run.lora_dropout, adapters_fp32,
                                                        run.molora_adapters)
        lora_act *= 1 if run.gradient_checkpointing else model.num_layers
    m["lora_activations"] = lora_act
    # Autocast keeps a 16-bit copy of every weight a matmul reads (saved for backward), and the fused loss
    # casts the lm_head to the hidden states' dtype.
    matmul = model.num_layers * sum(a * c for a, c in model.linear_shapes().values())
    m["autocast_weights"] = b * (matmul + (model.embedding_params if run.fused_loss else 0)) if autocast else 0.0
    # ZeRO-3 coalesced all-gather (partition_parameters.py): a flat buffer receives a prefetch bucket of
    # parameters, then each parameter is copied out of it (torch.cat): the bucket briefly exists twice.
    m["gather_buffer"] = (min(run.prefetch_bucket_elems, model.num_layers * model.params_per_layer) * b
                          if zero3 else 0.0)
    v, h = model.vocab_size, model.hidden_size
    # Plain loss: logits (b), their fp32 copy and the fp32 log-softmax kept for backward, then its grad.
    m["buckets_zero2"] = (run.reduce_bucket_elems * b * (2 if run.zero2_overlap_comm else 1)
                          if candidate == "zero2" else 0.0)
    m["loss_plain"] = t * v * (8 + (b if mixed else 0))
    # Fused loss (distthink/ops/flce.py): the (chunk, V) workspace (logits in b, + an fp32 copy when
    # b != 4), grad of the hidden states (t, H) in b, and, when the lm_head trains, its (V, H) gradient
    # computed in forward in fp32 (+ its copy in b, held until backward).
    rows = max(1, min(run.fused_chunk_tokens, int(t * run.learned_fraction)))
    workspace = rows * v * (b + (4 if mixed else 0)) + rows * h * 8
    grad_hidden = t * h * b
    # The lm_head gradient (full fine-tuning): fp32 during the forward; the workspace is freed before it is
    # cast to b (when b != 4), and the cast is what is held until backward.
    head32 = v * h * 4 if run.full else 0.0
    head_kept = (v * h * b if mixed else head32) if run.full else 0.0
    m["loss_fused"] = grad_hidden + head32 + max(workspace, head_kept if mixed else 0.0)
    m["loss_fused_kept"] = grad_hidden + head_kept  # what survives into backward
    m["loss"] = m["loss_fused"] if run.fused_loss else m["loss_plain"]

    # --- optimizer step ------------------------------------------------------------------------
    # torch AdamW: on CUDA the foreach path allocates sqrt(v) for all its tensors at once (1 x states);
    # on CPU the per-tensor path allocates sqrt(v) and sqrt(v)/bias_correction for one tensor at a time
    # (2 x the largest tensor). Under ZeRO the optimizer sees one flat partition tensor.
    if candidate == "ddp":
        grads = trainable * tb
        if run.device == "cpu":
            shapes = model.linear_shapes()
            largest = (max(model.embedding_params, max(a * c for a, c in shapes.values())) if run.full else
                       max(run.lora_rank * max(shapes[x]) for x in run.lora_targets))
            step_tmp = 2 * largest * tb
        else:
            step_tmp = trainable * tb
    elif offload_opt:
        grads = 0.0
        step_tmp = 0.0  # on the host
    else:
        grads = 0.0
        # The flattened gradient partition cast to fp32 (the b-sized flatten is freed right after the
        # cast; in fp32 the flatten is the gradient), then sqrt(v) in fp32.
        step_tmp = trainable / n * (4 + (8 if run.device == "cpu" else 4))
    m["gradients"] = grads
    m["optimizer_step_tmp"] = step_tmp
    return m


PERSISTENT = ("params", "master_weights", "optimizer", "grad_partition", "buckets")
BACKWARD = ("activations", "lora_activations", "loss", "gather_buffer", "autocast_weights")
STEP = ("gradients", "optimizer_step_tmp", "grad_partition_zero2")


def peak_allocated(m: dict[str, float]) -> float:
    """persistent + max(end of forward, backward with ZeRO-2's buckets, optimizer step)."""
    forward = sum(m[k] for k in BACKWARD)
    loss_kept = m["loss_fused_kept"] if m["loss"] == m["loss_fused"] else m["loss"]
    backward = forward - m["loss"] + loss_kept + m["buckets_zero2"]
    step = sum(m[k] for k in STEP) + m["buckets_zero2"]
    return sum(m[k] for k in PERSISTENT) + max(forward, backward, step)


def estimate(model: ModelShape, run: RunShape, *, nodes: int, gpus_per_node: int, gpu: GpuSpec,
             gpu_mem_bytes: float | None = None, candidate: str = "zero3", hfu: float = 0.45,
             comm_overlap: float = 0.7, cpu_adam_params_per_s: float = 1.0e9,
             dataset_tokens: float | None = None, epochs: float = 1.0, max_steps: int | None = None) -> Estimate:
    """Memory and speed of one candidate setting. See memory_terms() and docs/scaling.md."""
    if candidate not in CANDIDATES:
        raise ConfigError(f"unknown candidate {candidate!r}; choose one of {CANDIDATES}")
    n = nodes * gpus_per_node
    mem = memory_terms(model, run, n=n, candidate=candidate)
    allocated = peak_allocated(mem)
    on_gpu = run.device != "cpu"
    mem["cuda_context"] = CUDA_CONTEXT_BYTES if on_gpu else 0.0
    mem["fragmentation"] = FRAGMENTATION * allocated if on_gpu else 0.0
    total = allocated + mem["cuda_context"] + mem["fragmentation"]
    capacity = gpu_mem_bytes if gpu_mem_bytes is not None else gpu.mem_bytes

    # Time.
    full = run.full
    p = model.num_params
    trainable = p if full else model.lora_params(run.lora_rank, run.lora_targets) * max(1, run.molora_adapters)
    b = run.dtype_bytes
    zero3 = candidate.startswith("zero3")
    sp = run.sequence_parallel
    if sp > 1 and (n % sp or model.num_heads % sp or (model.num_kv_heads % sp and sp % model.num_kv_heads)):
        raise ConfigError(f"sequence_parallel={sp} must divide the {n} GPUs and the {model.num_heads} attention "
                          f"heads, and divide or be divided by the {model.num_kv_heads} kv heads")
    tokens_per_gpu_step = run.local_tokens * run.grad_accum  # SP: the GPUs of a group share each row
    flops_per_token = model_flops_per_token(model, run)
    # hfu: the fraction of peak reached on the arithmetic actually executed (recomputation included).
    compute = tokens_per_gpu_step * flops_per_token / (gpu.bf16_flops * hfu)
    bw = gpu.inter_node_bw if nodes > 1 else gpu.intra_node_bw
    ring = (n - 1) / n if n > 1 else 0.0
    if zero3:
        # Per micro-batch: all-gather params in forward and again in backward; reduce-scatter grads.
        comm_bytes = run.grad_accum * (2 * p * b + trainable * b) * ring
    elif candidate == "zero2":
        # Per micro-batch: reduce-scatter grads; per step: all-gather the updated params.
        comm_bytes = (run.grad_accum * trainable * b + trainable * b) * ring
    else:
        # DDP: all-reduce (= reduce-scatter + all-gather) of the grads once per step (no_sync in between).
        comm_bytes = 2 * trainable * b * ring
    comm = comm_bytes / bw if n > 1 else 0.0
    # Ulysses: per layer, all-to-alls of q, k, v (k and v replicated up to N heads when N > kv heads) and the
    # attention output, each moving (N-1)/N of the shard; again for their gradients, and once more when the
    # layer is recomputed. Within the SP group: NVLink when it fits in a node. Not overlapped with compute.
    sp_bytes = sp_seconds = 0.0
    if sp > 1:
        kv = max(model.num_kv_heads, sp) * model.head_dim
        passes = 3 if run.gradient_checkpointing else 2
        sp_bytes = (run.grad_accum * passes * model.num_layers * (sp - 1) / sp * run.local_tokens * b
                    * (2 * model.q_dim + 2 * kv))
        sp_seconds = sp_bytes / (gpu.intra_node_bw if sp <= gpus_per_node else gpu.inter_node_bw)
    offload = 0.0
    if candidate.startswith("zero3_offload"):
        # fp32 grads to host, bf16 params back, and the CPU Adam step on this rank's partition.
        offload += trainable / n * (4 + b) / gpu.pcie_bw + trainable / n / cpu_adam_params_per_s
    if candidate == "zero3_offload_params":
        offload += run.grad_accum * 2 * p * b / n / gpu.pcie_bw
    step = compute + max(0.0, comm - comm_overlap * compute) + sp_seconds + offload
    tokens_per_s = tokens_per_gpu_step * n / step
    if max_steps:
        eta = max_steps * step
    else:
        eta = dataset_tokens * epochs / tokens_per_s if dataset_tokens else None
    model_flops = tokens_per_gpu_step * model_flops_per_token(model, run, recompute=False)
    mfu = model_flops / (gpu.bf16_flops * step)
    return Estimate(candidate=candidate, memory=mem, allocated_bytes=allocated, total_bytes=total,
                    capacity_bytes=capacity, fits=total <= capacity, step_seconds=step, compute_seconds=compute,
                    comm_seconds=comm + sp_seconds, offload_seconds=offload, comm_bytes=comm_bytes + sp_bytes,
                    tokens_per_s=tokens_per_s, mfu=mfu, eta_seconds=eta, sequence_parallel=sp, dp_size=n // sp,
                    sp_comm_bytes=sp_bytes, sp_comm_seconds=sp_seconds)


def model_flops_per_token(model: ModelShape, run: RunShape, *, recompute: bool | None = None) -> float:
    """Training FLOPs per token: 2 per weight per matmul pass, plus causal attention scores and values.

    Full fine-tuning: forward + input grads + weight grads = 6 per weight. LoRA: the frozen weights need
    no weight grads, so 4. Recomputation under gradient checkpointing adds one more forward (2).
    Attention (QK^T and AV) has no weights: its backward computes dQ, dK and dV in LoRA as in full fine-tuning,
    so it costs 3 forwards in both (4 with recomputation).
    """
    recomputed = run.gradient_checkpointing if recompute is None else recompute
    matmul_params = model.num_layers * sum(a * c for a, c in model.linear_shapes().values()) + model.embedding_params
    per_weight = (6 if run.lora_rank is None else 4) + (2 if recomputed else 0)
    # Attention: QK^T and AV, 2 FLOPs per MAC each, over a mean causal context of seq_len/2.
    attn_fwd = 2 * 2 * model.num_layers * model.q_dim * (run.seq_len / 2)
    attn_mult = 3 + (1 if recomputed else 0)  # forward + 2x backward (+ the recomputed forward)
    return per_weight * matmul_params + attn_mult * attn_fwd


def plan_all(model: ModelShape, run: RunShape, **kw: Any) -> list[Estimate]:
    return [estimate(model, run, candidate=c, **kw) for c in CANDIDATES]


def recommend(estimates: list[Estimate]) -> tuple[Estimate | None, str]:
    """The cheapest candidate that fits: the fastest; among those within 2% of the fastest (communication
    hidden behind compute), the one that moves the fewest bytes (the time model does not price ZeRO-3's
    per-module hooks, so less communication is the safer choice), then the smallest footprint."""
    fitting = [e for e in estimates if e.fits]
    if fitting:
        fastest = min(e.step_seconds for e in fitting)
        near = [e for e in fitting if e.step_seconds <= 1.02 * fastest]
        best = min(near, key=lambda e: (e.comm_bytes, e.total_bytes))
        return best, (f"recommended: {best.candidate} ({DESCRIPTIONS[best.candidate]}): fits; fastest of "
                      f"{len(fitting)} that fit" + (f", and the least communication of {len(near)} equally fast"
                                                    if len(near) > 1 else ""))
    smallest = min(estimates, key=lambda e: e.total_bytes)
    groups = {"activations": smallest.memory["activations"] + smallest.memory["lora_activations"],
              "loss": smallest.memory["loss"],
              "params": smallest.memory["params"],
              "optimizer": smallest.memory["optimizer"] + smallest.memory["master_weights"],
              "gradients": (smallest.memory["gradients"] + smallest.memory["grad_partition"]
                            + smallest.memory["grad_partition_zero2"])}
    top = max(groups, key=groups.get)
    advice = {
        "activations": "turn on gradient checkpointing (model.gradient_checkpointing=true) or lower the packed "
                       "token budget per micro-batch (batch.max_tokens; keep the global batch with more "
                       "batch.gradient_accumulation)",
        "loss": "use the fused loss (loss.impl=fused), a smaller loss.chunk_size, or a smaller batch.max_tokens",
        "params": "add GPUs/nodes (ZeRO-3 divides parameters by the GPU count), offload parameters, or use LoRA",
        "optimizer": "offload the optimizer, add GPUs, or use LoRA",
        "gradients": "add GPUs or use LoRA",
    }[top]
    return None, (f"nothing fits: the smallest setting ({smallest.candidate}) needs "
                  f"{smallest.total_bytes / GiB:.1f} GiB per GPU of {smallest.capacity_bytes / GiB:.1f}, "
                  f"mostly {top} ({groups[top] / GiB:.1f} GiB). Fix: {advice}")


def sequence_parallel_options(model: ModelShape, gpus: int) -> list[int]:
    """The Ulysses degrees a model and a GPU count allow: N divides the GPUs and the attention heads, and N and
    the kv heads divide one another (distthink.engine.sequence_parallel.check_heads)."""
    return [d for d in range(1, gpus + 1) if gpus % d == 0 and model.num_heads % d == 0
            and (model.num_kv_heads % d == 0 or d % model.num_kv_heads == 0)]


def plan_sequence_parallel(model: ModelShape, run: RunShape, candidates: list[str], **kw: Any) -> list[dict]:
    """For each allowed SP degree: the recommended candidate (None when nothing fits), and the smallest footprint.
    Sequence parallelism runs on DeepSpeed only, so `ddp` is left out above N = 1."""
    gpus = kw["nodes"] * kw["gpus_per_node"]
    rows = []
    for sp in sequence_parallel_options(model, gpus):
        shaped = RunShape(**{**run.__dict__, "sequence_parallel": sp})
        ests = [estimate(model, shaped, candidate=c, **kw) for c in candidates if sp == 1 or c != "ddp"]
        if not ests:
            continue
        best, _ = recommend(ests)
        smallest = min(ests, key=lambda e: e.total_bytes)
        rows.append({"sequence_parallel": sp, "dp_size": gpus // sp, "best": best, "smallest": smallest})
    return rows


def sequence_parallel_advice(rows: list[dict]) -> tuple[int | None, str]:
    """The SP degree to use: the smallest at which a setting fits without offloading (offload's cost is the
    least certain part of the time model), else the smallest at which anything fits; and a line saying so."""
    fitting = [r for r in rows if r["best"] is not None]
    if not fitting:
        return None, "sequence parallelism: no degree fits either"
    no_offload = [r for r in fitting if "offload" not in r["best"].candidate]
    chosen = (no_offload or fitting)[0]

    def says(r):
        e = r["best"]
        return (f"distributed.sequence_parallel={r['sequence_parallel']} with {e.candidate} "
                f"({e.total_bytes / GiB:.1f} GiB per GPU, {r['dp_size']} data-parallel group(s), "
                f"{e.tokens_per_s:,.0f} tokens/s for the job)")

    line = f"sequence parallelism: use {says(chosen)}"
    if fitting[0] is not chosen:
        line += f"; {says(fitting[0])} fits too, but only by offloading"
    return chosen["sequence_parallel"], line


# ----------------------------------------------------------------------------------------------------
# From a distthink training config (distthink.config.Config) to the shapes above.
# ----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def hub_reachable(timeout: float = 3.0) -> bool:
    """False in offline mode (HF_HUB_OFFLINE=1) or when one request to the hub endpoint gets no answer (no
    network, no DNS). One request, no retries: the hub client's own lookups retry for ~25 s before failing."""
    if hf_constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(hf_constants.ENDPOINT, timeout=timeout)
    except Exception:  # noqa: BLE001 - any transport failure means: do not ask the hub
        return False
    return True


def _config_from_dict(d: dict) -> Any:
    d = dict(d)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def resolve_model_config(cfg, model_config: str | None = None) -> tuple[Any, str]:
    """(transformers config of the run's model, where it came from), without weights.

    model_config: a shipped name (`model_configs.names()`), a config.json or a directory holding one; it
    replaces the lookup of model.name_or_path. Otherwise a local directory is read as is; a hub id is read
    from the local cache, then from the hub when it answers, and from the config shipped with distthink when
    the hub is offline, unreachable or refuses (a gated repository), so planning needs no network."""
    if model_config:
        path = Path(model_config)
        path = path / "config.json" if path.is_dir() else path
        shipped = None if path.is_file() else model_configs.load(model_config)
        if path.is_file():
            mcfg, source = _config_from_dict(json.loads(path.read_text())), str(path)
        elif shipped is not None:
            mcfg, source = _config_from_dict(shipped), f"{model_config} (config.json shipped with distthink)"
        else:
            raise ConfigError(f"--model-config {model_config!r} is neither a config.json, a directory with one, nor "
                              f"a shipped config. Fix: use one of {model_configs.names()} or a path")
    elif cfg.model.name_or_path:
        mcfg, source = _hub_or_shipped_config(cfg.model.name_or_path, cfg.model.trust_remote_code)
    else:
        tokenizer = load_tokenizer(cfg) if str(cfg.model.from_config).startswith("tiny-") else None
        return build_model_config(cfg, tokenizer), str(cfg.model.from_config)
    for key, value in cfg.model.config_overrides.items():
        setattr(mcfg, key, value)
    return mcfg, source


def _hub_or_shipped_config(name: str, trust_remote_code: bool) -> tuple[Any, str]:
    fix = (f"Fix: give a local directory with config.json, --model-config with a path or one of "
           f"{model_configs.names()}, or network access (only config.json is fetched, no weights)")
    if Path(name).is_dir():
        try:
            return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code), name
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.name_or_path='{name}': its config cannot be read ({err}). {fix}") from None
    try:  # the local cache: no network
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, local_files_only=True), name
    except (OSError, ValueError):
        pass
    shipped = model_configs.load(name)
    why = "the hub is offline (HF_HUB_OFFLINE)" if hf_constants.HF_HUB_OFFLINE else "the hub does not answer"
    if hub_reachable():
        try:
            return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code), name
        except (OSError, ValueError) as err:
            if shipped is None:
                raise ConfigError(f"model.name_or_path='{name}': its config cannot be read ({err}). {fix}") from None
            why = f"the hub refused it ({type(err).__name__})"
    elif shipped is None:
        raise ConfigError(f"model.name_or_path='{name}': {why} and its config.json is not in the local cache. "
                          f"{fix}")
    log.info("model.name_or_path='%s': %s; using the config.json shipped with distthink", name, why)
    return _config_from_dict(shipped), f"{name} (config.json shipped with distthink: {why})"


def hf_config_from_config(cfg, model_config: str | None = None) -> Any:
    """The transformers config of the run's model, without weights (see resolve_model_config)."""
    return resolve_model_config(cfg, model_config)[0]


def model_shape_from_config(cfg, model_config: str | None = None) -> ModelShape:
    return ModelShape.from_hf_config(hf_config_from_config(cfg, model_config))


def configured_candidate(cfg) -> str | None:
    """Which planner candidate the run's own distributed settings are: `ddp` without DeepSpeed, else from the
    DeepSpeed JSON's ZeRO stage and offloads; None when the JSON cannot be read or matches no candidate."""
    if not cfg.distributed.deepspeed:
        return "ddp"
    try:
        zero = json.loads(Path(cfg.distributed.deepspeed).read_text()).get("zero_optimization", {})
    except (OSError, ValueError):
        return None
    stage = int(zero.get("stage", 0))
    offloaded = (lambda key: (zero.get(key) or {}).get("device", "none") not in ("none", None))
    if stage == 3:
        if offloaded("offload_param"):
            return "zero3_offload_params"
        return "zero3_offload_optimizer" if offloaded("offload_optimizer") else "zero3"
    return "zero2" if stage == 2 and not offloaded("offload_optimizer") else None


def run_shape_from_config(cfg, *, tokens_per_micro_batch: int | None = None, device: str = "cuda",
                          seq_len: int | None = None, learned_fraction: float = 1.0) -> RunShape:
    """RunShape of a distthink Config. device="cuda" plans for GPUs (dtype auto = bf16, flash-attn when
    attn_implementation is auto); device="cpu" reproduces a CPU run (dtype auto = fp32, sdpa)."""
    if cfg.batch.mode == "tokens":
        tokens = cfg.batch.max_tokens
    else:
        tokens = cfg.batch.samples_per_micro * cfg.data.max_length
    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    attn = cfg.model.attn_implementation
    if attn == "auto":
        attn = "flash" if device == "cuda" else "sdpa"
    attention = "flash" if attn.startswith("flash") else "sdpa"
    reduce_bucket, prefetch = 5e7, 5e7
    overlap = True
    if cfg.distributed.deepspeed:
        try:
            zero = json.loads(Path(cfg.distributed.deepspeed).read_text()).get("zero_optimization", {})
        except (OSError, ValueError):
            zero = {}
        if zero.get("reduce_bucket_size", "auto") != "auto":
            reduce_bucket = float(zero["reduce_bucket_size"])
        if zero.get("stage3_prefetch_bucket_size", "auto") != "auto":
            prefetch = float(zero["stage3_prefetch_bucket_size"])
        overlap = bool(zero.get("overlap_comm", True))
    return RunShape(
        tokens_per_micro_batch=int(tokens_per_micro_batch or tokens),
        seq_len=int(seq_len or min(cfg.data.max_length, tokens)),
        grad_accum=cfg.batch.gradient_accumulation,
        lora_rank=cfg.lora.r if cfg.lora.enabled else None,
        lora_targets=list(cfg.lora.target_modules),
        lora_dropout=cfg.lora.dropout if cfg.lora.enabled else 0.0,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        fused_loss=cfg.loss.impl == "fused",
        fused_chunk_tokens=cfg.loss.chunk_size,
        learned_fraction=learned_fraction,
        dtype_bytes=4 if dtype == "float32" else 2,
        attention=attention,
        device=device,
        reduce_bucket_elems=reduce_bucket,
        prefetch_bucket_elems=prefetch,
        zero2_overlap_comm=overlap,
        sequence_parallel=cfg.distributed.sequence_parallel,
        tiled_mlp=cfg.model.tiled_mlp,
    )


def candidate_of_config(cfg) -> str:
    """Which candidate a config's distributed.deepspeed JSON corresponds to."""
    ds = cfg.distributed.deepspeed
    if not ds:
        return "ddp"
    zero = json.loads(Path(ds).read_text()).get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage == 3:
        if zero.get("offload_param"):
            return "zero3_offload_params"
        return "zero3_offload_optimizer" if zero.get("offload_optimizer") else "zero3"
    return "zero2" if stage == 2 else "ddp"
