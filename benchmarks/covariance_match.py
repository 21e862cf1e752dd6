"""How closely synthetic sets match the real cross-covariance at the pretrained encoders.

    python -m benchmarks.covariance_match [--preset demo] [--real-pairs 2048] SET_DIR [SET_DIR ...]

Every evaluation run starts from the pretrained encoders, so that is where a distilled set's covariance
matters first. This encodes ``--real-pairs`` random real train pairs once (the reference ``C_T``) and
prints, for the iteration-0 set (N random real pairs, what distillation starts from) and each SET_DIR,
the relative error ``||rho C_T - C_S||^2 / ||rho C_T||^2`` and ``||C_S|| / ||C_T||``; and, for scale,
the same error of single real batches' covariances (what one distillation iteration targets). The
README's embedded-benchmark analysis quotes its output.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from covmatch.analyze import encode_pairs
from covmatch.loss import cross_covariance
from tests.reference import relative_error


def covariance64(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The centred, unbiased cross-covariance (docs/design.md, *The loss*) of two feature sets, in float64."""
    return cross_covariance(image.double(), text.double())


def relative_squared_error(target: torch.Tensor, estimate: torch.Tensor) -> float:
    """||target - estimate||^2 / ||target||^2 (the normalised loss's form)."""
    return relative_error(estimate, target) ** 2


@torch.no_grad()
def set_covariance(model, syn) -> torch.Tensor:
    return covariance64(model.image(syn.images), model.text(syn.text_embeds, syn.attention_mask))


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="*", type=Path, help="synthetic set directories (covmatch-distill --out)")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--real-pairs", type=int, default=2048, help="real pairs behind the reference C_T")
    parser.add_argument("--seed", type=int, default=0, help="seed of the iteration-0 set (covmatch-distill --seed)")
    parser.add_argument("--data-seed", type=int, default=0, help="the embedded dataset's draw (--data-seed)")
    args = parser.parse_args(argv)

    from covmatch.data.build import build_source, build_train_dataset
    from covmatch.models import build_dual_encoder
    from covmatch.presets import get_preset
    from covmatch.pretrain import resolve_image_weights
    from covmatch.synthetic import SyntheticSet, init_synthetic_set

    preset = get_preset(args.preset)
    torch.manual_seed(args.seed)
    weights = resolve_image_weights(
        preset.image_encoder, preset.image_size, preset.image_weights, model_kwargs=preset.image_model_kwargs()
    )
    model = build_dual_encoder(
        preset, image_weights=weights
    ).eval()  # the pretrained encoders every evaluation starts from
    source = build_source(preset, ann_root=None, image_root=None, seed=args.data_seed)
    dataset = build_train_dataset(source, model.text.tokenizer, preset, augment=False)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(123))[: args.real_pairs]
    image, text = encode_pairs(model, dataset, order.tolist(), torch.device("cpu"))
    c_t = covariance64(image, text)
    rho = preset.resolved_rho()

    lines = [f"reference: {len(order)} real pairs, rho {rho:g}, image dim {image.shape[1]}, text dim {text.shape[1]}"]
    for b in sorted({64, 128, 256, preset.real_batch}):
        if 2 <= b <= len(order) // 2:
            batches = [covariance64(image[i : i + b], text[i : i + b]) for i in range(0, len(order) - b + 1, b)]
            noise = sum(relative_squared_error(c_t, c) for c in batches) / len(batches)
            lines.append(f"one real batch of {b}: ||C_B - C_T||^2 / ||C_T||^2 = {noise:.3f} (mean of {len(batches)})")
    named = [("iteration 0", init_synthetic_set(dataset, model, preset, preset.num_pairs, args.seed))]
    named += [(str(d), SyntheticSet.load(d)) for d in args.sets]
    for name, syn in named:
        c_s = set_covariance(model, syn)
        ratio = float(c_s.norm() / c_t.norm())
        lines.append(f"{name}: ||rho C_T - C_S||^2 / ||rho C_T||^2 = {relative_squared_error(rho * c_t, c_s):.3f}, "
                     f"||C_S|| / ||C_T|| = {ratio:.2f}")  # fmt: skip
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
