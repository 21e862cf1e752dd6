"""The fused backend: ``covmatch.kernels`` wrapped in a ``torch.autograd.Function``.

Triton is imported only when this backend is first used, so ``import covmatch`` stays light.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from covmatch.constants import cached_constant

from .forms import gram_row_weights

__all__ = ["triton_unavailable_reason", "covmatch_loss_triton"]


_TRITON_IMPORT: Dict[str, Optional[str]] = {}


def triton_unavailable_reason() -> Optional[str]:
    """None when Triton imports, else why it does not (imports triton on the first call, then cached)."""
    if "reason" not in _TRITON_IMPORT:
        try:
            import triton  # noqa: F401

            _TRITON_IMPORT["reason"] = None
        except Exception as err:  # ImportError, or a broken install raising something else
            _TRITON_IMPORT["reason"] = f"{type(err).__name__}: {err}"
    return _TRITON_IMPORT["reason"]


_KERNELS = []


def _kernels():
    """``covmatch.kernels``, imported on first use (it imports triton)."""
    if not _KERNELS:
        from covmatch import kernels

        _KERNELS.append(kernels)
    return _KERNELS[0]


def _column_means(real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    """[2, d] fp32: the real (row 0) and synthetic (row 1) column means."""
    return torch.stack([real.mean(dim=0, dtype=torch.float32), syn.mean(dim=0, dtype=torch.float32)])


def _mean_gaps(mean_x: torch.Tensor, mean_y: torch.Tensor, lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Real minus synthetic column means of each modality; with lam = 0 the mean term's gradient vanishes
    and the kernels get a cached zeros row as their bias."""
    if lam == 0:
        return _zeros(mean_x.shape[1], mean_x.device), _zeros(mean_y.shape[1], mean_y.device)
    return mean_x[0] - mean_x[1], mean_y[0] - mean_y[1]


def _zeros(n: int, device: torch.device) -> torch.Tensor:
    return cached_constant(("zeros_fp32", n), device, lambda: torch.zeros(n, dtype=torch.float32, device=device))


def _row_bias(lam: float, beta: float, gap: torch.Tensor) -> torch.Tensor:
    """The mean term's gradient row ``beta * gap``; with lam = 0, ``gap`` is already the zeros row."""
    return gap if lam == 0 else beta * gap


# ---------------------------------------------------------------------------------------- covariance form


def covariance_form_forward(real_img, real_txt, syn_img, syn_txt, rho: float, lam: float, needs):
    """(loss, tensors to save) of the covariance form. The gradient of each input needs the other
    modality's rows of its set: only those are kept (distillation differentiates the synthetic side alone)."""
    out = _kernels().covariance_forward(real_img, real_txt, syn_img, syn_txt, rho, lam, store_diff=any(needs))
    saved = (
        real_img if needs[1] else None, real_txt if needs[0] else None,
        syn_img if needs[3] else None, syn_txt if needs[2] else None,
        out.diff, out.mean_x, out.mean_y,
    )  # fmt: skip
    return out.loss, saved


def covariance_form_backward(saved, grad, rho, lam, n_real, n_syn, needs, dtypes) -> list:
    """Gradients of the four inputs (None where not needed), one launch per side that needs any:
    alpha = 2 rho / (n_T - 1) on the real side, -2 / (n_S - 1) on the synthetic side; beta is the mean
    term's 2 lam / n with the same signs (docs/design.md, *Gradients*)."""
    real_img, real_txt, syn_img, syn_txt, diff, mean_x, mean_y = saved
    grads = [None, None, None, None]
    sides = ((0, real_img, real_txt, 2.0 * rho / (n_real - 1), 2.0 * lam / n_real),
             (1, syn_img, syn_txt, -2.0 / (n_syn - 1), -2.0 * lam / n_syn))  # fmt: skip
    for side, x, y, alpha, beta in sides:
        need_x, need_y = needs[2 * side], needs[2 * side + 1]
        if need_x or need_y:
            grads[2 * side], grads[2 * side + 1] = _kernels().covariance_grads(
                side,
                x,
                y,
                mean_x,
                mean_y,
                diff,
                grad,
                alpha,
                beta,
                need_x,
                need_y,
                dtypes[2 * side],
                dtypes[2 * side + 1],
            )
    return grads


# ---------------------------------------------------------------------------------------- Gram form


def gram_form_forward(real_img, real_txt, syn_img, syn_txt, rho: float, lam: float, needs):
    """(loss, tensors to save) of the Gram form: the stacked rows, both Gram matrices, row weights, means."""
    n_real, n_syn = real_img.shape[0], syn_img.shape[0]
    mean_x = _column_means(real_img, syn_img)
    mean_y = _column_means(real_txt, syn_txt)
    z_x = torch.cat([real_img, syn_img])
    z_y = torch.cat([real_txt, syn_txt])
    weights = gram_row_weights(n_real, n_syn, rho, torch.float32, real_img.device)
    out = _kernels().gram_forward(z_x, z_y, mean_x, mean_y, weights, n_real, store_gram=any(needs))
    loss = out.cov_loss
    if lam != 0:  # the distillation objective passes lam = 0 (its mean term is separate): skip it
        gap_x, gap_y = mean_x[0] - mean_x[1], mean_y[0] - mean_y[1]
        loss = loss + lam * (gap_x @ gap_x + gap_y @ gap_y)
    return loss, (z_x, z_y, out.gram_x, out.gram_y, weights, mean_x, mean_y)


def gram_rows_grad(gram_other, weights, rows, means, n_real, row_start, n_out, gap, beta, lam, grad, dtype):
    """dL/dZ[i] = 2 w_i sum_j K_other[i, j] w_j Zc[j] + the mean-term row, for rows
    ``row_start .. row_start + n_out`` of the stacked matrix ``rows`` (docs/design.md, *Two algebraic forms*)."""
    bias = _row_bias(lam, beta, gap)
    return _kernels().gram_grad(gram_other, weights, rows, means, n_real, row_start, n_out, bias, grad, dtype)


def gram_form_backward(saved, grad, rho, lam, n_real, n_syn, needs, dtypes) -> list:
    """Gradients of the four inputs (None where not needed): real rows come first in the stacked matrices."""
    z_x, z_y, gram_x, gram_y, weights, mean_x, mean_y = saved
    gap_x, gap_y = _mean_gaps(mean_x, mean_y, lam)
    real_beta, syn_beta = 2.0 * lam / n_real, -2.0 * lam / n_syn
    grads = [None, None, None, None]
    if needs[0]:
        grads[0] = gram_rows_grad(
            gram_y, weights, z_x, mean_x, n_real, 0, n_real, gap_x, real_beta, lam, grad, dtypes[0]
        )
    if needs[1]:
        grads[1] = gram_rows_grad(
            gram_x, weights, z_y, mean_y, n_real, 0, n_real, gap_y, real_beta, lam, grad, dtypes[1]
        )
    if needs[2]:
        grads[2] = gram_rows_grad(
            gram_y, weights, z_x, mean_x, n_real, n_real, n_syn, gap_x, syn_beta, lam, grad, dtypes[2]
        )
    if needs[3]:
        grads[3] = gram_rows_grad(
            gram_x, weights, z_y, mean_y, n_real, n_real, n_syn, gap_y, syn_beta, lam, grad, dtypes[3]
        )
    return grads


_FORMS = {"cov": (covariance_form_forward, covariance_form_backward), "gram": (gram_form_forward, gram_form_backward)}


class CovMatchTritonFunction(torch.autograd.Function):
    """Autograd over the named host functions above; backward returns each gradient in its input's dtype."""

    @staticmethod
    def forward(ctx, real_img, real_txt, syn_img, syn_txt, rho: float, lam: float, form: str):
        ctx.rho, ctx.lam, ctx.form = rho, lam, form
        ctx.dtypes = (real_img.dtype, real_txt.dtype, syn_img.dtype, syn_txt.dtype)
        ctx.n_real, ctx.n_syn = real_img.shape[0], syn_img.shape[0]
        loss, saved = _FORMS[form][0](real_img, real_txt, syn_img, syn_txt, rho, lam, ctx.needs_input_grad[:4])
        ctx.save_for_backward(*saved)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        grad = grad if grad.dtype == torch.float32 else grad.to(torch.float32)
        backward = _FORMS[ctx.form][1]
        grads = backward(ctx.saved_tensors, grad, ctx.rho, ctx.lam, ctx.n_real, ctx.n_syn, ctx.needs_input_grad[:4],
                         ctx.dtypes)  # fmt: skip
        return (*grads, None, None, None)


def covmatch_loss_triton(
    real_img: torch.Tensor,
    real_txt: torch.Tensor,
    syn_img: torch.Tensor,
    syn_txt: torch.Tensor,
    rho: float,
    lam: float,
    form: str,
) -> torch.Tensor:
    """The CovMatch loss through the fused kernels (inputs already validated; form 'cov' or 'gram')."""
    return CovMatchTritonFunction.apply(real_img, real_txt, syn_img, syn_txt, float(rho), float(lam), form)
