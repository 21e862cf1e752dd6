"""Cross-modal retrieval recall (docs/design.md, *Evaluation protocol*), computed in blocks so COCO's
5,000 x 25,010 scores never need to be held at once.

i2t: an image is a hit at K when any of its captions ranks in its top K; t2i: a caption is a hit when its
image ranks in its top K. Ties are broken pessimistically: a wrong item with the same score as the best
correct one ranks ahead of it.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F

__all__ = ["retrieval_recall", "metric_keys"]


def metric_keys(ks: Sequence[int] = (1, 5, 10)) -> list:
    """The result keys of ``retrieval_recall`` for ``ks``, in report order."""
    return [f"i2t_R@{k}" for k in ks] + [f"t2i_R@{k}" for k in ks] + ["mean"]


@torch.no_grad()
def retrieval_recall(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    block_size: int = 1024,
) -> Dict[str, float]:
    """Recall@K in percent for image→text and text→image retrieval, plus their mean.

    ``image_emb`` [n_img, d] and ``text_emb`` [n_txt, d] (any scale: cosine similarity is used);
    ``text_to_image`` LongTensor [n_txt], the image index of each caption (several captions per image).
    """
    if image_emb.dim() != 2 or text_emb.dim() != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"image_emb and text_emb must be [n, d] with the same d, got {tuple(image_emb.shape)} and "
            f"{tuple(text_emb.shape)}"
        )
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not torch.isfinite(emb).all():
            raise ValueError(f"{name} holds NaN or infinite values: recall of such embeddings is meaningless")
    owner = torch.as_tensor(text_to_image, device=text_emb.device).long()
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    if owner.shape != (n_txt,):
        raise ValueError(f"text_to_image must have one entry per caption ({n_txt}), got shape {tuple(owner.shape)}")
    if n_txt and (owner.min() < 0 or owner.max() >= n_img):
        raise ValueError(f"text_to_image holds image indices outside [0, {n_img})")
    counts = torch.bincount(owner, minlength=n_img)
    if (counts == 0).any():
        raise ValueError(f"image {int((counts == 0).nonzero()[0])} has no caption in text_to_image")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive ranks, got {tuple(ks)}")

    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float().to(img.device), dim=-1)
    owner = owner.to(img.device)
    ks_t = torch.tensor(list(ks), device=img.device)

    # i2t: wrong captions scoring >= the image's best correct caption.
    i2t_hits = torch.zeros(len(ks), device=img.device)
    for start in range(0, n_img, block_size):
        rows = torch.arange(start, min(n_img, start + block_size), device=img.device)
        scores = img[rows] @ txt.t()  # [B, n_txt]
        correct = owner[None, :] == rows[:, None]
        best = scores.masked_fill(~correct, float("-inf")).amax(dim=1)
        wrong_ahead = ((scores >= best[:, None]) & ~correct).sum(dim=1)
        i2t_hits += (wrong_ahead[:, None] < ks_t[None, :]).sum(dim=0)

    # t2i: other images scoring >= the caption's own image.
    t2i_hits = torch.zeros(len(ks), device=img.device)
    for start in range(0, n_txt, block_size):
        cols = slice(start, min(n_txt, start + block_size))
        scores = txt[cols] @ img.t()  # [B, n_img]
        own = scores.gather(1, owner[cols, None])
        others_ahead = (scores >= own).sum(dim=1) - 1
        t2i_hits += (others_ahead[:, None] < ks_t[None, :]).sum(dim=0)

    result = {}
    for j, k in enumerate(ks):
        result[f"i2t_R@{k}"] = 100.0 * float(i2t_hits[j]) / n_img
    for j, k in enumerate(ks):
        result[f"t2i_R@{k}"] = 100.0 * float(t2i_hits[j]) / n_txt
    result["mean"] = sum(result.values()) / (2 * len(ks))
    return result
