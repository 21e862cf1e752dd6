"""Image–caption sources: what a split contains, independent of how images are stored.

A source exposes ``train_pairs`` (one (image key, caption) per caption, as in the Karpathy train JSON),
``retrieval_split(split)`` (images with their captions and the caption→image index used by retrieval)
and ``load_image(key)``. ``KarpathySource`` reads Flickr30K / COCO annotations in either of the two forms
researchers have (docs/design.md, *Data format*): BLIP's per-split JSON files, or Karpathy's original
single file (``dataset_flickr30k.json``, ``dataset_coco.json``), plus an image root.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

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
    "read_karpathy_dataset_file",
]

SPLITS = ("train", "val", "test")
# the splits of Karpathy's single file that make up each of ours ("restval": COCO's extra train images)
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


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

    def fingerprint(self, keys: Sequence[str]) -> Dict[str, object]:
        """What the images of ``keys`` depend on (files' sizes and modification times, or a generator's
        settings): a decoded cache built from this source is stale when it changes."""
        raise NotImplementedError


def file_stamp(path: Path) -> List[int]:
    """[size, modification time in ns] of a file: what tells a changed file from the one a cache was built from."""
    stat = Path(path).stat()
    return [stat.st_size, stat.st_mtime_ns]


def stamps_digest(paths: Sequence[Path], names: Sequence[str]) -> Dict[str, object]:
    """Count and digest of many files' stamps (named by ``names``); a missing file is a DataError."""
    digest = hashlib.sha256()
    for path, name in zip(paths, names):
        try:
            size, mtime = file_stamp(path)
        except FileNotFoundError:
            raise DataError(f"{path}: image file not found") from None
        digest.update(f"{name}\t{size}\t{mtime}\n".encode())
    return {"count": len(names), "stamps_sha256": digest.hexdigest()[:16]}


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


def _single_file(ann_root: Path) -> Optional[Path]:
    """Karpathy's original file when ``ann_root`` is one, or a folder holding one and no per-split files."""
    if ann_root.is_file():
        return ann_root
    if ann_root.is_dir() and not any(any(ann_root.glob(f"*{split}.json")) for split in SPLITS):
        found = sorted(p for p in ann_root.glob("dataset_*.json") if p.is_file())
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DataError(f"{ann_root}: several Karpathy dataset files ({names}); pass one as --ann-root FILE")
        return found[0] if found else None
    return None


def read_karpathy_dataset_file(path: Path) -> Dict[str, List[dict]]:
    """Karpathy's ``dataset_*.json`` (``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}``)
    as BLIP-format entries per split: one per caption in train (which includes COCO's ``restval``), one per
    image with its captions in val and test. Image paths are ``filepath/filename`` (COCO) or ``filename``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise DataError(f"{path}: cannot read annotation file ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{path}: expected Karpathy's format, an object with an 'images' list")
    ours = {raw: split for split, raws in KARPATHY_SPLITS.items() for raw in raws}
    entries: Dict[str, List[dict]] = {split: [] for split in SPLITS}
    for i, image in enumerate(images):
        where = f"{path}: images[{i}]"
        if not isinstance(image, dict):
            raise DataError(f"{where} is a {type(image).__name__}, expected an object")
        name = image.get("filename")
        if not isinstance(name, str) or not name:
            raise DataError(f"{where} field 'filename' must be a non-empty string")
        if image.get("split") not in ours:
            raise DataError(f"{where} field 'split' must be one of {', '.join(ours)}, got {image.get('split')!r}")
        sentences = image.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise DataError(f"{where} field 'sentences' must be a non-empty list")
        captions = []
        for j, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if not isinstance(raw, str):
                raise DataError(f"{where}.sentences[{j}] has no string 'raw' caption")
            captions.append(raw)
        folder = image.get("filepath")
        key = f"{folder}/{name}" if isinstance(folder, str) and folder else name
        split = ours[image["split"]]
        if split == "train":
            entries[split].extend({"image": key, "caption": c} for c in captions)
        else:
            entries[split].append({"image": key, "caption": captions})
    for split, found in entries.items():
        if not found:
            raise DataError(f"{path}: split {split!r} is empty (no image has split {KARPATHY_SPLITS[split]})")
    return entries


class KarpathySource(ImageTextSource):
    """Flickr30K / COCO: ``ann_root`` is a folder of BLIP per-split files (``*{train,val,test}.json``), or
    Karpathy's single ``dataset_*.json`` (the file, or a folder holding it); image paths are under ``image_root``."""

    name = "karpathy"

    def __init__(self, ann_root: Path, image_root: Path, *, max_words: int = 30, validate: bool = False) -> None:
        self.ann_root = Path(ann_root)
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise DataError(f"{self.image_root}: image directory not found")
        self.max_words = max_words
        self._entries: Dict[str, List[dict]] = {}
        self._files: Dict[str, Path] = {}
        self._single = _single_file(self.ann_root)
        if self._single is not None:
            self._entries = read_karpathy_dataset_file(self._single)
            self._files = dict.fromkeys(SPLITS, self._single)
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

    def fingerprint(self, keys: Sequence[str]) -> Dict[str, object]:
        for split in SPLITS:  # every annotation file there is: any of them may name these images
            try:
                self._split_entries(split)
            except DataError:
                continue
        annotations = {Path(path).name: file_stamp(path) for path in sorted(set(map(str, self._files.values())))}
        unique = sorted(set(keys))
        return {"annotations": annotations, "images": stamps_digest([self.image_root / k for k in unique], unique)}

    def _owner_file(self, key: str) -> str:
        for split, entries in self._entries.items():
            if any(e["image"] == key for e in entries):
                return str(self._files[split])
        return str(self.ann_root)

    def validate(self, splits: Sequence[str] = SPLITS) -> None:
        """Open and verify every image of ``splits`` now, instead of failing lazily mid-run."""
        for split in splits:
            self._split_entries(split)
            path = self._files[split]
            for key in sorted({e["image"] for e in self._split_entries(split)}):
                image_path = self.image_root / key
                try:
                    with Image.open(image_path) as img:
                        img.verify()
                except FileNotFoundError:
                    raise DataError(f"{image_path}: image file not found (named in {path})") from None
                except (UnidentifiedImageError, OSError, SyntaxError) as err:
                    raise DataError(f"{image_path}: unreadable or corrupt image ({err}; named in {path})") from None
