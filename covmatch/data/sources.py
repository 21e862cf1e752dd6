"""Image–caption sources: what a split contains, independent of how images are stored.

A source exposes ``train_pairs`` (one (image key, caption) per caption, as in the Karpathy train JSON),
``retrieval_split(split)`` (images with their captions and the caption→image index used by retrieval)
and ``load_image(key)``. ``KarpathySource`` reads BLIP-format JSON files and an image root (docs/design.md,
*Data format*).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from PIL import Image, UnidentifiedImageError

from covmatch.errors import DataError, brief

from .captions import preprocess_caption

__all__ = [
    "pairs_by_image",
    "RetrievalSplit",
    "ImageTextSource",
    "KarpathySource",
    "find_annotation_file",
    "read_annotation_file",
]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class RetrievalSplit:
    """An evaluation split: images, all their captions, and for each caption the index of its image."""

    image_keys: Tuple[str, ...]
    captions: Tuple[str, ...]
    text_to_image: torch.Tensor  # LongTensor [n_captions]

    @property
    def num_images(self) -> int:
        return len(self.image_keys)


class ImageTextSource:
    """Interface of a dataset of captioned images (see module docstring)."""

    name: str = "source"

    def train_pairs(self) -> List[Tuple[str, str]]:
        raise NotImplementedError

    def retrieval_split(self, split: str) -> RetrievalSplit:
        raise NotImplementedError

    def load_image(self, key: str) -> Image.Image:
        raise NotImplementedError


def pairs_by_image(pairs: Sequence[Tuple[str, str]]) -> Dict[str, List[int]]:
    """Indices of the (image, caption) pairs grouped by image key, in first-seen image order."""
    groups: Dict[str, List[int]] = {}
    for i, (key, _) in enumerate(pairs):
        groups.setdefault(key, []).append(i)
    return groups


def find_annotation_file(ann_root: Path, split: str) -> Path:
    """The one ``*{split}.json`` in ``ann_root`` (BLIP: ``flickr30k_test.json``, ``coco_karpathy_test.json``)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    ann_root = Path(ann_root)
    if not ann_root.is_dir():
        raise DataError(f"{ann_root}: annotation directory not found")
    candidates = sorted(p for p in ann_root.glob(f"*{split}.json") if p.is_file())
    if not candidates:
        raise DataError(f"{ann_root}: no annotation file for split {split!r} (expected a file named *{split}.json)")
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise DataError(f"{ann_root}: several annotation files match *{split}.json ({names}); keep one per split")
    return candidates[0]


def read_annotation_file(path: Path, split: str) -> List[dict]:
    """Parse and check a Karpathy JSON list: train entries have a string caption, val/test a list of them."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"{path}: cannot read annotation file ({err.strerror or err})") from None
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    if not entries:
        raise DataError(f"{path}: split {split!r} is empty")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: entry {i} is a {type(entry).__name__}, expected an object")
        for field in ("image", "caption"):
            if field not in entry:
                raise DataError(f"{path}: entry {i} has no {field!r} field")
        if not isinstance(entry["image"], str) or not entry["image"]:
            raise DataError(f"{path}: entry {i} field 'image' must be a non-empty string")
        caption = entry["caption"]
        if split == "train":
            if not isinstance(caption, str):
                raise DataError(f"{path}: entry {i} field 'caption' must be a string in the train split")
        else:
            if isinstance(caption, str):
                caption = entry["caption"] = [caption]
            if not isinstance(caption, list) or not caption or not all(isinstance(c, str) for c in caption):
                raise DataError(f"{path}: entry {i} field 'caption' must be a non-empty list of strings")
    return entries


class KarpathySource(ImageTextSource):
    """Flickr30K / COCO in the BLIP Karpathy format: ``ann_root/*{train,val,test}.json`` + ``image_root``."""

    name = "karpathy"

    def __init__(self, ann_root: Path, image_root: Path, *, max_words: int = 30, validate: bool = False) -> None:
        self.ann_root = Path(ann_root)
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise DataError(f"{self.image_root}: image directory not found")
        self.max_words = max_words
        self._entries: Dict[str, List[dict]] = {}
        self._files: Dict[str, Path] = {}
        if validate:
            self.validate()

    def _split_entries(self, split: str) -> List[dict]:
        if split not in self._entries:
            path = find_annotation_file(self.ann_root, split)
            self._files[split] = path
            self._entries[split] = read_annotation_file(path, split)
        return self._entries[split]

    def train_pairs(self) -> List[Tuple[str, str]]:
        return [(e["image"], preprocess_caption(e["caption"], self.max_words)) for e in self._split_entries("train")]

    def retrieval_split(self, split: str) -> RetrievalSplit:
        entries = self._split_entries(split)
        keys, captions, owner = [], [], []
        for img_idx, entry in enumerate(entries):
            keys.append(entry["image"])
            for caption in entry["caption"]:
                captions.append(preprocess_caption(caption, self.max_words))
                owner.append(img_idx)
        return RetrievalSplit(tuple(keys), tuple(captions), torch.tensor(owner, dtype=torch.long))

    def load_image(self, key: str) -> Image.Image:
        path = self.image_root / key
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"{path}: image file not found (named in {self._owner_file(key)})") from None
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{path}: unreadable or corrupt image ({brief(err)})") from None

    def _owner_file(self, key: str) -> str:
        for split, entries in self._entries.items():
            if any(e["image"] == key for e in entries):
                return str(self._files[split])
        return str(self.ann_root)

    def validate(self, splits: Sequence[str] = SPLITS) -> None:
        """Open and verify every image of ``splits`` now, instead of failing lazily mid-run."""
        for split in splits:
            path = find_annotation_file(self.ann_root, split)
            for key in sorted({e["image"] for e in self._split_entries(split)}):
                image_path = self.image_root / key
                try:
                    with Image.open(image_path) as img:
                        img.verify()
                except FileNotFoundError:
                    raise DataError(f"{image_path}: image file not found (named in {path})") from None
                except (UnidentifiedImageError, OSError, SyntaxError) as err:
                    raise DataError(f"{image_path}: unreadable or corrupt image ({err}; named in {path})") from None
