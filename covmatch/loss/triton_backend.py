"""The fused backend: ``covmatch.kernels`` behind named host functions, registered as a torch.library op.

Triton is imported only when this backend is first used, so ``import covmatch`` stays light.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from covmatch.constants import cached_constant

from .forms import gram_row_weights
from .torch_backend import covmatch_loss_torch

__all__ = [
    "HOST_FUNCTIONS", "EagerFusedLoss", "EagerSyntheticLoss", "FusedCall", "FusedLossFunction",
    "covmatch_loss_triton", "fused_loss", "fused_loss_backward", "triton_unavailable_reason",
]  # fmt: skip


_TRITON_IMPORT: Dict[str, Optional[str]] = {}


def triton_unavailable_reason() -> Optional[str]:
    """None when Triton imports, else why it does not (imports triton on the first call, then cached)."""
    if "reason" not in _TRITON_IMPORT:
        try:
            import triton  # noqa: F401

            _TRITON_IMPORT["reason"] = None
        except Exception as err:  # ImportError, or a broken install raising something else
            _TRITON_IMPORT["reason"] = f"{type(err).__name__}: {err}"
    return _TRITON_IMPORT["reason"]


_KERNELS = []


def _kernels():
    """``covmatch.kernels``, imported on first use (it imports triton)."""
    if not _KERNELS:
        from covmatch import kernels

        _KERNELS.append(kernels)
    return _KERNELS[0]


def _column_means(real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    """[2, d] fp32: the real (row 0) and synthetic (row 1) column means."""
    return torch.stack([real.mean(dim=0, dtype=torch.float32), syn.mean(dim=0, dtype=torch.float32)])


def _mean_gaps(mean_x: torch.Tensor, mean_y: torch.Tensor, lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Real minus synthetic column means of each modality; with lam = 0 the mean term's gradient vanishes
    and the kernels get a cached zeros row as their bias."""
    if lam == 0:
        return _zeros(mean_x.shape[1], mean_x.device), _zeros(mean_y.shape[1], mean_y.device)
    return mean_x[0] - mean_x[1], mean_y[0] - mean_y[1]


def _zeros(n: int, device: torch.device) -> torch.Tensor:
    return cached_constant(("zeros_fp32", n), device, lambda: torch.zeros(n, dtype=torch.float32, device=device))


def _row_bias(lam: float, beta: float, gap: torch.Tensor) -> torch.Tensor:
    """The mean term's gradient row ``beta * gap``; with lam = 0, ``gap`` is already the zeros row."""
    return gap if lam == 0 else beta * gap


# ---------------------------------------------------------------------------------------- covariance form


def _covariance_plan(inputs, rho: float, lam: float, needs, hybrid: bool = False):
    real_img, real_txt, syn_img, _ = inputs
    dtypes = tuple(t.dtype for t in inputs)
    return _kernels().covariance_plan(real_img.shape[0], syn_img.shape[0], real_img.shape[1], real_txt.shape[1],
                                      dtypes, real_img.device, rho, lam, tuple(needs), hybrid)  # fmt: skip


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def covariance_form_forward(real_img, real_txt, syn_img, syn_txt, rho: float, lam: float, needs,
                            hybrid: bool = False):  # fmt: skip
    """(loss, [D, the forward's workspace]) of the covariance form: what the backward reads (D empty when no
    gradient is needed). Inputs are copied once when not contiguous. What the op returns must be a function of
    its inputs and not alias: the workspace starts as zeros and the loss is a copy (the eager path,
    ``FusedCall``, skips both)."""
    inputs = tuple(_contiguous(t) for t in (real_img, real_txt, syn_img, syn_txt))
    out = _covariance_plan(inputs, rho, lam, needs, hybrid).forward(*inputs, zeroed=True)
    return out.loss.clone(), [out.diff if out.diff is not None else _empty(real_img), out.workspace]


def covariance_form_backward(inputs, aux, grad, rho, lam, needs, hybrid: bool = False) -> list:
    """Gradients of the four inputs (None where not needed): one launch per gradient (two with split-K)."""
    inputs = tuple(_contiguous(t) for t in inputs)
    plan = _covariance_plan(inputs, rho, lam, needs, hybrid)
    grads = [None, None, None, None]
    for side in (0, 1):
        if needs[2 * side] or needs[2 * side + 1]:
            grads[2 * side], grads[2 * side + 1] = plan.grads(side, inputs[2 * side], inputs[2 * side + 1], *aux, grad)
    return grads


def hybrid_form_forward(real_img, real_txt, syn_img, syn_txt, rho: float, lam: float, needs):
    """The covariance form with its products through cuBLAS (the large-shape path)."""
    return covariance_form_forward(real_img, real_txt, syn_img, syn_txt, rho, lam, needs, hybrid=True)


def hybrid_form_backward(inputs, aux, grad, rho, lam, needs) -> list:
    return covariance_form_backward(inputs, aux, grad, rho, lam, needs, hybrid=True)


def _covariance_aux_fake(real_img, real_txt, syn_img, syn_txt, rho, lam, needs, hybrid: bool = False) -> list:
    """Empty tensors shaped like ``covariance_form_forward``'s aux (for the op's fake implementation)."""
    dtypes = (real_img.dtype, real_txt.dtype, syn_img.dtype, syn_txt.dtype)
    (n_real, dim_x), (n_syn, dim_y) = real_img.shape, syn_txt.shape  # sizes may be symbolic: no plan cache
    plan = _kernels().CovariancePlan(n_real, n_syn, dim_x, dim_y, dtypes, real_img.device, rho, lam, tuple(needs),
                                     hybrid)  # fmt: skip
    diff = real_img.new_empty((dim_x, dim_y), dtype=plan.diff_dtype) if plan.store_diff else _empty(real_img)
    return [diff, real_img.new_empty((plan.workspace_size,), dtype=torch.float32)]


# ---------------------------------------------------------------------------------------- Gram form


def gram_form_forward(real_img, real_txt, syn_img, syn_txt, rho: float, lam: float, needs):
    """(loss, [stacked rows, Gram matrices, column means]) of the Gram form (the Gram matrices empty when
    no gradient is needed)."""
    n_real, n_syn = real_img.shape[0], syn_img.shape[0]
    mean_x = _column_means(real_img, syn_img)
    mean_y = _column_means(real_txt, syn_txt)
    z_x = torch.cat([real_img, syn_img])
    z_y = torch.cat([real_txt, syn_txt])
    weights = gram_row_weights(n_real, n_syn, rho, torch.float32, real_img.device)
    out = _kernels().gram_forward(z_x, z_y, mean_x, mean_y, weights, n_real, store_gram=any(needs))
    loss = out.cov_loss
    if lam != 0:  # the distillation objective passes lam = 0 (its mean term is separate): skip it
        gap_x, gap_y = mean_x[0] - mean_x[1], mean_y[0] - mean_y[1]
        loss = loss + lam * (gap_x @ gap_x + gap_y @ gap_y)
    gram_x = out.gram_x if out.gram_x is not None else _empty(real_img)
    gram_y = out.gram_y if out.gram_y is not None else _empty(real_img)
    return loss, [z_x, z_y, gram_x, gram_y, mean_x, mean_y]


def gram_rows_grad(gram_other, weights, rows, means, n_real, row_start, n_out, gap, beta, lam, grad, dtype):
    """dL/dZ[i] = 2 w_i sum_j K_other[i, j] w_j Zc[j] + the mean-term row, for rows
    ``row_start .. row_start + n_out`` of the stacked matrix ``rows`` (docs/design.md, *Two algebraic forms*)."""
    bias = _row_bias(lam, beta, gap)
    return _kernels().gram_grad(gram_other, weights, rows, means, n_real, row_start, n_out, bias, grad, dtype)


def gram_form_backward(inputs, aux, grad, rho, lam, needs) -> list:
    """Gradients of the four inputs (None where not needed): real rows come first in the stacked matrices."""
    z_x, z_y, gram_x, gram_y, mean_x, mean_y = aux
    n_real, n_syn = inputs[0].shape[0], inputs[2].shape[0]
    dtypes = [t.dtype for t in inputs]
    weights = gram_row_weights(n_real, n_syn, rho, torch.float32, z_x.device)
    gap_x, gap_y = _mean_gaps(mean_x, mean_y, lam)
    real_beta, syn_beta = 2.0 * lam / n_real, -2.0 * lam / n_syn
    grads = [None, None, None, None]
    if needs[0]:
        grads[0] = gram_rows_grad(
            gram_y, weights, z_x, mean_x, n_real, 0, n_real, gap_x, real_beta, lam, grad, dtypes[0]
        )
    if needs[1]:
        grads[1] = gram_rows_grad(
            gram_x, weights, z_y, mean_y, n_real, 0, n_real, gap_y, real_beta, lam, grad, dtypes[1]
        )
    if needs[2]:
        grads[2] = gram_rows_grad(
            gram_y, weights, z_x, mean_x, n_real, n_real, n_syn, gap_x, syn_beta, lam, grad, dtypes[2]
        )
    if needs[3]:
        grads[3] = gram_rows_grad(
            gram_x, weights, z_y, mean_y, n_real, n_real, n_syn, gap_y, syn_beta, lam, grad, dtypes[3]
        )
    return grads


# form -> (forward, backward) host functions: what the op runs, and what covmatch.loss.inspect records
HOST_FUNCTIONS = {
    "cov": (covariance_form_forward, covariance_form_backward),
    "hybrid": (hybrid_form_forward, hybrid_form_backward),
    "gram": (gram_form_forward, gram_form_backward),
}


def _empty(like: torch.Tensor) -> torch.Tensor:
    """A placeholder output (a torch.library op returns tensors, never None)."""
    return like.new_empty((0,), dtype=torch.float32)


# ---------------------------------------------------------------------------------------- the op
#
# ``covmatch::fused_loss`` and its backward are torch.library custom ops (their fake implementations give
# shapes), so torch.compile(fullgraph=True) traces a caller through them without a graph break;
# ``FusedLossFunction`` differentiates them (torch.func.grad included), a double backward
# (create_graph=True) takes the differentiable torch formula instead of the kernels, and vmap raises one
# clear error.


def fused_loss(
    real_img: torch.Tensor, real_txt: torch.Tensor, syn_img: torch.Tensor, syn_txt: torch.Tensor,
    rho: float, lam: float, form: str, needs: List[bool],
) -> List[torch.Tensor]:  # fmt: skip
    """[loss, *what the backward reads] through the kernels (``needs``: which inputs get a gradient)."""
    loss, aux = HOST_FUNCTIONS[form][0](real_img, real_txt, syn_img, syn_txt, rho, lam, needs)
    return [loss, *aux]


def _fused_loss_fake(real_img, real_txt, syn_img, syn_txt, rho, lam, form, needs):
    (n_real, dim_x), (n_syn, dim_y) = real_img.shape, syn_txt.shape
    f32 = dict(dtype=torch.float32)
    loss = real_img.new_empty((), **f32)
    means = [real_img.new_empty((2, dim_x), **f32), real_img.new_empty((2, dim_y), **f32)]
    if form in ("cov", "hybrid"):
        return [loss, *_covariance_aux_fake(real_img, real_txt, syn_img, syn_txt, rho, lam, needs, form == "hybrid")]
    n = n_real + n_syn
    z_x = real_img.new_empty((n, dim_x), dtype=torch.promote_types(real_img.dtype, syn_img.dtype))
    z_y = real_img.new_empty((n, dim_y), dtype=torch.promote_types(real_txt.dtype, syn_txt.dtype))
    grams = [real_img.new_empty((n, n), **f32) if any(needs) else _empty(real_img) for _ in range(2)]
    return [loss, z_x, z_y, *grams, *means]


def fused_loss_backward(
    grad: torch.Tensor, real_img: torch.Tensor, real_txt: torch.Tensor, syn_img: torch.Tensor,
    syn_txt: torch.Tensor, aux: List[torch.Tensor], rho: float, lam: float, form: str, needs: List[bool],
) -> List[torch.Tensor]:  # fmt: skip
    """The four input gradients through the kernels (an empty tensor where ``needs`` says none)."""
    grad = grad if grad.dtype == torch.float32 else grad.to(torch.float32)
    inputs = (real_img, real_txt, syn_img, syn_txt)
    grads = HOST_FUNCTIONS[form][1](inputs, aux, grad, rho, lam, needs)
    return [g if g is not None else _empty(real_img) for g in grads]


def _fused_loss_backward_fake(grad, real_img, real_txt, syn_img, syn_txt, aux, rho, lam, form, needs):
    inputs = (real_img, real_txt, syn_img, syn_txt)
    return [t.new_empty(t.shape) if need else _empty(real_img) for t, need in zip(inputs, needs)]


def _as_library_op(name: str, fn, fake, schema: str):
    """``fn`` registered as the torch.library op ``covmatch::name`` with its fake implementation; where the
    torch version cannot register it (custom ops arrived in 2.4 and grew since), ``fn`` itself: eager calls
    and autograd work the same, torch.compile then breaks the graph around the loss. The schema is spelt out:
    torch 2.4 cannot infer one from this module's string annotations."""
    try:
        op = torch.library.custom_op(f"covmatch::{name}", mutates_args=(), schema=schema)(fn)
        op.register_fake(fake)
        return op
    except Exception as err:  # an older torch's schema inference or registration
        _OP_UNAVAILABLE[name] = f"{type(err).__name__}: {err}"
        return fn


_OP_UNAVAILABLE: Dict[str, str] = {}
_FUSED_LOSS_SCHEMA = (
    "(Tensor real_img, Tensor real_txt, Tensor syn_img, Tensor syn_txt, float rho, float lam, str form, "
    "bool[] needs) -> Tensor[]"
)
_FUSED_LOSS_BACKWARD_SCHEMA = (
    "(Tensor grad, Tensor real_img, Tensor real_txt, Tensor syn_img, Tensor syn_txt, Tensor[] aux, float rho, "
    "float lam, str form, bool[] needs) -> Tensor[]"
)
fused_loss = _as_library_op("fused_loss", fused_loss, _fused_loss_fake, _FUSED_LOSS_SCHEMA)
fused_loss_backward = _as_library_op(
    "fused_loss_backward", fused_loss_backward, _fused_loss_backward_fake, _FUSED_LOSS_BACKWARD_SCHEMA
)


class FusedLossFunction(torch.autograd.Function):
    """Autograd over the two ops: the kernels' gradient, or under create_graph=True the torch formula's
    (differentiable); ``setup_context`` makes torch.func.grad work, ``vmap`` raises one clear error."""

    @staticmethod
    def forward(real_img, real_txt, syn_img, syn_txt, rho: float, lam: float, form: str, needs: List[bool]):
        return tuple(fused_loss(real_img, real_txt, syn_img, syn_txt, rho, lam, form, needs))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        real_img, real_txt, syn_img, syn_txt, rho, lam, form, needs = inputs
        ctx.save_for_backward(real_img, real_txt, syn_img, syn_txt, *output[1:])
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero-filled gradients for those outputs
        ctx.rho, ctx.lam, ctx.form, ctx.needs = rho, lam, form, list(needs)

    @staticmethod
    def backward(ctx, grad, *unused):
        saved = ctx.saved_tensors
        inputs, aux = saved[:4], list(saved[4:])
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is itself differentiable
            out = _differentiable_grads(inputs, grad, ctx.rho, ctx.lam, ctx.form, ctx.needs)
        else:
            out = fused_loss_backward(grad, *inputs, aux, ctx.rho, ctx.lam, ctx.form, ctx.needs)
        return (*[g if need else None for g, need in zip(out, ctx.needs)], None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, *args):
        raise RuntimeError(
            "covmatch_loss: the fused (triton) path has no vmap rule; pass backend='torch' to vmap the loss"
        )


def _differentiable_grads(inputs, grad, rho, lam, form, needs) -> list:
    """The input gradients from the torch formula, with their own graph (double backward)."""
    wrt = [t for t, need in zip(inputs, needs) if need]
    loss = covmatch_loss_torch(*inputs, rho, lam, form)
    found = iter(torch.autograd.grad(loss, wrt, grad, create_graph=True))
    return [next(found) if need else None for need in needs]


def covmatch_loss_triton(
    real_img: torch.Tensor,
    real_txt: torch.Tensor,
    syn_img: torch.Tensor,
    syn_txt: torch.Tensor,
    rho: float,
    lam: float,
    form: str,
) -> torch.Tensor:
    """The CovMatch loss through the fused kernels (inputs already validated; form 'cov' or 'gram')."""
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and t.requires_grad for t in (real_img, real_txt, syn_img, syn_txt)]
    return FusedLossFunction.apply(real_img, real_txt, syn_img, syn_txt, float(rho), float(lam), form, needs)[0]


# ---------------------------------------------------------------------------------------- the eager path
#
# In eager mode (no torch.compile tracing, no torch.func transform) a call skips both library ops: a plain
# autograd.Function calls the host functions of a ``FusedCall`` planned once per call signature, so its host
# cost is its allocations and launches (benchmarks/bench_host.py).


class FusedCall:
    """The fused path for one call signature (shapes, dtypes, device, rho, lam, form, which gradients): the
    covariance form's kernel plan ('cov', or 'hybrid': its products through cuBLAS) is made once, here; the
    Gram form runs its host functions."""

    __slots__ = ("form", "rho", "lam", "needs", "plan")

    def __init__(self, inputs, rho: float, lam: float, form: str, needs) -> None:
        self.form, self.rho, self.lam, self.needs = form, float(rho), float(lam), list(needs)
        covariance = form in ("cov", "hybrid")
        self.plan = _covariance_plan(inputs, rho, lam, needs, form == "hybrid") if covariance else None

    def forward(self, real_img, real_txt, syn_img, syn_txt):
        """(loss, the tensors the backward reads besides the inputs)."""
        if self.plan is not None:
            inputs = (_contiguous(real_img), _contiguous(real_txt), _contiguous(syn_img), _contiguous(syn_txt))
            out = self.plan.forward(*inputs)
            return out.loss, (out.diff, out.workspace)
        return gram_form_forward(real_img, real_txt, syn_img, syn_txt, self.rho, self.lam, self.needs)

    def backward(self, inputs, aux, grad: torch.Tensor) -> list:
        """The four input gradients (None where not needed) from the inputs and ``forward``'s aux."""
        if self.plan is None:
            return gram_form_backward(inputs, list(aux), grad, self.rho, self.lam, self.needs)
        diff, workspace = aux
        grads = [None, None, None, None]
        needs = self.needs
        for side in (0, 1):
            if needs[2 * side] or needs[2 * side + 1]:
                x, y = _contiguous(inputs[2 * side]), _contiguous(inputs[2 * side + 1])
                grads[2 * side], grads[2 * side + 1] = self.plan.grads(side, x, y, diff, workspace, grad)
        return grads

    def saved_backward(self, saved, grad: torch.Tensor) -> list:
        """The four input gradients from what an autograd node saved (the inputs, then ``forward``'s aux): the
        kernels', or under create_graph=True the differentiable torch formula's."""
        if torch.is_grad_enabled():
            return _differentiable_grads(saved[:4], grad, self.rho, self.lam, self.form, self.needs)
        return self.backward(saved[:4], saved[4:], grad if grad.dtype == torch.float32 else grad.to(torch.float32))


class EagerFusedLoss(torch.autograd.Function):
    """Autograd over a ``FusedCall`` (old-style: no signature binding per call); under create_graph=True the
    gradient comes from the differentiable torch formula."""

    @staticmethod
    def forward(ctx, call: FusedCall, real_img, real_txt, syn_img, syn_txt):
        loss, aux = call.forward(real_img, real_txt, syn_img, syn_txt)
        ctx.call = call
        ctx.save_for_backward(real_img, real_txt, syn_img, syn_txt, *aux)
        return loss

    @staticmethod
    def backward(ctx, grad):
        return (None, *ctx.call.saved_backward(ctx.saved_tensors, grad))


class EagerSyntheticLoss(torch.autograd.Function):
    """``EagerFusedLoss`` when only the synthetic features need a gradient (distillation's case): the real pair,
    which needs none, is not an input of the autograd node (two inputs, not four), but is saved like one."""

    @staticmethod
    def forward(ctx, call: FusedCall, real: Tuple[torch.Tensor, torch.Tensor], syn_img, syn_txt):
        loss, aux = call.forward(real[0], real[1], syn_img, syn_txt)
        ctx.call = call
        ctx.save_for_backward(real[0], real[1], syn_img, syn_txt, *aux)
        return loss

    @staticmethod
    def backward(ctx, grad):
        grads = ctx.call.saved_backward(ctx.saved_tensors, grad)
        return None, None, grads[2], grads[3]
