"""The glyph-scene dataset: its concepts (named DejaVu Sans glyphs, disjoint sets for the benchmark and for
pretraining three encoder families), its scenes (2-4 distinct concepts, Zipf-skewed in train, uniform in
val/test), captions that name what is drawn, and deterministic rendering."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from covmatch.data import GlyphsSource
from covmatch.data.glyphs import (
    BACKGROUNDS,
    CONCEPT_SETS,
    GLYPH_COLOURS,
    MAX_NAME_WORDS,
    concept_frequencies,
    concept_sets,
    glyph_vocabulary,
)

pytest.importorskip("matplotlib")


def test_concepts_are_named_glyphs_in_disjoint_sets():
    vocabulary = glyph_vocabulary()
    names = [g.name for g in vocabulary]
    assert len(names) == len(set(names)) >= sum(CONCEPT_SETS.values())
    assert all(1 <= len(n.split()) <= MAX_NAME_WORDS for n in names)
    assert "snowman" in names and "alpha" in names and not any(" black " in f" {n} " for n in names)
    sets = concept_sets()
    assert {k: len(v) for k, v in sets.items()} == CONCEPT_SETS
    seen = [g for glyphs in sets.values() for g in glyphs]
    assert len(seen) == len(set(seen))  # disjoint


def test_scenes_captions_and_skew():
    source = GlyphsSource(3, num_train_images=3000, num_val_images=600, num_test_images=10)
    for scene, captions in zip(source.scenes("val")[:50], source._captions["val"][:50]):
        names = [o.glyph.name for o in scene.objects]
        assert 2 <= len(names) <= 4 and len(set(names)) == len(names)
        assert len(captions) == len(set(captions)) == 5
        assert all(all(n in c for n in names) for c in captions)  # every caption names every glyph drawn
        assert not {w for c in captions for w in c.split()} & {*GLYPH_COLOURS, *BACKGROUNDS}  # and nothing else
        assert len({o.cell for o in scene.objects}) == len({o.colour for o in scene.objects}) == len(names)
    train = sorted(concept_frequencies(source, "train").values(), reverse=True)
    val = sorted(concept_frequencies(source, "val").values(), reverse=True)
    assert train[0] > 8 * statistics.median(train)  # Zipf-skewed: a few concepts common, most rare
    assert val[0] < 3 * statistics.median(val)  # uniform
    assert len(source.train_pairs()) == 5 * 3000
    split = source.retrieval_split("test")
    assert len(split.image_keys) == 10 and len(split.captions) == 50


def test_rendering_is_deterministic_and_shows_the_glyphs():
    a = GlyphsSource(1, num_train_images=5, num_val_images=2, num_test_images=2, render_size=64)
    b = GlyphsSource(1, num_train_images=5, num_val_images=2, num_test_images=2, render_size=64)
    key = a.scenes("train")[0].key
    img = np.asarray(a.load_image(key))
    assert img.shape == (64, 64, 3) and np.array_equal(img, np.asarray(b.load_image(key)))
    assert img.std() > 10  # glyphs on a background, not a flat image
    other = GlyphsSource(2, num_train_images=5, num_val_images=2, num_test_images=2)
    assert [s.objects for s in other.scenes("train")] != [s.objects for s in a.scenes("train")]
    assert a.fingerprint([key])["concepts"] == "benchmark"
    assert set(a.concepts_of(key)) == {o.glyph.name for o in a.scene(key).objects}


def test_pretraining_sets_show_only_their_concepts():
    benchmark = {g.name for g in concept_sets()["benchmark"]}
    source = GlyphsSource(0, num_train_images=200, num_val_images=2, num_test_images=2, concepts="pretrain_b")
    shown = {o.glyph.name for s in source.scenes("train") for o in s.objects}
    assert shown <= {g.name for g in concept_sets()["pretrain_b"]} and not shown & benchmark
    with pytest.raises(ValueError, match="concepts must be one of"):
        GlyphsSource(0, concepts="everything")


def test_each_encoder_family_pretrains_on_its_own_concepts(tmp_path, monkeypatch, capsys):
    """Glyph-scene pretraining: the family picks the concept set (disjoint from the benchmark's), the weights
    record it and load into the encoder; an encoder of no known family is refused in one line."""
    from safetensors import safe_open

    from covmatch.models import ImageEncoder
    from covmatch.pretrain import FAMILY_CONCEPTS, default_cache_path, encoder_family, main, pretrain_glyphs_encoder

    assert [encoder_family(e) for e in ("test_nfnet", "test_resnet", "test_efficientnet")] == list(FAMILY_CONCEPTS)
    assert len(set(FAMILY_CONCEPTS.values())) == 3 and "benchmark" not in FAMILY_CONCEPTS.values()
    out = pretrain_glyphs_encoder("test_resnet", 32, tmp_path / "w.safetensors", steps=2, batch_size=4,
                                  num_images=12, progress=False)  # fmt: skip
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["concepts"] == "pretrain_b" and f.metadata()["dataset"] == "glyphs"
    ImageEncoder.create("test_resnet", image_size=32, weights=str(out))
    monkeypatch.setenv("COVMATCH_CACHE", str(tmp_path))
    assert default_cache_path("test_vit", 64, dataset="glyphs").name == "glyphs-v3-pretrained-test_vit-64px.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        main(["--dataset", "glyphs", "--encoder", "test_vit"])
    assert exit_info.value.code == 2 and "knows the families nfnet, resnet, efficientnet" in capsys.readouterr().err


def test_energy_directions_counts_singular_directions():
    import torch

    from experiments.glyph_benchmark.spectrum import energy_directions

    cov = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0]))  # energies 9, 4, 1: 64 %, 93 %, 100 % cumulated
    assert energy_directions(cov, (0.5, 0.9, 0.95)) == {"50pct": 1, "90pct": 2, "95pct": 3}
    rotated = torch.linalg.qr(torch.randn(4, 4))[0] @ cov
    assert energy_directions(rotated, (0.95,)) == {"95pct": 3}


def test_whitening_leaves_the_canonical_correlations():
    import torch

    from experiments.glyph_benchmark.spectrum import whitened

    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(20_000, 2, generator=gen, dtype=torch.float64)
    x = torch.cat([shared, torch.randn(20_000, 3, generator=gen, dtype=torch.float64)], 1) * torch.tensor(
        [10.0, 0.1, 1.0, 1.0, 1.0], dtype=torch.float64
    )  # one shared direction with a large variance, one with a tiny one
    y = torch.cat([shared + 0.5 * torch.randn(20_000, 2, generator=gen, dtype=torch.float64),
                   torch.randn(20_000, 2, generator=gen, dtype=torch.float64)], 1)  # fmt: skip
    correlations = torch.linalg.svdvals(whitened(x, y, ridge=0.0))
    expected = 1 / (1 + 0.25) ** 0.5  # corr(s, s + 0.5 e) for unit-variance s, e
    assert torch.allclose(correlations[:2], torch.full((2,), expected, dtype=torch.float64), atol=0.02)
    assert correlations[2:].max() < 0.05


def test_acceptance_checks_what_is_measured_and_says_what_is_missing(tmp_path, monkeypatch):
    import json

    from experiments.glyph_benchmark import acceptance as acc

    monkeypatch.setattr(acc, "RESULTS", tmp_path)

    def result(run, mean):
        run.out.mkdir(parents=True)
        (run.out / "results.json").write_text(json.dumps({"runs": [{"mean": mean}]}))

    for i, run in enumerate(acc.coreset_runs("random")):
        result(run, 10.0 + (i % 2))  # mean 10.4
    first = acc.acceptance()["checks"]
    assert first["full_over_random"]["passed"] is None and "not all done" in first["full_over_random"]["missing"]
    result(acc.full_data_run(), 41.6)
    for run in acc.coreset_runs("cover"):
        result(run, 26.0)
    for run in acc.coreset_runs("random", "test_resnet") + acc.coreset_runs("random", "test_efficientnet-os16"):
        result(run, 9.0 if "resnet" in run.name else 6.24)
    (tmp_path / "spectrum.json").write_text(json.dumps({"glyphs": {"directions": {"95pct": 120}}}))
    linear = {"linear_model": {"mean": 30.0}, "probe": {"mean": 40.0}, "linear_model_over_probe": 0.75}
    (tmp_path / "linear_model.json").write_text(json.dumps({"glyphs": linear}))
    found = acc.acceptance()
    checks = found["checks"]
    assert checks["full_over_random"]["value"] == pytest.approx(4.0) and checks["full_over_random"]["passed"]
    assert checks["full_over_cover"]["value"] == pytest.approx(1.6) and checks["full_over_cover"]["passed"]
    assert checks["directions_for_95pct_energy"]["passed"] and checks["linear_model_over_probe"]["passed"]
    assert checks["unseen_over_distilling_random"]["value"] == pytest.approx(0.6)  # EfficientNet's, the smaller
    assert checks["unseen_over_distilling_random"]["passed"] is False
    assert checks["reference_over_cover"]["passed"] is None
    assert (found["measured"], found["passed"], found["accepted"]) == (5, 4, False)
    acc.write_report(found)
    assert json.loads((tmp_path / "acceptance.json").read_text())["passed"] == 4
    assert "| `unseen_over_distilling_random` |" in (tmp_path / "acceptance.md").read_text()


def test_reference_set_stages_learn_through_the_unrolled_training_and_realise_features():
    import torch

    from covmatch.models import build_dual_encoder
    from covmatch.presets import get_preset
    from experiments.glyph_benchmark.reference_set import learn_features, realise, unrolled_training_loss

    preset = get_preset("tiny")
    model = build_dual_encoder(preset).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    x_real = torch.randn(64, model.image.feature_dim, generator=gen)
    y_real = x_real @ torch.randn(model.image.feature_dim, model.text.feature_dim, generator=gen)
    xs = x_real[:8].clone().requires_grad_(True)
    ys = torch.randn(8, model.text.feature_dim, generator=gen).requires_grad_(True)
    loss = unrolled_training_loss(model, preset, xs, ys, x_real, y_real, torch.Generator().manual_seed(1))
    loss.backward()  # through every epoch of the projections' training
    assert torch.isfinite(loss) and xs.grad.abs().sum() > 0 and ys.grad.abs().sum() > 0
    learnt_x, learnt_y, history = learn_features(model, preset, xs.detach(), ys.detach(), x_real, y_real, steps=3,
                                                 progress=False)  # fmt: skip
    assert len(history) == 3 and not torch.equal(learnt_x, xs.detach())
    mixing = torch.randn(6, 4, generator=gen)
    target = torch.randn(5, 6, generator=gen) @ mixing
    value, before, after = realise(lambda v: v @ mixing, torch.randn(5, 6, generator=gen), target, steps=300,
                                   progress=False)  # fmt: skip
    assert after < 0.05 * before


@pytest.fixture
def methods_root(tmp_path, monkeypatch):
    from experiments.glyph_benchmark import methods

    monkeypatch.setattr(methods, "ROOT", tmp_path)
    return methods


def _scored(run, mean: float) -> None:
    import json

    run.out.mkdir(parents=True)
    (run.out / "results.json").write_text(json.dumps({"runs": [{"mean": mean}]}))


def _score_tune_stage(methods, best: dict) -> None:
    """Every tune run scored: iteration 0 at 6, the others at 7, the fixed regime's ``best`` candidate at 9
    and the paper regime's at 10 (the better regime)."""
    winners = {best["fixed"]: 9.0, best["paper"]: 10.0}
    for job in methods.tune_jobs():
        if isinstance(job, methods.MethodEvaluate):
            name = job.source.split("/")[0].removeprefix("tune-")
            _scored(job, 6.0 if job.source.endswith("/initial") else winners.get(name, 7.0))


def test_methods_final_stage_waits_for_val_and_takes_each_regimes_best(methods_root):
    methods = methods_root
    assert methods.choose("fixed") is None
    assert set(methods.final_rows()) == {"random", "cover", "herding", "kcenter", "reference"}  # need no tuning
    assert all(job.split == "val" for job in methods.tune_jobs() if isinstance(job, methods.MethodEvaluate))
    _score_tune_stage(methods, {"fixed": "fixed-lr300", "paper": "paper-slow-rel0.003"})
    assert methods.choose("fixed") == "fixed-lr300" and methods.best_regime() == "paper"
    rows = methods.final_rows()
    assert all(run.split == "test" for runs in rows.values() for run in runs)
    assert len(rows["paper"]) == len(rows["initial"]) == len(rows["fixed"]) == 9
    assert rows["paper"][0].source == "tune-paper-slow-rel0.003"  # seed 0: the tune stage's set
    assert {run.source for run in rows["fixed"]} == {"tune-fixed-lr300", "fixed-lr300-s1", "fixed-lr300-s2"}
    assert "paper@test_resnet" in rows and "paper@text6" in rows and "fixed@text6" not in rows
    assert len(rows["random"]) == 5 and rows["reference"][0].set_path().name == "reference"
    assert [run.num_pairs for run in rows["random/n500"]] == [500] * 3


def test_every_planned_methods_command_is_accepted_by_the_commands_it_runs(methods_root):
    from covmatch.distill.cli import build_parser as distill_parser
    from covmatch.distill.cli import config_from_args
    from covmatch.eval.cli import build_parser as eval_parser

    methods = methods_root
    _score_tune_stage(methods, {"fixed": "fixed-rel0.001", "paper": "paper-slower-rel0.003"})
    jobs = methods.job_list()
    names = [job.name for job in jobs]
    assert len(names) == len(set(names))
    seen = set()
    for job in jobs:
        assert set(job.requires()) <= seen, job.name  # what a job reads comes before it
        seen.add(job.name)
        argv = job.command()[3:]
        if isinstance(job, methods.GlyphDistill):
            config = config_from_args(distill_parser().parse_args(argv))
            config.preset.check()
            assert config.preset.relative_steps == ("rel" in job.name)
        elif isinstance(job, methods.MethodEvaluate):
            eval_parser().parse_args(argv)
        else:
            assert job.command()[2] in ("covmatch.pretrain", "experiments.glyph_benchmark.reference_set")
    text6 = next(job for job in jobs if job.name.endswith("-text6"))
    assert text6.command()[-2:] == ["--text-layers", "6"]


def test_methods_report_pairs_each_set_with_its_iteration_0_set(methods_root):
    methods = methods_root
    _score_tune_stage(methods, {"fixed": "fixed-lr30", "paper": "paper-slow-rel0.001"})
    rows = methods.final_rows()
    for i, (run, initial) in enumerate(zip(rows["paper"], rows["initial"])):
        _scored(run, 12.0 + i)
        _scored(initial, 10.0)
    result = methods.report()
    assert result["tune"]["fixed-lr30"]["minus_initial"] == {"mean": 3.0, "std": 0.0, "positive": 3, "pairs": 3}
    paper = result["final"]["paper"]
    assert paper["row"]["mean"] == pytest.approx(16.0) and paper["minus_initial"]["positive"] == 9
    assert paper["minus_initial"]["mean"] == pytest.approx(6.0)
    assert result["final"]["random"]["row"] is None
    methods.write_report(result)
    text = (methods.ROOT / "methods.md").read_text()
    assert "| paper | 16.00 ± 2.74 | +6.00 ± 2.74 (9/9 positive) |" in text and "| random | not run |" in text
