"""Public functional API of the loss: ``cross_covariance``, ``mean_matching_loss``, ``covmatch_loss``.

``covmatch_loss`` validates its inputs, resolves the backend (``"torch"``, ``"triton"`` or ``"auto"``,
overridable through ``COVMATCH_BACKEND``) and the algebraic form (covariance or Gram; docs/design.md,
*Two algebraic forms*), and returns a 0-dim fp32 tensor whose gradients reach every input that requires grad.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from covmatch.constants import cached_constant

from .forms import choose_form
from .torch_backend import covmatch_loss_torch, cross_covariance_torch, mean_gap_torch
from .triton_backend import (
    EagerFusedLoss,
    EagerSyntheticLoss,
    FusedCall,
    covmatch_loss_triton,
    triton_unavailable_reason,
)
from .validation import check_covmatch_inputs, check_features, check_hyperparameters, check_pair

__all__ = [
    "BACKENDS",
    "FP32_TORCH_MIN_FLOPS",
    "cross_covariance",
    "mean_matching_loss",
    "covmatch_loss",
    "covmatch_loss_with_grads",
    "loss_flops",
    "resolve_backend",
]

BACKENDS = ("auto", "torch", "triton", "hybrid")


def _env_interpreter_flag() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false")


# What a compiled graph sees: torch.compile cannot trace os.environ on every supported torch (2.4 gives up on it).
_INTERPRETER_AT_IMPORT = _env_interpreter_flag()


def _interpreter_on() -> bool:
    if torch.compiler.is_compiling():
        return _INTERPRETER_AT_IMPORT
    return _env_interpreter_flag()


# Under 'auto', exact-fp32 calls of at least this many FLOPs (covariance form, forward + backward) take the torch
# path on CUDA: on an H200 Triton's exact fp32 dot ran at about half of cuBLAS's SGEMM rate (23.5 against 45.9
# TFLOP/s at 128 + 10,000 rows, 4096 x 4096), while below ~2e10 FLOPs both paths are bound by host time and the
# fused one's fewer launches win (benchmarks/results/gpu/loss.csv).
FP32_TORCH_MIN_FLOPS = 2e10
# Under 'auto', half-precision CUDA calls (one dtype for all four inputs, covariance form) of at least this many
# FLOPs take the hybrid path: its four products are cuBLAS GEMMs with fp32 output, the rest the fused kernels'
# epilogues (a bandwidth-bound pass over D and one over each gradient). On an H200 the all-Triton kernels took
# 4.99 ms at 128 + 10,000 rows, 4096 x 4096, bf16 (3.4e11 FLOPs) against a 1.35 ms cuBLAS floor for the same
# four GEMMs, and were host-bound at the paper's shape (3.2e9 FLOPs), where fewer launches win
# (benchmarks/results/gpu/loss.csv); the boundary sits between the two measured shapes.
HYBRID_MIN_FLOPS = 2e10


def loss_flops(n_real: int, n_syn: int, d_img: int, d_txt: int, backward: bool = True) -> float:
    """Algorithmic FLOPs of the covariance form: 2 n d_img d_txt per covariance, forward; 2 x 2 n_S d_img d_txt
    more for the backward to the synthetic features."""
    forward = 2.0 * (n_real + n_syn) * d_img * d_txt
    return forward + (4.0 * n_syn * d_img * d_txt if backward else 0.0)


def resolve_backend(backend: str, device: torch.device, dtypes=(), flops: float = 0.0) -> str:
    """Turn ``backend`` into 'torch' or 'triton' for tensors on ``device``, or raise a clear error.

    'auto' means: ``COVMATCH_BACKEND`` when set, else triton for CUDA tensors when triton imports,
    else torch. fp64 inputs always use the torch reference under 'auto', and so do large exact-fp32 calls
    on CUDA (every input fp32, TF32 off, ``flops`` >= ``FP32_TORCH_MIN_FLOPS``), where cuBLAS is faster;
    large half-precision calls (``flops`` >= ``HYBRID_MIN_FLOPS``, one half dtype) take 'hybrid' (cuBLAS
    products, fused epilogues; covariance form). 'hybrid' needs what 'triton' needs and fp16 or bf16 inputs.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("COVMATCH_BACKEND", "").strip().lower()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"COVMATCH_BACKEND must be one of {BACKENDS}, got {env!r}")
            backend = env
    if backend == "auto":
        if torch.float64 in dtypes:
            return "torch"
        if device.type != "cuda" or triton_unavailable_reason() is not None:
            return "torch"
        exact_fp32 = bool(dtypes) and all(d == torch.float32 for d in dtypes)
        if exact_fp32 and not torch.backends.cuda.matmul.allow_tf32 and flops >= FP32_TORCH_MIN_FLOPS:
            return "torch"
        if _one_half_dtype(dtypes) and flops >= HYBRID_MIN_FLOPS:
            return "hybrid"
        return "triton"
    if backend == "hybrid" and not _one_half_dtype(dtypes):
        raise TypeError(
            "backend='hybrid' takes float16 or bfloat16 features, one dtype for all four; got "
            f"{', '.join(str(d).removeprefix('torch.') for d in dtypes)} (use 'triton' or 'torch')"
        )
    if backend in ("triton", "hybrid"):
        reason = triton_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} needs Triton, which does not import here ({reason})")
        if device.type == "cpu" and not _interpreter_on():
            raise RuntimeError(
                f"backend={backend!r} got CPU tensors: Triton kernels run on CUDA tensors, or on CPU tensors only "
                "under its interpreter (set TRITON_INTERPRET=1 before triton is imported); use backend='torch' "
                "on CPU"
            )
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"backend={backend!r} supports CUDA (or interpreted CPU) tensors, got {device}")
        if torch.float64 in dtypes:
            raise TypeError("backend='triton' supports float32, float16 and bfloat16 inputs; float64 is torch-only")
    return backend


def _one_half_dtype(dtypes) -> bool:
    return bool(dtypes) and dtypes[0] in (torch.float16, torch.bfloat16) and all(d == dtypes[0] for d in dtypes)


def cross_covariance(x: torch.Tensor, y: torch.Tensor, *, unbiased: bool = True) -> torch.Tensor:
    """Centred cross-covariance of paired rows: [n, d_x], [n, d_y] -> [d_x, d_y] in fp32.

    ``unbiased`` divides by n - 1 (needs n >= 2), else by n. fp64 inputs give an fp64 result.
    """
    check_pair("x", x, "y", y, min_rows=2 if unbiased else 1)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return cross_covariance_torch(x, y, unbiased=unbiased)


def mean_matching_loss(real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    """First-moment matching ||mean(real) - mean(syn)||^2 (0-dim fp32) over rows of [n_T, d] and [n_S, d]."""
    check_features("real", real)
    check_features("syn", syn)
    if real.shape[1] != syn.shape[1]:
        raise ValueError(
            f"real and syn must have the same feature dim, got shapes {tuple(real.shape)} and {tuple(syn.shape)}"
        )
    if real.device != syn.device:
        raise ValueError(f"real is on {real.device} but syn is on {syn.device}")
    with torch.autocast(device_type=real.device.type, enabled=False):
        return mean_gap_torch(real, syn)


def covmatch_loss(
    real_img: torch.Tensor,
    real_txt: torch.Tensor,
    syn_img: torch.Tensor,
    syn_txt: torch.Tensor,
    *,
    rho: float = 1.0,
    lam: float = 0.0,
    backend: str = "auto",
    form: str = "auto",
) -> torch.Tensor:
    """CovMatch loss ``||rho*C(real) - C(syn)||_F^2 + lam*(||Δmean_img||^2 + ||Δmean_txt||^2)``.

    Inputs are [n, d] feature matrices (image and text features of the same n pairs per set; n >= 2),
    in fp16, bf16 or fp32 (real and synthetic may differ); accumulation is fp32 and the result a 0-dim
    fp32 tensor. ``backend``: 'torch', 'triton', 'hybrid' (large half-precision shapes: cuBLAS products,
    fused epilogues) or 'auto'. ``form``: 'cov', 'gram' or 'auto' (the cheaper one for this shape; both give
    the same value up to rounding).
    """
    inputs = (real_img, real_txt, syn_img, syn_txt)
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return _traced_loss(inputs, rho, lam, backend, form)
    grad_on = torch.is_grad_enabled()
    try:
        needs = (grad_on and real_img.requires_grad, grad_on and real_txt.requires_grad,
                 grad_on and syn_img.requires_grad, grad_on and syn_txt.requires_grad)  # fmt: skip
    except AttributeError:  # not tensors: the checks say which argument
        check_covmatch_inputs(*inputs)
        raise
    call = _planned_call(inputs, rho, lam, backend, form, needs)
    if torch.autograd._profiler_enabled():  # a named range in profiles (not under torch.compile: checked above)
        with torch.profiler.record_function("covmatch_loss"):
            return call(*inputs)
    return call(*inputs)


def covmatch_loss_with_grads(
    real_img: torch.Tensor,
    real_txt: torch.Tensor,
    syn_img: torch.Tensor,
    syn_txt: torch.Tensor,
    *,
    rho: float = 1.0,
    lam: float = 0.0,
    backend: str = "auto",
    form: str = "auto",
    grad_scale: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, dL/dsyn_img, dL/dsyn_txt)`` without autograd: for callers that apply the feature gradients
    themselves (chunked re-encoding, GradCache-style training). The gradients are multiplied by
    ``grad_scale`` (a 0-dim tensor, read on the device; default 1) and come back in the synthetic inputs'
    dtypes; the loss is as ``covmatch_loss`` returns it, unscaled. Nothing here records an autograd graph.
    """
    check_covmatch_inputs(real_img, real_txt, syn_img, syn_txt)
    inputs = (real_img.detach(), real_txt.detach(), syn_img.detach(), syn_txt.detach())
    call = _planned_call(inputs, rho, lam, backend, form, (False, False, True, True))
    with torch.no_grad():
        if isinstance(call, _FusedEager):
            seed = grad_scale if grad_scale is not None else _one(syn_img.device)
            seed = seed if seed.dtype == torch.float32 else seed.to(torch.float32)
            loss, aux = call.fused.forward(*inputs)
            _, _, grad_img, grad_txt = call.fused.backward(inputs, aux, seed.reshape(()))
            return loss, grad_img, grad_txt
    leaves = (*inputs[:2], inputs[2].requires_grad_(), inputs[3].requires_grad_())
    with torch.enable_grad():
        loss = call(*leaves)
        grad_img, grad_txt = torch.autograd.grad(loss, leaves[2:])
    if grad_scale is not None:
        grad_img, grad_txt = grad_img * grad_scale, grad_txt * grad_scale
    return loss.detach(), grad_img, grad_txt


def _one(device: torch.device) -> torch.Tensor:
    return cached_constant(("one_fp32",), device, lambda: torch.ones((), dtype=torch.float32, device=device))


# ---------------------------------------------------------------------------------------- planned calls
#
# A call signature (shapes, dtypes, devices, which inputs need a gradient, rho, lam, backend, form, the
# COVMATCH_BACKEND and TF32 settings) is validated and resolved once; later calls with the same signature go
# straight to the planned implementation (host cost per call: benchmarks/bench_host.py).


class _TorchCall:
    __slots__ = ("rho", "lam", "form")

    def __init__(self, rho: float, lam: float, form: str) -> None:
        self.rho, self.lam, self.form = rho, lam, form

    def __call__(self, real_img, real_txt, syn_img, syn_txt) -> torch.Tensor:
        return covmatch_loss_torch(real_img, real_txt, syn_img, syn_txt, self.rho, self.lam, self.form)


class _FusedEager:
    __slots__ = ("fused", "function")

    def __init__(self, fused: FusedCall) -> None:
        self.fused = fused
        needs = fused.needs
        self.function = None
        if needs[2] or needs[3]:
            self.function = EagerSyntheticLoss if not (needs[0] or needs[1]) else EagerFusedLoss
        elif needs[0] or needs[1]:
            self.function = EagerFusedLoss

    def __call__(self, real_img, real_txt, syn_img, syn_txt) -> torch.Tensor:
        function = self.function
        if function is EagerSyntheticLoss:
            return function.apply(self.fused, (real_img, real_txt), syn_img, syn_txt)
        if function is EagerFusedLoss:
            return function.apply(self.fused, real_img, real_txt, syn_img, syn_txt)
        return self.fused.forward(real_img, real_txt, syn_img, syn_txt)[0]


_CALLS: Dict[tuple, object] = {}
_MAX_CALLS = 1024


def _planned_call(inputs, rho, lam, backend: str, form: str, needs):
    """The implementation for this call signature: made (inputs validated, backend and form resolved) on the
    signature's first call, looked up after."""
    try:
        real_img, real_txt, syn_img, syn_txt = inputs
        key = (real_img.shape, real_txt.shape, syn_img.shape, syn_txt.shape,
               real_img.dtype, real_txt.dtype, syn_img.dtype, syn_txt.dtype,
               real_img.device, real_txt.device, syn_img.device, syn_txt.device,
               needs, rho, lam, rho.__class__, lam.__class__, backend, form,
               os.environ.get("COVMATCH_BACKEND") if backend == "auto" else None,
               torch.backends.cuda.matmul.allow_tf32)  # fmt: skip
        call = _CALLS.get(key)
    except (AttributeError, TypeError):  # not tensors, or unhashable arguments: the checks below say which
        key, call = None, None
    if call is None:
        call = _make_call(inputs, rho, lam, backend, form, needs)
        if key is not None:
            if len(_CALLS) >= _MAX_CALLS:
                _CALLS.clear()
            _CALLS[key] = call
    return call


def _make_call(inputs, rho, lam, backend: str, form: str, needs):
    resolved, resolved_form = _checked_resolution(inputs, rho, lam, backend, form)
    if resolved in ("triton", "hybrid"):
        return _FusedEager(FusedCall(inputs, float(rho), float(lam), resolved_form, needs))
    return _TorchCall(rho, lam, resolved_form)


def _checked_resolution(inputs, rho, lam, backend: str, form: str):
    """Inputs and hyperparameters checked (one clear error), then (backend, form) resolved for them."""
    n_real, n_syn, d_img, d_txt = check_covmatch_inputs(*inputs)
    check_hyperparameters(rho, lam)
    dtypes = tuple(t.dtype for t in inputs)
    return _resolve(inputs, backend, form, dtypes, n_real, n_syn, d_img, d_txt)


def _resolve(inputs, backend: str, form: str, dtypes, n_real: int, n_syn: int, d_img: int, d_txt: int):
    """(backend, form): 'hybrid' runs the covariance form as form 'hybrid'; 'auto' picks it only where the
    covariance form is the cheaper one."""
    resolved_form = choose_form(form, n_real, n_syn, d_img, d_txt)
    resolved = resolve_backend(backend, inputs[0].device, dtypes, loss_flops(n_real, n_syn, d_img, d_txt))
    if resolved == "hybrid":
        if backend == "hybrid" and form == "gram":
            raise ValueError("backend='hybrid' is the covariance form: pass form='cov' or 'auto', not 'gram'")
        if resolved_form == "gram":  # 'auto' at a shape where the Gram form is cheaper: the fused Gram kernels
            return "triton", resolved_form
        return "hybrid", "hybrid"
    return resolved, resolved_form


def _traced_loss(inputs, rho, lam, backend: str, form: str) -> torch.Tensor:
    """The loss under torch.compile tracing or a torch.func transform: the library op (or the torch formula)."""
    resolved, resolved_form = _checked_resolution(inputs, rho, lam, backend, form)
    impl = covmatch_loss_triton if resolved in ("triton", "hybrid") else covmatch_loss_torch
    return impl(*inputs, rho, lam, resolved_form)
