"""The embedded default dataset: generated scenes of coloured shapes with five paraphrased captions each.

Nothing is downloaded: scenes are drawn from a seed, images rendered on demand with PIL, captions built
from each scene's attributes (colour, shape, size, position, background) and pairwise relations. Splits
mirror Flickr30K's Karpathy split in form (train entries one per caption; val/test 5 captions per image;
1,000 test images). The combinatorics (7 colours x 5 shapes x 2 sizes x positions, 1-3 objects, relations)
leave room for distillation to matter: 100 random pairs cover little of what the full split teaches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw

from covmatch._version import __version__

from .captions import preprocess_caption
from .generated import GeneratedSource

__all__ = ["ShapeSpec", "Scene", "ShapesSource", "COLOURS", "SHAPES"]

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 210, 45),
    "purple": (145, 60, 190),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
}
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "black": (12, 12, 12),
    "grey": (105, 105, 105),
    "brown": (95, 60, 35),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 0.2, "large": 0.36}  # side length as a fraction of the image
CAPTIONS_PER_IMAGE = 5


@dataclass(frozen=True)
class ShapeSpec:
    """One object: what it is, how big, and its centre in [0, 1]^2 image coordinates."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float

    def words(self) -> str:
        return f"{self.colour} {self.shape}"

    def position(self) -> str:
        horizontal = "on the left" if self.cx < 0.38 else "on the right" if self.cx > 0.62 else ""
        vertical = "at the top" if self.cy < 0.38 else "at the bottom" if self.cy > 0.62 else ""
        if horizontal and vertical:
            return f"{vertical} {horizontal.replace('on the ', '')}"
        return horizontal or vertical or "in the middle"


@dataclass(frozen=True)
class Scene:
    """A generated image: background and 1-3 objects; ``key`` names it like a file path."""

    key: str
    background: str
    objects: Tuple[ShapeSpec, ...]


def _relation(a: ShapeSpec, b: ShapeSpec) -> str:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _one(o: ShapeSpec) -> str:
    return f"{_article(o.size)} {o.size} {o.words()}"


def _captions(scene: Scene, rng: random.Random) -> List[str]:
    """Five different paraphrases of the scene, in a scene-dependent order."""
    objs = list(scene.objects)
    bg = scene.background
    if len(objs) == 1:
        (o,) = objs
        pool = [
            f"{_one(o)} {o.position()}",
            f"there is {_article(o.colour)} {o.words()} {o.position()} on a {bg} background",
            f"a single {o.size} {o.shape} coloured {o.colour}",
            f"{_article(o.colour)} {o.words()} on {bg}",
            f"one {o.colour} {o.shape}, {o.size}, {o.position()}",
            f"a picture of {_article(o.size)} {o.size} {o.colour} {o.shape}",
        ]
    else:
        rng.shuffle(objs)
        a, b = objs[0], objs[1]
        names = [f"{_article(x.colour)} {x.words()}" for x in objs]
        listing = ", ".join(names[:-1]) + f" and {names[-1]}"
        count = "two" if len(objs) == 2 else "three"
        pool = [
            f"{names[0]} {_relation(a, b)} {names[1]}",
            f"{count} shapes: {listing}",
            f"{listing} on a {bg} background",
            f"{_one(a)} {a.position()} and {_one(b)} {b.position()}",
            f"{names[1]} {_relation(b, a)} {names[0]}",
            f"{count} shapes on {bg}, {_one(a)} and {_one(b)}",
        ]
        if len(objs) == 3:
            c = objs[2]
            pool[0] += f", with {_article(c.colour)} {c.words()} {c.position()}"
            pool[3] += f" and {_one(c)} {c.position()}"
    rng.shuffle(pool)
    return [preprocess_caption(c) for c in pool[:CAPTIONS_PER_IMAGE]]


def _draw(draw: ImageDraw.ImageDraw, o: ShapeSpec, size_px: int) -> None:
    side = SIZES[o.size] * size_px
    cx, cy, r = o.cx * size_px, o.cy * size_px, side / 2
    fill = COLOURS[o.colour]
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif o.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # cross
        t = r / 2.5
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)


class ShapesSource(GeneratedSource):
    """The generated dataset (deterministic from ``seed``); images rendered at ``render_size`` pixels."""

    name = "shapes"

    def __init__(
        self,
        seed: int = 0,
        *,
        num_train_images: int = 10_000,
        num_val_images: int = 1_000,
        num_test_images: int = 1_000,
        render_size: int = 64,
    ) -> None:
        super().__init__({"train": num_train_images, "val": num_val_images, "test": num_test_images})
        self.seed = seed
        self.render_size = render_size

    def _make_split(self, split: str) -> Tuple[List[Scene], List[List[str]]]:
        rng = random.Random(f"covmatch-shapes/{self.seed}/{split}")
        scenes, captions = [], []
        for i in range(self.sizes[split]):
            n_objects = rng.choice((1, 2, 2, 3))
            objects: List[ShapeSpec] = []
            while len(objects) < n_objects:
                size = rng.choice(tuple(SIZES))
                half = SIZES[size] / 2
                cx, cy = rng.uniform(half + 0.02, 0.98 - half), rng.uniform(half + 0.02, 0.98 - half)
                # keep objects apart so each stays visible and relations are unambiguous
                if any(max(abs(cx - o.cx), abs(cy - o.cy)) < half + SIZES[o.size] / 2 for o in objects):
                    continue
                colour = rng.choice([c for c in COLOURS if c not in {o.colour for o in objects}])
                objects.append(ShapeSpec(rng.choice(SHAPES), colour, size, round(cx, 4), round(cy, 4)))
            scene = Scene(f"shapes/{split}/{i:06d}.png", rng.choice(tuple(BACKGROUNDS)), tuple(objects))
            scenes.append(scene)
            captions.append(_captions(scene, rng))
        return scenes, captions

    def label(self, key: str) -> str:
        """The scene's class for class-balanced sampling: colour and shape of its first object."""
        first = self.scene(key).objects[0]
        return f"{first.colour} {first.shape}"

    def concepts_of(self, key: str) -> Tuple[str, ...]:
        """The colour-shape combinations a scene shows (for concept-cover selections)."""
        return tuple(f"{o.colour} {o.shape}" for o in self.scene(key).objects)

    def load_image(self, key: str) -> Image.Image:
        scene = self.scene(key)
        # Render at 2x and downsample: smooth edges at small sizes.
        big = 2 * self.render_size
        img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
        draw = ImageDraw.Draw(img)
        for o in scene.objects:
            _draw(draw, o, big)
        return img.resize((self.render_size, self.render_size), Image.BILINEAR)

    def fingerprint(self, keys: Sequence[str]) -> Dict[str, object]:
        """Generated from a seed: the seed, the split sizes, the render size and the generator's version."""
        return {"seed": self.seed, "sizes": dict(self.sizes), "render_size": self.render_size,
                "generator": __version__}  # fmt: skip
