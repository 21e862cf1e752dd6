"""Fixtures shared by the tests (the interpreter switch lives in the root conftest.py)."""

import os

import pytest
import torch

# Tests check correctness, not speed: one tile configuration per kernel (no autotuning on a GPU).
os.environ.pop("COVMATCH_TRITON_AUTOTUNE", None)  # the default, untuned configuration in tests


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
