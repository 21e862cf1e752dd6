"""Named configurations: ``paper`` (the published setting), ``demo`` (the embedded default, a 2-core CPU),
``tiny`` (smallest configuration that exercises every code path, for tests).

Each preset is a frozen dataclass; command-line flags override fields with ``preset.replace(...)``.
Hyperparameters left as None are filled from the number of synthetic pairs (docs/design.md, *The loss*).
"""

from __future__ import annotations

import ast
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

from covmatch.errors import ConfigError

__all__ = ["Preset", "PRESETS", "FIELD_CHOICES", "get_preset", "parse_model_kwargs"]


@dataclass(frozen=True)
class Preset:
    name: str
    # data
    dataset: str = "shapes"  # "shapes" (embedded), "karpathy" (Flickr30K / COCO JSON) or "hf" (local HF dataset)
    shapes_train_images: int = 10_000
    shapes_eval_images: int = 1_000  # val and test split sizes of the embedded dataset
    image_size: int = 224
    train_augment: bool = True
    flip: bool = True
    max_words: int = 30
    # encoders
    image_encoder: str = "nfnet_l0"
    image_weights: Optional[str] = None  # local file, "cache" (local HF cache) or None (random init)
    # keyword arguments of timm.create_model, "key=value, ...": e.g. "patch_size=8" for a ViT at 32 px
    image_encoder_kwargs: str = ""
    text_encoder: str = "bert-base-uncased"
    text_layers: Optional[int] = None
    text_random_init: bool = False
    text_config_overrides: Tuple[Tuple[str, int], ...] = ()
    text_pooling: str = "cls"
    seq_len: int = 32
    proj_dim: int = 2304
    proj_depth: int = 1
    temperature: float = 0.07
    learnable_temperature: bool = False
    # distillation (docs/design.md, *Algorithm 1 as implemented*)
    num_pairs: int = 100
    iterations: Optional[int] = None  # None: 10,000, or 20,000 at N >= 500
    real_batch: int = 128
    syn_batch: int = 256
    rho: Optional[float] = None  # None: 2 at N <= 100, else 1
    lam: Optional[float] = None  # None: 0.1 at N <= 200, else 0.5
    lr_img: float = 1.0
    lr_txt: float = 1.0
    syn_momentum: float = 0.5
    normalize_loss: bool = False  # scale-free loss terms (see DistillObjective); not in the paper
    reset_every: int = 50
    online: str = "real"  # what the online model trains on: "real" (Algorithm 1), "synthetic", or "fixed" (t=0)
    online_lr_encoder: float = 0.01
    online_lr_proj: float = 0.1
    online_momentum: float = 0.9
    # evaluation (docs/design.md, *Evaluation protocol*)
    eval_epochs: int = 100
    eval_batch: int = 128
    eval_lr_encoder: float = 0.01
    eval_lr_proj: float = 0.1
    eval_momentum: float = 0.9
    eval_weight_decay: float = 5e-4
    eval_runs: int = 5
    notes: str = field(default="", compare=False)

    def replace(self, **overrides) -> Preset:
        """A copy with ``overrides`` applied (None values are ignored, so unset flags keep the preset's)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown preset field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def check(self, flags: Optional[Mapping[str, str]] = None) -> None:
        """Every field in its range (numbers finite), as one ConfigError line naming the field by the flag
        that sets it (``flags``: field -> flag; a field without one is named as a preset field)."""
        flags = flags or {}

        def where(name: str) -> str:
            return flags.get(name, f"preset {self.name!r} field {name}")

        for name, (kind, allowed, note) in _FIELD_RANGES.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_FIELDS:
                continue
            _check_number(where(name), value, kind, allowed, note)
        for name, choices in FIELD_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{where(name)} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        parse_model_kwargs(self.image_encoder_kwargs, where("image_encoder_kwargs"))

    def image_model_kwargs(self) -> Dict[str, object]:
        """``image_encoder_kwargs`` as the keyword arguments timm.create_model receives."""
        return parse_model_kwargs(self.image_encoder_kwargs, "image_encoder_kwargs")

    def resolved_rho(self, num_pairs: Optional[int] = None) -> float:
        n = num_pairs or self.num_pairs
        return self.rho if self.rho is not None else (2.0 if n <= 100 else 1.0)

    def resolved_lam(self, num_pairs: Optional[int] = None) -> float:
        n = num_pairs or self.num_pairs
        return self.lam if self.lam is not None else (0.1 if n <= 200 else 0.5)

    def resolved_iterations(self, num_pairs: Optional[int] = None) -> int:
        n = num_pairs or self.num_pairs
        return self.iterations if self.iterations is not None else (20_000 if n >= 500 else 10_000)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _at_least(low):
    return (lambda v: v >= low), f">= {low}"


def _between(low, high):
    return (lambda v: low <= v <= high), f"in [{low}, {high}]"


_POSITIVE = ((lambda v: v > 0), "> 0")
_MOMENTUM = ((lambda v: 0 <= v < 1), "in [0, 1)")

# field -> (int or float, (test, the range in words), why); floats must also be finite.
_FIELD_RANGES = {
    "shapes_train_images": (int, _at_least(2), ""),
    "shapes_eval_images": (int, _at_least(1), ""),
    "image_size": (int, _at_least(8), " pixels"),
    "max_words": (int, _at_least(1), ""),
    "text_layers": (int, _at_least(1), ""),
    "seq_len": (int, _at_least(2), " (room for the [CLS] and [SEP] tokens)"),
    "proj_dim": (int, _at_least(1), ""),
    "proj_depth": (int, _between(1, 3), ""),
    "temperature": (float, _POSITIVE, ""),
    "num_pairs": (int, _at_least(2), " (a covariance needs two samples)"),
    "iterations": (int, _at_least(0), ""),
    "real_batch": (int, _at_least(2), " (a covariance needs two samples)"),
    "syn_batch": (int, _at_least(2), ""),
    "rho": (float, _POSITIVE, ""),
    "lam": (float, _at_least(0.0), ""),
    "lr_img": (float, _at_least(0.0), ""),
    "lr_txt": (float, _at_least(0.0), ""),
    "syn_momentum": (float, _MOMENTUM, ""),
    "reset_every": (int, _at_least(1), ""),
    "online_lr_encoder": (float, _at_least(0.0), ""),
    "online_lr_proj": (float, _at_least(0.0), ""),
    "online_momentum": (float, _MOMENTUM, ""),
    "eval_epochs": (int, _at_least(1), ""),
    "eval_batch": (int, _at_least(2), " (InfoNCE needs a negative)"),
    "eval_lr_encoder": (float, _at_least(0.0), ""),
    "eval_lr_proj": (float, _at_least(0.0), ""),
    "eval_momentum": (float, _MOMENTUM, ""),
    "eval_weight_decay": (float, _at_least(0.0), ""),
    "eval_runs": (int, _at_least(1), ""),
}
_OPTIONAL_FIELDS = ("text_layers", "iterations", "rho", "lam")  # None: resolved later (by N or the model)
FIELD_CHOICES = {
    "dataset": ("shapes", "karpathy", "hf"),
    "text_pooling": ("cls", "mean"),
    "online": ("real", "synthetic", "fixed"),
}


def parse_model_kwargs(text: str, where: str) -> Dict[str, object]:
    """``"patch_size=8, global_pool='avg'"`` -> ``{"patch_size": 8, "global_pool": "avg"}``: Python literals, and
    bare words as strings (``act_layer=gelu``). ``where`` names the flag or field in the error."""
    if not isinstance(text, str):
        raise ConfigError(f"{where} must be a string of key=value pairs, got {text!r}")
    if not text.strip():
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        call = None
    if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
        raise ConfigError(f"{where} must be key=value pairs separated by commas, got {text!r}")
    kwargs: Dict[str, object] = {}
    for keyword in call.keywords:
        if keyword.arg in kwargs:
            raise ConfigError(f"{where} sets {keyword.arg!r} twice")
        node = keyword.value
        if isinstance(node, ast.Name):
            kwargs[keyword.arg] = node.id
            continue
        try:
            kwargs[keyword.arg] = ast.literal_eval(node)
        except ValueError:
            raise ConfigError(
                f"{where}: the value of {keyword.arg!r} must be a number, word, string, tuple or list, "
                f"got {ast.unparse(node)!r}"
            ) from None
    return kwargs


def _check_number(flag: str, value, kind: type, allowed, note: str = "") -> None:
    """One ConfigError line unless ``value`` is a finite number of ``kind`` in the ``allowed`` range."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind is int and not is_int:
        raise ConfigError(f"{flag} must be an integer, got {value!r}")
    if kind is float and not (is_int or isinstance(value, float)):
        raise ConfigError(f"{flag} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{flag} must be a finite number, got {value}")
    test, bound = allowed
    if not test(value):
        raise ConfigError(f"{flag} must be {bound}{note}, got {value}")


PRESETS = {
    "paper": Preset(
        name="paper",
        dataset="karpathy",
        image_size=224,
        image_encoder="nfnet_l0",
        image_weights="cache",
        text_encoder="bert-base-uncased",
        seq_len=32,
        proj_dim=2304,
        notes="NFNet-L0 at 224 px + BERT-base, the paper's setting (needs local weights and Flickr30K/COCO).",
    ),
    "demo": Preset(
        name="demo",
        dataset="shapes",
        shapes_train_images=10_000,
        image_size=32,
        train_augment=False,
        flip=False,
        image_encoder="test_nfnet",
        image_weights="shapes-pretrained",  # pretrained on a disjoint generated split (covmatch.pretrain)
        text_encoder="all-MiniLM-L6-v2",
        text_layers=1,
        text_pooling="mean",  # all-MiniLM-L6-v2 was trained with mean pooling; its [CLS] output barely varies
        seq_len=20,
        proj_dim=256,
        num_pairs=100,
        iterations=150,
        normalize_loss=True,  # scale-free loss terms (not in the paper); the learning rates below assume it
        online="fixed",  # the fixed-model ablation, not Algorithm 1 (why: experiments/embedded_study/results/tune_demo_val.txt)
        real_batch=128,
        lr_img=30.0,
        lr_txt=1.0,
        # the paper's |B_S|: all of S up to 256 pairs (all 100 at the default N); at N 200 and 500 a batch of
        # 100 scored below this on val (experiments/embedded_study/results/study.md, tune-scaling-batch)
        syn_batch=256,
        eval_epochs=100,
        eval_batch=100,
        eval_runs=3,
        notes="Embedded shapes dataset, a tiny NFNet and the first layer of all-MiniLM-L6-v2: minutes on a 2-core CPU.",
    ),
    "tiny": Preset(
        name="tiny",
        dataset="shapes",
        shapes_train_images=64,
        shapes_eval_images=16,
        image_size=16,
        train_augment=False,
        flip=False,
        image_encoder="test_nfnet",
        text_encoder="all-MiniLM-L6-v2",
        text_random_init=True,
        text_config_overrides=(
            ("hidden_size", 32),
            ("num_hidden_layers", 2),
            ("num_attention_heads", 2),
            ("intermediate_size", 64),
        ),
        seq_len=12,
        proj_dim=32,
        num_pairs=8,
        iterations=6,
        lr_img=1.0,
        lr_txt=3e-4,
        real_batch=16,
        syn_batch=8,
        reset_every=3,
        eval_epochs=2,
        eval_batch=8,
        eval_runs=1,
        notes="Smallest configuration exercising every code path; for tests.",
    ),
}


def get_preset(name: str, **overrides) -> Preset:
    """The named preset with ``overrides`` applied."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
