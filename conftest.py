"""Session setup for tests and benchmarks.

Triton reads TRITON_INTERPRET when it is first imported, so it is decided here, before any test module
imports triton: without a GPU the fused kernels run in the interpreter on CPU tensors.
"""

import os
import re
import warnings
from importlib import metadata
from typing import Optional

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _release(package: str):
    """(major, minor) of an installed package, or None."""
    try:
        found = re.match(r"(\d+)\.(\d+)", metadata.version(package))
    except metadata.PackageNotFoundError:
        return None
    return (int(found.group(1)), int(found.group(2))) if found else None


def _interpreter_error() -> Optional[str]:
    """What goes wrong when Triton's interpreter runs the fused loss of a small case (None: it agrees with the
    torch path)."""
    from covmatch.loss import covmatch_loss

    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(6, 4, generator=generator) for _ in range(4)]
    expected = covmatch_loss(*features, rho=2.0, lam=0.5, backend="torch")
    try:
        with warnings.catch_warnings():  # numpy's overflow warnings from a broken interpreter: the line below says it
            warnings.simplefilter("ignore")
            got = covmatch_loss(*features, rho=2.0, lam=0.5, backend="triton")
    except Exception as err:  # whatever the interpreter raises, said in one line
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-6):
        return f"a small case's loss is {float(got):.4g}, the torch path's {float(expected):.4g}"
    return None


def pytest_configure(config):
    # Triton's interpreter (the CPU runs of the kernels) fails with numpy releases newer than the Triton: < 3.7
    # takes int() of one-element arrays for loop bounds, which numpy >= 2.4 refuses, and 3.0 computes wrong
    # values with numpy 2. Every kernel test would fail; say why once instead.
    triton, numpy = _release("triton"), _release("numpy")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") or triton is None:
        return
    versions = f"Triton {metadata.version('triton')}'s interpreter (the CPU runs of the kernels)"
    if numpy is not None and triton < (3, 7) and numpy >= (2, 4):
        raise pytest.UsageError(
            f"{versions} cannot run with numpy {metadata.version('numpy')}: pip install 'numpy<2.4' (or triton>=3.7)"
        )
    problem = _interpreter_error()
    if problem is not None:
        raise pytest.UsageError(
            f"{versions} gives wrong results with numpy {metadata.version('numpy')} ({problem}): "
            "pip install 'numpy<2' (or a newer triton)"
        )
