"""Microbenchmarks of ``covmatch_loss``: our triton and torch backends against the plain eager formula and
that formula under ``torch.compile``, forward and forward+backward, with time percentiles, effective
TFLOP/s, the ratio to a GEMM-only floor, peak memory and the error against a float64 reference.

    pytest benchmarks/bench_loss.py            # GPU: real measurements -> benchmarks/results/loss.csv
    COVMATCH_BENCH_SMOKE=1 pytest benchmarks/   # smoke: tiny shapes, interpreter, no timing claims
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from covmatch import covmatch_loss
from covmatch.kernels import tuned_configs
from covmatch.loss.functional import loss_flops
from tests.reference import eager_covmatch_loss, float64_loss_and_grads, relative_error

from .common import DEVICE, SMOKE, append_row, device_time_ms, peak_memory_mb, run_benchmark

# (name, n_real, n_syn, d_img, d_txt)
if SMOKE:
    SHAPES = [("smoke-a", 6, 5, 16, 8), ("smoke-b", 12, 7, 20, 9)]
    DTYPES = [torch.float32, torch.float16]
else:
    SHAPES = [
        ("paper", 128, 256, 2304, 768),
        ("N=100", 128, 100, 2304, 768),
        ("N=1000", 128, 1000, 2304, 768),
        ("N=10000", 128, 10_000, 2304, 768),
        ("square-4096", 128, 256, 4096, 4096),
        ("square-4096-N=10000", 128, 10_000, 4096, 4096),
    ]
    DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# the target shapes: torch.compile (whose compile time is paid per shape, dtype and pass) and each of the
# fused kernel's two forms forced (``triton`` is form="auto", which picks the one with fewer FLOPs)
HEADLINE_SHAPES = {"smoke-a", "paper", "square-4096-N=10000"}
IMPLS = ["triton", "torch", "eager", "compiled", "triton-cov", "triton-gram", "hybrid"]
HEADLINE_ONLY = {"compiled", "triton-cov", "triton-gram", "hybrid"}
RHO, LAM = 2.0, 0.1


@functools.cache
def _compiled():
    # One graph per shape, dtype and pass (dynamic=False): more than dynamo's default of 8 recompilations of
    # one function, past which it would silently run the eager formula and time that as "compiled".
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    return torch.compile(eager_covmatch_loss, backend="aot_eager" if SMOKE else "inductor", dynamic=False)


def make_loss_fn(impl: str):
    if impl in ("triton", "torch", "hybrid"):
        return lambda *xs: covmatch_loss(*xs, rho=RHO, lam=LAM, backend=impl)
    if impl.startswith("triton-"):
        return lambda *xs: covmatch_loss(*xs, rho=RHO, lam=LAM, backend="triton", form=impl.split("-", 1)[1])
    if impl == "eager":
        return lambda *xs: eager_covmatch_loss(*xs, rho=RHO, lam=LAM)
    return lambda *xs: _compiled()(*xs, rho=RHO, lam=LAM)


def make_inputs(shape, dtype, requires_grad: bool):
    _, n_real, n_syn, d_img, d_txt = shape
    gen = torch.Generator().manual_seed(0)
    out = []
    for n, d, grad in ((n_real, d_img, False), (n_real, d_txt, False), (n_syn, d_img, True), (n_syn, d_txt, True)):
        t = (torch.randn(n, d, generator=gen) + torch.rand(d, generator=gen)).to(DEVICE, dtype)
        out.append(t.requires_grad_(grad and requires_grad))
    return out


def gemm_floor_ms(shape, dtype, backward: bool) -> float:
    """Time of the unavoidable cuBLAS products: X_T^T Y_T and X_S^T Y_S (+ D Y_S^T and X_S D backward)."""
    if SMOKE:
        return float("nan")
    _, n_real, n_syn, d_img, d_txt = shape
    xr, yr = (
        torch.randn(n_real, d_img, device=DEVICE, dtype=dtype),
        torch.randn(n_real, d_txt, device=DEVICE, dtype=dtype),
    )
    xs, ys = (
        torch.randn(n_syn, d_img, device=DEVICE, dtype=dtype),
        torch.randn(n_syn, d_txt, device=DEVICE, dtype=dtype),
    )
    d = torch.randn(d_img, d_txt, device=DEVICE, dtype=dtype)

    def products():
        xr.t() @ yr
        xs.t() @ ys
        if backward:
            ys @ d.t()
            xs @ d

    return device_time_ms(products)["median_ms"]


def _priority(shape_name: str, backward: bool, impl: str) -> int:
    """Run order: the cases the README's targets need first, so a time-limited GPU run loses the least."""
    if backward and shape_name in ("paper", "smoke-a"):
        return 0
    if backward and shape_name in ("square-4096-N=10000", "smoke-b"):
        return 1
    if shape_name in ("paper", "smoke-a"):
        return 2
    if backward:
        return 3
    return 4


def _cases():
    cases = []
    for shape in SHAPES:
        for dtype in DTYPES:
            for impl in IMPLS:
                if impl in HEADLINE_ONLY and shape[0] not in HEADLINE_SHAPES:
                    continue
                if impl.startswith("triton") and SMOKE and dtype == torch.bfloat16:
                    continue  # the interpreter has no bf16 tl.dot
                if impl == "hybrid" and dtype == torch.float32:
                    continue  # the large-shape path takes half-precision features only
                for backward in (True, False):
                    cases.append((_priority(shape[0], backward, impl), shape, dtype, impl, backward))
    cases.sort(key=lambda case: case[0])  # stable: shapes, dtypes and impls keep their order within a rank
    for _, shape, dtype, impl, backward in cases:
        pss = "fwdbwd" if backward else "fwd"
        yield pytest.param(shape, dtype, impl, backward, id=f"{shape[0]}-{str(dtype)[6:]}-{impl}-{pss}")


@pytest.mark.parametrize("shape,dtype,impl,backward", list(_cases()))
def test_covmatch_loss_speed(benchmark, shape, dtype, impl, backward):
    inputs = make_inputs(shape, dtype, requires_grad=backward)
    loss_fn = make_loss_fn(impl)

    def step():
        loss = loss_fn(*inputs)
        if backward:
            torch.autograd.grad(loss, inputs[2:])
        return loss

    # correctness first: against float64 on the same (rounded) inputs
    ref_loss, ref_grads, scale = float64_loss_and_grads(inputs, RHO, LAM)
    loss = loss_fn(*inputs)
    loss_err = abs(float(loss.detach()) - float(ref_loss)) / max(float(scale), 1e-30)
    grad_err = float("nan")
    if backward:
        grads = torch.autograd.grad(loss, inputs[2:])
        grad_err = max(relative_error(g.float().cpu(), r.cpu()) for g, r in zip(grads, ref_grads[2:]))
    # ours must stay finite; the reference formula may not (fp16 sums of squares overflow at large d), which
    # is recorded (inf / nan error) rather than failing the case
    assert math.isfinite(loss_err) or impl in ("eager", "compiled"), f"{impl} loss is not finite"

    # wall clock per synchronised call (pytest-benchmark: includes the host sync); on CUDA the reported times
    # are CUDA-event times by the same method as the GEMM floor, so that their ratio compares like with like
    wall = run_benchmark(benchmark, step)
    timing = device_time_ms(step) if DEVICE.type == "cuda" else wall
    _, n_real, n_syn, d_img, d_txt = shape
    flops = loss_flops(n_real, n_syn, d_img, d_txt, backward)
    floor = gemm_floor_ms(shape, dtype, backward)
    row = {
        "impl": impl,
        "pass": "fwdbwd" if backward else "fwd",
        "shape": shape[0],
        "n_real": n_real,
        "n_syn": n_syn,
        "d_img": d_img,
        "d_txt": d_txt,
        "dtype": str(dtype).replace("torch.", ""),
        **timing,
        "wall_median_ms": wall["median_ms"],
        "tflops": flops / (timing["median_ms"] * 1e-3) / 1e12,
        "gemm_floor_ms": floor,
        "vs_floor": timing["median_ms"] / floor if floor == floor else float("nan"),
        "peak_mem_mb": peak_memory_mb(step),
        "loss_rel_err": loss_err,
        "grad_rel_err": grad_err,
        # the tile configurations COVMATCH_TRITON_AUTOTUNE=1 chose (empty: the deterministic defaults ran)
        "tile_configs": "; ".join(f"{k}: {v}" for k, v in tuned_configs().items()) if impl.startswith("triton") else "",
    }
    append_row("loss", row)
    benchmark.extra_info.update({k: v for k, v in row.items() if isinstance(v, (int, float, str))})
