"""experiments/embedded_study/hybrid_set.py: a set of one set's images and another's captions."""

from __future__ import annotations

import torch

from covmatch.synthetic import SyntheticSet
from experiments.embedded_study.hybrid_set import main


def _set(path, n: int, fill: float, encoder: str = "test_nfnet") -> SyntheticSet:
    syn = SyntheticSet(
        torch.full((n, 3, 8, 8), fill),
        torch.full((n, 4, 6), fill),
        torch.ones(n, 4, dtype=torch.long),
        {"image_encoder": encoder, "text_encoder": "t", "iteration": int(fill)},
    )
    syn.save(path)
    return syn


def test_hybrid_takes_images_from_one_set_and_captions_from_the_other(tmp_path, capsys):
    _set(tmp_path / "a", 3, 1.0)
    _set(tmp_path / "b", 3, 2.0)
    assert main(["--images", str(tmp_path / "a"), "--captions", str(tmp_path / "b"), "--out", str(tmp_path / "h")]) == 0
    made = SyntheticSet.load(tmp_path / "h")
    assert (made.images == 1.0).all() and (made.text_embeds == 2.0).all()
    assert made.metadata["iteration"] == 2 and made.metadata["hybrid"]["images"] == str(tmp_path / "a")


def test_hybrid_of_sets_that_do_not_fit_is_one_line_exit_2(tmp_path, capsys):
    _set(tmp_path / "a", 3, 1.0)
    _set(tmp_path / "b", 4, 2.0)
    _set(tmp_path / "c", 3, 2.0, encoder="test_resnet")
    for other, message in (("b", "the sets hold 3 and 4 pairs"), ("c", "image_encoder")):
        argv = ["--images", str(tmp_path / "a"), "--captions", str(tmp_path / other), "--out", str(tmp_path / "h")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "h").exists()
