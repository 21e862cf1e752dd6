"""What an evaluation trains on: a saved synthetic set (its captions carried over to another text encoder
when the evaluation uses one) or a coreset of real pairs (chosen in the pretrained encoders' features)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import torch
from tqdm.auto import tqdm

from covmatch.data import tokenize_captions
from covmatch.data.build import build_train_dataset
from covmatch.data.datasets import CLIP_MEAN, CLIP_STD, image_transform
from covmatch.errors import CheckpointError, ConfigError
from covmatch.models.text import model_not_found_errors, resolve_text_encoder_path
from covmatch.synthetic import SyntheticSet
from covmatch.visualize import decode_token_ids

from .coresets import pair_features, select_coreset
from .protocol import RealTrainSet, SyntheticTrainSet

__all__ = ["load_synthetic_for", "carry_captions", "synthetic_train_set", "coreset_features", "coreset_train_set"]


def load_synthetic_for(directory: Path, preset) -> SyntheticSet:
    """The synthetic set, checked against what the preset fixes (pixel space, caption length) before any
    encoder is built; the encoders themselves may differ (cross-architecture evaluation)."""
    if not Path(directory).is_dir() or not any(Path(directory).iterdir()):
        raise CheckpointError(f"--synthetic {directory}: empty or missing directory (expected synthetic.safetensors)")
    expect = {
        "image_size": preset.image_size,
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
        "seq_len": preset.seq_len,
    }
    return SyntheticSet.load(directory, expect=expect)


def carry_captions(syn: SyntheticSet, text_encoder, seq_len: int, *, where: str) -> SyntheticSet:
    """The set with its captions read by another text encoder: each caption's nearest vocabulary tokens in
    the distilling encoder's table (saved with the set) are decoded with the distilling tokenizer,
    re-tokenised and embedded by ``text_encoder``."""
    from transformers import AutoTokenizer

    saved_text = syn.metadata.get("text_encoder")
    if syn.nearest_token_ids is None:
        raise ConfigError(
            f"{where}: made for text encoder {saved_text!r} and saved without nearest_token_ids, so its captions "
            f"cannot be mapped to {text_encoder.name!r}"
        )
    tokenizer_name = syn.metadata.get("tokenizer") or saved_text
    try:
        source_tokenizer = AutoTokenizer.from_pretrained(
            resolve_text_encoder_path(tokenizer_name), local_files_only=True
        )
    except model_not_found_errors():
        raise ConfigError(f"{where}: its tokenizer {tokenizer_name!r} is not available locally") from None
    texts = decode_token_ids(syn.nearest_token_ids, syn.attention_mask, source_tokenizer)
    ids, mask = tokenize_captions(text_encoder.tokenizer, texts, seq_len)
    with torch.no_grad():
        embeds = text_encoder.embed(ids).float()
    return SyntheticSet(syn.images, embeds, mask, dict(syn.metadata, mapped_from=saved_text))


def synthetic_train_set(
    syn: SyntheticSet, model, seq_len: int, *, frozen_text: bool, where: str
) -> Tuple[SyntheticSet, SyntheticTrainSet, bool]:
    """(the set as trained on, its batches, whether the text encoder is frozen). Captions as token
    embeddings train with the text encoder trainable or, with ``frozen_text``, frozen (it still reads them);
    captions learnt as text features (``--text-features``) skip the text encoder, so it is frozen and must
    be the one they were distilled with."""
    saved_text = syn.metadata.get("text_encoder")
    if syn.metadata.get("text_mode") == "features":
        if syn.text_features is None:
            raise ConfigError(f"{where}: its metadata says text features, but it holds none")
        if saved_text != model.text.name:
            raise ConfigError(
                f"{where}: its captions are features of {saved_text!r}; they cannot be used with "
                f"text encoder {model.text.name!r}"
            )
        return syn, SyntheticTrainSet(syn, use_text_features=True), True
    if saved_text != model.text.name:
        syn = carry_captions(syn, model.text, seq_len, where=where)
    return syn, SyntheticTrainSet(syn), frozen_text


@torch.no_grad()
def coreset_features(
    model, dataset, source, indices: List[int], device, *, image_size: int, seed: int, progress: bool
) -> torch.Tensor:
    """Pair features (normalised image ++ normalised text) of ``indices`` at the pretrained encoders, images
    through the evaluation transform."""
    plain = image_transform(image_size, train=False, mean=CLIP_MEAN, std=CLIP_STD)
    model.reset(torch.Generator().manual_seed(seed))
    model.to(device).eval()
    feats = []
    for s in tqdm(range(0, len(indices), 256), desc="coreset features", leave=False, disable=not progress):
        chunk = indices[s : s + 256]
        pixels = torch.stack([plain(source.load_image(dataset.pairs[i][0])) for i in chunk]).to(device)
        ids, mask = dataset.input_ids[chunk].to(device), dataset.attention_mask[chunk].to(device)
        feats.append(pair_features(model.image(pixels), model.text.encode_ids(ids, mask)).cpu())
    return torch.cat(feats)


def coreset_train_set(
    method: str, n: int, model, source, preset, device, *, seed: int, workers: int, progress: bool
) -> Tuple[List[int], RealTrainSet]:
    """The coreset's pair indices into the train split, and its batches."""
    dataset = build_train_dataset(source, model.text.tokenizer, preset, augment=True)

    def encode(indices: List[int]) -> torch.Tensor:
        return coreset_features(
            model, dataset, source, indices, device, image_size=preset.image_size, seed=seed, progress=progress
        )

    indices = select_coreset(method, dataset.pairs, n, seed, encode=encode, label=getattr(source, "label", None),
                             concepts=getattr(source, "concepts_of", None))  # fmt: skip
    return indices, RealTrainSet(dataset, indices, workers=workers)
