"""The theory's linear model against a linear probe, both on the full train split at the distilling encoders: the
acceptance check ``linear_model_over_probe`` (how much of what a model can learn from the data the
cross-covariance alone holds).

    python -m experiments.glyph_benchmark.linear_model        # writes results/linear_model.json

The linear model: linearising the contrastive loss makes the optimal projections satisfy G_v^T G_l = C / rho
(docs/design.md, *The loss*), C the full-data cross-covariance of the encoders' features; it embeds an image as
S^1/2 U^T (h_v - mu_v) and a caption as S^1/2 V^T (h_l - mu_l), C = U S V^T, so that their dot product is
(h_v - mu_v)^T C (h_l - mu_l), and retrieves by cosine similarity, as the evaluation does. The probe: the
preset's projections and temperature trained with InfoNCE on the frozen encoders' features of every train pair
(the evaluation protocol's optimiser, learning rate, weight decay and batch, ``PROBE_EPOCHS`` epochs over the
50,000 pairs, features computed once). Both scored on val (mean recall of the six retrieval metrics).
Resumable: a finished dataset's entry is kept.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from covmatch.data.build import build_retrieval_data, build_source
from covmatch.eval.metrics import retrieval_recall
from covmatch.loss import cross_covariance
from covmatch.presets import get_preset
from covmatch.pretrain import encoder_features, pretrained_dual_encoder

from .spectrum import PRESETS, resumable_main

PROBE_EPOCHS = 10
PROBE_SEED = 0


def linear_model_embeddings(x: torch.Tensor, y: torch.Tensor, mean_x: torch.Tensor, mean_y: torch.Tensor,
                            cov: torch.Tensor):  # fmt: skip
    """Images ``x`` and captions ``y`` embedded so that their dot products are (x - mean_x)^T cov (y - mean_y)."""
    u, s, vh = torch.linalg.svd(cov.double(), full_matrices=False)
    root = s.sqrt()
    return (x.double() - mean_x) @ u * root, (y.double() - mean_y) @ vh.t() * root


def train_probe(model, x: torch.Tensor, y: torch.Tensor, preset, *, epochs: int = PROBE_EPOCHS,
                seed: int = PROBE_SEED, progress: bool = True) -> None:  # fmt: skip
    """The model's projections and temperature trained with InfoNCE on frozen features of pairs (x[i], y[i]),
    as the evaluation protocol trains its heads (SGD, momentum, weight decay, learning rate divided by 10 at
    half the epochs)."""
    gen = torch.Generator().manual_seed(seed)
    model.reset(gen)
    optimizer = torch.optim.SGD(model.head_parameters(), lr=preset.eval_lr_proj, momentum=preset.eval_momentum,
                                weight_decay=preset.eval_weight_decay)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[max(1, epochs // 2)], gamma=0.1)
    for _ in tqdm(range(epochs), desc="probe", unit="epoch", disable=not progress):
        for rows in torch.randperm(x.shape[0], generator=gen).split(preset.eval_batch):
            loss = model.contrastive_loss(model.image_proj(x[rows]), model.text_proj(y[rows]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()


def linear_model_and_probe(dataset: str, *, progress: bool = True) -> dict:
    preset = get_preset(PRESETS[dataset])
    model = pretrained_dual_encoder(preset, progress=progress).eval()
    source = build_source(preset)
    train = build_retrieval_data(source, "train", model.text.tokenizer, preset)
    val = build_retrieval_data(source, "val", model.text.tokenizer, preset)
    image, text = encoder_features(model, train, progress=progress)
    x, y = image[train.text_to_image], text  # every (image, caption) pair
    mean_x, mean_y = x.double().mean(0), y.double().mean(0)
    cov = cross_covariance(x.double(), y.double())
    val_image, val_text = encoder_features(model, val, progress=progress)
    linear = retrieval_recall(*linear_model_embeddings(val_image, val_text, mean_x, mean_y, cov), val.text_to_image)
    heads = model.head_parameters()  # the temperature among them if the preset learns it
    model.requires_grad_(False)
    for p in heads:
        p.requires_grad_(True)
    train_probe(model, x, y, preset, progress=progress)
    with torch.no_grad():
        probe = retrieval_recall(model.image_proj(val_image), model.text_proj(val_text), val.text_to_image)
    return {"preset": preset.name, "split": "val", "train_pairs": int(x.shape[0]), "probe_epochs": PROBE_EPOCHS,
            "linear_model": linear, "probe": probe,
            "linear_model_over_probe": linear["mean"] / probe["mean"]}  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> int:
    return resumable_main(argv, "linear_model", linear_model_and_probe)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
