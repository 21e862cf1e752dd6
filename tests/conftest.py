"""Test-session setup.

Triton reads TRITON_INTERPRET when it is first imported, so it is decided here, before any test module
imports triton: without a GPU the fused kernels run in the interpreter on CPU tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("COVMATCH_TRITON_SINGLE_CONFIG", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
