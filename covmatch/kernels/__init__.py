"""Fused Triton kernels of the CovMatch loss (installed as ``covmatch.kernels``; depends on torch and triton).

``covariance`` holds the covariance-form forward (column statistics, D and its partial sums, the final
reduction) and its backward (one GEMM launch per gradient), planned once per call signature
(``covariance_plan``), ``gram`` the Gram-form pair (docs/design.md,
*Gradients*). Host functions take validated 2-D tensors; ``covmatch`` wraps them in autograd.
``python -m covmatch.loss.inspect`` compiles one call's launches ahead of time for sm_80 / sm_90.
"""

from ._launch import LaunchRecord, TileConfig, interpreter_enabled, recorded_launches, target_arch, tuned_configs
from .covariance import CovarianceForward, CovariancePlan, covariance_plan
from .gram import GramForward, gram_forward, gram_grad

__all__ = [
    "CovarianceForward",
    "CovariancePlan",
    "GramForward",
    "TileConfig",
    "LaunchRecord",
    "covariance_plan",
    "gram_forward",
    "gram_grad",
    "interpreter_enabled",
    "recorded_launches",
    "target_arch",
    "tuned_configs",
]
