"""Error of the fused kernels against float64, next to the eager formula's in the same dtype:
``python -m benchmarks.loss_error`` (CPU: the kernels run in Triton's interpreter, fp32 and fp16; on a GPU
add bf16).

The kernels keep ``D = rho C_T - C_S`` in the inputs' half dtype and centre half-precision products with a
rank-one correction; the eager formula (``tests/reference.eager_covmatch_loss``: centre, matmul, subtract,
square, sum) rounds each covariance to that dtype before subtracting. Two regimes: unrelated real and
synthetic features (D about as large as C) and a set that nearly matches (synthetic rows are real rows
plus 1 % noise, rho = 1: D is small next to C, the regime distillation converges to). Reported: the loss
error relative to the loss scale rho^2 ||C_T||^2 + ||C_S||^2 (as the tests measure it) and norm-wise
relative errors of the two synthetic gradients.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU runs interpret the kernels

import torch  # noqa: E402

from tests.reference import eager_covmatch_loss, float64_loss_and_grads, relative_error  # noqa: E402

SHAPES = [(128, 64, 256, 96), (256, 128, 300, 70)]


def _inputs(shape, dtype, device, matched: bool):
    n_real, n_syn, d_x, d_y = shape
    gen = torch.Generator().manual_seed(sum(shape))
    real_x = torch.randn(n_real, d_x, generator=gen, dtype=torch.float64) + 2.0 * torch.rand(d_x, generator=gen)
    real_y = torch.randn(n_real, d_y, generator=gen, dtype=torch.float64) + 2.0 * torch.rand(d_y, generator=gen)
    real_y = real_y + 0.5 * real_x[:, :d_y] if d_y <= d_x else real_y  # correlated modalities
    if matched:
        idx = torch.arange(n_syn) % n_real
        syn_x = real_x[idx] + 0.01 * torch.randn(n_syn, d_x, generator=gen, dtype=torch.float64)
        syn_y = real_y[idx] + 0.01 * torch.randn(n_syn, d_y, generator=gen, dtype=torch.float64)
    else:
        syn_x = torch.randn(n_syn, d_x, generator=gen, dtype=torch.float64) + 1.0
        syn_y = torch.randn(n_syn, d_y, generator=gen, dtype=torch.float64) - 1.0
    return [t.to(dtype).to(device).requires_grad_(i >= 2) for i, t in enumerate((real_x, real_y, syn_x, syn_y))]


def _errors(loss, grads, inputs, rho):
    ref_loss, ref_grads, scale = float64_loss_and_grads(inputs, rho, 0.0)
    loss_err = abs(loss.item() - ref_loss.item()) / max(scale.item(), 1e-30)
    return loss_err, [relative_error(g.double().cpu(), r.cpu()) for g, r in zip(grads, ref_grads[2:])]


def main(argv: Optional[List[str]] = None) -> List[str]:
    from covmatch import covmatch_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    how = "interpreted" if device.type == "cpu" else "compiled"
    lines = [
        f"# python -m benchmarks.loss_error ({device.type}; kernels {how}, torch {torch.__version__}); "
        "errors against float64 of the same rounded inputs",
        "| regime | shape | dtype | fused: loss | fused: dX_S, dY_S | eager: loss | eager: dX_S, dY_S |",
        "|---|---|---|---|---|---|---|",
    ]
    for matched, rho in ((False, 2.0), (True, 1.0)):
        for shape in SHAPES:
            for dtype in dtypes:
                inputs = _inputs(shape, dtype, device, matched)
                fused = covmatch_loss(*inputs, rho=rho, backend="triton", form="cov")
                fused_err = _errors(fused, torch.autograd.grad(fused, inputs[2:]), inputs, rho)
                eager = eager_covmatch_loss(*inputs, rho=rho)
                eager_err = _errors(eager, torch.autograd.grad(eager, inputs[2:]), inputs, rho)
                regime = "matched set (D << C)" if matched else "unrelated set"
                cells = [regime, "x".join(map(str, shape)), str(dtype).replace("torch.", "")]
                for loss_err, grad_errs in (fused_err, eager_err):
                    cells += [f"{loss_err:.1e}", ", ".join(f"{e:.1e}" for e in grad_errs)]
                lines.append("| " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    print("\n".join(main()))
    sys.exit(0)
