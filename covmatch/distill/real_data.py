"""The real data of a run: the train split with its captions tokenised, under the train transform (the online
model's batches) and under the target's transform, and the batch loaders of iterations ``start .. stop-1``.

Two paths deliver the same batches. Without a cache, a DataLoader decodes and transforms each image on the
host (worker processes where images are decoded from files). With ``--data-cache``, uint8 pixels are gathered
from the decoded cache by a thread, a few iterations ahead, and ``to_device`` crops, resizes and normalises them
on the device (``covmatch.data.device_transform``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.utils.data import DataLoader

from covmatch.data.build import build_source, build_train_dataset, with_train_transform
from covmatch.data.cache import CachedSource, DecodedCache, cache_side
from covmatch.data.datasets import CLIP_MEAN, CLIP_STD, PairDataset
from covmatch.data.device_transform import crop_resize_normalize, resize_normalize
from covmatch.data.generated import GENERATED_DATASETS
from covmatch.data.sources import pairs_by_image
from covmatch.errors import ConfigError
from covmatch.settings import resolved_workers

from .cached_batches import CachedBatches, DecodedBatch
from .config import DistillConfig
from .distributed import Ranks
from .streams import RealBatchSampler, collate_pairs

__all__ = ["RealData"]


class RealData:
    """``train``: the pairs under the train transform; ``target``: the same pairs under the covariance target's
    (the evaluation transform unless ``--target-augment``); ``loader(stream, start, stop)``: the batches."""

    def __init__(self, config: DistillConfig, tokenizer, *, ranks: Ranks, device: torch.device) -> None:
        self.config, self.ranks, self.device = config, ranks, device
        preset = config.preset
        source = build_source(
            preset, ann_root=config.ann_root, image_root=config.image_root, data_dir=config.data_dir,
            validate=config.validate_data, seed=config.data_seed,
        )  # fmt: skip
        self.cache: Optional[DecodedCache] = None
        if config.data_cache is not None:
            side = cache_side(preset.image_size, augment=preset.train_augment)
            self.cache = DecodedCache.open(config.data_cache, source, side=side, splits=("train",))
            source = CachedSource(source, self.cache)  # images read from the cache, also where they are few
        self.train: PairDataset = build_train_dataset(source, tokenizer, preset, augment=True)
        self.target: PairDataset = with_train_transform(self.train, preset, augment=config.target_augment)
        self._check_sizes()
        if self.cache is not None:
            rows = self.cache.rows("train")
            self._rows = torch.tensor([rows[key] for key, _ in self.train.pairs]).numpy()
            self._sizes = torch.from_numpy(self.cache.sizes["train"][self._rows])

    def _check_sizes(self) -> None:
        config, preset, pairs = self.config, self.config.preset, self.train.pairs
        num_images = len(pairs_by_image(pairs))
        if config.num_pairs > num_images:
            raise ConfigError(f"--num-pairs {config.num_pairs} is larger than the train split ({num_images} images)")
        world = self.ranks.world_size
        if world > 1 and preset.real_batch * world > len(pairs):
            raise ConfigError(
                f"--real-batch {preset.real_batch} per process x {world} processes is more than the "
                f"{len(pairs)} train pairs"
            )

    def loader(self, stream: str, start: int, stop: int):
        """Batches of iterations ``start .. stop-1`` from ``stream``: "real" (the covariance target's, from
        ``target``) or "online" (the online model's own, from ``train``)."""
        cfg = self.config
        dataset = self.target if stream == "real" else self.train
        sampler = RealBatchSampler(len(dataset), cfg.preset.real_batch, cfg.seed, start, stop, self.ranks, stream)
        if self.cache is not None:
            # the train transform where the dataset has it: the online model's batches, and the target's with
            # --target-augment; its crops are drawn per iteration on the host, applied on the device
            augment = cfg.preset.train_augment and (stream == "online" or cfg.target_augment)
            return CachedBatches(
                self.cache.pixels["train"], self._rows, self._sizes, dataset.input_ids, dataset.attention_mask,
                sampler, crop=(cfg.seed, stream, cfg.preset.flip) if augment else None,
                pin=self.device.type == "cuda",
            )  # fmt: skip
        workers = resolved_workers(cfg.workers, decodes_files=cfg.preset.dataset not in GENERATED_DATASETS)
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=collate_pairs,
            pin_memory=self.device.type == "cuda",
            # one loader serves a whole run: its workers start once and keep the next batches ready
            prefetch_factor=2 if workers else None,
            # its own generator: creating the iterator must not draw from the (checkpointed) global RNG
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    def to_device(self, batch, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch's pixels (in ``dtype``), token ids and mask on the device; a batch read from the decoded
        cache travels as uint8 and is cropped, resized and normalised there."""
        if isinstance(batch, DecodedBatch):
            pixels = batch.pixels.to(self.device, non_blocking=True)
            size = self.config.preset.image_size
            if batch.crops is None:
                pixels = resize_normalize(pixels, size, CLIP_MEAN, CLIP_STD)
            else:
                crops = batch.crops.to(self.device, non_blocking=True)
                pixels = crop_resize_normalize(pixels, crops, size, CLIP_MEAN, CLIP_STD)
            pixels = pixels.to(dtype)
        else:
            pixels = batch[0].to(self.device, dtype=dtype, non_blocking=True)
        ids, mask = (x.to(self.device, non_blocking=True) for x in batch[1:3])
        return pixels, ids, mask
