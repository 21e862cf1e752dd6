"""Shared benchmark plumbing: smoke mode, device facts, timing percentiles, peak memory, CSV rows.

On a CUDA machine the suite measures for real and appends to ``benchmarks/results/*.csv``; elsewhere it
runs in smoke mode (tiny shapes, the Triton interpreter, results to a temporary directory) so that CI
keeps it working without asserting anything about time.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# rows of one run share this (run_gpu.sh sets it for all its stages; else the process's start time)
RUN_ID = os.environ.get("COVMATCH_BENCH_RUN") or datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
SMOKE = os.environ.get("COVMATCH_BENCH_SMOKE", "auto") == "1" or (
    os.environ.get("COVMATCH_BENCH_SMOKE", "auto") == "auto" and not torch.cuda.is_available()
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not SMOKE else "cpu")


def results_dir() -> Path:
    """Where CSVs go: ``COVMATCH_BENCH_RESULTS``, else benchmarks/results (GPU) or a temp dir (smoke)."""
    env = os.environ.get("COVMATCH_BENCH_RESULTS")
    if env:
        return Path(env)
    if SMOKE:
        return Path(tempfile.gettempdir()) / "covmatch-bench-smoke"
    return RESULTS


def _cpu_name() -> str:
    """The CPU's model name and core count (Linux /proc/cpuinfo), else the platform's machine type."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def device_facts() -> Dict[str, str]:
    """Device name and driver (nvidia-ml-py when present), and the software versions of this run."""
    import covmatch

    facts = {
        "device": _cpu_name(),
        "driver": "",
        "torch": torch.__version__,
        "triton": "",
        "covmatch": covmatch.__version__,
        "smoke": str(SMOKE),
    }
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        pass
    if DEVICE.type == "cuda":
        facts["device"] = torch.cuda.get_device_name(DEVICE)
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(DEVICE.index or 0)
            name = pynvml.nvmlDeviceGetName(handle)
            facts["device"] = name.decode() if isinstance(name, bytes) else name
            driver = pynvml.nvmlSystemGetDriverVersion()
            facts["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        except Exception:  # nvidia-ml-py missing or NVML unavailable: keep torch's name
            pass
    return facts


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def percentiles(samples: List[float]) -> Dict[str, float]:
    """Median, p20 and p80 of a list of seconds, in milliseconds."""
    data = sorted(samples)

    def q(p: float) -> float:
        if len(data) == 1:
            return data[0]
        pos = p * (len(data) - 1)
        lo, hi = int(pos), min(int(pos) + 1, len(data) - 1)
        return data[lo] + (data[hi] - data[lo]) * (pos - lo)

    return {"median_ms": 1e3 * q(0.5), "p20_ms": 1e3 * q(0.2), "p80_ms": 1e3 * q(0.8)}


def run_benchmark(
    benchmark,
    fn: Callable[[], object],
    *,
    rounds: int = 20,
    warmup: int = 3,
    iterations: int = 1,
    synchronized: bool = True,
) -> Dict[str, float]:
    """Time ``fn`` with pytest-benchmark and return median/p20/p80 per call in ms: each call synchronised
    with the device, or (``synchronized=False``, for host cost) ``iterations`` calls per round, unsynchronised."""

    def timed():
        fn()
        synchronize()

    if SMOKE:
        rounds, warmup, iterations = 1, 0, 1
    target = timed if synchronized else fn
    benchmark.pedantic(target, rounds=rounds, iterations=iterations, warmup_rounds=warmup)
    samples = list(getattr(benchmark.stats, "stats", benchmark.stats).data) if benchmark.stats else []
    if not samples:  # --benchmark-disable: pytest-benchmark ran it once without timing
        return {"median_ms": float("nan"), "p20_ms": float("nan"), "p80_ms": float("nan")}
    return percentiles(samples)


def device_time_ms(fn: Callable[[], object], *, warmup_ms: int = 10, rep_ms: int = 50) -> Dict[str, float]:
    """Median, p20 and p80 of ``fn`` in ms by CUDA events (``triton.testing.do_bench``: L2 flushed between
    calls, no host synchronisation inside the timed region), the method every GPU ratio uses; NaN off CUDA."""
    if DEVICE.type != "cuda":
        return {"median_ms": float("nan"), "p20_ms": float("nan"), "p80_ms": float("nan")}
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": float(median), "p20_ms": float(p20), "p80_ms": float(p80)}


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated by one call of ``fn`` above what was allocated before (NaN on CPU)."""
    if DEVICE.type != "cuda":
        return float("nan")
    synchronize()
    torch.cuda.reset_peak_memory_stats(DEVICE)
    base = torch.cuda.memory_allocated(DEVICE)
    fn()
    synchronize()
    return (torch.cuda.max_memory_allocated(DEVICE) - base) / 2**20


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB), in GiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def append_row(name: str, row: Dict[str, object], path: Optional[Path] = None) -> Path:
    """Append ``row`` (plus device facts and a timestamp) to ``<results>/<name>.csv``; a file started with
    other columns is rewritten with the union of both (missing cells left empty)."""
    path = path or results_dir() / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    full = {"timestamp": now, "run": RUN_ID, **device_facts()}
    full.update(row)
    header = []
    if path.exists():
        with path.open(newline="") as fh:
            header = list(csv.DictReader(fh).fieldnames or [])
    if header and not set(full) <= set(header):  # new columns since the file was started: rewrite with the union
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header + [k for k in full if k not in header])
            writer.writeheader()
            writer.writerows(rows + [full])
        os.replace(tmp, path)
        return path
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header or list(full))
        if not header:
            writer.writeheader()
        writer.writerow(full)
    return path


def newest_run(csv_path: Path) -> List[Dict[str, str]]:
    """The rows of ``csv_path`` from the run of its newest row (its ``run`` column); none if it is missing."""
    if not csv_path.exists():
        return []
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return []
    latest = max(rows, key=lambda r: r["timestamp"]).get("run")
    return [r for r in rows if r.get("run") == latest]


def number(text: str) -> float:
    """A CSV cell as a float (NaN for empty or missing cells)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def add_batch_arguments(parser, small: tuple, small_help: str) -> None:
    """The counting scripts' batch flags: the batch sizes to extrapolate to and the smallest counted ones."""
    parser.add_argument("--real-batch", type=int, default=128)
    parser.add_argument("--syn-batch", type=int, default=256)
    parser.add_argument("--small", type=int, nargs=2, default=small, metavar=("REAL", "SYN"), help=small_help)
