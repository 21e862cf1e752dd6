"""Torch datasets and image transforms over an ``ImageTextSource`` (docs/design.md, *Data format*)."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from .sources import ImageTextSource

__all__ = ["CLIP_MEAN", "CLIP_STD", "image_transform", "PairDataset", "ImageDataset"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_transform(
    image_size: int,
    *,
    train: bool,
    augment: bool = True,
    flip: bool = True,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> T.Compose:
    """Train: RandomResizedCrop(scale 0.5-1) + horizontal flip; test: resize. Then CLIP normalisation.

    ``flip=False`` for data whose captions name left and right (the embedded shapes dataset).
    """
    steps = []
    if train and augment:
        steps.append(T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC))
        if flip:
            steps.append(T.RandomHorizontalFlip())
    else:
        steps.append(T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class PairDataset(Dataset):
    """Image–caption pairs with pre-tokenised captions: item = (pixels, input_ids, attention_mask, index)."""

    def __init__(
        self,
        source: ImageTextSource,
        pairs: Sequence[Tuple[str, str]],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        transform,
    ) -> None:
        if len(pairs) != input_ids.shape[0] or input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"{len(pairs)} pairs but token tensors of shapes {tuple(input_ids.shape)} and "
                f"{tuple(attention_mask.shape)}"
            )
        self.source = source
        self.pairs = list(pairs)
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        key, _ = self.pairs[index]
        pixels = self.transform(self.source.load_image(key))
        return pixels, self.input_ids[index], self.attention_mask[index], index


class ImageDataset(Dataset):
    """Images by key (for encoding an evaluation split): item = pixels."""

    def __init__(self, source: ImageTextSource, keys: Sequence[str], transform) -> None:
        self.source = source
        self.keys = list(keys)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.source.load_image(self.keys[index]))
