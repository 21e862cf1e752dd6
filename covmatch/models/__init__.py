"""Encoders and the dual-encoder model (timm image encoders, transformers text encoders)."""

from .dual import DualEncoder, Projection, info_nce
from .image import GLYPHS_PRETRAINED, LOCALLY_PRETRAINED, SHAPES_PRETRAINED, ImageEncoder
from .text import PACKAGED_TEXT_ENCODERS, TextEncoder, resolve_text_encoder_path
from .weights import load_weights_into, read_state_dict
from .whitening import FeatureWhitening, whitening_statistics

__all__ = [
    "PACKAGED_TEXT_ENCODERS",
    "GLYPHS_PRETRAINED",
    "LOCALLY_PRETRAINED",
    "SHAPES_PRETRAINED",
    "DualEncoder",
    "FeatureWhitening",
    "ImageEncoder",
    "Projection",
    "TextEncoder",
    "build_dual_encoder",
    "info_nce",
    "load_weights_into",
    "read_state_dict",
    "resolve_text_encoder_path",
    "whitening_statistics",
]


def build_dual_encoder(preset, *, image_encoder=None, text_encoder=None, image_weights=None) -> DualEncoder:
    """The dual encoder a preset describes (encoder names and weights overridable, e.g. for cross-architecture
    evaluation); its current encoder weights become the 'pretrained' state that resets return to."""
    image = ImageEncoder.create(
        image_encoder or preset.image_encoder,
        image_size=preset.image_size,
        weights=image_weights if image_weights is not None else preset.image_weights,
        model_kwargs=preset.image_model_kwargs(),
    )
    text = TextEncoder.create(
        text_encoder or preset.text_encoder,
        num_layers=preset.text_layers,
        pooling=preset.text_pooling,
        random_init=preset.text_random_init,
        config_overrides=dict(preset.text_config_overrides),
    )
    text.check_seq_len(preset.seq_len)
    return DualEncoder(
        image,
        text,
        proj_dim=preset.proj_dim,
        proj_depth=preset.proj_depth,
        temperature=preset.temperature,
        learnable_temperature=preset.learnable_temperature,
    )
