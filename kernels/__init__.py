"""Fused Triton kernels of the CovMatch loss (installed as ``covmatch.kernels``; depends on torch and triton).

``covariance`` holds the covariance-form forward and its backward GEMM, ``gram`` the Gram-form pair
(docs/design.md, *Gradients*). Host functions take validated 2-D tensors; ``covmatch`` wraps them in autograd.
"""

from ._launch import TileConfig, interpreter_enabled, single_config_mode
from .covariance import CovarianceForward, centred_matmul, covariance_forward
from .gram import GramForward, gram_forward, gram_grad

__all__ = [
    "CovarianceForward",
    "GramForward",
    "TileConfig",
    "centred_matmul",
    "covariance_forward",
    "gram_forward",
    "gram_grad",
    "interpreter_enabled",
    "single_config_mode",
]
