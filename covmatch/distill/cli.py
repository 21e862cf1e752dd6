"""``covmatch-distill``: distil an image–caption dataset into N synthetic pairs (CovMatch, Algorithm 1).

Bad flags, files or settings print one line ``covmatch-distill: error: ...`` and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

from covmatch._version import __version__
from covmatch.cli_args import (
    OneLineArgumentParser,
    add_precision_flags,
    add_preset_flags,
    add_setting_flags,
    flag_dests,
    flags_of,
    parse_with_config,
    precision_from,
    preset_fields,
    preset_overrides,
)
from covmatch.data.build import build_source
from covmatch.data.cache import DecodedCache, cache_side
from covmatch.devices import resolve_device
from covmatch.errors import EXIT_BAD_INPUT, EXIT_DIVERGED, ConfigError, CovMatchError, DivergedError, one_line
from covmatch.models.text import check_text_seq_len
from covmatch.presets import DATA, ENCODERS, HYPERPARAMETERS, PRESETS, get_preset
from covmatch.settings import RUNTIME, settings_of

from .config import ABLATIONS, PRESET_FLAG_FIELDS, REPORTERS, RUN, RUN_OUTPUTS, SPEED, DistillConfig
from .engine import Distiller

__all__ = ["build_parser", "config_from_args", "main"]

PROG = "covmatch-distill"


GROUPS = (RUN, RUNTIME, DATA, ENCODERS, HYPERPARAMETERS, ABLATIONS, SPEED)  # --help's groups, in order


def build_parser() -> argparse.ArgumentParser:
    """covmatch-distill's flags: generated from DistillConfig's and the preset's fields (``covmatch.settings``)."""
    p = OneLineArgumentParser(
        prog=PROG,
        description="Distil a real image–caption dataset into N synthetic pairs by matching the cross-covariance "
        "of image and text features (CovMatch). Unset hyperparameters come from the preset, and rho, lam and "
        "iterations from N as in the paper.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    groups[RUN].add_argument("--preset", choices=sorted(PRESETS), default="demo", help="named configuration")
    groups[RUN].add_argument(
        "--config", type=Path, default=None, metavar="FILE", help="JSON/YAML settings (a run's config.json reruns it)"
    )
    add_precision_flags(groups[RUNTIME])
    for group in (DATA, ENCODERS, HYPERPARAMETERS):
        add_preset_flags(groups[group], preset_fields(group))
    add_setting_flags(groups, DistillConfig, types={"report_to": _report_to})
    groups[RUNTIME].add_argument("--no-progress", action="store_true", help="no progress bars")
    # the deepspeed launcher passes --local_rank to every process; LOCAL_RANK in the environment says the same
    groups[SPEED].add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


# field -> the flag that sets it: what errors from DistillConfig and the preset are renamed to
FLAGS = flags_of(DistillConfig)


def _report_to(value: str) -> Tuple[str, ...]:
    """``--report-to tensorboard,wandb`` as a tuple of names ("none": none)."""
    names = tuple(n.strip() for n in value.split(",") if n.strip() and n.strip() != "none")
    for name in names:
        if name not in REPORTERS:
            raise argparse.ArgumentTypeError(f"unknown destination {name!r}; choose from {', '.join(REPORTERS)}")
    return names


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """The run configuration the parsed flags describe (preset fields overridden by the flags that were set)."""
    preset = get_preset(args.preset, **preset_overrides(args, PRESET_FLAG_FIELDS))
    flagged = {info.name: getattr(args, info.name) for info in settings_of(DistillConfig) if info.group in GROUPS}
    return DistillConfig(preset=preset, precision=precision_from(args), progress=not args.no_progress, **flagged)


def _is_main_process() -> bool:
    """Rank 0 of a launched run (torchrun / deepspeed set RANK), or a single process."""
    return os.environ.get("RANK", "0") == "0"


def prepare_out_dir(config: DistillConfig) -> None:
    """Refuse an existing, non-empty --out unless --resume or --overwrite; --overwrite removes run files only
    (on rank 0; the other ranks only check)."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise CovMatchError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if config.overwrite:
            if not _is_main_process():
                return
            for name in RUN_OUTPUTS:
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        elif not (config.resume or config.auto_resume):
            raise CovMatchError(
                f"--out {out} already exists; pass --resume to continue it or --overwrite to start over"
            )


def check_data_cache(config: DistillConfig) -> None:
    """A --data-cache that does not fit the run is refused before --overwrite removes anything (without
    --overwrite nothing is removed, and the run's own opening of the cache refuses it)."""
    if config.data_cache is None or not config.overwrite:
        return
    preset = config.preset
    source = build_source(
        preset, ann_root=config.ann_root, image_root=config.image_root, data_dir=config.data_dir, seed=config.data_seed
    )
    DecodedCache.open(
        config.data_cache, source, side=cache_side(preset.image_size, augment=preset.train_augment), splits=("train",)
    )


def check_precision_device(config: DistillConfig) -> None:
    """fp16 (autocast with loss scaling, or DeepSpeed's fp16) is a GPU mode: one line instead of a traceback."""
    if config.precision == "fp16" and resolve_device(config.device).type != "cuda":
        raise CovMatchError("--fp16 needs a CUDA GPU and none is in use here; on CPU use --bf16 or full precision")


# DistillConfig fields that are actions of one invocation: taken from the command line, never from a file.
RUN_ACTIONS = ("resume", "auto_resume", "overwrite")


def config_file_defaults(data: dict, path: Path) -> dict:
    """Argument defaults from a --config file: the ``config.json`` a run writes (DistillConfig fields, with the
    preset's fields under ``preset``), or flags by name; any other key is a one-line error."""
    dests = flag_dests(build_parser())
    out: dict = {}
    for key, value in data.items():
        if key in ("resolved", *RUN_ACTIONS, "local_rank"):
            continue  # recomputed from N; actions of one invocation
        if key == "preset" and isinstance(value, dict):
            out.update(_preset_defaults(value, path))
        elif key == "precision":
            out.update(fp16=value == "fp16", bf16=value == "bf16")
        elif key == "progress":
            out["no_progress"] = not value
        elif key == "grid_every_save":
            if value is not True:
                raise ConfigError(f"--config {path}: 'grid_every_save' has no flag; only true is accepted")
        elif key in dests:
            out[dests[key]] = value
        else:
            raise ConfigError(f"--config {path}: unknown key {key!r}")
    return out


def _preset_defaults(fields: dict, path: Path) -> dict:
    """The flags a saved preset sets; a field without a flag must equal the named preset's own value."""
    name = fields.get("name", "demo")
    if name not in PRESETS:
        raise ConfigError(f"--config {path}: preset.name {name!r} is not one of {', '.join(sorted(PRESETS))}")
    base = PRESETS[name].to_dict()
    out = {"preset": name}
    for field, value in fields.items():
        if field == "name":
            continue
        if field not in base:
            raise ConfigError(f"--config {path}: unknown preset field {field!r}")
        if field in PRESET_FLAG_FIELDS:
            out[field] = value
        elif field != "notes" and json.loads(json.dumps(base[field])) != value:
            raise ConfigError(
                f"--config {path}: preset field {field!r} has no flag and must be preset {name!r}'s "
                f"{base[field]!r}, got {value!r}"
            )
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    main_process = _is_main_process()
    distiller = None
    finished = False
    try:
        args = parse_with_config(parser, argv, config_file_defaults)
        if args.out is None:
            raise ConfigError("--out is required (on the command line or in --config)")
        config = config_from_args(args)
        check_precision_device(config)
        preset = config.preset
        check_text_seq_len(preset.text_encoder, preset.seq_len, dict(preset.text_config_overrides))
        check_data_cache(config)
        prepare_out_dir(config)
        distiller = Distiller(config, log=lambda msg: print(msg, file=sys.stderr))
        syn = distiller.run()
        finished = True
    except CovMatchError as err:
        if main_process:
            err = err.naming(FLAGS) if isinstance(err, ConfigError) else err
            print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DivergedError as err:
        if main_process:
            print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        if main_process:
            print(f"{PROG}: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        if distiller is not None:
            distiller.close(finished=finished)
    if main_process:
        files = "synthetic.safetensors, synthetic.json, log.jsonl, grids/"
        print(f"{PROG}: {len(syn)} synthetic pairs after {distiller.iteration} iterations -> {config.out}/ ({files})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
