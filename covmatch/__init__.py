"""covmatch: multimodal dataset distillation by cross-covariance matching (CovMatch, NeurIPS 2025).

``import covmatch`` loads only torch: the distillation stack (transformers, timm, deepspeed) is imported
by the modules that need it, and Triton only when the fused backend is first used.
"""

from ._version import __version__
from .eval.metrics import retrieval_recall
from .loss import CovMatchLoss, covmatch_loss, covmatch_loss_with_grads, cross_covariance, mean_matching_loss

__all__ = [
    "CovMatchLoss",
    "__version__",
    "covmatch_loss",
    "covmatch_loss_with_grads",
    "cross_covariance",
    "mean_matching_loss",
    "retrieval_recall",
]
