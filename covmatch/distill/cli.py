"""``covmatch-distill``: distil an image–caption dataset into N synthetic pairs (CovMatch, Algorithm 1).

Bad flags, files or settings print one line ``covmatch-distill: error: ...`` and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from covmatch._version import __version__
from covmatch.cli import OneLineArgumentParser
from covmatch.errors import EXIT_BAD_INPUT, EXIT_DIVERGED, CovMatchError, DivergedError, one_line
from covmatch.presets import PRESETS, get_preset

from .config import DISTILL_MODES, ONLINE_MODES, RUN_OUTPUTS, DistillConfig

__all__ = ["build_parser", "config_from_args", "main"]

PROG = "covmatch-distill"


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
    run.add_argument("--num-pairs", type=int, default=None, help="N, the number of synthetic pairs")
    run.add_argument("--out", type=Path, required=True, help="output directory")
    run.add_argument("--seed", type=int, default=0, help="seed of every random choice (data, init, resets)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K")
    run.add_argument("--iterations", type=int, default=None, help="distillation iterations T (default: by N)")
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
    run.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    data = p.add_argument_group("data")
    data.add_argument(
        "--dataset", choices=("shapes", "karpathy"), default=None, help="embedded shapes or Karpathy JSON"
    )
    data.add_argument("--ann-root", type=Path, default=None, help="folder with *train.json, *val.json, *test.json")
    data.add_argument("--image-root", type=Path, default=None, help="folder the JSON image paths are relative to")
    data.add_argument("--validate-data", action="store_true", help="open every image up front instead of lazily")

    model = p.add_argument_group("encoders")
    model.add_argument("--image-encoder", default=None, help="timm model name (created with num_classes=0)")
    model.add_argument(
        "--image-weights", default=None, help="local .safetensors/.pth file, or 'cache' (local HF cache)"
    )
    model.add_argument("--text-encoder", default=None, help="local transformers model directory or cached name")
    model.add_argument("--text-layers", type=int, default=None, help="keep only the first K text transformer layers")
    model.add_argument("--image-size", type=int, default=None, help="input resolution in pixels")
    model.add_argument("--seq-len", type=int, default=None, help="caption length in tokens")
    model.add_argument("--proj-dim", type=int, default=None, help="projection dimension")
    model.add_argument("--proj-depth", type=int, choices=(1, 2, 3), default=None, help="1 = linear, 2-3 = MLP")
    model.add_argument("--text-pooling", choices=("cls", "mean"), default=None, help="[CLS] output or masked mean")
    model.add_argument(
        "--learnable-temperature",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="learn the InfoNCE temperature",
    )

    hp = p.add_argument_group("distillation hyperparameters")
    hp.add_argument("--real-batch", type=int, default=None, help="real batch size |B_T|")
    hp.add_argument(
        "--syn-batch", type=int, default=None, help="synthetic batch size |B_S| (all of S when N is smaller)"
    )
    hp.add_argument("--rho", type=float, default=None, help="scale of the real covariance (default 2 if N<=100 else 1)")
    hp.add_argument("--lam", type=float, default=None, help="mean-matching weight (default 0.1 if N<=200 else 0.5)")
    hp.add_argument("--lr-img", type=float, default=None, help="SGD learning rate of the synthetic pixels")
    hp.add_argument("--lr-txt", type=float, default=None, help="SGD learning rate of the synthetic text embeddings")
    hp.add_argument("--syn-momentum", type=float, default=None, help="SGD momentum of the synthetic set")
    hp.add_argument("--reset-every", type=int, default=None, help="reset the online model every K iterations")
    hp.add_argument("--online-lr-encoder", type=float, default=None, help="online model: encoder learning rate")
    hp.add_argument("--online-lr-proj", type=float, default=None, help="online model: projection learning rate")
    hp.add_argument("--online-momentum", type=float, default=None, help="online model: SGD momentum")
    hp.add_argument(
        "--normalize-loss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="divide each loss term by its real-data magnitude (scale-free; not in the paper; default: preset)",
    )

    ab = p.add_argument_group("ablations")
    ab.add_argument("--frozen-text", action="store_true", help="freeze the text encoder (prior work's regime)")
    ab.add_argument(
        "--online", choices=ONLINE_MODES, default=None, help="what the online model trains on (default: preset)"
    )
    ab.add_argument("--distill", choices=DISTILL_MODES, default="both", help="which modality is distilled")

    perf = p.add_argument_group("memory and speed")
    precision = perf.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="fp16 autocast with dynamic loss scaling")
    precision.add_argument("--bf16", action="store_true", help="bf16 autocast")
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


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """The run configuration the parsed flags describe (preset fields overridden by the flags that were set)."""
    preset = get_preset(
        args.preset,
        dataset=args.dataset,
        num_pairs=args.num_pairs,
        iterations=args.iterations,
        image_encoder=args.image_encoder,
        image_weights=args.image_weights,
        text_encoder=args.text_encoder,
        text_layers=args.text_layers,
        image_size=args.image_size,
        seq_len=args.seq_len,
        proj_dim=args.proj_dim,
        proj_depth=args.proj_depth,
        text_pooling=args.text_pooling,
        learnable_temperature=args.learnable_temperature,
        real_batch=args.real_batch,
        syn_batch=args.syn_batch,
        rho=args.rho,
        lam=args.lam,
        lr_img=args.lr_img,
        lr_txt=args.lr_txt,
        syn_momentum=args.syn_momentum,
        reset_every=args.reset_every,
        online_lr_encoder=args.online_lr_encoder,
        online_lr_proj=args.online_lr_proj,
        online_momentum=args.online_momentum,
        normalize_loss=args.normalize_loss,
    )
    return DistillConfig(
        preset=preset,
        out=args.out,
        seed=args.seed,
        device=args.device,
        save_every=args.save_every,
        log_every=args.log_every,
        keep_checkpoints=args.keep_checkpoints,
        syn_chunk=args.syn_chunk,
        precision="fp16" if args.fp16 else "bf16" if args.bf16 else "fp32",
        grad_checkpointing=args.grad_checkpointing,
        channels_last=args.channels_last,
        frozen_text=args.frozen_text,
        online=args.online,
        distill_mode=args.distill,
        workers=args.workers,
        loss_backend=args.loss_backend,
        zero=args.zero,
        deepspeed_config=args.deepspeed_config,
        grad_clip=args.grad_clip,
        ann_root=args.ann_root,
        image_root=args.image_root,
        validate_data=args.validate_data,
        resume=args.resume,
        auto_resume=args.auto_resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
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
    from .engine import resolve_device

    if config.precision == "fp16" and resolve_device(config.device).type != "cuda":
        raise CovMatchError("--fp16 needs a CUDA GPU and none is in use here; on CPU use --bf16 or full precision")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    main_process = _is_main_process()
    distiller = None
    finished = False
    try:
        config = config_from_args(args)
        check_precision_device(config)
        prepare_out_dir(config)
        from .engine import Distiller

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
