"""A second device on a CPU-only machine: tensors that hold CPU data but say they live on "the accelerator".

Every GPU-only path of distthink has one failure in common: a tensor left on the host meets one on the GPU
(`indices should be either on cpu or on the same device`, `Expected all tensors to be on the same device`). On a
CPU machine both sit on the CPU, so no test could see it. Here `to_accelerator` moves a module's parameters or a
batch onto a stand-in accelerator, and every op that mixes a left-behind host tensor with accelerator tensors
raises the same error CUDA raises, naming the op. Data stays real (the tensors wrap CPU tensors), so code that
reads values (`.item()`, `nonzero`, `.cpu()`, generation) runs unchanged.

How. `AccelTensor` is a wrapper tensor subclass (the pattern of torch's LoggingTensor) whose reported device is
`meta`, a device every torch build knows and that no distthink code uses. `AcceleratorMode` (a TorchDispatchMode)
is needed for what has no tensor argument yet: factories with `device=meta` (`torch.zeros(n, device=x.device)`)
and `.to(meta)` of plain tensors. Inside `accelerator()`, `ACCEL` is the device to move things to.

The rules follow CUDA's: ops take tensors of one device, except 0-dim host tensors (CPU scalars); an accelerator
tensor may be indexed with host indices, never the other way round; copies and `.to()` cross devices. `.numpy()`
of an accelerator tensor fails, as it does for a CUDA tensor.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

ACCEL = torch.device("meta")
aten = torch.ops.aten

# ops whose device rules are not "every tensor on one device"
_CROSS_DEVICE = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default,
                 aten._copy_from_and_resize.default, aten.lift_fresh.default, aten.detach.default,
                 aten._local_scalar_dense.default, aten.is_same_size.default, aten.to.dtype_layout,
                 aten.to.device, aten.to.dtype, aten.to.other}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default,
             aten._unsafe_index.Tensor, aten._unsafe_index_put.default}


class DeviceMismatch(RuntimeError):
    """A host tensor met accelerator tensors in one op (what CUDA reports as a device error)."""


class AccelTensor(torch.Tensor):
    """CPU data (`inner`) reporting device `meta`: the stand-in accelerator."""

    inner: torch.Tensor
    __slots__ = ["inner"]

    @staticmethod
    def __new__(cls, inner: torch.Tensor, requires_grad: bool = False):
        r = torch.Tensor._make_wrapper_subclass(cls, inner.size(), strides=inner.stride(),
                                                storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                                layout=inner.layout, device=ACCEL, requires_grad=requires_grad)
        r.inner = inner.detach() if inner.requires_grad else inner
        return r

    def __repr__(self, *, tensor_contents=None):
        return f"AccelTensor({self.inner!r})"

    def tolist(self):  # a CUDA tensor's tolist() copies to the host; torch refuses it for subclasses
        return self.inner.tolist()

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert an accelerator tensor to numpy. Use Tensor.cpu() to copy the tensor to host "
                        "memory first (as for a CUDA tensor)")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _is_host(t) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, AccelTensor) and t.device.type == "cpu"


def _check(func, args, kwargs) -> None:
    leaves = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
    if not any(isinstance(x, AccelTensor) for x in leaves) or func in _CROSS_DEVICE:
        return
    if func in _INDEXING:
        self_t = args[0]
        if _is_host(self_t) and self_t.dim() > 0:
            raise DeviceMismatch(f"{func}: indices should be either on cpu or on the same device as the indexed "
                                 f"tensor (cpu): a host tensor {tuple(self_t.shape)} indexed with accelerator ids")
        indices = args[1] if len(args) > 1 else []
        leaves = [x for x in tree_flatten((args[:1], args[2:], kwargs))[0] if isinstance(x, torch.Tensor)]
        if not isinstance(self_t, AccelTensor):
            leaves += [i for i in indices if isinstance(i, torch.Tensor)]
    host = [x for x in leaves if _is_host(x) and x.dim() > 0]
    if host:
        shapes = ", ".join(f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}" for x in host[:3])
        raise DeviceMismatch(f"{func}: Expected all tensors to be on the same device, but found host tensor(s) "
                             f"[{shapes}] next to accelerator tensors (a tensor left behind on the host)")


def _dispatch(func, args, kwargs):
    _check(func, args, kwargs)
    leaves = tree_flatten((args, kwargs))[0]
    if any(isinstance(x, torch.Tensor) and not isinstance(x, AccelTensor) and x.is_meta for x in leaves):
        raise RuntimeError(f"{func}: a data-less meta tensor reached the stand-in accelerator; the harness missed a "
                           "conversion (fix tests/_device_harness.py, not the code under test)")
    on_accel = any(isinstance(x, AccelTensor) for x in leaves)
    to_device = kwargs.get("device")
    if to_device is not None and torch.device(to_device).type == "meta":
        kwargs = dict(kwargs, device=torch.device("cpu"))
        wrap = True
    elif to_device is not None:
        wrap = False  # an explicit host device: `.cpu()`, `.to("cpu")`, a host factory
    else:
        wrap = on_accel
    inners = {}

    def unwrap(x):
        if isinstance(x, AccelTensor):
            inners[id(x.inner)] = x
            return x.inner
        return x

    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))

    def rewrap(x):
        if not isinstance(x, torch.Tensor):
            return x
        if id(x) in inners:  # an in-place op returns its own (wrapped) argument
            return inners[id(x)]
        return AccelTensor(x) if wrap else x

    return tree_map(rewrap, out)


class AcceleratorMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


class FactoryMode(TorchFunctionMode):
    """Factories with device=meta (`torch.tensor(data, device=x.device)`, `torch.arange(n, device=...)`): some build
    a data-less meta tensor before any dispatch, so they are rewritten at the Python level to a host factory whose
    result is moved onto the stand-in accelerator."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], AccelTensor):
            # `t[[0, 2]]`: torch turns the list into an index tensor on t's device without a dispatch we could see,
            # i.e. a data-less meta tensor here. Host indices are what CUDA accepts too.
            args = (args[0], _host_index(args[1]), *args[2:])
        device = kwargs.get("device")
        has_tensor = any(isinstance(x, torch.Tensor) for x in tree_flatten((args, kwargs))[0])
        if device is None or has_tensor or torch.device(device).type != "meta":
            return func(*args, **kwargs)
        out = func(*args, **dict(kwargs, device=torch.device("cpu")))
        return tree_map(lambda x: AccelTensor(x, requires_grad=x.requires_grad) if isinstance(x, torch.Tensor) else x,
                        out)


def _host_index(index):
    if isinstance(index, list):
        return torch.tensor(index)
    if isinstance(index, tuple):
        return tuple(_host_index(i) for i in index)
    return index


@contextlib.contextmanager
def accelerator():
    """The stand-in accelerator is active inside this block: `x.to(ACCEL)`, `module.to(ACCEL)` work."""
    with FactoryMode(), AcceleratorMode():
        yield


def to_accelerator(obj, *, buffers: bool = True):
    """Move a module's parameters (and, with buffers=True, its buffers) or a batch (dict/list/tensor) to ACCEL.

    buffers=False mirrors DeepSpeed ZeRO-3, which places the parameters (zero.Init) but never moves a module's
    buffers registered outside zero.Init. Tied parameters stay tied (module.to() would give each module its own
    copy of a wrapper parameter). Must run inside `accelerator()`."""
    if isinstance(obj, torch.nn.Module):
        moved: dict[int, torch.Tensor] = {}
        for module in obj.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and not isinstance(p, AccelTensor):
                    if id(p) not in moved:
                        moved[id(p)] = torch.nn.Parameter(p.detach().to(ACCEL), requires_grad=p.requires_grad)
                    module._parameters[name] = moved[id(p)]
            if buffers:
                for name, b in list(module._buffers.items()):
                    if b is not None and not isinstance(b, AccelTensor):
                        module._buffers[name] = b.to(ACCEL)
        return obj
    return tree_map(lambda x: x.to(ACCEL) if isinstance(x, torch.Tensor) else x, obj)


def on_accelerator(t: torch.Tensor) -> bool:
    return isinstance(t, AccelTensor)
