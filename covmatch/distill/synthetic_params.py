"""The synthetic set while it is being learnt: this rank's shard of pixels, token embeddings (or, with a
frozen text encoder, text features) and masks, their SGD optimiser, the batch of iteration t, the gradient
step, and the gathered state for results and checkpoints."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from covmatch.synthetic import SyntheticSet

from .augment import MatchAugmentation
from .distributed import Ranks
from .objective import DistillObjective, LossParts, SyntheticBatch, synthetic_backward
from .precision import ScaledStep, sgd
from .streams import synthetic_sample

__all__ = ["SyntheticParameters"]


class SyntheticParameters:
    """This rank's rows ``ranks.shard(N)`` of the synthetic set, learnt by SGD (momentum per the preset)."""

    def __init__(self, initial: SyntheticSet, settings, *, ranks: Ranks, device: torch.device, text_encoder) -> None:
        self.settings = settings  # the DistillConfig
        self.ranks = ranks
        self.device = device
        self.metadata = dict(initial.metadata)
        shard = ranks.shard(settings.num_pairs)
        self.images = initial.images[shard].to(device)
        self.text_embeds = initial.text_embeds[shard].to(device)
        self.attention_mask = initial.attention_mask[shard].to(device)
        self.text_features: Optional[torch.Tensor] = None
        if settings.text_features:
            # Prior work's regime: captions are learnt directly as features of the frozen text encoder,
            # starting from those of the real captions (a copy: with --cuda-graphs the encoder's output lives in
            # memory that its later replays reuse)
            with torch.no_grad():
                self.text_features = text_encoder(self.text_embeds, self.attention_mask).float().clone()
        p = settings.preset
        groups = []
        for name, tensor in self.learned().items():
            tensor.requires_grad_(True)
            groups.append({"params": [tensor], "lr": p.lr_img if name == "images" else p.lr_txt, "name": name})
        self.optimizer = sgd(groups, device, lr=p.lr_img, momentum=p.syn_momentum)
        self.scaled_step = ScaledStep(self.optimizer, device, enabled=settings.precision == "fp16", ranks=ranks)
        self.skipped = torch.zeros((), device=device)  # steps skipped for an fp16 overflow, kept on the device
        self.augmentation = MatchAugmentation(settings.dsa_shift, settings.dsa_scale)

    def learned(self) -> Dict[str, torch.Tensor]:
        """The tensors this run updates (per --distill and --frozen-text)."""
        mode, out = self.settings.distill_mode, {}
        if mode in ("both", "images"):
            out["images"] = self.images
        if mode in ("both", "texts"):
            if self.text_features is not None:
                out["text_features"] = self.text_features
            else:
                out["text_embeds"] = self.text_embeds
        return out

    def batch(self, t: int) -> SyntheticBatch:
        """Iteration t's synthetic batch: all of the shard, or its rows in the iteration's random sample; its
        images resampled through iteration t's augmentation maps when augmentation is on."""
        cfg = self.settings
        rows = synthetic_sample(cfg.num_pairs, min(cfg.preset.syn_batch, cfg.num_pairs), cfg.seed, t, self.ranks)
        maps = None
        if self.augmentation.enabled:
            maps = self.augmentation.synthetic_maps(cfg.num_pairs, cfg.seed, t)[self.ranks.shard(cfg.num_pairs)]
            maps = maps.to(self.device)
        return SyntheticBatch(
            self.images,
            self.text_embeds,
            self.attention_mask,
            self.text_features,
            rows=None if rows is None else rows.to(self.device),
            set_image_maps=maps,
        )

    def backward(self, objective: DistillObjective, t: int, *, autocast) -> LossParts:
        """Fresh gradients of the loss (times the fp16 loss scale) on iteration t's batch."""
        self.optimizer.zero_grad(set_to_none=True)
        return synthetic_backward(
            objective,
            self.batch(t),
            chunk=self.settings.syn_chunk,
            loss_scale=self.scaled_step.loss_scale(),
            autocast=autocast,
        )

    def step(self) -> torch.Tensor:
        """The SGD step (skipped on every rank when a gradient overflowed in fp16); 1.0 if skipped."""
        rescale = self._relative_gradients if self.settings.preset.relative_steps else None
        skipped = self.scaled_step(rescale=rescale)
        self.skipped = self.skipped + skipped
        return skipped

    def _attended(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The part of a learnt tensor that counts for its size: token embeddings where the mask attends."""
        if name != "text_embeds":
            return tensor
        return tensor * self.attention_mask.unsqueeze(-1).to(tensor.dtype)

    @torch.no_grad()
    def _relative_gradients(self) -> None:
        """``relative_steps``: each modality's gradient scaled to the norm of its tensor (both over every rank's
        shard), so that a momentum-free step moves it by its learning rate times its size; a zero gradient stays
        zero. One all-reduce, no host sync."""
        groups = [g for g in self.optimizer.param_groups if g["params"][0].grad is not None]
        squares = []
        for group in groups:
            tensor = group["params"][0]
            squares += [tensor.grad.float().pow(2).sum(), self._attended(group["name"], tensor.float()).pow(2).sum()]
        (totals,) = self.ranks.all_reduce_sum([torch.stack(squares)])
        for i, group in enumerate(groups):
            grad = group["params"][0].grad
            scale = totals[2 * i + 1].sqrt() / totals[2 * i].sqrt().clamp_min(1e-30)
            grad.mul_(scale.to(grad.dtype))

    @torch.no_grad()
    def relative_steps(self, skipped: torch.Tensor) -> Dict[str, torch.Tensor]:
        """How far the last step moved each learnt modality, ``||delta|| / ||x||`` (device scalars, this rank's
        shard): SGD without dampening moves a tensor by its learning rate times its momentum buffer, so no copy
        of the set is kept. Token embeddings count where the attention mask attends (padding never moves)."""
        out = {}
        for group in self.optimizer.param_groups:
            tensor = group["params"][0]
            name = "rel_step_images" if group["name"] == "images" else "rel_step_captions"
            buffer = self.optimizer.state.get(tensor, {}).get("momentum_buffer")
            if buffer is None:  # no step taken yet (a first step skipped for an fp16 overflow)
                out[name] = torch.zeros((), device=self.device)
                continue
            delta = self._attended(group["name"], buffer.float())
            value = self._attended(group["name"], tensor.detach().float())
            out[name] = group["lr"] * delta.norm() / value.norm().clamp_min(1e-12) * (1.0 - skipped)
        return out

    def non_finite(self) -> torch.Tensor:
        """1.0 when any learnt tensor on any rank holds a NaN or infinity (a device tensor; collective)."""
        bad = torch.zeros((), device=self.device)
        for tensor in self.learned().values():
            bad = torch.maximum(bad, (~torch.isfinite(tensor.detach())).any().float())
        self.ranks.all_reduce_max_(bad)
        return bad

    def gathered(
        self, metadata: Dict[str, Any], nearest_tokens: Callable[[torch.Tensor], torch.Tensor]
    ) -> SyntheticSet:
        """The whole set on the CPU (every rank's shard; collective), copies that do not alias the live
        tensors; ``nearest_tokens`` maps the gathered token embeddings to their nearest vocabulary ids."""

        def gathered_copy(x: torch.Tensor) -> torch.Tensor:
            return self.ranks.gather_rows(x.detach()).to("cpu", copy=True)

        text = self.ranks.gather_rows(self.text_embeds.detach())
        nearest = nearest_tokens(text)
        features = None if self.text_features is None else gathered_copy(self.text_features)
        return SyntheticSet(
            gathered_copy(self.images),
            text.to("cpu", copy=True),
            gathered_copy(self.attention_mask),
            metadata,
            features,
            nearest,
        )

    def state_dict(self) -> dict:
        """The whole set and its optimiser state, gathered over ranks (collective)."""
        gather = self.ranks.gather_rows
        synthetic = {"images": gather(self.images.detach()), "text_embeds": gather(self.text_embeds.detach())}
        if self.text_features is not None:
            synthetic["text_features"] = gather(self.text_features.detach())
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {
            k: {name: gather(v) if torch.is_tensor(v) and v.dim() > 0 else v for name, v in entry.items()}
            for k, entry in optimizer["state"].items()
        }
        return {"synthetic": synthetic, "syn_optimizer": optimizer, "syn_scaler": self.scaled_step.state_dict()}

    def load_state_dict(self, state: dict, skipped_steps: int) -> None:
        """This rank's shard of a validated checkpoint."""
        shard = self.ranks.shard(self.settings.num_pairs)
        with torch.no_grad():
            self.images.copy_(state["synthetic"]["images"][shard])
            self.text_embeds.copy_(state["synthetic"]["text_embeds"][shard])
            if self.text_features is not None:
                self.text_features.copy_(state["synthetic"]["text_features"][shard])
        optimizer = dict(state["syn_optimizer"])
        optimizer["state"] = {
            k: {name: v[shard] if torch.is_tensor(v) and v.dim() > 0 else v for name, v in entry.items()}
            for k, entry in optimizer["state"].items()
        }
        self.optimizer.load_state_dict(optimizer)
        self.scaled_step.load_state_dict(state["syn_scaler"])
        self.skipped = torch.tensor(float(skipped_steps), device=self.device)
