"""How many directions hold the full-data cross-covariance's energy at the distilling encoders, on glyph scenes
and on the shapes, in one run: the first of the benchmark's acceptance checks (``directions_for_95pct_energy``
must reach 100 before any method is judged on it; the shapes benchmark's was about 10).

    python -m experiments.glyph_benchmark.spectrum            # writes results/spectrum.json

C = cov(image features, text features) over every train pair (each image with each of its captions), at the
preset's encoders as distillation starts (pretrained image encoder, text encoder, no projections: what
``covmatch_loss`` matches). Energy is the sum of squared singular values; "directions for p" is the fewest
singular directions whose energy reaches p of it. Also reported, the same count after whitening each side
(the canonical correlations, squared), and how many canonical correlations exceed the largest one of the same
features with the captions shuffled across images (chance, at this many pairs and dimensions): whether the
energy sits in a few directions because the features vary most along them, or because image and text share
only a few. Resumable: a finished dataset's entry is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch

from covmatch.data.build import build_retrieval_data, build_source
from covmatch.loss import cross_covariance
from covmatch.models import whitening_statistics
from covmatch.presets import get_preset
from covmatch.pretrain import encoder_features, pretrained_dual_encoder

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = {"glyphs": "glyphs", "shapes": "demo"}


def energy_directions(cov: torch.Tensor, shares=(0.9, 0.95, 0.99)) -> Dict[str, int]:
    """Fewest singular directions of ``cov`` holding each share of its energy (sum of squared singular values)."""
    energy = torch.linalg.svdvals(cov.double()).pow(2)
    cumulative = energy.cumsum(0) / energy.sum()
    return {f"{round(share * 100)}pct": int((cumulative < share).sum()) + 1 for share in shares}


def spectrum(dataset: str, *, progress: bool = True) -> dict:
    preset = get_preset(PRESETS[dataset])
    model = pretrained_dual_encoder(preset, progress=progress).eval()
    source = build_source(preset)
    data = build_retrieval_data(source, "train", model.text.tokenizer, preset)  # eval transform, 5 captions each
    image, text = encoder_features(model, data, progress=progress)
    owner = data.text_to_image
    x, y = image[owner].double(), text.double()  # every (image, caption) pair
    cov = cross_covariance(x, y)
    return {"preset": preset.name, "pairs": int(x.shape[0]), "image_dim": int(x.shape[1]),
            "text_dim": int(y.shape[1]), "directions": energy_directions(cov),
            "whitened_directions": energy_directions(whitened(x, y)), **shared_directions(x, y)}  # fmt: skip


def shared_directions(x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """Canonical correlations above chance: above the largest one with ``y``'s rows shuffled."""
    correlations = torch.linalg.svdvals(whitened(x, y))
    shuffled = y[torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(0))]
    chance = float(torch.linalg.svdvals(whitened(x, shuffled)).max())
    return {"canonical_correlations_above_chance": int((correlations > chance).sum()), "chance_correlation": chance,
            "top_canonical_correlations": [round(float(c), 3) for c in correlations[:5]]}  # fmt: skip


def whitened(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """The cross-covariance of the two sides after whitening each (``--whiten-features``' statistics with this
    ``ridge``): its singular values are the canonical correlations."""
    _, root_x = whitening_statistics(x, ridge)
    _, root_y = whitening_statistics(y, ridge)
    return root_x @ cross_covariance(x.double(), y.double()) @ root_y


def resumable_main(argv: Optional[Sequence[str]], module: str, measure: Callable[[str], dict]) -> int:
    """``python -m experiments.glyph_benchmark.MODULE``: ``measure(dataset)`` for each dataset not yet in
    results/MODULE.json (each written as soon as it is measured), then every entry printed."""
    doc = sys.modules[measure.__module__].__doc__ or ""
    parser = argparse.ArgumentParser(prog=f"python -m experiments.glyph_benchmark.{module}",
                                     description=doc.splitlines()[0])  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / f"{module}.json")
    parser.add_argument("--datasets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    args = parser.parse_args(argv)
    found = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for dataset in args.datasets:
        if dataset not in found:
            found[dataset] = measure(dataset)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(found, indent=1) + "\n")
        print(dataset, json.dumps(found[dataset]))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return resumable_main(argv, "spectrum", spectrum)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
