"""CovMatch distillation: Algorithm 1 (``Distiller``), the Python entry point ``distill(config)``, and the
``covmatch-distill`` command (``covmatch.distill.cli``)."""

from covmatch.devices import resolve_device

from .config import DISTILL_MODES, ONLINE_MODES, PRECISIONS, DistillConfig
from .engine import Distiller, distill
from .objective import DistillObjective, Features, SyntheticBatch, synthetic_backward

__all__ = [
    "DISTILL_MODES",
    "ONLINE_MODES",
    "PRECISIONS",
    "DistillConfig",
    "DistillObjective",
    "Distiller",
    "Features",
    "SyntheticBatch",
    "distill",
    "resolve_device",
    "synthetic_backward",
]
