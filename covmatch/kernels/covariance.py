"""Covariance-form CovMatch kernels (docs/design.md, *Gradients*): cost ~ n * d_x * d_y.

One forward + backward of the loss is four launches, the algebra as plain GEMMs:

1. ``_column_means_kernel``: the column means of the four feature matrices (fp32) and, per column block,
   the mean term's partial sums, once.
2. ``_cov_diff_kernel``: per (d_x, d_y) tile, ``D = rho * C_T - C_S`` in one fp32 accumulator: the real
   product ``X_T^T Y_T`` and then the synthetic one ``X_S^T Y_S`` go into the same accumulator (rescaled in
   between), and the centring is a rank-one correction in the epilogue, so half-precision operands go from
   memory straight to the tensor cores. ``D`` is stored (for backward) in the inputs' half dtype, or fp32;
   the tile's ``sum(D**2)`` goes to a partials buffer.
3. ``_finish_kernel``: one program reduces the partials in a fixed order (deterministic, no atomics) into
   the loss, the covariance term and the mean term.
4. ``_cov_grad_kernel``: both gradients of one side in one launch, ``dL/dX = alpha (Y - 1 mu_Y^T) D^T +
   1 beta^T`` over the first tiles of its grid and ``dL/dY = alpha (X - 1 mu_X^T) D + 1 beta^T`` over the
   rest: a GEMM on the tensor cores with the centring (``mu^T D``) and the mean-term row ``beta`` in the
   epilogue.

fp32 operands are centred on load instead (``CENTRE_ON_LOAD``): the two-pass covariance, exact to fp32
rounding whatever the features' mean, with ``tl.dot`` in TF32 exactly when PyTorch's matmul setting allows
it. Half-precision operands multiply exactly into the fp32 accumulator, so their rank-one correction loses
only fp32 rounding (about 2^-24 |mu|^2 / sigma^2 relative). Row offsets are 64-bit: n * d may exceed 2^31.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import (
    TileConfig,
    bench,
    cdiv,
    choose_config,
    dot_operand_dtype,
    fp32_dot_precision,
    interpreter_enabled,
    launch_kernel,
    sm_count,
)

__all__ = ["CovarianceForward", "covariance_forward", "covariance_grads"]


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _column_sums(ptr, n_rows, cols, mask_c, stride_n, stride_d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 column sums of rows 0..n_rows of one matrix, over the columns ``cols``."""
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    offs_r = tl.arange(0, BLOCK_R)
    for start in range(0, n_rows, BLOCK_R):
        rows = (start + offs_r).to(tl.int64)
        mask_r = rows < n_rows
        tile = tl.load(
            ptr + rows[:, None] * stride_n + cols[None, :] * stride_d,
            mask=mask_r[:, None] & mask_c[None, :],
            other=0.0,
        )
        acc += tl.sum(tile.to(tl.float32), axis=0)
    return acc


@triton.jit
def _column_means_kernel(
    xr_ptr, yr_ptr, xs_ptr, ys_ptr,
    mean_x_ptr, mean_y_ptr, partial_ptr,
    n_real, n_syn, dim_x, dim_y,
    stride_xr_n, stride_xr_d, stride_yr_n, stride_yr_d,
    stride_xs_n, stride_xs_d, stride_ys_n, stride_ys_d,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (b, 0): columns block b of the images, (b, 1): of the captions. Writes the real (row 0) and
    synthetic (row 1) means and this block's share of ||mu_T - mu_S||^2 into ``partial[modality, b]``."""
    block = tl.program_id(0)
    modality = tl.program_id(1)
    cols = block * BLOCK_D + tl.arange(0, BLOCK_D)
    if modality == 0:
        mask_c = cols < dim_x
        mean_r = _column_sums(xr_ptr, n_real, cols, mask_c, stride_xr_n, stride_xr_d, BLOCK_R, BLOCK_D) / n_real
        mean_s = _column_sums(xs_ptr, n_syn, cols, mask_c, stride_xs_n, stride_xs_d, BLOCK_R, BLOCK_D) / n_syn
        tl.store(mean_x_ptr + cols, mean_r, mask=mask_c)
        tl.store(mean_x_ptr + dim_x + cols, mean_s, mask=mask_c)
    else:
        mask_c = cols < dim_y
        mean_r = _column_sums(yr_ptr, n_real, cols, mask_c, stride_yr_n, stride_yr_d, BLOCK_R, BLOCK_D) / n_real
        mean_s = _column_sums(ys_ptr, n_syn, cols, mask_c, stride_ys_n, stride_ys_d, BLOCK_R, BLOCK_D) / n_syn
        tl.store(mean_y_ptr + cols, mean_r, mask=mask_c)
        tl.store(mean_y_ptr + dim_y + cols, mean_s, mask=mask_c)
    gap = tl.where(mask_c, mean_r - mean_s, 0.0)
    tl.store(partial_ptr + modality * tl.num_programs(0) + block, tl.sum(gap * gap, axis=0))


@triton.jit
def _accumulate_product(
    acc, x_ptr, y_ptr, mean_x_ptr, mean_y_ptr, n_rows, stride_xn, stride_xd, stride_yn, stride_yd,
    offs_m, offs_n, mask_m, mask_n,
    CENTRE_ON_LOAD: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """acc += X^T Y over rows 0..n_rows for one output tile (centred on load when CENTRE_ON_LOAD)."""
    if CENTRE_ON_LOAD:
        mu_x = tl.load(mean_x_ptr + offs_m, mask=mask_m, other=0.0)
        mu_y = tl.load(mean_y_ptr + offs_n, mask=mask_n, other=0.0)
    offs_k = tl.arange(0, BLOCK_K)
    for start in range(0, n_rows, BLOCK_K):
        rows = (start + offs_k).to(tl.int64)
        mask_k = rows < n_rows
        xt = tl.load(  # X^T tile [BLOCK_M, BLOCK_K]
            x_ptr + offs_m[:, None] * stride_xd + rows[None, :] * stride_xn,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        y = tl.load(  # Y tile [BLOCK_K, BLOCK_N]
            y_ptr + rows[:, None] * stride_yn + offs_n[None, :] * stride_yd,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        if CENTRE_ON_LOAD:
            xt = tl.where(mask_k[None, :], xt.to(tl.float32) - mu_x[:, None], 0.0)
            y = tl.where(mask_k[:, None], y.to(tl.float32) - mu_y[None, :], 0.0)
        acc = tl.dot(xt.to(DOT_DTYPE), y.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _cov_diff_kernel(
    xr_ptr, yr_ptr, xs_ptr, ys_ptr, mean_x_ptr, mean_y_ptr, diff_ptr, partial_ptr,
    n_real, n_syn, dim_x, dim_y,
    stride_xr_n, stride_xr_d, stride_yr_n, stride_yr_d,
    stride_xs_n, stride_xs_d, stride_ys_n, stride_ys_d,
    stride_diff_m, stride_diff_n,
    rho,
    STORE_DIFF: tl.constexpr, REAL_CENTRE: tl.constexpr, SYN_CENTRE: tl.constexpr,
    REAL_DOT: tl.constexpr, SYN_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < dim_x
    mask_n = offs_n < dim_y
    n_real_f = n_real.to(tl.float32)
    n_syn_f = n_syn.to(tl.float32)
    c_real = rho / (n_real_f - 1.0)
    c_syn = 1.0 / (n_syn_f - 1.0)

    # One accumulator: X_T^T Y_T, rescaled by -c_real / c_syn, plus X_S^T Y_S, times -c_syn, is
    # c_real X_T^T Y_T - c_syn X_S^T Y_S.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate_product(
        acc, xr_ptr, yr_ptr, mean_x_ptr, mean_y_ptr, n_real, stride_xr_n, stride_xr_d, stride_yr_n, stride_yr_d,
        offs_m, offs_n, mask_m, mask_n, REAL_CENTRE, REAL_DOT, PRECISION, BLOCK_K,
    )  # fmt: skip
    acc = acc * (-c_real / c_syn)
    acc = _accumulate_product(
        acc, xs_ptr, ys_ptr, mean_x_ptr + dim_x, mean_y_ptr + dim_y, n_syn,
        stride_xs_n, stride_xs_d, stride_ys_n, stride_ys_d,
        offs_m, offs_n, mask_m, mask_n, SYN_CENTRE, SYN_DOT, PRECISION, BLOCK_K,
    )  # fmt: skip
    diff = acc * (-c_syn)

    # Centring of uncentred (half-precision) products: sum (x - mu)(y - mu)^T = sum x y^T - n mu_x mu_y^T.
    if not REAL_CENTRE:
        mu_xr = tl.load(mean_x_ptr + offs_m, mask=mask_m, other=0.0)
        mu_yr = tl.load(mean_y_ptr + offs_n, mask=mask_n, other=0.0)
        diff -= (c_real * n_real_f) * mu_xr[:, None] * mu_yr[None, :]
    if not SYN_CENTRE:
        mu_xs = tl.load(mean_x_ptr + dim_x + offs_m, mask=mask_m, other=0.0)
        mu_ys = tl.load(mean_y_ptr + dim_y + offs_n, mask=mask_n, other=0.0)
        diff += (c_syn * n_syn_f) * mu_xs[:, None] * mu_ys[None, :]

    tile_mask = mask_m[:, None] & mask_n[None, :]
    diff = tl.where(tile_mask, diff, 0.0)
    tl.store(partial_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(diff * diff, axis=1), axis=0))
    if STORE_DIFF:
        offs = offs_m.to(tl.int64)[:, None] * stride_diff_m + offs_n[None, :] * stride_diff_n
        tl.store(diff_ptr + offs, diff.to(diff_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _finish_kernel(partial_ptr, n_mean_partials, n_cov_partials, lam, out_ptr, BLOCK: tl.constexpr):
    """out = [loss, covariance term, mean term] from the partials (mean ones first), summed in a fixed order."""
    offs = tl.arange(0, BLOCK)
    mean_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_mean_partials, BLOCK):
        mean_acc += tl.load(partial_ptr + start + offs, mask=start + offs < n_mean_partials, other=0.0)
    cov_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_cov_partials, BLOCK):
        idx = n_mean_partials + start + offs
        cov_acc += tl.load(partial_ptr + idx, mask=start + offs < n_cov_partials, other=0.0)
    mean_term = tl.sum(mean_acc, axis=0)
    cov_term = tl.sum(cov_acc, axis=0)
    tl.store(out_ptr, cov_term + lam * mean_term)
    tl.store(out_ptr + 1, cov_term)
    tl.store(out_ptr + 2, mean_term)


@triton.jit
def _grad_tile(
    a_ptr, mean_a_ptr, b_ptr, gap_ptr, grad_ptr, out_ptr, ws_ptr,
    pid_m, pid_n, n_rows, n_inner, n_cols, gap_stride, k_lo, k_hi,
    stride_an, stride_ak, stride_bk, stride_bc, stride_on, stride_oc,
    alpha, beta,
    SPLIT: tl.constexpr, CENTRE_ON_LOAD: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out tile = g * (alpha * (A - 1 mu^T) B + beta * (gap[0] - gap[gap_stride])): the centring as
    ``(mu^T B)`` subtracted in the epilogue unless CENTRE_ON_LOAD, the mean-term row from the means. With
    SPLIT > 1 the tile covers inner indices ``k_lo .. k_hi`` only and stores ``alpha * (A - 1 mu^T) B`` of
    that range (fp32, [n_rows, n_cols] row-major at ``ws_ptr``) for ``_grad_reduce_kernel``."""
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = rows < n_rows
    mask_c = cols < n_cols
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    correction = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(k_lo, k_hi, BLOCK_K):
        ks = start + offs_k
        mask_k = ks < k_hi
        a = tl.load(
            a_ptr + rows[:, None] * stride_an + ks[None, :] * stride_ak,
            mask=mask_r[:, None] & mask_k[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + ks.to(tl.int64)[:, None] * stride_bk + cols[None, :] * stride_bc,
            mask=mask_k[:, None] & mask_c[None, :],
            other=0.0,
        )
        mu = tl.load(mean_a_ptr + ks, mask=mask_k, other=0.0)
        if CENTRE_ON_LOAD:
            a = tl.where(mask_r[:, None] & mask_k[None, :], a.to(tl.float32) - mu[None, :], 0.0)
        else:
            correction += tl.sum(mu[:, None] * b.to(tl.float32), axis=0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
    mask = mask_r[:, None] & mask_c[None, :]
    if SPLIT > 1:
        tl.store(ws_ptr + rows[:, None] * n_cols + cols[None, :], alpha * (acc - correction[None, :]), mask=mask)
    else:
        gap = tl.load(gap_ptr + cols, mask=mask_c, other=0.0) - tl.load(
            gap_ptr + gap_stride + cols, mask=mask_c, other=0.0
        )
        g = tl.load(grad_ptr).to(tl.float32)
        out = g * (alpha * (acc - correction[None, :]) + beta * gap[None, :])
        tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :] * stride_oc, out.to(out_ptr.dtype.element_ty),
                 mask=mask)  # fmt: skip


@triton.jit
def _cov_grad_kernel(
    x_ptr, y_ptr, mean_x_ptr, mean_y_ptr, diff_ptr, grad_ptr, grad_x_ptr, grad_y_ptr, ws_x_ptr, ws_y_ptr,
    n_rows, dim_x, dim_y, side,
    stride_xn, stride_xd, stride_yn, stride_yd, stride_diff_m, stride_diff_n,
    stride_gx_n, stride_gx_d, stride_gy_n, stride_gy_d,
    alpha, beta, tiles_x_n, tiles_x, tiles_y_n, tiles, chunk_x, chunk_y,
    SPLIT: tl.constexpr, CENTRE_ON_LOAD: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Both gradients of one side (``side`` 0 real, 1 synthetic) in one 1-D grid: of each ``tiles``
    programs the first ``tiles_x`` write dL/dX = alpha (Y - 1 mu_Y^T) D^T + beta (mu_XT - mu_XS), the rest
    dL/dY (the same with X and D); a launch that needs one of them gets a grid of its tiles only. With
    SPLIT > 1 the grid repeats SPLIT times, split s covering inner indices s*chunk .. (s+1)*chunk (split-K,
    for shapes whose output tiles are fewer than the GPU's SMs), and ``_grad_reduce_kernel`` finishes."""
    pid = tl.program_id(0)
    split = pid // tiles
    t = pid % tiles
    if t < tiles_x:
        k_lo = split * chunk_x
        _grad_tile(
            y_ptr, mean_y_ptr + side * dim_y, diff_ptr, mean_x_ptr, grad_ptr, grad_x_ptr,
            ws_x_ptr + split.to(tl.int64) * n_rows * dim_x,
            t // tiles_x_n, t % tiles_x_n, n_rows, dim_y, dim_x, dim_x, k_lo, tl.minimum(k_lo + chunk_x, dim_y),
            stride_yn, stride_yd, stride_diff_n, stride_diff_m, stride_gx_n, stride_gx_d,
            alpha, beta, SPLIT, CENTRE_ON_LOAD, DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    else:
        t = t - tiles_x
        k_lo = split * chunk_y
        _grad_tile(
            x_ptr, mean_x_ptr + side * dim_x, diff_ptr, mean_y_ptr, grad_ptr, grad_y_ptr,
            ws_y_ptr + split.to(tl.int64) * n_rows * dim_y,
            t // tiles_y_n, t % tiles_y_n, n_rows, dim_x, dim_y, dim_y, k_lo, tl.minimum(k_lo + chunk_y, dim_x),
            stride_xn, stride_xd, stride_diff_m, stride_diff_n, stride_gy_n, stride_gy_d,
            alpha, beta, SPLIT, CENTRE_ON_LOAD, DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip


@triton.jit
def _reduce_tile(ws_ptr, gap_ptr, grad_ptr, out_ptr, pid_m, pid_n, n_rows, n_cols, stride_on, stride_oc, beta,
                 SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """out tile = g * (sum over the splits, in order, of the partials + beta * gap)."""
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_c = cols < n_cols
    mask = (rows < n_rows)[:, None] & mask_c[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(SPLIT):
        slice_ptr = ws_ptr + s * n_rows.to(tl.int64) * n_cols
        acc += tl.load(slice_ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    gap = tl.load(gap_ptr + cols, mask=mask_c, other=0.0) - tl.load(gap_ptr + n_cols + cols, mask=mask_c, other=0.0)
    g = tl.load(grad_ptr).to(tl.float32)
    out = g * (acc + beta * gap[None, :])
    tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :] * stride_oc, out.to(out_ptr.dtype.element_ty),
             mask=mask)  # fmt: skip


@triton.jit
def _grad_reduce_kernel(
    ws_x_ptr, ws_y_ptr, mean_x_ptr, mean_y_ptr, grad_ptr, grad_x_ptr, grad_y_ptr,
    n_rows, dim_x, dim_y, stride_gx_n, stride_gx_d, stride_gy_n, stride_gy_d, beta, tiles_x_n, tiles_x, tiles_y_n,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The split-K fix-up: a fixed summation order, so results do not depend on scheduling (no atomics)."""
    pid = tl.program_id(0)
    if pid < tiles_x:
        _reduce_tile(ws_x_ptr, mean_x_ptr, grad_ptr, grad_x_ptr, pid // tiles_x_n, pid % tiles_x_n, n_rows, dim_x,
                     stride_gx_n, stride_gx_d, beta, SPLIT, BLOCK_M, BLOCK_N)  # fmt: skip
    else:
        t = pid - tiles_x
        _reduce_tile(ws_y_ptr, mean_y_ptr, grad_ptr, grad_y_ptr, t // tiles_y_n, t % tiles_y_n, n_rows, dim_y,
                     stride_gy_n, stride_gy_d, beta, SPLIT, BLOCK_M, BLOCK_N)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Tile configurations (ordered: the first is what runs unless COVMATCH_TRITON_AUTOTUNE=1 times them)
# --------------------------------------------------------------------------------------------------

# Half-precision operands: big tiles for the tensor cores; fp32: smaller (TF32/fp32 operands are twice the size).
# The entries after the smallest tile are never a default (the default is the first whose grid fills the SMs,
# else the one with most programs): they are Hopper-sized tiles only COVMATCH_TRITON_AUTOTUNE=1 tries.
_DIFF_CONFIGS = {
    "half": (
        TileConfig(128, 128, 64, num_warps=8, num_stages=3),
        TileConfig(128, 64, 64, num_warps=4, num_stages=3),
        TileConfig(64, 64, 64, num_warps=4, num_stages=3),
        TileConfig(128, 256, 64, num_warps=8, num_stages=3),
        TileConfig(128, 128, 64, num_warps=4, num_stages=4),
    ),
    "fp32": (TileConfig(64, 64, 32, num_warps=4, num_stages=3), TileConfig(32, 64, 32, num_warps=4, num_stages=3)),
}
_GRAD_CONFIGS = {
    "half": (
        TileConfig(64, 128, 64, num_warps=4, num_stages=3),
        TileConfig(64, 64, 64, num_warps=4, num_stages=3),
        TileConfig(128, 128, 64, num_warps=8, num_stages=3),
        TileConfig(128, 256, 64, num_warps=8, num_stages=3),
    ),
    "fp32": (TileConfig(64, 64, 32, num_warps=4, num_stages=3), TileConfig(32, 64, 32, num_warps=4, num_stages=3)),
}
_MEANS_BLOCK_R, _MEANS_BLOCK_D = 32, 128  # rows per step, columns per program
_MEANS_CONFIG = TileConfig(_MEANS_BLOCK_R, _MEANS_BLOCK_D, 0, num_warps=4, num_stages=1)
_FINISH_BLOCK = 1024
_FINISH_CONFIG = TileConfig(1, 1, _FINISH_BLOCK, num_warps=4, num_stages=1)
# The interpreter runs one program after another in numpy: big tiles mean few programs.
_INTERPRETER_CONFIG = TileConfig(64, 64, 32, num_warps=4, num_stages=1)


def _kind(dot_dtype) -> str:
    return "fp32" if dot_dtype == tl.float32 else "half"


# --------------------------------------------------------------------------------------------------
# Host functions
# --------------------------------------------------------------------------------------------------


@dataclass
class CovarianceForward:
    """What the covariance-form forward produces.

    ``loss`` = ``cov_loss`` + lam * ``mean_loss`` with ``cov_loss`` = ||D||_F^2 and ``mean_loss`` =
    ||mu_xr - mu_xs||^2 + ||mu_yr - mu_ys||^2 (0-dim fp32 views of one buffer); ``diff`` = D ([d_x, d_y] in
    the inputs' shared half dtype, else fp32; None when not requested); ``mean_x`` [2, d_x] and ``mean_y``
    [2, d_y] hold the real (row 0) and synthetic (row 1) column means in fp32.
    """

    loss: torch.Tensor
    cov_loss: torch.Tensor
    mean_loss: torch.Tensor
    diff: Optional[torch.Tensor]
    mean_x: torch.Tensor
    mean_y: torch.Tensor


def diff_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype D is kept in: the four inputs' shared half dtype, else fp32."""
    dot = dot_operand_dtype(*dtypes)
    return dtypes[0] if dot != tl.float32 else torch.float32


def column_means(real_x, real_y, syn_x, syn_y, partials: torch.Tensor):
    """Launch 1: [2, d_x] and [2, d_y] fp32 column means; the mean term's partials go to the first
    2 * cdiv(max(d_x, d_y), _MEANS_BLOCK_D) entries of ``partials``."""
    n_real, dim_x = real_x.shape
    n_syn, dim_y = syn_y.shape
    device = real_x.device
    n_blocks = cdiv(max(dim_x, dim_y), _MEANS_BLOCK_D)
    mean_x = torch.empty((2, dim_x), dtype=torch.float32, device=device)
    mean_y = torch.empty((2, dim_y), dtype=torch.float32, device=device)
    elements = (n_real + n_syn) * (dim_x + dim_y)
    launch_kernel(
        _column_means_kernel, (n_blocks, 2),
        (real_x, real_y, syn_x, syn_y, mean_x, mean_y, partials, n_real, n_syn, dim_x, dim_y,
         *real_x.stride(), *real_y.stride(), *syn_x.stride(), *syn_y.stride()),
        dict(BLOCK_R=_MEANS_BLOCK_R, BLOCK_D=_MEANS_BLOCK_D), _MEANS_CONFIG,
        flops=float(elements), bytes_moved=float(elements * real_x.element_size()),
    )  # fmt: skip
    return mean_x, mean_y


def covariance_forward(
    real_x: torch.Tensor,
    real_y: torch.Tensor,
    syn_x: torch.Tensor,
    syn_y: torch.Tensor,
    rho: float,
    lam: float,
    store_diff: bool,
) -> CovarianceForward:
    """Fused forward of ||rho*C(real) - C(syn)||_F^2 + lam * (mean gaps): three launches (means, D and its
    partial sums, the deterministic final reduction). Inputs are validated 2-D tensors."""
    n_real, dim_x = real_x.shape
    n_syn, dim_y = syn_y.shape
    device = real_x.device
    real_dot = dot_operand_dtype(real_x.dtype, real_y.dtype)
    syn_dot = dot_operand_dtype(syn_x.dtype, syn_y.dtype)
    precision = fp32_dot_precision()
    d_dtype = diff_dtype(real_x.dtype, real_y.dtype, syn_x.dtype, syn_y.dtype)

    def run(config: TileConfig) -> CovarianceForward:
        grid = (cdiv(dim_x, config.block_m), cdiv(dim_y, config.block_n))
        n_mean_partials = 2 * cdiv(max(dim_x, dim_y), _MEANS_BLOCK_D)
        partials = torch.empty(n_mean_partials + grid[0] * grid[1], dtype=torch.float32, device=device)
        mean_x, mean_y = column_means(real_x, real_y, syn_x, syn_y, partials)
        diff = torch.empty((dim_x, dim_y), dtype=d_dtype, device=device) if store_diff else None
        launch_kernel(
            _cov_diff_kernel, grid,
            (real_x, real_y, syn_x, syn_y, mean_x, mean_y, diff if diff is not None else partials,
             partials[n_mean_partials:], n_real, n_syn, dim_x, dim_y,
             *real_x.stride(), *real_y.stride(), *syn_x.stride(), *syn_y.stride(),
             *(diff.stride() if diff is not None else (0, 0)), float(rho)),
            dict(STORE_DIFF=store_diff, REAL_CENTRE=real_dot == tl.float32, SYN_CENTRE=syn_dot == tl.float32,
                 REAL_DOT=real_dot, SYN_DOT=syn_dot, PRECISION=precision,
                 BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k),
            config,
            flops=2.0 * (n_real + n_syn) * dim_x * dim_y,
            bytes_moved=float((n_real + n_syn) * (dim_x + dim_y) * real_x.element_size()
                              + (dim_x * dim_y * d_dtype.itemsize if store_diff else 0)),
        )  # fmt: skip
        out = torch.empty(3, dtype=torch.float32, device=device)
        launch_kernel(
            _finish_kernel, (1,), (partials, n_mean_partials, grid[0] * grid[1], float(lam), out),
            dict(BLOCK=_FINISH_BLOCK), _FINISH_CONFIG,
            flops=float(partials.numel()), bytes_moved=float(4 * partials.numel()),
        )  # fmt: skip
        loss, cov_loss, mean_loss = out.unbind()
        return CovarianceForward(loss, cov_loss, mean_loss, diff, mean_x, mean_y)

    kind = "fp32" if tl.float32 in (real_dot, syn_dot) else "half"
    configs = (_INTERPRETER_CONFIG,) if interpreter_enabled() else _DIFF_CONFIGS[kind]
    key = (dim_x, dim_y, n_real, n_syn, str(real_dot), str(syn_dot), precision, store_diff)

    def programs(c: TileConfig) -> int:
        return cdiv(dim_x, c.block_m) * cdiv(dim_y, c.block_n)

    return run(choose_config("covmatch_cov_diff", key, configs, lambda c: bench(lambda: run(c)), programs))


def covariance_grads(
    side: int,
    x: torch.Tensor,
    y: torch.Tensor,
    mean_x: torch.Tensor,
    mean_y: torch.Tensor,
    diff: torch.Tensor,
    grad_scale: torch.Tensor,
    alpha: float,
    beta: float,
    need_x: bool,
    need_y: bool,
    dtype_x: torch.dtype,
    dtype_y: torch.dtype,
):
    """dL/dX and dL/dY of one side (0 real, 1 synthetic; None where not needed) in one launch:
    ``grad_scale * (alpha * (Y - 1 mu_Y^T) D^T + beta * (mu_XT - mu_XS))`` and the same with X and D.

    ``x``, ``y`` [n, d] are that side's rows (either may be None when its partner's gradient is not
    needed); ``mean_x`` / ``mean_y`` the forward's [2, d] means; ``grad_scale`` a 0-dim tensor read on the
    device (no host sync).
    """
    rows = x if x is not None else y
    n_rows = rows.shape[0]
    dim_x, dim_y = diff.shape
    device = diff.device
    operands = [t.dtype for t in (x if need_y else None, y if need_x else None) if t is not None]
    dot = dot_operand_dtype(*operands, diff.dtype)
    precision = fp32_dot_precision()

    def run(config: TileConfig):
        grad_x = torch.empty((n_rows, dim_x), dtype=dtype_x, device=device) if need_x else None
        grad_y = torch.empty((n_rows, dim_y), dtype=dtype_y, device=device) if need_y else None
        tiles_m = cdiv(n_rows, config.block_m)
        tiles_x_n, tiles_y_n = cdiv(dim_x, config.block_n), cdiv(dim_y, config.block_n)
        tiles_x = tiles_m * tiles_x_n if need_x else 0
        tiles_y = tiles_m * tiles_y_n if need_y else 0
        inner = min(dim_y if need_x else dim_x, dim_x if need_y else dim_y)
        split = split_k(tiles_x + tiles_y, inner, config.block_k, sm_count())
        chunk_x = cdiv(cdiv(dim_y, split), config.block_k) * config.block_k
        chunk_y = cdiv(cdiv(dim_x, split), config.block_k) * config.block_k
        ws_x = torch.empty((split, n_rows, dim_x), dtype=torch.float32, device=device) if split > 1 and need_x else None
        ws_y = torch.empty((split, n_rows, dim_y), dtype=torch.float32, device=device) if split > 1 and need_y else None

        def arg(t):  # an unused operand's slot gets any tensor (its branch never runs)
            return t if t is not None else diff

        def strides(t):
            return t.stride() if t is not None else (0, 0)

        launch_kernel(
            _cov_grad_kernel, (split * (tiles_x + tiles_y),),
            (arg(x), arg(y), mean_x, mean_y, diff, grad_scale, arg(grad_x), arg(grad_y), arg(ws_x), arg(ws_y),
             n_rows, dim_x, dim_y, side,
             *strides(x), *strides(y), *diff.stride(), *strides(grad_x), *strides(grad_y),
             float(alpha), float(beta), tiles_x_n, tiles_x, tiles_y_n, tiles_x + tiles_y, chunk_x, chunk_y),
            dict(SPLIT=split, CENTRE_ON_LOAD=dot == tl.float32, DOT_DTYPE=dot, PRECISION=precision,
                 BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k),
            config,
            flops=2.0 * n_rows * dim_x * dim_y * (int(need_x) + int(need_y)),
            bytes_moved=float(rows.element_size() * n_rows * (dim_x + dim_y) * 2
                              + diff.element_size() * dim_x * dim_y * (int(need_x) + int(need_y))),
        )  # fmt: skip
        if split > 1:
            launch_kernel(
                _grad_reduce_kernel, (tiles_x + tiles_y,),
                (arg(ws_x), arg(ws_y), mean_x, mean_y, grad_scale, arg(grad_x), arg(grad_y),
                 n_rows, dim_x, dim_y, *strides(grad_x), *strides(grad_y), float(beta), tiles_x_n, tiles_x, tiles_y_n),
                dict(SPLIT=split, BLOCK_M=config.block_m, BLOCK_N=config.block_n),
                TileConfig(config.block_m, config.block_n, 0, num_warps=4, num_stages=1),
                flops=float(split * n_rows * (dim_x * need_x + dim_y * need_y)),
                bytes_moved=float(4 * (split + 1) * n_rows * (dim_x * need_x + dim_y * need_y)),
            )  # fmt: skip
        return grad_x, grad_y

    configs = (_INTERPRETER_CONFIG,) if interpreter_enabled() else _GRAD_CONFIGS[_kind(dot)]
    key = (n_rows, dim_x, dim_y, str(dot), precision, need_x, need_y)

    def programs(c: TileConfig) -> int:
        tiles_m = cdiv(n_rows, c.block_m)
        return tiles_m * (cdiv(dim_x, c.block_n) * need_x + cdiv(dim_y, c.block_n) * need_y)

    return run(choose_config("covmatch_cov_grad", key, configs, lambda c: bench(lambda: run(c)), programs))


def split_k(programs: int, inner: int, block_k: int, sms: int) -> int:
    """Splits of the gradient GEMMs' inner dimension: 1 when the output tiles fill the GPU's ``sms``, else
    enough to fill it, keeping at least two ``block_k`` steps per split."""
    if programs >= sms:
        return 1
    return max(1, min(cdiv(sms, programs), inner // (2 * block_k)))
