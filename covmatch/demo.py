"""``python -m covmatch.demo`` (``make demo``): the main job on the embedded default.

Distils N pairs from an embedded dataset (the ``demo`` preset's shapes, or ``--preset glyphs``, the glyph
scenes), evaluates them against a random subset of the same size with the same protocol, and prints the
comparison. Everything lands in ``--out`` (default ``runs/demo``): the synthetic set, its image grid with
decoded captions, result tables and charts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from covmatch.distill.cli import main as distill_main
from covmatch.eval.cli import main as eval_main

__all__ = ["main"]

EMBEDDED_PRESETS = ("demo", "glyphs", "tiny")  # presets whose data ship with the package


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="covmatch-demo", description="distil N pairs from embedded data, evaluate them against N random pairs"
    )
    parser.add_argument("--preset", choices=EMBEDDED_PRESETS, default="demo", help="a preset on embedded data")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where everything is written")
    parser.add_argument("--num-pairs", type=int, default=100, help="N synthetic pairs (and random pairs)")
    parser.add_argument("--iterations", type=int, default=None, help="distillation iterations (default: preset)")
    parser.add_argument("--runs", type=int, default=None, help="evaluation runs per method (default: preset)")
    parser.add_argument("--epochs", type=int, default=None, help="evaluation epochs (default: preset)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args(argv)
    out: Path = args.out
    common = ["--preset", args.preset, "--device", args.device]
    eval_extra: List[str] = []
    if args.runs is not None:
        eval_extra += ["--runs", str(args.runs)]
    if args.epochs is not None:
        eval_extra += ["--epochs", str(args.epochs)]
    steps = [
        ("distil", distill_main, [*common, "--num-pairs", str(args.num_pairs), "--out", str(out / "distill"),
                                  "--overwrite", *(["--iterations", str(args.iterations)] if args.iterations else [])]),
        ("evaluate CovMatch", eval_main, [*common, "--synthetic", str(out / "distill"), "--out",
                                          str(out / "eval-covmatch"), "--overwrite", *eval_extra]),
        ("evaluate random pairs", eval_main, [*common, "--coreset", "random", "--num-pairs", str(args.num_pairs),
                                              "--out", str(out / "eval-random"), "--overwrite", *eval_extra]),
    ]  # fmt: skip
    timings = []
    for name, fn, step_argv in steps:
        print(f"\n== {name} ==", flush=True)
        start = time.perf_counter()
        rc = fn(step_argv)
        timings.append((name, time.perf_counter() - start))
        if rc != 0:
            print(f"covmatch-demo: step '{name}' failed (exit code {rc})", file=sys.stderr)
            return rc
    print("\n== comparison ==", flush=True)
    rc = eval_main(["--compare", str(out / "eval-covmatch"), str(out / "eval-random"), "--out", str(out)])
    print("\nwall time: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings))
    print(
        f"outputs in {out}/: distill/ (synthetic set, grids/), eval-covmatch/ (results, synthetic_grid.png), "
        "eval-random/, comparison.md, comparison.png"
    )
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
