"""Covariance-form CovMatch kernels (docs/design.md, *Gradients*): cost ~ n * d_x * d_y.

Forward: one pass over the rows of the real and the synthetic pair accumulates, per (d_x, d_y) tile,
the uncentred products and column sums in fp32, centres them with a rank-one correction, forms
``D = rho * C_T - C_S`` and reduces ``sum(D**2)`` for the tile. ``C_S`` never reaches global memory;
``D`` is written only when a gradient is needed (it is the one d_x x d_y matrix kept for backward).
The first moments (column means) and the mean-matching term come out of the same pass.

Backward: ``dL/dX = alpha * (Y - 1 mu_Y^T) D^T + 1 beta^T`` (and the same for Y with ``D``), one tiled
GEMM with the centring applied on load and the mean-term gradient ``beta`` added in the epilogue.

Numerical note: fp32 rows are shifted by the first row of each matrix before accumulation (the classic
shifted one-pass algorithm), so the rank-one correction acts on ``mean - x_0`` instead of ``mean`` and
does not cancel catastrophically when features have a large mean. Half-precision rows multiply
exactly into the fp32 accumulator unshifted (see ``_shifted_cross_product``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import (
    TileConfig,
    candidate_configs,
    cdiv,
    dot_operand_dtype,
    fp32_dot_precision,
    pick_config,
)

__all__ = ["CovarianceForward", "covariance_forward", "centred_matmul"]


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _shifted_cross_product(
    x_ptr,
    y_ptr,
    n_rows,
    stride_xn,
    stride_xd,
    stride_yn,
    stride_yd,
    offs_m,
    offs_n,
    mask_m,
    mask_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """For one output tile: sum_i (x_i - x_0)(y_i - y_0)^T and the shifted column sums, in fp32.

    fp32 operands are shifted by the first row before the product. Half-precision operands are not:
    rounding the shifted values back to 16 bits would cost more accuracy (2^-11 per element) than the
    fp32 accumulation of their exact products loses to the rank-one correction, so x_0 = y_0 = 0 there.
    """
    SHIFT: tl.constexpr = DOT_DTYPE == tl.float32
    if SHIFT:
        x0 = tl.load(x_ptr + offs_m * stride_xd, mask=mask_m, other=0.0).to(tl.float32)
        y0 = tl.load(y_ptr + offs_n * stride_yd, mask=mask_n, other=0.0).to(tl.float32)
    else:
        x0 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        y0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sum_x = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum_y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for start in range(0, n_rows, BLOCK_K):
        rows = start + offs_k
        mask_k = rows < n_rows
        # X^T tile [BLOCK_M, BLOCK_K] and Y tile [BLOCK_K, BLOCK_N]
        xt = tl.load(
            x_ptr + offs_m[:, None] * stride_xd + rows[None, :] * stride_xn,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        y = tl.load(
            y_ptr + rows[:, None] * stride_yn + offs_n[None, :] * stride_yd,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        if SHIFT:
            xt = tl.where(mask_k[None, :], xt.to(tl.float32) - x0[:, None], 0.0)
            y = tl.where(mask_k[:, None], y.to(tl.float32) - y0[None, :], 0.0)
        sum_x += tl.sum(xt.to(tl.float32), axis=1)
        sum_y += tl.sum(y.to(tl.float32), axis=0)
        acc = tl.dot(xt.to(DOT_DTYPE), y.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return acc, sum_x, sum_y, x0, y0


@triton.jit
def _covmatch_cov_fwd_kernel(
    xr_ptr,
    yr_ptr,
    xs_ptr,
    ys_ptr,
    diff_ptr,
    mean_x_ptr,
    mean_y_ptr,
    partial_ptr,
    n_real,
    n_syn,
    dim_x,
    dim_y,
    stride_xr_n,
    stride_xr_d,
    stride_yr_n,
    stride_yr_d,
    stride_xs_n,
    stride_xs_d,
    stride_ys_n,
    stride_ys_d,
    stride_diff_m,
    stride_diff_n,
    rho,
    STORE_DIFF: tl.constexpr,
    REAL_DOT: tl.constexpr,
    SYN_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < dim_x
    mask_n = offs_n < dim_y

    acc_r, sxr, syr, xr0, yr0 = _shifted_cross_product(
        xr_ptr, yr_ptr, n_real, stride_xr_n, stride_xr_d, stride_yr_n, stride_yr_d,
        offs_m, offs_n, mask_m, mask_n, BLOCK_M, BLOCK_N, BLOCK_K, REAL_DOT, PRECISION,
    )  # fmt: skip
    acc_s, sxs, sys_, xs0, ys0 = _shifted_cross_product(
        xs_ptr, ys_ptr, n_syn, stride_xs_n, stride_xs_d, stride_ys_n, stride_ys_d,
        offs_m, offs_n, mask_m, mask_n, BLOCK_M, BLOCK_N, BLOCK_K, SYN_DOT, PRECISION,
    )  # fmt: skip

    # Unbiased centred covariances via the rank-one correction: (acc - s_x s_y^T / n) / (n - 1).
    n_real_f = n_real.to(tl.float32)
    n_syn_f = n_syn.to(tl.float32)
    cov_r = (acc_r - sxr[:, None] * syr[None, :] / n_real_f) / (n_real_f - 1.0)
    cov_s = (acc_s - sxs[:, None] * sys_[None, :] / n_syn_f) / (n_syn_f - 1.0)
    tile_mask = mask_m[:, None] & mask_n[None, :]
    diff = tl.where(tile_mask, rho * cov_r - cov_s, 0.0)

    # per-tile partial sums: the covariance term in row 0 of the [2, tiles] buffer, the mean term in row 1
    tile = pid_m * tl.num_programs(1) + pid_n
    n_tiles = tl.num_programs(0) * tl.num_programs(1)
    tl.store(partial_ptr + tile, tl.sum(tl.sum(diff * diff, axis=1), axis=0))
    if STORE_DIFF:
        tl.store(diff_ptr + offs_m[:, None] * stride_diff_m + offs_n[None, :] * stride_diff_n, diff, mask=tile_mask)

    # First moments. Column m of X is covered by every tile of row-block pid_m; the tiles of column-block 0
    # own it (and likewise row-block 0 owns the columns of Y), so each mean is written and counted once.
    mean_xr = xr0 + sxr / n_real_f
    mean_xs = xs0 + sxs / n_syn_f
    mean_yr = yr0 + syr / n_real_f
    mean_ys = ys0 + sys_ / n_syn_f
    own_x = pid_n == 0
    own_y = pid_m == 0
    tl.store(mean_x_ptr + offs_m, mean_xr, mask=mask_m & own_x)
    tl.store(mean_x_ptr + dim_x + offs_m, mean_xs, mask=mask_m & own_x)
    tl.store(mean_y_ptr + offs_n, mean_yr, mask=mask_n & own_y)
    tl.store(mean_y_ptr + dim_y + offs_n, mean_ys, mask=mask_n & own_y)
    gap_x = tl.where(mask_m, mean_xr - mean_xs, 0.0)
    gap_y = tl.where(mask_n, mean_yr - mean_ys, 0.0)
    mean_part = tl.where(own_x, tl.sum(gap_x * gap_x, axis=0), 0.0) + tl.where(
        own_y, tl.sum(gap_y * gap_y, axis=0), 0.0
    )
    tl.store(partial_ptr + n_tiles + tile, mean_part)


@triton.jit
def _centred_matmul_kernel(
    a_ptr,
    mean_ptr,
    b_ptr,
    bias_ptr,
    grad_ptr,
    out_ptr,
    n_rows,
    n_inner,
    n_cols,
    stride_an,
    stride_ak,
    stride_bk,
    stride_bc,
    stride_on,
    stride_oc,
    alpha,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out = g * (alpha * (A - 1 mean^T) @ B + 1 bias^T), g the incoming scalar gradient (read on device)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = rows < n_rows
    mask_c = cols < n_cols
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, n_inner, BLOCK_K):
        ks = start + offs_k
        mask_k = ks < n_inner
        a = tl.load(
            a_ptr + rows[:, None] * stride_an + ks[None, :] * stride_ak,
            mask=mask_r[:, None] & mask_k[None, :],
            other=0.0,
        ).to(tl.float32)
        mu = tl.load(mean_ptr + ks, mask=mask_k, other=0.0)
        a = tl.where(mask_r[:, None] & mask_k[None, :], a - mu[None, :], 0.0)
        b = tl.load(
            b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bc,
            mask=mask_k[:, None] & mask_c[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    bias = tl.load(bias_ptr + cols, mask=mask_c, other=0.0)
    g = tl.load(grad_ptr).to(tl.float32)
    out = g * (alpha * acc + bias[None, :])
    tl.store(
        out_ptr + rows[:, None] * stride_on + cols[None, :] * stride_oc,
        out.to(out_ptr.dtype.element_ty),
        mask=mask_r[:, None] & mask_c[None, :],
    )


# --------------------------------------------------------------------------------------------------
# Tile configurations
# --------------------------------------------------------------------------------------------------

_FWD_CONFIGS = (
    TileConfig(64, 64, 32, num_warps=4, num_stages=3),
    TileConfig(128, 64, 32, num_warps=4, num_stages=3),
    TileConfig(128, 128, 32, num_warps=8, num_stages=3),
    TileConfig(64, 128, 64, num_warps=4, num_stages=3),
)
_GEMM_CONFIGS = (
    TileConfig(64, 64, 32, num_warps=4, num_stages=3),
    TileConfig(128, 64, 32, num_warps=4, num_stages=3),
    TileConfig(64, 128, 32, num_warps=4, num_stages=3),
    TileConfig(128, 128, 32, num_warps=8, num_stages=3),
)
# The interpreter runs one program after another in numpy: big tiles mean few programs.
_INTERPRETER_CONFIG = TileConfig(64, 64, 32, num_warps=4, num_stages=1)


# --------------------------------------------------------------------------------------------------
# Host functions
# --------------------------------------------------------------------------------------------------


@dataclass
class CovarianceForward:
    """What the covariance-form forward produces.

    ``cov_loss`` = ||D||_F^2 and ``mean_loss`` = ||mu_xr - mu_xs||^2 + ||mu_yr - mu_ys||^2 (0-dim fp32);
    ``diff`` = D (fp32 [d_x, d_y], or None when not requested); ``mean_x`` [2, d_x] and ``mean_y``
    [2, d_y] hold the real (row 0) and synthetic (row 1) column means in fp32.
    """

    cov_loss: torch.Tensor
    mean_loss: torch.Tensor
    diff: Optional[torch.Tensor]
    mean_x: torch.Tensor
    mean_y: torch.Tensor


def covariance_forward(
    real_x: torch.Tensor,
    real_y: torch.Tensor,
    syn_x: torch.Tensor,
    syn_y: torch.Tensor,
    rho: float,
    store_diff: bool,
) -> CovarianceForward:
    """Fused forward of ||rho*C(real) - C(syn)||_F^2 and the mean gap; inputs are validated 2-D tensors."""
    n_real, dim_x = real_x.shape
    n_syn, dim_y = syn_y.shape
    device = real_x.device
    real_dot = dot_operand_dtype(real_x.dtype, real_y.dtype)
    syn_dot = dot_operand_dtype(syn_x.dtype, syn_y.dtype)
    precision = fp32_dot_precision()

    def launch(config: TileConfig) -> CovarianceForward:
        grid = (cdiv(dim_x, config.block_m), cdiv(dim_y, config.block_n))
        tiles = grid[0] * grid[1]
        diff = torch.empty((dim_x, dim_y), dtype=torch.float32, device=device) if store_diff else None
        mean_x = torch.empty((2, dim_x), dtype=torch.float32, device=device)
        mean_y = torch.empty((2, dim_y), dtype=torch.float32, device=device)
        partials = torch.empty((2, tiles), dtype=torch.float32, device=device)
        diff_arg = diff if diff is not None else partials  # never written when STORE_DIFF is False
        _covmatch_cov_fwd_kernel[grid](
            real_x, real_y, syn_x, syn_y,
            diff_arg, mean_x, mean_y, partials,
            n_real, n_syn, dim_x, dim_y,
            *real_x.stride(), *real_y.stride(), *syn_x.stride(), *syn_y.stride(),
            *(diff.stride() if diff is not None else (0, 0)),
            float(rho),
            STORE_DIFF=store_diff, REAL_DOT=real_dot, SYN_DOT=syn_dot, PRECISION=precision,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
        # Deterministic reduction of the per-tile partials (no float atomics).
        cov_loss, mean_loss = partials.sum(dim=1).unbind()
        return CovarianceForward(cov_loss, mean_loss, diff, mean_x, mean_y)

    key = (n_real, n_syn, dim_x, dim_y, real_x.dtype, real_y.dtype, syn_x.dtype, syn_y.dtype, store_diff)
    config = pick_config("covmatch_cov_fwd", key, candidate_configs(_INTERPRETER_CONFIG, _FWD_CONFIGS), launch)
    return launch(config)


def centred_matmul(
    a: torch.Tensor,
    a_mean: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor,
    grad_scale: torch.Tensor,
    alpha: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``grad_scale * (alpha * (a - 1 a_mean^T) @ b + 1 bias^T)`` as a new [n, m] tensor of ``out_dtype``.

    ``a`` [n, k] any float dtype, ``a_mean`` [k] fp32, ``b`` [k, m] fp32 (any strides, e.g. a transposed
    view of D), ``bias`` [m] fp32, ``grad_scale`` a 0-dim tensor read on the device (no host sync).
    """
    n_rows, n_inner = a.shape
    n_cols = b.shape[1]
    out = torch.empty((n_rows, n_cols), dtype=out_dtype, device=a.device)
    precision = fp32_dot_precision()

    def launch(config: TileConfig) -> torch.Tensor:
        grid = (cdiv(n_rows, config.block_m), cdiv(n_cols, config.block_n))
        _centred_matmul_kernel[grid](
            a, a_mean, b, bias, grad_scale, out,
            n_rows, n_inner, n_cols,
            *a.stride(), *b.stride(), *out.stride(),
            float(alpha),
            PRECISION=precision,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
        return out

    key = (n_rows, n_inner, n_cols, a.dtype, out_dtype, b.stride(0) == 1)
    config = pick_config("covmatch_centred_matmul", key, candidate_configs(_INTERPRETER_CONFIG, _GEMM_CONFIGS), launch)
    return launch(config)
