"""Which algebraic form of the covariance term is cheaper for a shape (DESIGN 1.2)."""

from __future__ import annotations

import torch

from .constants import cached_constant

__all__ = ["FORMS", "choose_form", "form_flops", "gram_row_weights"]

FORMS = ("cov", "gram")


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
    """Resolve ``form`` ('auto', 'cov' or 'gram'): 'auto' picks the form with fewer multiply-adds."""
    if form == "auto":
        cov = form_flops("cov", n_real, n_syn, dim_x, dim_y)
        gram = form_flops("gram", n_real, n_syn, dim_x, dim_y)
        return "gram" if gram < cov else "cov"
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS} or 'auto', got {form!r}")
    return form
