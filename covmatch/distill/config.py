"""Settings of one distillation run: a preset plus what the command line says about this run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from covmatch.errors import ConfigError
from covmatch.presets import Preset, get_preset

__all__ = ["DistillConfig", "ONLINE_MODES", "DISTILL_MODES", "PRECISIONS"]

ONLINE_MODES = ("real", "synthetic", "fixed")
DISTILL_MODES = ("both", "images", "texts")
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class DistillConfig:
    """Everything a run needs. Hyperparameters left as None on the preset resolve by N (DESIGN 1.1)."""

    preset: Preset = field(default_factory=lambda: get_preset("demo"))
    out: Optional[Path] = None
    seed: int = 0
    device: str = "auto"
    save_every: int = 100
    log_every: int = 10
    keep_checkpoints: int = 3
    syn_chunk: Optional[int] = None
    precision: str = "fp32"
    grad_checkpointing: bool = False
    channels_last: bool = False  # NHWC image encoder (GPU convolution speed; same result up to rounding)
    frozen_text: bool = False
    online: Optional[str] = None  # None: the preset's (Preset.online)
    distill_mode: str = "both"
    workers: int = 0
    loss_backend: str = "auto"
    zero: int = 0  # 0: plain PyTorch; 1-3: DeepSpeed ZeRO stage of the online model
    deepspeed_config: Optional[Path] = None  # a user's DeepSpeed JSON, merged over the one built from flags
    grad_clip: float = 0.0  # online model: clip the gradient norm (0: off)
    ann_root: Optional[Path] = None
    image_root: Optional[Path] = None
    validate_data: bool = False
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    grid_every_save: bool = True

    def __post_init__(self) -> None:
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
        """Contradictions and out-of-range values, each reported as one ConfigError line."""
        p = self.preset
        positive = {
            "--num-pairs": p.num_pairs,
            "--real-batch": p.real_batch,
            "--syn-batch": p.syn_batch,
            "--reset-every": p.reset_every,
            "--save-every": self.save_every,
            "--log-every": self.log_every,
            "--keep-checkpoints": self.keep_checkpoints,
        }
        for flag, value in positive.items():
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if p.num_pairs < 2:
            raise ConfigError(f"--num-pairs must be >= 2 (a covariance needs two samples), got {p.num_pairs}")
        if p.real_batch < 2:
            raise ConfigError(f"--real-batch must be >= 2 (a covariance needs two samples), got {p.real_batch}")
        if min(p.syn_batch, p.num_pairs) < 2:
            raise ConfigError(f"--syn-batch must be >= 2, got {p.syn_batch}")
        if p.iterations is not None and p.iterations < 0:
            raise ConfigError(f"--iterations must be >= 0, got {p.iterations}")
        if self.syn_chunk is not None and self.syn_chunk < 1:
            raise ConfigError(f"--syn-chunk must be >= 1, got {self.syn_chunk}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.online not in ONLINE_MODES:
            raise ConfigError(f"--online must be one of {ONLINE_MODES}, got {self.online!r}")
        if self.distill_mode not in DISTILL_MODES:
            raise ConfigError(f"--distill must be one of {DISTILL_MODES}, got {self.distill_mode!r}")
        for name in ("lr_img", "lr_txt", "online_lr_encoder", "online_lr_proj"):
            if getattr(p, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(p, name)}")
        if p.rho is not None and p.rho <= 0:
            raise ConfigError(f"--rho must be > 0, got {p.rho}")
        if p.lam is not None and p.lam < 0:
            raise ConfigError(f"--lam must be >= 0, got {p.lam}")
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.deepspeed_config is not None and self.zero == 0:
            raise ConfigError("--deepspeed-config needs --zero 1, 2 or 3 (0 is plain PyTorch)")
        if self.grad_clip < 0:
            raise ConfigError(f"--grad-clip must be >= 0, got {self.grad_clip}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other; pick one")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["preset"] = self.preset.to_dict()
        for key in ("out", "ann_root", "image_root", "deepspeed_config"):
            d[key] = str(d[key]) if d[key] is not None else None
        d["resolved"] = {"rho": self.rho, "lam": self.lam, "iterations": self.iterations}
        return d
