"""Gram-form CovMatch kernels (docs/design.md, *Two algebraic forms*): cost ~ (n_T + n_S)^2 * (d_x + d_y).

Stack the real and synthetic rows, Z_x = [X_T; X_S] and Z_y = [Y_T; Y_S], centre each block by its own
mean and weight row i by ``w_i = rho/(n_T-1)`` (real) or ``-1/(n_S-1)`` (synthetic). Then
``D = Z_x^T diag(w) Z_y`` and

    ||D||_F^2 = w^T (K_x o K_y) w,      K_x = Zc_x Zc_x^T,  K_y = Zc_y Zc_y^T,

so the d_x x d_y matrix is never formed: cheaper whenever n_T + n_S is small next to d_x*d_y/(d_x+d_y).
The forward computes the upper-triangle tiles of K_x and K_y and reduces the weighted Hadamard product
per tile; the two n x n Gram matrices are kept for backward, where

    dL/dZ_x[i] = 2 w_i sum_j K_y[i, j] w_j Zc_x[j]     (and symmetrically for Z_y)

is one GEMM per modality with the centring applied on load. Cancellation caveat: the loss is a sum of
terms of size ||C||^2, so its absolute error scales with ||C||^2, not with the loss. Row offsets are 64-bit.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from covmatch.constants import cached_constant

from ._launch import (
    TileConfig,
    bench,
    cdiv,
    choose_config,
    dot_operand_dtype,
    fp32_dot_precision,
    interpreter_enabled,
    launch_kernel,
)

__all__ = ["GramForward", "gram_forward", "gram_grad"]


@triton.jit
def _centred_tile(z_ptr, mean_ptr, rows, cols, mask_rows, mask_cols, n_real, dim, stride_n, stride_d):
    """Load Z[rows, cols] in fp32, each row centred by its block's mean (real rows first), zero outside."""
    z = tl.load(
        z_ptr + rows.to(tl.int64)[:, None] * stride_n + cols[None, :] * stride_d,
        mask=mask_rows[:, None] & mask_cols[None, :],
        other=0.0,
    ).to(tl.float32)
    mu_real = tl.load(mean_ptr + cols, mask=mask_cols, other=0.0)
    mu_syn = tl.load(mean_ptr + dim + cols, mask=mask_cols, other=0.0)
    mu = tl.where((rows < n_real)[:, None], mu_real[None, :], mu_syn[None, :])
    return tl.where(mask_rows[:, None] & mask_cols[None, :], z - mu, 0.0)


@triton.jit
def _gram_tile(
    z_ptr, mean_ptr, rows_i, rows_j, mask_i, mask_j, n_real, dim, stride_n, stride_d,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One [BLOCK, BLOCK] tile of Zc Zc^T, accumulated in fp32 over the feature dimension."""
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for start in range(0, dim, BLOCK_K):
        cols = start + offs_k
        mask_k = cols < dim
        zi = _centred_tile(z_ptr, mean_ptr, rows_i, cols, mask_i, mask_k, n_real, dim, stride_n, stride_d)
        zj = _centred_tile(z_ptr, mean_ptr, rows_j, cols, mask_j, mask_k, n_real, dim, stride_n, stride_d)
        acc = tl.dot(zi.to(DOT_DTYPE), tl.trans(zj.to(DOT_DTYPE)), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _covmatch_gram_fwd_kernel(
    zx_ptr, zy_ptr, mean_x_ptr, mean_y_ptr, weight_ptr, pairs_ptr,
    gram_x_ptr, gram_y_ptr, partial_ptr,
    n_total, n_real, dim_x, dim_y,
    stride_zx_n, stride_zx_d, stride_zy_n, stride_zy_d, stride_g_n, stride_g_m,
    STORE_GRAM: tl.constexpr, X_DOT: tl.constexpr, Y_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    block_i = tl.load(pairs_ptr + 2 * pid)
    block_j = tl.load(pairs_ptr + 2 * pid + 1)
    rows_i = block_i * BLOCK + tl.arange(0, BLOCK)
    rows_j = block_j * BLOCK + tl.arange(0, BLOCK)
    mask_i = rows_i < n_total
    mask_j = rows_j < n_total

    kx = _gram_tile(zx_ptr, mean_x_ptr, rows_i, rows_j, mask_i, mask_j, n_real, dim_x,
                    stride_zx_n, stride_zx_d, BLOCK, BLOCK_K, X_DOT, PRECISION)  # fmt: skip
    ky = _gram_tile(zy_ptr, mean_y_ptr, rows_i, rows_j, mask_i, mask_j, n_real, dim_y,
                    stride_zy_n, stride_zy_d, BLOCK, BLOCK_K, Y_DOT, PRECISION)  # fmt: skip

    w_i = tl.load(weight_ptr + rows_i, mask=mask_i, other=0.0)
    w_j = tl.load(weight_ptr + rows_j, mask=mask_j, other=0.0)
    part = tl.sum(tl.sum(w_i[:, None] * w_j[None, :] * kx * ky, axis=1), axis=0)
    # An off-diagonal tile stands for itself and its mirror image.
    part = tl.where(block_i == block_j, part, 2.0 * part)
    tl.store(partial_ptr + pid, part)

    if STORE_GRAM:
        tile_mask = mask_i[:, None] & mask_j[None, :]
        offs = rows_i.to(tl.int64)[:, None] * stride_g_n + rows_j[None, :] * stride_g_m
        offs_t = rows_j.to(tl.int64)[None, :] * stride_g_n + rows_i[:, None] * stride_g_m
        tl.store(gram_x_ptr + offs, kx, mask=tile_mask)
        tl.store(gram_y_ptr + offs, ky, mask=tile_mask)
        tl.store(gram_x_ptr + offs_t, kx, mask=tile_mask & (block_i != block_j))
        tl.store(gram_y_ptr + offs_t, ky, mask=tile_mask & (block_i != block_j))


@triton.jit
def _gram_grad_kernel(
    gram_ptr, weight_ptr, z_ptr, mean_ptr, bias_ptr, grad_ptr, out_ptr,
    row_start, n_out, n_total, n_real, dim,
    stride_g_n, stride_g_m, stride_z_n, stride_z_d, stride_on, stride_od,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[r] = g * (2 w_i sum_j K[i, j] w_j Zc[j] + bias), i = row_start + r: the gradient of ||D||^2."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = row_start + local
    mask_r = local < n_out
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_c = cols < dim
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, n_total, BLOCK_K):
        js = start + offs_k
        mask_k = js < n_total
        k = tl.load(
            gram_ptr + rows.to(tl.int64)[:, None] * stride_g_n + js[None, :] * stride_g_m,
            mask=mask_r[:, None] & mask_k[None, :],
            other=0.0,
        )
        w_j = tl.load(weight_ptr + js, mask=mask_k, other=0.0)
        z = _centred_tile(z_ptr, mean_ptr, js, cols, mask_k, mask_c, n_real, dim, stride_z_n, stride_z_d)
        acc = tl.dot(k * w_j[None, :], z, acc, input_precision=PRECISION)
    w_i = tl.load(weight_ptr + rows, mask=mask_r, other=0.0)
    bias = tl.load(bias_ptr + cols, mask=mask_c, other=0.0)
    g = tl.load(grad_ptr).to(tl.float32)
    out = g * (2.0 * w_i[:, None] * acc + bias[None, :])
    tl.store(
        out_ptr + local.to(tl.int64)[:, None] * stride_on + cols[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=mask_r[:, None] & mask_c[None, :],
    )


_FWD_CONFIGS = (
    TileConfig(64, 64, 64, num_warps=4, num_stages=3),
    TileConfig(128, 128, 32, num_warps=8, num_stages=3),
    TileConfig(64, 64, 128, num_warps=4, num_stages=3),
    TileConfig(32, 32, 128, num_warps=4, num_stages=3),
)
_GRAD_CONFIGS = (
    TileConfig(64, 64, 32, num_warps=4, num_stages=3),
    TileConfig(64, 128, 32, num_warps=4, num_stages=3),
    TileConfig(128, 128, 32, num_warps=8, num_stages=3),
    TileConfig(32, 128, 64, num_warps=4, num_stages=3),
)
_INTERPRETER_CONFIG = TileConfig(64, 64, 64, num_warps=4, num_stages=1)


def _upper_triangle_pairs(n_blocks: int, device: torch.device) -> torch.Tensor:
    """(i, j) block pairs with j >= i, flattened to int32 [2 * count]: the forward's 1-D grid, made on the
    device itself (no host-to-device copy, which a CUDA-graph capture would not allow) and cached."""

    def make() -> torch.Tensor:
        idx = torch.triu_indices(n_blocks, n_blocks, device=device)
        return idx.t().contiguous().to(dtype=torch.int32).reshape(-1)

    return cached_constant(("gram_upper_triangle_pairs", n_blocks), device, make)


@dataclass
class GramForward:
    """Gram-form forward: ``cov_loss`` = ||D||_F^2 (0-dim fp32) and, when requested, ``gram_x`` and
    ``gram_y`` = the [n_total, n_total] fp32 Gram matrices of the centred stacked features."""

    cov_loss: torch.Tensor
    gram_x: Optional[torch.Tensor]
    gram_y: Optional[torch.Tensor]


def gram_forward(
    z_x: torch.Tensor,
    z_y: torch.Tensor,
    mean_x: torch.Tensor,
    mean_y: torch.Tensor,
    weights: torch.Tensor,
    n_real: int,
    store_gram: bool,
) -> GramForward:
    """||Z_x^T diag(w) Z_y||_F^2 for stacked, block-centred features without forming the d_x x d_y matrix.

    ``z_x`` [n, d_x] and ``z_y`` [n, d_y] hold the real rows first; ``mean_x`` [2, d_x] / ``mean_y``
    [2, d_y] the real and synthetic column means (fp32); ``weights`` [n] fp32.
    """
    n_total, dim_x = z_x.shape
    dim_y = z_y.shape[1]
    device = z_x.device
    x_dot = dot_operand_dtype(z_x.dtype)
    y_dot = dot_operand_dtype(z_y.dtype)
    precision = fp32_dot_precision()

    def run(config: TileConfig) -> GramForward:
        n_blocks = cdiv(n_total, config.block_m)
        pairs = _upper_triangle_pairs(n_blocks, device)
        n_programs = n_blocks * (n_blocks + 1) // 2
        partials = torch.empty(n_programs, dtype=torch.float32, device=device)
        if store_gram:
            gram_x = torch.empty((n_total, n_total), dtype=torch.float32, device=device)
            gram_y = torch.empty_like(gram_x)
        else:
            gram_x = gram_y = None
        launch_kernel(
            _covmatch_gram_fwd_kernel, (n_programs,),
            (z_x, z_y, mean_x, mean_y, weights, pairs,
             gram_x if store_gram else partials, gram_y if store_gram else partials, partials,
             n_total, n_real, dim_x, dim_y, *z_x.stride(), *z_y.stride(),
             n_total if store_gram else 0, 1 if store_gram else 0),
            dict(STORE_GRAM=store_gram, X_DOT=x_dot, Y_DOT=y_dot, PRECISION=precision,
                 BLOCK=config.block_m, BLOCK_K=config.block_k),
            config,
            flops=float(n_total * n_total * (dim_x + dim_y)),
            bytes_moved=float(n_total * (dim_x + dim_y) * z_x.element_size() * n_blocks),
        )  # fmt: skip
        return GramForward(partials.sum(), gram_x, gram_y)

    configs = (_INTERPRETER_CONFIG,) if interpreter_enabled() else _FWD_CONFIGS
    key = (n_total, dim_x, dim_y, str(x_dot), str(y_dot), precision, store_gram)
    return run(choose_config("covmatch_gram_fwd", key, configs, lambda c: bench(lambda: run(c))))


def gram_grad(
    gram_other: torch.Tensor,
    weights: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    n_real: int,
    row_start: int,
    n_out: int,
    bias: torch.Tensor,
    grad_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Gradient of the Gram-form loss for rows ``row_start : row_start + n_out`` of the stacked ``z``.

    ``gram_other`` is the Gram matrix of the *other* modality; ``bias`` [d] fp32 is added to every row
    (the mean-term gradient); the result is scaled by the 0-dim ``grad_scale`` on device.
    """
    n_total, dim = z.shape
    precision = fp32_dot_precision()

    def run(config: TileConfig) -> torch.Tensor:
        out = torch.empty((n_out, dim), dtype=out_dtype, device=z.device)
        grid = (cdiv(n_out, config.block_m), cdiv(dim, config.block_n))
        launch_kernel(
            _gram_grad_kernel, grid,
            (gram_other, weights, z, mean, bias, grad_scale, out, row_start, n_out, n_total, n_real, dim,
             *gram_other.stride(), *z.stride(), *out.stride()),
            dict(PRECISION=precision, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k),
            config,
            flops=2.0 * n_out * n_total * dim,
            bytes_moved=float(4 * n_out * n_total + z.element_size() * n_total * dim * grid[0]),
        )  # fmt: skip
        return out

    configs = (_INTERPRETER_CONFIG,) if interpreter_enabled() else _GRAD_CONFIGS
    key = (n_out, n_total, dim, str(z.dtype), str(out_dtype), precision)
    return run(choose_config("covmatch_gram_grad", key, configs, lambda c: bench(lambda: run(c))))
