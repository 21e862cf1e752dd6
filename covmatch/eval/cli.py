"""``covmatch-eval``: train fresh dual encoders on a synthetic set or a coreset and report retrieval recall.

    covmatch-eval --synthetic runs/demo/distill --out runs/demo/eval-covmatch
    covmatch-eval --coreset random --num-pairs 100 --out runs/demo/eval-random
    covmatch-eval --compare runs/demo/eval-covmatch runs/demo/eval-random --out runs/demo/compare

Bad input prints one line ``covmatch-eval: error: ...`` and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

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
from covmatch.data.build import build_retrieval_data, build_source
from covmatch.devices import resolve_device
from covmatch.errors import (
    EXIT_BAD_INPUT,
    EXIT_DIVERGED,
    ConfigError,
    CovMatchError,
    DivergedError,
    one_line,
)
from covmatch.models import build_dual_encoder
from covmatch.presets import PRESETS, get_preset
from covmatch.pretrain import resolve_image_weights
from covmatch.visualize import nearest_tokens, save_image_grid

from .coresets import CORESETS
from .protocol import EvalSettings, train_and_evaluate
from .results import bar_chart, load_result, results_table, summarise_runs, write_result
from .training_sets import coreset_train_set, load_synthetic_for, synthetic_train_set

__all__ = ["build_parser", "check_args", "run_evaluation", "main"]

PROG = "covmatch-eval"


# Preset fields covmatch-eval sets, by the flag that sets them.
EVAL_FLAGS = {
    "dataset": "--dataset",
    "image_encoder": "--image-encoder",
    "image_weights": "--image-weights",
    "image_encoder_kwargs": "--image-encoder-kwargs",
    "text_encoder": "--text-encoder",
    "text_layers": "--text-layers",
    "eval_epochs": "--epochs",
    "eval_batch": "--batch-size",
    "eval_lr_encoder": "--lr-encoder",
    "eval_lr_proj": "--lr-proj",
    "eval_runs": "--runs",
}
_EVAL_HELP = {
    "image_encoder": "cross-architecture: another timm image encoder",
    "image_weights": "weights of the image encoder (file or 'cache')",
    "text_encoder": "cross-architecture: another text encoder",
    "text_layers": "cross-architecture: keep the first K layers of the text encoder (another depth of it)",
}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog=PROG,
        description="Evaluate a distilled set (or a coreset baseline) by training fresh dual encoders on it and "
        "measuring image-text retrieval on the test split (final epoch; --select-on-val picks the epoch on val).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--config", type=Path, default=None, help="JSON/YAML settings by flag name (flags here win)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--synthetic", type=Path, help="directory with synthetic.safetensors + synthetic.json")
    what.add_argument("--coreset", choices=CORESETS, help="baseline: N real pairs (or the full train split)")
    what.add_argument("--compare", type=Path, nargs="+", help="result directories to tabulate and plot together")
    p.add_argument("--out", type=Path, default=None, help="output directory (results.json, results.md, PNGs)")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    p.add_argument("--num-pairs", type=int, default=None, help="N for a coreset (default: the preset's)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="named configuration")
    p.add_argument("--seed", type=int, default=0, help="seed of run 0 (run r uses seed + r)")
    p.add_argument(
        "--data-seed",
        type=int,
        default=None,
        help="seed of the embedded dataset's draw (default: the synthetic set's, else 0)",
    )
    p.add_argument(
        "--allow-data-seed-mismatch",
        action="store_true",
        help="evaluate a set on another draw of the embedded dataset than it was distilled from",
    )
    p.add_argument("--select-on-val", action="store_true", help="report the epoch with the best val recall")
    p.add_argument(
        "--split", choices=("test", "val"), default="test", help="split to score (val: for hyperparameter tuning)"
    )
    p.add_argument(
        "--frozen-text", action="store_true", help="do not train the text encoder (it still reads token embeddings)"
    )
    p.add_argument(
        "--train",
        choices=("all", "projections"),
        default="all",
        help="what the fresh model trains: both encoders and the projections, or the projections alone (a "
        "linear probe on the frozen pretrained encoders)",
    )
    training = ("eval_runs", "eval_epochs", "eval_batch", "eval_lr_encoder", "eval_lr_proj")
    add_preset_flags(p.add_argument_group("training protocol"), training, names=EVAL_FLAGS)
    encoders = ("image_encoder", "image_weights", "image_encoder_kwargs", "text_encoder", "text_layers")
    add_preset_flags(p.add_argument_group("encoders"), encoders, names=EVAL_FLAGS, helps=_EVAL_HELP)
    data = p.add_argument_group("data")
    add_preset_flags(data, ("dataset",))
    add_data_flags(data)
    add_runtime_flags(p.add_argument_group("runtime"))
    return p


def check_args(args, preset) -> None:
    """Every number and path the run depends on, before anything is built or written."""
    preset.check(EVAL_FLAGS)
    bounds = (("--seed", args.seed, 0), ("--workers", args.workers, 0), ("--num-pairs", args.num_pairs, 2),
              ("--data-seed", args.data_seed, 0))  # fmt: skip
    for flag, value, low in bounds:
        if value is not None and value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    if args.split == "val" and args.select_on_val:
        raise ConfigError("--select-on-val with --split val would select and score on the same split")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if (out / "results.json").exists() and not args.overwrite:
        raise ConfigError(f"--out {out} already holds results.json; pass --overwrite to replace it")


def resolve_data_seed(args, syn, preset) -> int:
    """The embedded dataset's draw to evaluate on: the one the set was distilled from (a set made before
    ``--data-seed`` existed drew its data with its ``--seed``), unless the flag says otherwise, which is
    refused without ``--allow-data-seed-mismatch``. Karpathy data has no draw."""
    if syn is None or preset.dataset != "shapes":
        return args.data_seed if args.data_seed is not None else 0
    meta = syn.metadata
    distilled = meta.get("data_seed", (meta.get("hyperparameters") or {}).get("seed", 0))
    if args.data_seed is None or args.data_seed == distilled:
        return int(distilled)
    if not args.allow_data_seed_mismatch:
        raise ConfigError(
            f"--data-seed {args.data_seed}: {args.synthetic} was distilled from data seed {distilled}; pass "
            "--allow-data-seed-mismatch to evaluate it on another draw of the dataset"
        )
    return args.data_seed


RESAMPLED = ("random", "balanced")  # coresets drawn anew for each evaluation run


def run_evaluation(args) -> dict:
    """Train and score ``--runs`` fresh models on the set or coreset the flags name; the result as a dict."""
    preset = get_preset(args.preset, **preset_overrides(args, tuple(EVAL_FLAGS)))
    check_args(args, preset)
    runs = preset.eval_runs
    device = resolve_device(args.device)
    if args.synthetic is not None:
        syn = load_synthetic_for(args.synthetic, preset)  # fails fast, before any encoder is built
    data_seed = resolve_data_seed(args, syn if args.synthetic is not None else None, preset)
    weights = resolve_image_weights(
        preset.image_encoder,
        preset.image_size,
        preset.image_weights,
        progress=not args.no_progress,
        model_kwargs=preset.image_model_kwargs(),
    )
    model = build_dual_encoder(preset, image_weights=weights)
    source = build_source(
        preset, ann_root=args.ann_root, image_root=args.image_root, data_dir=args.data_dir, seed=data_seed
    )
    start = time.perf_counter()
    extra = {}
    if args.synthetic is not None:
        syn, train_set, args.frozen_text = synthetic_train_set(
            syn, model, preset.seq_len, frozen_text=args.frozen_text, where=str(args.synthetic)
        )
        method, n = "covmatch", len(syn)
        extra["synthetic"] = str(args.synthetic)
        if "changed_token_share" in syn.metadata:  # of caption tokens, since initialisation
            extra["changed_token_share"] = syn.metadata["changed_token_share"]
        if "mapped_from" in syn.metadata:
            extra["captions_carried_from"] = syn.metadata["mapped_from"]
        train_sets = [train_set] * runs
    else:
        n = args.num_pairs if args.num_pairs is not None else preset.num_pairs
        # random subsets are drawn anew for every run, so the spread covers which pairs were drawn
        subset_seeds = [args.seed + r for r in range(runs)] if args.coreset in RESAMPLED else [args.seed] * runs
        chosen = {}
        for seed in dict.fromkeys(subset_seeds):
            chosen[seed] = coreset_train_set(
                args.coreset, n, model, source, preset, device, seed=seed, workers=args.workers,
                progress=not args.no_progress,
            )  # fmt: skip
        train_sets = [chosen[seed][1] for seed in subset_seeds]
        method, n = args.coreset, len(chosen[subset_seeds[0]][0])
        extra["subset_seeds"] = subset_seeds
    test = build_retrieval_data(source, args.split, model.text.tokenizer, preset)
    val = build_retrieval_data(source, "val", model.text.tokenizer, preset) if args.select_on_val else None
    settings = EvalSettings.from_preset(
        preset,
        frozen_text=args.frozen_text,
        train=args.train,
        select_on_val=args.select_on_val,
        precision=precision_from(args),
        progress=not args.no_progress,
    )
    run_results, epochs, histories = [], [], []
    for r in range(runs):
        res = train_and_evaluate(model, train_sets[r], test, settings, seed=args.seed + r, device=device, val=val)
        run_results.append(res["metrics"])
        epochs.append(res["epoch"])
        histories.append(res["history"])
        print(
            f"{PROG}: run {r + 1}/{runs} ({method}, N={n}): mean recall {res['metrics']['mean']:.2f}", file=sys.stderr
        )
    if args.synthetic is not None:
        _save_synthetic_grid(syn, model, Path(args.out))
    return {
        "method": method,
        "num_pairs": n,
        "runs": run_results,
        "epochs_reported": epochs,
        "histories": histories,  # per run, per epoch: training loss (and val mean recall when selecting on val)
        "selection": "best val epoch" if args.select_on_val else "final epoch",
        "split": args.split,
        "summary": summarise_runs(run_results),
        "seconds": time.perf_counter() - start,
        "config": {
            "preset": preset.to_dict(),
            "settings": vars(settings),
            "seeds": [args.seed + r for r in range(runs)],
            "data_seed": data_seed,
            "image_encoder": model.image.name,
            "image_encoder_kwargs": model.image.model_kwargs,
            "text_encoder": model.text.name,
            "device": str(device),
            **extra,
        },
        "covmatch_version": __version__,
    }


def _save_synthetic_grid(syn, model, out: Path) -> None:
    captions = nearest_tokens(syn.text_embeds, syn.attention_mask, model.text.embedding_table, model.text.tokenizer)
    title = f"synthetic set ({len(syn)} pairs), captions decoded to nearest tokens"
    meta = syn.metadata
    save_image_grid(
        syn.images, out / "synthetic_grid.png", mean=meta["mean"], std=meta["std"], captions=captions, title=title
    )


def config_file_defaults(data: dict, path: Path) -> dict:
    """Argument defaults from a --config file of flags by name (``lr-encoder`` or ``lr_encoder``)."""
    dests = flag_dests(build_parser())
    unknown = [key for key in data if key not in dests]
    if unknown:
        raise ConfigError(f"--config {path}: unknown key {unknown[0]!r}")
    return {dests[key]: value for key, value in data.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse_with_config(build_parser(), argv, config_file_defaults)
        chosen = [flag for flag, value in (("--synthetic", args.synthetic), ("--coreset", args.coreset),
                                           ("--compare", args.compare)) if value]  # fmt: skip
        if len(chosen) != 1:
            raise ConfigError("give exactly one of --synthetic, --coreset, --compare (here or in --config)")
        if args.out is None:
            raise ConfigError("--out is required (on the command line or in --config)")
        out = Path(args.out)
        if args.compare:
            results = [load_result(d) for d in args.compare]
            out.mkdir(parents=True, exist_ok=True)
            (out / "comparison.md").write_text(results_table(results))
            bar_chart(results, out / "comparison.png")
            print(results_table(results))
            print(f"{PROG}: wrote {out}/comparison.md and {out}/comparison.png")
            return 0
        result = run_evaluation(args)
        write_result(out, result)
        bar_chart([result], out / "recall.png")
    except CovMatchError as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DivergedError as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_DIVERGED
    print(results_table([result]))
    print(f"{PROG}: wrote {out}/results.json, results.md, recall.png")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
