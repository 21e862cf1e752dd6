"""The evaluation protocol: train a fresh dual encoder on a small set, test retrieval (docs/design.md,
*Evaluation protocol*).

A fresh model (pretrained encoders, random projections, both encoders trainable unless ``frozen_text``)
is trained with SGD (momentum 0.9, weight decay 5e-4, lr 0.01 encoders / 0.1 projections, x0.1 at half
time) for ``epochs`` epochs on either a synthetic set or a real subset, then the test split is encoded and
scored. The reported numbers are the final epoch's unless ``select_on_val``, which picks the epoch on the
**val** split; the test split is never used for selection.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from covmatch.data.build import RetrievalData
from covmatch.errors import DivergedError
from covmatch.synthetic import SyntheticSet

from .metrics import retrieval_recall

# one training batch: pixels, and the captions as keyword arguments of DualEncoder.encode_captions
TrainBatch = Tuple[torch.Tensor, Dict[str, torch.Tensor]]

__all__ = ["TrainBatch", "SyntheticTrainSet", "RealTrainSet", "EvalSettings", "encode_split", "train_and_evaluate"]


class SyntheticTrainSet:
    """Batches of a synthetic set: pixels and the captions as keyword arguments of ``DualEncoder.encode_captions``
    (``inputs_embeds`` + ``attention_mask``, or with learned text features ``text_features``)."""

    def __init__(self, syn: SyntheticSet, use_text_features: bool = False) -> None:
        if use_text_features and syn.text_features is None:
            raise ValueError("this synthetic set has no text features (it was not distilled with --frozen-text)")
        self.syn = syn
        self.use_text_features = use_text_features

    def __len__(self) -> int:
        return len(self.syn)

    def batches(self, batch_size: int, generator: torch.Generator, device) -> Iterator[TrainBatch]:
        order = torch.randperm(len(self.syn), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # InfoNCE needs a negative
                continue
            images = self.syn.images[idx].to(device)
            if self.use_text_features:
                yield images, {"text_features": self.syn.text_features[idx].to(device)}
            else:
                embeds, mask = self.syn.text_embeds[idx].to(device), self.syn.attention_mask[idx].to(device)
                yield images, {"inputs_embeds": embeds, "attention_mask": mask}


class RealTrainSet:
    """Batches of real pairs (``indices`` into a PairDataset), images loaded and transformed each epoch, captions
    as ``input_ids`` + ``attention_mask``."""

    def __init__(self, dataset, indices: Sequence[int], workers: int = 0) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.workers = workers

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int, generator: torch.Generator, device) -> Iterator[TrainBatch]:
        order = torch.randperm(len(self.indices), generator=generator).tolist()
        chunks = [[self.indices[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
        chunks = [c for c in chunks if len(c) >= 2]
        loader = DataLoader(
            self.dataset,
            batch_sampler=chunks,
            num_workers=self.workers,
            collate_fn=_collate_real,
            generator=torch.Generator().manual_seed(int(torch.randint(2**31, (1,), generator=generator))),
        )
        for pixels, ids, mask in loader:
            yield pixels.to(device), {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _collate_real(items):
    pixels, ids, mask, _ = zip(*items)
    return torch.stack(pixels), torch.stack(ids), torch.stack(mask)


@dataclass
class EvalSettings:
    """Training-protocol settings. The protocol's numbers have no defaults here: they come from the preset
    (``from_preset``; docs/design.md, *Evaluation protocol*)."""

    epochs: int
    batch_size: int
    lr_encoder: float
    lr_proj: float
    momentum: float
    weight_decay: float
    frozen_text: bool = False
    train: str = "all"  # "all", or "projections": a linear probe on the frozen pretrained encoders
    select_on_val: bool = False
    val_every: int = 10
    precision: str = "fp32"
    progress: bool = True

    @classmethod
    def from_preset(cls, preset, **overrides) -> EvalSettings:
        base = cls(
            epochs=preset.eval_epochs,
            batch_size=preset.eval_batch,
            lr_encoder=preset.eval_lr_encoder,
            lr_proj=preset.eval_lr_proj,
            momentum=preset.eval_momentum,
            weight_decay=preset.eval_weight_decay,
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(base, key, value)
        return base


@torch.no_grad()
def encode_split(model, data: RetrievalData, device, *, batch_size: int = 256, progress: bool = True, autocast=None):
    """Projected embeddings of a split's images and captions (model in eval mode)."""
    model.eval()
    ctx = autocast or contextlib.nullcontext
    images: List[torch.Tensor] = []
    loader = DataLoader(data.images, batch_size=batch_size, shuffle=False)
    for pixels in tqdm(loader, desc="encode images", leave=False, disable=not progress):
        with ctx():
            images.append(model.encode_image(pixels.to(device)).float())
    texts: List[torch.Tensor] = []
    n = data.input_ids.shape[0]
    for start in tqdm(range(0, n, batch_size), desc="encode captions", leave=False, disable=not progress):
        ids = data.input_ids[start : start + batch_size].to(device)
        mask = data.attention_mask[start : start + batch_size].to(device)
        with ctx():
            texts.append(model.encode_text_ids(ids, mask).float())
    return torch.cat(images), torch.cat(texts)


def train_and_evaluate(
    model,
    train_set,
    test: RetrievalData,
    settings: EvalSettings,
    *,
    seed: int,
    device,
    val: Optional[RetrievalData] = None,
) -> Dict[str, object]:
    """Train ``model`` (fresh: encoders pretrained, projections re-initialised here) and score it.

    Returns ``{"metrics": {...}, "epoch": chosen epoch, "history": [...]}``.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.reset(gen)
    model.to(device)
    if settings.frozen_text or settings.train == "projections":
        model.text.requires_grad_(False)
    if settings.train == "projections":
        model.image.requires_grad_(False)
    encoders = [p for p in model.encoder_parameters() if p.requires_grad]
    groups = ([{"params": encoders, "lr": settings.lr_encoder}] if encoders else []) + [
        {"params": model.head_parameters(), "lr": settings.lr_proj}
    ]
    optimizer = torch.optim.SGD(
        groups, lr=settings.lr_proj, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[max(1, settings.epochs // 2)], gamma=0.1)
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(settings.precision)

    def autocast():
        if amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=amp)

    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=settings.precision == "fp16")
    history = []
    best: Optional[Tuple[float, int, dict]] = None
    bar = tqdm(range(1, settings.epochs + 1), desc="train", unit="epoch", disable=not settings.progress, leave=False)
    for epoch in bar:
        model.train()
        losses = []
        for images, text in train_set.batches(settings.batch_size, gen, device):
            with autocast():
                loss = model.contrastive_loss(model.encode_image(images), model.encode_captions(**text))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.detach())
        scheduler.step()
        epoch_loss = float(torch.stack(losses).mean()) if losses else float("nan")
        if losses and not math.isfinite(epoch_loss):
            raise DivergedError(
                f"evaluation run with seed {seed} diverged at epoch {epoch}: its training loss became {epoch_loss}; "
                "try a lower --lr-encoder / --lr-proj"
            )
        bar.set_postfix(loss=f"{epoch_loss:.3f}", refresh=False)
        entry = {"epoch": epoch, "train_loss": epoch_loss}
        if settings.select_on_val and val is not None and (epoch % settings.val_every == 0 or epoch == settings.epochs):
            val_metrics = retrieval_recall(
                *encode_split(model, val, device, progress=False, autocast=autocast), val.text_to_image
            )
            entry["val_mean"] = val_metrics["mean"]
            if best is None or val_metrics["mean"] > best[0]:
                best = (val_metrics["mean"], epoch, copy.deepcopy(model.state_dict()))
        history.append(entry)
    chosen_epoch = settings.epochs
    if best is not None:
        model.load_state_dict(best[2])
        chosen_epoch = best[1]
    image_emb, text_emb = encode_split(model, test, device, progress=settings.progress, autocast=autocast)
    for name, emb in (("image", image_emb), ("caption", text_emb)):
        if not torch.isfinite(emb).all():
            raise DivergedError(
                f"evaluation run with seed {seed}: its {name} embeddings of the evaluated split hold NaN or "
                "infinite values; try a lower --lr-encoder / --lr-proj, or full precision"
            )
    metrics = retrieval_recall(image_emb, text_emb, test.text_to_image)
    return {"metrics": metrics, "epoch": chosen_epoch, "history": history}
