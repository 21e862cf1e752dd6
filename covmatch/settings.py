"""One home per setting: a dataclass field declared with ``setting(...)`` carries its help text, its range or
choices, the command-line group it belongs to and its flag's metavar. The commands' flags, their ``--help``,
the range checks and the config-file readers are all generated from these fields, so adding a setting is one
edit: its field.

A check names the field (``lr_img must be >= 0``), as the Python API sees it; the commands rename it to the
flag that sets it (``--lr-img must be >= 0``) with ``ConfigError.naming``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Tuple

from covmatch.errors import ConfigError

__all__ = [
    "Range",
    "at_least",
    "between",
    "POSITIVE",
    "MOMENTUM",
    "setting",
    "SettingInfo",
    "settings_of",
    "check_settings",
    "coerce_paths",
    "PRECISIONS",
    "DATA",
    "RUNTIME",
    "CommonSettings",
    "resolved_workers",
]


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: ``kind`` (int or float; floats must also be finite), a test, the range in
    words for the error, and why (appended to the error)."""

    kind: type
    test: Callable[[Any], bool]
    words: str
    note: str = ""

    def check(self, name: str, value: Any) -> None:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if self.kind is int and not is_int:
            raise ConfigError(f"{name} must be an integer, got {value!r}", field=name)
        if self.kind is float and not (is_int or isinstance(value, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}", field=name)
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}", field=name)
        if not self.test(value):
            raise ConfigError(f"{name} must be {self.words}{self.note}, got {value}", field=name)


def at_least(low: float, note: str = "") -> Range:
    return Range(int if isinstance(low, int) else float, lambda v: v >= low, f">= {low}", note)


def between(low: float, high: float, note: str = "") -> Range:
    kind = int if isinstance(low, int) and isinstance(high, int) else float
    return Range(kind, lambda v: low <= v <= high, f"in [{low:g}, {high:g}]", note)


POSITIVE = Range(float, lambda v: v > 0, "> 0")
MOMENTUM = Range(float, lambda v: 0 <= v < 1, "in [0, 1)")


def setting(
    default: Any = MISSING,
    *,
    help: str,
    group: Optional[str] = None,
    range: Optional[Range] = None,
    choices: Optional[Tuple[Any, ...]] = None,
    metavar: Optional[str] = None,
    flag: Optional[str] = None,
    none: Optional[str] = None,
    default_factory: Any = MISSING,
    compare: bool = True,
) -> Any:
    """A dataclass field with what the tools need to know about it.

    ``group``: the ``--help`` group its flag is listed in (None: no flag); ``flag``: the flag's name when it
    is not ``--field-name``; ``range`` / ``choices``: the allowed values (a field whose default is None also
    accepts None); ``none``: what None means, for ``--help`` (``"by N"``, ``"all layers"``).
    """
    metadata = {"help": help, "group": group, "range": range, "choices": choices, "metavar": metavar,
                "flag": flag, "none": none}  # fmt: skip
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, compare=compare, metadata=metadata)
    return dataclasses.field(default=default, compare=compare, metadata=metadata)


@dataclass(frozen=True)
class SettingInfo:
    """One setting as the tools see it."""

    name: str
    kind: type  # the annotation without Optional: int, float, str, bool, Path, tuple
    default: Any
    help: str
    group: Optional[str]
    range: Optional[Range]
    choices: Optional[Tuple[Any, ...]]
    metavar: Optional[str]
    flag: str
    none: Optional[str]

    @property
    def optional(self) -> bool:
        return self.default is None


def _kind(hint: Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    hint = args[0] if args else hint
    return typing.get_origin(hint) or hint


def settings_of(cls: type) -> Iterator[SettingInfo]:
    """Every field of ``cls`` declared with ``setting(...)``, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        default = f.default if f.default is not MISSING else None
        if f.default_factory is not MISSING:
            default = f.default_factory()
        meta = f.metadata
        yield SettingInfo(
            name=f.name,
            kind=_kind(hints[f.name]),
            default=default,
            help=meta["help"],
            group=meta["group"],
            range=meta["range"],
            choices=meta["choices"],
            metavar=meta["metavar"],
            flag=meta["flag"] or f"--{f.name.replace('_', '-')}",
            none=meta["none"],
        )


def check_settings(obj: Any) -> None:
    """Every ``setting`` field of ``obj`` in its range and among its choices, as one ConfigError naming it."""
    for info in settings_of(type(obj)):
        value = getattr(obj, info.name)
        if value is None and info.optional:
            continue
        if info.range is not None:
            info.range.check(info.name, value)
        if info.choices is not None and value not in info.choices:
            choices = ", ".join(str(c) for c in info.choices)
            raise ConfigError(f"{info.name} must be one of {choices}, got {value!r}", field=info.name)


def coerce_paths(obj: Any) -> None:
    """Path settings given as strings (``out="runs/a"``) become ``Path``s."""
    for info in settings_of(type(obj)):
        value = getattr(obj, info.name)
        if info.kind is Path and isinstance(value, str):
            setattr(obj, info.name, Path(value))


PRECISIONS = ("fp32", "fp16", "bf16")
DATA, RUNTIME = "data", "runtime"  # --help groups every command that reads data has


@dataclass
class CommonSettings:
    """What every command that reads data takes: where a Karpathy-format or Hugging Face dataset lives (the
    embedded one needs none), the device, the precision, data-loading workers and progress bars."""

    ann_root: Optional[Path] = setting(
        None, group=DATA, metavar="PATH",
        help="folder with *train.json, *val.json, *test.json (BLIP), or Karpathy's dataset_*.json file",
    )  # fmt: skip
    image_root: Optional[Path] = setting(
        None, group=DATA, metavar="DIR", help="folder the JSON image paths are relative to"
    )
    data_dir: Optional[Path] = setting(
        None, group=DATA, metavar="DIR",
        help="--dataset hf: a local Hugging Face dataset (save_to_disk folder, or imagefolder with captions)",
    )  # fmt: skip
    data_cache: Optional[Path] = setting(
        None, group=DATA, metavar="DIR",
        help="a decoded cache from covmatch prepare-data: images read as uint8 arrays instead of decoded files "
        "(in distillation, cropped and normalised on the device)",
    )  # fmt: skip
    device: str = setting("auto", group=RUNTIME, metavar="DEVICE", help="auto, cpu, cuda or cuda:K")
    precision: str = setting("fp32", choices=PRECISIONS, help="fp32, or fp16 / bf16 autocast (--fp16, --bf16)")
    workers: Optional[int] = setting(
        None, group=RUNTIME, range=at_least(0), none="cores - 1 (up to 8) where images are decoded from files, else 0",
        help="data-loading worker processes",
    )  # fmt: skip
    progress: bool = setting(True, help="progress bars (--no-progress: none)")


def resolved_workers(workers: Optional[int], *, decodes_files: bool) -> int:
    """Data-loading worker processes: ``workers`` when set, else, where images are decoded from files (a
    Karpathy or Hugging Face dataset without a decoded cache), one per core but one, up to 8; else 0 (the
    embedded dataset renders in memory, and a cache is read by a thread)."""
    if workers is not None:
        return workers
    return max(0, min(8, (os.cpu_count() or 1) - 1)) if decodes_files else 0
