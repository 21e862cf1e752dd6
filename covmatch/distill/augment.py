"""Differentiable siamese augmentation (DSA; Zhao & Bilen, ICML 2021) of the images whose features are matched.

Not part of CovMatch's Algorithm 1: an option for sets that must carry over to image encoders they were not
distilled with. Each iteration, every synthetic image and every image of the real target batch is zoomed and
shifted by a random affine map (bilinear resampling, border padding); the map is differentiable in the pixels,
so the synthetic gradient flows through it. The maps are drawn from the run's random streams by (seed,
iteration) for the whole set at once and picked by row, so a chunked, sharded or resumed run sees exactly the
maps an unchunked single-process run would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .streams import stream_generator

__all__ = ["MatchAugmentation", "affine_resample"]


@dataclass(frozen=True)
class MatchAugmentation:
    """Random zoom by a factor in ``[1 - scale, 1 + scale]`` and shift by up to ``shift`` of the image side,
    per image and per axis; both 0 is off."""

    shift: float = 0.0
    scale: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.shift > 0 or self.scale > 0

    def draw(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` affine maps as ``affine_grid`` takes them, (count, 2, 3) float32 on the CPU."""
        u = torch.rand(count, 4, generator=generator, dtype=torch.float64) * 2 - 1  # uniform in [-1, 1)
        theta = torch.zeros(count, 2, 3, dtype=torch.float64)
        # affine_grid maps output coordinates to input ones: a factor s below 1 zooms in, so 1 / zoom
        zoom = 1 + self.scale * u[:, :2]
        theta[:, 0, 0] = 1 / zoom[:, 0]
        theta[:, 1, 1] = 1 / zoom[:, 1]
        theta[:, :, 2] = 2 * self.shift * u[:, 2:]  # normalised coordinates span 2 across the image
        return theta.float()

    def synthetic_maps(self, num_pairs: int, seed: int, t: int) -> torch.Tensor:
        """Iteration t's maps for every row of the synthetic set (the same on every rank)."""
        return self.draw(num_pairs, stream_generator(seed, "augment-synthetic", t))

    def real_maps(self, batch: int, seed: int, t: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Iteration t's maps for rank ``rank``'s slice of the real target batch (``batch`` rows per rank): the
        r-th slice of one draw for all ranks, as the batch itself is (``RealBatchSampler``)."""
        maps = self.draw(batch * world_size, stream_generator(seed, "augment-real", t))
        return maps[rank * batch : (rank + 1) * batch]


def affine_resample(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Each image of (n, C, H, W) ``images`` resampled through its map in ``theta`` (n, 2, 3): bilinear,
    border padding, differentiable in ``images``; half-precision images are resampled in float32."""
    work = images if images.dtype in (torch.float32, torch.float64) else images.float()
    theta = theta.to(device=images.device, dtype=work.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(work, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(images.dtype)
