"""Named configurations: ``paper`` (the published setting), ``demo`` (the embedded default, a 2-core CPU),
``tiny`` (smallest configuration that exercises every code path, for tests).

Each preset is a frozen dataclass; command-line flags override fields with ``preset.replace(...)``.
Hyperparameters left as None are filled from the number of synthetic pairs (docs/design.md, *The loss*).
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from covmatch.errors import ConfigError
from covmatch.settings import DATA, MOMENTUM, POSITIVE, at_least, between, check_settings, setting

__all__ = ["Preset", "PRESETS", "get_preset", "parse_model_kwargs", "DATA", "ENCODERS", "HYPERPARAMETERS", "EVALUATION"]


ENCODERS, HYPERPARAMETERS, EVALUATION = "encoders", "distillation hyperparameters", "training protocol"
_TWO_SAMPLES = " (a covariance needs two samples)"


@dataclass(frozen=True)
class Preset:
    """A named configuration. Each field declares its help, range and flag group (``covmatch.settings``)."""

    name: str
    # data
    dataset: str = setting(
        "shapes", group=DATA, choices=("shapes", "glyphs", "karpathy", "hf"),
        help="embedded shapes or glyph scenes, Karpathy JSON (--ann-root) or a local HF dataset (--data-dir)",
    )  # fmt: skip
    shapes_train_images: int = setting(10_000, range=at_least(2), help="train images of an embedded dataset")
    shapes_eval_images: int = setting(1_000, range=at_least(1), help="val and test images of an embedded dataset")
    image_size: int = setting(224, group=ENCODERS, range=at_least(8, " pixels"), help="input resolution in pixels")
    train_augment: bool = setting(
        True, group=DATA, help="random resized crops (half the area to all of it) of the images the models train on"
    )
    flip: bool = setting(True, group=DATA, help="random horizontal flips with the crops (off where captions say left)")
    max_words: int = setting(30, range=at_least(1), help="captions are cut to this many words")
    # encoders
    image_encoder: str = setting(
        "nfnet_l0", group=ENCODERS, metavar="TIMM_NAME",
        help="timm image encoder (created with num_classes=0); another than the set's evaluates across architectures",
    )  # fmt: skip
    image_weights: Optional[str] = setting(
        None, group=ENCODERS, metavar="FILE", none="random init",
        help="image encoder weights: a local .safetensors/.pth file, or 'cache' (local HF cache)",
    )  # fmt: skip
    image_encoder_kwargs: str = setting(
        "", group=ENCODERS, metavar="'KEY=VALUE, ...'",
        help="timm.create_model keyword arguments (e.g. 'patch_size=8' for a ViT at 32 px)",
    )  # fmt: skip
    text_encoder: str = setting(
        "bert-base-uncased", group=ENCODERS, metavar="NAME_OR_DIR",
        help="local transformers model directory or cached name",
    )  # fmt: skip
    text_layers: Optional[int] = setting(
        None,
        metavar="K",
        group=ENCODERS,
        range=at_least(1),
        none="all",
        help="keep only the first K text transformer layers",
    )
    text_random_init: bool = setting(False, help="build the text encoder's architecture without its weights")
    text_config_overrides: Tuple[Tuple[str, int], ...] = setting((), help="text encoder config fields to override")
    text_pooling: str = setting("cls", group=ENCODERS, choices=("cls", "mean"), help="[CLS] output or masked mean")
    whiten_features: bool = setting(
        False, group=ENCODERS,
        help="end each encoder with a fixed whitening of its features, fitted on unpaired images and captions "
        "generated from another seed (embedded datasets only)",
    )  # fmt: skip
    seq_len: int = setting(
        32, group=ENCODERS, range=at_least(2, " (room for the [CLS] and [SEP] tokens)"), help="caption length in tokens"
    )
    proj_dim: int = setting(2304, group=ENCODERS, range=at_least(1), help="projection dimension")
    proj_depth: int = setting(1, group=ENCODERS, range=between(1, 3), help="1 = linear, 2-3 = MLP")
    temperature: float = setting(0.07, range=POSITIVE, help="InfoNCE temperature (initial, when learnable)")
    learnable_temperature: bool = setting(False, group=ENCODERS, help="learn the InfoNCE temperature")
    # distillation (docs/design.md, *Algorithm 1 as implemented*)
    num_pairs: int = setting(
        100,
        group=HYPERPARAMETERS,
        range=at_least(2),
        help="N, the number of synthetic pairs (a coreset's N in evaluation)",
    )
    iterations: Optional[int] = setting(
        None, group=HYPERPARAMETERS, range=at_least(0), none="by N: 10,000; 20,000 at N >= 500",
        help="distillation iterations T",
    )  # fmt: skip
    real_batch: int = setting(128, group=HYPERPARAMETERS, range=at_least(2, _TWO_SAMPLES), help="real batch |B_T|")
    syn_batch: int = setting(
        256, group=HYPERPARAMETERS, range=at_least(2), help="synthetic batch |B_S| (all of S when N is smaller)"
    )
    rho: Optional[float] = setting(
        None,
        group=HYPERPARAMETERS,
        range=POSITIVE,
        none="by N: 2 at N <= 100, else 1",
        help="scale of the real covariance",
    )
    lam: Optional[float] = setting(
        None,
        group=HYPERPARAMETERS,
        range=at_least(0.0),
        none="by N: 0.1 at N <= 200, else 0.5",
        help="mean-matching weight",
    )
    lr_img: float = setting(1.0, group=HYPERPARAMETERS, range=at_least(0.0), help="SGD learning rate of the pixels")
    lr_txt: float = setting(
        1.0, group=HYPERPARAMETERS, range=at_least(0.0), help="SGD learning rate of the caption token embeddings"
    )
    syn_momentum: float = setting(0.5, group=HYPERPARAMETERS, range=MOMENTUM, help="SGD momentum of the synthetic set")
    normalize_loss: bool = setting(
        False, group=HYPERPARAMETERS,
        help="divide each loss term by its real-data magnitude (scale-free; not in the paper)",
    )  # fmt: skip
    relative_steps: bool = setting(
        False, group=HYPERPARAMETERS,
        help="scale each modality's gradient to its tensor's norm, so --lr-img and --lr-txt are relative step sizes "
        "(balances pixels against caption embeddings; not in the paper)",
    )  # fmt: skip
    reset_every: int = setting(
        50, metavar="K", group=HYPERPARAMETERS, range=at_least(1), help="reset the online model every K iterations"
    )
    online: str = setting(
        "real", choices=("real", "synthetic", "fixed"),
        help="what the online model trains on: real data (Algorithm 1), the synthetic set, or nothing (fixed)",
    )  # fmt: skip
    online_lr_encoder: float = setting(
        0.01, group=HYPERPARAMETERS, range=at_least(0.0), help="online model: encoder learning rate"
    )
    online_lr_proj: float = setting(
        0.1, group=HYPERPARAMETERS, range=at_least(0.0), help="online model: projection learning rate"
    )
    online_momentum: float = setting(0.9, group=HYPERPARAMETERS, range=MOMENTUM, help="online model: SGD momentum")
    # evaluation (docs/design.md, *Evaluation protocol*)
    eval_epochs: int = setting(100, group=EVALUATION, flag="--epochs", range=at_least(1), help="training epochs")
    eval_batch: int = setting(
        128, group=EVALUATION, flag="--batch-size", range=at_least(2, " (InfoNCE needs a negative)"),
        help="training batch size",
    )  # fmt: skip
    eval_lr_encoder: float = setting(
        0.01, group=EVALUATION, flag="--lr-encoder", range=at_least(0.0), help="encoder learning rate"
    )
    eval_lr_proj: float = setting(
        0.1, group=EVALUATION, flag="--lr-proj", range=at_least(0.0), help="projection learning rate"
    )
    eval_momentum: float = setting(0.9, range=MOMENTUM, help="training SGD momentum")
    eval_weight_decay: float = setting(5e-4, range=at_least(0.0), help="training weight decay")
    eval_runs: int = setting(
        5, group=EVALUATION, flag="--runs", range=at_least(1), help="training runs with different seeds"
    )
    notes: str = field(default="", compare=False)

    def replace(self, **overrides) -> Preset:
        """A copy with ``overrides`` applied (None values are ignored, so unset flags keep the preset's)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown preset field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def check(self) -> None:
        """Every field in its range and among its choices (numbers finite), as one ConfigError naming the field."""
        check_settings(self)
        parse_model_kwargs(self.image_encoder_kwargs, "image_encoder_kwargs")
        if self.whiten_features and self.dataset not in ("shapes", "glyphs"):
            raise ConfigError(
                f"whiten_features fits its whitening on data generated from another seed: only the embedded "
                f"datasets (shapes, glyphs) have that, not dataset {self.dataset}",
                field="whiten_features",
                mentions=("dataset",),
            )

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


def parse_model_kwargs(text: str, where: str) -> Dict[str, object]:
    """``"patch_size=8, global_pool='avg'"`` -> ``{"patch_size": 8, "global_pool": "avg"}``: Python literals, and
    bare words as strings (``act_layer=gelu``). ``where`` names the flag or field in the error."""
    if not isinstance(text, str):
        raise ConfigError(f"{where} must be a string of key=value pairs, got {text!r}", field=where)
    if not text.strip():
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        call = None
    if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
        raise ConfigError(f"{where} must be key=value pairs separated by commas, got {text!r}", field=where)
    kwargs: Dict[str, object] = {}
    for keyword in call.keywords:
        if keyword.arg in kwargs:
            raise ConfigError(f"{where} sets {keyword.arg!r} twice", field=where)
        node = keyword.value
        if isinstance(node, ast.Name):
            kwargs[keyword.arg] = node.id
            continue
        try:
            kwargs[keyword.arg] = ast.literal_eval(node)
        except ValueError:
            raise ConfigError(
                f"{where}: the value of {keyword.arg!r} must be a number, word, string, tuple or list, "
                f"got {ast.unparse(node)!r}",
                field=where,
            ) from None
    return kwargs


_DEMO = Preset(
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
    # the fixed-model ablation, not Algorithm 1 (why: experiments/embedded_study/results/tune_demo_val.txt)
    online="fixed",
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
)

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
    "demo": _DEMO,
    # the glyph scenes: the demo's regime (fixed pretrained model), its distillation settings tuned on val
    # (experiments/glyph_benchmark/results/methods/methods.md)
    "glyphs": _DEMO.replace(
        name="glyphs",
        dataset="glyphs",
        image_size=64,  # glyphs a fifth of the image high: about 20 px at 64 px
        image_weights="glyphs-pretrained",  # pretrained on its family's glyph concepts, disjoint from the scenes'
        whiten_features=True,  # raw features put the cross-covariance's energy in a few directions
        seq_len=32,
        iterations=300,
        lr_img=300.0,  # on val: lr_img 30 / 300 / 1,000 scored 9.9 / 10.7 / 8.7 (pixels 10x slower than captions at 30)
        eval_lr_encoder=0.001,  # on val (random 100 pairs): 0.01 collapses through the whitened features
        notes="Embedded glyph scenes (many concepts, Zipf-skewed), a tiny NFNet at 64 px and one MiniLM layer; "
        "the fixed pretrained model, settings tuned on val.",
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
