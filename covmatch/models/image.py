"""Image encoder: any timm model, created with ``num_classes=0`` so it returns pooled features."""

from __future__ import annotations

import types
from pathlib import Path
from typing import List, Mapping, Optional

import torch
import torch.utils.checkpoint
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


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """A module's own forward as one checkpointed segment: its input kept, its activations recomputed in
    backward."""
    forward = type(self).forward
    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, self, *args, use_reentrant=False, **kwargs)


def _checkpoint_segments(model: nn.Module) -> Optional[List[nn.Module]]:
    """The stem and every block of a timm model built as ``stem`` + ``stages``, a sequence of sequences of
    blocks (the NFNet family: nfnet_*, eca_nfnet_*, nf_resnet*), or None for models of another build: the
    segments the image encoder checkpoints one by one."""
    stem, stages = getattr(model, "stem", None), getattr(model, "stages", None)
    if not isinstance(stem, nn.Module) or not isinstance(stages, nn.Sequential) or len(stages) == 0:
        return None
    if not all(isinstance(stage, nn.Sequential) for stage in stages):
        return None
    return [stem] + [block for stage in stages for block in stage]


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
        """Recompute activations in backward. Models built as a stem and stages of blocks checkpoint the stem and
        each block on its own. timm's checkpointing recomputes a whole stage at once, whose activations then all
        live together (NFNet-L0's third stage, 6 blocks at 14 x 14 x 1536, about 4 GiB for 256 images of 224 px
        in bf16), and stores the stem's full-resolution activations: counted on the CPU at the paper's batches
        (bf16, real 128, synthetic 256), an iteration's peak is 9.0 GiB with timm's, 7.6 GiB per block, 6.2 GiB
        per block and stem (``benchmarks/count_memory.py --whole-step``). The blocks' forward is recomputed once
        either way; recomputing the stem adds 12 % to NFNet-L0's forward FLOPs (1.05 of 8.51 GFLOP per image).
        Other models use timm's own checkpointing."""
        segments = _checkpoint_segments(self.model)
        if segments is None:
            self.model.set_grad_checkpointing(enable)
            return
        self.model.set_grad_checkpointing(False)
        for module in segments:
            if enable:
                module.forward = types.MethodType(_checkpointed_forward, module)
            else:
                module.__dict__.pop("forward", None)

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
