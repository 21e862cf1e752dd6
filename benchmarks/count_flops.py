"""Model FLOPs of one distillation iteration, counted on any device (FLOPs do not depend on it):
``python -m benchmarks.count_flops [--preset paper] [--real-batch 128] [--syn-batch 256]``.

Counting the paper's configuration at its full batches takes minutes on a CPU, so the iteration is counted
(``torch.utils.flop_counter``) at three small (real, synthetic) batch pairs; its FLOPs are linear in the two
batch sizes (every encoder pass is per sample; the loss and InfoNCE terms are negligible), so the three
counts give a constant, a cost per real pair and a cost per synthetic pair, and the total at the requested
batches. The fourth count at another pair checks the linearity. No weights are needed (random init).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch

os.environ.setdefault("COVMATCH_BENCH_SMOKE", "1")  # counting runs on the CPU, whatever the machine has

from .common import add_batch_arguments  # noqa: E402 (reads the variable above at import)


def count_iteration(preset_name: str, real_batch: int, syn_batch: int) -> float:
    """FLOPs of one plain fp32 ``Distiller.step`` at these batch sizes (paper: the GPU suite's configuration)."""
    from .bench_step import PAPER, _device_batches, _distiller, _model_flops

    base = dict(PAPER) if preset_name == "paper" else {"name": preset_name}
    base["real_batch"] = real_batch
    d = _distiller("fp32", False, None, syn_batch, base=base)
    return _model_flops(d, _device_batches(d, 0, 1)[0])


def fit(counts: Dict[Tuple[int, int], float]) -> Tuple[float, float, float]:
    """(constant, per real pair, per synthetic pair) from counts at (r, s), (2r, s) and (r, 2s)."""
    (r, s), (r2, _), (_, s2) = list(counts)[:3]
    base = counts[(r, s)]
    per_real = (counts[(r2, s)] - base) / (r2 - r)
    per_syn = (counts[(r, s2)] - base) / (s2 - s)
    return base - r * per_real - s * per_syn, per_real, per_syn


def main(argv: Optional[List[str]] = None) -> List[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", help="paper (the GPU suite's configuration) or a preset name")
    add_batch_arguments(parser, (4, 8), "the smallest counted batches (the others double one of them)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    r, s = args.small
    counts = {}
    for pair in ((r, s), (2 * r, s), (r, 2 * s), (2 * r, 2 * s)):
        counts[pair] = count_iteration(args.preset, *pair)
    constant, per_real, per_syn = fit(counts)
    predicted = constant + 2 * r * per_real + 2 * s * per_syn
    check = abs(predicted - counts[(2 * r, 2 * s)]) / counts[(2 * r, 2 * s)]
    total = constant + args.real_batch * per_real + args.syn_batch * per_syn
    lines = [
        f"preset {args.preset}: counted at (real, synthetic) = {', '.join(str(p) for p in counts)}",
        f"per real pair {per_real / 1e9:.2f} GFLOP, per synthetic pair {per_syn / 1e9:.2f} GFLOP, "
        f"constant {constant / 1e9:.3f} GFLOP; linearity check at {(2 * r, 2 * s)}: {100 * check:.3f} % off",
        f"one iteration at real {args.real_batch}, synthetic {args.syn_batch}: {total / 1e9:.6g} GFLOP "
        f"= {total / 1e12:.2f} TFLOP ({total / 0.1 / 1e12:.0f} TFLOP/s for 0.1 s per iteration)",
    ]
    for line in lines:
        print(line)
    return lines


if __name__ == "__main__":
    main()
    sys.exit(0)
