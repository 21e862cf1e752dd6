"""``covmatch export``: a distilled set as a Hugging Face imagefolder (read back with the real ``datasets``
package, offline) and as LoRS / MTT-VL tensors, each with its dataset card; refusals leave everything as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from covmatch.cli import main as covmatch_main
from covmatch.data.datasets import CLIP_MEAN, CLIP_STD
from covmatch.distill.cli import main as distill_main
from covmatch.eval.cli import main as eval_main
from covmatch.export import EXPORT_MARK, _text_encoder, captions
from covmatch.models.text import TextEncoder
from covmatch.synthetic import SyntheticSet

from .fixtures import import_extra


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    assert (
        distill_main(["--preset", "tiny", "--out", str(run), "--iterations", "2", "--no-progress", "--seed", "3"]) == 0
    )
    evaluation = ["--preset", "tiny", "--synthetic", str(run), "--epochs", "1", "--no-progress"]
    assert eval_main([*evaluation, "--out", str(run / "eval")]) == 0
    return run


def _snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_hf_export_loads_with_datasets_offline(run, tmp_path, monkeypatch):
    datasets = import_extra("datasets", "data")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "hf"
    assert covmatch_main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    syn = SyntheticSet.load(run)
    data = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "cache"))["train"]
    assert len(data) == len(syn) == 8
    assert data[0]["image"].size == (16, 16)
    assert data["text"] == captions(syn, _text_encoder(syn))
    tensors = load_file(str(out / "text_embeddings.safetensors"))
    assert torch.equal(tensors["text_embeds"], syn.text_embeds)
    assert torch.equal(tensors["attention_mask"], syn.attention_mask)
    # the PNGs are the denormalised pixels, to 8-bit rounding
    png = torch.tensor(np.asarray(data[3]["image"]), dtype=torch.float32).permute(2, 0, 1) / 255
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    assert (png - (syn.images[3] * std + mean).clamp(0, 1)).abs().max() <= 0.5 / 255 + 1e-6
    card = (out / "README.md").read_text()
    assert EXPORT_MARK in card and "data seed 0" in card and "distillation seed 3" in card
    assert '"lr_img": 1.0' in card and "covmatch 0." in card
    assert "| eval | test |" in card  # the evaluation found inside the run
    assert 'load_dataset("imagefolder", data_dir=' in card


def _pretrained_text_set(run, tmp_path):
    """The tiny run's set as if distilled with the first layer of the pretrained all-MiniLM-L6-v2 (the tiny
    preset's own text encoder is randomly initialised, so its features cannot be reproduced)."""
    syn = SyntheticSet.load(run)
    preset = syn.metadata["hyperparameters"]["preset"]
    preset.update(text_encoder="all-MiniLM-L6-v2", text_layers=1, text_random_init=False, text_config_overrides=[])
    syn.metadata["text_encoder"] = "all-MiniLM-L6-v2"
    syn.text_embeds = torch.randn(len(syn), syn.text_embeds.shape[1], 384, generator=torch.Generator().manual_seed(0))
    return syn.save(tmp_path / "minilm-set")


def test_lors_export_tensors(run, tmp_path, capsys):
    assert covmatch_main(["export", str(run), "--format", "lors", "--out", str(tmp_path / "refused")]) == 2
    assert "randomly initialised" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    source, out = _pretrained_text_set(run, tmp_path), tmp_path / "lors"
    assert covmatch_main(["export", str(source), "--format", "lors", "--out", str(out)]) == 0
    syn = SyntheticSet.load(source)
    images = torch.load(out / "images_best.pt", weights_only=True)
    texts = torch.load(out / "texts_best.pt", weights_only=True)
    torch.testing.assert_close(images, syn.images)  # the set already uses the CLIP normalisation
    encoder = TextEncoder.create(
        "all-MiniLM-L6-v2", num_layers=1, pooling=syn.metadata["hyperparameters"]["preset"]["text_pooling"]
    ).eval()
    with torch.no_grad():
        expected = encoder(syn.text_embeds, syn.attention_mask)
    assert texts.shape == (8, 384)
    torch.testing.assert_close(texts, expected)
    card = (out / "README.md").read_text()
    assert "images_best.pt" in card and "texts_best.pt" in card and "weights_only=True" in card


def test_export_refuses_and_changes_nothing(run, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    before = _snapshot(tmp_path)
    cases = [
        (["export", str(run), "--format", "hf", "--out", str(busy)], "exists and is not empty (it is not an earlier"),
        (["export", str(run), "--format", "hf", "--out", str(busy), "--overwrite"], "it is not an earlier export"),
        (["export", str(tmp_path / "nope"), "--format", "lors", "--out", str(tmp_path / "x")], "directory not found"),
        (["export", str(run), "--format", "parquet", "--out", str(tmp_path / "x")], "invalid choice: 'parquet'"),
    ]  # fmt: skip
    for argv, message in cases:
        try:
            rc = covmatch_main(argv)
        except SystemExit as exit_:  # argparse's own errors
            rc = exit_.code
        assert rc == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert _snapshot(tmp_path) == before


def test_export_overwrites_only_an_earlier_export(run, tmp_path, capsys):
    source, out = _pretrained_text_set(run, tmp_path), tmp_path / "hf"
    assert covmatch_main(["export", str(source), "--format", "hf", "--out", str(out)]) == 0
    assert covmatch_main(["export", str(source), "--format", "lors", "--out", str(out)]) == 2
    assert "add --overwrite to replace it" in capsys.readouterr().err
    assert covmatch_main(["export", str(source), "--format", "lors", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "images_best.pt", "synthetic.json", "texts_best.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]  # no staging folder left
    assert json.loads((out / "synthetic.json").read_text())["num_pairs"] == 8
