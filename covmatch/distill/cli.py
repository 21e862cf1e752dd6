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
    add_data_flags,
    add_preset_flags,
    add_runtime_flags,
    flag_dests,
    parse_with_config,
    precision_from,
    preset_overrides,
)
from covmatch.devices import resolve_device
from covmatch.errors import EXIT_BAD_INPUT, EXIT_DIVERGED, ConfigError, CovMatchError, DivergedError, one_line
from covmatch.presets import PRESETS, get_preset
from covmatch.synthetic import INIT_METHODS

from .config import (
    DISTILL_MODES,
    ONLINE_MODES,
    PRESET_FLAG_FIELDS,
    REPORTERS,
    RUN_OUTPUTS,
    STEP_ORDERS,
    DistillConfig,
)  # fmt: skip
from .engine import Distiller

__all__ = ["build_parser", "config_from_args", "main"]

PROG = "covmatch-distill"


# Preset fields with a covmatch-distill flag, by group.
DATA_FIELDS = ("dataset",)
ENCODER_FIELDS = ("image_encoder", "image_weights", "image_encoder_kwargs", "text_encoder", "text_layers",
                  "image_size", "seq_len", "proj_dim", "proj_depth", "text_pooling",
                  "learnable_temperature")  # fmt: skip
HYPERPARAMETER_FIELDS = ("num_pairs", "iterations", "real_batch", "syn_batch", "rho", "lam", "lr_img", "lr_txt",
                         "syn_momentum", "reset_every", "online_lr_encoder", "online_lr_proj", "online_momentum",
                         "normalize_loss")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog=PROG,
        description="Distil a real image–caption dataset into N synthetic pairs by matching the cross-covariance "
        "of image and text features (CovMatch). Unset hyperparameters come from the preset, and rho, lam and "
        "iterations from N as in the paper.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    run = p.add_argument_group("run")
    run.add_argument(
        "--preset", choices=sorted(PRESETS), default="demo", help="named configuration (paper, demo, tiny)"
    )
    run.add_argument("--config", type=Path, default=None, help="JSON/YAML settings (a run's config.json reruns it)")
    run.add_argument("--out", type=Path, default=None, help="output directory (required, here or in --config)")
    run.add_argument("--seed", type=int, default=0, help="seed of the initial pairs, the batches and the resets")
    run.add_argument(
        "--data-seed", type=int, default=0, help="seed of the embedded dataset's draw (covmatch-eval uses the set's)"
    )
    run.add_argument("--save-every", type=int, default=100, help="checkpoint, result and image grid every K iterations")
    run.add_argument("--log-every", type=int, default=10, help="log line every K iterations")
    run.add_argument("--keep-checkpoints", type=int, default=3, help="keep the newest K checkpoints")
    run.add_argument(
        "--resume", action="store_true", help="continue from the newest valid checkpoint in --out (refused if none)"
    )
    run.add_argument(
        "--auto-resume",
        action="store_true",
        help="resume when --out holds a run, start when it is empty or missing (for preemptible jobs)",
    )
    run.add_argument("--overwrite", action="store_true", help="start over in an existing --out (removes its run files)")
    run.add_argument(
        "--report-to", type=_report_to, default=(),
        help="also log to tensorboard and/or wandb (comma-separated; wandb runs offline unless WANDB_MODE is "
        "set); log.jsonl is always written",
    )  # fmt: skip
    add_runtime_flags(run)

    data = p.add_argument_group("data")
    add_preset_flags(data, DATA_FIELDS)
    add_data_flags(data)
    data.add_argument("--validate-data", action="store_true", help="open every image up front instead of lazily")
    data.add_argument(
        "--target-augment",
        action="store_true",
        help="train augmentation on the real batch behind the covariance target (default: the evaluation "
        "transform, as synthetic and test images)",
    )
    data.add_argument(
        "--dsa-shift", type=float, default=0.0,
        help="differentiable siamese augmentation (not in the paper): each iteration shift every matched "
        "image, synthetic and real, by up to this fraction of its side (default 0: off)",
    )  # fmt: skip
    data.add_argument(
        "--dsa-scale", type=float, default=0.0,
        help="differentiable siamese augmentation: zoom every matched image by a factor in [1 - s, 1 + s] "
        "(default 0: off)",
    )  # fmt: skip

    add_preset_flags(p.add_argument_group("encoders"), ENCODER_FIELDS)
    add_preset_flags(p.add_argument_group("distillation hyperparameters"), HYPERPARAMETER_FIELDS)

    ab = p.add_argument_group("ablations")
    ab.add_argument(
        "--frozen-text",
        action="store_true",
        help="do not train the online text encoder (captions stay token embeddings, differentiated through it)",
    )
    ab.add_argument(
        "--text-features",
        action="store_true",
        help="prior work's regime: learn captions as text features of the frozen text encoder (with --frozen-text)",
    )
    ab.add_argument(
        "--online", choices=ONLINE_MODES, default=None, help="what the online model trains on (default: preset)"
    )
    ab.add_argument("--distill", choices=DISTILL_MODES, default="both", help="which modality is distilled")
    ab.add_argument(
        "--init",
        choices=INIT_METHODS,
        default="random",
        help="initial real pairs: random (the paper's) or balanced over the data's classes (embedded data)",
    )
    ab.add_argument(
        "--step-order",
        choices=STEP_ORDERS,
        default="paper",
        help="paper: the online model steps on its own real batch, then the statistics use the updated model; "
        "loss-first: the online step comes after the synthetic update, on the target's batch",
    )

    perf = p.add_argument_group("memory and speed")
    perf.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing in both encoders")
    perf.add_argument("--channels-last", action="store_true", help="NHWC image encoder (faster convolutions on GPUs)")
    perf.add_argument(
        "--syn-chunk", type=int, default=None, help="exact two-pass gradient, K synthetic samples per pass"
    )
    perf.add_argument(
        "--zero", type=int, choices=(0, 1, 2, 3), default=0, help="DeepSpeed ZeRO stage of the online model (0: off)"
    )
    perf.add_argument(
        "--deepspeed-config", type=Path, default=None, help="DeepSpeed JSON merged over the config built from flags"
    )
    perf.add_argument("--grad-clip", type=float, default=0.0, help="online model: max gradient norm (0: no clipping)")
    # the deepspeed launcher passes --local_rank to every process; LOCAL_RANK in the environment says the same
    perf.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    perf.add_argument(
        "--loss-backend", choices=("auto", "torch", "triton"), default="auto", help="covmatch_loss backend"
    )
    return p


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
    return DistillConfig(
        preset=preset,
        out=args.out,
        seed=args.seed,
        data_seed=args.data_seed,
        device=args.device,
        save_every=args.save_every,
        log_every=args.log_every,
        keep_checkpoints=args.keep_checkpoints,
        syn_chunk=args.syn_chunk,
        precision=precision_from(args),
        grad_checkpointing=args.grad_checkpointing,
        channels_last=args.channels_last,
        frozen_text=args.frozen_text,
        text_features=args.text_features,
        online=args.online,
        distill_mode=args.distill,
        step_order=args.step_order,
        init=args.init,
        target_augment=args.target_augment,
        dsa_shift=args.dsa_shift,
        dsa_scale=args.dsa_scale,
        workers=args.workers,
        loss_backend=args.loss_backend,
        zero=args.zero,
        deepspeed_config=args.deepspeed_config,
        grad_clip=args.grad_clip,
        ann_root=args.ann_root,
        image_root=args.image_root,
        data_dir=args.data_dir,
        validate_data=args.validate_data,
        resume=args.resume,
        auto_resume=args.auto_resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        report_to=tuple(args.report_to),
    )


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
        elif key == "distill_mode":
            out["distill"] = value
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
        prepare_out_dir(config)
        distiller = Distiller(config, log=lambda msg: print(msg, file=sys.stderr))
        syn = distiller.run()
        finished = True
    except CovMatchError as err:
        if main_process:
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
