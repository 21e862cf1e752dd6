"""Pretrained image encoders for the embedded datasets, made locally (no PyPI package ships timm weights).

The analogue of ImageNet pretraining, with no text involved, so image and text encoders start unaligned as in
the paper. Shapes (the ``demo`` preset): the encoder learns which coloured shapes a scene contains (35-way
multi-label classification) on a *disjoint* generated split (its own seed, never the distillation or evaluation
data). Glyph scenes: each encoder family learns which glyphs a scene shows over a concept set of its own,
disjoint from the benchmark's and from the other families' (``FAMILY_CONCEPTS``), so its features are generic
visual features, not the benchmark's labels. The weights are cached as safetensors and reused.

    python -m covmatch.pretrain --out ~/.cache/covmatch/shapes-test_nfnet-32.safetensors
    python -m covmatch.pretrain --dataset glyphs --encoder test_resnet --image-size 64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from covmatch.data.build import build_retrieval_data, build_source
from covmatch.data.datasets import CLIP_MEAN, CLIP_STD, image_transform
from covmatch.data.glyphs import GlyphsSource
from covmatch.data.shapes import COLOURS, SHAPES, ShapesSource
from covmatch.errors import ConfigError
from covmatch.models import (
    GLYPHS_PRETRAINED,
    SHAPES_PRETRAINED,
    DualEncoder,
    FeatureWhitening,
    ImageEncoder,
    build_dual_encoder,
    whitening_statistics,
)
from covmatch.presets import parse_model_kwargs
from covmatch.synthetic import atomic_write_bytes

__all__ = [
    "FAMILY_CONCEPTS",
    "GLYPH_PRETRAIN_STEPS",
    "PRETRAIN_SEED",
    "default_cache_path",
    "encoder_family",
    "pretrain_glyphs_encoder",
    "pretrain_shapes_encoder",
    "ensure_pretrained",
    "resolve_image_weights",
    "encoder_features",
    "ensure_whitening",
    "pretrained_dual_encoder",
]

PRETRAIN_SEED = 90_210  # the pretraining split's seed: disjoint from every seed the commands use by default
_LABELS = [(c, s) for c in COLOURS for s in SHAPES]
# the pretraining recipe of each dataset, as cache file names carry it (glyphs v3: one-glyph scenes, softmax,
# steps per family)
_RECIPES = {"shapes": "shapes", "glyphs": "glyphs-v3"}
# glyph scenes: the concept set each image-encoder family is pretrained on (timm names containing the family)
# (a tiny ViT, test_vit, was the third family first: it barely learns glyphs from these data in 1,200 steps, final
# loss 4.03 against 5.16 for guessing, and 100 random pairs then train it to chance-level retrieval)
FAMILY_CONCEPTS = {"nfnet": "pretrain_a", "resnet": "pretrain_b", "efficientnet": "pretrain_c"}
# optimisation steps of each family's glyph pretraining: EfficientNet learns slowest (final loss 1.07 after 1,200
# steps, NFNet 0.06, ResNet 0.29)
GLYPH_PRETRAIN_STEPS = {"nfnet": 1_200, "resnet": 1_200, "efficientnet": 3_000}


def _kwargs_tag(model_kwargs: Optional[Mapping[str, object]]) -> str:
    """A file-name-safe tag of the timm keyword arguments, sorted: {"patch_size": 8} -> "-patch_size=8"."""
    if not model_kwargs:
        return ""
    text = ",".join(f"{k}={v!r}".replace("'", "") for k, v in sorted(model_kwargs.items()))
    return "-" + re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)


def encoder_family(encoder: str) -> str:
    """The family of a timm image encoder among FAMILY_CONCEPTS' (its concept set on glyph scenes)."""
    for family in FAMILY_CONCEPTS:
        if family in encoder:
            return family
    raise ConfigError(
        f"image encoder {encoder!r}: glyph-scene pretraining knows the families {', '.join(FAMILY_CONCEPTS)} "
        "(one disjoint concept set each); pick an encoder of one of them"
    )


def default_cache_path(
    encoder: str, image_size: int, model_kwargs: Optional[Mapping[str, object]] = None, dataset: str = "shapes"
) -> Path:
    """Where the pretrained weights of ``encoder`` (built with ``model_kwargs``) at ``image_size`` are cached
    (the name carries the pretraining recipe's version: weights made by an older recipe are not reused)."""
    root = Path(os.environ.get("COVMATCH_CACHE", Path.home() / ".cache" / "covmatch"))
    return root / f"{_RECIPES[dataset]}-pretrained-{encoder}{_kwargs_tag(model_kwargs)}-{image_size}px.safetensors"


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
    labels = torch.stack([_labels(s) for s in scenes])
    return _train_recognition(source, scenes, labels, encoder, image_size, out, steps=steps, batch_size=batch_size,
                              lr=lr, progress=progress, model_kwargs=model_kwargs, meta={})  # fmt: skip


def pretrain_glyphs_encoder(
    encoder: str,
    image_size: int,
    out: Path,
    *,
    steps: Optional[int] = None,
    batch_size: int = 128,
    num_images: int = 12_000,
    lr: float = 2e-3,
    progress: bool = True,
    model_kwargs: Optional[Mapping[str, object]] = None,
) -> Path:
    """Train ``encoder`` to name the glyph of one-glyph scenes among its family's concept set (FAMILY_CONCEPTS,
    disjoint from the benchmark's), a softmax classification, for ``steps`` (default: the family's in
    GLYPH_PRETRAIN_STEPS); save safetensors.

    One glyph per scene, not the benchmark's 2-4: naming one of 175 glyphs is learnt in a few hundred steps,
    while recognising which glyphs a crowded scene holds (multi-label) had barely started after 600."""
    family = encoder_family(encoder)
    concepts = FAMILY_CONCEPTS[family]
    steps = GLYPH_PRETRAIN_STEPS[family] if steps is None else steps
    torch.manual_seed(PRETRAIN_SEED)
    source = GlyphsSource(PRETRAIN_SEED, num_train_images=num_images, render_size=max(64, image_size),
                          concepts=concepts, objects_per_scene=(1,), zipf_exponent=0.0)  # fmt: skip
    scenes = source.scenes("train")
    index = {g: i for i, g in enumerate(source.glyphs)}
    labels = torch.tensor([index[scene.objects[0].glyph] for scene in scenes])
    return _train_recognition(source, scenes, labels, encoder, image_size, out, steps=steps, batch_size=batch_size,
                              lr=lr, progress=progress, model_kwargs=model_kwargs, classes=len(index),
                              loss_fn=F.cross_entropy, grad_clip=1.0,
                              meta={"dataset": "glyphs", "concepts": concepts})  # fmt: skip


def _train_recognition(source, scenes, labels, encoder, image_size, out, *, steps, batch_size, lr, progress,
                       model_kwargs, meta, classes=None, loss_fn=F.binary_cross_entropy_with_logits,
                       grad_clip=None) -> Path:  # fmt: skip
    """Recognition of ``labels`` (multi-hot [scenes, classes] under the default binary cross-entropy, or class
    indices under ``loss_fn`` = cross-entropy with ``classes`` classes) from the rendered scenes; the encoder's
    weights (not the head's) saved atomically as safetensors with what made them. ``grad_clip``: the largest
    gradient norm of a step (None: unclipped)."""
    transform = image_transform(image_size, train=False, mean=CLIP_MEAN, std=CLIP_STD)
    pixels = torch.stack(
        [transform(source.load_image(s.key)) for s in tqdm(scenes, desc="render", disable=not progress)]
    )
    model = ImageEncoder.create(encoder, image_size=image_size, model_kwargs=model_kwargs)
    head = torch.nn.Linear(model.feature_dim, classes or labels.shape[1])
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(PRETRAIN_SEED)
    bar = tqdm(range(steps), desc=f"pretrain {encoder}", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(scenes), (batch_size,), generator=gen)
        loss = loss_fn(head(model(pixels[idx])), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.model.state_dict().items()}
    meta = {"encoder": encoder, "image_size": str(image_size), "seed": str(PRETRAIN_SEED), "steps": str(steps),
            "model_kwargs": repr(dict(model_kwargs or {})), **meta}  # fmt: skip
    atomic_write_bytes(out, save(state, metadata=meta))
    return out


_PRETRAINERS = {"shapes": pretrain_shapes_encoder, "glyphs": pretrain_glyphs_encoder}
_WEIGHTS_DATASETS = {SHAPES_PRETRAINED: "shapes", GLYPHS_PRETRAINED: "glyphs"}


def ensure_pretrained(
    encoder: str, image_size: int, *, progress: bool = True, model_kwargs: Optional[Mapping[str, object]] = None,
    dataset: str = "shapes",
) -> Path:  # fmt: skip
    """The cached weights of ``encoder`` at ``image_size`` pretrained for ``dataset`` ("shapes" or "glyphs"),
    made on first use (on 2 CPU cores about a minute for shapes at 32 px, 2-7 minutes per encoder for glyph
    scenes at 64 px)."""
    path = default_cache_path(encoder, image_size, model_kwargs, dataset)
    if not path.is_file():
        if dataset == "glyphs":
            encoder_family(encoder)  # an unknown family: one clear error before anything is rendered
        print(f"covmatch: pretraining {encoder} at {image_size} px on a disjoint {dataset} split -> {path}",
              file=sys.stderr)  # fmt: skip
        _PRETRAINERS[dataset](encoder, image_size, path, progress=progress, model_kwargs=model_kwargs)
    return path


def resolve_image_weights(
    encoder: str,
    image_size: int,
    weights: Optional[str],
    *,
    progress: bool = True,
    model_kwargs: Optional[Mapping[str, object]] = None,
) -> Optional[str]:
    """What the image-encoder factory loads: ``weights`` as given, except "shapes-pretrained" and
    "glyphs-pretrained", which become the file of weights pretrained for ``encoder`` (built with
    ``model_kwargs``) at ``image_size`` (made on first use, with progress bars unless ``progress`` is off)."""
    if weights in _WEIGHTS_DATASETS:
        path = ensure_pretrained(encoder, image_size, progress=progress, model_kwargs=model_kwargs,
                                 dataset=_WEIGHTS_DATASETS[weights])  # fmt: skip
        return str(path)
    return weights


# --whiten-features: the whitening is fitted on this many train images (and their captions, unpaired) of the
# embedded dataset generated from its own seed, disjoint from every seed the commands use by default
WHITENING_SEED = 31_337
WHITENING_IMAGES = 4_000


@torch.no_grad()
def encoder_features(model: DualEncoder, data, *, batch_size: int = 256, progress: bool = True):
    """Image and caption features of a RetrievalData split at the encoders (no projections), fp32, in eval mode."""
    was_training = model.training
    model.eval()
    images = [model.image(torch.stack([data.images[j] for j in range(i, min(i + batch_size, len(data.images)))]))
              for i in tqdm(range(0, len(data.images), batch_size), desc="images", disable=not progress)]  # fmt: skip
    ids, mask = data.input_ids, data.attention_mask
    starts = tqdm(range(0, ids.shape[0], batch_size), desc="captions", disable=not progress)
    texts = [model.text.encode_ids(ids[i : i + batch_size], mask[i : i + batch_size]) for i in starts]
    model.train(was_training)
    return torch.cat(images).float(), torch.cat(texts).float()


def _whitening_path(model: DualEncoder, preset) -> Path:
    """The cache file of the whitening of ``model``'s encoders (their weights, hashed) on ``preset``'s data."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(("image.", "text.")):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    recipe = {"dataset": preset.dataset, "seed": WHITENING_SEED, "images": WHITENING_IMAGES,
              "image_size": preset.image_size, "seq_len": preset.seq_len, "max_words": preset.max_words}  # fmt: skip
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    root = Path(os.environ.get("COVMATCH_CACHE", Path.home() / ".cache" / "covmatch"))
    return root / f"whitening-{preset.dataset}-{digest.hexdigest()[:20]}.safetensors"


def ensure_whitening(model: DualEncoder, preset, *, progress: bool = True) -> Path:
    """The cached whitening statistics of ``model``'s encoders (before any whitening) for ``preset``'s embedded
    dataset, fitted on first use: image features of WHITENING_IMAGES train images generated from WHITENING_SEED,
    caption features of their captions, each side on its own (no pairing is used)."""
    path = _whitening_path(model, preset)
    if path.is_file():
        return path
    print(f"covmatch: fitting the feature whitening on {WHITENING_IMAGES} unpaired {preset.dataset} images and "
          f"their captions (seed {WHITENING_SEED}) -> {path}", file=sys.stderr)  # fmt: skip
    source = build_source(preset.replace(shapes_train_images=WHITENING_IMAGES), seed=WHITENING_SEED)
    data = build_retrieval_data(source, "train", model.text.tokenizer, preset)
    with torch.random.fork_rng(devices=[]):  # fitting on first use or reading the cache: the same later draws
        images, captions = encoder_features(model, data, progress=progress)
    tensors = {}
    for side, features in (("image", images), ("text", captions)):
        tensors[f"{side}.mean"], tensors[f"{side}.matrix"] = whitening_statistics(features)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(tensors, metadata={"dataset": preset.dataset, "seed": str(WHITENING_SEED)}))
    return path


def pretrained_dual_encoder(preset, *, progress: bool = True) -> DualEncoder:
    """The dual encoder ``preset`` describes, as every command starts from it: image weights resolved (locally
    pretrained ones made on first use) and, with ``whiten_features``, each encoder ended by its fixed feature
    whitening (fitted on first use), part of the 'pretrained' state that resets return to."""
    weights = resolve_image_weights(preset.image_encoder, preset.image_size, preset.image_weights, progress=progress,
                                    model_kwargs=preset.image_model_kwargs())  # fmt: skip
    model = build_dual_encoder(preset, image_weights=weights)
    if preset.whiten_features:
        statistics = load_file(str(ensure_whitening(model, preset, progress=progress)))
        model.image.whitening = FeatureWhitening(statistics["image.mean"], statistics["image.matrix"])
        model.text.whitening = FeatureWhitening(statistics["text.mean"], statistics["text.matrix"])
        model.snapshot_pretrained()
    return model


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covmatch.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(_PRETRAINERS), default="shapes", help="embedded dataset")
    parser.add_argument("--encoder", default="test_nfnet", help="timm image encoder")
    parser.add_argument("--image-size", type=int, default=32, help="input resolution")
    parser.add_argument(
        "--steps", type=int, default=None, help="optimisation steps (default: the dataset's; for glyphs the family's)"
    )
    parser.add_argument(
        "--image-encoder-kwargs", default="", help="timm.create_model keyword arguments, 'key=value, ...'"
    )
    parser.add_argument("--out", type=Path, default=None, help="output .safetensors (default: the cache path)")
    args = parser.parse_args(argv)
    try:
        kwargs = parse_model_kwargs(args.image_encoder_kwargs, "--image-encoder-kwargs")
        if args.dataset == "glyphs":
            encoder_family(args.encoder)
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    out = args.out or default_cache_path(args.encoder, args.image_size, kwargs, args.dataset)
    steps = {} if args.steps is None else {"steps": args.steps}
    print(_PRETRAINERS[args.dataset](args.encoder, args.image_size, out, model_kwargs=kwargs, **steps))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
