"""Draw the benchmark CSVs as PNGs: ``python -m benchmarks.plot [results_dir]``."""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

from .common import RESULTS


def plot_loss(csv_path: Path, out_dir: Path) -> list:
    """One PNG per (pass, dtype): median time of each implementation per shape, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    if not rows:
        return []
    latest = max(r["timestamp"] for r in rows)[:13]  # the newest run (same hour)
    rows = [r for r in rows if r["timestamp"].startswith(latest)]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["pass"], r["dtype"])].append(r)
    written = []
    for (pss, dtype), items in sorted(groups.items()):
        shapes = sorted({r["shape"] for r in items}, key=lambda s: [r["shape"] for r in items].index(s))
        impls = sorted({r["impl"] for r in items})
        fig, ax = plt.subplots(figsize=(1.3 * len(shapes) + 2, 3.4))
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            by_shape = {r["shape"]: float(r["median_ms"]) for r in items if r["impl"] == impl}
            xs = [i + j * width for i, s in enumerate(shapes) if s in by_shape]
            ax.bar(xs, [by_shape[s] for s in shapes if s in by_shape], width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, fontsize=7, rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"covmatch_loss {pss}, {dtype} — {items[0]['device']}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"loss_{pss}_{dtype}.png"
        fig.savefig(path, dpi=130)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    results = Path(argv[0]) if argv else RESULTS
    written = []
    if (results / "loss.csv").exists():
        written += plot_loss(results / "loss.csv", results)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
