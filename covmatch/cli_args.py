"""What the command-line tools share: a parser that reports errors in one line, the flags that set preset
fields (generated from the ``Preset`` dataclass, so a field and its flag cannot drift apart), and the flags
every command takes (data, device, precision, progress)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence

from covmatch.errors import ConfigError, one_line
from covmatch.presets import FIELD_CHOICES, Preset

__all__ = [
    "OneLineArgumentParser",
    "PRESET_FLAG_HELP",
    "add_preset_flags",
    "preset_overrides",
    "add_data_flags",
    "add_runtime_flags",
    "precision_from",
    "read_config_file",
    "parse_with_config",
]


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (and exit code 2), without the usage block."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# The help of every preset field that a flag sets; the flag is --field-name unless a command renames it.
PRESET_FLAG_HELP: Dict[str, str] = {
    "dataset": "embedded shapes, Karpathy JSON (--ann-root) or a local HF dataset (--data-dir)",
    "num_pairs": "N, the number of synthetic pairs",
    "iterations": "distillation iterations T (default: by N)",
    "image_encoder": "timm model name (created with num_classes=0)",
    "image_weights": "local .safetensors/.pth file, or 'cache' (local HF cache)",
    "image_encoder_kwargs": "timm.create_model keyword arguments, 'key=value, ...' (e.g. 'patch_size=8' for a "
    "ViT at 32 px)",
    "text_encoder": "local transformers model directory or cached name",
    "text_layers": "keep only the first K text transformer layers",
    "image_size": "input resolution in pixels",
    "seq_len": "caption length in tokens",
    "proj_dim": "projection dimension",
    "proj_depth": "1 = linear, 2-3 = MLP",
    "text_pooling": "[CLS] output or masked mean",
    "learnable_temperature": "learn the InfoNCE temperature",
    "real_batch": "real batch size |B_T|",
    "syn_batch": "synthetic batch size |B_S| (all of S when N is smaller)",
    "rho": "scale of the real covariance (default 2 if N<=100 else 1)",
    "lam": "mean-matching weight (default 0.1 if N<=200 else 0.5)",
    "lr_img": "SGD learning rate of the synthetic pixels",
    "lr_txt": "SGD learning rate of the synthetic text embeddings",
    "syn_momentum": "SGD momentum of the synthetic set",
    "reset_every": "reset the online model every K iterations",
    "online_lr_encoder": "online model: encoder learning rate",
    "online_lr_proj": "online model: projection learning rate",
    "online_momentum": "online model: SGD momentum",
    "normalize_loss": "divide each loss term by its real-data magnitude (scale-free; not in the paper)",
    "eval_epochs": "training epochs",
    "eval_batch": "training batch size",
    "eval_lr_encoder": "encoder learning rate",
    "eval_lr_proj": "projection learning rate",
    "eval_runs": "training runs with different seeds",
}

_HINTS = typing.get_type_hints(Preset)


def _flag_type(field: str):
    """The argparse type of a preset field, from its annotation (Optional[X] -> X)."""
    hint = _HINTS[field]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_preset_flags(
    group,
    fields: Sequence[str],
    *,
    names: Optional[Mapping[str, str]] = None,
    helps: Optional[Mapping[str, str]] = None,
) -> None:
    """A flag per preset field in ``fields`` (``names`` renames some, ``helps`` rewords some), defaulting to
    None so that an unset flag keeps the preset's value; booleans get --x / --no-x, fields with a fixed set of
    values get choices."""
    names, helps = names or {}, helps or {}
    known = {f.name for f in dataclasses.fields(Preset)}
    for field in fields:
        if field not in known:
            raise KeyError(f"{field!r} is not a Preset field")
        flag = names.get(field, f"--{field.replace('_', '-')}")
        help_text = helps.get(field, PRESET_FLAG_HELP[field])
        kind = _flag_type(field)
        if kind is bool:
            group.add_argument(flag, dest=field, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif field in FIELD_CHOICES:
            group.add_argument(flag, dest=field, choices=FIELD_CHOICES[field], default=None, help=help_text)
        else:
            group.add_argument(flag, dest=field, type=kind, default=None, help=help_text)


def preset_overrides(args: argparse.Namespace, fields: Sequence[str]) -> Dict[str, object]:
    """The preset fields the flags set (None: not given, the preset's value stays)."""
    return {field: getattr(args, field) for field in fields}


def add_data_flags(parser) -> None:
    """Where a Karpathy-format or Hugging Face dataset lives (the embedded one needs none)."""
    parser.add_argument(
        "--ann-root", type=Path, default=None,
        help="folder with *train.json, *val.json, *test.json (BLIP), or Karpathy's dataset_*.json file",
    )  # fmt: skip
    parser.add_argument("--image-root", type=Path, default=None, help="folder the JSON image paths are relative to")
    parser.add_argument(
        "--data-dir", type=Path, default=None,
        help="--dataset hf: a local Hugging Face dataset (save_to_disk folder, or imagefolder with captions)",
    )  # fmt: skip


def add_runtime_flags(parser) -> None:
    """Device, precision, data-loading workers and progress bars."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="fp16 autocast with dynamic loss scaling")
    precision.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def precision_from(args: argparse.Namespace) -> str:
    return "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"


def read_config_file(path: Path) -> Dict[str, object]:
    """A --config file: a JSON object, or YAML (``.yaml`` / ``.yml``) mapping; one clear line otherwise."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {path}: not valid YAML ({one_line(err)})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--config {path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings at the top level")
    return data


def parse_with_config(
    parser: argparse.ArgumentParser,
    argv: Optional[Sequence[str]],
    to_defaults: Callable[[Dict[str, object], Path], Dict[str, object]],
) -> argparse.Namespace:
    """Parse ``argv``; when it names ``--config FILE``, the file's settings (mapped to argument names by
    ``to_defaults``, which rejects unknown keys) become the defaults, so flags on the command line win."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        parser.set_defaults(**to_defaults(read_config_file(known.config), known.config))
    return parser.parse_args(argv)


def flag_dests(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """Every flag's destination, by the flag's name without dashes (``lr-img`` and ``lr_img`` -> ``lr_img``)."""
    out = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                out[option[2:]] = action.dest
                out[option[2:].replace("-", "_")] = action.dest
    return out
