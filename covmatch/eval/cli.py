"""``covmatch-eval``: train fresh dual encoders on a synthetic set or a coreset and report retrieval recall.

    covmatch-eval --synthetic runs/demo/distill --out runs/demo/eval-covmatch
    covmatch-eval --coreset random --num-pairs 100 --out runs/demo/eval-random
    covmatch-eval --compare runs/demo/eval-covmatch runs/demo/eval-random --out runs/demo/compare

Bad input prints one line ``covmatch-eval: error: ...`` and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from covmatch._version import __version__
from covmatch.cli_args import (
    OneLineArgumentParser,
    add_data_flags,
    add_preset_flags,
    add_runtime_flags,
    precision_from,
    preset_overrides,
)
from covmatch.devices import resolve_device
from covmatch.errors import (
    EXIT_BAD_INPUT,
    EXIT_DIVERGED,
    CheckpointError,
    ConfigError,
    CovMatchError,
    DivergedError,
    brief,
    one_line,
)
from covmatch.presets import PRESETS, get_preset
from covmatch.pretrain import resolve_image_weights

from .coresets import CORESETS
from .metrics import metric_keys

__all__ = ["build_parser", "main", "summarise_runs", "results_table"]

PROG = "covmatch-eval"


# Preset fields covmatch-eval sets, by the flag that sets them.
EVAL_FLAGS = {
    "dataset": "--dataset",
    "image_encoder": "--image-encoder",
    "image_weights": "--image-weights",
    "text_encoder": "--text-encoder",
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
}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog=PROG,
        description="Evaluate a distilled set (or a coreset baseline) by training fresh dual encoders on it and "
        "measuring image-text retrieval on the test split (final epoch; --select-on-val picks the epoch on val).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--synthetic", type=Path, help="directory with synthetic.safetensors + synthetic.json")
    what.add_argument("--coreset", choices=CORESETS, help="baseline: N real pairs (or the full train split)")
    what.add_argument("--compare", type=Path, nargs="+", help="result directories to tabulate and plot together")
    p.add_argument("--out", type=Path, required=True, help="output directory (results.json, results.md, PNGs)")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    p.add_argument("--num-pairs", type=int, default=None, help="N for a coreset (default: the preset's)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="named configuration")
    p.add_argument("--seed", type=int, default=0, help="seed of run 0 (run r uses seed + r)")
    p.add_argument("--select-on-val", action="store_true", help="report the epoch with the best val recall")
    p.add_argument(
        "--split", choices=("test", "val"), default="test", help="split to score (val: for hyperparameter tuning)"
    )
    p.add_argument("--frozen-text", action="store_true", help="do not train the text encoder")
    training = ("eval_runs", "eval_epochs", "eval_batch", "eval_lr_encoder", "eval_lr_proj")
    add_preset_flags(p.add_argument_group("training protocol"), training, names=EVAL_FLAGS)
    encoders = ("image_encoder", "image_weights", "text_encoder")
    add_preset_flags(p.add_argument_group("encoders"), encoders, names=EVAL_FLAGS, helps=_EVAL_HELP)
    data = p.add_argument_group("data")
    add_preset_flags(data, ("dataset",))
    add_data_flags(data)
    add_runtime_flags(p.add_argument_group("runtime"))
    return p


def check_args(args, preset) -> None:
    """Every number and path the run depends on, before anything is built or written."""
    preset.check(EVAL_FLAGS)
    bounds = (("--seed", args.seed, 0), ("--workers", args.workers, 0), ("--num-pairs", args.num_pairs, 2))
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


# ---------------------------------------------------------------------------------------------- results


def summarise_runs(runs: List[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Mean and (sample) std per metric over runs."""
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        out[key] = {"mean": mean, "std": std}
    return out


def results_table(results: Sequence[dict]) -> str:
    """A markdown table like the paper's: one row per method, mean ± std per metric."""
    keys = metric_keys()
    head = "| method | N | runs | " + " | ".join(keys) + " | time (s) |"
    rule = "|" + "---|" * (len(keys) + 4)
    rows = [head, rule]
    for r in results:
        single = len(r["runs"]) == 1  # one run has no spread to show
        cells = [_mean_std(r["summary"][k], single) for k in keys]
        rows.append(
            f"| {r['method']} | {r['num_pairs']} | {len(r['runs'])} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |"
        )
    return "\n".join(rows) + "\n"


def _mean_std(stat: Dict[str, float], single: bool) -> str:
    return f"{stat['mean']:.1f}" if single else f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def bar_chart(results: Sequence[dict], path: Path) -> Path:
    """Grouped bars of every recall metric per method, with std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = metric_keys()
    width = 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(1.2 * len(keys) + 2, 3.6))
    for j, r in enumerate(results):
        xs = [i + j * width for i in range(len(keys))]
        ax.bar(
            xs,
            [r["summary"][k]["mean"] for k in keys],
            width,
            yerr=[r["summary"][k]["std"] for k in keys],
            label=f"{r['method']} (N={r['num_pairs']})",
            capsize=2,
        )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], keys, fontsize=8)
    ax.set_ylabel("recall (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def _load_result(directory: Path) -> dict:
    """A results.json written by covmatch-eval, checked for every field the table and chart read."""
    path = Path(directory) / "results.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no results.json (run covmatch-eval with --out {directory} first)")
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: malformed JSON ({brief(err)})") from None
    if not isinstance(result, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    fields = (("method", str), ("num_pairs", int), ("runs", list), ("summary", dict), ("seconds", (int, float)))
    for key, kind in fields:
        if not isinstance(result.get(key), kind):
            raise ConfigError(f"{path}: field {key!r} is missing or not a {getattr(kind, '__name__', 'number')}")
    if not result["runs"]:
        raise ConfigError(f"{path}: field 'runs' is empty")
    for key in metric_keys():
        stat = result["summary"].get(key)
        if not (isinstance(stat, dict) and all(isinstance(stat.get(s), (int, float)) for s in ("mean", "std"))):
            raise ConfigError(f"{path}: field 'summary.{key}' is missing or lacks numeric mean and std")
    return result


def _write_results(out: Path, result: dict) -> None:
    from covmatch.synthetic import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "results.json", (json.dumps(result, indent=2) + "\n").encode())
    atomic_write_bytes(out / "results.md", results_table([result]).encode())


# ---------------------------------------------------------------------------------------------- the run


def _load_synthetic(directory: Path, preset):
    """The synthetic set, checked against what the preset fixes (pixel space, caption length) before any
    encoder is built; the encoders themselves may differ (cross-architecture evaluation)."""
    from covmatch.data.datasets import CLIP_MEAN, CLIP_STD
    from covmatch.synthetic import SyntheticSet

    if not Path(directory).is_dir() or not any(Path(directory).iterdir()):
        raise CheckpointError(f"--synthetic {directory}: empty or missing directory (expected synthetic.safetensors)")
    expect = {
        "image_size": preset.image_size,
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
        "seq_len": preset.seq_len,
    }
    return SyntheticSet.load(directory, expect=expect)


def _synthetic_train_set(args, syn, preset, model):
    """Training batches of the loaded set, its captions mapped to the evaluation text encoder if it differs."""
    from covmatch.synthetic import SyntheticSet
    from covmatch.visualize import decode_token_ids

    from .protocol import SyntheticTrainSet

    saved_text = syn.metadata.get("text_encoder")
    if syn.metadata.get("text_mode") == "features" or args.frozen_text:
        if syn.text_features is None:
            raise ConfigError(f"{args.synthetic}: --frozen-text evaluation needs a set distilled with --frozen-text")
        if saved_text != model.text.name:
            raise ConfigError(
                f"{args.synthetic}: its captions are features of {saved_text!r}; they cannot be used with "
                f"text encoder {model.text.name!r}"
            )
        args.frozen_text = True
        return syn, SyntheticTrainSet(syn, use_text_features=True)
    if saved_text != model.text.name:
        # Cross-architecture text: each caption's nearest vocabulary tokens in the distilling encoder's table
        # (saved with the set) are decoded with its tokenizer, re-tokenised and embedded by the target encoder.
        if syn.nearest_token_ids is None:
            raise ConfigError(
                f"{args.synthetic}: made for text encoder {saved_text!r} and saved without nearest_token_ids, so "
                f"its captions cannot be mapped to {model.text.name!r}"
            )
        from transformers import AutoTokenizer

        from covmatch.data import tokenize_captions
        from covmatch.models.text import resolve_text_encoder_path

        tokenizer_name = syn.metadata.get("tokenizer") or saved_text
        try:
            source_tokenizer = AutoTokenizer.from_pretrained(
                resolve_text_encoder_path(tokenizer_name), local_files_only=True
            )
        except OSError:
            raise ConfigError(f"{args.synthetic}: its tokenizer {tokenizer_name!r} is not available locally") from None
        texts = decode_token_ids(syn.nearest_token_ids, syn.attention_mask, source_tokenizer)
        ids, mask = tokenize_captions(model.text.tokenizer, texts, preset.seq_len)
        with torch.no_grad():
            embeds = model.text.embed(ids).float()
        syn = SyntheticSet(syn.images, embeds, mask, dict(syn.metadata, mapped_from=saved_text))
    return syn, SyntheticTrainSet(syn)


def _coreset_train_set(args, preset, model, source, device, n: int):
    from covmatch.data.build import build_train_dataset
    from covmatch.data.datasets import CLIP_MEAN, CLIP_STD, image_transform

    from .coresets import pair_features, select_coreset
    from .protocol import RealTrainSet

    dataset = build_train_dataset(source, model.text.tokenizer, preset, augment=True)
    plain = image_transform(preset.image_size, train=False, mean=CLIP_MEAN, std=CLIP_STD)

    @torch.no_grad()
    def encode(indices: List[int]) -> torch.Tensor:
        from tqdm.auto import tqdm

        model.reset(torch.Generator().manual_seed(args.seed))
        model.to(device).eval()
        feats = []
        for s in tqdm(range(0, len(indices), 256), desc="coreset features", leave=False, disable=args.no_progress):
            chunk = indices[s : s + 256]
            pixels = torch.stack([plain(source.load_image(dataset.pairs[i][0])) for i in chunk]).to(device)
            ids, mask = dataset.input_ids[chunk].to(device), dataset.attention_mask[chunk].to(device)
            feats.append(pair_features(model.image(pixels), model.text.encode_ids(ids, mask)).cpu())
        return torch.cat(feats)

    indices = select_coreset(args.coreset, dataset.pairs, n, args.seed, encode=encode)
    return indices, RealTrainSet(dataset, indices, workers=args.workers)


def run_evaluation(args) -> dict:
    from covmatch.data.build import build_retrieval_data, build_source
    from covmatch.models import build_dual_encoder

    from .protocol import EvalSettings, train_and_evaluate

    preset = get_preset(args.preset, **preset_overrides(args, tuple(EVAL_FLAGS)))
    check_args(args, preset)
    runs = preset.eval_runs
    device = resolve_device(args.device)
    if args.synthetic is not None:
        syn = _load_synthetic(args.synthetic, preset)  # fails fast, before any encoder is built
    weights = resolve_image_weights(preset.image_encoder, preset.image_size, preset.image_weights)
    model = build_dual_encoder(preset, image_weights=weights)
    source = build_source(preset, ann_root=args.ann_root, image_root=args.image_root, seed=0)
    start = time.perf_counter()
    extra = {}
    if args.synthetic is not None:
        syn, train_set = _synthetic_train_set(args, syn, preset, model)
        method, n = "covmatch", len(syn)
        extra["synthetic"] = str(args.synthetic)
    else:
        n = args.num_pairs if args.num_pairs is not None else preset.num_pairs
        indices, train_set = _coreset_train_set(args, preset, model, source, device, n)
        method, n = args.coreset, len(indices)
    test = build_retrieval_data(source, args.split, model.text.tokenizer, preset)
    val = build_retrieval_data(source, "val", model.text.tokenizer, preset) if args.select_on_val else None
    settings = EvalSettings.from_preset(
        preset,
        frozen_text=args.frozen_text,
        select_on_val=args.select_on_val,
        precision=precision_from(args),
        progress=not args.no_progress,
    )
    run_results, epochs = [], []
    for r in range(runs):
        res = train_and_evaluate(model, train_set, test, settings, seed=args.seed + r, device=device, val=val)
        run_results.append(res["metrics"])
        epochs.append(res["epoch"])
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
        "selection": "best val epoch" if args.select_on_val else "final epoch",
        "split": args.split,
        "summary": summarise_runs(run_results),
        "seconds": time.perf_counter() - start,
        "config": {
            "preset": preset.to_dict(),
            "settings": vars(settings),
            "seeds": [args.seed + r for r in range(runs)],
            "image_encoder": model.image.name,
            "text_encoder": model.text.name,
            "device": str(device),
            **extra,
        },
        "covmatch_version": __version__,
    }


def _save_synthetic_grid(syn, model, out: Path) -> None:
    from covmatch.visualize import nearest_tokens, save_image_grid

    captions = nearest_tokens(syn.text_embeds, syn.attention_mask, model.text.embedding_table, model.text.tokenizer)
    title = f"synthetic set ({len(syn)} pairs), captions decoded to nearest tokens"
    meta = syn.metadata
    save_image_grid(
        syn.images, out / "synthetic_grid.png", mean=meta["mean"], std=meta["std"], captions=captions, title=title
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = Path(args.out)
        if args.compare:
            results = [_load_result(d) for d in args.compare]
            out.mkdir(parents=True, exist_ok=True)
            (out / "comparison.md").write_text(results_table(results))
            bar_chart(results, out / "comparison.png")
            print(results_table(results))
            print(f"{PROG}: wrote {out}/comparison.md and {out}/comparison.png")
            return 0
        result = run_evaluation(args)
        _write_results(out, result)
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
