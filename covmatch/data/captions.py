"""Caption preprocessing of the BLIP/LoRS Karpathy pipeline and tokenisation to fixed length (docs/design.md,
*Data format*)."""

from __future__ import annotations

import re
from typing import Sequence, Tuple

import torch

__all__ = ["preprocess_caption", "tokenize_captions"]

_STRIP = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def preprocess_caption(caption: str, max_words: int = 30) -> str:
    """Lowercase, drop ``.!"()*#:;~``, collapse repeated spaces, keep at most ``max_words`` words."""
    text = _STRIP.sub(" ", caption.lower())
    text = _SPACES.sub(" ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


def tokenize_captions(tokenizer, captions: Sequence[str], seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, both [n, seq_len] int64, padded and truncated to ``seq_len``."""
    batch = tokenizer(
        list(captions),
        padding="max_length",
        truncation=True,
        max_length=seq_len,
        return_tensors="pt",
    )
    return batch["input_ids"].long(), batch["attention_mask"].long()
