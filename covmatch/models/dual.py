"""The dual encoder: image and text encoders, projections, InfoNCE, and the reset to pretrained weights."""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .image import ImageEncoder
from .text import TextEncoder

__all__ = ["Projection", "DualEncoder", "info_nce"]


class Projection(nn.Module):
    """Linear map (depth 1) or an MLP of ``depth`` layers with GELU in between, to ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 1) -> None:
        super().__init__()
        if depth not in (1, 2, 3):
            raise ValueError(f"projection depth must be 1, 2 or 3, got {depth}")
        layers = []
        dims = [in_dim] + [out_dim] * depth
        for i in range(depth):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < depth - 1:
                layers.append(nn.GELU())
        self.net = nn.Sequential(*layers)

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Fresh random weights (PyTorch's Linear init), drawn from ``generator`` on its device when given (a
        generator on the model's device draws them there, with no copy from the host)."""
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)
                device = generator.device if generator is not None else torch.device("cpu")
                with torch.no_grad():
                    w = torch.empty(layer.weight.shape, device=device).uniform_(-bound, bound, generator=generator)
                    b = torch.empty(layer.bias.shape, device=device).uniform_(-bound, bound, generator=generator)
                    layer.weight.copy_(w)
                    layer.bias.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 features into half-precision weights (DeepSpeed bf16/fp16 outside autocast): use the weights' dtype
        return self.net(x.to(self.net[0].weight.dtype))


def info_nce(image_z: torch.Tensor, text_z: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matched pairs (row i of each is a pair), cosine similarity."""
    image_z = F.normalize(image_z.float(), dim=-1)
    text_z = F.normalize(text_z.float(), dim=-1)
    logits = logit_scale.float().exp() * image_z @ text_z.t()
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class DualEncoder(nn.Module):
    """CLIP-style model: ``encode_image``/``encode_text`` give encoder features (``project=False``, what
    CovMatch matches) or projected embeddings; ``contrastive_loss`` is InfoNCE at temperature 0.07."""

    def __init__(
        self,
        image: ImageEncoder,
        text: TextEncoder,
        *,
        proj_dim: int = 2304,
        proj_depth: int = 1,
        temperature: float = 0.07,
        learnable_temperature: bool = False,
    ) -> None:
        super().__init__()
        self.image = image
        self.text = text
        self.image_proj = Projection(image.feature_dim, proj_dim, proj_depth)
        self.text_proj = Projection(text.feature_dim, proj_dim, proj_depth)
        # shape [1], not a 0-d scalar: DeepSpeed's parameter broadcast cannot view a 0-d tensor as bytes
        self.logit_scale = nn.Parameter(
            torch.full((1,), math.log(1.0 / temperature)), requires_grad=learnable_temperature
        )
        self._initial_logit_scale = float(self.logit_scale.detach())
        self._pretrained: Dict[str, torch.Tensor] = {}
        self._restore: Optional[Tuple[torch.device, List[torch.Tensor], List[torch.Tensor]]] = None
        self.snapshot_pretrained()

    def snapshot_pretrained(self) -> None:
        """Remember the encoders' current weights as the 'pretrained' state that ``reset`` returns to (on the
        host; ``reset`` keeps a copy on the model's device once it runs there)."""
        self._pretrained = {
            k: v.detach().to("cpu", copy=True)
            for k, v in self.state_dict().items()
            if k.startswith(("image.", "text."))
        }
        self._restore = None

    def _restore_pairs(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """(the encoders' tensors, their pretrained values on the same device), made once per device: each
        reset is then one batched device-to-device copy."""
        device = self.logit_scale.device
        stale = self._restore is None or self._restore[0] != device
        if not stale:  # a cast since (DeepSpeed's half-precision weights): sources in the weights' dtypes again
            stale = any(t.dtype != s.dtype for t, s in zip(self._restore[1], self._restore[2]))
        if stale:
            targets = self._restore_targets()
            sources = [self._pretrained[name].to(device, t.dtype) for name, t in zip(self._pretrained, targets)]
            self._restore = (device, targets, sources)
        return self._restore[1], self._restore[2]

    def _restore_targets(self) -> List[torch.Tensor]:
        live = self.state_dict(keep_vars=True)
        return [live[name] for name in self._pretrained]

    def pretrained_state(self) -> Dict[str, torch.Tensor]:
        return self._pretrained

    def pretrained_embedding_table(self) -> torch.Tensor:
        """The text encoder's input-embedding table as ``reset`` restores it (the CPU snapshot)."""
        table = self.text.embedding_table
        name = next(k for k, p in self.named_parameters() if p is table)
        return self._pretrained[name]

    def reset(self, generator: Optional[torch.Generator] = None) -> None:
        """Encoders back to pretrained weights, projections re-initialised, temperature back to its start."""
        self.restore_pretrained()
        self.reinitialise_heads(generator)

    def restore_pretrained(
        self, tensors: Optional[Iterable[torch.Tensor]] = None, *, keep_on_device: bool = True
    ) -> None:
        """The encoders' parameters and buffers (those of them in ``tensors`` when given) back to the snapshot.
        ``keep_on_device=False`` copies from the host snapshot and keeps no device copy (what ZeRO-3 wants:
        no full copy of the model per rank)."""
        if keep_on_device:
            targets, sources = self._restore_pairs()
        else:
            targets, sources = self._restore_targets(), list(self._pretrained.values())
        if tensors is not None:
            wanted = {id(t) for t in tensors}
            kept = [i for i, t in enumerate(targets) if id(t) in wanted]
            targets, sources = [targets[i] for i in kept], [sources[i] for i in kept]
        with torch.no_grad():
            if keep_on_device and targets:
                torch._foreach_copy_(targets, sources)
            elif not keep_on_device:
                for target, source in zip(targets, sources):  # host to device, cast to the target's dtype
                    target.copy_(source)

    def reinitialise_heads(self, generator: Optional[torch.Generator] = None) -> None:
        """Fresh projections drawn from ``generator`` and the temperature back to its start."""
        self.image_proj.reset_parameters(generator)
        self.text_proj.reset_parameters(generator)
        with torch.no_grad():
            self.logit_scale.fill_(self._initial_logit_scale)

    def encoder_parameters(self):
        return list(self.image.parameters()) + list(self.text.parameters())

    def encoder_buffers(self) -> List[torch.Tensor]:
        return list(self.image.buffers()) + list(self.text.buffers())

    def head_parameters(self):
        heads = list(self.image_proj.parameters()) + list(self.text_proj.parameters())
        return heads + ([self.logit_scale] if self.logit_scale.requires_grad else [])

    def encode_image(self, pixels: torch.Tensor, project: bool = True) -> torch.Tensor:
        features = self.image(pixels)
        return self.image_proj(features) if project else features

    def encode_text(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, project: bool = True):
        features = self.text(inputs_embeds, attention_mask)
        return self.text_proj(features) if project else features

    def encode_text_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, project: bool = True):
        return self.encode_text(self.text.embed(input_ids), attention_mask, project)

    def encode_captions(
        self,
        *,
        input_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        text_features: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Projected embeddings of a batch of captions given as keyword arguments, the one convention of
        distillation and evaluation: ``input_ids`` or ``inputs_embeds`` (with ``attention_mask``), or
        ``text_features`` (learnt features of a frozen text encoder)."""
        if text_features is not None:
            return self.text_proj(text_features)
        if input_ids is not None:
            return self.encode_text_ids(input_ids, attention_mask)
        return self.encode_text(inputs_embeds, attention_mask)

    def contrastive_loss(self, image_z: torch.Tensor, text_z: torch.Tensor) -> torch.Tensor:
        return info_nce(image_z, text_z, self.logit_scale)

    def forward(
        self,
        pixels: torch.Tensor,
        *,
        input_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        text_features: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """InfoNCE of a batch of pairs; captions as token ids, input embeddings, or encoder features.

        The online training step goes through here, so that wrappers that act on ``forward`` (DeepSpeed
        ZeRO-3 gathers the model's own parameters, such as the temperature, around it) see the whole step.
        """
        text_z = self.encode_captions(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, text_features=text_features
        )
        return self.contrastive_loss(self.encode_image(pixels), text_z)
