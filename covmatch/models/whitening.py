"""A fixed affine map that whitens an encoder's features, appended to the encoder (``--whiten-features``).

``x -> W (x - mean)`` with ``W = (Cov + ridge * mean variance * I)^(-1/2)``: on the data it was fitted on, the
features then have (up to the ridge) the identity covariance, so no few directions of large variance dominate
the image-text cross-covariance that CovMatch matches. It is an ordinary linear layer of the encoder: trained
with it where the encoder is trained, restored with it where the encoder is reset.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeatureWhitening", "WHITENING_RIDGE", "whitening_statistics"]

WHITENING_RIDGE = 1e-3  # relative to the mean variance: bounds the gain of near-empty directions


def whitening_statistics(features: torch.Tensor, ridge: float = WHITENING_RIDGE) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean [d], W [d, d]) of ``features`` [n, d], in float64: W = (Cov + ridge * mean variance * I)^(-1/2)."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"whitening needs features [n >= 2, d], got {tuple(features.shape)}")
    x = features.double()
    mean = x.mean(0)
    cov = (x - mean).t() @ (x - mean) / (x.shape[0] - 1)
    cov = cov + ridge * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    values, vectors = torch.linalg.eigh(cov)
    return mean, vectors @ torch.diag(values.rsqrt()) @ vectors.t()


class FeatureWhitening(nn.Module):
    """``x -> W (x - mean)`` as a linear layer (weight W, bias -W mean), made from the statistics directly (no
    random initialisation: building one draws nothing from the global generator)."""

    def __init__(self, mean: torch.Tensor, matrix: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(matrix.detach().to(torch.float32).clone())
        self.bias = nn.Parameter(-(matrix.detach().double() @ mean.detach().double()).to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)
