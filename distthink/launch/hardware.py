"""The hardware and the distributed settings `distthink plan` chooses between: plain data, so that the command
line can list them without loading the planner's dependencies."""

from __future__ import annotations

from dataclasses import dataclass

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
    "h100": GpuSpec("h100", 80 * GiB, 989e12, 450e9, 50e9),  # SXM
    # PCIe cards: NVLink bridges join pairs only, so collectives of more GPUs cross PCIe Gen5 (~50 GB/s a way)
    "h100-pcie": GpuSpec("h100-pcie", 80 * GiB, 756e12, 50e9, 50e9, pcie_bw=50e9),
    "h100-nvl": GpuSpec("h100-nvl", 94e9, 835e12, 50e9, 50e9, pcie_bw=50e9),
    "h200": GpuSpec("h200", 141e9, 989e12, 450e9, 50e9),
    "a100": GpuSpec("a100", 80 * GiB, 312e12, 300e9, 25e9),
    "a100-40": GpuSpec("a100-40", 40 * GiB, 312e12, 300e9, 25e9),
    "l40s": GpuSpec("l40s", 48 * GiB, 362e12, 32e9, 12.5e9, pcie_bw=32e9),
    "a10g": GpuSpec("a10g", 24 * GiB, 125e12, 16e9, 12.5e9, pcie_bw=16e9),
}


# torch.cuda.get_device_name() -> GPUS key, matched on the whole name: a substring match gave the H100 PCIe and
# NVL cards the SXM peak (989 instead of 756 / 835 TF). A name not listed has no known peak.
DEVICE_NAMES: dict[str, str] = {
    "NVIDIA H100 80GB HBM3": "h100",
    "NVIDIA H100 PCIe": "h100-pcie",
    "NVIDIA H100 NVL": "h100-nvl",
    "NVIDIA H200": "h200",
    "NVIDIA A100-SXM4-80GB": "a100",
    "NVIDIA A100 80GB PCIe": "a100",
    "NVIDIA A100-SXM4-40GB": "a100-40",
    "NVIDIA A100-PCIE-40GB": "a100-40",
    "NVIDIA L40S": "l40s",
    "NVIDIA A10G": "a10g",
}


def gpu_for_device_name(name: str) -> GpuSpec | None:
    """The spec of the GPU torch.cuda.get_device_name() calls `name` (exact name), or None when unknown."""
    key = DEVICE_NAMES.get(name.strip())
    return GPUS[key] if key else None


CANDIDATES = ("ddp", "zero2", "zero3", "zero3_offload_optimizer", "zero3_offload_params")
DESCRIPTIONS = {
    "ddp": "no DeepSpeed (distributed.deepspeed=null): DDP / one process, torch AdamW on the params",
    "zero2": "ds_configs/zero2.json",
    "zero3": "ds_configs/zero3.json",
    "zero3_offload_optimizer": "ZeRO-3, optimizer (fp32 master, Adam, grads) on the host",
    "zero3_offload_params": "ds_configs/zero3_offload.json: ZeRO-3, optimizer and parameters on the host",
}
