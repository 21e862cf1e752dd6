"""Data loading: caption preprocessing, the Karpathy loader and its errors, the embedded shapes dataset."""

from __future__ import annotations

import json

import pytest
import torch

from covmatch.data import KarpathySource, ShapesSource, image_transform, preprocess_caption
from covmatch.errors import DataError

from .fixtures import make_karpathy_fixture


def test_preprocess_caption():
    assert preprocess_caption('A Dog (brown) runs!  Fast.  "Really"; #1 ~ok:') == "a dog brown runs fast really 1 ok"
    long = " ".join(f"w{i}" for i in range(50))
    assert preprocess_caption(long).split() == [f"w{i}" for i in range(30)]
    assert preprocess_caption(long, max_words=5) == "w0 w1 w2 w3 w4"


# ---------------------------------------------------------------------------------------------- karpathy


@pytest.fixture
def karpathy(tmp_path):
    return make_karpathy_fixture(tmp_path)


def test_karpathy_loads_every_split(karpathy):
    ann_root, image_root = karpathy
    source = KarpathySource(ann_root, image_root, validate=True)
    pairs = source.train_pairs()
    assert len(pairs) == 30
    assert pairs[0] == ("flickr30k-images/1000.jpg", "a photo 0 of thing 0")
    test = source.retrieval_split("test")
    assert test.num_images == 4 and len(test.captions) == 20
    assert test.text_to_image.tolist() == [i for i in range(4) for _ in range(5)]
    assert test.captions[6] == "test caption 1 of image 1"
    img = source.load_image(test.image_keys[1])
    assert img.mode == "RGB" and img.size == (241, 432)
    pixels = image_transform(16, train=False)(img)
    assert pixels.shape == (3, 16, 16)
    assert image_transform(16, train=True)(img).shape == (3, 16, 16)


def test_karpathy_missing_directory_and_file(tmp_path, karpathy):
    ann_root, image_root = karpathy
    with pytest.raises(DataError, match="image directory not found"):
        KarpathySource(ann_root, tmp_path / "nope")
    with pytest.raises(DataError, match="annotation directory not found"):
        KarpathySource(tmp_path / "nope", image_root).train_pairs()
    (ann_root / "flickr30k_val.json").unlink()
    with pytest.raises(DataError, match=r"no annotation file for split 'val' \(expected a file named \*val.json\)"):
        KarpathySource(ann_root, image_root).retrieval_split("val")


def test_karpathy_ambiguous_files(karpathy):
    ann_root, image_root = karpathy
    (ann_root / "coco_karpathy_test.json").write_text("[]")
    with pytest.raises(DataError, match="several annotation files match"):
        KarpathySource(ann_root, image_root).retrieval_split("test")


def test_karpathy_malformed_json(karpathy):
    ann_root, image_root = karpathy
    (ann_root / "flickr30k_train.json").write_text('[{"image": "a.jpg",\n "caption": }]')
    with pytest.raises(DataError, match=r"flickr30k_train.json: malformed JSON at line 2 column"):
        KarpathySource(ann_root, image_root).train_pairs()


@pytest.mark.parametrize(
    "entries,message",
    [
        ([{"caption": "x"}], "entry 0 has no 'image' field"),
        ([{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg"}], "entry 1 has no 'caption' field"),
        ([{"image": "a.jpg", "caption": ["x"]}], "entry 0 field 'caption' must be a string in the train split"),
        ([], "split 'train' is empty"),
        ({"image": "a.jpg"}, "expected a JSON list of entries, got dict"),
        (["a.jpg"], "entry 0 is a str, expected an object"),
    ],
)
def test_karpathy_bad_entries(karpathy, entries, message):
    ann_root, image_root = karpathy
    (ann_root / "flickr30k_train.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=message):
        KarpathySource(ann_root, image_root).train_pairs()


def test_karpathy_test_split_caption_list(karpathy):
    ann_root, image_root = karpathy
    (ann_root / "flickr30k_test.json").write_text(json.dumps([{"image": "x.jpg", "caption": []}]))
    with pytest.raises(DataError, match="entry 0 field 'caption' must be a non-empty list of strings"):
        KarpathySource(ann_root, image_root).retrieval_split("test")


def test_karpathy_missing_image_is_reported_lazily_and_up_front(karpathy):
    ann_root, image_root = karpathy
    (image_root / "flickr30k-images" / "1201.jpg").unlink()
    source = KarpathySource(ann_root, image_root)  # lazy: constructing does not look at images
    test = source.retrieval_split("test")
    with pytest.raises(DataError, match=r"1201.jpg: image file not found \(named in .*flickr30k_test.json\)"):
        source.load_image(test.image_keys[1])
    with pytest.raises(DataError, match=r"1201.jpg: image file not found \(named in .*flickr30k_test.json\)"):
        KarpathySource(ann_root, image_root, validate=True)


def test_karpathy_corrupt_image(karpathy):
    ann_root, image_root = karpathy
    (image_root / "flickr30k-images" / "1002.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    source = KarpathySource(ann_root, image_root)
    with pytest.raises(DataError, match="1002.jpg: unreadable or corrupt image"):
        source.load_image("flickr30k-images/1002.jpg")
    with pytest.raises(DataError, match="1002.jpg: unreadable or corrupt image"):
        source.validate(["train"])


# ---------------------------------------------------------------------------------------------- shapes


def test_shapes_splits_like_flickr30k():
    source = ShapesSource(0)
    test = source.retrieval_split("test")
    assert test.num_images == 1000 and len(test.captions) == 5000
    assert torch.equal(torch.bincount(test.text_to_image), torch.full((1000,), 5))
    small = ShapesSource(0, num_train_images=20)
    assert len(small.train_pairs()) == 100


def test_shapes_is_deterministic():
    a, b, c = (
        ShapesSource(3, num_train_images=30),
        ShapesSource(3, num_train_images=30),
        ShapesSource(4, num_train_images=30),
    )
    assert a.train_pairs() == b.train_pairs()
    assert a.train_pairs() != c.train_pairs()
    key = a.train_pairs()[7][0]
    assert a.load_image(key).tobytes() == b.load_image(key).tobytes()
    assert a.retrieval_split("val").captions == b.retrieval_split("val").captions


def test_shapes_captions_describe_the_scene():
    source = ShapesSource(1, num_train_images=50)
    for scene in source.scenes("train"):
        caps = [c for k, c in source.train_pairs() if k == scene.key]
        assert len(caps) == 5 and len(set(caps)) == 5
        for o in scene.objects:  # every object's colour is named in at least one caption
            assert any(o.colour in c for c in caps)


def test_shapes_export_is_a_valid_karpathy_dataset(tmp_path):
    source = ShapesSource(2, num_train_images=4, num_val_images=2, num_test_images=3, render_size=32)
    ann_root, image_root = source.export_karpathy(tmp_path)
    loaded = KarpathySource(ann_root, image_root, validate=True)
    assert loaded.train_pairs() == source.train_pairs()
    assert loaded.retrieval_split("test").captions == source.retrieval_split("test").captions
    key = source.train_pairs()[0][0]
    assert loaded.load_image(key).tobytes() == source.load_image(key).tobytes()
