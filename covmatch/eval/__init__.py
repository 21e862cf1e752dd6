"""Evaluation: retrieval recall, the training protocol (docs/design.md, *Evaluation protocol*), coreset baselines,
the Python entry point ``evaluate(EvalConfig)`` and ``covmatch-eval``.

Only ``metrics`` is imported eagerly (``covmatch.retrieval_recall``); ``EvalConfig`` and ``evaluate`` load the
encoders' stack (timm, transformers) on first use.
"""

from typing import Any

from .metrics import metric_keys, retrieval_recall

__all__ = ["EvalConfig", "evaluate", "metric_keys", "retrieval_recall"]


def __getattr__(name: str) -> Any:
    if name == "EvalConfig":
        from .config import EvalConfig

        return EvalConfig
    if name == "evaluate":
        from .runner import evaluate

        return evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
