"""``covmatch analyze``: feature stability, match error and movement of a tiny run, as files and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from covmatch.analyze import coupling, spread
from covmatch.analyze import main as analyze_main
from covmatch.distill.cli import main as distill_main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze") / "run"
    argv = ["--preset", "tiny", "--out", str(out), "--iterations", "4", "--online", "real", "--no-progress"]
    assert distill_main(argv) == 0
    return out


def test_spread_and_coupling_against_float64_references():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    centred = x - x.mean(0)
    assert spread(x) == pytest.approx(float(torch.trace(centred.T @ centred / 199).sqrt()), rel=1e-12)
    assert spread(3 * x + 5) == pytest.approx(3 * spread(x), rel=1e-12)
    # one-dimensional features that are exact multiples are fully coupled; independent ones barely
    assert coupling(x[:, :1], -2 * x[:, :1]) == pytest.approx(1.0, rel=1e-12)
    assert coupling(x[:, :3], x[:, 3:]) < 0.3
    # shrinking one modality halves the covariance but leaves the coupling as it was
    assert coupling(x[:, :3], 0.5 * (x[:, :3] + x[:, 3:])) == pytest.approx(coupling(x[:, :3], x[:, :3] + x[:, 3:]))


def test_analysis_of_a_run(run, capsys):
    assert analyze_main([str(run), "--real-pairs", "64", "--image-encoder", "test_vit"]) == 0
    result = json.loads((run / "analysis" / "analysis.json").read_text())
    stability = result["feature_stability"]
    assert len(stability["image"]) == 4 and stability["image"][0] == 1.0  # tiny resets every 3 iterations
    assert all(-1.0 <= c <= 1.0 + 1e-9 for c in stability["image"] + stability["text"])
    assert stability["text"][-1] < 1.0  # the online model moved
    assert set(result["match"]) == {"test_nfnet", "test_vit"}
    for sets in result["match"].values():
        assert set(sets) == {"iteration 0", "iteration 4"}
        for m in sets.values():
            assert m["cov_error"] >= 0 and 0 < m["coupling"] and m["image_spread"] > 0 and m["text_spread"] > 0
            assert m["cov_scale"] == pytest.approx(m["image_spread"] * m["text_spread"] * m["coupling"], rel=1e-6)
    assert result["rho"] > 0
    moved = result["movement"]
    assert moved["pixel_relative_distance"]["mean"] > 0 and 0 <= moved["changed_token_share"] <= 1
    for name in ("analysis.md", "stability.png", "movement.png"):
        assert (run / "analysis" / name).is_file()
    assert "## Feature stability (online: real)" in capsys.readouterr().out


def test_analysis_needs_a_run_with_its_initial_set(tmp_path, capsys):
    assert analyze_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "synthetic.safetensors: missing" in err[0]
