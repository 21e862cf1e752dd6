"""Image encoder: any timm model, created with ``num_classes=0`` so it returns pooled features."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from covmatch.errors import ConfigError

from .weights import load_weights_into

__all__ = ["GLYPHS_PRETRAINED", "ImageEncoder", "LOCALLY_PRETRAINED", "SHAPES_PRETRAINED"]

# the embedded datasets' locally pretrained weights (covmatch.pretrain), by name
SHAPES_PRETRAINED = "shapes-pretrained"
GLYPHS_PRETRAINED = "glyphs-pretrained"
LOCALLY_PRETRAINED = (SHAPES_PRETRAINED, GLYPHS_PRETRAINED)


def _cached_hub_file(model: nn.Module) -> Path:
    """The pretrained file of a timm model in the local Hugging Face cache (never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    cfg = getattr(model, "pretrained_cfg", {}) or {}
    repo = cfg.get("hf_hub_id")
    if not repo:
        raise ConfigError(f"timm model {cfg.get('architecture')!r} names no Hugging Face repo for its weights")
    for filename in ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    raise ConfigError(
        f"pretrained weights of {repo!r} are not in the local Hugging Face cache; covmatch never downloads: "
        "pass a local file with --image-weights"
    )


class ImageEncoder(nn.Module):
    """A timm backbone; ``forward(pixels [n, 3, H, W]) -> features [n, feature_dim]``."""

    def __init__(self, model: nn.Module, name: str, image_size: int, model_kwargs: Optional[Mapping] = None) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.image_size = image_size
        self.model_kwargs = dict(model_kwargs or {})
        self.feature_dim = int(model.num_features)
        self.channels_last = False
        self.whitening: Optional[nn.Module] = None  # a FeatureWhitening with --whiten-features

    @classmethod
    def create(
        cls,
        name: str,
        *,
        image_size: int,
        weights: Optional[str] = None,
        model_kwargs: Optional[Mapping[str, object]] = None,
    ) -> ImageEncoder:
        """Build ``name`` from timm with ``model_kwargs`` (e.g. ``patch_size``). ``weights``: None (random
        init), a local file, or "cache" (the local HF cache). The embedded data's "shapes-pretrained" and
        "glyphs-pretrained" weights are made by ``covmatch.pretrain`` and reach this factory as a file
        (``resolve_image_weights``)."""
        import timm

        if not timm.is_model(name):
            raise ConfigError(f"unknown timm image encoder {name!r}")
        kwargs = dict(model_kwargs or {})
        try:
            try:
                model = timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size, **kwargs)
            except TypeError:  # convolutional models take no img_size
                model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        except (TypeError, ValueError, AssertionError) as err:
            if not kwargs:
                raise
            raise ConfigError(f"timm model {name!r} does not take --image-encoder-kwargs {kwargs}: {err}") from None
        if weights in LOCALLY_PRETRAINED:
            raise ConfigError(
                f"image weights {weights!r} name weights made by covmatch.pretrain: resolve them to a "
                "file first (covmatch.pretrain.resolve_image_weights)"
            )
        if weights:
            path = _cached_hub_file(model) if weights == "cache" else Path(weights)
            classifier = (getattr(model, "pretrained_cfg", {}) or {}).get("classifier") or ""
            load_weights_into(model, path, ignore_prefixes=(classifier + ".",) if classifier else ())
        return cls(model, name, image_size, kwargs)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def set_channels_last(self, enable: bool = True) -> None:
        """NHWC weights and inputs: the layout cuDNN's tensor-core convolutions use natively (NCHW costs
        layout transposes around every convolution on a GPU). Same features up to rounding."""
        self.channels_last = enable
        self.model.to(memory_format=torch.channels_last if enable else torch.contiguous_format)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # inputs in the weights' dtype: DeepSpeed bf16/fp16 keeps half-precision weights, and CPU autocast
        # does not cast every op's weights (mixed-dtype norms fail there)
        pixels = pixels.to(next(self.model.parameters()).dtype)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        features = self.model(pixels)
        return features if self.whitening is None else self.whitening(features)
