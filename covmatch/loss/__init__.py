"""The CovMatch loss: functional entry points, the module, and the backends behind them (docs/design.md,
*The loss* and *Gradients*)."""

from .forms import choose_form, form_flops
from .functional import (
    covmatch_loss,
    covmatch_loss_with_grads,
    cross_covariance,
    mean_matching_loss,
    resolve_backend,
)
from .module import CovMatchLoss

__all__ = [
    "CovMatchLoss",
    "choose_form",
    "covmatch_loss",
    "covmatch_loss_with_grads",
    "cross_covariance",
    "form_flops",
    "mean_matching_loss",
    "resolve_backend",
]
