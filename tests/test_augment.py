"""Differentiable siamese augmentation (``--dsa-shift`` / ``--dsa-scale``): the resampling op forward and
backward against float64, the maps' ranges and streams, and the engine with it on (chunked == single pass,
the target batch augmented as the synthetic one)."""

from __future__ import annotations

import pytest
import torch

from covmatch.distill import DistillConfig, Distiller
from covmatch.distill.augment import MatchAugmentation, affine_resample
from covmatch.presets import get_preset

# (atol, rtol) of the op in each dtype against the float64 reference: fp32 rounding of the grid and weights;
# bf16 images are resampled in fp32 and rounded once on the way out (8 bits of mantissa).
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def _maps(n: int, shift: float = 0.2, scale: float = 0.2, seed: int = 0) -> torch.Tensor:
    return MatchAugmentation(shift, scale).draw(n, torch.Generator().manual_seed(seed))


def test_identity_map_returns_the_images():
    images = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    identity = torch.eye(2, 3).expand(3, 2, 3)
    torch.testing.assert_close(affine_resample(images, identity), images, rtol=0, atol=1e-12)


def test_a_whole_pixel_shift_moves_the_image_and_repeats_the_border():
    images = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    theta = torch.tensor([[[1.0, 0.0, 2 / 8], [0.0, 1.0, 0.0]]])  # sample one pixel to the right
    out = affine_resample(images, theta)
    torch.testing.assert_close(out[..., :-1], images[..., 1:], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[..., -1], images[..., -1], rtol=0, atol=1e-12)


def test_resampling_gradient_is_exact_in_float64():
    images = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    theta = _maps(2).double()
    assert torch.autograd.gradcheck(lambda x: affine_resample(x, theta), (images,))


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=lambda d: str(d).split(".")[-1])
def test_resampling_forward_and_backward_match_float64(dtype):
    torch.manual_seed(0)
    images = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    upstream = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    theta = _maps(4)

    def run(x: torch.Tensor):
        x = x.clone().requires_grad_(True)
        out = affine_resample(x, theta)
        (out.double() * upstream).sum().backward()
        return out.double(), x.grad.double()

    ref_out, ref_grad = run(images)
    out, grad = run(images.to(dtype))
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad, ref_grad, atol=atol, rtol=rtol)
    assert out.dtype == torch.float64 and affine_resample(images.to(dtype), theta).dtype == dtype


def test_maps_stay_in_their_ranges_and_zero_is_off():
    shift, scale = 0.125, 0.1
    theta = _maps(2000, shift, scale)
    zoom = 1 / torch.stack([theta[:, 0, 0], theta[:, 1, 1]], 1)
    assert zoom.min() >= 1 - scale - 1e-6 and zoom.max() <= 1 + scale + 1e-6
    assert zoom.min() < 1 - 0.9 * scale and zoom.max() > 1 + 0.9 * scale  # the whole range is used
    assert theta[:, :, 2].abs().max() <= 2 * shift + 1e-6 and theta[:, :, 2].abs().max() > 1.8 * shift
    assert (theta[:, 0, 1] == 0).all() and (theta[:, 1, 0] == 0).all()
    assert not MatchAugmentation().enabled and MatchAugmentation(shift=0.1).enabled


def test_maps_are_a_function_of_seed_and_iteration_and_ranks_split_one_draw():
    aug = MatchAugmentation(0.1, 0.1)
    assert torch.equal(aug.synthetic_maps(10, 3, 7), aug.synthetic_maps(10, 3, 7))
    assert not torch.equal(aug.synthetic_maps(10, 3, 7), aug.synthetic_maps(10, 3, 8))
    assert not torch.equal(aug.synthetic_maps(10, 3, 7), aug.real_maps(10, 3, 7))  # streams of their own
    both = torch.cat([aug.real_maps(4, 0, 5, rank, 2) for rank in (0, 1)])
    assert torch.equal(both, aug.real_maps(8, 0, 5, 0, 1))  # two ranks = one process with twice the batch


def _tiny(**overrides) -> DistillConfig:
    preset_fields = {k: overrides.pop(k) for k in list(overrides) if k in get_preset("tiny").to_dict()}
    return DistillConfig(preset=get_preset("tiny", **preset_fields), progress=False, **overrides)


def _float64(d: Distiller) -> Distiller:
    d.model.double()
    with torch.no_grad():
        d.synthetic.images.data = d.synthetic.images.data.double()
        d.synthetic.text_embeds.data = d.synthetic.text_embeds.data.double()
    return d


def test_chunked_run_with_augmentation_equals_single_pass():
    """N 12 > syn batch 8 with augmentation: each chunk resamples its rows through their own maps, so the
    chunked run distils the same set as one pass (float64)."""
    sets = {}
    for chunk in (None, 3):
        config = _tiny(num_pairs=12, syn_batch=8, iterations=4, online="real", syn_chunk=chunk,
                       dsa_shift=0.125, dsa_scale=0.1)  # fmt: skip
        sets[chunk] = _float64(Distiller(config, log=lambda _: None)).run()
    torch.testing.assert_close(sets[3].images, sets[None].images, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sets[3].text_embeds, sets[None].text_embeds, rtol=1e-9, atol=1e-12)


def test_augmentation_changes_what_is_matched_and_is_recorded():
    plain = Distiller(_tiny(iterations=2), log=lambda _: None)
    augmented = Distiller(_tiny(iterations=2, dsa_shift=0.125, dsa_scale=0.1), log=lambda _: None)
    batch = augmented.synthetic.batch(0)
    torch.testing.assert_close(batch.set_images, plain.synthetic.batch(0).images)  # the same starting pairs
    maps = augmented.synthetic.augmentation.synthetic_maps(augmented.config.num_pairs, 0, 0)
    torch.testing.assert_close(batch.images, affine_resample(batch.set_images, maps))
    pixels = next(iter(augmented.real_batches(0, 1)))[0]
    target = augmented._augmented_target(pixels, 0)
    assert torch.equal(plain._augmented_target(pixels, 0), pixels)
    real_maps = augmented.synthetic.augmentation.real_maps(len(pixels), 0, 0)
    torch.testing.assert_close(target, affine_resample(pixels, real_maps))
    assert not torch.allclose(target, pixels)
    a, p = augmented.run(), plain.run()
    assert not torch.allclose(a.images, p.images)
    assert a.metadata["hyperparameters"]["dsa_shift"] == 0.125 and a.metadata["hyperparameters"]["dsa_scale"] == 0.1
