"""Host cost of one ``covmatch_loss`` forward+backward call: the part of a launch-bound call that is not GPU work.

At the paper's shape (real 128, synthetic 256, d 2304 x 768) the loss is ~1.5 GFLOP, microseconds on an H200,
so what a call costs is the host code that issues it: argument checks, autograd, allocations, tile-config
lookup and every torch op besides the kernels (each one a launch on a GPU). This measures that code alone, at
a tiny shape where compute is negligible, with the fused path's Triton launches replaced by no-ops (so it runs
on any machine); on a GPU, ``+launch`` cases add Triton's own launcher (real launches, not synchronised:
the host's time to issue a call). Compared in the same run: the torch backend, the plain eager formula
(imported from the tests) and the four GEMM calls that are the issue's floor. Also counted: the torch ops
each call dispatches (allocations and views excepted).

    COVMATCH_BENCH_SMOKE=0 COVMATCH_BENCH_RESULTS=benchmarks/results/cpu pytest benchmarks/bench_host.py
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from covmatch import covmatch_loss
from tests.host_cost import count_dispatched_ops, no_kernel_launches
from tests.reference import eager_covmatch_loss

from .common import DEVICE, append_row, run_benchmark

N_REAL, N_SYN, D_IMG, D_TXT = 6, 5, 7, 3  # tiny: the host code does not depend on the shape
RHO = 2.0
IMPLS = [
    "triton-cov", "triton-gram", "torch", "eager", "gemm-floor", "autograd-floor", "triton-cov+launch",
    "triton-gram+launch",
]  # fmt: skip
NO_MEAN_TERM = {"gemm-floor", "autograd-floor"}


class _NothingLoss(torch.autograd.Function):
    """A "loss" that computes nothing: its inputs saved, one fill forward, two allocations backward. What any
    loss pays per call for being an autograd node, whatever its kernels."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(y)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    real = [torch.randn(N_REAL, d, generator=gen).to(DEVICE) for d in (D_IMG, D_TXT)]
    syn = [torch.randn(N_SYN, d, generator=gen).to(DEVICE).requires_grad_() for d in (D_IMG, D_TXT)]
    return (*real, *syn)


def make_call(impl: str, lam: float, inputs):
    """One forward+backward call of ``impl`` (gradients w.r.t. the synthetic features, as distillation needs)."""
    real_img, real_txt, syn_img, syn_txt = inputs
    if impl == "gemm-floor":  # the unavoidable products: X_T^T Y_T, X_S^T Y_S, D Y_S^T, X_S D
        xs, ys, diff = syn_img.detach(), syn_txt.detach(), torch.randn(D_IMG, D_TXT, device=DEVICE)

        def gemms():
            return real_img.t() @ real_txt, xs.t() @ ys, ys @ diff.t(), xs @ diff

        return gemms
    if impl == "autograd-floor":

        def loss():
            return _NothingLoss.apply(syn_img, syn_txt)
    elif impl == "eager":

        def loss():
            return eager_covmatch_loss(real_img, real_txt, syn_img, syn_txt, rho=RHO, lam=lam)
    else:
        backend, _, form = impl.removesuffix("+launch").partition("-")

        def loss():
            return covmatch_loss(
                real_img, real_txt, syn_img, syn_txt, rho=RHO, lam=lam, backend=backend, form=form or "auto"
            )

    return lambda: torch.autograd.grad(loss(), (syn_img, syn_txt))


CASES = [(impl, lam) for impl in IMPLS for lam in (0.0, 0.1) if not (impl in NO_MEAN_TERM and lam)]


@pytest.mark.parametrize("impl,lam", [pytest.param(impl, lam, id=f"{impl}-lam{lam:g}") for impl, lam in CASES])
def test_host_cost(benchmark, impl, lam):
    launches = impl.endswith("+launch")
    if launches and DEVICE.type != "cuda":
        pytest.skip("real Triton launches are timed on a GPU only")
    if impl.startswith("triton"):
        pytest.importorskip("triton")
        if DEVICE.type == "cpu":  # the backend accepts CPU tensors only under the interpreter (never run here)
            import covmatch.loss.functional as functional

            if not functional._interpreter_on():
                pytest.skip("backend='triton' on CPU tensors needs TRITON_INTERPRET=1")
    call = make_call(impl, lam, _inputs())
    with contextlib.nullcontext() if launches else no_kernel_launches():
        call()  # first call: tile-config choice and cached constants
        ops = count_dispatched_ops(call)
        timing = run_benchmark(benchmark, call, rounds=30, warmup=3, iterations=200, synchronized=False)
    times = {key.replace("_ms", "_us"): 1e3 * value for key, value in timing.items()}
    row = {"impl": impl, "lam": lam, "n_real": N_REAL, "n_syn": N_SYN, "torch_ops": len(ops), **times}
    append_row("host", row)
    benchmark.extra_info.update({"torch_ops": len(ops)})
    assert len(ops) >= (4 if impl == "gemm-floor" else 1)
