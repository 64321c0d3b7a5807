"""Will this run fit, and how fast will it go? An analytical planner that reads a model *config* only.

Every figure is per GPU and in bytes. The model is deliberately plain so that a user can check it by
hand; docs/scaling.md derives each term and states the assumptions. The terms:

- model states (ZeRO paper, mixed precision Adam): bf16 params 2 B, bf16 grads 2 B, fp32 master + m + v
  12 B per trainable parameter, partitioned according to the ZeRO stage; DeepSpeed also keeps the fp32
  gradient partition that the optimizer step reads (4 B per trainable parameter / N);
- the ZeRO-3 working set: the layers gathered at once (the current one plus the prefetched one), and the
  lm_head when the fused loss gathers it;
- activations of the packed micro-batch, with and without per-layer gradient checkpointing;
- the loss: the full logits of a plain cross-entropy against one chunk of the fused loss;
- DeepSpeed communication buckets, the CUDA context, and a fragmentation margin.

Time: FLOPs per token (6 per parameter for full fine-tuning, 4 for LoRA, +2 with recomputation, plus
causal attention), divided by the GPU's dense bf16 peak times an assumed MFU; ZeRO collectives over the
slowest link a GPU uses, partly hidden behind compute.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from distthink.errors import ConfigError

GiB = 1024 ** 3


@dataclass(frozen=True)
class GpuSpec:
    name: str
    mem_bytes: float
    bf16_flops: float  # dense peak, no sparsity
    intra_node_bw: float  # bytes/s per GPU per direction (NVLink, or PCIe where there is none)
    inter_node_bw: float  # bytes/s per GPU per direction (one NIC per GPU assumed)
    pcie_bw: float = 25e9  # host <-> device, used by offload


GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("h100", 80 * GiB, 989e12, 450e9, 50e9),
    "h200": GpuSpec("h200", 141e9, 989e12, 450e9, 50e9),
    "a100": GpuSpec("a100", 80 * GiB, 312e12, 300e9, 25e9),
    "a100-40": GpuSpec("a100-40", 40 * GiB, 312e12, 300e9, 25e9),
    "l40s": GpuSpec("l40s", 48 * GiB, 362e12, 32e9, 12.5e9, pcie_bw=32e9),
    "a10g": GpuSpec("a10g", 24 * GiB, 125e12, 16e9, 12.5e9, pcie_bw=16e9),
}


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

    def activation_bytes_per_token_layer(self, dtype_bytes: int) -> float:
        """Bytes one decoder layer keeps for backward, per token, with no checkpointing.

        Counted from what HF Llama/Qwen layers save: each RMSNorm keeps its input and an fp32 copy
        (HF norms upcast), the projections keep their inputs, SDPA/flash keeps q, k, v, its output and
        an fp32 log-sum-exp per head, and the SwiGLU MLP keeps gate, up, silu(gate) and their product.
        """
        h, q, kv, i, b = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size, dtype_bytes
        norm = h * b + h * 4 + h * b  # input, fp32 upcast, normed output
        attn = (q + 2 * kv) * b + q * b + self.num_heads * 4  # q, k, v, attention output, lse
        if self.qk_norm:
            attn += (q + kv) * (4 + b)
        mlp = 4 * i * b  # gate, up, silu(gate), gate*up (the down_proj input)
        residual = h * b
        return 2 * norm + attn + mlp + residual


@dataclass
class RunShape:
    """What the training config says about one optimizer step."""

    tokens_per_micro_batch: int  # the packed token budget of one micro-batch on one GPU
    seq_len: int  # typical sample length, for the attention FLOPs (causal: mean context = seq_len / 2)
    grad_accum: int = 1
    lora_rank: int | None = 8  # None = full fine-tuning
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    gradient_checkpointing: bool = True
    fused_loss: bool = True
    fused_chunk_tokens: int = 2048
    dtype_bytes: int = 2  # bf16 on GPU


CANDIDATES = ("zero2", "zero3", "zero3_offload_optimizer", "zero3_offload_params")
CUDA_CONTEXT_BYTES = 0.75 * GiB  # CUDA/NCCL context outside the torch allocator
FRAGMENTATION = 0.10  # margin on top of what the allocator hands out


@dataclass
class Estimate:
    candidate: str
    memory: dict[str, float]  # bytes per GPU, by term
    total_bytes: float
    fits: bool
    step_seconds: float
    compute_seconds: float
    comm_seconds: float
    offload_seconds: float
    comm_bytes: float
    tokens_per_s: float  # whole job
    mfu: float  # model FLOPs (no recomputation) / peak, the figure public reports quote
    eta_seconds: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(model: ModelShape, run: RunShape, *, nodes: int, gpus_per_node: int, gpu: GpuSpec,
             gpu_mem_bytes: float | None = None, candidate: str = "zero3", hfu: float = 0.45,
             comm_overlap: float = 0.7, cpu_adam_params_per_s: float = 1.0e9,
             dataset_tokens: float | None = None, epochs: float = 1.0) -> Estimate:
    """Memory and speed of one candidate setting. See the module docstring for the model."""
    if candidate not in CANDIDATES:
        raise ConfigError(f"unknown candidate {candidate!r}; choose one of {CANDIDATES}")
    n = nodes * gpus_per_node
    full = run.lora_rank is None
    p = model.num_params
    trainable = p if full else model.lora_params(run.lora_rank, run.lora_targets)
    zero3 = candidate.startswith("zero3")
    b = run.dtype_bytes

    mem: dict[str, float] = {}
    # Parameters. Under ZeRO-3 every rank holds 1/N of them plus the layers gathered right now
    # (current + prefetched). LoRA adapters are tiny but counted like any trainable parameter.
    working_set = 2 * model.params_per_layer * b
    if run.fused_loss:
        working_set += model.embedding_params * b  # the fused loss gathers the lm_head
    if candidate == "zero2":
        mem["params"] = p * b
    elif candidate == "zero3_offload_params":
        mem["params"] = working_set
    else:
        mem["params"] = p * b / n + working_set
    # Gradients (ZeRO-2 and 3 both partition them): the bf16 partition plus the fp32 partition the
    # optimizer step reads. The full-size bf16 grads live only bucket by bucket (counted in buffers).
    mem["gradients"] = trainable * (b + 4) / n
    # Optimizer: fp32 master + Adam m + v.
    mem["optimizer"] = 0.0 if candidate.startswith("zero3_offload") else 12 * trainable / n

    t = run.tokens_per_micro_batch
    per_layer = model.activation_bytes_per_token_layer(b)
    if run.gradient_checkpointing:
        # Each layer's input survives; one layer is recomputed in full during backward.
        mem["activations"] = t * (model.num_layers * model.hidden_size * b + per_layer)
    else:
        mem["activations"] = t * model.num_layers * per_layer
    mem["activations_no_ckpt"] = t * model.num_layers * per_layer
    mem["activations_ckpt"] = t * (model.num_layers * model.hidden_size * b + per_layer)
    # Loss. Plain: bf16 logits, their fp32 upcast, the fp32 log-softmax kept for backward, and its grad.
    plain = t * model.vocab_size * (b + 4 + 4 + 4)
    chunk = min(t, run.fused_chunk_tokens)
    fused = chunk * model.vocab_size * 4 * 2 + t * model.hidden_size * 4
    mem["loss"] = fused if run.fused_loss else plain
    mem["loss_plain"] = plain
    mem["loss_fused"] = fused
    # DeepSpeed buckets ("auto" sizes = hidden^2 elements): reduce bucket + ZeRO-3 prefetch bucket.
    h2 = model.hidden_size ** 2
    mem["buffers"] = h2 * b * (2 if zero3 else 1) + CUDA_CONTEXT_BYTES

    counted = ("params", "gradients", "optimizer", "activations", "loss", "buffers")
    allocated = sum(mem[k] for k in counted if k != "buffers")
    mem["fragmentation"] = FRAGMENTATION * allocated
    total = allocated + mem["buffers"] + mem["fragmentation"]
    capacity = gpu_mem_bytes if gpu_mem_bytes is not None else gpu.mem_bytes

    # Time.
    tokens_per_gpu_step = t * run.grad_accum
    flops_per_token = model_flops_per_token(model, run)
    # hfu: the fraction of peak reached on the arithmetic actually executed (recomputation included).
    compute = tokens_per_gpu_step * flops_per_token / (gpu.bf16_flops * hfu)
    bw = gpu.inter_node_bw if nodes > 1 else gpu.intra_node_bw
    ring = (n - 1) / n if n > 1 else 0.0
    if zero3:
        # Per micro-batch: all-gather params in forward and again in backward; reduce-scatter grads.
        comm_bytes = run.grad_accum * (2 * p * b + trainable * b) * ring
    else:
        # Per micro-batch: reduce-scatter grads; per step: all-gather the updated params.
        comm_bytes = (run.grad_accum * trainable * b + trainable * b) * ring
    comm = comm_bytes / bw if n > 1 else 0.0
    offload = 0.0
    if candidate.startswith("zero3_offload"):
        # fp32 grads to host, bf16 params back, and the CPU Adam step on this rank's partition.
        offload += trainable / n * (4 + b) / gpu.pcie_bw + trainable / n / cpu_adam_params_per_s
    if candidate == "zero3_offload_params":
        offload += run.grad_accum * 2 * p * b / n / gpu.pcie_bw
    step = compute + max(0.0, comm - comm_overlap * compute) + offload
    tokens_per_s = tokens_per_gpu_step * n / step
    eta = dataset_tokens * epochs / tokens_per_s if dataset_tokens else None
    model_flops = tokens_per_gpu_step * model_flops_per_token(model, run, recompute=False)
    mfu = model_flops / (gpu.bf16_flops * step)
    return Estimate(candidate=candidate, memory=mem, total_bytes=total, fits=total <= capacity,
                    step_seconds=step, compute_seconds=compute, comm_seconds=comm, offload_seconds=offload,
                    comm_bytes=comm_bytes, tokens_per_s=tokens_per_s, mfu=mfu, eta_seconds=eta)


def model_flops_per_token(model: ModelShape, run: RunShape, *, recompute: bool | None = None) -> float:
    """Training FLOPs per token: 2 per weight per matmul pass, plus causal attention scores and values.

    Full fine-tuning: forward + input grads + weight grads = 6 per weight. LoRA: the frozen weights need
    no weight grads, so 4. Recomputation under gradient checkpointing adds one more forward (2).
    """
    matmul_params = model.num_layers * sum(a * c for a, c in model.linear_shapes().values()) + model.embedding_params
    per_weight = 6 if run.lora_rank is None else 4
    if run.gradient_checkpointing if recompute is None else recompute:
        per_weight += 2
    # Attention: QK^T and AV, 2 FLOPs per MAC each, over a mean causal context of seq_len/2.
    attn_fwd = 2 * 2 * model.num_layers * model.q_dim * (run.seq_len / 2)
    attn_mult = (per_weight / 2)  # same fwd/bwd/recompute multiplier as the weights
    return per_weight * matmul_params + attn_mult * attn_fwd


def plan_all(model: ModelShape, run: RunShape, **kw: Any) -> list[Estimate]:
    return [estimate(model, run, candidate=c, **kw) for c in CANDIDATES]


def recommend(estimates: list[Estimate]) -> tuple[Estimate | None, str]:
    """The fastest candidate that fits (offload is only worth it when nothing faster fits)."""
    fitting = [e for e in estimates if e.fits]
    if fitting:
        best = min(fitting, key=lambda e: e.step_seconds)
        return best, f"recommended: {best.candidate} (fits, fastest of {len(fitting)} that fit)"
    smallest = min(estimates, key=lambda e: e.total_bytes)
    top = max((k for k in ("activations", "loss", "params", "optimizer", "gradients")),
              key=lambda k: smallest.memory[k])
    advice = {
        "activations": "turn on gradient checkpointing or lower the packed token budget per micro-batch "
                       "(keep the global batch with more gradient accumulation)",
        "loss": "use the fused loss (loss.impl: fused) or a smaller token budget",
        "params": "add GPUs/nodes (ZeRO-3 divides parameters by the GPU count) or use LoRA",
        "optimizer": "offload the optimizer, add GPUs, or use LoRA",
        "gradients": "add GPUs or use LoRA",
    }[top]
    return None, (f"nothing fits: the smallest setting ({smallest.candidate}) needs "
                  f"{smallest.total_bytes / GiB:.1f} GiB per GPU, mostly {top}. Fix: {advice}")
