"""A reference set: what 100 pairs can be worth on this benchmark when they are learnt for the evaluation itself,
for the acceptance check ``reference_over_cover`` (a benchmark where such a set does no better than a concept
cover has no room for a distillation method to show).

    python -m experiments.glyph_benchmark.reference_set       # writes results/reference/ (the set, its record)

Two stages, at the distilling encoders (frozen):
1. Features: 100 pairs of image and caption features, started from a concept-cover coreset's, learnt by
   unrolling the evaluation's training of the projections on them (fresh projections each outer step, the
   protocol's SGD, momentum, weight decay, learning rates and schedule, one full batch per epoch, every epoch
   differentiated through) and descending the InfoNCE loss the trained projections reach on real train pairs.
2. Realised: the coreset's pixels and caption token embeddings moved (Adam) until the encoders' features of
   them are the learnt ones (relative squared error reported).
The result is an ordinary synthetic set (``covmatch-eval --synthetic results/reference``). Its tensors are not
committed (rerun this to make them); its record (``reference.json``: the losses and errors of both stages) is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from covmatch.data.build import build_retrieval_data, build_source, build_train_dataset
from covmatch.eval.coresets import select_coreset
from covmatch.models.dual import info_nce
from covmatch.presets import get_preset
from covmatch.pretrain import encoder_features, pretrained_dual_encoder
from covmatch.synthetic import real_pairs_set

from .spectrum import RESULTS

NUM_PAIRS = 100
SEED = 0
OUTER_STEPS = 200
REAL_BATCH = 1_000  # real pairs scoring the unrolled projections each outer step
REALISE_STEPS = 300


def _heads(model):
    return {"image_proj": model.image_proj, "text_proj": model.text_proj}


def unrolled_training_loss(model, preset, xs, ys, x_real, y_real, gen) -> torch.Tensor:
    """InfoNCE on the real pairs (x_real, y_real) of projections freshly drawn from ``gen`` and trained on the
    synthetic pairs (xs, ys) as the evaluation trains them, differentiable in xs and ys."""
    heads = _heads(model)
    params = {}
    for name, head in heads.items():
        head.reset_parameters(gen)
        params.update({f"{name}.{k}": v.detach().clone().requires_grad_(True) for k, v in head.named_parameters()})
    velocity = {k: torch.zeros_like(v) for k, v in params.items()}
    epochs, scale = preset.eval_epochs, model.logit_scale.detach()

    def embed(p, x, y):
        image = functional_call(heads["image_proj"], {k[11:]: v for k, v in p.items() if k.startswith("image_")}, x)
        text = functional_call(heads["text_proj"], {k[10:]: v for k, v in p.items() if k.startswith("text_")}, y)
        return image, text

    for epoch in range(epochs):
        lr = preset.eval_lr_proj * (0.1 if epoch >= max(1, epochs // 2) else 1.0)
        loss = info_nce(*embed(params, xs, ys), scale)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        for (name, p), g in zip(list(params.items()), grads):
            velocity[name] = preset.eval_momentum * velocity[name] + g + preset.eval_weight_decay * p
            params[name] = p - lr * velocity[name]
    return info_nce(*embed(params, x_real, y_real), scale)


def learn_features(model, preset, x0, y0, x_real, y_real, *, steps: int = OUTER_STEPS, seed: int = SEED,
                   progress: bool = True) -> Tuple[torch.Tensor, torch.Tensor, list]:  # fmt: skip
    """Stage 1: the synthetic features, from (x0, y0), by Adam on the unrolled training's real-data loss."""
    xs, ys = x0.clone().requires_grad_(True), y0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([{"params": [xs], "lr": 0.02 * float(x_real.std())},
                                  {"params": [ys], "lr": 0.02 * float(y_real.std())}])  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    history = []
    bar = tqdm(range(steps), desc="reference features", disable=not progress)
    for _ in bar:
        rows = torch.randint(x_real.shape[0], (REAL_BATCH,), generator=gen)
        loss = unrolled_training_loss(model, preset, xs, ys, x_real[rows], y_real[rows], gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
        bar.set_postfix(real_loss=f"{history[-1]:.3f}", refresh=False)
    return xs.detach(), ys.detach(), history


def realise(encode, start: torch.Tensor, target: torch.Tensor, *, steps: int = REALISE_STEPS, desc: str = "",
            progress: bool = True) -> Tuple[torch.Tensor, float, float]:  # fmt: skip
    """Stage 2: ``start`` moved by Adam until ``encode(start)`` is ``target``; the result and the relative squared
    error before and after."""
    value = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([value], lr=0.01 * float(start.std()))

    def error() -> torch.Tensor:
        return (encode(value) - target).pow(2).sum() / target.pow(2).sum()

    with torch.no_grad():
        before = float(error())
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        loss = error()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(error())
    return value.detach(), before, after


def build_reference(out: Path, *, progress: bool = True) -> dict:
    preset = get_preset("glyphs")
    model = pretrained_dual_encoder(preset, progress=progress).eval()
    model.requires_grad_(False)
    source = build_source(preset)
    train = build_retrieval_data(source, "train", model.text.tokenizer, preset)
    image, text = encoder_features(model, train, progress=progress)
    x_real, y_real = image[train.text_to_image], text
    dataset = build_train_dataset(source, model.text.tokenizer, preset, augment=False)
    picks = select_coreset("cover", dataset.pairs, NUM_PAIRS, SEED, concepts=source.concepts_of)
    cover = real_pairs_set(dataset, model, preset, picks, init_seed=SEED, init="cover")
    with torch.no_grad():
        x0 = model.image(cover.images).float()
        y0 = model.text(cover.text_embeds, cover.attention_mask).float()
    xs, ys, history = learn_features(model, preset, x0, y0, x_real, y_real, progress=progress)
    images, image_before, image_after = realise(model.image, cover.images, xs, desc="realise pixels",
                                                progress=progress)  # fmt: skip
    embeds, text_before, text_after = realise(lambda e: model.text(e, cover.attention_mask), cover.text_embeds, ys,
                                              desc="realise tokens", progress=progress)  # fmt: skip
    cover.images, cover.text_embeds = images, embeds
    record = {
        "num_pairs": NUM_PAIRS, "seed": SEED, "start": "concept cover", "outer_steps": OUTER_STEPS,
        "unrolled_epochs": preset.eval_epochs, "real_batch": REAL_BATCH,
        "real_loss_first": history[0], "real_loss_last": history[-1],
        "realise_steps": REALISE_STEPS,
        "image_feature_error": {"before": image_before, "after": image_after},
        "caption_feature_error": {"before": text_before, "after": text_after},
    }  # fmt: skip
    cover.metadata.update({"iteration": OUTER_STEPS, "reference": record})
    cover.save(out)
    (out / "reference.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.glyph_benchmark.reference_set",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "reference")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(argv)
    if (args.out / "synthetic.safetensors").is_file():
        print(f"{args.out} exists: kept")
        return 0
    print(json.dumps(build_reference(args.out, progress=args.progress), indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
