"""Evaluation: retrieval recall against brute force, coresets, and covmatch-eval end to end on ``tiny``."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from covmatch import retrieval_recall
from covmatch.distill.cli import main as distill_main
from covmatch.errors import ConfigError
from covmatch.eval.cli import main as eval_main
from covmatch.eval.coresets import concept_cover, herding, k_center, select_coreset
from covmatch.models.text import resolve_text_encoder_path
from covmatch.presets import get_preset


def brute_force_recall(sim: torch.Tensor, owner: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """Explicit ranking with pessimistic ties (a wrong item tied with a correct one ranks first)."""
    n_img, n_txt = sim.shape
    out = {}
    for k in ks:
        hits = 0
        for i in range(n_img):
            order = sorted(range(n_txt), key=lambda j: (-float(sim[i, j]), owner[j] == i))
            hits += any(owner[j] == i for j in order[:k])
        out[f"i2t_R@{k}"] = 100.0 * hits / n_img
    for k in ks:
        hits = 0
        for j in range(n_txt):
            order = sorted(range(n_img), key=lambda i: (-float(sim[i, j]), i == owner[j]))
            hits += owner[j] in order[:k]
        out[f"t2i_R@{k}"] = 100.0 * hits / n_txt
    out["mean"] = sum(out.values()) / (2 * len(ks))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_recall_matches_brute_force_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    n_img = 23
    owner = torch.cat([torch.arange(n_img), torch.randint(n_img, (40,), generator=gen)])  # 1..several captions each
    owner = owner[torch.randperm(len(owner), generator=gen)]
    # few distinct directions so that many scores tie exactly
    basis = torch.eye(6)[:4]  # one-hot directions: every cosine is exactly 0 or 1, whatever the summation order
    images = basis[torch.randint(4, (n_img,), generator=gen)] * (1 + torch.rand(n_img, 1, generator=gen))
    texts = basis[torch.randint(4, (len(owner),), generator=gen)]
    sim = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).t()
    expected = brute_force_recall(sim, owner.tolist())
    got = retrieval_recall(images, texts, owner, block_size=5)  # blocks smaller than the matrix
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key]), key


def test_recall_perfect_and_errors():
    emb = torch.eye(5)
    owner = torch.arange(5).repeat_interleave(2)
    result = retrieval_recall(emb, emb[owner], owner)
    assert all(v == 100.0 for v in result.values())
    with pytest.raises(ValueError, match="image 4 has no caption"):
        retrieval_recall(emb, emb[:4], torch.arange(4))
    with pytest.raises(ValueError, match="one entry per caption"):
        retrieval_recall(emb, emb, torch.arange(4))
    with pytest.raises(ValueError, match="same d"):
        retrieval_recall(emb, torch.ones(5, 3), torch.arange(5))


def test_herding_and_kcenter():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(50, 3, generator=gen)
    picks = herding(feats, 10)
    assert len(set(picks)) == 10
    # herding's running mean tracks the full mean better than a random subset of the same size does
    rand = torch.randperm(50, generator=gen)[:10]
    assert (feats[picks].mean(0) - feats.mean(0)).norm() < (feats[rand].mean(0) - feats.mean(0)).norm()
    centres = k_center(feats, 5, seed=1)
    assert len(set(centres)) == 5
    d = torch.cdist(feats, feats[centres]).min(1).values
    assert d.max() <= torch.cdist(feats, feats[rand[:5]]).min(1).values.max() + 1e-6
    pairs = [(f"img{i // 2}", f"cap{i}") for i in range(20)]  # 10 images, 2 captions each
    random_picks = select_coreset("random", pairs, 4, seed=3)
    assert random_picks == select_coreset("random", pairs, 4, seed=3)
    assert len({pairs[i][0] for i in random_picks}) == 4
    assert select_coreset("full", pairs, 4, seed=0) == list(range(20))


def test_concept_cover_shows_every_concept_before_any_twice():
    # 12 images: concepts a..f, two common ones ("a", "b") on most images, the rare ones on one image each
    concepts = [("a", "b"), ("a",), ("b",), ("a", "c"), ("b", "d"), ("a", "b"), ("e",), ("a", "f"), ("a",),
                ("b",), ("a", "b"), ("b", "c", "d")]  # fmt: skip
    picks = concept_cover(concepts, 4, seed=0)
    assert len(set(picks)) == 4 and set().union(*(concepts[i] for i in picks)) == set("abcdef")
    assert picks[0] == 11  # the most new concepts first
    again = concept_cover(concepts, 8, seed=0)
    assert again[:4] == picks and len(set(again)) == 8  # then a second cover, of what is left
    assert concept_cover(concepts, 30, seed=1)[:12] and len(concept_cover(concepts, 30, seed=1)) == 12
    pairs = [(f"img{i}", f"cap{i}") for i in range(12)]
    chosen = select_coreset("cover", pairs, 4, seed=0, concepts=lambda key: concepts[int(key[3:])])
    assert set().union(*(concepts[i] for i in chosen)) == set("abcdef")
    with pytest.raises(ConfigError, match="--coreset cover needs the concepts"):
        select_coreset("cover", pairs, 4, seed=0)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "run"
    assert distill_main(["--preset", "tiny", "--out", str(out), "--iterations", "3", "--no-progress"]) == 0
    return out


def _eval(tmp_path, *argv):
    return eval_main(["--preset", "tiny", "--no-progress", "--out", str(tmp_path / "eval"), *argv])


def test_evaluate_from_python_equals_the_command(tmp_path):
    """``covmatch.eval.evaluate(EvalConfig)`` mirrors ``distill(DistillConfig)``: the command's result from Python,
    with errors naming fields."""
    from covmatch.errors import ConfigError
    from covmatch.eval import EvalConfig, evaluate

    config = EvalConfig(preset=get_preset("tiny"), coreset="random", out=tmp_path / "py", progress=False)
    torch.manual_seed(0)  # the tiny preset's text encoder is built from the global stream (random weights)
    result = evaluate(config, log=lambda message: None)
    torch.manual_seed(0)
    assert _eval(tmp_path, "--coreset", "random") == 0
    command = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["runs"] == command["runs"] and (tmp_path / "py" / "results.json").is_file()
    with pytest.raises(ConfigError, match="^give exactly one of synthetic and coreset"):
        EvalConfig(preset=get_preset("tiny"))
    with pytest.raises(ConfigError, match="^seed must be >= 0, got -1"):
        EvalConfig(preset=get_preset("tiny"), coreset="random", seed=-1)


def test_eval_synthetic_set(distilled, tmp_path):
    assert _eval(tmp_path, "--synthetic", str(distilled), "--runs", "2") == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["method"] == "covmatch" and result["num_pairs"] == 8 and len(result["runs"]) == 2
    assert result["selection"] == "final epoch" and result["config"]["seeds"] == [0, 1]
    assert set(result["summary"]) == {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean"}
    epochs = result["config"]["settings"]["epochs"]
    assert [[e["epoch"] for e in run] for run in result["histories"]] == [list(range(1, epochs + 1))] * 2
    assert all(math.isfinite(e["train_loss"]) and "val_mean" not in e for run in result["histories"] for e in run)
    for name in ("results.md", "recall.png", "synthetic_grid.png"):
        assert (tmp_path / "eval" / name).is_file(), name


@pytest.mark.parametrize("method", ["random", "balanced", "herding", "kcenter", "full"])
def test_eval_coresets(tmp_path, method):
    assert _eval(tmp_path, "--coreset", method, "--num-pairs", "8", "--select-on-val") == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["method"] == method
    assert result["num_pairs"] == (320 if method == "full" else 8)
    assert result["selection"] == "best val epoch"
    assert all("val_mean" in e for e in result["histories"][0] if e["epoch"] == result["epochs_reported"][0])


def test_eval_on_val_for_tuning(tmp_path):
    assert _eval(tmp_path, "--coreset", "random", "--num-pairs", "8", "--split", "val") == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["split"] == "val" and result["selection"] == "final epoch"


def test_eval_cross_architecture(distilled, tmp_path):
    # another image encoder, and a text encoder under another name: captions go through token decoding
    other_text = tmp_path / "other-text-encoder"
    os.symlink(resolve_text_encoder_path("all-MiniLM-L6-v2"), other_text)
    rc = _eval(tmp_path, "--synthetic", str(distilled), "--image-encoder", "test_vit",
               "--text-encoder", str(other_text))  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["config"]["image_encoder"] == "test_vit"
    assert result["config"]["text_encoder"] == str(other_text)


def test_eval_compare(distilled, tmp_path):
    for name, argv in (("a", ["--synthetic", str(distilled)]), ("b", ["--coreset", "random", "--num-pairs", "8"])):
        assert eval_main(["--preset", "tiny", "--no-progress", "--out", str(tmp_path / name), *argv]) == 0
    assert eval_main(["--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 0
    table = (tmp_path / "c" / "comparison.md").read_text()
    assert "| covmatch | 8 |" in table and "| random | 8 |" in table
    assert (tmp_path / "c" / "comparison.png").is_file()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--preset", "demo", "--synthetic", "{distilled}"], "made for image_size=16, but this run uses image_size=32"),
        (["--coreset", "random", "--num-pairs", "500"], "--num-pairs 500 is larger than the train split (64 images)"),
        (["--synthetic", "{empty}"], "empty or missing directory"),
        (["--compare", "{empty}"], "no results.json"),
        (["--coreset", "random", "--runs", "0"], "--runs must be >= 1"),
        (["--coreset", "random", "--split", "val", "--select-on-val"], "would select and score on the same split"),
    ],
)
def test_eval_bad_input(distilled, tmp_path, capsys, argv, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = [a.format(distilled=distilled, empty=empty) for a in argv]
    if "--preset" not in argv:
        argv = ["--preset", "tiny", *argv]
    assert eval_main(["--no-progress", "--out", str(tmp_path / "eval"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_recall_of_non_finite_embeddings_raises():
    emb = torch.eye(5)
    owner = torch.arange(5)
    broken = emb.clone()
    broken[2, 1] = float("nan")
    with pytest.raises(ValueError, match="image_emb holds NaN or infinite values"):
        retrieval_recall(broken, emb, owner)
    with pytest.raises(ValueError, match="text_emb holds NaN or infinite values"):
        retrieval_recall(emb, emb * float("inf"), owner)


def test_diverging_evaluation_stops_in_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from covmatch.models.dual import DualEncoder

    monkeypatch.setattr(DualEncoder, "contrastive_loss", lambda self, a, b: (a.sum() + b.sum()) * float("nan"))
    assert _eval(tmp_path, "--coreset", "random", "--num-pairs", "8") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evaluation run with seed 0 diverged at epoch 1: its training loss became nan" in err[0]
    assert not (tmp_path / "eval").exists()


def test_one_run_is_reported_without_a_spread():
    from covmatch.eval.metrics import metric_keys
    from covmatch.eval.results import results_table, summarise_runs

    def result(values):
        runs = [{k: v for k in metric_keys()} for v in values]
        return {"method": "m", "num_pairs": 4, "runs": runs, "summary": summarise_runs(runs), "seconds": 1.0}

    single, several = results_table([result([12.0])]), results_table([result([10.0, 14.0])])
    assert "±" not in single and "| 12.0 |" in single
    assert "12.0 ± 2.8" in several


def test_training_sets_carry_captions_and_refuse_what_cannot_be_used(distilled):
    from covmatch.errors import ConfigError
    from covmatch.eval.training_sets import carry_captions, coreset_features, load_synthetic_for, synthetic_train_set
    from covmatch.models import build_dual_encoder

    preset = get_preset("tiny")
    syn = load_synthetic_for(distilled, preset)
    model = build_dual_encoder(preset)
    carried = carry_captions(syn, model.text, preset.seq_len, where="set")
    assert carried.text_embeds.shape == syn.text_embeds.shape and carried.metadata["mapped_from"] == "all-MiniLM-L6-v2"
    assert torch.equal(carried.images, syn.images)
    same, batches, frozen = synthetic_train_set(syn, model, preset.seq_len, frozen_text=False, where="set")
    assert same is syn and not frozen and len(batches) == len(syn)  # same encoder: nothing carried
    _, _, frozen = synthetic_train_set(syn, model, preset.seq_len, frozen_text=True, where="set")
    assert frozen  # a frozen text encoder reads token embeddings too
    without_tokens = type(syn)(syn.images, syn.text_embeds, syn.attention_mask, dict(syn.metadata))
    with pytest.raises(ConfigError, match="saved without nearest_token_ids"):
        carry_captions(without_tokens, model.text, preset.seq_len, where="set")
    metadata = dict(syn.metadata, tokenizer="/no/such/tok")
    elsewhere = type(syn)(
        syn.images, syn.text_embeds, syn.attention_mask, metadata, nearest_token_ids=syn.nearest_token_ids
    )
    with pytest.raises(ConfigError, match="set: its tokenizer '/no/such/tok' is not available locally"):
        carry_captions(elsewhere, model.text, preset.seq_len, where="set")

    from covmatch.data.build import build_source, build_train_dataset

    source = build_source(preset, ann_root=None, image_root=None, seed=0)
    dataset = build_train_dataset(source, model.text.tokenizer, preset, augment=False)
    feats = coreset_features(model, dataset, source, [0, 5, 9], "cpu", image_size=16, seed=0, progress=False)
    d_img = model.image.feature_dim
    assert feats.shape == (3, d_img + model.text.feature_dim)
    torch.testing.assert_close(feats[:, :d_img].norm(dim=1), torch.ones(3))


def test_eval_uses_the_sets_data_seed_and_refuses_another(tmp_path, capsys):
    run = tmp_path / "run"
    assert distill_main(["--preset", "tiny", "--out", str(run), "--iterations", "1", "--data-seed", "3",
                         "--no-progress"]) == 0  # fmt: skip
    assert _eval(tmp_path, "--synthetic", str(run)) == 0
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["config"]["data_seed"] == 3
    capsys.readouterr()
    other = ["--synthetic", str(run), "--data-seed", "0", "--overwrite"]
    assert _eval(tmp_path, *other) == 2
    assert "was distilled from data seed 3; pass --allow-data-seed-mismatch" in capsys.readouterr().err
    assert _eval(tmp_path, *other, "--allow-data-seed-mismatch") == 0
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["config"]["data_seed"] == 0


def test_linear_probe_and_frozen_text_evaluation_train_only_what_they_say(distilled, monkeypatch):
    from covmatch.eval import protocol

    trained = {}
    real_train = protocol.train_and_evaluate

    def spy(model, *args, **kwargs):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = real_train(model, *args, **kwargs)
        after = model.state_dict()
        trained[kwargs["settings"].train if "settings" in kwargs else args[2].train] = {
            part: any(not torch.equal(after[k], before[k]) for k in before if k.startswith(part + "."))
            for part in ("image", "text", "image_proj")
        }
        return out

    monkeypatch.setattr("covmatch.eval.runner.train_and_evaluate", spy)
    for mode in ("projections", "all"):
        assert eval_main(["--preset", "tiny", "--no-progress", "--synthetic", str(distilled), "--train", mode,
                          "--out", str(distilled.parent / f"eval-{mode}")]) == 0  # fmt: skip
    assert trained["projections"] == {"image": False, "text": False, "image_proj": True}
    assert trained["all"] == {"image": True, "text": True, "image_proj": True}


def test_class_balanced_coreset_and_fresh_random_subsets_per_run(tmp_path):
    from covmatch.eval.coresets import class_balanced

    labels = ["a"] * 10 + ["b"] * 3 + ["c"] * 7
    picks = class_balanced(list(range(20)), labels, 8, seed=0)
    counts = {k: sum(labels[i] == k for i in picks) for k in "abc"}
    assert len(set(picks)) == 8 and counts == {"a": 3, "b": 3, "c": 2}
    assert _eval(tmp_path, "--coreset", "random", "--num-pairs", "8", "--runs", "2") == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["config"]["subset_seeds"] == [0, 1]  # the spread covers which pairs were drawn


def test_eval_with_another_depth_of_the_text_encoder(distilled, tmp_path):
    assert _eval(tmp_path, "--synthetic", str(distilled), "--text-layers", "1") == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["config"]["preset"]["text_layers"] == 1
    assert 0.0 <= result["config"]["changed_token_share"] <= 1.0


def test_eval_config_file_by_flag_names(tmp_path):
    cfg = tmp_path / "eval.json"
    cfg.write_text(json.dumps({"preset": "tiny", "coreset": "random", "num-pairs": 8, "out": str(tmp_path / "e"),
                               "no_progress": True}))  # fmt: skip
    assert eval_main(["--config", str(cfg), "--epochs", "1"]) == 0
    result = json.loads((tmp_path / "e" / "results.json").read_text())
    assert result["method"] == "random" and result["config"]["preset"]["eval_epochs"] == 1
