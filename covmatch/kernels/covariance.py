"""Covariance-form CovMatch kernels (docs/design.md, *Gradients*): cost ~ n * d_x * d_y.

One forward + backward of the loss launches, the algebra as plain GEMMs:

1. ``_column_stats_kernel``: the column means of the four feature matrices (fp32), the mean term's partial
   sums and, for fp16, the largest column sum of squares per block (the bound that keeps D in range).
2. ``_cov_diff_kernel``: per (d_x, d_y) tile, ``D = rho * C_T - C_S`` in one fp32 accumulator: the real
   product ``X_T^T Y_T`` and then the synthetic one ``X_S^T Y_S`` go into the same accumulator (rescaled in
   between), and the centring is a rank-one correction in the epilogue, so half-precision operands go from
   memory straight to the tensor cores. ``D`` is stored (for backward) in the inputs' half dtype, or fp32;
   the tile's ``sum(D**2)`` goes to a partials buffer. For half-precision inputs the epilogue also writes the
   partial centring corrections of the backward (``D mu_Y`` and ``mu_X^T D`` over the tile), so that the
   backward's mainloop is a plain GEMM.
3. ``_finish_kernel``: one program reduces the partials in a fixed order (deterministic, no atomics) into
   the loss, the covariance term and the mean term.
4. ``_cov_grad_kernel``: one gradient, ``dL/dX = alpha (Y - 1 mu_Y^T) D^T + 1 beta^T`` or ``dL/dY = alpha
   (X - 1 mu_X^T) D + 1 beta^T``, per launch: a GEMM on the tensor cores with the centring correction and the
   mean-term row in the epilogue; each product is its own specialisation, so nothing but the GEMM runs in its
   mainloop. Split-K (``_grad_reduce_kernel``) where the output tiles do not fill the GPU.

fp32 operands are centred on load instead (``CENTRE_ON_LOAD``): the two-pass covariance, exact to fp32
rounding whatever the features' mean, with ``tl.dot`` in TF32 exactly when PyTorch's matmul setting allows
it. Half-precision operands multiply exactly into the fp32 accumulator, so their rank-one correction loses
only fp32 rounding (about 2^-24 |mu|^2 / sigma^2 relative).

fp16 range: D is stored in fp16 as ``s * D`` with ``s = 2^-k`` the largest power of two (at most 1) that keeps
a Cauchy-Schwarz bound of ``|D|`` (from the columns' sums of squares) under 2^14; the backward multiplies by
``1 / s``. So fp16 features whose D exceeds fp16's range still get finite gradients wherever those fit fp16.

Inputs are contiguous (the host copies others once); every offset that can exceed 2^31 is 64-bit.
"""

from dataclasses import dataclass
from typing import Dict, Hashable, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._launch import (
    PreboundLaunch,
    TileConfig,
    bench,
    cdiv,
    choose_config,
    dot_operand_dtype,
    fp32_dot_precision,
    interpreter_enabled,
    sm_count,
)

__all__ = [
    "CORRECTION_BLOCK", "CovarianceForward", "CovariancePlan", "covariance_plan", "diff_dtype", "mm_fp32",
]  # fmt: skip

# Granularity of the backward's correction partials: one partial row per 64 rows (or columns) of D, whatever
# the forward's tile (every half-precision tile is a multiple of 64), so their shapes depend on the shape only.
CORRECTION_BLOCK = 64
# |s * D| is kept under this (fp16's largest finite value is 65504: a factor of 4 to spare for rounding).
FP16_DIFF_LIMIT = 2.0**14


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _column_sums(ptr, n_rows, cols, mask_c, stride_n, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                 SQUARES: tl.constexpr):  # fmt: skip
    """fp32 column sums (and sums of squares when SQUARES) of rows 0..n_rows of a contiguous matrix."""
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
    offs_r = tl.arange(0, BLOCK_R)
    for start in range(0, n_rows, BLOCK_R):
        rows = (start + offs_r).to(tl.int64)
        mask_r = rows < n_rows
        tile = tl.load(
            ptr + rows[:, None] * stride_n + cols[None, :], mask=mask_r[:, None] & mask_c[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.sum(tile, axis=0)
        if SQUARES:
            acc_sq += tl.sum(tile * tile, axis=0)
    return acc, acc_sq


@triton.jit
def _column_stats_kernel(
    xr_ptr, yr_ptr, xs_ptr, ys_ptr, ws_ptr,
    n_real, n_syn, dim_x, dim_y, mean_x_off, mean_y_off, partial_off, squares_off,
    SQUARES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (b, 0): columns block b of the images, (b, 1): of the captions (rows contiguous). Writes into
    the workspace ``ws`` the real (row 0) and synthetic (row 1) means, this block's share of ||mu_T - mu_S||^2
    into ``partial[modality, b]`` and, when SQUARES, the block's largest column sum of squares into
    ``squares[2 * modality + {0 real, 1 syn}, b]``."""
    block = tl.program_id(0)
    modality = tl.program_id(1)
    n_blocks = tl.num_programs(0)
    cols = block * BLOCK_D + tl.arange(0, BLOCK_D)
    mean_x_ptr = ws_ptr + mean_x_off
    mean_y_ptr = ws_ptr + mean_y_off
    partial_ptr = ws_ptr + partial_off
    squares_ptr = ws_ptr + squares_off
    if modality == 0:
        mask_c = cols < dim_x
        sum_r, sq_r = _column_sums(xr_ptr, n_real, cols, mask_c, dim_x, BLOCK_R, BLOCK_D, SQUARES)
        sum_s, sq_s = _column_sums(xs_ptr, n_syn, cols, mask_c, dim_x, BLOCK_R, BLOCK_D, SQUARES)
        mean_r, mean_s = sum_r / n_real, sum_s / n_syn
        tl.store(mean_x_ptr + cols, mean_r, mask=mask_c)
        tl.store(mean_x_ptr + dim_x + cols, mean_s, mask=mask_c)
    else:
        mask_c = cols < dim_y
        sum_r, sq_r = _column_sums(yr_ptr, n_real, cols, mask_c, dim_y, BLOCK_R, BLOCK_D, SQUARES)
        sum_s, sq_s = _column_sums(ys_ptr, n_syn, cols, mask_c, dim_y, BLOCK_R, BLOCK_D, SQUARES)
        mean_r, mean_s = sum_r / n_real, sum_s / n_syn
        tl.store(mean_y_ptr + cols, mean_r, mask=mask_c)
        tl.store(mean_y_ptr + dim_y + cols, mean_s, mask=mask_c)
    gap = tl.where(mask_c, mean_r - mean_s, 0.0)
    tl.store(partial_ptr + modality * n_blocks + block, tl.sum(gap * gap, axis=0))
    if SQUARES:
        tl.store(squares_ptr + (2 * modality) * n_blocks + block, tl.max(sq_r, axis=0))
        tl.store(squares_ptr + (2 * modality + 1) * n_blocks + block, tl.max(sq_s, axis=0))


@triton.jit
def _accumulate_product(
    acc, x_ptr, y_ptr, mean_x_ptr, mean_y_ptr, n_rows, stride_xn, stride_yn,
    offs_m, offs_n, mask_m, mask_n,
    CENTRE_ON_LOAD: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """acc += X^T Y over rows 0..n_rows for one output tile (centred on load when CENTRE_ON_LOAD); the
    pointers advance by BLOCK_K rows per step, masks only on the ragged last step's rows."""
    if CENTRE_ON_LOAD:
        mu_x = tl.load(mean_x_ptr + offs_m, mask=mask_m, other=0.0)
        mu_y = tl.load(mean_y_ptr + offs_n, mask=mask_n, other=0.0)
    offs_k = tl.arange(0, BLOCK_K)
    xt_ptrs = x_ptr + offs_k.to(tl.int64)[None, :] * stride_xn + offs_m[:, None]  # X^T tile [BLOCK_M, BLOCK_K]
    y_ptrs = y_ptr + offs_k.to(tl.int64)[:, None] * stride_yn + offs_n[None, :]  # Y tile [BLOCK_K, BLOCK_N]
    step_x = BLOCK_K * stride_xn  # < 2^31: BLOCK_K times a row length
    step_y = BLOCK_K * stride_yn
    for start in range(0, n_rows, BLOCK_K):
        mask_k = offs_k < n_rows - start
        xt = tl.load(xt_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        y = tl.load(y_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if CENTRE_ON_LOAD:
            xt = tl.where(mask_k[None, :], xt.to(tl.float32) - mu_x[:, None], 0.0)
            y = tl.where(mask_k[:, None], y.to(tl.float32) - mu_y[None, :], 0.0)
        acc = tl.dot(xt.to(DOT_DTYPE), y.to(DOT_DTYPE), acc, input_precision=PRECISION)
        xt_ptrs += step_x
        y_ptrs += step_y
    return acc


@triton.jit
def _diff_scale(squares_ptr, n_blocks, rho, n_real_f, n_syn_f, BLOCK: tl.constexpr):
    """s = 2^-k (k >= 0, smallest) with s * bound(|D|) <= 2^14, the bound by Cauchy-Schwarz from the largest
    column sums of squares: |D_ij| <= rho |x_i^T| |y_j| / (n_T - 1) + |x_i^S| |y_j^S| / (n_S - 1) (uncentred
    norms bound the centred ones). Every program computes the same value."""
    offs = tl.arange(0, BLOCK)
    m = offs < n_blocks
    xr = tl.max(tl.load(squares_ptr + offs, mask=m, other=0.0), axis=0)
    xs = tl.max(tl.load(squares_ptr + n_blocks + offs, mask=m, other=0.0), axis=0)
    yr = tl.max(tl.load(squares_ptr + 2 * n_blocks + offs, mask=m, other=0.0), axis=0)
    ys = tl.max(tl.load(squares_ptr + 3 * n_blocks + offs, mask=m, other=0.0), axis=0)
    bound = rho * tl.sqrt(xr) * tl.sqrt(yr) / (n_real_f - 1.0) + tl.sqrt(xs) * tl.sqrt(ys) / (n_syn_f - 1.0)
    k = tl.maximum(tl.ceil(tl.log2(bound / 16384.0)), 0.0)
    return tl.exp2(-k)


@triton.jit
def _store_corrections(stored, corr_x_ptr, corr_y_ptr, mean_x_ptr, mean_y_ptr, pid_m, pid_n, offs_m, offs_n,
                       mask_m, mask_n, dim_x, dim_y, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """This tile's share of the backward's centring corrections, from D as stored: ``D mu_Y`` over the tile's
    columns into ``corr_x[pid_n * BLOCK_N / 64, rows]`` and ``mu_X^T D`` over its rows into
    ``corr_y[pid_m * BLOCK_M / 64, cols]``; the other 64-blocks the tile covers get zeros."""
    mu_x = tl.load(mean_x_ptr + offs_m, mask=mask_m, other=0.0)
    mu_y = tl.load(mean_y_ptr + offs_n, mask=mask_n, other=0.0)
    part_x = tl.sum(stored * mu_y[None, :], axis=1)
    part_y = tl.sum(stored * mu_x[:, None], axis=0)
    row_x = pid_n * (BLOCK_N // 64)
    row_y = pid_m * (BLOCK_M // 64)
    tl.store(corr_x_ptr + row_x.to(tl.int64) * dim_x + offs_m, part_x, mask=mask_m)
    tl.store(corr_y_ptr + row_y.to(tl.int64) * dim_y + offs_n, part_y, mask=mask_n)
    for extra in range(1, BLOCK_N // 64):
        tl.store(corr_x_ptr + (row_x + extra).to(tl.int64) * dim_x + offs_m, tl.zeros_like(part_x), mask=mask_m)
    for extra in range(1, BLOCK_M // 64):
        tl.store(corr_y_ptr + (row_y + extra).to(tl.int64) * dim_y + offs_n, tl.zeros_like(part_y), mask=mask_n)


@triton.jit
def _cov_diff_kernel(
    xr_ptr, yr_ptr, xs_ptr, ys_ptr, ws_ptr, diff_ptr,
    n_real, n_syn, dim_x, dim_y, n_blocks, corr_x_side, corr_y_side,
    mean_x_off, mean_y_off, squares_off, corr_x_off, corr_y_off, scale_off, partial_off,
    rho,
    STORE_DIFF: tl.constexpr, CORR_REAL: tl.constexpr, CORR_SYN: tl.constexpr, SCALE_DIFF: tl.constexpr,
    SQUARES_BLOCK: tl.constexpr, REAL_CENTRE: tl.constexpr, SYN_CENTRE: tl.constexpr,
    REAL_DOT: tl.constexpr, SYN_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """D = rho C_T - C_S for one (BLOCK_M, BLOCK_N) tile, its sum of squares, and what the backward needs;
    the means, partials and corrections live in the workspace ``ws`` at the given offsets."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < dim_x
    mask_n = offs_n < dim_y
    mean_x_ptr = ws_ptr + mean_x_off
    mean_y_ptr = ws_ptr + mean_y_off
    n_real_f = n_real.to(tl.float32)
    n_syn_f = n_syn.to(tl.float32)
    c_real = rho / (n_real_f - 1.0)
    c_syn = 1.0 / (n_syn_f - 1.0)

    # One accumulator: X_T^T Y_T, rescaled by -c_real / c_syn, plus X_S^T Y_S, times -c_syn, is
    # c_real X_T^T Y_T - c_syn X_S^T Y_S.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate_product(
        acc, xr_ptr, yr_ptr, mean_x_ptr, mean_y_ptr, n_real, dim_x, dim_y,
        offs_m, offs_n, mask_m, mask_n, REAL_CENTRE, REAL_DOT, PRECISION, BLOCK_K,
    )  # fmt: skip
    acc = acc * (-c_real / c_syn)
    acc = _accumulate_product(
        acc, xs_ptr, ys_ptr, mean_x_ptr + dim_x, mean_y_ptr + dim_y, n_syn, dim_x, dim_y,
        offs_m, offs_n, mask_m, mask_n, SYN_CENTRE, SYN_DOT, PRECISION, BLOCK_K,
    )  # fmt: skip
    diff = acc * (-c_syn)
    _diff_epilogue(
        diff, ws_ptr, diff_ptr, pid_m, pid_n, offs_m, offs_n, mask_m, mask_n, n_real_f, n_syn_f, c_real, c_syn, rho,
        dim_x, dim_y, n_blocks, corr_x_side, corr_y_side, mean_x_off, mean_y_off, squares_off, corr_x_off, corr_y_off,
        scale_off, partial_off, STORE_DIFF, CORR_REAL, CORR_SYN, SCALE_DIFF, SQUARES_BLOCK, REAL_CENTRE, SYN_CENTRE,
        BLOCK_M, BLOCK_N,
    )  # fmt: skip


@triton.jit
def _diff_epilogue(
    diff, ws_ptr, diff_ptr, pid_m, pid_n, offs_m, offs_n, mask_m, mask_n, n_real_f, n_syn_f, c_real, c_syn, rho,
    dim_x, dim_y, n_blocks, corr_x_side, corr_y_side, mean_x_off, mean_y_off, squares_off, corr_x_off, corr_y_off,
    scale_off, partial_off,
    STORE_DIFF: tl.constexpr, CORR_REAL: tl.constexpr, CORR_SYN: tl.constexpr, SCALE_DIFF: tl.constexpr,
    SQUARES_BLOCK: tl.constexpr, REAL_CENTRE: tl.constexpr, SYN_CENTRE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """From a tile of c_real P_T - c_syn P_S (P a product, centred or not): the centring, the tile's sum of
    squares, s * D stored, and the backward's correction partials."""
    mean_x_ptr = ws_ptr + mean_x_off
    mean_y_ptr = ws_ptr + mean_y_off
    corr_x_ptr = ws_ptr + corr_x_off
    corr_y_ptr = ws_ptr + corr_y_off
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
    tile = pid_m * tl.num_programs(1) + pid_n
    tl.store(ws_ptr + partial_off + tile, tl.sum(tl.sum(diff * diff, axis=1), axis=0))
    if STORE_DIFF:
        if SCALE_DIFF:
            scale = _diff_scale(ws_ptr + squares_off, n_blocks, rho, n_real_f, n_syn_f, SQUARES_BLOCK)
            stored = (diff * scale).to(diff_ptr.dtype.element_ty)
            tl.store(ws_ptr + scale_off, 1.0 / scale)  # every program stores the same value
        else:
            stored = diff.to(diff_ptr.dtype.element_ty)
        offs = offs_m.to(tl.int64)[:, None] * dim_y + offs_n[None, :]
        tl.store(diff_ptr + offs, stored, mask=tile_mask)
        if CORR_REAL:
            _store_corrections(stored.to(tl.float32), corr_x_ptr, corr_y_ptr, mean_x_ptr, mean_y_ptr, pid_m, pid_n,
                               offs_m, offs_n, mask_m, mask_n, dim_x, dim_y, BLOCK_M, BLOCK_N)  # fmt: skip
        if CORR_SYN:
            _store_corrections(stored.to(tl.float32), corr_x_ptr + corr_x_side, corr_y_ptr + corr_y_side,
                               mean_x_ptr + dim_x, mean_y_ptr + dim_y, pid_m, pid_n,
                               offs_m, offs_n, mask_m, mask_n, dim_x, dim_y, BLOCK_M, BLOCK_N)  # fmt: skip


@triton.jit
def _hybrid_diff_kernel(
    real_prod_ptr, syn_prod_ptr, ws_ptr, diff_ptr,
    n_real, n_syn, dim_x, dim_y, n_blocks, corr_x_side, corr_y_side,
    mean_x_off, mean_y_off, squares_off, corr_x_off, corr_y_off, scale_off, partial_off,
    rho,
    STORE_DIFF: tl.constexpr, CORR_REAL: tl.constexpr, CORR_SYN: tl.constexpr, SCALE_DIFF: tl.constexpr,
    SQUARES_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The large-shape path's epilogue: D from the uncentred fp32 products X_T^T Y_T and X_S^T Y_S (cuBLAS'),
    then everything ``_cov_diff_kernel`` does after its mainloop. Bandwidth-bound: 2 fp32 reads, 1 write."""
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
    offs = offs_m.to(tl.int64)[:, None] * dim_y + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    diff = c_real * tl.load(real_prod_ptr + offs, mask=mask, other=0.0) - c_syn * tl.load(
        syn_prod_ptr + offs, mask=mask, other=0.0
    )
    _diff_epilogue(
        diff, ws_ptr, diff_ptr, pid_m, pid_n, offs_m, offs_n, mask_m, mask_n, n_real_f, n_syn_f, c_real, c_syn, rho,
        dim_x, dim_y, n_blocks, corr_x_side, corr_y_side, mean_x_off, mean_y_off, squares_off, corr_x_off, corr_y_off,
        scale_off, partial_off, STORE_DIFF, CORR_REAL, CORR_SYN, SCALE_DIFF, SQUARES_BLOCK, False, False,
        BLOCK_M, BLOCK_N,
    )  # fmt: skip


@triton.jit
def _finish_kernel(ws_ptr, partial_off, n_mean_partials, n_cov_partials, lam, out_off, BLOCK: tl.constexpr):
    """out = [loss, covariance term, mean term] from the partials (mean ones first), summed in a fixed order."""
    partial_ptr = ws_ptr + partial_off
    out_ptr = ws_ptr + out_off
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
def _grad_epilogue(
    acc, rows, cols, mask_r, mask_c, corr_ptr, corr_rows, gap_ptr, scale_ptr, grad_ptr, out_ptr, n_cols,
    alpha, beta, CORRECT: tl.constexpr, SCALED: tl.constexpr,
):  # fmt: skip
    """out = g * (alpha / s * (acc - corr) + beta * gap) for one output tile: ``corr`` the centring correction
    (the sum of ``corr_rows`` partial rows, in a fixed order), ``gap`` the real minus synthetic column means."""
    if CORRECT:
        corr = tl.zeros_like(tl.sum(acc, axis=0))
        for r in range(0, corr_rows):
            corr += tl.load(corr_ptr + r * n_cols + cols, mask=mask_c, other=0.0)
        acc = acc - corr[None, :]
    if SCALED:
        alpha = alpha * tl.load(scale_ptr)
    gap = tl.load(gap_ptr + cols, mask=mask_c, other=0.0) - tl.load(gap_ptr + n_cols + cols, mask=mask_c, other=0.0)
    g = tl.load(grad_ptr).to(tl.float32)
    out = g * (alpha * acc + beta * gap[None, :])
    tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_r[:, None] & mask_c[None, :])  # fmt: skip


@triton.jit
def _grad_tile_index(t, n_rows, tiles_n, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of output tile ``t`` in grouped order: GROUP_M row tiles sweep the columns
    together, so the B columns they share stay in L2."""
    tiles_m = tl.cdiv(n_rows, BLOCK_M)
    per_group = GROUP_M * tiles_n
    first_m = (t // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (t % per_group) % group_rows, (t % per_group) // group_rows


@triton.jit
def _cov_grad_kernel(
    a_ptr, b_ptr, fwd_ptr, grad_ptr, out_ptr, ws_ptr,
    n_rows, n_inner, n_cols, corr_rows, tiles, tiles_n, chunk,
    mean_a_off, corr_off, gap_off, scale_off, stride_bk, stride_bc,
    alpha, beta,
    SPLIT: tl.constexpr, CENTRE_ON_LOAD: tl.constexpr, SCALED: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One gradient of one side: out = g * (alpha (A - 1 mu_A^T) B + beta gap), A the other modality's rows
    [n_rows, n_inner] (contiguous) and B = D^T (for dL/dX: ``stride_bk`` 1) or D (for dL/dY: ``stride_bc`` 1).
    Half operands: the mainloop is the plain GEMM A B and the centring ``mu_A^T B`` arrives from the forward's
    partials; fp32 operands: A is centred on load. The means, partials and 1/s are read from the forward's
    workspace ``fwd`` at the given offsets. With SPLIT > 1 the grid repeats SPLIT times, split s covering inner
    indices s*chunk .. (s+1)*chunk and storing its fp32 product in ``ws`` for ``_grad_reduce_kernel``."""
    pid = tl.program_id(0)
    split = pid // tiles
    pid_m, pid_n = _grad_tile_index(pid % tiles, n_rows, tiles_n, BLOCK_M, GROUP_M)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = rows < n_rows
    mask_c = cols < n_cols
    k_lo = split * chunk
    k_hi = tl.minimum(k_lo + chunk, n_inner)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * n_inner + (k_lo + offs_k)[None, :]
    b_ptrs = b_ptr + (k_lo + offs_k).to(tl.int64)[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bc
    step_b = BLOCK_K * stride_bk  # < 2^31: BLOCK_K times a row length
    if CENTRE_ON_LOAD:
        mu_ptrs = fwd_ptr + mean_a_off + k_lo + offs_k
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(k_lo, k_hi, BLOCK_K):
        mask_k = offs_k < k_hi - start
        a = tl.load(a_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_c[None, :], other=0.0)
        if CENTRE_ON_LOAD:
            mu = tl.load(mu_ptrs, mask=mask_k, other=0.0)
            a = tl.where(mask_r[:, None] & mask_k[None, :], a.to(tl.float32) - mu[None, :], 0.0)
            mu_ptrs += BLOCK_K
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += step_b
    if SPLIT > 1:
        ws = ws_ptr + split.to(tl.int64) * n_rows * n_cols
        tl.store(ws + rows[:, None] * n_cols + cols[None, :], acc, mask=mask_r[:, None] & mask_c[None, :])
    else:
        _grad_epilogue(acc, rows, cols, mask_r, mask_c, fwd_ptr + corr_off, corr_rows, fwd_ptr + gap_off,
                       fwd_ptr + scale_off, grad_ptr, out_ptr, n_cols, alpha, beta,
                       not CENTRE_ON_LOAD, SCALED)  # fmt: skip


@triton.jit
def _grad_reduce_kernel(
    ws_ptr, fwd_ptr, grad_ptr, out_ptr, n_rows, n_cols, corr_rows, tiles_n, corr_off, gap_off, scale_off,
    alpha, beta,
    SPLIT: tl.constexpr, CORRECT: tl.constexpr, SCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The split-K fix-up: the splits' products summed in a fixed order (deterministic, no atomics), then the
    same epilogue as the unsplit kernel."""
    pid = tl.program_id(0)
    rows = ((pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = rows < n_rows
    mask_c = cols < n_cols
    mask = mask_r[:, None] & mask_c[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(ws_ptr + s * n_rows.to(tl.int64) * n_cols + rows[:, None] * n_cols + cols[None, :], mask=mask,
                       other=0.0)  # fmt: skip
    _grad_epilogue(acc, rows, cols, mask_r, mask_c, fwd_ptr + corr_off, corr_rows, fwd_ptr + gap_off,
                   fwd_ptr + scale_off, grad_ptr, out_ptr, n_cols, alpha, beta, CORRECT, SCALED)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Tile configurations (ordered: the first is what runs unless COVMATCH_TRITON_AUTOTUNE=1 times them)
# --------------------------------------------------------------------------------------------------

# Half-precision operands: big tiles for the tensor cores; fp32: smaller (TF32/fp32 operands are twice the size).
# The entries after the smallest tile are never a default (the default is the first whose grid fills the SMs,
# else the one with most programs): they are Hopper-sized tiles only COVMATCH_TRITON_AUTOTUNE=1 tries.
# Every half-precision tile is a multiple of CORRECTION_BLOCK in both dimensions.
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
        TileConfig(64, 128, 64, num_warps=4, num_stages=4),
        TileConfig(64, 64, 64, num_warps=4, num_stages=4),
        TileConfig(128, 128, 64, num_warps=8, num_stages=3),
        TileConfig(128, 256, 64, num_warps=8, num_stages=3),
    ),
    "fp32": (TileConfig(64, 64, 32, num_warps=4, num_stages=3), TileConfig(32, 64, 32, num_warps=4, num_stages=3)),
}
_GROUP_M = 8
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
    ||mu_xr - mu_xs||^2 + ||mu_yr - mu_ys||^2 (0-dim fp32 views of the workspace's first three elements);
    ``diff`` = s * D ([d_x, d_y] in the inputs' shared half dtype, else fp32; None when not requested);
    ``workspace`` the fp32 buffer the backward reads (column means, 1/s, correction partials:
    ``CovariancePlan.layout`` says where).
    """

    loss: Optional[torch.Tensor]
    diff: Optional[torch.Tensor]
    workspace: torch.Tensor

    @property
    def cov_loss(self) -> torch.Tensor:
        return self.workspace[1]

    @property
    def mean_loss(self) -> torch.Tensor:
        return self.workspace[2]


def diff_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype D is kept in: the four inputs' shared half dtype, else fp32."""
    dot = dot_operand_dtype(*dtypes)
    return dtypes[0] if dot != tl.float32 else torch.float32


def correction_rows(dim: int) -> int:
    """Rows of a correction-partials buffer over ``dim`` columns of D: one per 64, rounded up to whole 256-wide
    tiles (the widest), so the layout does not depend on the tile configuration."""
    return 4 * cdiv(dim, 256)


def _aligned(n: int) -> int:
    """n rounded up to 16 elements (64 bytes): workspace offsets stay 16-divisible for the compiler."""
    return -(-n // 16) * 16


@dataclass
class _ForwardLaunches:
    """The forward's three launches, fixed per plan, with their scalar arguments and (FLOPs, bytes) costs."""

    stats: PreboundLaunch
    stats_scalars: tuple
    diff: PreboundLaunch
    diff_scalars: tuple
    finish: PreboundLaunch
    finish_scalars: tuple
    costs: tuple


@dataclass
class _GradLaunch:
    """One gradient's launch, fixed per plan: the GEMM and (split-K or hybrid) its reduction, with their scalar
    arguments and costs."""

    split: int
    shape: tuple  # (rows, columns, dtype) of the gradient
    launch: Optional[PreboundLaunch]
    scalars: tuple
    reduce: PreboundLaunch
    reduce_scalars: tuple
    flops: float
    bytes_moved: float


class CovariancePlan:
    """Everything about one call signature (sizes, dtypes, device, rho, lam, which gradients, dot precision)
    that does not depend on the values: tile configurations, grids, constexprs, scalar arguments and the
    layout of the one fp32 workspace a forward allocates, decided once (``covariance_plan``), so that a call
    allocates the workspace, D and the gradients, and launches.

    Workspace (``layout``, offsets in elements): ``out`` [loss, covariance term, mean term], ``scale`` 1/s,
    ``mean_x`` [2, d_x] and ``mean_y`` [2, d_y] (real row 0, synthetic row 1), ``squares`` [4, blocks] (fp16),
    ``partials`` (mean term, then one per D tile), ``corr_x`` [2, r_x, d_x] and ``corr_y`` [2, r_y, d_y] (the
    real (0) and synthetic (1) side's correction partials; half dtypes with a gradient only).
    """

    def __init__(self, n_real: int, n_syn: int, dim_x: int, dim_y: int, dtypes: Tuple[torch.dtype, ...],
                 device: torch.device, rho: float, lam: float, needs: Tuple[bool, ...],
                 hybrid: bool = False) -> None:  # fmt: skip
        self.hybrid = hybrid
        self.n_real, self.n_syn, self.dim_x, self.dim_y = n_real, n_syn, dim_x, dim_y
        self.dtypes, self.device, self.rho, self.lam, self.needs = dtypes, device, float(rho), float(lam), needs
        self.real_dot = dot_operand_dtype(dtypes[0], dtypes[1])
        self.syn_dot = dot_operand_dtype(dtypes[2], dtypes[3])
        self.precision = fp32_dot_precision()
        self.store_diff = any(needs)
        self.diff_dtype = diff_dtype(*dtypes)
        half = self.diff_dtype != torch.float32
        self.scaled = self.store_diff and self.diff_dtype == torch.float16
        self.corr_sides = (half and (needs[0] or needs[1]), half and (needs[2] or needs[3]))
        self.n_blocks = cdiv(max(dim_x, dim_y), _MEANS_BLOCK_D)
        self.n_mean_partials = 2 * self.n_blocks
        self.rows_x, self.rows_y = correction_rows(dim_y), correction_rows(dim_x)
        kind = "fp32" if tl.float32 in (self.real_dot, self.syn_dot) else "half"
        if hybrid:
            self.diff_configs = (_HYBRID_TILE,)
        else:
            self.diff_configs = (_INTERPRETER_CONFIG,) if interpreter_enabled() else _DIFF_CONFIGS[kind]
        most_tiles = max(cdiv(dim_x, c.block_m) * cdiv(dim_y, c.block_n) for c in self.diff_configs)
        corrected = any(self.corr_sides)
        sizes = (("out", 3), ("scale", 1), ("mean_x", 2 * dim_x), ("mean_y", 2 * dim_y),
                 ("squares", 4 * self.n_blocks if self.scaled else 0), ("partials", self.n_mean_partials + most_tiles),
                 ("corr_x", 2 * self.rows_x * dim_x if corrected else 0),
                 ("corr_y", 2 * self.rows_y * dim_y if corrected else 0))  # fmt: skip
        self.layout: Dict[str, int] = {}
        offset = 0
        for name, size in sizes:
            self.layout[name] = offset
            offset += _aligned(size)
        self.workspace_size = offset
        self._diff_config: Optional[TileConfig] = None
        self._forward_launch: Optional[_ForwardLaunches] = None
        self._grads: Dict[Tuple[int, int], _GradLaunch] = {}

    # ------------------------------------------------------------------ forward

    def diff_config(self, inputs=None) -> TileConfig:
        """The D kernel's tile configuration (timed on ``inputs`` under COVMATCH_TRITON_AUTOTUNE=1)."""
        if self._diff_config is None:
            key = (self.dim_x, self.dim_y, self.n_real, self.n_syn, str(self.real_dot), str(self.syn_dot),
                   self.precision, self.store_diff)  # fmt: skip

            def programs(c: TileConfig) -> int:
                return cdiv(self.dim_x, c.block_m) * cdiv(self.dim_y, c.block_n)

            timer = None if inputs is None else (lambda c: bench(lambda: self._forward(inputs, c)))
            self._diff_config = choose_config("covmatch_cov_diff", key, self.diff_configs, timer, programs)
        return self._diff_config

    def forward(self, real_x, real_y, syn_x, syn_y, *, zeroed: bool = False) -> CovarianceForward:
        """Launches 1-3 on contiguous inputs of the planned shapes and dtypes. ``zeroed``: the workspace
        starts as zeros (one fill more), so that every element of it is a function of the inputs."""
        inputs = (real_x, real_y, syn_x, syn_y)
        if self._forward_launch is None:
            self._forward_launch = self._forward_arguments(self.diff_config(inputs))
        return self._run_forward(inputs, self._forward_launch, zeroed=zeroed)

    def _forward(self, inputs, config: TileConfig) -> CovarianceForward:
        return self._run_forward(inputs, self._forward_arguments(config))

    def _forward_arguments(self, config: TileConfig) -> _ForwardLaunches:
        """Launches 1-3 (grids, constexprs) and their scalar arguments for a D tile configuration."""
        n_real, n_syn, dim_x, dim_y, at = self.n_real, self.n_syn, self.dim_x, self.dim_y, self.layout
        grid = (cdiv(dim_x, config.block_m), cdiv(dim_y, config.block_n))
        stats = ((n_real, n_syn, dim_x, dim_y, at["mean_x"], at["mean_y"], at["partials"], at["squares"]),
                 dict(SQUARES=self.scaled, BLOCK_R=_MEANS_BLOCK_R, BLOCK_D=_MEANS_BLOCK_D))  # fmt: skip
        diff = (grid,
                (n_real, n_syn, dim_x, dim_y, self.n_blocks, self.rows_x * dim_x, self.rows_y * dim_y,
                 at["mean_x"], at["mean_y"], at["squares"], at["corr_x"], at["corr_y"], at["scale"],
                 at["partials"] + self.n_mean_partials, self.rho),
                dict(STORE_DIFF=self.store_diff, CORR_REAL=self.corr_sides[0], CORR_SYN=self.corr_sides[1],
                     SCALE_DIFF=self.scaled, SQUARES_BLOCK=triton.next_power_of_2(self.n_blocks),
                     REAL_CENTRE=self.real_dot == tl.float32, SYN_CENTRE=self.syn_dot == tl.float32,
                     REAL_DOT=self.real_dot, SYN_DOT=self.syn_dot, PRECISION=self.precision,
                     BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k),
                config)  # fmt: skip
        diff_kernel = _cov_diff_kernel
        if self.hybrid:
            diff_kernel = _hybrid_diff_kernel
            hybrid_keys = ("STORE_DIFF", "CORR_REAL", "CORR_SYN", "SCALE_DIFF", "SQUARES_BLOCK", "BLOCK_M", "BLOCK_N")
            diff = (diff[0], diff[1], {k: diff[2][k] for k in hybrid_keys}, config)
        finish = (at["partials"], self.n_mean_partials, grid[0] * grid[1], self.lam, at["out"])
        elements = (n_real + n_syn) * (dim_x + dim_y)
        item = self.dtypes[0].itemsize
        d_bytes = dim_x * dim_y * self.diff_dtype.itemsize if self.store_diff else 0
        products = 2.0 * (n_real + n_syn) * dim_x * dim_y
        return _ForwardLaunches(
            stats=PreboundLaunch(_column_stats_kernel, (self.n_blocks, 2), stats[1], _MEANS_CONFIG),
            stats_scalars=stats[0],
            diff=PreboundLaunch(diff_kernel, grid, diff[2], config),
            diff_scalars=diff[1],
            finish=PreboundLaunch(_finish_kernel, (1,), _FINISH_KWARGS, _FINISH_CONFIG),
            finish_scalars=finish,
            costs=(float(elements), float(elements * item),
                   2.0 * dim_x * dim_y if self.hybrid else products,
                   float(dim_x * dim_y * 8 + d_bytes) if self.hybrid else float(elements * item + d_bytes),
                   float(finish[2]), float(4 * (finish[1] + finish[2]))),
        )  # fmt: skip

    def _run_forward(self, inputs, launches: _ForwardLaunches, zeroed: bool = False) -> CovarianceForward:
        real_x, real_y, syn_x, syn_y = inputs
        costs = launches.costs
        ws = (torch.zeros if zeroed else torch.empty)(self.workspace_size, dtype=torch.float32, device=self.device)
        launches.stats((real_x, real_y, syn_x, syn_y, ws, *launches.stats_scalars), costs[0], costs[1])
        diff = None
        if self.store_diff:
            diff = torch.empty(self.dim_x, self.dim_y, dtype=self.diff_dtype, device=self.device)
        diff_arg = ws if diff is None else diff
        if self.hybrid:  # the products through cuBLAS (fp32 out), the rest in one bandwidth-bound epilogue
            real_prod, syn_prod = mm_fp32(real_x.t(), real_y), mm_fp32(syn_x.t(), syn_y)
            launches.diff((real_prod, syn_prod, ws, diff_arg, *launches.diff_scalars), costs[2], costs[3])
        else:
            launches.diff((real_x, real_y, syn_x, syn_y, ws, diff_arg, *launches.diff_scalars), costs[2], costs[3])
        launches.finish((ws, *launches.finish_scalars), costs[4], costs[5])
        return CovarianceForward(ws[0], diff, ws)

    # ------------------------------------------------------------------ backward

    def _grad_launch(self, side: int, which: int) -> _GradLaunch:
        """The launch of dL/dX (``which`` 0) or dL/dY (1) of a side (0 real, 1 synthetic)."""
        found = self._grads.get((side, which))
        if found is not None:
            return found
        n_rows = self.n_real if side == 0 else self.n_syn
        n_cols, n_inner = (self.dim_x, self.dim_y) if which == 0 else (self.dim_y, self.dim_x)
        other = self.dtypes[2 * side + 1 - which]  # the A operand: the other modality of the side
        dot = dot_operand_dtype(other, self.diff_dtype)
        configs = (_INTERPRETER_CONFIG,) if interpreter_enabled() else _GRAD_CONFIGS[_kind(dot)]

        def programs(c: TileConfig) -> int:
            return cdiv(n_rows, c.block_m) * cdiv(n_cols, c.block_n)

        key = (n_rows, n_cols, n_inner, str(dot), self.precision, which)
        config = _HYBRID_TILE if self.hybrid else choose_config("covmatch_cov_grad", key, configs, None, programs)
        tiles_n = cdiv(n_cols, config.block_n)
        tiles = cdiv(n_rows, config.block_m) * tiles_n
        split = 1 if self.hybrid else split_k(tiles, n_inner, config.block_k, sm_count())
        chunk = n_inner if self.hybrid else cdiv(cdiv(n_inner, split), config.block_k) * config.block_k
        diff_cfg = self.diff_config()
        at = self.layout
        if which == 0:  # dL/dX sums the partials over D's column tiles; B = D^T
            corr_rows = cdiv(self.dim_y, diff_cfg.block_n) * (diff_cfg.block_n // CORRECTION_BLOCK)
            corr_off = at["corr_x"] + side * self.rows_x * self.dim_x
            mean_a_off, gap_off, stride_bk, stride_bc = at["mean_y"] + side * self.dim_y, at["mean_x"], 1, self.dim_y
        else:  # dL/dY over D's row tiles; B = D
            corr_rows = cdiv(self.dim_x, diff_cfg.block_m) * (diff_cfg.block_m // CORRECTION_BLOCK)
            corr_off = at["corr_y"] + side * self.rows_y * self.dim_y
            mean_a_off, gap_off, stride_bk, stride_bc = at["mean_x"] + side * self.dim_x, at["mean_y"], self.dim_y, 1
        alpha = 2.0 * self.rho / (n_rows - 1) if side == 0 else -2.0 / (n_rows - 1)
        beta = 2.0 * self.lam / n_rows if side == 0 else -2.0 * self.lam / n_rows
        centre = dot == tl.float32
        gemm = None
        if not self.hybrid:
            gemm = PreboundLaunch(
                _cov_grad_kernel, (split * tiles,),
                dict(SPLIT=split, CENTRE_ON_LOAD=centre, SCALED=self.scaled, DOT_DTYPE=dot, PRECISION=self.precision,
                     GROUP_M=_GROUP_M, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k),
                config,
            )  # fmt: skip
        reduce = PreboundLaunch(
            _grad_reduce_kernel, (tiles,),
            dict(SPLIT=split, CORRECT=self.hybrid or not centre, SCALED=self.scaled,
                 BLOCK_M=config.block_m, BLOCK_N=config.block_n),
            TileConfig(config.block_m, config.block_n, 0, num_warps=4, num_stages=1),
        )  # fmt: skip
        launch = _GradLaunch(
            split=split, shape=(n_rows, n_cols, self.dtypes[2 * side + which]), launch=gemm,
            scalars=(n_rows, n_inner, n_cols, corr_rows, tiles, tiles_n, chunk, mean_a_off, corr_off, gap_off,
                     at["scale"], stride_bk, stride_bc, alpha, beta),
            reduce=reduce,
            reduce_scalars=(n_rows, n_cols, corr_rows, tiles_n, corr_off, gap_off, at["scale"], alpha, beta),
            flops=2.0 * n_rows * n_cols * n_inner,
            bytes_moved=float(n_rows * (n_inner * other.itemsize + n_cols * self.dtypes[2 * side + which].itemsize)
                              + n_cols * n_inner * self.diff_dtype.itemsize),
        )  # fmt: skip
        self._grads[(side, which)] = launch
        return launch

    def grads(self, side: int, x, y, diff: torch.Tensor, workspace: torch.Tensor, grad_scale: torch.Tensor):
        """dL/dX and dL/dY of one side (None where the plan needs none), one launch each (two with split-K):
        ``grad_scale * (alpha (Y - 1 mu_Y^T) D^T + beta (mu_XT - mu_XS))`` and the same with X and D, alpha
        = 2 rho / (n_T - 1) real and -2 / (n_S - 1) synthetic, beta the mean term's 2 lam / n with the same
        signs (docs/design.md, *Gradients*). ``x``, ``y`` contiguous; ``diff`` and ``workspace`` the forward's
        (``CovarianceForward``); ``grad_scale`` a 0-dim fp32 tensor read on the device."""
        out = [None, None]
        for which in (0, 1):
            if not self.needs[2 * side + which]:
                continue
            plan = self._grad_launch(side, which)
            a = y if which == 0 else x
            n_rows, n_cols, dtype = plan.shape
            grad = torch.empty(n_rows, n_cols, dtype=dtype, device=self.device)
            if self.hybrid:  # the product through cuBLAS (fp32 out), then the split-K fix-up's epilogue
                product = mm_fp32(a, diff.t() if which == 0 else diff)
                plan.reduce((product, workspace, grad_scale, grad, *plan.reduce_scalars), float(3 * grad.numel()),
                            float(4 * product.numel() + grad.numel() * grad.element_size()))  # fmt: skip
                out[which] = grad
                continue
            ws = workspace
            if plan.split > 1:
                ws = torch.empty(plan.split, n_rows, n_cols, dtype=torch.float32, device=self.device)
            plan.launch((a, diff, workspace, grad_scale, grad, ws, *plan.scalars), plan.flops, plan.bytes_moved)
            if plan.split > 1:
                plan.reduce((ws, workspace, grad_scale, grad, *plan.reduce_scalars), float(ws.numel()),
                            float(4 * (ws.numel() + grad.numel())))  # fmt: skip
            out[which] = grad
        return out[0], out[1]


_FINISH_KWARGS = dict(BLOCK=_FINISH_BLOCK)
# The large-shape path's epilogue tiles (bandwidth-bound; a multiple of CORRECTION_BLOCK both ways).
_HYBRID_TILE = TileConfig(64, 128, 0, num_warps=4, num_stages=1)
_MM_OUT_DTYPE: Dict[str, bool] = {}


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result: cuBLAS's half-precision GEMM with fp32 output (``out_dtype``, CUDA, recent
    torch), else the GEMM of the operands upcast to fp32 (the same products: half values are exact in fp32
    and in TF32)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    kind = a.device.type
    if _MM_OUT_DTYPE.get(kind, kind in ("cuda", "meta")):  # meta: what a CUDA call would dispatch (inspection)
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch or a device without the overload
            _MM_OUT_DTYPE[kind] = False
    return torch.mm(a.float(), b.float())


_PLANS: Dict[Hashable, CovariancePlan] = {}
_MAX_PLANS = 1024


def covariance_plan(
    n_real: int, n_syn: int, dim_x: int, dim_y: int, dtypes: Tuple[torch.dtype, ...], device: torch.device,
    rho: float, lam: float, needs: Tuple[bool, ...], hybrid: bool = False,
) -> CovariancePlan:  # fmt: skip
    """The cached plan of one call signature (the dot precision, which follows torch's TF32 setting, included);
    ``hybrid``: the products through cuBLAS, the rest in the kernels' epilogues (the large-shape path)."""
    key = (n_real, n_syn, dim_x, dim_y, dtypes, device, float(rho), float(lam), tuple(needs),
           fp32_dot_precision(), hybrid)  # fmt: skip
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = CovariancePlan(n_real, n_syn, dim_x, dim_y, dtypes, device, rho, lam, tuple(needs),
                                            hybrid)  # fmt: skip
    return plan


def split_k(programs: int, inner: int, block_k: int, sms: int) -> int:
    """Splits of the gradient GEMMs' inner dimension: 1 when the output tiles fill the GPU's ``sms``, else
    enough to fill it, keeping at least two ``block_k`` steps per split."""
    if programs >= sms:
        return 1
    return max(1, min(cdiv(sms, programs), inner // (2 * block_k)))
