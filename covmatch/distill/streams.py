"""The random streams of a run and the batches drawn from them.

Every random choice the loop makes (real batch, synthetic sample, projections at a reset, augmentation maps)
comes from a generator seeded by (seed, stream, iteration), so a resumed run draws what an uninterrupted one
would and the ranks of a distributed run agree on every draw without communicating.
"""

from __future__ import annotations

from typing import Iterator, List, Optional

import torch
from torch.utils.data import Sampler

from .distributed import Ranks

__all__ = ["stream_generator", "RealBatchSampler", "collate_pairs", "synthetic_sample"]

# Independent random streams, each a pure function of (seed, stream, iteration).
_STREAMS = {"real": 1, "synthetic": 2, "reset": 3, "online": 4, "augment-synthetic": 5, "augment-real": 6,
            "crop-real": 7, "crop-online": 8}  # fmt: skip


def stream_generator(seed: int, stream: str, iteration: int, device: Optional[torch.device] = None) -> torch.Generator:
    """The generator of (seed, stream, iteration), on ``device`` (default the host): a device generator draws
    there, with no copy from the host; the same key draws other numbers on another kind of device."""
    key = (seed * 1_000_003 + _STREAMS[stream]) * 10_000_019 + iteration
    generator = torch.Generator() if device is None else torch.Generator(device=device)
    return generator.manual_seed(key % 2**64)  # any seed: manual_seed takes 64 bits


class RealBatchSampler(Sampler):
    """Index batches for iterations ``start .. stop-1``: batch t is drawn from ``stream_generator(seed, stream, t)``
    (without replacement within a batch), so batches do not depend on what ran before. With R ranks, rank r
    takes the r-th slice of one permutation: the ranks' batches are disjoint and their union is what one
    process with an R times larger batch would draw."""

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        start: int,
        stop: int,
        ranks: Optional[Ranks] = None,
        stream: str = "real",
    ) -> None:
        ranks = ranks or Ranks()
        self.num_items, self.batch_size, self.seed, self.stream = num_items, min(batch_size, num_items), seed, stream
        self.start, self.stop = start, stop
        self.offset = ranks.rank * self.batch_size

    def __iter__(self) -> Iterator[List[int]]:
        for t in range(self.start, self.stop):
            gen = stream_generator(self.seed, self.stream, t)
            perm = torch.randperm(self.num_items, generator=gen)
            yield perm[self.offset : self.offset + self.batch_size].tolist()

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def collate_pairs(items):
    """(pixels, token ids, attention mask, dataset index) items -> one batched tuple."""
    pixels, ids, mask, index = zip(*items)
    return torch.stack(pixels), torch.stack(ids), torch.stack(mask), torch.tensor(index)


def synthetic_sample(num_pairs: int, batch: int, seed: int, t: int, ranks: Ranks) -> Optional[torch.Tensor]:
    """Rows of this rank's shard in iteration t's synthetic batch, or None for all of them (N <= batch).

    Of one global permutation (the same on every rank) each rank takes the first ``batch / R`` indices that
    fall in its shard, so every rank runs the same number of samples."""
    if num_pairs <= batch:
        return None
    perm = torch.randperm(num_pairs, generator=stream_generator(seed, "synthetic", t))
    shard = ranks.shard(num_pairs)
    mine = perm[(perm >= shard.start) & (perm < shard.stop)] - shard.start
    return mine[: batch // ranks.world_size]
