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

``--whole-step`` counts everything instead, at the batches asked for (``--real-batch``, ``--syn-batch``; the
paper's by default: minutes, and as much host memory as the device would need): the bytes of every tensor alive
during one ordinary iteration (``LiveBytes``: the model's weights, both optimisers' momentum, the synthetic set,
the loaded batches, and every tensor the step makes, its gradients and autocast's weight casts included, each
storage from the op that makes it until it is freed), plus the pretrained copy a reset restores, which a GPU
keeps beside the weights (on the CPU it is the host copy itself), as the peak of each phase. Against
``torch.cuda.max_memory_allocated`` (what ``bench_step`` reports) it leaves out the workspaces cuDNN and cuBLAS
take through the caching allocator and the allocator's rounding; the CUDA context is in neither.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import weakref
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

os.environ.setdefault("COVMATCH_BENCH_SMOKE", "1")  # counting runs on the CPU, whatever the machine has

from .common import add_batch_arguments  # noqa: E402 (reads the variable above at import)

CASES = (
    ("fp32", "fp32", False, None),
    ("bf16", "bf16", False, None),
    ("bf16 + grad checkpointing", "bf16", True, None),
    ("bf16 + syn-chunk 2", "bf16", False, 2),
)


def _storage_key(tensor: torch.Tensor) -> Tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class SavedBytes:
    """Bytes of activations autograd holds, live; ``phase()`` closes the current phase and records the
    peak of saved bytes it added (``phases``)."""

    def __init__(self, parameters=()) -> None:
        self.refs: Dict[Tuple[int, int], int] = {}  # (storage pointer, bytes) -> live saved references
        self.live = 0
        self.base = 0
        self.peak = 0
        self.phases: List[int] = []
        self.parameters = {_storage_key(p) for p in parameters}  # by storage: layers save views of weights too

    def pack(self, tensor: torch.Tensor):
        key = _storage_key(tensor)
        if key in self.parameters:
            return tensor
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


WHOLE_STEP_CASES = (
    ("bf16", "bf16", False),
    ("bf16 + grad checkpointing", "bf16", True),
)


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages alive, each counted from the op that makes it (or from ``track``) until the
    storage is freed; ``peak`` is the largest sum seen after any op since the last ``phase``. Views share their
    base's storage."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.keys: set = set()
        self.phases: List[int] = []
        for tensor in existing:
            self.track(tensor)
        self.peak = self.live

    def phase(self) -> None:
        """Close the current phase: record its peak, and start the next one's at the bytes alive now."""
        self.phases.append(self.peak)
        self.peak = self.live

    def track(self, tensor: torch.Tensor) -> None:
        key = _storage_key(tensor)
        if key[1] == 0 or key in self.keys:
            return
        self.keys.add(key)
        self.live += key[1]
        weakref.finalize(tensor.untyped_storage(), self._free, key)

    def _free(self, key) -> None:
        self.keys.discard(key)
        self.live -= key[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.track(value)
        self.peak = max(self.peak, self.live)
        return out


def device_state(d) -> List[torch.Tensor]:
    """What a distillation keeps on the device between steps: the model's weights and buffers, both optimisers'
    state, the synthetic set."""
    s = d.synthetic
    tensors = [*d.model.parameters(), *d.model.buffers(), s.images, s.text_embeds, s.attention_mask]
    for optimizer in (d.online.optimizer, s.optimizer):
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def count_live_step(precision: str, grad_ckpt: bool, real_batch: int, syn_batch: int) -> Tuple[int, List[int]]:
    """(the device state's bytes, the peak of live bytes in each phase: the online model's forward, its
    backward and step, then the rest of the iteration) over one ordinary ``Distiller.step`` after the first (a
    reset, which makes the momentum buffers), both batches loaded before it, with the device copy of the
    pretrained encoders added."""
    from .bench_step import PAPER, _device_batches, _distiller

    d = _distiller(precision, grad_ckpt, None, syn_batch, base=dict(PAPER, real_batch=real_batch))
    batches = _device_batches(d, 0, 2)
    d.step(*batches[0])
    real, online = batches[1]
    loaded = [t for t in (*real[:3], *(online or ())[:3]) if isinstance(t, torch.Tensor)]
    pretrained = sum(p.numel() * p.element_size() for p in d.model.encoder_parameters())
    online_update, backward_and_step = d._online_update, d.online._backward_and_step

    def online_phase(*args, **kwargs):
        live.phase()  # before it: nothing that allocates
        out = online_update(*args, **kwargs)
        live.phase()
        return out

    def online_backward_phase(*args, **kwargs):
        live.phase()  # the forward's peak, at its end, apart from the backward's, where the gradients come
        return backward_and_step(*args, **kwargs)

    d._online_update, d.online._backward_and_step = online_phase, online_backward_phase
    with LiveBytes(device_state(d) + loaded) as live:
        state = live.live
        d.step(real, online)
    live.phase()
    return state + pretrained, [peak + pretrained for peak in live.phases[1:]]


def whole_step_lines(args) -> List[str]:
    """One line per case of ``WHOLE_STEP_CASES``, counted at the batches asked for, not extrapolated: each
    phase's peak moves from one term to another as the batches grow (the online step's from its gradients to
    its forward's activations; with checkpointing, the synthetic pass's to a recomputed segment), so a line fitted
    to small batches misses it. At the paper's batches this takes minutes and as much host memory as the
    device would need."""
    stamp = datetime.date.today().isoformat()
    lines = [f"# python -m benchmarks.count_memory --whole-step --real-batch {args.real_batch} --syn-batch "
             f"{args.syn_batch}   ({stamp}, torch {torch.__version__})",
             "# paper architecture (NFNet-L0 at 224 px + BERT-base shape, random weights), live bytes over one "
             "ordinary iteration (weights, momentum, set, batches, the pretrained copy a reset restores, and all the "
             "step makes), peak per phase; GiB = 2^30 bytes"]  # fmt: skip
    gib = 2**30
    names = ("online forward", "online backward and step", "synthetic pass")
    for label, precision, ckpt in WHOLE_STEP_CASES:
        state, peaks = count_live_step(precision, ckpt, args.real_batch, args.syn_batch)
        gc.collect()  # a paper-sized model and its batches: free them before the next case
        phases = ", ".join(f"{name} {peak / gib:.2f}" for name, peak in zip(names, peaks))
        lines.append(
            f"{label}: peak {max(peaks) / gib:.2f} GiB in the {names[peaks.index(max(peaks))]} ({phases}); "
            f"state between steps {state / gib:.2f} GiB"
        )
        print(lines[-1], flush=True)
    return lines


def main(argv: Optional[List[str]] = None) -> List[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_batch_arguments(parser, (2, 4), "the smallest counted batches (the fit doubles them; the check triples them)")
    parser.add_argument("--cases", default=None, help="comma-separated indices into CASES (default: all)")
    parser.add_argument("--whole-step", action="store_true", help="every live tensor, not only saved activations")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.whole_step:
        return whole_step_lines(args)
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
