"""The headline table of a benchmark run, checked against the project's performance targets, as Markdown:
``python -m benchmarks.summarize [results_dir]`` (what the README's benchmark table is made from).

Every ratio is taken within the run (same device, same process where possible); a target whose cases did
not run (time limit, smoke mode) is reported as not measured, never as met.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Dict, List, Tuple

from .common import RESULTS, newest_run, number

# Dense tensor-core peaks from the vendor's data sheets (TFLOP/s, without sparsity); fp32 is the
# non-tensor-core rate, since our fp32 matmuls do not enable TF32. Used only for utilisation.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.5, "fp16": 989.5, "fp32": 66.9},
    "H100": {"bf16": 989.5, "fp16": 989.5, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}


def device_peak(device: str, precision: str) -> float:
    for name, peaks in PEAK_TFLOPS.items():
        if name in device:
            return peaks.get(precision, float("nan"))
    return float("nan")


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if math.isfinite(x) else "n/a"


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%" if math.isfinite(x) else "n/a"


def _check(value: float, target: float, at_most: bool, smoke: bool = False) -> str:
    if smoke:
        return "smoke mode: no claim"
    if not math.isfinite(value):
        return "not measured"
    met = value <= target if at_most else value >= target
    return "met" if met else "missed"


def _loss_time(rows: List[Dict[str, str]], shape: str, dtype: str, impl: str, pss: str = "fwdbwd") -> float:
    for r in rows:
        if (r["shape"], r["dtype"], r["impl"], r["pass"]) == (shape, dtype, impl, pss):
            return number(r["median_ms"])
    return float("nan")


def _loss_floor(rows: List[Dict[str, str]], shape: str, dtype: str, pss: str = "fwdbwd") -> float:
    for r in rows:
        if (r["shape"], r["dtype"], r["pass"]) == (shape, dtype, pss) and math.isfinite(number(r["gemm_floor_ms"])):
            return number(r["gemm_floor_ms"])
    return float("nan")


Check = Tuple[str, float, float, bool]  # (what, measured, bound, bound is an upper bound)


def loss_section(
    rows: List[Dict[str, str]], headline: str = "paper", square: str = "square-4096-N=10000"
) -> Tuple[List[str], List[Check]]:
    """Per dtype at the paper shape (forward+backward): each implementation's median, the fused kernel's
    speed-ups and its ratio to the GEMM floor; then the square d = 4096, N = 10,000 case against its floor."""
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    out = [
        f"covmatch_loss forward+backward, `{headline}` shape (median ms; targets: >= 3x eager, >= 1.5x "
        "torch.compile, <= 1.5x the GEMM floor)",
        "",
        "| dtype | triton | (cov form) | (Gram form) | torch | eager | compiled | GEMM floor | eager / triton "
        "| compiled / triton | triton / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks: List[Check] = []
    for dtype in dtypes:
        impls = ("triton", "triton-cov", "triton-gram", "torch", "eager", "compiled")
        t = {impl: _loss_time(rows, headline, dtype, impl) for impl in impls}
        floor = _loss_floor(rows, headline, dtype)
        vs_eager, vs_compiled, vs_floor = t["eager"] / t["triton"], t["compiled"] / t["triton"], t["triton"] / floor
        out.append(
            f"| {dtype} | {_fmt(t['triton'])} | {_fmt(t['triton-cov'])} | {_fmt(t['triton-gram'])} | "
            f"{_fmt(t['torch'])} | {_fmt(t['eager'])} | {_fmt(t['compiled'])} | "
            f"{_fmt(floor)} | {_fmt(vs_eager)} | {_fmt(vs_compiled)} | {_fmt(vs_floor)} |"
        )
        checks += [
            (f"{dtype}: triton vs eager", vs_eager, 3.0, False),
            (f"{dtype}: triton vs torch.compile", vs_compiled, 1.5, False),
            (f"{dtype}: triton / GEMM floor", vs_floor, 1.5, True),
        ]
        square_ratio = _loss_time(rows, square, dtype, "triton") / _loss_floor(rows, square, dtype)
        checks.append((f"{dtype}: triton / GEMM floor at {square}", square_ratio, 1.2, True))
    errors = [number(r.get("grad_rel_err", "nan")) for r in rows]
    worst = max((e for e in errors if math.isfinite(e)), default=float("nan"))
    out += ["", f"Largest gradient error against float64 in this run: {_fmt(worst)} (relative, any case)."]
    return out, checks


def host_section(rows: List[Dict[str, str]]) -> List[str]:
    """Host time per forward+backward call at a tiny shape (bench_host.py): what a launch-bound call costs
    besides GPU work, per implementation, with the torch ops it dispatches; no target, an explanation."""
    eager = {r["lam"]: number(r.get("median_us")) for r in rows if r["impl"] == "eager"}
    out = [
        "Host time of one covmatch_loss forward+backward call at a tiny shape (median us; `+launch`: with",
        "Triton's launcher, else the launches stubbed out; ops: torch ops dispatched besides allocations and views)",
        "",
        "| implementation | lam | host us | torch ops | / eager |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        host = number(r.get("median_us"))
        ratio = host / eager.get(r["lam"], float("nan")) if r["impl"] != "gemm-floor" else float("nan")
        out.append(f"| {r['impl']} | {r['lam']} | {_fmt(host)} | {r.get('torch_ops', '')} | {_fmt(ratio)} |")
    return out


COMPILE_MODES = ("eager", "compile", "cuda-graphs")


def _is_case(r: Dict[str, str], precision: str, checkpointing: bool, mode: str = "eager") -> bool:
    """Whether a step row is the single-pass, single-process, channels-first case of these settings."""
    return (
        (r["precision"], r["grad_checkpointing"], r["syn_chunk"], r.get("zero") or "0")
        == (precision, str(checkpointing), "0", "0")
        and r.get("channels_last") in (None, "", "False")
        and (r.get("compile") or "eager") == mode
    )


def step_section(step: List[Dict[str, str]], scaling: List[Dict[str, str]]) -> Tuple[List[str], List[Check]]:
    """The bf16 headline iteration (time, busy share, launches and memory, eager, compiled and in CUDA graphs;
    counted FLOPs and utilisation, loss share) and the synthetic-batch memory sweep with ``--syn-chunk``."""
    out: List[str] = []
    checks: List[Check] = []
    if step:
        out += [
            f"Distillation iteration (`{step[0]['preset']}` preset, real batch {step[0]['real_batch']}, synthetic "
            f"batch {step[0]['syn_batch']}; median of the measured iterations; launches: kernels and CUDA graphs "
            "the host started in one profiled iteration)",
            "",
            "| precision | checkpointing | --syn-chunk | ZeRO | channels last | compile | s / it | peak GiB "
            "| model TFLOP / it | TFLOP/s | utilisation | GPU busy | launches | loss share (profiler) "
            "| loss share (isolated) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in step:
            achieved = number(r.get("achieved_tflops"))
            util = achieved / device_peak(r["device"], r["precision"])
            out.append(
                f"| {r['precision']} | {r['grad_checkpointing']} | {r['syn_chunk']} | {r.get('zero', '0')} | "
                f"{r.get('channels_last') or 'False'} | {r.get('compile') or 'eager'} | "
                f"{_fmt(number(r['s_per_it']))} | {_fmt(number(r['peak_mem_gb']))} | "
                f"{_fmt(number(r.get('model_tflop_per_it')))} | {_fmt(achieved)} | {_percent(util)} | "
                f"{_percent(number(r.get('gpu_busy_share')))} | {_fmt(number(r.get('launches_per_it')), 4)} | "
                f"{_fmt(number(r.get('loss_share_profiled')), 2)} | {_fmt(number(r.get('loss_share_isolated')), 2)} |"
            )
    checks += _headline_checks(step)
    nan = float("nan")

    def by_batch(chunked: bool, key: str) -> Dict[int, float]:
        return {
            int(r["syn_batch"]): number(r.get(key)) for r in scaling if (r["syn_chunk"] not in ("0", "")) == chunked
        }

    chunked, single = by_batch(True, "peak_mem_gb"), by_batch(False, "peak_mem_gb")
    chunked_rest, state = by_batch(True, "peak_excl_syn_state_gb"), by_batch(True, "syn_state_gb")
    times = by_batch(True, "s_per_it")
    if chunked or single:
        out += [
            "",
            "Peak memory (GiB) and time against the synthetic batch (bf16; the set's own storage is its pixels",
            "and captions, their gradients and momentum, which grow with N whatever the chunking):",
            "",
        ]
        out += [
            "| synthetic batch | single pass | --syn-chunk | of which the set's storage | --syn-chunk, rest | "
            "--syn-chunk s / it |",
            "|---|---|---|---|---|---|",
        ]
        for n in sorted(set(chunked) | set(single)):
            out.append(
                f"| {n} | {_fmt(single.get(n, nan))} | {_fmt(chunked.get(n, nan))} | {_fmt(state.get(n, nan))} | "
                f"{_fmt(chunked_rest.get(n, nan))} | {_fmt(times.get(n, nan))} |"
            )
    lo, hi = min(chunked, default=0), max(chunked, default=0)
    growth = chunked[hi] / chunked[lo] if chunked and hi > lo else nan
    rest = chunked_rest.get(hi, nan) / chunked_rest.get(lo, nan) if chunked and hi > lo else nan
    checks.append((f"--syn-chunk peak memory, batch {hi} / batch {lo}", growth, 1.10, True))
    checks.append((f"the same without the set's own storage, {hi} / {lo}", rest, 1.10, True))
    return out, checks


def _headline_checks(step: List[Dict[str, str]]) -> List[Check]:
    """Time and GPU busy share of the fastest bf16 headline mode (eager, --compile or --cuda-graphs), peak
    memory eager and with activation checkpointing, and the compiled modes' launches against eager's."""
    nan = float("nan")
    first = {mode: next((r for r in step if _is_case(r, "bf16", False, mode)), None) for mode in COMPILE_MODES}
    measured = {mode: r for mode, r in first.items() if r is not None and math.isfinite(number(r["s_per_it"]))}
    fastest = min(measured, key=lambda mode: number(measured[mode]["s_per_it"]), default="eager")
    best = measured.get(fastest)
    checkpointed = next((r for r in step if _is_case(r, "bf16", True)), None)
    eager = first["eager"]
    checks: List[Check] = [
        (f"bf16 iteration, s ({fastest})", number(best["s_per_it"]) if best else nan, 0.1, True),
        (f"bf16 iteration, GPU busy ({fastest})", number(best.get("gpu_busy_share")) if best else nan, 0.8, False),
        ("bf16 iteration, peak GiB", number(eager["peak_mem_gb"]) if eager else nan, 8.0, True),
        ("bf16 iteration with checkpointing, peak GiB", number(checkpointed["peak_mem_gb"]) if checkpointed else nan,
         8.0, True),
    ]  # fmt: skip
    eager_launches = number(eager.get("launches_per_it")) if eager else nan
    for mode in COMPILE_MODES[1:]:
        r = first[mode]
        ratio = number(r.get("launches_per_it")) / eager_launches if r else nan
        checks.append((f"launches per iteration, --{mode} / eager", ratio, 0.2, True))
    return checks


def summarize(results: Path) -> str:
    """Markdown: the environment line, the loss and step tables, and every target with met / missed."""
    lines: List[str] = []
    checks: List[Check] = []
    first = None
    rows = newest_run(results / "loss.csv")
    if rows:
        first = rows[0]
        section, found = loss_section(rows)
        lines += section + [""]
        checks += found
    host = newest_run(results / "host.csv")
    if host:
        first = first or host[0]
        lines += host_section(host) + [""]
    step = newest_run(results / "step.csv")
    scaling = newest_run(results / "step_scaling.csv")
    if step or scaling:
        first = first or (step or scaling)[0]
        section, found = step_section(step, scaling)
        lines += section + [""]
        checks += found
    if first is None:
        return f"no benchmark CSVs in {results}\n"
    header = (
        f"Device: {first['device']} (driver {first.get('driver') or 'n/a'}), torch {first['torch']}, "
        f"triton {first['triton']}, covmatch {first['covmatch']}, run {first.get('run', '?')}"
        + (" — SMOKE MODE, no timing claims" if first.get("smoke") == "True" else "")
    )
    lines = [header, ""] + lines
    if checks:
        lines += ["| target | measured | bound | result |", "|---|---|---|---|"]
    for name, value, bound, at_most in checks:
        relation = "<=" if at_most else ">="
        result = _check(value, bound, at_most, smoke=first.get("smoke") == "True")
        lines.append(f"| {name} | {_fmt(value)} | {relation} {bound} | {result} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print(summarize(Path(argv[0]) if argv else RESULTS), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
