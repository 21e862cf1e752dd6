"""Public functional API of the loss: ``cross_covariance``, ``mean_matching_loss``, ``covmatch_loss``.

``covmatch_loss`` validates its inputs, resolves the backend (``"torch"``, ``"triton"`` or ``"auto"``,
overridable through ``COVMATCH_BACKEND``) and the algebraic form (covariance or Gram; docs/design.md,
*Two algebraic forms*), and returns a 0-dim fp32 tensor whose gradients reach every input that requires grad.
"""

from __future__ import annotations

import os

import torch

from .forms import choose_form
from .torch_backend import covmatch_loss_torch, cross_covariance_torch, mean_gap_torch
from .triton_backend import covmatch_loss_triton, triton_unavailable_reason
from .validation import check_covmatch_inputs, check_features, check_hyperparameters, check_pair

__all__ = [
    "BACKENDS",
    "FP32_TORCH_MIN_FLOPS",
    "cross_covariance",
    "mean_matching_loss",
    "covmatch_loss",
    "loss_flops",
    "resolve_backend",
]

BACKENDS = ("auto", "torch", "triton")


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false")


# Under 'auto', exact-fp32 calls of at least this many FLOPs (covariance form, forward + backward) take the torch
# path on CUDA: on an H200 Triton's exact fp32 dot ran at about half of cuBLAS's SGEMM rate (23.5 against 45.9
# TFLOP/s at 128 + 10,000 rows, 4096 x 4096), while below ~2e10 FLOPs both paths are bound by host time and the
# fused one's fewer launches win (benchmarks/results/gpu/loss.csv).
FP32_TORCH_MIN_FLOPS = 2e10


def loss_flops(n_real: int, n_syn: int, d_img: int, d_txt: int, backward: bool = True) -> float:
    """Algorithmic FLOPs of the covariance form: 2 n d_img d_txt per covariance, forward; 2 x 2 n_S d_img d_txt
    more for the backward to the synthetic features."""
    forward = 2.0 * (n_real + n_syn) * d_img * d_txt
    return forward + (4.0 * n_syn * d_img * d_txt if backward else 0.0)


def resolve_backend(backend: str, device: torch.device, dtypes=(), flops: float = 0.0) -> str:
    """Turn ``backend`` into 'torch' or 'triton' for tensors on ``device``, or raise a clear error.

    'auto' means: ``COVMATCH_BACKEND`` when set, else triton for CUDA tensors when triton imports,
    else torch. fp64 inputs always use the torch reference under 'auto', and so do large exact-fp32 calls
    on CUDA (every input fp32, TF32 off, ``flops`` >= ``FP32_TORCH_MIN_FLOPS``), where cuBLAS is faster.
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
        return "triton"
    if backend == "triton":
        reason = triton_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"backend='triton' needs Triton, which does not import here ({reason})")
        if device.type == "cpu" and not _interpreter_on():
            raise RuntimeError(
                "backend='triton' got CPU tensors: Triton kernels run on CUDA tensors, or on CPU tensors only "
                "under its interpreter (set TRITON_INTERPRET=1 before triton is imported); use backend='torch' "
                "on CPU"
            )
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"backend='triton' supports CUDA (or interpreted CPU) tensors, got {device}")
        if torch.float64 in dtypes:
            raise TypeError("backend='triton' supports float32, float16 and bfloat16 inputs; float64 is torch-only")
    return backend


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


def _name_in_profiles() -> bool:
    """Whether to mark the call with ``record_function``: while a profiler records (so that profiles name
    it), in eager mode (under torch.compile the marker would be dropped, with a warning)."""
    return not torch.compiler.is_compiling() and torch.autograd._profiler_enabled()


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
    fp32 tensor. ``backend``: 'torch', 'triton' or 'auto'. ``form``: 'cov', 'gram' or 'auto' (the
    cheaper one for this shape; both give the same value up to rounding).
    """
    n_real, n_syn, d_img, d_txt = check_covmatch_inputs(real_img, real_txt, syn_img, syn_txt)
    check_hyperparameters(rho, lam)
    dtypes = (real_img.dtype, real_txt.dtype, syn_img.dtype, syn_txt.dtype)
    resolved = resolve_backend(backend, real_img.device, dtypes, loss_flops(n_real, n_syn, d_img, d_txt))
    resolved_form = choose_form(form, n_real, n_syn, d_img, d_txt)
    impl = covmatch_loss_triton if resolved == "triton" else covmatch_loss_torch
    if _name_in_profiles():
        with torch.profiler.record_function("covmatch_loss"):
            return impl(real_img, real_txt, syn_img, syn_txt, rho, lam, resolved_form)
    return impl(real_img, real_txt, syn_img, syn_txt, rho, lam, resolved_form)
