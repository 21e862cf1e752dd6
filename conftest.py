"""Session setup for tests and benchmarks.

Triton reads TRITON_INTERPRET when it is first imported, so it is decided here, before any test module
imports triton: without a GPU the fused kernels run in the interpreter on CPU tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
