"""--whiten-features: a fixed whitening of each encoder's features, fitted on unpaired generated data (cached),
part of the pretrained state; and the whitening's own arithmetic."""

from __future__ import annotations

import pytest
import torch

from covmatch.errors import ConfigError
from covmatch.models import FeatureWhitening, whitening_statistics
from covmatch.presets import get_preset


def test_whitening_statistics_whiten_and_the_layer_applies_them():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen, dtype=torch.float64)
    x = x * torch.tensor([100.0, 10, 1, 1, 0.1, 0.01], dtype=torch.float64) + 5.0
    mean, matrix = whitening_statistics(x, ridge=0.0)
    white = (x - mean) @ matrix
    cov = white.t() @ white / (x.shape[0] - 1)
    assert torch.allclose(cov, torch.eye(6, dtype=torch.float64), atol=1e-8)
    layer = FeatureWhitening(mean, matrix)
    assert torch.allclose(layer(x.float()), white.float(), rtol=1e-3, atol=1e-3)
    # with the ridge r (relative to the mean variance) a direction of variance v keeps v / (v + r): small ones shrink
    variances = torch.linalg.eigvalsh(torch.cov(x.t()))
    ridge = 1e-3 * variances.mean()
    values = torch.linalg.eigvalsh(torch.cov(((x - mean) @ whitening_statistics(x, ridge=1e-3)[1]).t()))
    assert torch.allclose(values, variances / (variances + ridge), atol=1e-9)
    with pytest.raises(ValueError, match="needs features"):
        whitening_statistics(torch.ones(1, 3))


def test_whitened_encoders_are_white_on_their_fitting_data_cached_and_restored(tmp_path, monkeypatch, capsys):
    from covmatch import pretrain
    from covmatch.data.build import build_retrieval_data, build_source

    monkeypatch.setenv("COVMATCH_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrain, "WHITENING_IMAGES", 300)
    preset = get_preset("tiny").replace(whiten_features=True)

    def build():
        torch.manual_seed(0)
        model = pretrain.pretrained_dual_encoder(preset, progress=False)
        return model, torch.rand(3)  # the next draw of the global generator

    model, after_fit = build()
    assert "fitting the feature whitening" in capsys.readouterr().err
    again, after_cache = build()
    assert "fitting" not in capsys.readouterr().err and len(list(tmp_path.glob("whitening-shapes-*"))) == 1
    assert torch.equal(after_fit, after_cache)  # fitting on first use draws nothing from the global generator
    assert torch.equal(model.image.whitening.weight, again.image.whitening.weight)
    source = build_source(preset.replace(shapes_train_images=300), seed=pretrain.WHITENING_SEED)
    data = build_retrieval_data(source, "train", model.text.tokenizer, preset)
    images, captions = pretrain.encoder_features(model, data, progress=False)
    for features in (images, captions):
        values = torch.linalg.eigvalsh(torch.cov(features.double().t()))
        assert values.max() < 1.01 and values[-10:].min() > 0.5  # white, up to the ridge's shrinkage
    assert {"image.whitening.weight", "text.whitening.bias"} <= set(model.pretrained_state())
    counter = get_preset("tiny").replace(image_encoder="test_resnet")  # batch norms count batches in 0-d buffers
    assert pretrain._whitening_path(pretrain.pretrained_dual_encoder(counter, progress=False), counter).name
    with torch.no_grad():
        model.image.whitening.weight.add_(1.0)
    model.reset(torch.Generator().manual_seed(1))
    assert torch.equal(model.image.whitening.weight, again.image.whitening.weight)


def test_whitening_needs_an_embedded_dataset():
    with pytest.raises(ConfigError, match="whiten_features fits its whitening on data generated"):
        get_preset("paper").replace(whiten_features=True).check()
    assert get_preset("glyphs").whiten_features and not get_preset("demo").whiten_features
