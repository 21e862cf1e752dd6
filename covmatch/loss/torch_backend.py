"""The reference backend: plain PyTorch ops, differentiated by autograd, in fp32 (fp64 for fp64 inputs).

Both algebraic forms are here so that each can be checked against the other and against the kernels.
"""

from __future__ import annotations

import torch

from .forms import gram_row_weights

__all__ = ["compute_dtype", "cross_covariance_torch", "mean_gap_torch", "covmatch_loss_torch"]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 when any input is fp64 (reference and gradcheck use), else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def cross_covariance_torch(x: torch.Tensor, y: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Centred cross-covariance X̄^T Ȳ / (n - 1) (or / n), computed in ``compute_dtype``."""
    dtype = compute_dtype(x, y)
    x = x.to(dtype)
    y = y.to(dtype)
    n = x.shape[0]
    x_c = x - x.mean(dim=0, keepdim=True)
    y_c = y - y.mean(dim=0, keepdim=True)
    return x_c.t() @ y_c / (n - 1 if unbiased else n)


def mean_gap_torch(real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    """||mean(real) - mean(syn)||^2 in ``compute_dtype``."""
    dtype = compute_dtype(real, syn)
    gap = real.to(dtype).mean(dim=0) - syn.to(dtype).mean(dim=0)
    return (gap * gap).sum()


def _gram_cov_term(
    real_img: torch.Tensor, real_txt: torch.Tensor, syn_img: torch.Tensor, syn_txt: torch.Tensor, rho: float
) -> torch.Tensor:
    """||rho C_T - C_S||_F^2 = w^T (K_x o K_y) w over the stacked, block-centred rows (docs/design.md,
    *Two algebraic forms*)."""
    n_real, n_syn = real_img.shape[0], syn_img.shape[0]
    z_x = torch.cat([real_img - real_img.mean(0), syn_img - syn_img.mean(0)])
    z_y = torch.cat([real_txt - real_txt.mean(0), syn_txt - syn_txt.mean(0)])
    w = gram_row_weights(n_real, n_syn, rho, z_x.dtype, z_x.device)
    return w @ ((z_x @ z_x.t()) * (z_y @ z_y.t())) @ w


def covmatch_loss_torch(
    real_img: torch.Tensor,
    real_txt: torch.Tensor,
    syn_img: torch.Tensor,
    syn_txt: torch.Tensor,
    rho: float,
    lam: float,
    form: str,
) -> torch.Tensor:
    """The CovMatch loss in plain PyTorch (``form`` is 'cov' or 'gram'); autocast is off inside."""
    dtype = compute_dtype(real_img, real_txt, syn_img, syn_txt)
    with torch.autocast(device_type=real_img.device.type, enabled=False):
        real_img, real_txt, syn_img, syn_txt = (t.to(dtype) for t in (real_img, real_txt, syn_img, syn_txt))
        if form == "gram":
            cov_term = _gram_cov_term(real_img, real_txt, syn_img, syn_txt, rho)
        else:
            diff = rho * cross_covariance_torch(real_img, real_txt) - cross_covariance_torch(syn_img, syn_txt)
            cov_term = (diff * diff).sum()
        if lam == 0:
            return cov_term
        return cov_term + lam * (mean_gap_torch(real_img, syn_img) + mean_gap_torch(real_txt, syn_txt))
