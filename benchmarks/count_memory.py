"""Activation memory of one distillation iteration, counted on any device:
``python -m benchmarks.count_memory [--real-batch 128] [--syn-batch 256] [--small 2 4]``.

What a step keeps for backward decides its memory, and that is countable without a GPU: every tensor autograd
saves (``torch.autograd.graph.saved_tensors_hooks``; parameters left out, storages counted once while any
saved reference to them lives) is tracked from the moment it is saved until its graph is freed. A step builds
one graph after another (the online model's InfoNCE step on the real batch, then the synthetic batch's, or
one per ``--syn-chunk`` chunk), so the peak is the largest graph: reported per graph, as bytes per real pair
(the online step) and per synthetic pair (or per chunk), fitted from two small batches and checked at a third,
for the ``paper`` configuration (NFNet-L0 at 224 px + a BERT-base-shaped encoder, random weights) in fp32,
bf16 autocast, bf16 + ``--grad-checkpointing`` and bf16 + ``--syn-chunk``. Weights, optimiser state and
the synthetic set itself come on top (about 0.5 GB of weights for this architecture in fp32).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch

os.environ.setdefault("COVMATCH_BENCH_SMOKE", "1")  # counting runs on the CPU, whatever the machine has

from .common import add_batch_arguments  # noqa: E402 (reads the variable above at import)

CASES = (
    ("fp32", "fp32", False, None),
    ("bf16", "bf16", False, None),
    ("bf16 + grad checkpointing", "bf16", True, None),
    ("bf16 + syn-chunk 2", "bf16", False, 2),
)


class SavedBytes:
    """Bytes of activations autograd holds, live; ``phase()`` closes the current phase and records the
    peak of saved bytes it added (``phases``)."""

    def __init__(self, parameters=()) -> None:
        self.refs: Dict[Tuple[int, int], int] = {}  # (storage pointer, bytes) -> live saved references
        self.live = 0
        self.base = 0
        self.peak = 0
        self.phases: List[int] = []
        self.parameters = {id(p) for p in parameters}

    def pack(self, tensor: torch.Tensor):
        if id(tensor) in self.parameters:
            return tensor
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if self.refs.get(key, 0) == 0:
            self.live += key[1]
            self.peak = max(self.peak, self.live)
        self.refs[key] = self.refs.get(key, 0) + 1
        return _Held(tensor, key, self)

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def release(self, key) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= key[1]

    def phase(self) -> None:
        self.phases.append(self.peak - self.base)
        self.base = self.peak = self.live


class _Held:
    """A saved tensor as autograd stores it; when autograd drops it, its storage may be freed."""

    __slots__ = ("tensor", "key", "counter")

    def __init__(self, tensor, key, counter) -> None:
        self.tensor, self.key, self.counter = tensor, key, counter

    def __del__(self) -> None:
        self.counter.release(self.key)


def count_step(precision: str, grad_ckpt: bool, chunk: Optional[int], real_batch: int, syn_batch: int) -> List[int]:
    """Peak saved bytes of the two phases of one ``Distiller.step``: the online model's step on the real
    batch, then the synthetic batch's graph (the largest chunk's with ``--syn-chunk``)."""
    from .bench_step import PAPER, _distiller

    base = dict(PAPER, real_batch=real_batch)
    d = _distiller(precision, grad_ckpt, chunk, syn_batch, base=base)
    batch = next(iter(d.real_batches(0, 1)))
    counter = SavedBytes(d.model.parameters())
    online_update = d._online_update

    def online_phase(*args, **kwargs):
        counter.phase()  # before it: nothing
        out = online_update(*args, **kwargs)
        counter.phase()
        return out

    d._online_update = online_phase
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        d.step(batch)
    counter.phase()
    return counter.phases[1:]


def main(argv: Optional[List[str]] = None) -> List[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_batch_arguments(parser, (2, 4), "the smallest counted batches (the fit doubles them; the check triples them)")
    parser.add_argument("--cases", default=None, help="comma-separated indices into CASES (default: all)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    r, s = args.small
    stamp = datetime.date.today().isoformat()
    lines = [f"# python -m benchmarks.count_memory --small {r} {s}   ({stamp}, torch {torch.__version__})",
             "# paper architecture (NFNet-L0 at 224 px + BERT-base shape, random weights), saved-for-backward "
             "bytes per graph; GB = 2^30 bytes"]  # fmt: skip
    chosen = CASES if args.cases is None else [CASES[int(i)] for i in args.cases.split(",")]
    for label, precision, ckpt, chunk in chosen:
        counts = {}
        for pair in ((r, s), (2 * r, 2 * s), (3 * r, 3 * s)):
            counts[pair] = count_step(precision, ckpt, chunk, *pair)
            gc.collect()  # each step builds a paper-sized model and data: free them before the next
        online = {pair: phases[0] for pair, phases in counts.items()}
        synthetic = {pair: phases[1] for pair, phases in counts.items()}
        per_real = (online[(2 * r, 2 * s)] - online[(r, s)]) / r
        base_real = online[(r, s)] - r * per_real
        if chunk is None:
            per_syn = (synthetic[(2 * r, 2 * s)] - synthetic[(r, s)]) / s
            base_syn = synthetic[(r, s)] - s * per_syn
        else:  # one chunk's graph at a time: flat in the synthetic batch
            per_syn, base_syn = 0.0, synthetic[(r, s)]
        predicted = max(base_real + 3 * r * per_real, base_syn + 3 * s * per_syn)
        measured = max(online[(3 * r, 3 * s)], synthetic[(3 * r, 3 * s)])
        check = abs(predicted - measured) / measured
        online_full = base_real + args.real_batch * per_real
        syn_full = base_syn + args.syn_batch * per_syn
        gb = 2**30
        if chunk is None:
            syn_text = f"synthetic graph {per_syn / 2**20:.1f} MB per synthetic pair (+{base_syn / 2**20:.0f} MB)"
        else:
            syn_text = f"synthetic graph {base_syn / 2**20:.0f} MB per chunk of {chunk}, whatever the batch"
        lines.append(
            f"{label}: online graph {per_real / 2**20:.1f} MB per real pair (+{base_real / 2**20:.0f} MB), "
            f"{syn_text}; at real {args.real_batch}, synthetic {args.syn_batch}: online {online_full / gb:.2f} GB, "
            f"synthetic {syn_full / gb:.2f} GB, peak {max(online_full, syn_full) / gb:.2f} GB; "
            f"check at {(3 * r, 3 * s)}: {100 * check:.2f} % off"
        )  # fmt: skip
        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
    sys.exit(0)
