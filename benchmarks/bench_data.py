"""Real-data throughput: images per second of the batches ``covmatch-distill`` feeds its step, through exactly
the engine's path (``covmatch.distill.real_data.RealData``: its loader, then ``to_device``).

    python -m benchmarks.bench_data --preset paper --dataset karpathy --ann-root ann/ --image-root images/ \\
        --data-cache cache/ --batches 20
    python -m benchmarks.bench_data --preset paper --make-jpegs /tmp/jpegs --compare   # no dataset at hand

Without ``--data-cache`` it times the decoding path (JPEG decode and the PIL transform per image, in
``--workers`` processes); with it, the cached path (uint8 rows gathered by a thread, cropped and normalised on
the device). Per batch it separates what the host delivers (the loader's batches) from the whole path (the
loader and ``to_device``, synchronised). ``--compare`` times both paths in one run. ``--make-jpegs DIR``
first writes a Karpathy-format dataset of 500 x 375 JPEGs (rendered scenes of the embedded dataset, the size of
a Flickr30K image) and its cache. The last line is ``images/s: X``, the whole path of the last path timed.

In pytest (``make test``) it runs in smoke mode on the ``tiny`` preset and asserts only that both paths deliver
the batches the engine uses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from covmatch.data.build import build_source
from covmatch.data.cache import build_cache, cache_side
from covmatch.data.shapes import ShapesSource
from covmatch.devices import resolve_device
from covmatch.distill.config import DistillConfig
from covmatch.distill.distributed import Ranks
from covmatch.distill.real_data import RealData
from covmatch.models.text import resolve_text_encoder_path
from covmatch.presets import get_preset
from covmatch.settings import resolved_workers

from .common import append_row, synchronize

FLICKR_SIZE = (500, 375)  # a typical Flickr30K image


def make_jpeg_dataset(root: Path, train_images: int, eval_images: int = 50, seed: int = 0) -> Path:
    """A Karpathy-format dataset (BLIP per-split JSON) of ``FLICKR_SIZE`` JPEGs under ``root``; kept if there."""
    ann, images = root / "annotations", root / "images"
    if (ann / "bench_test.json").is_file():
        return root
    shapes = ShapesSource(seed, num_train_images=train_images, num_val_images=eval_images,
                          num_test_images=eval_images, render_size=FLICKR_SIZE[0])  # fmt: skip
    ann.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        view = shapes.retrieval_split(split)
        entries = []
        for i, key in enumerate(view.image_keys):
            name = key.replace(".png", ".jpg")
            path = images / name
            path.parent.mkdir(parents=True, exist_ok=True)
            _photo_like(shapes.load_image(key).resize(FLICKR_SIZE), seed * 1_000_003 + i).save(path, quality=90)
            captions = [view.captions[j] for j in (view.text_to_image == i).nonzero().flatten().tolist()]
            if split == "train":
                entries += [{"image": name, "caption": c, "image_id": name} for c in captions]
            else:
                entries.append({"image": name, "caption": captions})
        (ann / f"bench_{split}.json").write_text(json.dumps(entries))
    return root


def _photo_like(image: Image.Image, seed: int) -> Image.Image:
    """The scene with grain, so that its JPEG holds about as much as a photograph's (~100 KB at 500 x 375) and
    decodes as slowly: flat-coloured scenes compress to ~10 KB and decode several times faster."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-24, 25, size=(image.height, image.width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_text_encoder_path(name), local_files_only=True)


def time_path(config: DistillConfig, tokenizer, batches: int, device: torch.device) -> Dict[str, float]:
    """Images/s of the online model's batches (the train transform) through the engine's data path, timed twice
    after a warm-up batch: the loader alone (what the host delivers when nothing else runs), then the loader and
    ``to_device`` as the engine calls them (synchronised)."""
    data = RealData(config, tokenizer, ranks=Ranks(), device=device)

    shape = []

    def rate(transform: bool) -> float:
        loader = iter(data.loader("online", 0, batches + 2))
        for _ in range(2):  # warm-up: workers or the reader thread start, the first pages are read
            first = next(loader)
            if transform:
                data.to_device(first, torch.float32)
        synchronize()
        start, images = time.perf_counter(), 0
        for batch in loader:
            if transform:
                pixels, _, _ = data.to_device(batch, torch.float32)
                shape[:] = pixels.shape[1:]
            images += batch[0].shape[0]
        synchronize()
        return images / (time.perf_counter() - start)

    host = rate(transform=False)
    whole = rate(transform=True)
    return {"host_images_per_s": host, "images_per_s": whole, "image_shape": shape}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_data", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper")
    p.add_argument("--dataset", default=None, help="shapes, karpathy or hf (default: the preset's)")
    p.add_argument("--ann-root", type=Path, default=None)
    p.add_argument("--image-root", type=Path, default=None)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--data-cache", type=Path, default=None, help="time the cached path from this cache")
    p.add_argument("--workers", type=int, default=None, help="decoding workers (default: as the engine's)")
    p.add_argument("--batches", type=int, default=20, metavar="K", help="timed batches (after two warm-up)")
    p.add_argument("--real-batch", type=int, default=None, help="images per batch (default: the preset's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--text-encoder", default="all-MiniLM-L6-v2", help="tokenizer of the captions (BERT's vocabulary)")
    p.add_argument("--make-jpegs", type=Path, default=None, metavar="DIR",
                   help="write a Karpathy dataset of 500 x 375 JPEGs there (and its cache) and time it")  # fmt: skip
    p.add_argument("--jpegs", type=int, default=1000, help="train images of --make-jpegs")
    p.add_argument("--compare", action="store_true", help="time the decoding and the cached path in one run")
    p.add_argument("--record", action="store_true", help="append the results to benchmarks/results/data.csv")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    overrides = {} if args.real_batch is None else {"real_batch": args.real_batch}
    if args.make_jpegs is not None:
        make_jpeg_dataset(args.make_jpegs, args.jpegs)
        args.dataset, args.ann_root, args.image_root = (
            "karpathy",
            args.make_jpegs / "annotations",
            args.make_jpegs / "images",
        )
    preset = get_preset(args.preset, dataset=args.dataset, **overrides)
    if preset.dataset == "shapes":  # no weights needed to time data; keep the embedded dataset small
        preset = get_preset(
            args.preset, dataset="shapes", shapes_train_images=2_000, shapes_eval_images=100, **overrides
        )
    if args.make_jpegs is not None and args.data_cache is None:
        args.data_cache = args.make_jpegs / f"cache-{cache_side(preset.image_size, augment=preset.train_augment)}"
        if not args.data_cache.exists():
            source = build_source(preset, ann_root=args.ann_root, image_root=args.image_root, seed=args.data_seed)
            build_cache(source, args.data_cache, side=cache_side(preset.image_size, augment=preset.train_augment),
                        splits=("train",), workers=resolved_workers(args.workers, decodes_files=True))  # fmt: skip
    tokenizer = _tokenizer(args.text_encoder)
    common = dict(preset=preset, ann_root=args.ann_root, image_root=args.image_root, data_dir=args.data_dir,
                  data_seed=args.data_seed, workers=args.workers, device=str(device), progress=False)  # fmt: skip
    paths = []
    if args.compare or args.data_cache is None:
        paths.append(("decoding", DistillConfig(**common)))
    if args.data_cache is not None:
        paths.append(("cache", DistillConfig(**common, data_cache=args.data_cache)))
    results = {}
    for name, config in paths:
        workers = resolved_workers(config.workers, decodes_files=preset.dataset != "shapes" and name == "decoding")
        result = time_path(config, tokenizer, args.batches, device)
        results[name] = result
        reader = "a reader thread" if name == "cache" else f"{workers} workers"
        print(f"{name} path ({reader}, {preset.real_batch} images per batch, {device}): the loader "
              f"alone {result['host_images_per_s']:.0f} images/s; loader + to_device {result['images_per_s']:.0f} "
              f"images/s, images {result['image_shape']}")  # fmt: skip
        if args.record:
            append_row("data", {"path": name, "preset": preset.name, "image_size": preset.image_size,
                                "workers": workers, "batch": preset.real_batch, "batches": args.batches,
                                "host_images_per_s": round(result["host_images_per_s"], 1),
                                "images_per_s": round(result["images_per_s"], 1)})  # fmt: skip
    if len(results) == 2:
        decode, cache = results["decoding"], results["cache"]
        print(f"cache / decoding: the loader alone {cache['host_images_per_s'] / decode['host_images_per_s']:.1f}x, "
              f"whole path {cache['images_per_s'] / decode['images_per_s']:.1f}x")  # fmt: skip
    print(f"images/s: {results[paths[-1][0]]['images_per_s']:.0f}")
    return 0


def test_both_paths_deliver_the_batches_the_engine_uses(tmp_path):
    """Smoke: the tiny preset's JPEG dataset through both paths, the last line as documented."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--preset", "tiny", "--make-jpegs", str(tmp_path / "jpegs"), "--jpegs", "24", "--batches", "2",
                     "--real-batch", "8", "--compare", "--device", "cpu", "--workers", "0"]) == 0  # fmt: skip
    lines = out.getvalue().strip().splitlines()
    assert lines[0].startswith("decoding path") and lines[1].startswith("cache path")
    assert lines[-1].startswith("images/s: ") and float(lines[-1].split()[-1]) > 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
