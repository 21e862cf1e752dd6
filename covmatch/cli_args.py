"""What the command-line tools share: a parser that reports errors in one line, flags generated from the
settings' dataclass fields (``covmatch.settings``: help, range, choices, group and metavar have one home, the
field), ``--help`` that shows each flag's real default (per preset where the presets differ), and the config-file
reader."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from covmatch.errors import ConfigError, one_line
from covmatch.presets import PRESETS, Preset
from covmatch.settings import SettingInfo, settings_of

__all__ = [
    "OneLineArgumentParser",
    "PRESET_FLAG_HELP",
    "preset_fields",
    "add_preset_flags",
    "preset_overrides",
    "add_setting_flags",
    "flags_of",
    "add_precision_flags",
    "precision_from",
    "read_config_file",
    "parse_with_config",
    "flag_dests",
]


class DefaultsFormatter(argparse.HelpFormatter):
    """Help text with the flag's real default appended: a preset field's per preset (set by add_preset_flags as
    ``shown_default``), another flag's own default where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        shown = default_text(action)
        return f"{action.help} (default: {shown})" if shown else (action.help or "")


def default_text(action: argparse.Action) -> str:
    """The default a flag's help and the CLI reference show ("" for none worth showing)."""
    shown = getattr(action, "shown_default", None)
    if shown is not None:
        return shown
    default = action.default
    if action.nargs == 0 or action.required or default is None or default is False or default in ((), "", []):
        return ""
    if default == argparse.SUPPRESS:
        return ""
    return str(default)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (and exit code 2), without the usage block, and shows real
    defaults in ``--help``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


_SETTINGS = {info.name: info for info in settings_of(Preset)}
# The help of every preset field that has a flag.
PRESET_FLAG_HELP: Dict[str, str] = {name: info.help for name, info in _SETTINGS.items() if info.group is not None}
_METAVARS = {int: "N", float: "X", str: "NAME", Path: "PATH"}


def preset_fields(*groups: str) -> tuple:
    """The preset fields whose flags are in these ``--help`` groups, in declaration order."""
    return tuple(name for name, info in _SETTINGS.items() if info.group in groups)


def _value_text(info: SettingInfo, value: Any) -> str:
    if value is None:
        return info.none or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if value == "":
        return "none"
    return f"{value:,}" if isinstance(value, int) and value >= 10_000 else str(value)


def preset_default_text(field: str) -> str:
    """A preset field's default as ``--help`` shows it: one value, or each preset's where they differ."""
    info = _SETTINGS[field]
    values = {name: getattr(preset, field) for name, preset in PRESETS.items()}
    if len(set(map(repr, values.values()))) == 1:
        return _value_text(info, next(iter(values.values())))
    return ", ".join(f"{name} {_value_text(info, v)}" for name, v in values.items())


def _add_flag(group, info: SettingInfo, flag: str, *, default: Any, boolean: str) -> argparse.Action:
    if info.kind is bool:
        action = argparse.BooleanOptionalAction if boolean == "both" else "store_true"
        return group.add_argument(flag, dest=info.name, action=action, default=default, help=info.help)
    if info.choices is not None:
        return group.add_argument(flag, dest=info.name, choices=info.choices, default=default, help=info.help,
                                  type=type(info.choices[0]))  # fmt: skip
    metavar = info.metavar or _METAVARS.get(info.kind, "VALUE")
    return group.add_argument(flag, dest=info.name, type=info.kind, default=default, metavar=metavar, help=info.help)


def add_preset_flags(group, fields: Sequence[str], *, names: Optional[Mapping[str, str]] = None) -> None:
    """A flag per preset field in ``fields`` (``names`` renames some), defaulting to None so that an unset flag
    keeps the preset's value; booleans get --x / --no-x, fields with a fixed set of values get choices, and the
    help shows each preset's value."""
    names = names or {}
    for field in fields:
        if field not in _SETTINGS:
            raise KeyError(f"{field!r} is not a Preset field")
        info = _SETTINGS[field]
        action = _add_flag(group, info, names.get(field, info.flag), default=None, boolean="both")
        action.shown_default = preset_default_text(field)


def preset_overrides(args: argparse.Namespace, fields: Sequence[str]) -> Dict[str, object]:
    """The preset fields the flags set (None: not given, the preset's value stays)."""
    return {field: getattr(args, field) for field in fields}


def add_setting_flags(groups: Mapping[str, Any], cls: type, *, types: Optional[Mapping[str, Callable]] = None) -> None:
    """A flag for every setting of the dataclass ``cls`` whose group is in ``groups`` (``--help`` groups by name),
    defaulting to the field's default; booleans are on/off switches. ``types`` overrides the parse function of
    some fields."""
    for info in settings_of(cls):
        if info.group not in groups:
            continue
        action = _add_flag(groups[info.group], info, info.flag, default=info.default, boolean="switch")
        if types and info.name in types:
            action.type = types[info.name]
        if info.default is None and info.name in _SETTINGS:  # a run's override of the preset field
            action.shown_default = preset_default_text(info.name)
        elif info.default is None and info.none:
            action.shown_default = info.none


def flags_of(cls: type) -> Dict[str, str]:
    """field -> flag for the settings of ``cls`` and the preset's fields: what a command passes to
    ``ConfigError.naming`` so that errors name its flags."""
    names = {name: info.flag for name, info in _SETTINGS.items() if info.group is not None}
    names.update({info.name: info.flag for info in settings_of(cls) if info.group is not None})
    return names


def add_precision_flags(group) -> None:
    """--fp16 / --bf16: autocast precision (mutually exclusive; neither: fp32)."""
    precision = group.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="fp16 autocast with dynamic loss scaling")
    precision.add_argument("--bf16", action="store_true", help="bf16 autocast")


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
        out.setdefault(action.dest, action.dest)
    return out
