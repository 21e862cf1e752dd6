"""Mixed precision behind one seam: the autocast context of a run, the SGD it steps, and an optimiser step under
dynamic loss scaling that is one call (scale, unscale, agree on an overflow across ranks, step or skip, update)."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, List, Optional

import torch

from .distributed import Ranks

__all__ = ["AMP_DTYPES", "autocast_for", "sgd", "ScaledStep"]

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# where torch has a fused SGD kernel (CPU from torch 2.4 on); elsewhere the multi-tensor foreach step
FUSED_SGD_DEVICES = ("cuda", "cpu")


def autocast_for(device: torch.device, precision: str) -> Callable[[], ContextManager]:
    """A factory of the autocast context ``precision`` ('fp32', 'fp16', 'bf16') asks for on ``device``."""
    dtype = AMP_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def sgd(groups: List[dict], device: torch.device, *, lr: float, momentum: float) -> torch.optim.SGD:
    """SGD whose step is one fused kernel on ``device`` where torch has one: under fp16 loss scaling the
    GradScaler then hands it the overflow flag and it skips on the device, where the foreach step reads the
    flag on the host (a sync per step). Momentum buffers start at zero, made just before the first step (with
    no dampening the same first step as from none): a fused first step skipped for an overflow would leave
    them uninitialised."""
    if device.type not in FUSED_SGD_DEVICES:
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, foreach=True)
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=True)
    if momentum:
        optimizer.register_step_pre_hook(_zero_momentum_where_missing)
    return optimizer


def _zero_momentum_where_missing(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """A step pre-hook: zero momentum buffers where there are none (they come and go together: made here,
    loaded with a state dict, or, once made, kept)."""
    state = optimizer.state
    if "momentum_buffer" in state.get(optimizer.param_groups[0]["params"][0], {}):
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            if "momentum_buffer" not in state[param]:
                state[param]["momentum_buffer"] = torch.zeros_like(param)


class ScaledStep:
    """``optimizer.step()`` under fp16 dynamic loss scaling (a ``torch.amp.GradScaler``), or plainly otherwise.

    ``loss_scale()`` is the factor to multiply the loss by before backward (None without scaling); calling
    the object unscales the gradients, skips the step on every rank when any rank's gradient overflowed
    (and halves the scale), and returns 1.0 for a skipped step, 0.0 otherwise, as a device tensor (no host
    sync).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, *, enabled: bool, ranks: Ranks):
        self.optimizer = optimizer
        self.device = device
        self.ranks = ranks
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled)

    @property
    def enabled(self) -> bool:
        return self.scaler.is_enabled()

    def loss_scale(self) -> Optional[torch.Tensor]:
        if not self.enabled:
            return None
        return self.scaler.scale(torch.ones((), device=self.device))  # also initialises the scale

    def __call__(self, clip_norm: float = 0.0, rescale: Optional[Callable[[], None]] = None) -> torch.Tensor:
        """``rescale``, if given, changes the unscaled (and clipped) gradients in place just before the step."""
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not self.enabled:
            if clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, clip_norm)
            if rescale is not None:
                rescale()
            self.optimizer.step()
            return torch.zeros((), device=self.device)
        overflow = self._overflow_on_any_rank(params)
        self.scaler.unscale_(self.optimizer)  # records the (now shared) overflow; the step below skips on it
        if clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        if rescale is not None:
            rescale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return overflow

    def _overflow_on_any_rank(self, params) -> torch.Tensor:
        """1.0 when a gradient on any rank is NaN or infinite; a rank that saw none then poisons its own
        gradients, so that every rank's scaler skips the step and halves its scale alike."""
        local = torch.zeros((), device=self.device)
        for p in params:
            local = torch.maximum(local, (~torch.isfinite(p.grad)).any().float())
        if not self.ranks.distributed:
            return local
        overflow = local.clone()
        self.ranks.all_reduce_max_(overflow)
        poison = torch.where(overflow > local, torch.full_like(overflow, float("nan")), torch.ones_like(overflow))
        for p in params:
            p.grad.mul_(poison.to(p.grad.dtype))
        return overflow

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)
