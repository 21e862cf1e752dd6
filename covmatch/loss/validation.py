"""Input checks for the loss: one clear message naming the argument, its shape, dtype or device."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["check_features", "check_pair", "check_covmatch_inputs", "check_hyperparameters"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_features(name: str, x: object, *, min_rows: int = 1) -> torch.Tensor:
    """A 2-D floating-point tensor [n, d] with at least ``min_rows`` rows, else TypeError/ValueError."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got dtype {x.dtype}"
        )
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, features], got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(
            f"{name} has {x.shape[0]} row(s) (shape {tuple(x.shape)}); the unbiased covariance needs at least "
            f"{min_rows}"
        )
    if x.shape[1] < 1:
        raise ValueError(f"{name} has no feature columns (shape {tuple(x.shape)})")
    return x


def check_pair(x_name: str, x: object, y_name: str, y: object, *, min_rows: int) -> Tuple[int, int, int]:
    """Two feature matrices of one paired set: same number of rows, same device. Returns (n, d_x, d_y)."""
    check_features(x_name, x, min_rows=min_rows)
    check_features(y_name, y, min_rows=min_rows)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{x_name} and {y_name} must have the same number of rows (one per pair), got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.device != y.device:
        raise ValueError(f"{x_name} is on {x.device} but {y_name} is on {y.device}; put them on one device")
    return x.shape[0], x.shape[1], y.shape[1]


def check_hyperparameters(rho: float, lam: float) -> None:
    """rho > 0 and lam >= 0, both finite numbers."""
    for name, value in (("rho", rho), ("lam", lam)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0 (it scales the real covariance), got {rho}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0 (a negative weight makes the loss unbounded below), got {lam}")


def _valid_shapes(real_img, real_txt, syn_img, syn_txt) -> Optional[Tuple[int, int, int, int]]:
    """(n_real, n_syn, d_img, d_txt) when the four inputs pass every check below, else None (the detailed
    checks then say what is wrong). Kept as one pass because host time per call is measured
    (``benchmarks/bench_host.py``, ``benchmarks/results/cpu/host.csv``)."""
    tensor = torch.Tensor
    if not (
        isinstance(real_img, tensor)
        and isinstance(real_txt, tensor)
        and isinstance(syn_img, tensor)
        and isinstance(syn_txt, tensor)
    ):
        return None
    try:
        (n_real, d_img), (n_real_txt, d_txt) = real_img.shape, real_txt.shape
        (n_syn, d_syn_img), (n_syn_txt, d_syn_txt) = syn_img.shape, syn_txt.shape
    except ValueError:  # not 2-D
        return None
    valid = (
        n_real == n_real_txt >= 2
        and n_syn == n_syn_txt >= 2
        and d_syn_img == d_img >= 1
        and d_syn_txt == d_txt >= 1
        and real_img.dtype in _FLOAT_DTYPES
        and real_txt.dtype in _FLOAT_DTYPES
        and syn_img.dtype in _FLOAT_DTYPES
        and syn_txt.dtype in _FLOAT_DTYPES
        and real_img.device == real_txt.device == syn_img.device == syn_txt.device
    )
    return (n_real, n_syn, d_img, d_txt) if valid else None


def check_covmatch_inputs(
    real_img: object, real_txt: object, syn_img: object, syn_txt: object
) -> Tuple[int, int, int, int]:
    """Validate the four feature matrices of ``covmatch_loss``. Returns (n_real, n_syn, d_img, d_txt)."""
    shapes = _valid_shapes(real_img, real_txt, syn_img, syn_txt)
    if shapes is not None:
        return shapes
    n_real, d_img, d_txt = check_pair("real_img", real_img, "real_txt", real_txt, min_rows=2)
    n_syn, ds_img, ds_txt = check_pair("syn_img", syn_img, "syn_txt", syn_txt, min_rows=2)
    if ds_img != d_img:
        raise ValueError(
            f"image feature dims differ: real_img has shape {tuple(real_img.shape)}, syn_img {tuple(syn_img.shape)}"
        )
    if ds_txt != d_txt:
        raise ValueError(
            f"text feature dims differ: real_txt has shape {tuple(real_txt.shape)}, syn_txt {tuple(syn_txt.shape)}"
        )
    if real_img.device != syn_img.device:
        raise ValueError(f"real features are on {real_img.device} but synthetic features on {syn_img.device}")
    return n_real, n_syn, d_img, d_txt
