"""Draw the benchmark CSVs as PNGs: ``python -m benchmarks.plot [results_dir]``.

Two figures, so that a GPU run's whole output stays a handful of files: ``loss.png`` (median time of each
implementation per shape; one panel per pass and dtype) and ``step.png`` (seconds per iteration and peak
memory of each configuration, and both against the synthetic batch). Only each CSV's newest run is drawn.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import List

from .common import RESULTS, newest_run, number


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(csv_path: Path, out_dir: Path) -> List[Path]:
    """``loss.png``: one panel per (pass, dtype), bars per implementation and shape, log time axis."""
    rows = newest_run(csv_path)
    if not rows:
        return []
    plt = _pyplot()
    passes = [p for p in ("fwd", "fwdbwd") if any(r["pass"] == p for r in rows)]
    dtypes = [d for d in ("float32", "bfloat16", "float16") if any(r["dtype"] == d for r in rows)]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(
        len(passes), len(dtypes), figsize=(1.1 * len(shapes) * len(dtypes) + 2, 3.2 * len(passes)), squeeze=False
    )
    width = 0.8 / len(impls)
    for i, pss in enumerate(passes):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            items = [r for r in rows if r["pass"] == pss and r["dtype"] == dtype]
            for k, impl in enumerate(impls):
                by_shape = {r["shape"]: number(r["median_ms"]) for r in items if r["impl"] == impl}
                xs = [n + k * width for n, s in enumerate(shapes) if s in by_shape]
                ys = [by_shape[s] for s in shapes if s in by_shape]
                ax.bar(xs, [y if math.isfinite(y) else 0.0 for y in ys], width, label=impl)
            ax.set_xticks([n + 0.4 - width / 2 for n in range(len(shapes))], shapes, fontsize=6, rotation=25)
            if any(number(r["median_ms"]) > 0 for r in items):
                ax.set_yscale("log")
            ax.set_ylabel("median time (ms)", fontsize=8)
            ax.set_title(f"{pss}, {dtype}", fontsize=9)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    first = rows[0]
    fig.suptitle(f"covmatch_loss — {first['device']}, torch {first['torch']}, triton {first['triton']}", fontsize=10)
    fig.tight_layout()
    path = out_dir / "loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def plot_step(out_dir: Path, results: Path) -> List[Path]:
    """``step.png``: s/it and peak memory per configuration (step.csv) and against the synthetic batch
    (step_scaling.csv)."""
    step = newest_run(results / "step.csv")
    scaling = newest_run(results / "step_scaling.csv")
    if not step and not scaling:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    if step:
        labels = [
            f"{r['precision']}{' ckpt' if r['grad_checkpointing'] == 'True' else ''}"
            f"{' chunk' + r['syn_chunk'] if r['syn_chunk'] not in ('0', '') else ''}"
            f"{' zero' + r['zero'] if r.get('zero') not in (None, '', '0') else ''}"
            f"{' NHWC' if r.get('channels_last') == 'True' else ''}"
            f"{' ' + r['compile'] if r.get('compile') not in (None, '', 'eager') else ''}"
            for r in step
        ]
        on_gpu = any(math.isfinite(number(r["peak_mem_gb"])) for r in step)
        memory = ("peak_mem_gb", "peak device memory (GiB)")
        if not on_gpu:
            memory = ("peak_rss_gb", "peak RSS of the process (GiB)")
        for ax, (key, unit) in ((axes[0], ("s_per_it", "s / iteration")), (axes[1], memory)):
            values = [number(r.get(key)) for r in step]
            ax.barh(range(len(step)), [v if math.isfinite(v) else 0.0 for v in values])
            ax.set_yticks(range(len(step)), labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(unit, fontsize=8)
        axes[0].set_title(f"distillation iteration, N={step[0]['syn_batch']}", fontsize=9)
        axes[1].set_title(f"{step[0]['device']}", fontsize=9)
    if scaling:
        ax = axes[2]
        twin = ax.twinx()
        for chunk, style in ((c, s) for c, s in zip(sorted({r["syn_chunk"] for r in scaling}), ("-", "--", ":"))):
            items = sorted((r for r in scaling if r["syn_chunk"] == chunk), key=lambda r: int(r["syn_batch"]))
            xs = [int(r["syn_batch"]) for r in items]
            name = "single pass" if chunk in ("0", "") else f"--syn-chunk {chunk}"
            ax.plot(xs, [number(r["s_per_it"]) for r in items], "o" + style, color="C0", label=f"time, {name}")
            twin.plot(xs, [number(r["peak_mem_gb"]) for r in items], "s" + style, color="C3", label=f"memory, {name}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("synthetic batch", fontsize=8)
        ax.set_ylabel("s / iteration", color="C0", fontsize=8)
        twin.set_ylabel("peak memory (GiB)", color="C3", fontsize=8)
        ax.legend(fontsize=6, loc="upper left")
        twin.legend(fontsize=6, loc="lower right")
        ax.set_title("scaling with the synthetic batch", fontsize=9)
    else:
        axes[2].axis("off")
    fig.tight_layout()
    path = out_dir / "step.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    results = Path(argv[0]) if argv else RESULTS
    written = []
    written += plot_loss(results / "loss.csv", results)
    written += plot_step(results, results)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
