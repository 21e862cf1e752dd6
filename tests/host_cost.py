"""Instruments for the fused loss's host-side cost, shared by tests/test_loss_api.py and benchmarks/bench_host.py.

At the paper's shape the loss's kernels run for microseconds, so a call costs what its host code costs: the
Python around the kernels and every extra torch op (each one a launch on a GPU). ``no_kernel_launches`` keeps
that host code and drops only the four Triton launches (so it runs anywhere, interpreter or not, and the
outputs are left uninitialised); ``count_dispatched_ops`` lists the torch ops a call issues.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["KERNELS", "count_dispatched_ops", "no_kernel_launches"]

# (module of covmatch.kernels, name of a @triton.jit kernel in it): every launch site of the fused loss
KERNELS = (
    ("covariance", "_covmatch_cov_fwd_kernel"),
    ("covariance", "_centred_matmul_kernel"),
    ("gram", "_covmatch_gram_fwd_kernel"),
    ("gram", "_gram_grad_kernel"),
)

# allocations and views: no launch on any device
FREE_OPS = frozenset(
    {"empty", "empty_like", "new_empty", "empty_strided", "t", "view", "select", "slice", "unbind", "expand",
     "unsqueeze", "detach", "alias", "as_strided", "_record_function_enter_new", "_record_function_exit"}
)  # fmt: skip


class _NoLaunch:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **meta)`` does nothing."""

    def __getitem__(self, grid) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def no_kernel_launches() -> Iterator[None]:
    """Within: the fused loss runs all of its host code (allocations, config lookup, autograd) but launches
    none of its Triton kernels."""
    import importlib

    saved = []
    for module_name, kernel_name in KERNELS:
        module = importlib.import_module(f"covmatch.kernels.{module_name}")
        saved.append((module, kernel_name, getattr(module, kernel_name)))
        setattr(module, kernel_name, _NoLaunch())
    try:
        yield
    finally:
        for module, kernel_name, kernel in saved:
            setattr(module, kernel_name, kernel)


class _CountOps(TorchDispatchMode):
    def __init__(self, skip: frozenset) -> None:
        super().__init__()
        self.skip = skip
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.skip:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def count_dispatched_ops(fn: Callable[[], object], *, all_ops: bool = False) -> List[str]:
    """Names of the torch ops that one call of ``fn`` dispatches (backward included when ``fn`` runs it):
    those that launch work, or with ``all_ops`` every one (allocations, views, profiler markers)."""
    with _CountOps(frozenset() if all_ops else FREE_OPS) as counter:
        fn()
    return counter.ops
