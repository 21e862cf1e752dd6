"""Small on-the-fly fixtures: a Karpathy-format dataset of generated JPEGs + BLIP JSON files; shared settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

import pytest
from PIL import Image

# bf16 runs of the tiny preset use 32 px: at its 16 px NFNet's last stage is 1 x 1, where CPU bf16 convolution
# backward (torch 2.14.1, oneDNN) intermittently returns NaN gradients
BF16_TINY_IMAGE_SIZE = 32

COLOURS = [(200, 30, 30), (30, 160, 40), (40, 60, 210), (220, 200, 40), (120, 40, 160), (240, 130, 20)]


def make_karpathy_fixture(root: Path, *, n_train_images: int = 6, n_test_images: int = 4) -> Tuple[Path, Path]:
    """``root/annotations/flickr30k_{train,val,test}.json`` and ``root/images/flickr30k-images/*.jpg``."""
    ann_root, image_root = root / "annotations", root / "images"
    (image_root / "flickr30k-images").mkdir(parents=True, exist_ok=True)
    ann_root.mkdir(parents=True, exist_ok=True)

    def image(i: int) -> str:
        name = f"flickr30k-images/{1000 + i}.jpg"
        Image.new("RGB", (40 + i, 30 + 2 * i), COLOURS[i % len(COLOURS)]).save(image_root / name, quality=90)
        return name

    train = []
    for i in range(n_train_images):
        name = image(i)
        for j in range(5):
            train.append({"image": name, "caption": f"A Photo ({j}) of  thing #{i}!", "image_id": str(i)})
    (ann_root / "flickr30k_train.json").write_text(json.dumps(train))
    for split, offset in (("val", 100), ("test", 200)):
        entries = []
        for i in range(n_test_images):
            name = image(offset + i)
            entries.append({"image": name, "caption": [f"{split} caption {j} of image {i}." for j in range(5)]})
        (ann_root / f"flickr30k_{split}.json").write_text(json.dumps(entries))
    return ann_root, image_root


def make_karpathy_single_file(root: Path, ann_root: Path, *, name: str = "dataset_flickr30k.json") -> Path:
    """The BLIP fixture in ``ann_root`` rewritten as Karpathy's original single file, ``root/name``."""
    images = []
    train = json.loads(next(ann_root.glob("*train.json")).read_text())
    by_image: dict = {}
    for entry in train:
        by_image.setdefault(entry["image"], []).append(entry["caption"])
    for key, captions in by_image.items():
        images.append(
            {"filename": key, "split": "train", "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
        )
    for split in ("val", "test"):
        for entry in json.loads(next(ann_root.glob(f"*{split}.json")).read_text()):
            images.append(
                {"filename": entry["image"], "split": split, "sentences": [{"raw": c} for c in entry["caption"]]}
            )
    path = root / name
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return path


def import_extra(module: str, extra: str):
    """``module``, or a skip of the calling test naming the covmatch extra that installs it."""
    return pytest.importorskip(module, reason=f"the {extra} extra: pip install covmatch[{extra}]")


def make_hf_fixture(root: Path, ann_root: Path, image_root: Path, *, form: str) -> Path:
    """The BLIP fixture as a local Hugging Face dataset in ``root``: ``form`` "dict" (save_to_disk of a
    DatasetDict), "column" (one Dataset with a split column) or "imagefolder" (folders + metadata.jsonl).
    Skips the calling test where the ``data`` extra (``datasets``) is not installed."""
    datasets = import_extra("datasets", "data")

    rows = {}
    train = json.loads(next(ann_root.glob("*train.json")).read_text())
    grouped: dict = {}
    for entry in train:
        grouped.setdefault(entry["image"], []).append(entry["caption"])
    rows["train"] = list(grouped.items())
    for split in ("val", "test"):
        rows[split] = [
            (e["image"], e["caption"]) for e in json.loads(next(ann_root.glob(f"*{split}.json")).read_text())
        ]
    if form == "imagefolder":
        for split, items in rows.items():
            folder = root / ("validation" if split == "val" else split)
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / "metadata.jsonl", "w") as f:
                for i, (key, captions) in enumerate(items):
                    name = f"{i:04d}.png"
                    Image.open(image_root / key).save(folder / name)
                    f.write(json.dumps({"file_name": name, "captions": captions}) + "\n")
        return root
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "captions": datasets.Sequence(datasets.Value("string")),
            "split": datasets.Value("string"),
        }
    )

    def table(split):
        items = rows[split]
        return {
            "image": [str(image_root / key) for key, _ in items],
            "captions": [c for _, c in items],
            "split": [split] * len(items),
        }

    if form == "dict":
        data = datasets.DatasetDict(
            {("validation" if s == "val" else s): datasets.Dataset.from_dict(table(s), features=features) for s in rows}
        )
    else:
        merged = {k: sum((table(s)[k] for s in rows), []) for k in ("image", "captions", "split")}
        data = datasets.Dataset.from_dict(merged, features=features)
    data.save_to_disk(str(root))
    return root
