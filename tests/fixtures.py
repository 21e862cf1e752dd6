"""Small on-the-fly fixtures: a Karpathy-format dataset of generated JPEGs + BLIP JSON files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

from PIL import Image

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
