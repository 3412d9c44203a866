"""How the pipeline executes on its device: the speed settings of ``diffguard.runtime``, not the method.

- ``autocast`` none | bf16 | fp16: the model forwards (denoiser, autoencoder, classifier) run under
  ``torch.autocast`` on the device type; DDIM and guidance arithmetic, masks and distances stay in float32.
- ``channels_last``: the models' 4-D weights and inputs in channels-last memory format.
- ``compile``: ``torch.compile`` of the denoiser, in place.
- ``cudnn_benchmark``: ``torch.backends.cudnn.benchmark`` while a run is on CUDA (off under deterministic
  algorithms; the previous value is restored).
- ``inference_mode``: work without gradients under ``torch.inference_mode`` (else ``no_grad``); classifier
  guidance and Grad-CAM leave it for their gradients.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
import torch.nn as nn

from diffguard_pl.config import RuntimeConfig

AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Runtime:
    """The execution settings, applied to a set of models; ``device`` is fixed while :meth:`running`."""

    def __init__(self, cfg: RuntimeConfig):
        self.cfg = cfg
        self.device: Optional[torch.device] = None  # set while a run is in progress
        self._prepared = False

    def grad_free(self):
        """Context of work without gradients: ``torch.inference_mode`` or ``no_grad``."""
        return torch.inference_mode() if self.cfg.inference_mode else torch.no_grad()

    def autocast(self, device: torch.device):
        """``torch.autocast`` for model forwards; none: no context (an outer one, if any, holds)."""
        dtype = AUTOCAST_DTYPES[self.cfg.autocast]
        return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the models' memory format."""
        if self.cfg.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare(self, modules: Iterable[Optional[nn.Module]], denoiser: nn.Module) -> None:
        """Apply ``channels_last`` to the models and ``compile`` to the denoiser, once."""
        if self._prepared:
            return
        self._prepared = True
        if self.cfg.channels_last:
            for module in modules:
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        if self.cfg.compile and getattr(denoiser, "_compiled_call_impl", None) is None:
            denoiser.compile()  # in place: the same module object, state dict and config

    @contextlib.contextmanager
    def running(self, device: torch.device):
        """Settings that hold while a run is on ``device`` (nested runs keep the outer one's)."""
        outer = self.device
        self.device = device
        before = torch.backends.cudnn.benchmark
        if device.type == "cuda":
            deterministic = torch.are_deterministic_algorithms_enabled()
            torch.backends.cudnn.benchmark = self.cfg.cudnn_benchmark and not deterministic
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = before
            self.device = outer


def ordinary(t: torch.Tensor) -> torch.Tensor:
    """A tensor made under inference mode as an ordinary tensor (usable by autograd and in-place ops)."""
    return t.clone() if t.is_inference() else t
