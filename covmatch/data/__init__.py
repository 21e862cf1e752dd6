"""Data: caption preprocessing, the Karpathy (Flickr30K/COCO) loader, the embedded datasets (shapes, glyph scenes)."""

from .captions import preprocess_caption, tokenize_captions
from .datasets import CLIP_MEAN, CLIP_STD, ImageDataset, PairDataset, image_transform
from .generated import GENERATED_DATASETS
from .glyphs import GlyphsSource
from .shapes import ShapesSource
from .sources import ImageTextSource, KarpathySource, RetrievalSplit

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "GENERATED_DATASETS",
    "GlyphsSource",
    "ImageDataset",
    "ImageTextSource",
    "KarpathySource",
    "PairDataset",
    "RetrievalSplit",
    "ShapesSource",
    "image_transform",
    "preprocess_caption",
    "tokenize_captions",
]
