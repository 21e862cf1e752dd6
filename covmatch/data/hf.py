"""Image–caption data from a local Hugging Face dataset (``--dataset hf --data-dir DIR``), read with the
``datasets`` package: a ``save_to_disk`` folder (a DatasetDict with train / val / test splits, or one
Dataset with a ``split`` column) or an imagefolder (``train/``, ``val/`` or ``validation/``, ``test/`` with
a ``metadata.jsonl`` or ``metadata.csv`` naming each image's captions). One row is one image with one
caption or a list of them, in the first of the columns ``captions``, ``caption``, ``text``, ``sentences``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from PIL import Image, UnidentifiedImageError

from covmatch.errors import DataError, brief

from .captions import preprocess_caption
from .sources import SPLITS, ImageTextSource, RetrievalSplit, stamps_digest

__all__ = ["HFSource", "CAPTION_COLUMNS"]

CAPTION_COLUMNS = ("captions", "caption", "text", "sentences")
# the names a split of ours may have in a Hugging Face dataset
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "dev"), "test": ("test",)}


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("--dataset hf needs the Hugging Face datasets package: pip install 'covmatch[data]'") from None
    return datasets


def _load_splits(data_dir: Path) -> Dict[str, object]:
    """The dataset's splits by their own names (a save_to_disk folder, else an imagefolder)."""
    datasets = _import_datasets()
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: --data-dir folder not found")
    try:
        if (data_dir / "dataset_dict.json").is_file() or (data_dir / "state.json").is_file():
            loaded = datasets.load_from_disk(str(data_dir))
        else:
            loaded = datasets.load_dataset("imagefolder", data_dir=str(data_dir))
    except (FileNotFoundError, ValueError, OSError, datasets.exceptions.DatasetGenerationError) as err:
        raise DataError(f"{data_dir}: not a readable Hugging Face dataset ({brief(err)})") from None
    if isinstance(loaded, datasets.Dataset):
        if "split" not in loaded.column_names:
            raise DataError(
                f"{data_dir}: one Dataset without a 'split' column; save a DatasetDict with train, val and test "
                "splits, or add a 'split' column"
            )
        names = sorted(set(loaded["split"]))
        return {name: loaded.filter(lambda s, n=name: s == n, input_columns="split") for name in names}
    return dict(loaded)


class HFSource(ImageTextSource):
    """A local Hugging Face dataset as an image–caption source; image keys are ``"{split}/{row}"``."""

    name = "hf"

    def __init__(self, data_dir: Path, *, max_words: int = 30, validate: bool = False) -> None:
        self.data_dir = Path(data_dir)
        self.max_words = max_words
        found = _load_splits(self.data_dir)
        self.splits: Dict[str, object] = {}
        for split in SPLITS:
            name = next((n for n in SPLIT_NAMES[split] if n in found), None)
            if name is None:
                have = ", ".join(sorted(found)) or "none"
                raise DataError(f"{self.data_dir}: no {split!r} split (has: {have}; val may be named validation)")
            self.splits[split] = found[name]
        first = self.splits["train"]
        self.image_column = "image" if "image" in first.column_names else None
        if self.image_column is None:
            raise DataError(f"{self.data_dir}: no 'image' column (columns: {', '.join(first.column_names)})")
        self.caption_column = next((c for c in CAPTION_COLUMNS if c in first.column_names), None)
        if self.caption_column is None:
            raise DataError(
                f"{self.data_dir}: no caption column (expected one of {', '.join(CAPTION_COLUMNS)}; "
                f"columns: {', '.join(first.column_names)})"
            )
        for split, ds in self.splits.items():
            for column in (self.image_column, self.caption_column):
                if column not in ds.column_names:
                    raise DataError(f"{self.data_dir}: split {split!r} has no {column!r} column")
        self._captions: Dict[str, List[List[str]]] = {}
        if validate:
            self.validate()

    def captions(self, split: str) -> List[List[str]]:
        """Each row's captions (a string becomes a list of one), checked non-empty."""
        if split not in self._captions:
            rows = []
            for i, value in enumerate(self.splits[split][self.caption_column]):
                caps = [value] if isinstance(value, str) else value
                if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c for c in caps):
                    raise DataError(
                        f"{self.data_dir}: split {split!r} row {i} column {self.caption_column!r} must be a "
                        f"non-empty string or list of strings, got {value!r}"
                    )
                rows.append(caps)
            if not rows:
                raise DataError(f"{self.data_dir}: split {split!r} is empty")
            self._captions[split] = rows
        return self._captions[split]

    def train_pairs(self) -> List[Tuple[str, str]]:
        return [
            (f"train/{i}", preprocess_caption(c, self.max_words))
            for i, caps in enumerate(self.captions("train"))
            for c in caps
        ]

    def retrieval_split(self, split: str) -> RetrievalSplit:
        if split not in self.splits:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        keys, captions, owner = [], [], []
        for i, caps in enumerate(self.captions(split)):
            keys.append(f"{split}/{i}")
            captions.extend(preprocess_caption(c, self.max_words) for c in caps)
            owner.extend([i] * len(caps))
        return RetrievalSplit(tuple(keys), tuple(captions), torch.tensor(owner, dtype=torch.long))

    def load_image(self, key: str) -> Image.Image:
        split, _, row = key.partition("/")
        value = self.splits[split][int(row)][self.image_column]
        where = f"{self.data_dir}: split {split!r} row {row}"
        try:
            if isinstance(value, Image.Image):
                return value.convert("RGB")
            if isinstance(value, str):  # a path column, relative to the dataset folder
                with Image.open(self.data_dir / value) as img:
                    return img.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{where}: unreadable or corrupt image ({brief(err)})") from None
        raise DataError(f"{where}: column {self.image_column!r} holds {type(value).__name__}, not an image")

    def fingerprint(self, keys: Sequence[str]) -> Dict[str, object]:
        files = sorted(p for p in self.data_dir.rglob("*") if p.is_file())
        return {"files": stamps_digest(files, [str(p.relative_to(self.data_dir)) for p in files])}

    def validate(self, splits: Sequence[str] = SPLITS) -> None:
        """Decode every image and check every caption of ``splits`` now, instead of failing mid-run."""
        for split in splits:
            self.captions(split)
            for i in range(len(self.splits[split])):
                self.load_image(f"{split}/{i}")
