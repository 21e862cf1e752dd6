"""Instruments for the fused loss's host-side cost, shared by tests/test_loss_api.py and benchmarks/bench_host.py.

At the paper's shape the loss's kernels run for microseconds, so a call costs what its host code costs: the
Python around the kernels and every extra torch op (each one a launch on a GPU). ``no_kernel_launches`` keeps
that host code and drops only the Triton launches (``covmatch.kernels.recorded_launches``: it runs anywhere,
interpreter or not, and the outputs are left uninitialised); ``count_dispatched_ops`` lists the torch ops a call issues.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List

from covmatch.kernels._launch import NO_LAUNCH_OPS, DispatchedOps

__all__ = ["FREE_OPS", "count_dispatched_ops", "no_kernel_launches"]

# allocations and views: no launch on any device
FREE_OPS = NO_LAUNCH_OPS


@contextlib.contextmanager
def no_kernel_launches() -> Iterator[List]:
    """Within: the fused loss runs all of its host code (allocations, config choice, autograd) but launches
    none of its Triton kernels; yields the list of the launches it would have made."""
    from covmatch.kernels import recorded_launches

    with recorded_launches() as launches:
        yield launches


def count_dispatched_ops(fn: Callable[[], object], *, all_ops: bool = False) -> List[str]:
    """Names of the torch ops that one call of ``fn`` dispatches (backward included when ``fn`` runs it):
    those that launch work, or with ``all_ops`` every one (allocations, views, profiler markers)."""
    with DispatchedOps(frozenset() if all_ops else FREE_OPS) as counter:
        fn()
    return counter.ops
