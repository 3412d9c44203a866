"""A simulated CUDA device on the CPU: the device placement and host reads of GPU code paths, without a GPU.

    with simulated_cuda() as sim:
        model.to("cuda")                      # parameters become SimCuda tensors: device cuda:0
        x = torch.rand(2, 3).to("cuda")
        y = model(x)                          # computed on the CPU, y.device == cuda:0
        torch.rand(3) + y                     # RuntimeError, as on a real GPU
        y.sum().item()                        # sim.syncs == 1: a device-to-host read

A :class:`SimCuda` tensor is an ordinary CPU tensor (the same numbers, the same
autograd) whose ``device`` says ``cuda:0``. A torch-function mode sees every
call, applies PyTorch's device rules for CUDA tensors and marks each result
with the device the call would have given:

- every tensor argument on one device, except CPU scalars (0-dim tensors);
- a CUDA tensor takes CPU indices, a CPU tensor no CUDA ones, and
  ``t[index] = value`` needs the value on ``t``'s device;
- ``to`` / ``cuda`` / ``cpu`` / ``copy_`` cross devices (a move copies);
  factories with ``device="cuda"`` make CUDA tensors, ``*_like`` and
  ``new_*`` follow their input;
- no ``numpy()`` of a CUDA tensor; a CPU generator cannot draw CUDA tensors.

It also counts the calls that make the host wait for a GPU (``sim.syncs``,
``sim.sync_calls``): reading values back (``item``, ``tolist``, ``bool``,
``int``, ``float``, formatting, ``equal`` / ``allclose``), copies to the CPU,
and results whose size depends on the data (``nonzero``, ``unique``,
``masked_select``, boolean-mask indexing). That is what
``torch.cuda.set_sync_debug_mode`` reports on a GPU, less the rare kernels that
synchronise inside.

``torch.autocast("cuda", dtype)`` runs as CPU autocast, so bf16 / fp16 code
paths run in that precision (with the CPU's list of low-precision operations,
which is close to CUDA's but not the same). With ``cuda_api=True`` the few
``torch.cuda`` functions that benchmark scripts call (``is_available``,
``synchronize``, ``get_device_name``, peak-memory statistics, ``empty_cache``)
answer as for an idle device with nothing allocated. Not simulated: CUDA
generators, streams, events, and dispatcher-level Python code that builds
tensors from ``input.device`` (e.g. the decompositions FlopCounterMode runs).

The point: code that runs unchanged here, and makes the same number of host
reads at any depth, does not fail on its first GPU run for a tensor left on
the CPU, or stall the GPU once per step.
"""

from __future__ import annotations

import contextlib
from typing import Any, List
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


class SimCuda(torch.Tensor):
    """A CPU tensor that reports ``cuda:0`` (see the module docstring)."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # the mode does the work

    @property
    def device(self) -> torch.device:
        return CUDA

    @property
    def is_cuda(self) -> bool:
        return True

    @property
    def is_cpu(self) -> bool:
        return False


def on_cuda(t: Any) -> bool:
    return isinstance(t, SimCuda)


def _cuda(t: torch.Tensor) -> SimCuda:
    return t if isinstance(t, SimCuda) else t.as_subclass(SimCuda)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor) if isinstance(t, SimCuda) else t


def _as_device(value: Any) -> torch.device | None:
    """The device a ``to()`` / factory argument names, or None when it names none."""
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError:
            return None
    if isinstance(value, int) and not isinstance(value, bool):
        return CUDA  # a bare device index
    return None


def _to_target(args: tuple, kwargs: dict) -> torch.device | None:
    """The destination device of ``Tensor.to(...)`` (None: unchanged)."""
    if kwargs.get("device") is not None:
        return _as_device(kwargs["device"])
    for value in args[1:]:
        if isinstance(value, torch.Tensor):
            return CUDA if on_cuda(value) else CPU
        if isinstance(value, (str, torch.device)):
            return _as_device(value)
    return None


def _mismatch(name: str) -> RuntimeError:
    return RuntimeError(f"simulated CUDA: {name}: Expected all tensors to be on the same device, "
                        "but found at least two devices, cuda:0 and cpu!")


def _deepcopy(src: SimCuda, memo: dict) -> SimCuda:
    """``copy.deepcopy`` of a SimCuda tensor or parameter: a SimCuda copy (a parameter stays one)."""
    if id(src) not in memo:
        with torch._C.DisableTorchFunctionSubclass():
            copied = _cuda(_plain(src).detach().clone())
        if getattr(src, "_is_param", False):
            memo[id(src)] = torch.nn.Parameter(copied, src.requires_grad)
        else:
            memo[id(src)] = copied.requires_grad_(src.requires_grad)
    return memo[id(src)]


_FOLLOW_SELF = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}
_ANY_DEVICES = {"copy_", "to", "cuda", "cpu", "__getitem__", "__setitem__", "__get__", "__set__", "type_as",
                "detach", "numpy", "_has_compatible_shallow_copy_type"}
# Calls that wait for the device when a CUDA tensor is involved (besides copies to the CPU).
_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__format__", "__repr__", "equal",
          "allclose", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "numpy"}


class SimulatedCudaMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.sync_calls: List[str] = []

    @property
    def syncs(self) -> int:
        """How many calls made the host wait for the (simulated) device so far."""
        return len(self.sync_calls)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        any_cuda = any(on_cuda(t) for t in tensors)
        devices = {"cuda" if on_cuda(t) else "cpu" for t in tensors if on_cuda(t) or t.dim() > 0}
        if name in ("to", "cuda", "cpu") and args and isinstance(args[0], torch.Tensor):
            return self._move(func, name, args, kwargs)
        if name == "__deepcopy__" and on_cuda(args[0]):
            return _deepcopy(args[0], args[1] if len(args) > 1 else kwargs.get("memo", {}))
        self._check(name, args, any_cuda, devices)
        if any_cuda and (name in _READS or self._data_dependent(name, args)):
            self.sync_calls.append(name)
        if name == "copy_" and not on_cuda(args[0]) and any_cuda:
            self.sync_calls.append("copy_ to the CPU")

        device = _as_device(kwargs.get("device")) if "device" in kwargs else None
        if device is not None and device.type == "cuda":
            generator = kwargs.get("generator")
            if generator is not None and generator.device.type != "cuda":
                raise RuntimeError("Expected a 'cuda' device type for generator but found 'cpu'")
            kwargs, to_cuda = {**kwargs, "device": CPU}, True
        elif device is not None:
            to_cuda = False
        elif name in _FOLLOW_SELF:
            to_cuda = on_cuda(args[0])
        else:
            to_cuda = any_cuda
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if out is None or name in ("__set__", "__setitem__"):
            return out
        if isinstance(out, torch.Tensor) and args and out is args[0]:
            return args[0]  # in place: the same object
        if isinstance(out, torch.Size):
            return out  # a shape stays a torch.Size (tree_map would make it a plain tuple)
        return tree_map(lambda t: _cuda(t) if isinstance(t, torch.Tensor) and to_cuda else t, out)

    def _move(self, func, name: str, args: tuple, kwargs: dict):
        source = args[0]
        target = CUDA if name == "cuda" else CPU if name == "cpu" else _to_target(args, kwargs)
        target_cuda = on_cuda(source) if target is None else target.type == "cuda"
        moved = target_cuda != on_cuda(source)
        if moved and on_cuda(source):
            self.sync_calls.append(f"{name} to the CPU")
        with torch._C.DisableTorchFunctionSubclass():
            if name == "to":
                rest = tuple(CPU if not isinstance(a, torch.Tensor) and _as_device(a) is not None else a
                             for a in args[1:])
                out = func(source, *rest, **{k: (CPU if k == "device" else v) for k, v in kwargs.items()})
            else:
                out = source
            if moved and out is source:
                out = _plain(out).clone()  # a move copies
        return _cuda(out) if target_cuda else _plain(out)

    @staticmethod
    def _check(name: str, args: tuple, any_cuda: bool, devices: set) -> None:
        if name == "numpy" and any_cuda:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first.")
        if name == "__getitem__" and not on_cuda(args[0]) and any_cuda:
            raise RuntimeError("indices should be either on cpu or on the same device as the indexed tensor (cpu)")
        if name == "__setitem__":
            value = args[2] if len(args) > 2 else None
            value_on_cpu = isinstance(value, torch.Tensor) and not on_cuda(value) and value.dim() > 0
            if (on_cuda(args[0]) and value_on_cpu) or (not on_cuda(args[0]) and any_cuda):
                raise _mismatch(name)
        elif len(devices) > 1 and name not in _ANY_DEVICES:
            raise _mismatch(name)

    @staticmethod
    def _data_dependent(name: str, args: tuple) -> bool:
        """Indexing with a boolean mask (the result's size depends on the data): a read on a GPU."""
        if name not in ("__getitem__", "__setitem__") or len(args) < 2:
            return False
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and on_cuda(i) for i in index)


class _Autocast(torch.amp.autocast_mode.autocast):
    """``torch.autocast`` with "cuda" run as CPU autocast (a machine without a GPU would disable it)."""

    def __init__(self, device_type: str, dtype=None, enabled: bool = True, cache_enabled=None):
        super().__init__("cpu" if device_type == "cuda" else device_type, dtype, enabled, cache_enabled)


_CUDA_API = {
    "is_available": lambda: True,
    "device_count": lambda: 1,
    "synchronize": lambda device=None: None,
    "get_device_name": lambda device=None: "simulated CUDA (CPU)",
    "reset_peak_memory_stats": lambda device=None: None,
    "max_memory_allocated": lambda device=None: 0,
    "empty_cache": lambda: None,
}


@contextlib.contextmanager
def simulated_cuda(cuda_api: bool = False):
    """Run the body on the simulated CUDA device; yields the mode (its ``syncs`` count). See the module docstring."""
    patches = [mock.patch.object(torch.cuda, "_lazy_init", lambda: None),  # no driver: nothing runs on it
               mock.patch.object(torch, "autocast", _Autocast), mock.patch.object(torch.amp, "autocast", _Autocast)]
    if cuda_api:
        patches += [mock.patch.object(torch.cuda, key, value) for key, value in _CUDA_API.items()]
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # .to("cuda") makes new parameters
    mode = SimulatedCudaMode()
    try:
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            stack.enter_context(mode)
            yield mode
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


def simulated_gpu_strategy():
    """A Lightning strategy that runs on the simulated ``cuda:0`` (use inside :func:`simulated_cuda`).

    ``strategy.seen`` records, per batch moved to the device, the devices of the batch's tensors and of the
    module's parameters.
    """
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.strategies import SingleDeviceStrategy

    class SimulatedGPUAccelerator(CPUAccelerator):
        def setup_device(self, device: torch.device) -> None:  # the CPU accelerator refuses a non-CPU device
            pass

    class SimulatedGPUStrategy(SingleDeviceStrategy):
        def __init__(self):
            super().__init__(device=CUDA, accelerator=SimulatedGPUAccelerator())
            self.seen: List[tuple] = []

        def batch_to_device(self, batch, device=None, dataloader_idx=0):
            batch = super().batch_to_device(batch, device, dataloader_idx)
            tensors = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]
            params = {str(p.device) for p in self.lightning_module.parameters()}
            self.seen.append(({str(t.device) for t in tensors}, params))
            return batch

    return SimulatedGPUStrategy()
