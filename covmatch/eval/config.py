"""Settings of one evaluation: a preset (its encoders, data and training protocol) plus what to train on and
where to score. Each field declares its help, range and flag group (``covmatch.settings``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from covmatch.errors import ConfigError
from covmatch.presets import Preset, get_preset
from covmatch.settings import CommonSettings, at_least, check_settings, coerce_paths, setting

from .coresets import CORESETS

__all__ = ["EvalConfig", "WHAT", "PROTOCOL", "SPLITS", "TRAINED", "RESAMPLED"]

WHAT, PROTOCOL = "what to evaluate", "evaluation"  # --help groups of covmatch-eval's own flags
SPLITS = ("test", "val")
TRAINED = ("all", "projections")
RESAMPLED = ("random", "balanced", "cover")  # coresets drawn anew for each evaluation run


@dataclass
class EvalConfig(CommonSettings):
    """One evaluation of a synthetic set or a coreset baseline: ``preset.eval_runs`` fresh dual encoders trained
    with the preset's protocol (``eval_*`` fields) and scored on ``split``. Give exactly one of ``synthetic`` and
    ``coreset``; ``preset.num_pairs`` is a coreset's N."""

    preset: Preset = field(default_factory=lambda: get_preset("demo"))
    synthetic: Optional[Path] = setting(
        None, group=WHAT, metavar="DIR", help="directory with synthetic.safetensors + synthetic.json"
    )
    coreset: Optional[str] = setting(
        None, group=WHAT, choices=CORESETS, help="baseline: N real pairs (or the full train split)"
    )
    out: Optional[Path] = setting(
        None, group=PROTOCOL, metavar="DIR", help="output directory (results.json, results.md, PNGs)"
    )
    overwrite: bool = setting(False, group=PROTOCOL, help="replace the results already in --out")
    seed: int = setting(0, group=PROTOCOL, range=at_least(0), help="seed of run 0 (run r uses seed + r)")
    data_seed: Optional[int] = setting(
        None, group=PROTOCOL, range=at_least(0), none="the synthetic set's, else 0",
        help="seed of the embedded dataset's draw",
    )  # fmt: skip
    allow_data_seed_mismatch: bool = setting(
        False, group=PROTOCOL, help="evaluate a set on another draw of the embedded dataset than it was distilled from"
    )
    select_on_val: bool = setting(False, group=PROTOCOL, help="report the epoch with the best val recall")
    split: str = setting("test", group=PROTOCOL, choices=SPLITS, help="split to score (val: for hyperparameter tuning)")
    frozen_text: bool = setting(
        False, group=PROTOCOL, help="do not train the text encoder (it still reads token embeddings)"
    )
    train: str = setting(
        "all", group=PROTOCOL, choices=TRAINED,
        help="what the fresh model trains: both encoders and the projections, or the projections alone (a linear "
        "probe on the frozen pretrained encoders)",
    )  # fmt: skip

    def __post_init__(self) -> None:
        coerce_paths(self)
        self.check()

    def check(self) -> None:
        """Out-of-range values and contradictions, each one ConfigError line naming the field."""
        self.preset.check()
        check_settings(self)
        if (self.synthetic is None) == (self.coreset is None):
            raise ConfigError("give exactly one of synthetic and coreset", field="synthetic", mentions=("coreset",))
        if self.split == "val" and self.select_on_val:
            raise ConfigError(
                "select_on_val with split val would select and score on the same split",
                field="select_on_val", mentions=("split",),
            )  # fmt: skip

    def to_dict(self) -> dict:
        d = asdict(self)
        d["preset"] = self.preset.to_dict()
        for key in ("out", "synthetic", "ann_root", "image_root", "data_dir", "data_cache"):
            d[key] = str(d[key]) if d[key] is not None else None
        return d
