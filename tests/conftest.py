"""Fixtures shared by the tests (the interpreter switch lives in the root conftest.py)."""

import os

import pytest
import torch

# Tests check correctness, not speed: one tile configuration per kernel (no autotuning on a GPU).
os.environ.setdefault("COVMATCH_TRITON_SINGLE_CONFIG", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
