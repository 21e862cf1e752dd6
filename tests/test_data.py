"""Data loading: caption preprocessing, the Karpathy loader and its errors, the embedded shapes dataset."""

from __future__ import annotations

import json
import math

import pytest
import torch

from covmatch.data import KarpathySource, ShapesSource, image_transform, preprocess_caption
from covmatch.errors import DataError

from .fixtures import import_extra, make_hf_fixture, make_karpathy_fixture, make_karpathy_single_file


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


# ---------------------------------------------------------------------------------------------- other formats


def _same_data(a, b, *, same_keys: bool = True):
    """Two sources hold the same pairs, splits and (decoded) images."""
    assert [c for _, c in a.train_pairs()] == [c for _, c in b.train_pairs()]
    for split in ("val", "test"):
        va, vb = a.retrieval_split(split), b.retrieval_split(split)
        assert va.captions == vb.captions and va.text_to_image.tolist() == vb.text_to_image.tolist()
        if same_keys:
            assert va.image_keys == vb.image_keys
        first_a, first_b = a.load_image(va.image_keys[1]), b.load_image(vb.image_keys[1])
        assert first_a.size == first_b.size and first_a.tobytes() == first_b.tobytes()


def test_karpathy_single_file_reads_as_the_per_split_files(tmp_path, karpathy):
    ann_root, image_root = karpathy
    single = make_karpathy_single_file(tmp_path, ann_root)
    blip = KarpathySource(ann_root, image_root)
    _same_data(KarpathySource(single, image_root, validate=True), blip)
    folder = tmp_path / "karpathy"
    folder.mkdir()
    single.rename(folder / single.name)
    _same_data(KarpathySource(folder, image_root), blip)  # a folder holding the one file


def test_karpathy_single_file_restval_and_filepath(tmp_path, karpathy):
    """COCO's form: ``filepath`` folders, and ``restval`` images join the train split."""
    _, image_root = karpathy
    images = [
        {"filepath": "flickr30k-images", "filename": "1000.jpg", "split": "train", "sentences": [{"raw": "A b."}]},
        {"filepath": "flickr30k-images", "filename": "1001.jpg", "split": "restval", "sentences": [{"raw": "C d"}]},
        {"filepath": "flickr30k-images", "filename": "1100.jpg", "split": "val", "sentences": [{"raw": "v"}]},
        {"filepath": "flickr30k-images", "filename": "1200.jpg", "split": "test", "sentences": [{"raw": "t"}]},
    ]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images}))
    source = KarpathySource(path, image_root, validate=True)
    assert source.train_pairs() == [("flickr30k-images/1000.jpg", "a b"), ("flickr30k-images/1001.jpg", "c d")]
    assert source.retrieval_split("test").image_keys == ("flickr30k-images/1200.jpg",)


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "expected Karpathy's format, an object with an 'images' list"),
        ({"images": ["x"]}, r"images\[0\] is a str, expected an object"),
        ({"images": [{"split": "train", "sentences": [{"raw": "a"}]}]}, r"images\[0\] field 'filename'"),
        ({"images": [{"filename": "a.jpg", "split": "dev", "sentences": [{"raw": "a"}]}]}, "'split' must be one of"),
        ({"images": [{"filename": "a.jpg", "split": "train", "sentences": []}]}, "'sentences' must be a non-empty"),
        ({"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"tokens": []}]}]},
         r"images\[0\].sentences\[0\] has no string 'raw' caption"),
        ({"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "a"}]}]}, "split 'val' is empty"),
    ],
)  # fmt: skip
def test_karpathy_single_file_errors_name_the_file_and_entry(tmp_path, karpathy, data, message):
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=message) as info:
        KarpathySource(path, karpathy[1])
    assert str(path) in str(info.value)


def test_karpathy_two_single_files_are_ambiguous(tmp_path, karpathy):
    folder = tmp_path / "ann"
    folder.mkdir()
    for name in ("dataset_flickr30k.json", "dataset_coco.json"):
        make_karpathy_single_file(folder, karpathy[0], name=name)
    with pytest.raises(DataError, match="several Karpathy dataset files"):
        KarpathySource(folder, karpathy[1])


@pytest.mark.parametrize("form", ["dict", "column", "imagefolder"])
def test_hf_dataset_reads_as_the_karpathy_files(tmp_path, karpathy, form):
    from covmatch.data.hf import HFSource

    ann_root, image_root = karpathy
    root = make_hf_fixture(tmp_path / "hf", ann_root, image_root, form=form)
    source = HFSource(root, validate=True)
    # an imagefolder re-encodes the JPEGs as PNGs: same decoded pixels, other keys
    _same_data(source, KarpathySource(ann_root, image_root), same_keys=False)
    assert source.train_pairs()[0][0] == "train/0"


def test_hf_dataset_errors(tmp_path, karpathy):
    datasets = import_extra("datasets", "data")

    from covmatch.data.hf import HFSource

    with pytest.raises(DataError, match="--data-dir folder not found"):
        HFSource(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="not a readable Hugging Face dataset"):
        HFSource(empty)
    only_train = tmp_path / "only_train"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": ["a"], "text": ["b"]})}).save_to_disk(
        str(only_train)
    )
    with pytest.raises(DataError, match=r"no 'val' split \(has: train"):
        HFSource(only_train)
    no_text = tmp_path / "no_text"
    splits = {s: datasets.Dataset.from_dict({"image": ["a"], "label": [1]}) for s in ("train", "val", "test")}
    datasets.DatasetDict(splits).save_to_disk(str(no_text))
    with pytest.raises(DataError, match="no caption column"):
        HFSource(no_text)
    bad_caption = tmp_path / "bad_caption"
    splits = {s: datasets.Dataset.from_dict({"image": ["a.png"], "caption": [""]}) for s in ("train", "val", "test")}
    datasets.DatasetDict(splits).save_to_disk(str(bad_caption))
    with pytest.raises(DataError, match=r"split 'train' row 0 column 'caption' must be a non-empty string"):
        HFSource(bad_caption).train_pairs()
    with pytest.raises(DataError, match=r"split 'train' row 0: unreadable or corrupt image"):
        HFSource(bad_caption).load_image("train/0")


def test_shapes_export_is_a_valid_karpathy_dataset(tmp_path):
    source = ShapesSource(2, num_train_images=4, num_val_images=2, num_test_images=3, render_size=32)
    ann_root, image_root = source.export_karpathy(tmp_path)
    loaded = KarpathySource(ann_root, image_root, validate=True)
    assert loaded.train_pairs() == source.train_pairs()
    assert loaded.retrieval_split("test").captions == source.retrieval_split("test").captions
    key = source.train_pairs()[0][0]
    assert loaded.load_image(key).tobytes() == source.load_image(key).tobytes()


@pytest.mark.parametrize("form", ["karpathy-file", "hf"])
def test_distill_and_eval_read_the_other_formats(tmp_path, karpathy, form):
    """End to end through the commands: distil from, and evaluate on, Karpathy's single file and an HF dataset."""
    from covmatch.distill.cli import main as distill_main
    from covmatch.eval.cli import main as eval_main

    ann_root, image_root = karpathy
    if form == "hf":
        data = [
            "--dataset",
            "hf",
            "--data-dir",
            str(make_hf_fixture(tmp_path / "hf", ann_root, image_root, form="dict")),
        ]
    else:
        single = make_karpathy_single_file(tmp_path, ann_root)
        data = ["--dataset", "karpathy", "--ann-root", str(single), "--image-root", str(image_root)]
    run = tmp_path / "run"
    common = ["--preset", "tiny", "--no-progress", *data]
    assert distill_main([*common, "--out", str(run), "--num-pairs", "4", "--iterations", "2", "--validate-data"]) == 0
    assert eval_main([*common, "--synthetic", str(run), "--out", str(tmp_path / "eval"), "--epochs", "1"]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["num_pairs"] == 4 and math.isfinite(results["summary"]["mean"]["mean"])
