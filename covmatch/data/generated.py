"""What the embedded datasets share: scenes generated from a seed, split by split, with their captions.

A subclass makes one split's scenes and captions (``_make_split``; each scene has a ``key`` of the form
``.../{split}/{index}.png``) and renders a scene (``load_image``); this class keeps them and gives the training
pairs, the retrieval splits and an export in Karpathy/BLIP format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from .sources import SPLITS, ImageTextSource, RetrievalSplit

__all__ = ["GENERATED_DATASETS", "GeneratedSource"]

# the --dataset values generated in process from a seed (nothing decoded from files)
GENERATED_DATASETS = ("shapes", "glyphs")


class GeneratedSource(ImageTextSource):
    """A generated dataset with ``sizes`` images per split, made on first use of a split."""

    def __init__(self, sizes: Dict[str, int]) -> None:
        self.sizes = dict(sizes)
        self._scenes: Dict[str, list] = {}
        self._captions: Dict[str, List[List[str]]] = {}
        self._by_key: Dict[str, object] = {}

    def _make_split(self, split: str) -> Tuple[list, List[List[str]]]:
        """(scenes, their captions) of one split, deterministically."""
        raise NotImplementedError

    def _generate(self, split: str) -> None:
        if split in self._scenes:
            return
        scenes, captions = self._make_split(split)
        self._scenes[split], self._captions[split] = scenes, captions
        self._by_key.update((scene.key, scene) for scene in scenes)

    def scenes(self, split: str) -> list:
        self._generate(split)
        return self._scenes[split]

    def scene(self, key: str):
        """The scene of an image key (its split generated if need be)."""
        self._generate(key.split("/")[-2])
        return self._by_key[key]

    def train_pairs(self) -> List[Tuple[str, str]]:
        self._generate("train")
        return [(s.key, c) for s, caps in zip(self._scenes["train"], self._captions["train"]) for c in caps]

    def retrieval_split(self, split: str) -> RetrievalSplit:
        self._generate(split)
        scenes, caps = self._scenes[split], self._captions[split]
        owner = [i for i, c in enumerate(caps) for _ in c]
        return RetrievalSplit(
            tuple(s.key for s in scenes), tuple(x for c in caps for x in c), torch.tensor(owner, dtype=torch.long)
        )

    def export_karpathy(self, out_dir: Path) -> Tuple[Path, Path]:
        """Write the dataset in Karpathy/BLIP format (PNG images + JSON), for inspection or other tools."""
        out_dir = Path(out_dir)
        ann_root, image_root = out_dir / "annotations", out_dir / "images"
        ann_root.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            self._generate(split)
            entries = []
            for scene, caps in zip(self._scenes[split], self._captions[split]):
                path = image_root / scene.key
                path.parent.mkdir(parents=True, exist_ok=True)
                self.load_image(scene.key).save(path)
                if split == "train":
                    entries += [{"image": scene.key, "caption": c, "image_id": scene.key} for c in caps]
                else:
                    entries.append({"image": scene.key, "caption": caps})
            (ann_root / f"{self.name}_{split}.json").write_text(json.dumps(entries, indent=1))
        return ann_root, image_root
