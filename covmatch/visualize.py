"""Looking at a synthetic set: image grids (PNG, with captions) and captions decoded back to words."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "decode_token_ids",
    "denormalize",
    "nearest_captions",
    "nearest_token_ids",
    "nearest_tokens",
    "save_image_grid",
]


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised pixels [N, 3, H, W] back to [0, 1] RGB (clamped)."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * s + m).clamp(0.0, 1.0)


def save_image_grid(
    images: torch.Tensor,
    path: Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    captions: Optional[Sequence[str]] = None,
    columns: int = 10,
    max_images: int = 100,
    title: Optional[str] = None,
) -> Path:
    """A PNG grid of (at most ``max_images``) de-normalised images, each with its caption underneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pics = denormalize(images[:max_images].detach().float().cpu(), mean, std)
    n = pics.shape[0]
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    cell_h = 2.1 if captions else 1.6
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, cell_h * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        ax.imshow(pics[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        if captions:
            # decoded tokens can be any script; the bundled font has Latin glyphs only
            text = captions[i].encode("ascii", "replace").decode()
            ax.set_title(_wrap(text, 22), fontsize=5, pad=2)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=150)
    plt.close(fig)
    tmp.replace(path)
    return path


def _wrap(text: str, width: int, max_lines: int = 3) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    return "\n".join(lines[:max_lines]) + ("…" if len(lines) > max_lines else "")


@torch.no_grad()
def nearest_token_ids(text_embeds: torch.Tensor, embedding_table: torch.Tensor) -> torch.Tensor:
    """[N, L] ids of the vocabulary tokens whose input embeddings are most cosine-similar, position by position."""
    table = F.normalize(embedding_table.detach().float(), dim=-1)
    ids = [
        (F.normalize(emb.to(table.device), dim=-1) @ table.t()).argmax(dim=-1) for emb in text_embeds.detach().float()
    ]
    return torch.stack(ids).cpu() if ids else torch.zeros(0, text_embeds.shape[1], dtype=torch.long)


def decode_token_ids(token_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer) -> List[str]:
    """Token ids to text, skipping masked positions and special tokens."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    out = []
    for ids, mask in zip(token_ids.tolist(), attention_mask.tolist()):
        kept = [t for t, m in zip(ids, mask) if m and t not in special]
        out.append(tokenizer.decode(kept).strip())
    return out


def nearest_tokens(
    text_embeds: torch.Tensor, attention_mask: torch.Tensor, embedding_table: torch.Tensor, tokenizer
) -> List[str]:
    """Each synthetic caption decoded position by position to the vocabulary token of highest cosine
    similarity in the input-embedding table (masked positions and special tokens skipped)."""
    return decode_token_ids(nearest_token_ids(text_embeds, embedding_table), attention_mask, tokenizer)


@torch.no_grad()
def nearest_captions(
    query_features: torch.Tensor, caption_features: torch.Tensor, captions: Sequence[str]
) -> List[str]:
    """For each query (synthetic caption features) the real caption whose features are most cosine-similar."""
    q = F.normalize(query_features.detach().float(), dim=-1)
    c = F.normalize(caption_features.detach().float().to(q.device), dim=-1)
    best = (q @ c.t()).argmax(dim=-1).tolist()
    return [captions[i] for i in best]
