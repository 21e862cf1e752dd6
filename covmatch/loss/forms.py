"""Which algebraic form of the covariance term is cheaper for a shape (docs/design.md, *Two algebraic forms*)."""

from __future__ import annotations

import torch

from covmatch.constants import cached_constant

__all__ = ["FORMS", "GRAM_EXTRA_LAUNCHES", "LAUNCH_MULTIPLY_ADDS", "choose_form", "form_flops", "gram_row_weights"]

FORMS = ("cov", "gram")

# Torch ops the Gram form issues around its kernels that the covariance form does not (4 column means,
# 2 stacks, 2 cats; tests/test_loss_api.py counts them), each one a kernel launch on a GPU.
GRAM_EXTRA_LAUNCHES = 8
# What one launch costs, as multiply-adds: ~5 us of host and launch time, in which an H100/H200's tensor
# cores do ~1e9 bf16 multiply-adds at a sustained ~400 TFLOP/s. An assumption, not a measurement: the
# forced-form rows of benchmarks/bench_loss.py measure both forms at the paper's and the square shapes.
LAUNCH_MULTIPLY_ADDS = 1e9


def form_flops(form: str, n_real: int, n_syn: int, dim_x: int, dim_y: int) -> float:
    """Multiply-adds of forward + synthetic-side backward for one form (the counts the choice rests on).

    cov:  forward (n_T + n_S) d_x d_y, backward 2 n_S d_x d_y.
    gram: forward the upper triangles of two n x n Gram matrices, n^2 (d_x + d_y) / 2 with n = n_T + n_S;
          backward n_S n (d_x + d_y).
    """
    if form == "cov":
        return (n_real + n_syn) * dim_x * dim_y + 2.0 * n_syn * dim_x * dim_y
    if form == "gram":
        n = n_real + n_syn
        return 0.5 * n * n * (dim_x + dim_y) + float(n_syn) * n * (dim_x + dim_y)
    raise ValueError(f"form must be one of {FORMS} or 'auto', got {form!r}")


def gram_row_weights(n_real: int, n_syn: int, rho: float, dtype: torch.dtype, device) -> torch.Tensor:
    """Row weights of the stacked Gram form: rho/(n_T-1) for real rows, -1/(n_S-1) for synthetic rows
    (cached per shape, rho, dtype and device; read-only)."""

    def make() -> torch.Tensor:
        return torch.cat(
            [
                torch.full((n_real,), rho / (n_real - 1), dtype=dtype, device=device),
                torch.full((n_syn,), -1.0 / (n_syn - 1), dtype=dtype, device=device),
            ]
        )

    return cached_constant(("gram_row_weights", n_real, n_syn, float(rho), dtype), device, make)


def choose_form(form: str, n_real: int, n_syn: int, dim_x: int, dim_y: int) -> str:
    """Resolve ``form`` ('auto', 'cov' or 'gram'): 'auto' picks the cheaper form, counting multiply-adds and
    the Gram form's extra launches (docs/design.md, *Two algebraic forms*: the Gram form pays off when
    n << d_x d_y / (d_x + d_y)).

    At the paper's shape (n = 384 rows, d 2304 x 768) the two differ by ~1e9 multiply-adds, about what the
    Gram form's extra launches cost, so it stays with the covariance form; at d = 4096 x 4096 and n = 384
    the Gram form saves ~1.4e10 and is chosen."""
    if form == "auto":
        cov = form_flops("cov", n_real, n_syn, dim_x, dim_y)
        gram = form_flops("gram", n_real, n_syn, dim_x, dim_y) + GRAM_EXTRA_LAUNCHES * LAUNCH_MULTIPLY_ADDS
        return "gram" if gram < cov else "cov"
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS} or 'auto', got {form!r}")
    return form
