"""Evaluation: retrieval recall, the training protocol (docs/design.md, *Evaluation protocol*), coreset baselines,
``covmatch-eval``.

Only ``metrics`` is imported eagerly (``covmatch.retrieval_recall``); the rest loads with the command.
"""

from .metrics import metric_keys, retrieval_recall

__all__ = ["metric_keys", "retrieval_recall"]
