"""``covmatch-demo`` end to end on the ``tiny`` preset: distil, evaluate the set and random pairs, compare."""

from __future__ import annotations

from covmatch.demo import main


def test_demo_distils_evaluates_and_compares_on_the_preset_it_is_given(tmp_path, capsys):
    argv = ["--preset", "tiny", "--out", str(tmp_path), "--device", "cpu", "--num-pairs", "8", "--iterations", "2",
            "--runs", "1", "--epochs", "1"]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "comparison.md").is_file() and (tmp_path / "distill" / "synthetic.safetensors").is_file()
    config = (tmp_path / "distill" / "config.json").read_text()
    assert '"name": "tiny"' in config
    assert "wall time: distil" in capsys.readouterr().out
