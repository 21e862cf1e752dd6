"""Real batches read from a decoded cache (``covmatch prepare-data``): uint8 pixels gathered from the memory map
in a background thread, a few iterations ahead of the step, pinned for a fast non-blocking copy to the GPU;
the crop, flip and normalisation then run on the device (``covmatch.data.device_transform``).

Each batch carries its own crop boxes, drawn from the run's stream for its iteration (``crop-real`` /
``crop-online``), so what a step sees does not depend on how far ahead the thread read, and a resumed run
draws the same crops as an uninterrupted one.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch

from covmatch.data.device_transform import CropBoxes, random_resized_crop_boxes

from .streams import RealBatchSampler, stream_generator

__all__ = ["DecodedBatch", "CachedBatches", "PREFETCH"]

PREFETCH = 4  # batches read ahead of the step


class DecodedBatch(NamedTuple):
    """One real batch as the cache holds it: ``pixels`` uint8 ``[B, S, S, 3]``, the tokens, the dataset indices,
    and the crop boxes of the train transform (None: the evaluation transform, a plain resize)."""

    pixels: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    index: torch.Tensor
    crops: Optional[CropBoxes]


class CachedBatches:
    """The batches of ``sampler``'s iterations. ``rows``: the cache row of each pair; ``sizes``: each pair's
    original (width, height); ``crop``: (seed, stream, flip) to draw train crops, or None."""

    def __init__(
        self,
        pixels: np.ndarray,
        rows: np.ndarray,
        sizes: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        sampler: RealBatchSampler,
        *,
        crop: Optional[tuple],
        pin: bool,
        prefetch: int = PREFETCH,
    ) -> None:
        self.pixels, self.rows, self.sizes = pixels, rows, sizes
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.sampler, self.crop, self.pin, self.prefetch = sampler, crop, pin, prefetch

    def __len__(self) -> int:
        return len(self.sampler)

    def batch(self, t: int, indices) -> DecodedBatch:
        index = torch.as_tensor(indices, dtype=torch.long)
        pixels = torch.from_numpy(self.pixels[self.rows[index.numpy()]])  # one gather: a copy out of the map
        if self.pin:
            pixels = pixels.pin_memory()
        crops = None
        if self.crop is not None:
            seed, stream, flip = self.crop
            generator = stream_generator(seed, f"crop-{stream}", t)
            crops = random_resized_crop_boxes(self.sizes[index], self.pixels.shape[1], generator, flip=flip)
        return DecodedBatch(pixels, self.input_ids[index], self.attention_mask[index], index, crops)

    def __iter__(self) -> Iterator[DecodedBatch]:
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def offer(item) -> bool:
            """Hand ``item`` over unless the consumer has stopped; False once it has."""
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                for t, indices in zip(range(self.sampler.start, self.sampler.stop), self.sampler):
                    if not offer(self.batch(t, indices)):
                        return
                offer(None)
            except BaseException as err:  # handed to the consumer, raised there
                offer(err)

        reader = threading.Thread(target=read, name="covmatch-cached-batches", daemon=True)
        reader.start()
        try:
            while True:
                item = ready.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
