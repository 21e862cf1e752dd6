"""Choosing real pairs: one caption per image, and class-balanced draws (data whose source has labels).

Shared by the distillation's initial set (``--init``) and the evaluation's coreset baselines, so the
"class-balanced" initial pairs of a distillation and the class-balanced coreset are drawn by the same rule.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from covmatch.errors import ConfigError

from .sources import pairs_by_image

__all__ = ["candidate_pairs", "class_balanced", "class_balanced_pairs"]


def candidate_pairs(pairs: Sequence[Tuple[str, str]], seed: int) -> List[int]:
    """One pair index per distinct image (a random caption of it), in image order."""
    gen = torch.Generator().manual_seed(seed)
    return [opts[int(torch.randint(len(opts), (1,), generator=gen))] for opts in pairs_by_image(pairs).values()]


def class_balanced(candidates: Sequence[int], labels: Sequence[str], n: int, seed: int) -> List[int]:
    """``n`` of ``candidates`` drawn at random, one class after another in turn (classes in sorted order), so
    class counts differ by at most one while a class has candidates left."""
    gen = torch.Generator().manual_seed(seed)
    groups: Dict[str, List[int]] = {}
    for i in torch.randperm(len(candidates), generator=gen).tolist():
        groups.setdefault(labels[i], []).append(candidates[i])
    queues = [groups[k] for k in sorted(groups)]
    picks: List[int] = []
    while len(picks) < n:
        for queue in queues:
            if queue and len(picks) < n:
                picks.append(queue.pop())
    return picks


def class_balanced_pairs(
    pairs: Sequence[Tuple[str, str]],
    candidates: Sequence[int],
    n: int,
    seed: int,
    label: Optional[Callable[[str], str]],
    flag: str,
) -> List[int]:
    """``n`` of ``candidates`` (indices into ``pairs``) balanced over ``label(image key)``; one ConfigError line
    naming ``flag`` when the data has no labels."""
    if label is None:
        raise ConfigError(f"{flag} needs class labels: the embedded dataset has them, this data has none")
    return class_balanced(candidates, [label(pairs[i][0]) for i in candidates], n, seed)
