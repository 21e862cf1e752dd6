"""Launching torch ops of one distillation iteration, by phase, in eager mode: what the host dispatches (and, on
a GPU, launches) besides the work itself. Counted on the CPU with a dispatch mode; the sequence of ops does
not depend on the device or on the batch sizes, so small batches count the ``paper`` iteration.

    python -m benchmarks.count_launches                     # the paper architecture, bf16 autocast
    python -m benchmarks.count_launches --preset tiny --precision fp32

Phases: the online model's InfoNCE step (forward, backward, SGD), the target batch's features, the synthetic
batch's forward, loss and backward, the synthetic set's SGD step, the relative steps the run logs, and the
reset (every ``--reset-every`` iterations). Ops that launch nothing (views, allocations) are left out.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
from typing import Dict, Optional, Sequence

os.environ.setdefault("COVMATCH_BENCH_SMOKE", "1")  # counting runs on the CPU, whatever the machine has

from covmatch.kernels._launch import NO_LAUNCH_OPS, DispatchedOps  # noqa: E402

# views and metadata-only ops besides those: they launch nothing either
VIEW_OPS = frozenset({"transpose", "permute", "_unsafe_view", "split", "split_with_sizes", "squeeze", "narrow",
                      "unflatten", "_reshape_alias", "view_as_real", "view_as_complex", "lift_fresh"})  # fmt: skip

PHASES = {
    ("online", "train_step"): "online step (forward, backward, SGD)",
    ("online", "encode_real"): "target features",
    ("synthetic", "backward"): "synthetic forward, loss, backward",
    ("synthetic", "step"): "synthetic SGD step",
    ("synthetic", "relative_steps"): "relative steps (logged)",
    ("online", "reset"): "reset",
}


class PhasedOps(DispatchedOps):
    """DispatchedOps that files each op under the phase running when it was dispatched."""

    def __init__(self) -> None:
        super().__init__(skip=NO_LAUNCH_OPS | VIEW_OPS)
        self.phase = "other"
        self.by_phase: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = len(self.ops)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        for name in self.ops[before:]:
            self.by_phase[self.phase][name] += 1
        return out


def _phased(counter: PhasedOps, label: str, method):
    @functools.wraps(method)
    def run(*args, **kwargs):
        outer, counter.phase = counter.phase, label
        try:
            return method(*args, **kwargs)
        finally:
            counter.phase = outer

    return run


def count_iteration(preset_name: str, real_batch: int, syn_batch: int, precision: str, reset: bool) -> PhasedOps:
    """The ops of one iteration (a reset iteration with ``reset``), after a warm-up iteration."""
    from .bench_step import PAPER, _device_batches, _distiller

    base = dict(PAPER) if preset_name == "paper" else {"name": preset_name}
    base.update(real_batch=real_batch, online="real", reset_every=2)
    d = _distiller(precision, False, None, syn_batch, base=base)
    batches = _device_batches(d, 0, 3)  # resets at iterations 0 and 2 (reset_every 2)
    counted = 2 if reset else 1
    for batch in batches[:counted]:  # warm-up
        d.step(*batch)
    counter = PhasedOps()
    for (owner, name), label in PHASES.items():
        target = d.online if owner == "online" else d.synthetic
        setattr(target, name, _phased(counter, label, getattr(target, name)))
    with counter:
        d.step(*batches[counted])
    return counter


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.count_launches", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", help="paper (the GPU suite's configuration) or a preset name")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--batches", type=int, nargs=2, default=(2, 2), metavar=("REAL", "SYN"),
                        help="real and synthetic batch counted (the op sequence does not depend on them)")  # fmt: skip
    args = parser.parse_args(argv)
    real, syn = args.batches
    for reset in (False, True):
        counter = count_iteration(args.preset, real, syn, args.precision, reset)
        total = sum(sum(c.values()) for c in counter.by_phase.values())
        casts = sum(c["_to_copy"] for c in counter.by_phase.values())
        kind = "a reset iteration" if reset else "an ordinary iteration"
        print(f"{args.preset}, {args.precision}, {kind}: {total} launching ops ({casts} of them dtype casts)")
        for phase, ops in sorted(counter.by_phase.items(), key=lambda kv: -sum(kv[1].values())):
            top = ", ".join(f"{name} {n}" for name, n in ops.most_common(4))
            print(f"  {phase:38s} {sum(ops.values()):6d}   ({top})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
