"""Coreset baselines: N real pairs chosen at random, at random balanced over classes (data with labels, such
as the embedded datasets), as a greedy cover of the concepts the images show (data that names them, such as
the embedded datasets), by herding, or by k-center, or the full split.

Herding and k-center work in the pretrained encoders' feature space, each pair represented by its
L2-normalised image feature concatenated with its L2-normalised text feature. Candidates are one caption
per train image (drawn with the seed), so a coreset never holds two captions of one image.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from covmatch.data.sampling import candidate_pairs, class_balanced, class_balanced_pairs
from covmatch.errors import ConfigError

__all__ = ["CORESETS", "candidate_pairs", "class_balanced", "concept_cover", "herding", "k_center", "select_coreset"]

CORESETS = ("random", "balanced", "cover", "herding", "kcenter", "full")


def concept_cover(concepts: Sequence[Sequence[str]], n: int, seed: int) -> List[int]:
    """Greedy concept cover: each pick shows the most concepts that no pick shows yet (ties broken in a seeded
    random order); once every concept is shown the cover starts over, so picks beyond one cover show every
    concept again, rare ones included."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(concepts), generator=gen).tolist()
    shown: set = set()
    picks: List[int] = []
    while len(picks) < n and order:
        best = max(order, key=lambda i: len(set(concepts[i]) - shown))
        if shown and not set(concepts[best]) - shown:
            shown = set()  # every concept shown: start the next cover
            continue
        picks.append(best)
        order.remove(best)
        shown.update(concepts[best])
    return picks


def herding(features: torch.Tensor, n: int) -> List[int]:
    """Greedy herding (Welling 2009): each pick moves the running mean of picks closest to the full mean."""
    mu = features.mean(0)
    chosen: List[int] = []
    running = torch.zeros_like(mu)
    available = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
    for t in range(1, n + 1):
        target = mu * t - running  # what the t-th pick should contribute
        dist = (features - target).pow(2).sum(1).masked_fill(~available, float("inf"))
        i = int(dist.argmin())
        chosen.append(i)
        running += features[i]
        available[i] = False
    return chosen


def k_center(features: torch.Tensor, n: int, seed: int) -> List[int]:
    """Greedy k-center (farthest-first traversal) from a seeded random first centre."""
    gen = torch.Generator().manual_seed(seed)
    first = int(torch.randint(features.shape[0], (1,), generator=gen))
    chosen = [first]
    dist = (features - features[first]).pow(2).sum(1)
    for _ in range(n - 1):
        i = int(dist.argmax())
        chosen.append(i)
        dist = torch.minimum(dist, (features - features[i]).pow(2).sum(1))
    return chosen


def pair_features(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """[normalised image feature, normalised text feature] per pair."""
    return torch.cat([F.normalize(image_features.float(), dim=-1), F.normalize(text_features.float(), dim=-1)], 1)


def select_coreset(
    method: str,
    pairs: Sequence[Tuple[str, str]],
    n: int,
    seed: int,
    encode=None,
    label: Optional[Callable[[str], str]] = None,
    concepts: Optional[Callable[[str], Sequence[str]]] = None,
) -> List[int]:
    """Indices into ``pairs`` for a coreset of ``n`` pairs. ``encode(indices) -> [len, d]`` pair features
    (needed by herding and k-center) comes from the pretrained encoders; ``label(image key)`` gives the
    class that ``balanced`` balances over, ``concepts(image key)`` the concepts that ``cover`` covers."""
    if method not in CORESETS:
        raise ConfigError(f"unknown coreset {method!r}; choose one of {', '.join(CORESETS)}")
    if method == "full":
        return list(range(len(pairs)))
    candidates = candidate_pairs(pairs, seed)
    if n > len(candidates):
        raise ConfigError(f"--num-pairs {n} is larger than the train split ({len(candidates)} images)")
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        return [candidates[i] for i in torch.randperm(len(candidates), generator=gen)[:n].tolist()]
    if method == "balanced":
        return class_balanced_pairs(pairs, candidates, n, seed, label, "--coreset balanced")
    if method == "cover":
        if concepts is None:
            raise ConfigError("--coreset cover needs the concepts each image shows: the embedded datasets name them")
        picks = concept_cover([concepts(pairs[i][0]) for i in candidates], n, seed)
        return [candidates[i] for i in picks]
    feats = encode(candidates)
    picks = herding(feats, n) if method == "herding" else k_center(feats, n, seed)
    return [candidates[i] for i in picks]
