"""Settings of one distillation run: a preset plus what the command line says about this run."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Tuple

from covmatch.errors import ConfigError
from covmatch.presets import Preset, get_preset
from covmatch.synthetic import INIT_METHODS

__all__ = [
    "DistillConfig",
    "ONLINE_MODES",
    "DISTILL_MODES",
    "PRECISIONS",
    "STEP_ORDERS",
    "REPORTERS",
    "CHECKPOINT_DIR",
    "RUN_OUTPUTS",
]

ONLINE_MODES = ("real", "synthetic", "fixed")
DISTILL_MODES = ("both", "images", "texts")
PRECISIONS = ("fp32", "fp16", "bf16")
STEP_ORDERS = ("paper", "loss-first")  # online update before the statistics (the paper's) or after them
REPORTERS = ("tensorboard", "wandb")  # --report-to: where log records go besides log.jsonl (always written)
# Preset fields that covmatch-distill sets by a flag of the same name (--lr-img sets lr_img).
PRESET_FLAG_FIELDS = (
    "dataset", "num_pairs", "iterations", "image_encoder", "image_weights", "image_encoder_kwargs", "text_encoder",
    "text_layers", "image_size", "seq_len", "proj_dim", "proj_depth", "text_pooling", "learnable_temperature",
    "real_batch", "syn_batch", "rho", "lam", "lr_img", "lr_txt", "syn_momentum", "reset_every", "online_lr_encoder",
    "online_lr_proj", "online_momentum", "normalize_loss",
)  # fmt: skip
PRESET_FLAGS = {name: f"--{name.replace('_', '-')}" for name in PRESET_FLAG_FIELDS}
CHECKPOINT_DIR = "checkpoints"
# What a run writes under --out (--overwrite removes exactly these).
RUN_OUTPUTS = (
    CHECKPOINT_DIR,
    "initial",  # the iteration-0 set: each run's paired baseline
    "grids",
    "tensorboard",
    "wandb",
    "log.jsonl",
    "config.json",
    "synthetic.safetensors",
    "synthetic.json",
)


@dataclass
class DistillConfig:
    """Everything a run needs. Hyperparameters left as None on the preset resolve by N (docs/design.md, *The loss*)."""

    preset: Preset = field(default_factory=lambda: get_preset("demo"))
    out: Optional[Path] = None
    seed: int = 0  # initial pairs, batches, resets
    data_seed: int = 0  # the embedded dataset's draw (evaluation uses the set's)
    device: str = "auto"
    save_every: int = 100
    log_every: int = 10
    keep_checkpoints: int = 3
    syn_chunk: Optional[int] = None
    precision: str = "fp32"
    grad_checkpointing: bool = False
    channels_last: bool = False  # NHWC image encoder (GPU convolution speed; same result up to rounding)
    frozen_text: bool = False  # the online text encoder is not trained
    text_features: bool = False  # prior work's regime: captions learnt as text features (needs frozen_text)
    online: Optional[str] = None  # None: the preset's (Preset.online)
    distill_mode: str = "both"
    step_order: str = "paper"  # see STEP_ORDERS
    init: str = "random"  # initial real pairs: random (the paper's) or balanced over classes (INIT_METHODS)
    target_augment: bool = False  # train augmentation on the real batch behind the covariance target
    # differentiable siamese augmentation of both matched batches (augment.py; 0 and 0: off, the paper's)
    dsa_shift: float = 0.0  # largest shift, as a fraction of the image side
    dsa_scale: float = 0.0  # largest relative zoom
    workers: int = 0
    loss_backend: str = "auto"
    zero: int = 0  # 0: plain PyTorch; 1-3: DeepSpeed ZeRO stage of the online model
    deepspeed_config: Optional[Path] = None  # a user's DeepSpeed JSON, merged over the one built from flags
    grad_clip: float = 0.0  # online model: clip the gradient norm (0: off)
    ann_root: Optional[Path] = None
    image_root: Optional[Path] = None
    data_dir: Optional[Path] = None  # --dataset hf
    validate_data: bool = False
    resume: bool = False  # continue from a checkpoint in --out; refuse when none can be resumed
    auto_resume: bool = False  # resume when --out has run files, start when it has none (preemptible jobs)
    overwrite: bool = False
    progress: bool = True
    grid_every_save: bool = True
    report_to: Tuple[str, ...] = ()  # any of REPORTERS

    def __post_init__(self) -> None:
        self.report_to = tuple(self.report_to)
        if self.online is None:
            self.online = self.preset.online
        self.check()

    @property
    def num_pairs(self) -> int:
        return self.preset.num_pairs

    @property
    def rho(self) -> float:
        return self.preset.resolved_rho()

    @property
    def lam(self) -> float:
        return self.preset.resolved_lam()

    @property
    def iterations(self) -> int:
        return self.preset.resolved_iterations()

    def check(self) -> None:
        """Out-of-range values and contradictions, each reported as one ConfigError line naming the flag."""
        self.preset.check(PRESET_FLAGS)
        for flag, value, low in (
            ("--seed", self.seed, 0),
            ("--data-seed", self.data_seed, 0),
            ("--save-every", self.save_every, 1),
            ("--log-every", self.log_every, 1),
            ("--keep-checkpoints", self.keep_checkpoints, 1),
            ("--workers", self.workers, 0),
        ):
            _check_int(flag, value, low)
        if self.syn_chunk is not None:
            _check_int("--syn-chunk", self.syn_chunk, 1)
        if not isinstance(self.grad_clip, (int, float)) or not math.isfinite(self.grad_clip) or self.grad_clip < 0:
            raise ConfigError(f"--grad-clip must be >= 0 and finite, got {self.grad_clip}")
        for flag, value, high in (("--dsa-shift", self.dsa_shift, 0.5), ("--dsa-scale", self.dsa_scale, 0.5)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= high:
                raise ConfigError(f"{flag} must be a number in [0, {high}], got {value!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.online not in ONLINE_MODES:
            raise ConfigError(f"--online must be one of {ONLINE_MODES}, got {self.online!r}")
        if self.text_features and not self.frozen_text:
            raise ConfigError("--text-features learns captions as features of a frozen text encoder: add --frozen-text")
        if self.step_order not in STEP_ORDERS:
            raise ConfigError(f"--step-order must be one of {', '.join(STEP_ORDERS)}, got {self.step_order!r}")
        if self.init not in INIT_METHODS:
            raise ConfigError(f"--init must be one of {', '.join(INIT_METHODS)}, got {self.init!r}")
        if self.distill_mode not in DISTILL_MODES:
            raise ConfigError(f"--distill must be one of {DISTILL_MODES}, got {self.distill_mode!r}")
        if self.loss_backend not in ("auto", "torch", "triton"):
            raise ConfigError(f"--loss-backend must be auto, torch or triton, got {self.loss_backend!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.deepspeed_config is not None and self.zero == 0:
            raise ConfigError("--deepspeed-config needs --zero 1, 2 or 3 (0 is plain PyTorch)")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other; pick one")
        if self.auto_resume and (self.resume or self.overwrite):
            other = "--resume" if self.resume else "--overwrite"
            raise ConfigError(f"--auto-resume and {other} contradict each other; pick one")
        if (self.resume or self.auto_resume) and self.out is None:
            raise ConfigError("--resume needs --out, the run to continue")
        for name in self.report_to:
            if name not in REPORTERS:
                raise ConfigError(f"--report-to: unknown destination {name!r}; choose from {', '.join(REPORTERS)}")
            if importlib.util.find_spec(name) is None:
                raise ConfigError(f"--report-to {name} needs the {name} package: pip install 'covmatch[logging]'")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["preset"] = self.preset.to_dict()
        for key in ("out", "ann_root", "image_root", "data_dir", "deepspeed_config"):
            d[key] = str(d[key]) if d[key] is not None else None
        d["resolved"] = {"rho": self.rho, "lam": self.lam, "iterations": self.iterations}
        return d


def _check_int(flag: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{flag} must be an integer, got {value!r}")
    if value < low:
        raise ConfigError(f"{flag} must be >= {low}, got {value}")
