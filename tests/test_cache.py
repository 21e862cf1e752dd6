"""The decoded cache (``covmatch prepare-data``, ``--data-cache``): what it stores equals decoding, a cache that
does not fit is refused with nothing changed, building is atomic, the device-side transforms draw what the
per-image PIL transforms draw, and a run fed from the cache resumes bit-exactly."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covmatch.data.cache import CachedSource, DecodedCache, build_cache, cache_side
from covmatch.data.datasets import CLIP_MEAN, CLIP_STD, image_transform
from covmatch.data.device_transform import crop_resize_normalize, random_resized_crop_boxes, resize_normalize
from covmatch.data.shapes import ShapesSource
from covmatch.data.sources import KarpathySource
from covmatch.distill.cli import main as distill_main
from covmatch.errors import ConfigError
from covmatch.eval.cli import main as eval_main
from covmatch.prepare_data import main as prepare_main

SIDE = 24


@pytest.fixture()
def karpathy(tmp_path) -> KarpathySource:
    """A small Karpathy-format dataset of non-square JPEGs (the embedded scenes, 40 x 30)."""
    shapes = ShapesSource(3, num_train_images=12, num_val_images=4, num_test_images=4, render_size=40)
    ann, images = shapes.export_karpathy(tmp_path / "data")
    for path in images.rglob("*.png"):
        Image.open(path).convert("RGB").resize((40, 30)).save(path.with_suffix(".jpg"), quality=90)
        path.unlink()
    for path in ann.glob("*.json"):
        path.write_text(path.read_text().replace(".png", ".jpg"))
    return KarpathySource(ann, images)


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def test_the_cache_holds_exactly_the_decoded_images_and_the_same_pairs(karpathy, tmp_path):
    manifest = build_cache(karpathy, tmp_path / "cache", side=SIDE)
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": 12, "val": 4, "test": 4}
    cache = DecodedCache.open(tmp_path / "cache", karpathy, side=SIDE)
    for split in ("train", "val", "test"):
        for row, key in enumerate(cache.keys[split]):
            original = karpathy.load_image(key)
            expected = np.asarray(original.resize((SIDE, SIDE), Image.BICUBIC))
            assert np.array_equal(cache.pixels[split][row], expected), key
            assert tuple(cache.sizes[split][row]) == original.size == (40, 30)
    cached = CachedSource(karpathy, cache)
    assert cached.train_pairs() == karpathy.train_pairs()
    for split in ("val", "test"):
        a, b = cached.retrieval_split(split), karpathy.retrieval_split(split)
        assert (
            a.image_keys == b.image_keys and a.captions == b.captions and torch.equal(a.text_to_image, b.text_to_image)
        )
    key = cache.keys["test"][1]
    assert np.array_equal(np.asarray(cached.load_image(key)), cache.pixels["test"][1])


def _expect_refused(root: Path, source, match: str, side: int = SIDE) -> None:
    before = _tree(root)
    with pytest.raises(ConfigError, match=match) as err:
        DecodedCache.open(root, source, side=side)
    assert err.value.field == "data_cache" and "\n" not in str(err.value)
    assert _tree(root) == before


def test_stale_foreign_and_truncated_caches_are_refused_naming_what_differs(karpathy, tmp_path):
    root = tmp_path / "cache"
    build_cache(karpathy, root, side=SIDE)
    _expect_refused(root, karpathy, "built for 24 x 24 pixels, this run needs 32 x 32", side=32)
    shapes = ShapesSource(3, num_train_images=12, num_val_images=4, num_test_images=4, render_size=40)
    _expect_refused(root, shapes, "built from a 'karpathy' dataset, this run reads 'shapes'")
    image = karpathy.image_root / karpathy.train_pairs()[0][0]
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file was replaced since
    _expect_refused(root, karpathy, "stale, source.images.stamps_sha256 was")
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    DecodedCache.open(root, karpathy, side=SIDE)  # back as it was: accepted
    train_json = next(karpathy.ann_root.glob("*train.json"))
    train_json.write_text(train_json.read_text() + " ")
    fresh = KarpathySource(karpathy.ann_root, karpathy.image_root)
    _expect_refused(root, fresh, f"stale, source.annotations.{train_json.name} was")
    (root / "test.pixels").write_bytes((root / "test.pixels").read_bytes()[:-7])
    other = tmp_path / "other"
    build_cache(karpathy, other, side=SIDE, splits=("test",))
    (other / "test.pixels").write_bytes((other / "test.pixels").read_bytes()[:-7])
    with pytest.raises(ConfigError, match="test.pixels holds 6905 bytes, 6912 expected"):
        DecodedCache.open(other, karpathy, side=SIDE, splits=("test",))
    with pytest.raises(ConfigError, match="has no train split"):
        DecodedCache.open(other, karpathy, side=SIDE, splits=("train",))


def test_building_is_atomic_checks_free_space_and_keeps_an_earlier_cache(karpathy, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    build_cache(karpathy, root, side=SIDE)
    before = _tree(root)
    with pytest.raises(ConfigError, match="already exists; pass overwrite"):
        build_cache(karpathy, root, side=SIDE)

    class Broken(KarpathySource):
        calls = 0

        def load_image(self, key):
            Broken.calls += 1
            if Broken.calls > 5:
                raise KeyboardInterrupt  # the build is stopped halfway
            return super().load_image(key)

    broken = Broken(karpathy.ann_root, karpathy.image_root)
    with pytest.raises(KeyboardInterrupt):
        build_cache(broken, root, side=SIDE, overwrite=True)
    assert _tree(root) == before and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data"]
    with pytest.raises(KeyboardInterrupt):
        build_cache(Broken(karpathy.ann_root, karpathy.image_root), tmp_path / "new", side=SIDE)
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data"]
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    with pytest.raises(ConfigError, match=r"needs 0\.06 GiB and .* has 0\.00 GiB free"):
        build_cache(karpathy, tmp_path / "full", side=SIDE)
    assert not (tmp_path / "full").exists()


def test_prepare_data_command_and_its_errors(karpathy, tmp_path, capsys):
    data = ["--dataset", "karpathy", "--ann-root", str(karpathy.ann_root), "--image-root", str(karpathy.image_root)]
    argv = ["--preset", "tiny", *data, "--data-cache", str(tmp_path / "cache"), "--no-progress", "--workers", "0"]
    assert prepare_main(argv) == 0
    assert "train 12, val 4, test 4 images at 16 x 16" in capsys.readouterr().out
    assert prepare_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data-cache" in err[0] and "pass --overwrite to rebuild it" in err[0]
    assert prepare_main([*argv, "--overwrite", "--splits", "test,nope"]) == 2
    assert "--splits: unknown split 'nope'" in capsys.readouterr().err
    assert prepare_main([*argv, "--overwrite", "--image-size", "32"]) == 0
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["side"] == 32


# ---------------------------------------------------------------------------------------------- device transforms


def test_crop_boxes_follow_torchvision_random_resized_crop():
    """Area fraction and aspect ratio of the boxes, in the original's coordinates, as torchvision draws them."""
    from torchvision.transforms import RandomResizedCrop

    width, height, side, n = 500, 375, 320, 4000
    crops = random_resized_crop_boxes(torch.tensor([[width, height]] * n), side, torch.Generator().manual_seed(0),
                                      flip=True)  # fmt: skip
    b = crops.boxes.double()
    w, h = (b[:, 2] - b[:, 0]) * width / side, (b[:, 3] - b[:, 1]) * height / side
    ours = torch.stack([w * h / (width * height), (w / h).log()], 1)
    torch.manual_seed(0)
    image = torch.zeros(1, height, width)
    ref = []
    for _ in range(n):
        i, j, hh, ww = RandomResizedCrop.get_params(image, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3))
        ref.append((ww * hh / (width * height), math.log(ww / hh)))
    ref = torch.tensor(ref, dtype=torch.float64)
    for k in range(2):
        qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
        assert torch.allclose(ours[:, k].quantile(qs), ref[:, k].quantile(qs), atol=0.02), k
    assert ((b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= side + 1e-4) & (b[:, 3] <= side + 1e-4)).all()
    assert abs(crops.flips.double().mean().item() - 0.5) < 0.03


def _pil_batch(images, transform, draws: int):
    return torch.stack([transform(img) for img in images for _ in range(draws)])


def test_device_transforms_match_the_per_image_path_in_distribution():
    shapes = ShapesSource(5, num_train_images=16, render_size=200)
    images = [shapes.load_image(k).resize((200, 150)) for k in shapes.retrieval_split("train").image_keys]
    size, side = 64, cache_side(64, augment=True)
    cached = torch.from_numpy(np.stack([np.asarray(img.resize((side, side), Image.BICUBIC)) for img in images]))
    sizes = torch.tensor([img.size for img in images])
    # evaluation transform: the same image up to the two resamplings
    pil_eval = _pil_batch(images, image_transform(size, train=False), 1)
    ours_eval = resize_normalize(cached, size, CLIP_MEAN, CLIP_STD)
    assert ours_eval.shape == pil_eval.shape and (ours_eval - pil_eval).abs().mean() < 0.03
    # train transform: per-channel statistics over many crops and flips
    draws = 24
    torch.manual_seed(0)
    pil_train = _pil_batch(images, image_transform(size, train=True), draws)
    generator = torch.Generator().manual_seed(1)
    reps = cached.repeat_interleave(draws, 0)
    crops = random_resized_crop_boxes(sizes.repeat_interleave(draws, 0), side, generator, flip=True)
    ours_train = crop_resize_normalize(reps, crops, size, CLIP_MEAN, CLIP_STD)
    for stat in (lambda x: x.mean((0, 2, 3)), lambda x: x.std((0, 2, 3)), lambda x: x.mean((1, 2)).mean(0)):
        assert torch.allclose(stat(ours_train), stat(pil_train), atol=0.04)


# ---------------------------------------------------------------------------------------------- runs


def test_a_run_fed_from_the_cache_resumes_bit_exactly_and_evaluates(tmp_path, capsys):
    cache = tmp_path / "cache"
    augment = ["--train-augment", "--flip"]  # the train crops, drawn on the host, applied on the device
    assert prepare_main(["--preset", "tiny", "--data-cache", str(cache), "--no-progress", "--train-augment"]) == 0
    assert json.loads((cache / "manifest.json").read_text())["side"] == cache_side(16, augment=True) == 24
    common = ["--preset", "tiny", "--device", "cpu", "--no-progress", "--data-cache", str(cache), "--iterations",
              "6", "--save-every", "3", "--online", "real", "--target-augment", *augment]  # fmt: skip
    assert distill_main([*common, "--out", str(tmp_path / "whole")]) == 0
    assert distill_main([*common, "--out", str(tmp_path / "part"), "--iterations", "3"]) == 0
    assert distill_main([*common, "--out", str(tmp_path / "part"), "--resume"]) == 0
    whole, part = ((tmp_path / d / "synthetic.safetensors").read_bytes() for d in ("whole", "part"))
    assert whole == part
    assert (
        eval_main(
            [
                "--preset",
                "tiny",
                "--no-progress",
                "--device",
                "cpu",
                "--data-cache",
                str(cache),
                "--coreset",
                "random",
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 2
    )  # built for crops: 24 px
    assert "built for 24 x 24 pixels, this run needs 16 x 16" in capsys.readouterr().err
    assert eval_main(["--preset", "tiny", "--no-progress", "--device", "cpu", "--data-cache", str(cache),
                      "--coreset", "random", "--out", str(tmp_path / "eval"), *augment]) == 0  # fmt: skip
    capsys.readouterr()
    assert distill_main([*common, "--out", str(tmp_path / "bad"), "--data-seed", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data-cache" in err[0] and "stale, source.seed was 0" in err[0]
    assert not (tmp_path / "bad").exists()
