"""``CovMatchLoss``: the ``nn.Module`` face of ``covmatch_loss``."""

from __future__ import annotations

import torch
from torch import nn

from .forms import FORMS
from .functional import BACKENDS, covmatch_loss
from .validation import check_hyperparameters

__all__ = ["CovMatchLoss"]


class CovMatchLoss(nn.Module):
    """Module wrapper of :func:`covmatch.covmatch_loss`; holds rho, lam, backend and form."""

    def __init__(self, rho: float = 1.0, lam: float = 0.0, backend: str = "auto", form: str = "auto") -> None:
        super().__init__()
        check_hyperparameters(rho, lam)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if form != "auto" and form not in FORMS:
            raise ValueError(f"form must be one of {FORMS} or 'auto', got {form!r}")
        self.rho = float(rho)
        self.lam = float(lam)
        self.backend = backend
        self.form = form

    def forward(
        self, real_img: torch.Tensor, real_txt: torch.Tensor, syn_img: torch.Tensor, syn_txt: torch.Tensor
    ) -> torch.Tensor:
        return covmatch_loss(
            real_img, real_txt, syn_img, syn_txt, rho=self.rho, lam=self.lam, backend=self.backend, form=self.form
        )

    def extra_repr(self) -> str:
        return f"rho={self.rho}, lam={self.lam}, backend={self.backend!r}, form={self.form!r}"
