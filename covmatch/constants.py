"""Small constant tensors the loss needs on every call (Gram row weights, the Gram kernel's tile pairs, a
zero bias row), made once per key and device instead of on every call (a tensor built on the host would also
cost a blocking host-to-device copy each time)."""

from __future__ import annotations

from typing import Callable, Dict, Hashable

import torch

__all__ = ["cached_constant"]

_CONSTANTS: Dict[Hashable, torch.Tensor] = {}
_MAX_CONSTANTS = 256


def cached_constant(key: Hashable, device: torch.device, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()`` for ``key`` on ``device``, made once and reused (callers must not modify it in place).

    Made outside inference mode (so that autograd may save it later) and never cached while a CUDA graph is
    being captured (the capture records ``make``'s kernels without running them)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return make()
    full_key = (key, device)
    tensor = _CONSTANTS.get(full_key)
    if tensor is None:
        with torch.inference_mode(False), torch.no_grad():
            tensor = make()
        if len(_CONSTANTS) >= _MAX_CONSTANTS:
            _CONSTANTS.clear()
        _CONSTANTS[full_key] = tensor
    return tensor
