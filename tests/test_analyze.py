"""``covmatch analyze``: feature stability, match error and movement of a tiny run, as files and one-line errors."""

from __future__ import annotations

import json

import pytest

from covmatch.analyze import main as analyze_main
from covmatch.distill.cli import main as distill_main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze") / "run"
    argv = ["--preset", "tiny", "--out", str(out), "--iterations", "4", "--online", "real", "--no-progress"]
    assert distill_main(argv) == 0
    return out


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
        assert all(m["cov_error"] >= 0 for m in sets.values())
    moved = result["movement"]
    assert moved["pixel_relative_distance"]["mean"] > 0 and 0 <= moved["changed_token_share"] <= 1
    for name in ("analysis.md", "stability.png", "movement.png"):
        assert (run / "analysis" / name).is_file()
    assert "## Feature stability (online: real)" in capsys.readouterr().out


def test_analysis_needs_a_run_with_its_initial_set(tmp_path, capsys):
    assert analyze_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "synthetic.safetensors: missing" in err[0]
