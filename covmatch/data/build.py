"""Build the data a preset describes: the source, tokenised train pairs, and evaluation splits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from covmatch.errors import ConfigError

from .captions import tokenize_captions
from .datasets import CLIP_MEAN, CLIP_STD, ImageDataset, PairDataset, image_transform
from .generated import GENERATED_DATASETS
from .glyphs import GlyphsSource
from .hf import HFSource
from .shapes import ShapesSource
from .sources import ImageTextSource, KarpathySource

__all__ = ["build_source", "build_train_dataset", "RetrievalData", "build_retrieval_data"]


def build_source(
    preset,
    *,
    dataset: Optional[str] = None,
    ann_root: Optional[Path] = None,
    image_root: Optional[Path] = None,
    data_dir: Optional[Path] = None,
    validate: bool = False,
    seed: int = 0,
) -> ImageTextSource:
    """The preset's dataset, or ``dataset``: "shapes" or "glyphs" (embedded, drawn with ``seed``), "karpathy"
    (``ann_root`` and ``image_root``) or "hf" (a local Hugging Face dataset in ``data_dir``)."""
    kind = dataset or preset.dataset
    if kind in GENERATED_DATASETS:
        generated = ShapesSource if kind == "shapes" else GlyphsSource
        return generated(
            seed,
            num_train_images=preset.shapes_train_images,
            num_val_images=preset.shapes_eval_images,
            num_test_images=preset.shapes_eval_images,
            render_size=max(64, preset.image_size),
        )
    if kind == "karpathy":
        if ann_root is None or image_root is None:
            raise ConfigError("--dataset karpathy needs --ann-root DIR and --image-root DIR")
        return KarpathySource(ann_root, image_root, max_words=preset.max_words, validate=validate)
    if kind == "hf":
        if data_dir is None:
            raise ConfigError("--dataset hf needs --data-dir DIR (a save_to_disk folder or an imagefolder)")
        return HFSource(data_dir, max_words=preset.max_words, validate=validate)
    raise ConfigError(f"unknown dataset {kind!r}; choose 'shapes', 'glyphs', 'karpathy' or 'hf'")


def build_train_dataset(source: ImageTextSource, tokenizer, preset, *, augment: bool) -> PairDataset:
    """All train pairs with captions tokenised to ``preset.seq_len``; ``augment`` picks the train transform."""
    pairs = source.train_pairs()
    ids, mask = tokenize_captions(tokenizer, [c for _, c in pairs], preset.seq_len)
    transform = image_transform(
        preset.image_size, train=augment, augment=preset.train_augment, flip=preset.flip, mean=CLIP_MEAN, std=CLIP_STD
    )
    return PairDataset(source, pairs, ids, mask, transform)


def with_train_transform(dataset: PairDataset, preset, *, augment: bool) -> PairDataset:
    """The same pairs and tokens under the train transform (``augment``) or the evaluation one."""
    transform = image_transform(
        preset.image_size, train=augment, augment=preset.train_augment, flip=preset.flip, mean=CLIP_MEAN, std=CLIP_STD
    )
    return PairDataset(dataset.source, dataset.pairs, dataset.input_ids, dataset.attention_mask, transform)


@dataclass
class RetrievalData:
    """An evaluation split ready to encode: images, tokenised captions and the caption→image index."""

    images: ImageDataset
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    text_to_image: torch.Tensor
    captions: Tuple[str, ...]


def build_retrieval_data(source: ImageTextSource, split: str, tokenizer, preset) -> RetrievalData:
    view = source.retrieval_split(split)
    ids, mask = tokenize_captions(tokenizer, view.captions, preset.seq_len)
    transform = image_transform(preset.image_size, train=False, mean=CLIP_MEAN, std=CLIP_STD)
    return RetrievalData(ImageDataset(source, view.image_keys, transform), ids, mask, view.text_to_image, view.captions)
