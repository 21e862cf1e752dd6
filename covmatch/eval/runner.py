"""``evaluate(EvalConfig)``: the Python entry point of evaluation, as ``distill(DistillConfig)`` is of
distillation. ``covmatch-eval`` parses its flags into an ``EvalConfig`` and calls it."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional

from covmatch._version import __version__
from covmatch.data.build import build_retrieval_data, build_source
from covmatch.data.cache import CachedSource, DecodedCache, cache_side
from covmatch.data.generated import GENERATED_DATASETS
from covmatch.devices import resolve_device
from covmatch.errors import ConfigError
from covmatch.pretrain import pretrained_dual_encoder
from covmatch.settings import resolved_workers
from covmatch.synthetic import SyntheticSet
from covmatch.visualize import nearest_tokens, save_image_grid

from .config import RESAMPLED, EvalConfig
from .protocol import EvalSettings, train_and_evaluate
from .results import bar_chart, summarise_runs, write_result
from .training_sets import coreset_train_set, load_synthetic_for, synthetic_train_set

__all__ = ["evaluate", "check_out_dir", "resolve_data_seed"]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def check_out_dir(config: EvalConfig) -> None:
    """An --out that is not a directory, or that already holds results (unless ``overwrite``), is refused."""
    if config.out is None:
        return
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out {out} exists and is not a directory", field="out")
    if (out / "results.json").exists() and not config.overwrite:
        raise ConfigError(
            f"out {out} already holds results.json; pass overwrite to replace it", field="out", mentions=("overwrite",)
        )


def resolve_data_seed(config: EvalConfig, syn: Optional[SyntheticSet]) -> int:
    """The embedded dataset's draw to evaluate on: the one the set was distilled from (a set made before
    ``data_seed`` existed drew its data with its ``seed``), unless ``data_seed`` says otherwise, which is
    refused without ``allow_data_seed_mismatch``. Karpathy data has no draw."""
    if syn is None or config.preset.dataset not in GENERATED_DATASETS:
        return config.data_seed if config.data_seed is not None else 0
    meta = syn.metadata
    distilled = meta.get("data_seed", (meta.get("hyperparameters") or {}).get("seed", 0))
    if config.data_seed is None or config.data_seed == distilled:
        return int(distilled)
    if not config.allow_data_seed_mismatch:
        raise ConfigError(
            f"data_seed {config.data_seed}: {config.synthetic} was distilled from data seed {distilled}; pass "
            "allow_data_seed_mismatch to evaluate it on another draw of the dataset",
            field="data_seed", mentions=("allow_data_seed_mismatch",),
        )  # fmt: skip
    return config.data_seed


def evaluate(config: EvalConfig, *, log: Callable[[str], None] = _stderr) -> dict:
    """Train and score ``preset.eval_runs`` fresh models on the set or coreset ``config`` names; return the result
    (every run, every metric, the config) and, when ``config.out`` is set, write ``results.json``, ``results.md``
    and the PNGs there, all at the end, so that a failed evaluation writes nothing."""
    check_out_dir(config)
    preset = config.preset
    runs = preset.eval_runs
    device = resolve_device(config.device)
    syn = load_synthetic_for(config.synthetic, preset) if config.synthetic is not None else None  # fails fast
    data_seed = resolve_data_seed(config, syn)
    model = pretrained_dual_encoder(preset, progress=config.progress)
    source = build_source(
        preset, ann_root=config.ann_root, image_root=config.image_root, data_dir=config.data_dir, seed=data_seed
    )
    if config.data_cache is not None:  # images from the decoded cache instead of their files
        needed = dict.fromkeys(
            (["train"] if config.coreset is not None else [])
            + [config.split]
            + (["val"] if config.select_on_val else [])
        )
        side = cache_side(preset.image_size, augment=preset.train_augment)
        source = CachedSource(source, DecodedCache.open(config.data_cache, source, side=side, splits=list(needed)))
    decodes_files = preset.dataset not in GENERATED_DATASETS and config.data_cache is None
    workers = resolved_workers(config.workers, decodes_files=decodes_files)
    start = time.perf_counter()
    extra = {}
    frozen_text = config.frozen_text
    if syn is not None:
        syn, train_set, frozen_text = synthetic_train_set(
            syn, model, preset.seq_len, frozen_text=frozen_text, where=str(config.synthetic)
        )
        method, n = "covmatch", len(syn)
        extra["synthetic"] = str(config.synthetic)
        if "changed_token_share" in syn.metadata:  # of caption tokens, since initialisation
            extra["changed_token_share"] = syn.metadata["changed_token_share"]
        if "mapped_from" in syn.metadata:
            extra["captions_carried_from"] = syn.metadata["mapped_from"]
        train_sets = [train_set] * runs
    else:
        n = preset.num_pairs
        # random subsets are drawn anew for every run, so the spread covers which pairs were drawn
        resampled = config.coreset in RESAMPLED
        subset_seeds = [config.seed + r for r in range(runs)] if resampled else [config.seed] * runs
        chosen = {}
        for seed in dict.fromkeys(subset_seeds):
            chosen[seed] = coreset_train_set(
                config.coreset, n, model, source, preset, device, seed=seed, workers=workers,
                progress=config.progress,
            )  # fmt: skip
        train_sets = [chosen[seed][1] for seed in subset_seeds]
        method, n = config.coreset, len(chosen[subset_seeds[0]][0])
        extra["subset_seeds"] = subset_seeds
    test = build_retrieval_data(source, config.split, model.text.tokenizer, preset)
    val = build_retrieval_data(source, "val", model.text.tokenizer, preset) if config.select_on_val else None
    settings = EvalSettings.from_preset(
        preset,
        frozen_text=frozen_text,
        train=config.train,
        select_on_val=config.select_on_val,
        precision=config.precision,
        progress=config.progress,
    )
    run_results, epochs, histories = [], [], []
    for r in range(runs):
        res = train_and_evaluate(model, train_sets[r], test, settings, seed=config.seed + r, device=device, val=val)
        run_results.append(res["metrics"])
        epochs.append(res["epoch"])
        histories.append(res["history"])
        log(f"covmatch-eval: run {r + 1}/{runs} ({method}, N={n}): mean recall {res['metrics']['mean']:.2f}")
    result = {
        "method": method,
        "num_pairs": n,
        "runs": run_results,
        "epochs_reported": epochs,
        "histories": histories,  # per run, per epoch: training loss (and val mean recall when selecting on val)
        "selection": "best val epoch" if config.select_on_val else "final epoch",
        "split": config.split,
        "summary": summarise_runs(run_results),
        "seconds": time.perf_counter() - start,
        "config": {
            "preset": preset.to_dict(),
            "settings": vars(settings),
            "seeds": [config.seed + r for r in range(runs)],
            "data_seed": data_seed,
            "image_encoder": model.image.name,
            "image_encoder_kwargs": model.image.model_kwargs,
            "text_encoder": model.text.name,
            "device": str(device),
            **extra,
        },
        "covmatch_version": __version__,
    }
    if config.out is not None:
        out = Path(config.out)
        if syn is not None:
            _save_synthetic_grid(syn, model, out)
        write_result(out, result)
        bar_chart([result], out / "recall.png")
    return result


def _save_synthetic_grid(syn, model, out: Path) -> None:
    captions = nearest_tokens(syn.text_embeds, syn.attention_mask, model.text.embedding_table, model.text.tokenizer)
    title = f"synthetic set ({len(syn)} pairs), captions decoded to nearest tokens"
    meta = syn.metadata
    save_image_grid(
        syn.images, out / "synthetic_grid.png", mean=meta["mean"], std=meta["std"], captions=captions, title=title
    )
