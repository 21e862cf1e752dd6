"""Reference formulas shared by the tests and the benchmarks (written once, imported by both).

``eager_covmatch_loss`` is the plain formula a user would write; ``float64_loss_and_grads`` is the
ground truth every backend and dtype is measured against.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def eager_covmatch_loss(
    real_img: torch.Tensor,
    real_txt: torch.Tensor,
    syn_img: torch.Tensor,
    syn_txt: torch.Tensor,
    rho: float = 1.0,
    lam: float = 0.0,
) -> torch.Tensor:
    """Centre, matmul, subtract, square, sum: the CovMatch loss as one would write it inline (any dtype)."""

    diff = rho * centred_cov(real_img, real_txt) - centred_cov(syn_img, syn_txt)
    loss = (diff * diff).sum()
    if lam:
        gap_img = real_img.mean(0) - syn_img.mean(0)
        gap_txt = real_txt.mean(0) - syn_txt.mean(0)
        loss = loss + lam * ((gap_img * gap_img).sum() + (gap_txt * gap_txt).sum())
    return loss


def float64_loss_and_grads(
    inputs: Sequence[torch.Tensor], rho: float, lam: float
) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
    """Loss, gradients w.r.t. all four inputs, and the loss scale rho^2||C_T||^2 + ||C_S||^2 (+ mean terms),
    all in float64 from the inputs exactly as given (already rounded to their dtype)."""
    leaves = [t.detach().to(torch.float64).requires_grad_(True) for t in inputs]
    loss = eager_covmatch_loss(*leaves, rho=rho, lam=lam)
    grads = list(torch.autograd.grad(loss, leaves))
    with torch.no_grad():
        xr, yr, xs, ys = (t.detach() for t in leaves)
        scale = (rho * centred_cov(xr, yr)).pow(2).sum() + centred_cov(xs, ys).pow(2).sum()
        scale = scale + lam * (xr.mean(0).pow(2).sum() + xs.mean(0).pow(2).sum())
        scale = scale + lam * (yr.mean(0).pow(2).sum() + ys.mean(0).pow(2).sum())
    return loss.detach(), grads, scale


def centred_cov(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased cross-covariance X̄^T Ȳ / (n - 1) in the inputs' dtype."""
    x_c = x - x.mean(0, keepdim=True)
    y_c = y - y.mean(0, keepdim=True)
    return x_c.t() @ y_c / (x.shape[0] - 1)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ||a - e|| / ||e|| in float64 (0 when both are zero)."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    denom = e.norm().item()
    num = (a - e).norm().item()
    if denom == 0.0:
        return num
    return num / denom
