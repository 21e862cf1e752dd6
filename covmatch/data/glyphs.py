"""A second embedded dataset: scenes of 2-4 named glyphs, with captions made of their names.

The concepts are glyphs of DejaVu Sans, the font matplotlib ships, whose Unicode names are real words ("snowman",
"anchor", "filled star", "rightwards arrow", "alpha"). A scene is 2-4 of them, each coloured, scaled and rotated,
at distinct places of a jittered 3 x 3 grid, over a coloured background with a little clutter (thin lines and
dots); its five captions name the glyphs, in a random order, each in a different wording. Colours, places and
backgrounds vary in the images but no caption says them: every scene has one of each, so each would be a
high-variance direction shared by image and text, and a dozen of them would hold most of the image-text
cross-covariance (as they did in a first design whose captions said them: 95 % of its energy in 4 directions),
leaving the many concepts a small share of what a covariance-matching method matches. There is no single label
to balance on: a scene has several concepts, and in train their frequencies are Zipf-skewed (a few glyphs
common, most rare; frequency ~ 1 / rank^0.5, the most common 15 times as frequent as the rarest: with the
steeper 1 / rank^1.1 of word frequencies, a covariance's energy, which grows with the square of a concept's
variance, would sit in a dozen concepts), while val and test draw them uniformly.

The eligible glyphs (renderable, names of at most ``MAX_NAME_WORDS`` words, no name twice) are split once, from a
fixed seed, into disjoint sets: ``benchmark`` (what the scenes show) and ``pretrain_a`` .. ``pretrain_c`` (what
image encoders of three families are pretrained on), so that pretrained features are generic visual features,
not the benchmark's labels. Everything is generated from a seed in seconds; nothing is downloaded.
"""

from __future__ import annotations

import functools
import math
import random
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

from covmatch._version import __version__

from .captions import preprocess_caption
from .generated import GeneratedSource

__all__ = [
    "CONCEPT_SETS", "GLYPH_COLOURS", "Glyph", "GlyphSpec", "GlyphScene", "GlyphsSource", "concept_sets",
    "glyph_vocabulary",
]  # fmt: skip

# Unicode blocks the glyphs come from: Greek letters, currency, letterlike symbols, arrows, mathematical
# operators, technical symbols, geometric shapes, miscellaneous symbols, dingbats.
GLYPH_RANGES = ((0x0391, 0x03A9), (0x03B1, 0x03C9), (0x20A0, 0x20BF), (0x2100, 0x214F), (0x2190, 0x21FF),
                (0x2200, 0x22FF), (0x2300, 0x23FF), (0x25A0, 0x25FF), (0x2600, 0x26FF), (0x2700, 0x27BF))  # fmt: skip
MAX_NAME_WORDS = 4
# concept set: size (the benchmark's own first; the rest are the pretraining sets of three encoder families)
CONCEPT_SETS = {"benchmark": 240, "pretrain_a": 175, "pretrain_b": 175, "pretrain_c": 175}
CONCEPT_SEED = "covmatch-glyphs/concepts/v1"
GLYPH_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (225, 45, 45),
    "green": (50, 180, 70),
    "blue": (60, 110, 240),
    "yellow": (240, 215, 50),
    "purple": (160, 80, 210),
    "orange": (250, 145, 35),
    "cyan": (60, 210, 220),
    "pink": (245, 130, 190),
}
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "black": (14, 14, 14),
    "grey": (95, 95, 95),
    "brown": (85, 55, 32),
    "navy": (20, 28, 75),
}
ZIPF_EXPONENT = 0.5  # train concept frequencies ~ 1 / rank^s
SIZE_RANGE = (0.26, 0.38)  # glyph height as a fraction of the image
MAX_ROTATION = 30.0  # degrees either way
CAPTIONS_PER_IMAGE = 5
# wordings of a caption: each names every glyph of the scene and says nothing else about it
CAPTION_TEMPLATES = ("{}", "a picture of {}", "symbols: {}", "an image showing {}", "glyphs of {}",
                     "a drawing with {}", "{} drawn together")  # fmt: skip
OBJECTS_PER_SCENE = (2, 3, 3, 4)  # drawn uniformly from these
CELLS = tuple((x, y) for x in range(3) for y in range(3))  # the 3 x 3 grid a scene places its glyphs on


@dataclass(frozen=True)
class Glyph:
    """A concept: one code point and the words that name it."""

    codepoint: int
    name: str


@dataclass(frozen=True)
class GlyphSpec:
    """One glyph of a scene: the concept, its colour, height (fraction of the image), rotation (degrees) and
    centre in [0, 1]^2, and its cell of the 3 x 3 grid."""

    glyph: Glyph
    colour: str
    size: float
    rotation: float
    cx: float
    cy: float
    cell: Tuple[int, int]


@dataclass(frozen=True)
class GlyphScene:
    key: str
    background: str
    objects: Tuple[GlyphSpec, ...]
    clutter_seed: int


def _font_path() -> str:
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")


@functools.lru_cache(maxsize=8)
def _font(pixels: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(_font_path(), pixels)


def _concept_name(unicode_name: str) -> str:
    """Words for a glyph: lower case, hyphens as spaces, 'black'/'white' as 'filled'/'outlined' (colours are
    the scene's), Greek letters by their names alone."""
    words = unicode_name.lower().replace("-", " ").split()
    if words[:3] == ["greek", "small", "letter"]:
        words = words[3:]
    elif words[:3] == ["greek", "capital", "letter"]:
        words = ["capital", *words[3:]]
    if words and words[0] == "dingbat":
        words = words[1:]
    return " ".join({"black": "filled", "white": "outlined"}.get(w, w) for w in words)


@functools.lru_cache(maxsize=1)
def glyph_vocabulary() -> Tuple[Glyph, ...]:
    """Every eligible glyph: named in Unicode, drawn by DejaVu Sans (not its missing-glyph box, not nearly empty),
    a name of at most MAX_NAME_WORDS words that no other eligible glyph has."""
    font = _font(40)

    def mask(ch: str) -> bytes:
        img = Image.new("L", (48, 48), 0)
        ImageDraw.Draw(img).text((24, 24), ch, fill=255, font=font, anchor="mm")
        return img.tobytes()

    missing = mask("\ue000")
    found: Dict[str, Glyph] = {}
    seen_twice = set()
    for lo, hi in GLYPH_RANGES:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            name = unicodedata.name(ch, "")
            if not name:
                continue
            words = _concept_name(name)
            if not words or len(words.split()) > MAX_NAME_WORDS:
                continue
            drawn = mask(ch)
            if drawn == missing or sum(drawn) < 255 * 25:
                continue
            if words in found:
                seen_twice.add(words)
                continue
            found[words] = Glyph(cp, words)
    return tuple(g for name, g in found.items() if name not in seen_twice)


@functools.lru_cache(maxsize=1)
def concept_sets() -> Dict[str, Tuple[Glyph, ...]]:
    """The eligible glyphs split into the disjoint CONCEPT_SETS, from a fixed seed."""
    glyphs = list(glyph_vocabulary())
    needed = sum(CONCEPT_SETS.values())
    if len(glyphs) < needed:
        raise RuntimeError(f"DejaVu Sans offers {len(glyphs)} eligible glyphs, the concept sets need {needed}")
    random.Random(CONCEPT_SEED).shuffle(glyphs)
    out, start = {}, 0
    for name, size in CONCEPT_SETS.items():
        out[name] = tuple(sorted(glyphs[start : start + size], key=lambda g: g.codepoint))
        start += size
    return out


def _listing(items: Sequence[str]) -> str:
    return ", ".join(items[:-1]) + f" and {items[-1]}" if len(items) > 1 else items[0]


def _captions(scene: GlyphScene, rng: random.Random) -> List[str]:
    """Five different wordings, each naming the scene's glyphs in a random order of its own."""
    names = [o.glyph.name for o in scene.objects]
    captions = []
    for template in rng.sample(CAPTION_TEMPLATES, CAPTIONS_PER_IMAGE):
        rng.shuffle(names)
        captions.append(preprocess_caption(template.format(_listing(names))))
    return captions


class GlyphsSource(GeneratedSource):
    """The glyph scenes of one concept set (``concepts``: 'benchmark', or a pretraining set), deterministic from
    ``seed``; images rendered at ``render_size`` pixels; each scene shows one of ``objects_per_scene`` glyphs
    (drawn uniformly from the tuple); train concept frequencies ~ 1 / rank^``zipf_exponent`` (0: uniform)."""

    name = "glyphs"

    def __init__(
        self,
        seed: int = 0,
        *,
        num_train_images: int = 10_000,
        num_val_images: int = 1_000,
        num_test_images: int = 1_000,
        render_size: int = 64,
        concepts: str = "benchmark",
        objects_per_scene: Sequence[int] = OBJECTS_PER_SCENE,
        zipf_exponent: float = ZIPF_EXPONENT,
    ) -> None:
        super().__init__({"train": num_train_images, "val": num_val_images, "test": num_test_images})
        if concepts not in CONCEPT_SETS:
            raise ValueError(f"concepts must be one of {', '.join(CONCEPT_SETS)}, got {concepts!r}")
        if not objects_per_scene or not all(1 <= n <= len(CELLS) for n in objects_per_scene):
            raise ValueError(f"objects_per_scene must be counts from 1 to {len(CELLS)}, got {objects_per_scene!r}")
        self.seed = seed
        self.objects_per_scene = tuple(objects_per_scene)
        self.zipf_exponent = zipf_exponent
        self.render_size = render_size
        self.concepts = concepts
        self.glyphs = concept_sets()[concepts]
        # a fixed random order of the concepts ranks them for the Zipf-skewed train frequencies
        ranked = list(self.glyphs)
        random.Random(f"{CONCEPT_SEED}/rank/{concepts}").shuffle(ranked)
        self.ranked = tuple(ranked)
        self.train_weights = tuple(1.0 / (rank + 1) ** zipf_exponent for rank in range(len(ranked)))

    def _make_split(self, split: str):
        rng = random.Random(f"covmatch-glyphs/{self.concepts}/{self.seed}/{split}")
        weights = self.train_weights if split == "train" else None
        scenes, captions = [], []
        for i in range(self.sizes[split]):
            n_objects = rng.choice(self.objects_per_scene)
            glyphs: List[Glyph] = []
            while len(glyphs) < n_objects:  # distinct concepts in a scene
                g = rng.choices(self.ranked, weights=weights)[0]
                if g not in glyphs:
                    glyphs.append(g)
            cells = rng.sample(CELLS, n_objects)
            colours = rng.sample(sorted(GLYPH_COLOURS), n_objects)
            objects = []
            for g, cell, colour in zip(glyphs, cells, colours):
                cx = (cell[0] + 0.5 + rng.uniform(-0.12, 0.12)) / 3
                cy = (cell[1] + 0.5 + rng.uniform(-0.12, 0.12)) / 3
                size = rng.uniform(*SIZE_RANGE)
                rotation = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
                objects.append(GlyphSpec(g, colour, round(size, 4), round(rotation, 2), round(cx, 4), round(cy, 4),
                                         cell))  # fmt: skip
            scene = GlyphScene(f"glyphs/{self.concepts}/{split}/{i:06d}.png", rng.choice(sorted(BACKGROUNDS)),
                               tuple(objects), rng.randrange(2**31))  # fmt: skip
            scenes.append(scene)
            captions.append(_captions(scene, rng))
        return scenes, captions

    def concepts_of(self, key: str) -> Tuple[str, ...]:
        """The names of the glyphs a scene shows (for concept-cover selections)."""
        return tuple(o.glyph.name for o in self.scene(key).objects)

    def label(self, key: str) -> str:
        """A class for class-balanced sampling: the scene's most frequent concept in train (the dataset has no
        single label; this makes 'class-balanced' the balanced cover of the common concepts)."""
        rank = {g: r for r, g in enumerate(self.ranked)}
        return min(self.scene(key).objects, key=lambda o: rank[o.glyph]).glyph.name

    def load_image(self, key: str) -> Image.Image:
        scene = self.scene(key)
        big = 2 * self.render_size  # render at 2x and downsample: smooth edges at small sizes
        img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
        _clutter(ImageDraw.Draw(img), random.Random(scene.clutter_seed), big)
        for o in scene.objects:
            _paste_glyph(img, o, big)
        return img.resize((self.render_size, self.render_size), Image.BILINEAR)

    def fingerprint(self, keys: Sequence[str]) -> Dict[str, object]:
        """Generated from a seed: the seed, the split sizes, the render size, the concept set, the generator."""
        return {"seed": self.seed, "sizes": dict(self.sizes), "render_size": self.render_size,
                "concepts": self.concepts, "objects_per_scene": list(self.objects_per_scene),
                "zipf_exponent": self.zipf_exponent,
                "generator": __version__}  # fmt: skip


def _clutter(draw: ImageDraw.ImageDraw, rng: random.Random, size: int) -> None:
    """A few thin lines and dots in muted colours: distractors that are no concept."""
    for _ in range(rng.randrange(0, 4)):
        shade = tuple(int(c * 0.55) for c in rng.choice(list(GLYPH_COLOURS.values())))
        points = [(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(2)]
        draw.line(points, fill=shade, width=max(1, size // 64))
    for _ in range(rng.randrange(0, 6)):
        shade = tuple(int(c * 0.55) for c in rng.choice(list(GLYPH_COLOURS.values())))
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), size / 80
        draw.ellipse([x - r, y - r, x + r, y + r], fill=shade)


def _paste_glyph(img: Image.Image, o: GlyphSpec, size: int) -> None:
    """The glyph's mask drawn at its height, rotated about its centre, filled with its colour."""
    pixels = max(4, int(round(o.size * size)))
    side = int(math.ceil(pixels * 1.5))
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).text((side / 2, side / 2), chr(o.glyph.codepoint), fill=255, font=_font(pixels), anchor="mm")
    mask = mask.rotate(o.rotation, resample=Image.BILINEAR)
    solid = Image.new("RGB", (side, side), GLYPH_COLOURS[o.colour])
    img.paste(solid, (int(o.cx * size - side / 2), int(o.cy * size - side / 2)), mask)


def concept_frequencies(source: GlyphsSource, split: str = "train") -> Dict[str, int]:
    """How many scenes of a split show each concept."""
    counts: Dict[str, int] = {g.name: 0 for g in source.glyphs}
    for scene in source.scenes(split):
        for o in scene.objects:
            counts[o.glyph.name] += 1
    return counts
