"""A decoded cache of a dataset's images (``covmatch prepare-data``): each split decoded once into one uint8
array ``[n, S, S, 3]``, memory-mapped, so that a run reads pixels instead of decoding JPEGs on the host.

Every image is resized (PIL bicubic, as the per-image path resizes) to ``S x S`` = the preset's image size
plus the margin its random crop needs (``cache_side``): a crop of half the image's area, the smallest the
train transform takes, still has ``image_size`` pixels on a side, so it is never upsampled from less than
the per-image path would see. Each image's original width and height are kept, so the device-side crop
(``covmatch.data.device_transform``) draws its boxes in the original's coordinates, as torchvision does.

``manifest.json`` records what the cache was built from (the dataset kind, the source's fingerprint: its
annotation files' and images' sizes and modification times, or the embedded dataset's seed and sizes), the
side, the counts and the covmatch version. A cache that does not match the run (other sources, another size,
a truncated array) is refused in one line naming what differs; it is never used silently. Building is
atomic: everything is written into a sibling folder that is renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from covmatch._version import __version__
from covmatch.errors import ConfigError

from .sources import SPLITS, ImageTextSource

__all__ = [
    "CACHE_FORMAT",
    "MIN_CROP_SCALE",
    "cache_side",
    "source_fingerprint",
    "DecodedCache",
    "CachedSource",
    "build_cache",
    "cache_bytes",
]

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
MIN_CROP_SCALE = 0.5  # the train transform's smallest crop, as a fraction of the image's area
_FREE_SPACE_MARGIN = 64 * 2**20  # bytes left free besides the arrays (manifest, indexes, the filesystem's own)


def cache_side(image_size: int, *, augment: bool) -> int:
    """The stored side: ``image_size``, or with the train crop ``image_size / sqrt(MIN_CROP_SCALE)`` rounded up
    to a multiple of 8 (224 -> 320)."""
    if not augment:
        return image_size
    return int(math.ceil(image_size / math.sqrt(MIN_CROP_SCALE) / 8.0) * 8)


def _split_keys(source: ImageTextSource, split: str) -> List[str]:
    """The images of a split, each once, in the order the source lists them."""
    if split == "train":
        return list(dict.fromkeys(key for key, _ in source.train_pairs()))
    return list(source.retrieval_split(split).image_keys)


def source_fingerprint(source: ImageTextSource, keys: Dict[str, Sequence[str]]) -> Dict[str, object]:
    """What the cached pixels depend on: the source's own ``fingerprint`` (files with sizes and modification
    times, or a generator's seed) and a digest of the image keys of each split."""
    digest = {split: hashlib.sha256("\n".join(k).encode()).hexdigest()[:16] for split, k in keys.items()}
    return {"source": source.fingerprint([key for k in keys.values() for key in k]), "keys": digest}


def cache_bytes(counts: Dict[str, int], side: int) -> int:
    return sum(counts.values()) * side * side * 3


def _describe_difference(built: dict, wanted: dict, prefix: str = "") -> Optional[str]:
    """The first field where two fingerprints differ, in words (None: they are equal)."""
    for key in sorted(set(built) | set(wanted)):
        a, b = built.get(key), wanted.get(key)
        if a == b:
            continue
        where = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            return _describe_difference(a, b, where + ".")
        return f"{where} was {json.dumps(a)} when the cache was built, now {json.dumps(b)}"
    return None


@dataclass
class DecodedCache:
    """An opened cache: per split, the memory-mapped pixels ``[n, S, S, 3]`` uint8, the image keys and each
    image's original (width, height)."""

    root: Path
    side: int
    manifest: dict
    pixels: Dict[str, np.ndarray]
    keys: Dict[str, List[str]]
    sizes: Dict[str, np.ndarray]

    @classmethod
    def open(cls, root: Path, source: ImageTextSource, *, side: int, splits: Sequence[str] = SPLITS) -> DecodedCache:
        """The cache in ``root`` for ``source`` at ``side``, checked: one ConfigError line (naming the setting
        ``data_cache``) when it is missing, foreign, stale or truncated."""
        root = Path(root)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise ConfigError(
                f"data_cache {root}: no {MANIFEST} there (build one with covmatch prepare-data)", field="data_cache"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"data_cache {root}: unreadable {MANIFEST} ({err})", field="data_cache") from None
        if manifest.get("format") != CACHE_FORMAT:
            raise ConfigError(
                f"data_cache {root}: cache format {manifest.get('format')!r}, this covmatch reads {CACHE_FORMAT}; "
                "rebuild it with covmatch prepare-data --overwrite",
                field="data_cache",
            )
        if manifest.get("side") != side:
            raise ConfigError(
                f"data_cache {root}: built for {manifest.get('side')} x {manifest.get('side')} pixels, this run "
                f"needs {side} x {side} (another image size or preset); rebuild it for this one",
                field="data_cache",
            )
        missing = [s for s in splits if s not in manifest.get("splits", {})]
        if missing:
            raise ConfigError(f"data_cache {root}: has no {', '.join(missing)} split", field="data_cache")
        if manifest.get("dataset") != source.name:
            raise ConfigError(
                f"data_cache {root}: built from a {manifest.get('dataset')!r} dataset, this run reads {source.name!r}",
                field="data_cache",
            )
        keys = {split: _split_keys(source, split) for split in splits}
        built = manifest.get("fingerprint", {})  # of every split it holds: compare those this run reads
        built = {"source": built.get("source"), "keys": {s: built.get("keys", {}).get(s) for s in splits}}
        difference = _describe_difference(built, source_fingerprint(source, keys))
        if difference is not None:
            raise ConfigError(f"data_cache {root}: stale, {difference}; rebuild it", field="data_cache")
        pixels, sizes = {}, {}
        for split in splits:
            entry = manifest["splits"][split]
            count = int(entry["count"])
            path = root / entry["pixels"]
            expected = count * side * side * 3
            actual = path.stat().st_size if path.is_file() else -1
            if actual != expected:
                raise ConfigError(
                    f"data_cache {root}: {entry['pixels']} holds {max(actual, 0)} bytes, {expected} expected "
                    "(truncated or damaged); rebuild it",
                    field="data_cache",
                )
            pixels[split] = np.memmap(path, dtype=np.uint8, mode="r", shape=(count, side, side, 3))
            sizes[split] = np.asarray(json.loads((root / entry["index"]).read_text())["sizes"], dtype=np.int64)
        return cls(root, side, manifest, pixels, keys, sizes)

    def rows(self, split: str) -> Dict[str, int]:
        """Image key -> row of ``split``."""
        return {key: i for i, key in enumerate(self.keys[split])}

    def image(self, split: str, row: int) -> Image.Image:
        return Image.fromarray(np.asarray(self.pixels[split][row]))


class CachedSource(ImageTextSource):
    """A source whose images come from a decoded cache (``S x S``, resized once) instead of their files; its
    captions, pairs and splits are the wrapped source's."""

    def __init__(self, source: ImageTextSource, cache: DecodedCache) -> None:
        self.source = source
        self.cache = cache
        self.name = source.name
        self._where = {key: (split, i) for split in cache.keys for i, key in enumerate(cache.keys[split])}
        if hasattr(source, "label"):  # classes for balanced sampling, where the data has them
            self.label = source.label

    def train_pairs(self):
        return self.source.train_pairs()

    def retrieval_split(self, split: str):
        return self.source.retrieval_split(split)

    def load_image(self, key: str) -> Image.Image:
        split, row = self._where[key]
        return self.cache.image(split, row)

    def fingerprint(self, keys: Sequence[str]) -> Dict[str, object]:
        return self.source.fingerprint(keys)


def _resize(image: Image.Image, side: int) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((side, side), Image.BICUBIC), dtype=np.uint8)


class _Decode:
    """Picklable for DataLoader workers: item i of the list -> (pixels [S, S, 3] uint8, (width, height))."""

    def __init__(self, source: ImageTextSource, keys: Sequence[str], side: int) -> None:
        self.source, self.keys, self.side = source, list(keys), side

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        image = self.source.load_image(self.keys[i])
        return _resize(image, self.side), image.size


def _collate(items):
    return np.stack([p for p, _ in items]), [s for _, s in items]


def build_cache(
    source: ImageTextSource,
    root: Path,
    *,
    side: int,
    splits: Sequence[str] = SPLITS,
    workers: int = 0,
    overwrite: bool = False,
    progress: Callable[[int, str], object] = None,
    describe: Optional[Dict[str, object]] = None,
) -> dict:
    """Decode every image of ``splits`` once into ``root`` (atomically) and return its manifest.

    ``progress(total, desc)`` returns a tqdm-like bar (``update``, ``close``); ``describe`` adds fields to the
    manifest (the preset, the image size). An existing cache is replaced only with ``overwrite``; the free space
    of the filesystem is checked before anything is written."""
    from torch.utils.data import DataLoader

    root = Path(root)
    if root.exists() and not overwrite:
        raise ConfigError(f"data_cache {root} already exists; pass overwrite to rebuild it", field="data_cache",
                          mentions=("overwrite",))  # fmt: skip
    keys = {split: _split_keys(source, split) for split in splits}
    counts = {split: len(k) for split, k in keys.items()}
    needed = cache_bytes(counts, side) + _FREE_SPACE_MARGIN
    parent = root.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise ConfigError(
            f"data_cache {root}: needs {needed / 2**30:.2f} GiB and {parent} has {free / 2**30:.2f} GiB free",
            field="data_cache",
        )
    staging = parent / f".{root.name}.building-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        entries = {}
        for split in splits:
            pixels_name, index_name = f"{split}.pixels", f"{split}.index.json"
            array = np.memmap(staging / pixels_name, dtype=np.uint8, mode="w+", shape=(counts[split], side, side, 3))
            sizes: List[Tuple[int, int]] = []
            loader = DataLoader(_Decode(source, keys[split], side), batch_size=32, num_workers=workers,
                                collate_fn=_collate)  # fmt: skip
            bar = progress(counts[split], f"decode {split}") if progress else None
            row = 0
            for batch, batch_sizes in loader:
                array[row : row + len(batch)] = batch
                sizes.extend(batch_sizes)
                row += len(batch)
                if bar is not None:
                    bar.update(len(batch))
            if bar is not None:
                bar.close()
            array.flush()
            del array
            (staging / index_name).write_text(json.dumps({"keys": keys[split], "sizes": sizes}))
            entries[split] = {"count": counts[split], "pixels": pixels_name, "index": index_name}
        manifest = {
            "format": CACHE_FORMAT,
            "covmatch_version": __version__,
            "dataset": source.name,
            "side": side,
            "layout": "uint8 [n, side, side, 3] (RGB), each image resized with PIL bicubic to side x side",
            "splits": entries,
            "fingerprint": source_fingerprint(source, keys),
            **(describe or {}),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _fsync_tree(staging)
        if root.exists():  # overwrite: swap, then remove the old one
            retired = parent / f".{root.name}.retired-{os.getpid()}"
            os.replace(root, retired)
            os.replace(staging, root)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
