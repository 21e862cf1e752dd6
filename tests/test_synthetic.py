"""The synthetic set: initialisation from real pairs, save/load round trips, validation, inspection."""

from __future__ import annotations

import json

import pytest
import torch

from covmatch.data.build import build_source, build_train_dataset
from covmatch.errors import CheckpointError, ConfigError
from covmatch.models import build_dual_encoder
from covmatch.presets import get_preset
from covmatch.synthetic import SyntheticSet, init_synthetic_set, synthetic_metadata
from covmatch.visualize import nearest_captions, nearest_tokens, save_image_grid


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    preset = get_preset("tiny")
    model = build_dual_encoder(preset).eval()
    source = build_source(preset)
    dataset = build_train_dataset(source, model.text.tokenizer, preset, augment=False)
    return preset, model, dataset


def test_init_from_real_pairs(setup):
    preset, model, dataset = setup
    syn = init_synthetic_set(dataset, model, preset, num_pairs=8, seed=3)
    assert syn.images.shape == (8, 3, 16, 16)
    assert syn.text_embeds.shape == (8, preset.seq_len, model.text.embed_dim)
    assert syn.attention_mask.shape == (8, preset.seq_len)
    picks = syn.metadata["init_pairs"]
    assert len({dataset.pairs[i][0] for i in picks}) == 8  # distinct images
    # caption embeddings are rows of the input-embedding table
    first = picks[0]
    expected = model.text.embedding_table[dataset.input_ids[first]].detach()
    assert torch.equal(syn.text_embeds[0], expected)
    assert init_synthetic_set(dataset, model, preset, 8, seed=3).metadata["init_pairs"] == picks
    assert init_synthetic_set(dataset, model, preset, 8, seed=4).metadata["init_pairs"] != picks
    with pytest.raises(ConfigError, match="cannot draw 1000 pairs"):
        init_synthetic_set(dataset, model, preset, 1000, seed=0)


def test_balanced_init_draws_the_class_balanced_coreset_rule(setup):
    from covmatch.data.sampling import candidate_pairs, class_balanced

    preset, model, dataset = setup
    syn = init_synthetic_set(dataset, model, preset, num_pairs=12, seed=5, init="balanced")
    picks = syn.metadata["init_pairs"]
    assert syn.metadata["init"] == "balanced"
    assert len({dataset.pairs[i][0] for i in picks}) == 12  # distinct images
    labels = [dataset.source.label(dataset.pairs[i][0]) for i in picks]
    counts = [labels.count(c) for c in set(labels)]
    assert max(counts) - min(counts) <= 1
    candidates = candidate_pairs(dataset.pairs, 5)
    all_labels = [dataset.source.label(dataset.pairs[i][0]) for i in candidates]
    assert picks == class_balanced(candidates, all_labels, 12, 5)
    assert picks != init_synthetic_set(dataset, model, preset, 12, seed=5).metadata["init_pairs"]
    with pytest.raises(ConfigError, match="--init must be one of random, balanced"):
        init_synthetic_set(dataset, model, preset, 12, seed=5, init="herding")


def test_round_trip_is_bit_exact(setup, tmp_path):
    preset, model, dataset = setup
    syn = init_synthetic_set(dataset, model, preset, 8, seed=0)
    syn.text_embeds += 1e-3 * torch.randn_like(syn.text_embeds)  # values off the embedding table
    syn.save(tmp_path)
    back = SyntheticSet.load(tmp_path, expect=synthetic_metadata(preset, model))
    for name in ("images", "text_embeds", "attention_mask"):
        a, b = getattr(syn, name), getattr(back, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    meta = json.loads((tmp_path / "synthetic.json").read_text())
    assert meta["num_pairs"] == 8 and meta["image_encoder"] == "test_nfnet" and meta["seq_len"] == preset.seq_len
    assert "covmatch_version" in meta and meta["init_seed"] == 0


def test_load_rejects_mismatch_and_damage(setup, tmp_path):
    preset, model, dataset = setup
    syn = init_synthetic_set(dataset, model, preset, 8, seed=0)
    syn.save(tmp_path)
    expect = dict(synthetic_metadata(preset, model), image_encoder="nfnet_l0")
    with pytest.raises(
        CheckpointError, match="made for image_encoder='test_nfnet', but this run uses image_encoder='nfnet_l0'"
    ):
        SyntheticSet.load(tmp_path, expect=expect)
    with pytest.raises(CheckpointError, match="made for seq_len=12, but this run uses seq_len=32"):
        SyntheticSet.load(tmp_path, expect={"seq_len": 32})
    meta = json.loads((tmp_path / "synthetic.json").read_text())
    (tmp_path / "synthetic.json").write_text(json.dumps(dict(meta, num_pairs=9)))
    with pytest.raises(CheckpointError, match="field 'num_pairs' says 9 but the tensors have 8"):
        SyntheticSet.load(tmp_path)
    data = (tmp_path / "synthetic.safetensors").read_bytes()
    (tmp_path / "synthetic.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated safetensors file"):
        SyntheticSet.load(tmp_path)
    (tmp_path / "synthetic.safetensors").unlink()
    with pytest.raises(CheckpointError, match="synthetic.safetensors: missing"):
        SyntheticSet.load(tmp_path)
    with pytest.raises(CheckpointError, match="synthetic-set directory not found"):
        SyntheticSet.load(tmp_path / "nowhere")


def test_validation_of_tensors():
    good = dict(
        images=torch.zeros(2, 3, 4, 4), text_embeds=torch.zeros(2, 5, 6), attention_mask=torch.ones(2, 5).long()
    )
    SyntheticSet(**good)
    with pytest.raises(CheckpointError, match=r"images must be \[N, 3, H, W\], got \(2, 4, 4\)"):
        SyntheticSet(**dict(good, images=torch.zeros(2, 4, 4)))
    with pytest.raises(CheckpointError, match=r"text_embeds must be \[N=2, L, E\], got \(3, 5, 6\)"):
        SyntheticSet(**dict(good, text_embeds=torch.zeros(3, 5, 6)))
    with pytest.raises(CheckpointError, match="attention_mask shape"):
        SyntheticSet(**dict(good, attention_mask=torch.ones(2, 4).long()))
    nan = torch.zeros(2, 3, 4, 4)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="synthetic images contain NaN or inf"):
        SyntheticSet(**dict(good, images=nan))


def test_inspection(setup, tmp_path):
    preset, model, dataset = setup
    syn = init_synthetic_set(dataset, model, preset, 8, seed=0)
    # Embeddings taken from the table decode back to the caption's own tokens.
    decoded = nearest_tokens(syn.text_embeds, syn.attention_mask, model.text.embedding_table, model.text.tokenizer)
    tok = model.text.tokenizer
    picks = syn.metadata["init_pairs"]
    originals = [tok.decode([t for t in dataset.input_ids[i].tolist() if t not in tok.all_special_ids]) for i in picks]
    assert decoded == originals
    assert all(dataset.pairs[i][1].startswith(text.replace(" ,", ",")) for i, text in zip(picks, decoded))
    with torch.no_grad():
        feats = model.text(syn.text_embeds, syn.attention_mask)
    assert nearest_captions(feats, feats, originals) == originals
    path = save_image_grid(
        syn.images,
        tmp_path / "grid.png",
        mean=syn.metadata["mean"],
        std=syn.metadata["std"],
        captions=decoded,
        columns=4,
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
