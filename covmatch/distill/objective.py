"""The distillation objective on encoder features, and the synthetic-set gradient in one pass or in chunks.

``loss = covmatch_loss(real, syn, rho, lam=0) + lam * (mean gap of projected image features + of projected
text features)`` (docs/design.md, *The loss*). The chunked path (*Exact chunked gradient*, the GradCache idea)
first encodes the whole synthetic batch without autograd, differentiates the loss w.r.t. the *features*, then
re-encodes one chunk at a time with autograd and backpropagates those feature gradients: the same gradient on
every synthetic input as one big pass, with the activation memory of one chunk.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple, Union

import torch

from covmatch.loss import covmatch_loss, covmatch_loss_with_grads, cross_covariance, mean_matching_loss

from .augment import affine_resample
from .distributed import Ranks, sum_over_ranks

__all__ = [
    "Features",
    "LossParts",
    "DistillObjective",
    "ShardedObjective",
    "SyntheticBatch",
    "frozen_parameters",
    "make_objective",
    "synthetic_backward",
]


@dataclass
class Features:
    """Encoder outputs (before projection) of a batch of pairs."""

    image: torch.Tensor
    text: torch.Tensor


@dataclass
class LossParts:
    """Detached loss terms of one iteration (kept on the device; logged without a per-step sync)."""

    total: torch.Tensor
    cov: torch.Tensor
    mean: torch.Tensor


@dataclass
class FeatureGrads:
    """Loss parts and the gradients of the scaled total with respect to the synthetic image and text features."""

    parts: LossParts
    image: torch.Tensor
    text: torch.Tensor


@dataclass(frozen=True)
class SyntheticBatch:
    """The synthetic pairs of one iteration: rows ``rows`` of the synthetic set's tensors (all rows when None).

    Captions are token embeddings + mask or, with a frozen text encoder, learned text features. The rows are
    taken from the set's tensors on every access, so each chunk of the two-pass gradient selects, and
    backpropagates through, rows of its own: a batch gathered once and then cut into chunks would be one
    graph node that every chunk's backward runs through.

    ``set_image_maps`` (one affine map per row of the set, or None) resamples each image through its map
    whenever the images are read (``--dsa-shift`` / ``--dsa-scale``, ``augment.py``).
    """

    set_images: torch.Tensor
    set_text_embeds: Optional[torch.Tensor]
    set_attention_mask: Optional[torch.Tensor]
    set_text_features: Optional[torch.Tensor] = None
    rows: Union[slice, torch.Tensor, None] = None
    set_image_maps: Optional[torch.Tensor] = None

    def _take(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if x is None or self.rows is None:
            return x
        return x[self.rows]

    @property
    def images(self) -> torch.Tensor:
        images = self._take(self.set_images)
        if self.set_image_maps is None:
            return images
        return affine_resample(images, self._take(self.set_image_maps))

    @property
    def text_embeds(self) -> Optional[torch.Tensor]:
        return self._take(self.set_text_embeds)

    @property
    def attention_mask(self) -> Optional[torch.Tensor]:
        return self._take(self.set_attention_mask)

    @property
    def text_features(self) -> Optional[torch.Tensor]:
        return self._take(self.set_text_features)

    def __len__(self) -> int:
        if self.rows is None:
            return self.set_images.shape[0]
        if isinstance(self.rows, slice):
            return len(range(self.set_images.shape[0])[self.rows])
        return self.rows.numel()

    def chunk(self, sl: slice) -> SyntheticBatch:
        """Rows ``sl`` of this batch, selected from the set's tensors directly."""
        if self.rows is None:
            rows = sl
        elif isinstance(self.rows, slice):
            r = range(self.set_images.shape[0])[self.rows][sl]
            rows = slice(r.start, r.stop, r.step)
        else:
            rows = self.rows[sl]
        return dataclasses.replace(self, rows=rows)


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """Half-precision features (from autocast) as fp32; fp32 and fp64 features unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@contextlib.contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad inside the block, so backward computes only input gradients."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def encode_synthetic(model, batch: SyntheticBatch) -> Features:
    """Encoder features of synthetic pairs (text through ``inputs_embeds``, or the learned text features)."""
    image = model.image(batch.images)
    text = (
        batch.text_features if batch.text_features is not None else model.text(batch.text_embeds, batch.attention_mask)
    )
    return Features(image, text)


class DistillObjective:
    """The CovMatch distillation loss for fixed real features (``real``) as a function of synthetic features.

    ``scale`` (a positive scalar tensor, or None for 1) multiplies both terms alike, so lam keeps its
    meaning: the scale-free loss (``--normalize-loss``) passes ``1 / ||rho C_T||^2`` of the real batch at the
    last reset of the online model (``covariance_scale``), a constant between resets.
    """

    def __init__(
        self, model, real: Features, *, rho: float, lam: float, backend: str = "auto",
        scale: Optional[torch.Tensor] = None,
    ) -> None:  # fmt: skip
        self.model = model
        self.real = Features(full_precision(real.image.detach()), full_precision(real.text.detach()))
        self.rho = rho
        self.lam = lam
        self.backend = backend
        self.scale = scale
        self._real_proj: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        if lam:
            with torch.no_grad():
                self._real_proj = (model.image_proj(self.real.image), model.text_proj(self.real.text))

    @torch.no_grad()
    def covariance_scale(self) -> torch.Tensor:
        """``1 / ||rho C_T||_F^2`` of this objective's real batch."""
        c_t = cross_covariance(self.real.image, self.real.text)
        return 1.0 / (self.rho * self.rho * c_t.pow(2).sum()).clamp_min(1e-30)

    def _scaled(self, cov: torch.Tensor, mean: Optional[torch.Tensor]):
        """(total, covariance term, mean term), each multiplied by the common scale."""
        if self.scale is not None:
            cov = self.scale * cov
            mean = None if mean is None else self.scale * mean
        if mean is None:
            return cov, cov, cov.new_zeros(())
        return cov + self.lam * mean, cov, mean

    def __call__(self, syn: Features) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, covariance term, mean term) as fp32 scalars with autograd to ``syn``."""
        cov = covmatch_loss(
            self.real.image, self.real.text, syn.image, syn.text, rho=self.rho, lam=0.0, backend=self.backend
        )
        if not self.lam:
            return self._scaled(cov, None)
        real_img, real_txt = self._real_proj
        mean = mean_matching_loss(real_img, self.model.image_proj(syn.image)) + mean_matching_loss(
            real_txt, self.model.text_proj(syn.text)
        )
        return self._scaled(cov, mean)

    def loss_and_grads(self, syn: Features, grad_scale: Optional[torch.Tensor] = None) -> FeatureGrads:
        """The loss parts and d(total * grad_scale)/d(synthetic features), no autograd graph kept: the
        covariance term through ``covmatch_loss_with_grads``, the mean term (through the projections) by
        autograd."""
        scale = _product(self.scale, grad_scale)
        cov, grad_img, grad_txt = covmatch_loss_with_grads(
            self.real.image, self.real.text, syn.image, syn.text, rho=self.rho, lam=0.0, backend=self.backend,
            grad_scale=scale,
        )  # fmt: skip
        if not self.lam:
            total, cov, mean = self._scaled(cov, None)
            return FeatureGrads(LossParts(total, cov, mean), grad_img, grad_txt)
        image, text = syn.image.detach().requires_grad_(), syn.text.detach().requires_grad_()
        real_img, real_txt = self._real_proj
        with torch.enable_grad():
            mean = mean_matching_loss(real_img, self.model.image_proj(image)) + mean_matching_loss(
                real_txt, self.model.text_proj(text)
            )
            weight = self.lam if scale is None else self.lam * scale
            mean_img, mean_txt = torch.autograd.grad(mean * weight, (image, text))
        total, cov, mean = self._scaled(cov, mean.detach())
        return FeatureGrads(LossParts(total, cov, mean), grad_img + mean_img, grad_txt + mean_txt)


class ShardedObjective(DistillObjective):
    """The same loss when the real and synthetic batches are split over ranks (docs/design.md, *Sharded form*).

    Every term depends on a batch only through sums (Σ x yᵀ, Σ x, Σ y, Σ G x, n), so those are
    all-reduced: each rank gets the loss of the union of all shards, and autograd sends each rank the
    exact gradient for its own samples (the other ranks' sums are constants here). The sums are taken
    around the global real means, which keeps them well conditioned in fp32 (a covariance is
    shift-invariant).
    """

    def __init__(
        self,
        model,
        real: Features,
        *,
        rho: float,
        lam: float,
        ranks: Ranks,
        scale: Optional[torch.Tensor] = None,
    ) -> None:
        self.model, self.rho, self.lam, self.ranks, self.scale = model, rho, lam, ranks, scale
        image, text = full_precision(real.image.detach()), full_precision(real.text.detach())
        self.dtype = image.dtype
        count = torch.full((), float(image.shape[0]), device=image.device)
        sums = [image.sum(0), text.sum(0), count]
        if lam:
            with torch.no_grad():
                sums += [model.image_proj(image).sum(0), model.text_proj(text).sum(0)]
        sum_x, sum_y, n, *proj_sums = ranks.all_reduce_sum(sums)
        self.shift_x, self.shift_y = (sum_x / n).to(self.dtype), (sum_y / n).to(self.dtype)
        xc, yc = image - self.shift_x, text - self.shift_y
        s_xy, s_x, s_y = ranks.all_reduce_sum([xc.t() @ yc, xc.sum(0), yc.sum(0)])
        self.real_cov = ((s_xy - torch.outer(s_x, s_y) / n) / (n - 1)).to(self.dtype)
        self.real = Features(image, text)
        self._real_means: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        if lam:
            self._real_means = tuple((s / n).to(self.dtype) for s in proj_sums)

    @torch.no_grad()
    def covariance_scale(self) -> torch.Tensor:
        """``1 / ||rho C_T||_F^2`` of the union of the ranks' real batches."""
        return 1.0 / (self.rho * self.rho * self.real_cov.pow(2).sum()).clamp_min(1e-30)

    def __call__(self, syn: Features) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ranks = self.ranks
        x = syn.image.to(self.dtype) - self.shift_x
        y = syn.text.to(self.dtype) - self.shift_y
        local = [x.t() @ y, x.sum(0), y.sum(0), torch.full((), float(x.shape[0]), device=x.device, dtype=self.dtype)]
        if self.lam:
            local += [
                self.model.image_proj(syn.image).to(self.dtype).sum(0),
                self.model.text_proj(syn.text).to(self.dtype).sum(0),
            ]
        s_xy, s_x, s_y, n, *proj_sums = sum_over_ranks(local, ranks)  # one all-reduce
        syn_cov = (s_xy - torch.outer(s_x, s_y) / n) / (n - 1)
        cov = (self.rho * self.real_cov - syn_cov).pow(2).sum()
        if not self.lam:
            return self._scaled(cov, None)
        mean_img, mean_txt = (s / n for s in proj_sums)
        real_img, real_txt = self._real_means
        return self._scaled(cov, (real_img - mean_img).pow(2).sum() + (real_txt - mean_txt).pow(2).sum())

    def loss_and_grads(self, syn: Features, grad_scale: Optional[torch.Tensor] = None) -> FeatureGrads:
        """As ``DistillObjective.loss_and_grads``, by autograd through the all-reduced sums."""
        return _grads_by_autograd(self, syn, grad_scale)


def _product(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if a is None:
        return b
    return a if b is None else a * b


def _grads_by_autograd(objective, syn: Features, grad_scale: Optional[torch.Tensor]) -> FeatureGrads:
    image, text = syn.image.detach().requires_grad_(), syn.text.detach().requires_grad_()
    with torch.enable_grad():
        total, cov, mean = objective(Features(image, text))
        grad_img, grad_txt = torch.autograd.grad(total if grad_scale is None else total * grad_scale, (image, text))
    return FeatureGrads(LossParts(total.detach(), cov.detach(), mean.detach()), grad_img, grad_txt)


def make_objective(
    model,
    real: Features,
    *,
    rho: float,
    lam: float,
    backend: str,
    scale: Optional[torch.Tensor] = None,
    ranks: Optional[Ranks] = None,
) -> DistillObjective:
    """The objective for this process: the fused ``covmatch_loss`` alone, or the all-reduced form on R ranks."""
    if ranks is not None and ranks.distributed:
        return ShardedObjective(model, real, rho=rho, lam=lam, ranks=ranks, scale=scale)
    return DistillObjective(model, real, rho=rho, lam=lam, backend=backend, scale=scale)


def synthetic_backward(
    objective: DistillObjective,
    batch: SyntheticBatch,
    *,
    chunk: Optional[int] = None,
    loss_scale: Optional[torch.Tensor] = None,
    autocast=contextlib.nullcontext,
) -> LossParts:
    """Accumulate d(loss * loss_scale)/d(synthetic inputs) into their ``.grad``; return the loss parts.

    ``chunk=None`` encodes the whole batch with autograd; ``chunk=K`` uses the exact two-pass method with
    peak activation memory of K samples. Model parameters receive no gradient.
    """
    model = objective.model
    scale = loss_scale if loss_scale is not None else 1.0
    with frozen_parameters(model):
        if chunk is None or chunk >= len(batch):
            with autocast():
                feats = encode_synthetic(model, batch)
            total, cov, mean = objective(Features(full_precision(feats.image), full_precision(feats.text)))
            (total * scale).backward()
            return LossParts(total.detach(), cov.detach(), mean.detach())

        # Pass 1: features of the whole synthetic batch, no autograd graph kept.
        images, texts = [], []
        with torch.no_grad():
            for start in range(0, len(batch), chunk):
                with autocast():
                    f = encode_synthetic(model, batch.chunk(slice(start, start + chunk)))
                images.append(full_precision(f.image))
                texts.append(full_precision(f.text))
        found = objective.loss_and_grads(Features(torch.cat(images), torch.cat(texts)), loss_scale)
        grad_image, grad_text = found.image, found.text

        # Pass 2: re-encode chunk by chunk with autograd; backpropagate the feature gradients.
        for start in range(0, len(batch), chunk):
            sl = slice(start, start + chunk)
            with autocast():
                f = encode_synthetic(model, batch.chunk(sl))
            outputs, grads = [], []
            for out, g in ((f.image, grad_image[sl]), (f.text, grad_text[sl])):
                if out.requires_grad:
                    outputs.append(out)
                    grads.append(g.to(out.dtype))
            if outputs:
                torch.autograd.backward(outputs, grads)
        return found.parts
