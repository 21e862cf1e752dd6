"""Settings of one distillation run: a preset plus what the command line says about this run."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Tuple

from covmatch.errors import ConfigError
from covmatch.presets import DATA, ENCODERS, HYPERPARAMETERS, Preset, get_preset
from covmatch.settings import (
    PRECISIONS,
    CommonSettings,
    at_least,
    between,
    check_settings,
    coerce_paths,
    setting,
    settings_of,
)
from covmatch.synthetic import INIT_METHODS

__all__ = [
    "DistillConfig",
    "ONLINE_MODES",
    "DISTILL_MODES",
    "PRECISIONS",
    "STEP_ORDERS",
    "REPORTERS",
    "LOSS_BACKENDS",
    "PRESET_FLAG_FIELDS",
    "CHECKPOINT_DIR",
    "RUN_OUTPUTS",
]

ONLINE_MODES = ("real", "synthetic", "fixed")
DISTILL_MODES = ("both", "images", "texts")
STEP_ORDERS = ("paper", "loss-first")  # online update before the statistics (the paper's) or after them
REPORTERS = ("tensorboard", "wandb")  # --report-to: where log records go besides log.jsonl (always written)
LOSS_BACKENDS = ("auto", "torch", "triton")
# --help groups of covmatch-distill's own flags (the preset's are DATA, ENCODERS and HYPERPARAMETERS)
RUN, ABLATIONS, SPEED = "run", "ablations", "memory and speed"
# Preset fields covmatch-distill sets by a flag (--lr-img sets lr_img): those of these groups.
PRESET_FLAG_FIELDS = tuple(info.name for info in settings_of(Preset) if info.group in (DATA, ENCODERS, HYPERPARAMETERS))
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
class DistillConfig(CommonSettings):
    """Everything a run needs: a preset plus what the command line says about this run. Each field declares its
    help, range and flag group (``covmatch.settings``); hyperparameters left as None on the preset resolve by N
    (docs/design.md, *The loss*)."""

    preset: Preset = field(default_factory=lambda: get_preset("demo"))
    out: Optional[Path] = setting(
        None, group=RUN, metavar="DIR", help="output directory (required, here or in --config)"
    )
    seed: int = setting(0, group=RUN, range=at_least(0), help="seed of the initial pairs, the batches and the resets")
    data_seed: int = setting(
        0, group=RUN, range=at_least(0), help="seed of the embedded dataset's draw (covmatch-eval uses the set's)"
    )
    save_every: int = setting(
        100, metavar="K", group=RUN, range=at_least(1), help="checkpoint, result and image grid every K iterations"
    )
    log_every: int = setting(10, metavar="K", group=RUN, range=at_least(1), help="log line every K iterations")
    keep_checkpoints: int = setting(3, metavar="K", group=RUN, range=at_least(1), help="keep the newest K checkpoints")
    resume: bool = setting(
        False, group=RUN, help="continue from the newest valid checkpoint in --out (refused if none)"
    )
    auto_resume: bool = setting(
        False, group=RUN,
        help="resume when --out holds a run, start when it is empty, missing or stopped before its first checkpoint "
        "(preemptible jobs)",
    )  # fmt: skip
    overwrite: bool = setting(False, group=RUN, help="start over in an existing --out (removes its run files)")
    report_to: Tuple[str, ...] = setting(
        (), group=RUN, metavar="tensorboard,wandb",
        help="also log to tensorboard and/or wandb (comma-separated; wandb runs offline unless WANDB_MODE is set); "
        "log.jsonl is always written",
    )  # fmt: skip
    # data
    validate_data: bool = setting(False, group=DATA, help="open every image up front instead of lazily")
    target_augment: bool = setting(
        False, group=DATA,
        help="train augmentation on the real batch behind the covariance target (default: the evaluation "
        "transform, as synthetic and test images)",
    )  # fmt: skip
    dsa_shift: float = setting(
        0.0, group=DATA, range=between(0.0, 0.5),
        help="differentiable siamese augmentation (not in the paper): each iteration shift every matched image, "
        "synthetic and real, by up to this fraction of its side (0: off)",
    )  # fmt: skip
    dsa_scale: float = setting(
        0.0, group=DATA, range=between(0.0, 0.5),
        help="differentiable siamese augmentation: zoom every matched image by a factor in [1 - s, 1 + s] (0: off)",
    )  # fmt: skip
    # ablations of the paper
    frozen_text: bool = setting(
        False, group=ABLATIONS,
        help="do not train the online text encoder (captions stay token embeddings, differentiated through it)",
    )  # fmt: skip
    text_features: bool = setting(
        False, group=ABLATIONS,
        help="prior work's regime: learn captions as text features of the frozen text encoder (with --frozen-text)",
    )  # fmt: skip
    online: Optional[str] = setting(
        None, group=ABLATIONS, choices=ONLINE_MODES, none="the preset's",
        help="what the online model trains on: real data (Algorithm 1), the synthetic set, or nothing (fixed)",
    )  # fmt: skip
    distill_mode: str = setting(
        "both", group=ABLATIONS, flag="--distill", choices=DISTILL_MODES, help="which modality is distilled"
    )
    init: str = setting(
        "random", group=ABLATIONS, choices=INIT_METHODS,
        help="initial real pairs: random (the paper's) or balanced over the data's classes (embedded data)",
    )  # fmt: skip
    step_order: str = setting(
        "paper", group=ABLATIONS, choices=STEP_ORDERS,
        help="paper: the online model steps on its own real batch, then the statistics use the updated model; "
        "loss-first: the online step comes after the synthetic update, on the target's batch",
    )  # fmt: skip
    # memory and speed
    grad_checkpointing: bool = setting(False, group=SPEED, help="activation checkpointing in both encoders")
    channels_last: bool = setting(False, group=SPEED, help="NHWC image encoder (faster convolutions on GPUs)")
    syn_chunk: Optional[int] = setting(
        None, group=SPEED, range=at_least(1), metavar="K", none="one pass",
        help="exact two-pass gradient, K synthetic samples per pass",
    )  # fmt: skip
    zero: int = setting(
        0, group=SPEED, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage of the online model (0: plain PyTorch)"
    )
    deepspeed_config: Optional[Path] = setting(
        None, group=SPEED, metavar="FILE", help="DeepSpeed JSON merged over the config built from the flags"
    )
    grad_clip: float = setting(
        0.0, group=SPEED, range=at_least(0.0), help="online model: max gradient norm (0: no clipping)"
    )
    loss_backend: str = setting("auto", group=SPEED, choices=LOSS_BACKENDS, help="covmatch_loss backend")
    compile: bool = setting(
        False, group=SPEED,
        help="torch.compile both encoders (forward and backward, the synthetic pass to pixels and token embeddings)",
    )  # fmt: skip
    cuda_graphs: bool = setting(
        False, group=SPEED,
        help="with --compile: capture the compiled encoders in CUDA graphs (mode reduce-overhead; CUDA only)",
    )  # fmt: skip
    grid_every_save: bool = True  # an image grid with each checkpoint (the tests turn it off)

    def __post_init__(self) -> None:
        coerce_paths(self)
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
        """Out-of-range values and contradictions, each one ConfigError line naming the field (``field`` set, so a
        command can name the flag instead: ``ConfigError.naming``)."""
        self.preset.check()
        check_settings(self)
        if self.text_features and not self.frozen_text:
            raise ConfigError(
                "text_features learns captions as features of a frozen text encoder: add frozen_text",
                field="text_features", mentions=("frozen_text",),
            )  # fmt: skip
        if self.deepspeed_config is not None and self.zero == 0:
            raise ConfigError(
                "deepspeed_config needs zero 1, 2 or 3 (0 is plain PyTorch)",
                field="deepspeed_config",
                mentions=("zero",),
            )
        if self.compile and self.zero == 3:
            raise ConfigError(
                "compile works with zero 1 and 2, not 3: the compiled encoders would read ZeRO-3's partitioned "
                "weights without DeepSpeed gathering them", field="compile", mentions=("zero",),
            )  # fmt: skip
        if self.cuda_graphs and not self.compile:
            raise ConfigError(
                "cuda_graphs captures the compiled encoders: add compile", field="cuda_graphs", mentions=("compile",)
            )
        if self.cuda_graphs and self.zero:
            raise ConfigError(
                "cuda_graphs is not supported with zero (CUDA-graph capture under DeepSpeed is untested); "
                "use compile alone", field="cuda_graphs", mentions=("zero", "compile"),
            )  # fmt: skip
        if self.resume and self.overwrite:
            raise ConfigError(
                "resume and overwrite contradict each other; pick one", field="resume", mentions=("overwrite",)
            )
        if self.auto_resume and (self.resume or self.overwrite):
            other = "resume" if self.resume else "overwrite"
            raise ConfigError(
                f"auto_resume and {other} contradict each other; pick one", field="auto_resume", mentions=(other,)
            )
        if (self.resume or self.auto_resume) and self.out is None:
            raise ConfigError("resume needs out, the run to continue", field="resume", mentions=("out",))
        for name in self.report_to:
            if name not in REPORTERS:
                raise ConfigError(
                    f"report_to: unknown destination {name!r}; choose from {', '.join(REPORTERS)}", field="report_to"
                )
            if importlib.util.find_spec(name) is None:
                raise ConfigError(
                    f"report_to {name} needs the {name} package: pip install 'covmatch[logging]'", field="report_to"
                )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["preset"] = self.preset.to_dict()
        for key in ("out", "ann_root", "image_root", "data_dir", "data_cache", "deepspeed_config"):
            d[key] = str(d[key]) if d[key] is not None else None
        d["resolved"] = {"rho": self.rho, "lam": self.lam, "iterations": self.iterations}
        return d
