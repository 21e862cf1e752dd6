"""A pretrained image encoder for the embedded dataset, made locally (no PyPI package ships timm weights).

The analogue of ImageNet pretraining for the ``demo`` preset: the image encoder learns to recognise which
coloured shapes a scene contains (35-way multi-label classification) on a *disjoint* generated split
(its own seed, never the distillation or evaluation data), with no text involved, so image and text
encoders start unaligned as in the paper. The weights are cached as safetensors and reused.

    python -m covmatch.pretrain --out ~/.cache/covmatch/shapes-test_nfnet-32.safetensors
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save
from tqdm.auto import tqdm

from covmatch.data.datasets import CLIP_MEAN, CLIP_STD, image_transform
from covmatch.data.shapes import COLOURS, SHAPES, ShapesSource
from covmatch.errors import ConfigError
from covmatch.models import SHAPES_PRETRAINED, ImageEncoder
from covmatch.presets import parse_model_kwargs
from covmatch.synthetic import atomic_write_bytes

__all__ = [
    "PRETRAIN_SEED",
    "default_cache_path",
    "pretrain_shapes_encoder",
    "ensure_pretrained",
    "resolve_image_weights",
]

PRETRAIN_SEED = 90_210  # the pretraining split's seed: disjoint from every seed the commands use by default
_LABELS = [(c, s) for c in COLOURS for s in SHAPES]


def _kwargs_tag(model_kwargs: Optional[Mapping[str, object]]) -> str:
    """A file-name-safe tag of the timm keyword arguments, sorted: {"patch_size": 8} -> "-patch_size=8"."""
    if not model_kwargs:
        return ""
    text = ",".join(f"{k}={v!r}".replace("'", "") for k, v in sorted(model_kwargs.items()))
    return "-" + re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)


def default_cache_path(encoder: str, image_size: int, model_kwargs: Optional[Mapping[str, object]] = None) -> Path:
    """Where the pretrained weights of ``encoder`` (built with ``model_kwargs``) at ``image_size`` are cached."""
    root = Path(os.environ.get("COVMATCH_CACHE", Path.home() / ".cache" / "covmatch"))
    return root / f"shapes-pretrained-{encoder}{_kwargs_tag(model_kwargs)}-{image_size}px.safetensors"


def _labels(scene) -> torch.Tensor:
    y = torch.zeros(len(_LABELS))
    for o in scene.objects:
        y[_LABELS.index((o.colour, o.shape))] = 1.0
    return y


def pretrain_shapes_encoder(
    encoder: str,
    image_size: int,
    out: Path,
    *,
    steps: int = 400,
    batch_size: int = 128,
    num_images: int = 6_000,
    lr: float = 2e-3,
    progress: bool = True,
    model_kwargs: Optional[Mapping[str, object]] = None,
) -> Path:
    """Train ``encoder`` (timm name, built with ``model_kwargs``) on attribute recognition over a disjoint
    shapes split; save safetensors."""
    torch.manual_seed(PRETRAIN_SEED)
    source = ShapesSource(PRETRAIN_SEED, num_train_images=num_images, render_size=max(64, image_size))
    scenes = source.scenes("train")
    transform = image_transform(image_size, train=False, mean=CLIP_MEAN, std=CLIP_STD)
    pixels = torch.stack(
        [transform(source.load_image(s.key)) for s in tqdm(scenes, desc="render", disable=not progress)]
    )
    labels = torch.stack([_labels(s) for s in scenes])
    model = ImageEncoder.create(encoder, image_size=image_size, model_kwargs=model_kwargs)
    head = torch.nn.Linear(model.feature_dim, len(_LABELS))
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(PRETRAIN_SEED)
    bar = tqdm(range(steps), desc=f"pretrain {encoder}", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(scenes), (batch_size,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(head(model(pixels[idx])), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.model.state_dict().items()}
    meta = {"encoder": encoder, "image_size": str(image_size), "seed": str(PRETRAIN_SEED), "steps": str(steps),
            "model_kwargs": repr(dict(model_kwargs or {}))}  # fmt: skip
    atomic_write_bytes(out, save(state, metadata=meta))
    return out


def ensure_pretrained(
    encoder: str, image_size: int, *, progress: bool = True, model_kwargs: Optional[Mapping[str, object]] = None
) -> Path:
    """The cached pretrained weights for ``encoder`` at ``image_size``, made on first use (about a minute)."""
    path = default_cache_path(encoder, image_size, model_kwargs)
    if not path.is_file():
        print(
            f"covmatch: pretraining {encoder} at {image_size} px on a disjoint shapes split -> {path}", file=sys.stderr
        )
        pretrain_shapes_encoder(encoder, image_size, path, progress=progress, model_kwargs=model_kwargs)
    return path


def resolve_image_weights(
    encoder: str,
    image_size: int,
    weights: Optional[str],
    *,
    progress: bool = True,
    model_kwargs: Optional[Mapping[str, object]] = None,
) -> Optional[str]:
    """What the image-encoder factory loads: ``weights`` as given, except "shapes-pretrained", which becomes
    the file of weights pretrained for ``encoder`` (built with ``model_kwargs``) at ``image_size`` (made on
    first use, with progress bars unless ``progress`` is off)."""
    if weights == SHAPES_PRETRAINED:
        return str(ensure_pretrained(encoder, image_size, progress=progress, model_kwargs=model_kwargs))
    return weights


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covmatch.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="test_nfnet", help="timm image encoder")
    parser.add_argument("--image-size", type=int, default=32, help="input resolution")
    parser.add_argument("--steps", type=int, default=400, help="optimisation steps")
    parser.add_argument(
        "--image-encoder-kwargs", default="", help="timm.create_model keyword arguments, 'key=value, ...'"
    )
    parser.add_argument("--out", type=Path, default=None, help="output .safetensors (default: the cache path)")
    args = parser.parse_args(argv)
    try:
        kwargs = parse_model_kwargs(args.image_encoder_kwargs, "--image-encoder-kwargs")
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    out = args.out or default_cache_path(args.encoder, args.image_size, kwargs)
    print(pretrain_shapes_encoder(args.encoder, args.image_size, out, steps=args.steps, model_kwargs=kwargs))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
