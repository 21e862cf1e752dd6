"""Session setup for tests and benchmarks.

Triton reads TRITON_INTERPRET when it is first imported, so it is decided here, before any test module
imports triton: without a GPU the fused kernels run in the interpreter on CPU tensors.
"""

import os
import re
from importlib import metadata

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


def pytest_configure(config):
    # Triton < 3.7's interpreter takes int() of one-element arrays for loop bounds, which numpy >= 2.4 refuses:
    # every interpreted kernel with a runtime loop bound would fail, so say why once instead.
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    triton, numpy = _release("triton"), _release("numpy")
    if triton is not None and numpy is not None and triton < (3, 7) and numpy >= (2, 4):
        raise pytest.UsageError(
            f"Triton {metadata.version('triton')}'s interpreter (the CPU runs of the kernels) cannot run with numpy "
            f"{metadata.version('numpy')}: pip install 'numpy<2.4' (or triton>=3.7)"
        )
