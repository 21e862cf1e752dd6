"""The image transforms of ``covmatch.data.datasets.image_transform``, batched on tensors, for images read from
a decoded cache (``covmatch.data.cache``): uint8 ``[B, S, S, 3]`` in, normalised float ``[B, 3, O, O]`` out,
on whatever device the batch is on.

- Train (``RandomResizedCrop(O, scale=(0.5, 1), ratio=(3/4, 4/3))`` + optional horizontal flip): the boxes are
  drawn exactly as torchvision draws them (ten tries, then the centre-crop fallback), in the *original*
  image's pixel coordinates from its stored width and height, then mapped onto the ``S x S`` cached image;
  each box is resampled to ``O x O`` with bicubic interpolation (``grid_sample``). Differences from the
  per-image PIL path: the crop is taken from the cached ``S x S`` image, not the original (at the smallest
  crop it still has ``O`` pixels on a side, ``cache_side``), and the resampling has no antialiasing filter
  (PIL's bicubic does; crops are at most ``S / O`` times larger than the output).
- Evaluation (``Resize((O, O))``): bicubic with antialiasing (``interpolate(antialias=True)``) from ``S x S``.

Both round to 8 bits as PIL does before normalising. The random draws come from the generator passed in (the
run's ``stream_generator`` for iteration t), never from the global RNG, so a resumed run redraws the same crops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from covmatch.constants import cached_constant

__all__ = ["CropBoxes", "random_resized_crop_boxes", "crop_resize_normalize", "resize_normalize"]

SCALE = (0.5, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
_TRIES = 10


@dataclass
class CropBoxes:
    """Per image: the box ``(x0, y0, x1, y1)`` in the cached image's pixel coordinates and whether to flip."""

    boxes: torch.Tensor  # [B, 4] float32
    flips: torch.Tensor  # [B] bool

    def to(self, device, non_blocking: bool = False) -> CropBoxes:
        return CropBoxes(
            self.boxes.to(device, non_blocking=non_blocking), self.flips.to(device, non_blocking=non_blocking)
        )


def random_resized_crop_boxes(
    sizes: torch.Tensor,
    side: int,
    generator: Optional[torch.Generator],
    *,
    flip: bool,
    scale: Tuple[float, float] = SCALE,
    ratio: Tuple[float, float] = RATIO,
) -> CropBoxes:
    """torchvision's ``RandomResizedCrop.get_params`` for every image at once: ``sizes`` ``[B, 2]`` (width,
    height) of the originals; boxes returned in the ``side x side`` cached image's coordinates."""
    sizes = sizes.to(torch.float64)
    width, height = sizes[:, :1], sizes[:, 1:]
    area = width * height
    n = sizes.shape[0]
    u = torch.rand(n, _TRIES, 4, generator=generator, dtype=torch.float64)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.to(torch.int64).argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    chosen = first.clamp_min(0)
    w, h, draws = w[rows, chosen], h[rows, chosen], u[rows, chosen]
    # torch.randint(0, H - h + 1) and torch.randint(0, W - w + 1), from uniform draws
    top = torch.floor(draws[:, 2] * (height[:, 0] - h + 1))
    left = torch.floor(draws[:, 3] * (width[:, 0] - w + 1))
    # fallback (no try fitted): the centre crop at the nearest allowed aspect ratio
    in_ratio = width[:, 0] / height[:, 0]
    too_tall, too_wide = in_ratio < ratio[0], in_ratio > ratio[1]
    fw = torch.where(too_wide, torch.round(height[:, 0] * ratio[1]), width[:, 0])
    fh = torch.where(too_tall, torch.round(width[:, 0] / ratio[0]), height[:, 0])
    fallback = first < 0
    w, h = torch.where(fallback, fw, w), torch.where(fallback, fh, h)
    top = torch.where(fallback, torch.floor((height[:, 0] - h) / 2), top)
    left = torch.where(fallback, torch.floor((width[:, 0] - w) / 2), left)
    sx, sy = side / width[:, 0], side / height[:, 0]
    boxes = torch.stack([left * sx, top * sy, (left + w) * sx, (top + h) * sy], dim=1).to(torch.float32)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return CropBoxes(boxes, flips)


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = x.clamp_(0.0, 255.0).round_()  # 8 bits, as PIL's output
    mean_t, std_t = (
        cached_constant(("pixel-stat", tuple(v), x.dtype), x.device,
                        lambda v=v: torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255.0)
        for v in (mean, std)
    )  # fmt: skip
    return (x - mean_t) / std_t


def crop_resize_normalize(
    pixels: torch.Tensor, crops: CropBoxes, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 ``[B, S, S, 3]`` -> each crop box resampled to ``size x size`` (bicubic), flipped where asked,
    normalised: float32 ``[B, 3, size, size]``."""
    n, side = pixels.shape[0], pixels.shape[1]
    x = pixels.permute(0, 3, 1, 2).to(torch.float32)
    boxes = crops.boxes.to(x.device, torch.float32)
    # affine_grid's output grid spans [-1, 1]; map it onto each box (align_corners=False: pixel edges)
    cx = (boxes[:, 0] + boxes[:, 2]) / side - 1.0
    cy = (boxes[:, 1] + boxes[:, 3]) / side - 1.0
    sx = (boxes[:, 2] - boxes[:, 0]) / side
    sy = (boxes[:, 3] - boxes[:, 1]) / side
    sx = torch.where(crops.flips.to(x.device), -sx, sx)
    theta = torch.zeros(n, 2, 3, dtype=torch.float32, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
    grid = F.affine_grid(theta, (n, 3, size, size), align_corners=False)
    out = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return _normalize(out, mean, std)


def resize_normalize(pixels: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[B, S, S, 3]`` -> resized to ``size x size`` (bicubic, antialiased), normalised."""
    x = pixels.permute(0, 3, 1, 2).to(torch.float32)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return _normalize(x, mean, std)
