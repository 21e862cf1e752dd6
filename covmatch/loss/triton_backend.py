"""The fused backend: ``covmatch.kernels`` wrapped in a ``torch.autograd.Function``.

Triton is imported only when this backend is first used, so ``import covmatch`` stays light.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .constants import cached_constant
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
    """``covmatch.kernels``, imported on first use (it imports triton) and then held: this runs per call."""
    if not _KERNELS:
        from covmatch import kernels

        _KERNELS.append(kernels)
    return _KERNELS[0]


def _column_means(real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    """[2, d] fp32: the real (row 0) and synthetic (row 1) column means."""
    return torch.stack([real.mean(dim=0, dtype=torch.float32), syn.mean(dim=0, dtype=torch.float32)])


def _mean_gaps(mean_x: torch.Tensor, mean_y: torch.Tensor, lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Real minus synthetic column means of each modality; with lam = 0 cached zeros (no launches: the
    mean term's gradient vanishes, and the kernels still take a bias row)."""
    if lam == 0:
        return _zeros(mean_x.shape[1], mean_x.device), _zeros(mean_y.shape[1], mean_y.device)
    return mean_x[0] - mean_x[1], mean_y[0] - mean_y[1]


def _zeros(n: int, device: torch.device) -> torch.Tensor:
    return cached_constant(("zeros_fp32", n), device, lambda: torch.zeros(n, dtype=torch.float32, device=device))


def _row_bias(lam: float, beta: float, gap: torch.Tensor) -> torch.Tensor:
    """The mean term's gradient row ``beta * gap``; with lam = 0, ``gap`` is already the zeros row."""
    return gap if lam == 0 else beta * gap


class CovMatchTritonFunction(torch.autograd.Function):
    """Autograd wrapper of the fused kernels; backward returns each gradient in its input's dtype."""

    @staticmethod
    def forward(ctx, real_img, real_txt, syn_img, syn_txt, rho: float, lam: float, form: str):
        kernels = _kernels()
        needs = ctx.needs_input_grad[:4]
        needs_grad = any(needs)
        n_real, n_syn = real_img.shape[0], syn_img.shape[0]
        ctx.rho, ctx.lam, ctx.form = rho, lam, form
        ctx.dtypes = (real_img.dtype, real_txt.dtype, syn_img.dtype, syn_txt.dtype)
        ctx.n_real, ctx.n_syn = n_real, n_syn
        if form == "cov":
            out = kernels.covariance_forward(real_img, real_txt, syn_img, syn_txt, rho, store_diff=needs_grad)
            cov_loss, mean_loss = out.cov_loss, out.mean_loss
            # the gradient of each input needs the other modality's rows of its set: keep only those (every
            # saved tensor costs an unpack in backward, and distillation needs the synthetic side alone)
            ctx.save_for_backward(
                real_img if needs[1] else None, real_txt if needs[0] else None,
                syn_img if needs[3] else None, syn_txt if needs[2] else None,
                out.diff, out.mean_x, out.mean_y,
            )  # fmt: skip
        else:
            mean_x = _column_means(real_img, syn_img)
            mean_y = _column_means(real_txt, syn_txt)
            z_x = torch.cat([real_img, syn_img])
            z_y = torch.cat([real_txt, syn_txt])
            weights = gram_row_weights(n_real, n_syn, rho, torch.float32, real_img.device)
            out = kernels.gram_forward(z_x, z_y, mean_x, mean_y, weights, n_real, store_gram=needs_grad)
            cov_loss = out.cov_loss
            if lam != 0:  # the distillation objective passes lam = 0 (its mean term is separate): skip it
                gap_x, gap_y = mean_x[0] - mean_x[1], mean_y[0] - mean_y[1]
                mean_loss = gap_x @ gap_x + gap_y @ gap_y
            ctx.save_for_backward(z_x, z_y, out.gram_x, out.gram_y, weights, mean_x, mean_y)
        return cov_loss + lam * mean_loss if lam != 0 else cov_loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        kernels = _kernels()
        rho, lam, n_real, n_syn = ctx.rho, ctx.lam, ctx.n_real, ctx.n_syn
        needs = ctx.needs_input_grad[:4]
        if grad.dtype != torch.float32:
            grad = grad.to(torch.float32)
        grads = [None, None, None, None]
        if ctx.form == "cov":
            real_img, real_txt, syn_img, syn_txt, diff, mean_x, mean_y = ctx.saved_tensors
            gap_x, gap_y = _mean_gaps(mean_x, mean_y, lam)
            # dL/dX = alpha * (Y - 1 mu_Y^T) D^T + mean-term row, dL/dY = alpha * (X - 1 mu_X^T) D + ...
            # (docs/design.md, *Gradients*): alpha = 2 rho / (n_T - 1) on the real side, -2 / (n_S - 1) on the
            # synthetic side.
            # Inputs 0-1 are the real set, 2-3 the synthetic one (row idx // 2 of the means); images (even idx)
            # take D^T. Each side: (input index, the other modality's rows and means, gap, alpha, beta).
            sides = (
                (0, real_txt, mean_y, gap_x, 2.0 * rho / (n_real - 1), 2.0 * lam / n_real),
                (1, real_img, mean_x, gap_y, 2.0 * rho / (n_real - 1), 2.0 * lam / n_real),
                (2, syn_txt, mean_y, gap_x, -2.0 / (n_syn - 1), -2.0 * lam / n_syn),
                (3, syn_img, mean_x, gap_y, -2.0 / (n_syn - 1), -2.0 * lam / n_syn),
            )
            for idx, other, other_means, gap, alpha, beta in sides:
                if needs[idx]:  # distillation needs the synthetic side only: no work, not even views, for the rest
                    grads[idx] = kernels.centred_matmul(
                        other, other_means[idx // 2], diff.t() if idx % 2 == 0 else diff, _row_bias(lam, beta, gap),
                        grad, alpha, ctx.dtypes[idx],
                    )  # fmt: skip
        else:
            z_x, z_y, gram_x, gram_y, weights, mean_x, mean_y = ctx.saved_tensors
            gap_x, gap_y = _mean_gaps(mean_x, mean_y, lam)
            # dL/dZ_x[i] = 2 w_i sum_j K_y[i, j] w_j Zc_x[j] (and symmetrically), plus the mean-term row.
            sides = (
                (0, gram_y, z_x, mean_x, 0, n_real, gap_x, 2.0 * lam / n_real),
                (1, gram_x, z_y, mean_y, 0, n_real, gap_y, 2.0 * lam / n_real),
                (2, gram_y, z_x, mean_x, n_real, n_syn, gap_x, -2.0 * lam / n_syn),
                (3, gram_x, z_y, mean_y, n_real, n_syn, gap_y, -2.0 * lam / n_syn),
            )
            for idx, gram_other, z, mean, row_start, n_out, gap, beta in sides:
                if needs[idx]:
                    grads[idx] = kernels.gram_grad(
                        gram_other, weights, z, mean, n_real, row_start, n_out, _row_bias(lam, beta, gap), grad,
                        ctx.dtypes[idx],
                    )  # fmt: skip
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
