"""covmatch_loss forward and backward, both backends and both forms, against a float64 reference.

On a CPU machine the triton backend runs under TRITON_INTERPRET=1 (set in conftest) at small shapes;
bf16 kernels and large shapes are exercised only on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from covmatch import CovMatchLoss, covmatch_loss
from covmatch.loss import choose_form

from .reference import float64_loss_and_grads, relative_error

ON_GPU = torch.cuda.is_available()

# (loss tolerance relative to the loss scale, gradient tolerance as norm-wise relative error) per input
# dtype. Gradients come back in the input dtype, so half types carry their own rounding (2^-11, 2^-8).
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 5e-5),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1.5e-2, 3e-2),
}

# (n_real, n_syn, d_img, d_txt): awkward sizes: 2 rows (the minimum), 1-wide features, odd dims,
# ragged tiles, real and synthetic row counts that differ.
TORCH_SHAPES = [
    (2, 2, 1, 1),
    (3, 2, 7, 1),
    (2, 3, 1, 7),
    (127, 3, 64, 7),
    (3, 127, 7, 64),
    (1000, 127, 300, 64),
    (127, 1000, 64, 300),
    (128, 256, 768, 300),
]
# The interpreter simulates every program in numpy: keep these small but still ragged.
TRITON_SHAPES = [
    (2, 2, 1, 1),
    (3, 2, 7, 1),
    (2, 3, 1, 7),
    (127, 3, 64, 7),
    (3, 127, 7, 64),
    (1000, 3, 64, 7),
    (130, 67, 300, 70),
    (3, 2, 768, 300),
]
if ON_GPU:
    TRITON_SHAPES += [(1000, 127, 300, 64), (127, 1000, 64, 300), (128, 256, 768, 300), (128, 256, 2304, 768)]

TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
HYPER = [(1.0, 0.0), (2.0, 0.1), (0.5, 0.6)]


def make_features(shape, dtype, device, *, offset: float = 3.0, requires_grad: bool = True):
    """Four feature matrices with a non-zero mean (so centring matters), rounded to ``dtype``."""
    n_real, n_syn, d_img, d_txt = shape
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    out = []
    for n, d in ((n_real, d_img), (n_real, d_txt), (n_syn, d_img), (n_syn, d_txt)):
        t = torch.randn(n, d, generator=gen, dtype=torch.float64) + offset * torch.rand(d, generator=gen)
        out.append(t.to(dtype).to(device).requires_grad_(requires_grad))
    return out


def check_against_reference(inputs, backend, form, rho, lam, dtype):
    loss_tol, grad_tol = TOLERANCES[dtype]
    loss = covmatch_loss(*inputs, rho=rho, lam=lam, backend=backend, form=form)
    assert loss.dim() == 0
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    grads = torch.autograd.grad(loss, inputs)
    ref_loss, ref_grads, scale = float64_loss_and_grads(inputs, rho, lam)
    err = abs(loss.item() - ref_loss.item()) / max(scale.item(), 1e-30)
    assert err <= loss_tol, f"loss {loss.item()} vs {ref_loss.item()} (relative to scale: {err:.2e})"
    for name, g, ref, x in zip(("real_img", "real_txt", "syn_img", "syn_txt"), grads, ref_grads, inputs):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert torch.isfinite(g).all(), name
        g_err = relative_error(g.cpu(), ref.cpu())
        assert g_err <= grad_tol, f"d/d{name}: relative error {g_err:.2e} > {grad_tol:.0e}"


@pytest.mark.parametrize("form", ["cov", "gram"])
@pytest.mark.parametrize("rho,lam", HYPER)
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", TORCH_SHAPES, ids=str)
def test_torch_backend_matches_float64(shape, dtype, rho, lam, form):
    inputs = make_features(shape, dtype, "cpu")
    check_against_reference(inputs, "torch", form, rho, lam, dtype)


def _triton_cases():
    # The interpreter's cost grows with (n_real + n_syn)^2 in the Gram form: one rho/lam pair for big n.
    for shape in TRITON_SHAPES:
        big = not ON_GPU and shape[0] + shape[1] > 500
        for rho, lam in HYPER[1:2] if big else HYPER:
            yield pytest.param(shape, rho, lam, id=f"{shape}-{rho}-{lam}")


@pytest.mark.parametrize("form", ["cov", "gram"])
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("shape,rho,lam", list(_triton_cases()))
def test_triton_backend_matches_float64(shape, dtype, rho, lam, form, device):
    inputs = make_features(shape, dtype, device)
    check_against_reference(inputs, "triton", form, rho, lam, dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("form", ["cov", "gram"])
def test_float64_torch_and_mixed_dtypes(backend, form, device):
    """Real and synthetic sides in different dtypes (and an image/text pair in different dtypes)."""
    shape = (37, 19, 70, 45)
    base = make_features(shape, torch.float32, device, requires_grad=False)
    dtypes = (torch.float32, torch.float16, torch.float16, torch.float32)
    inputs = [t.to(dt).requires_grad_() for t, dt in zip(base, dtypes)]
    check_against_reference(inputs, backend, form, 2.0, 0.1, torch.float16)


@pytest.mark.parametrize("form", ["cov", "gram"])
def test_gradcheck_torch_backend(form):
    inputs = make_features((5, 4, 3, 2), torch.float64, "cpu")
    assert torch.autograd.gradcheck(
        lambda *xs: covmatch_loss(*xs, rho=2.0, lam=0.3, backend="torch", form=form), inputs
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forms_agree(backend, device):
    """The covariance and Gram forms are two algebraic routes to one loss and one gradient."""
    dtype = torch.float32
    inputs = make_features((61, 33, 90, 40), dtype, device)
    results = {}
    for form in ("cov", "gram"):
        loss = covmatch_loss(*inputs, rho=1.5, lam=0.2, backend=backend, form=form)
        results[form] = (loss, torch.autograd.grad(loss, inputs))
    (l_cov, g_cov), (l_gram, g_gram) = results["cov"], results["gram"]
    assert relative_error(l_cov, l_gram) < 1e-5
    for a, b in zip(g_cov, g_gram):
        assert relative_error(a, b) < 1e-4


def test_auto_form_choice():
    # Paper shape: n = 128 + 256 is not << d_v d_l / (d_v + d_l) = 576; the Gram form's ~1e9 fewer
    # multiply-adds do not pay for its 8 extra launches. Square 4096 features: they do, many times over.
    assert choose_form("auto", 128, 256, 2304, 768) == "cov"
    assert choose_form("auto", 128, 256, 4096, 4096) == "gram"
    assert choose_form("auto", 128, 10_000, 2304, 768) == "cov"
    assert choose_form("auto", 128, 10_000, 4096, 4096) == "cov"
    assert choose_form("cov", 128, 256, 2304, 768) == "cov"
    with pytest.raises(ValueError, match="form must be one of"):
        choose_form("dense", 2, 2, 2, 2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("form", ["cov", "gram"])
def test_only_requested_gradients(backend, form, device):
    """Real features without grad (the usual case) get none; the synthetic gradients are unchanged."""
    xr, yr, xs, ys = make_features((40, 20, 33, 17), torch.float32, device)
    full = torch.autograd.grad(covmatch_loss(xr, yr, xs, ys, backend=backend, form=form, lam=0.1), [xs, ys])
    xr_d, yr_d = xr.detach(), yr.detach()
    part = torch.autograd.grad(covmatch_loss(xr_d, yr_d, xs, ys, backend=backend, form=form, lam=0.1), [xs, ys])
    for a, b in zip(full, part):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        value = covmatch_loss(xr, yr, xs, ys, backend=backend, form=form, lam=0.1)
    assert not value.requires_grad
    # any one input alone (the fused backward keeps only the tensors the requested gradients need)
    inputs = [xr, yr, xs, ys]
    every = torch.autograd.grad(covmatch_loss(*inputs, backend=backend, form=form, lam=0.1), inputs)
    for i in range(4):
        alone = [t if j == i else t.detach() for j, t in enumerate(inputs)]
        (grad,) = torch.autograd.grad(covmatch_loss(*alone, backend=backend, form=form, lam=0.1), [alone[i]])
        torch.testing.assert_close(grad, every[i])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("form", ["cov", "gram"])
def test_zero_when_synthetic_equals_real(backend, form, device):
    xr, yr, _, _ = make_features((50, 3, 40, 30), torch.float32, device, requires_grad=False)
    loss = covmatch_loss(xr, yr, xr.clone(), yr.clone(), rho=1.0, lam=0.0, backend=backend, form=form)
    _, _, scale = float64_loss_and_grads([xr, yr, xr, yr], 1.0, 0.0)
    assert abs(loss.item()) <= 1e-6 * scale.item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("form", ["cov", "gram"])
def test_translation_leaves_covariance_term_unchanged(backend, form, device):
    xr, yr, xs, ys = make_features((40, 20, 33, 17), torch.float32, device, requires_grad=False)
    shift_x = 5.0 * torch.randn(33, device=device)
    shift_y = -3.0 * torch.randn(17, device=device)
    base = covmatch_loss(xr, yr, xs, ys, rho=2.0, backend=backend, form=form)
    moved = covmatch_loss(xr, yr, xs + shift_x, ys + shift_y, rho=2.0, backend=backend, form=form)
    assert relative_error(moved, base) < 1e-5
    # ...while the mean term sees the translation.
    with_mean = covmatch_loss(xr, yr, xs + shift_x, ys + shift_y, rho=2.0, lam=1.0, backend=backend, form=form)
    assert with_mean.item() > base.item() + 1.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_inputs(backend, device):
    xr, yr, xs, ys = make_features((30, 21, 26, 18), torch.float32, device, requires_grad=False)
    views = [
        xr.t().contiguous().t(),  # column-major
        torch.cat([yr, yr], dim=1)[:, ::2],  # strided columns
        torch.cat([xs, xs])[::2],  # strided rows
        ys.t().contiguous().t(),
    ]
    assert not any(v.is_contiguous() for v in views)
    leaves = [v.requires_grad_() for v in views]
    check_against_reference(leaves, backend, "cov", 1.0, 0.1, torch.float32)
    check_against_reference(leaves, backend, "gram", 1.0, 0.1, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_under_autocast(backend, device):
    """Autocast does not downcast the loss: fp32 inputs under autocast give the fp32 result."""
    inputs = make_features((40, 20, 33, 17), torch.float32, device)
    plain = covmatch_loss(*inputs, rho=2.0, lam=0.1, backend=backend)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    with torch.autocast(device_type=device.type, dtype=amp_dtype):
        under = covmatch_loss(*inputs, rho=2.0, lam=0.1, backend=backend)
        grads = torch.autograd.grad(under, inputs)
    assert under.dtype == torch.float32
    assert relative_error(under, plain) < 1e-6
    assert all(g.dtype == torch.float32 for g in grads)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_under_torch_compile(backend, device):
    """A caller compiled with fullgraph=True works: the torch path is traced, the triton path is a
    torch.library op (no graph break)."""
    inputs = make_features((24, 12, 20, 10), torch.float32, device)

    def step(xr, yr, xs, ys):
        return covmatch_loss(xr * 1.0, yr, xs, ys, rho=2.0, lam=0.1, backend=backend) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out = compiled(*inputs)
    grads = torch.autograd.grad(out, inputs)
    ref_loss, ref_grads, _ = float64_loss_and_grads(inputs, 2.0, 0.1)
    assert relative_error(out, 2.0 * ref_loss) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert relative_error(g, 2.0 * r) < 1e-4


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_module_matches_functional(backend, device):
    inputs = make_features((20, 10, 9, 5), torch.float32, device, requires_grad=False)
    module = CovMatchLoss(rho=2.0, lam=0.1, backend=backend)
    assert "rho=2.0" in repr(module)
    expected = covmatch_loss(*inputs, rho=2.0, lam=0.1, backend=backend)
    torch.testing.assert_close(module(*inputs), expected)


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_split_k_gradients_match_float64(dtype, device):
    """Where a side's output tiles are fewer than the GPU's SMs, the gradient GEMMs split their inner
    dimension and a second launch sums the splits in a fixed order: same loss and gradients, to the same
    budgets (forced here by compiling the tile choice for an sm_90 with 132 SMs)."""
    from covmatch.kernels import recorded_launches, target_arch

    inputs = make_features((20, 8, 300, 200), dtype, device)
    with target_arch((9, 0)):
        check_against_reference(inputs, "triton", "cov", 2.0, 0.1, dtype)
        meta = [torch.empty(t.shape, dtype=dtype, device="meta") for t in inputs]
        from covmatch.loss.triton_backend import HOST_FUNCTIONS

        forward, backward = HOST_FUNCTIONS["cov"]
        with recorded_launches() as launches:
            _, aux = forward(*meta, 2.0, 0.1, [False, False, True, True])
            backward(meta, aux, torch.ones((), device="meta"), 2.0, 0.1, [False, False, True, True])
    names = [r.name for r in launches]
    grads = [r for r in launches if r.name == "_cov_grad_kernel"]
    assert len(grads) == 2 and all(r.constexprs["SPLIT"] > 1 for r in grads), names
    assert names.count("_grad_reduce_kernel") == 2, names


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_difference_beyond_fp16_range_keeps_gradients_finite(backend, device):
    """Real fp16 features whose covariance (and so D) exceeds fp16's 65504 while the loss is finite in fp32:
    the fused path keeps s * D in range (a power-of-two scale) and its synthetic gradients are finite and
    accurate wherever the true ones fit fp16."""
    gen = torch.Generator().manual_seed(11)
    base = 300.0 * torch.randn(16, 6, generator=gen, dtype=torch.float64)
    real_txt = base[:, :4] + 30.0 * torch.randn(16, 4, generator=gen, dtype=torch.float64)
    syn = [0.01 * torch.randn(64, d, generator=gen, dtype=torch.float64) for d in (6, 4)]
    xr, yr, xs, ys = (t.to(torch.float16).to(device) for t in (base, real_txt, *syn))
    xs.requires_grad_()
    ys.requires_grad_()
    ref_loss, ref_grads, _ = float64_loss_and_grads((xr, yr, xs, ys), 1.0, 0.0)
    assert ref_loss.item() < 3e38 and (ref_loss.sqrt() > 65504)  # D beyond fp16, the loss within fp32
    assert all(g.abs().max() < 6e4 for g in ref_grads[2:])  # gradients that fit fp16
    loss = covmatch_loss(xr, yr, xs, ys, backend=backend, form="cov")
    grads = torch.autograd.grad(loss, (xs, ys))
    assert torch.isfinite(loss)
    for g, ref in zip(grads, ref_grads[2:]):
        assert torch.isfinite(g).all()
        assert relative_error(g.cpu(), ref) < 4e-3


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cancellation_large_mean_weak_correlation(backend, dtype, device):
    """Features whose means are ten standard deviations from zero and whose columns are nearly uncorrelated:
    the covariance is a small difference of large products. Loss and gradients stay within the dtype's budget
    of the float64 reference (the centring is exact or a rank-one correction, never a cancellation in fp16)."""
    gen = torch.Generator().manual_seed(5)
    inputs = []
    for n, d in ((96, 40), (96, 24), (48, 40), (48, 24)):
        signs = torch.randint(0, 2, (d,), generator=gen, dtype=torch.float64) * 2 - 1
        t = 10.0 * signs + torch.randn(n, d, generator=gen, dtype=torch.float64)
        inputs.append(t.to(dtype).to(device).requires_grad_())
    corr = torch.corrcoef(torch.cat([inputs[0], inputs[1]], 1).detach().double().cpu().t())[:40, 40:]
    assert corr.abs().mean() < 0.15  # weakly correlated
    check_against_reference(inputs, backend, "cov", 1.5, 0.1, dtype)


HYBRID_SHAPES = [(2, 2, 1, 1), (3, 127, 7, 64), (130, 67, 300, 70), (1000, 3, 64, 7)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", HYBRID_SHAPES, ids=str)
def test_hybrid_backend_matches_float64(shape, dtype, device):
    """The large-shape path (cuBLAS products with fp32 output, the fused kernels' epilogues) against float64:
    loss and all four gradients, with and without the mean term."""
    inputs = make_features(shape, dtype, device)
    for rho, lam in HYPER[:2]:
        check_against_reference(inputs, "hybrid", "cov", rho, lam, dtype)


def test_hybrid_backend_choice_and_refusals(device):
    """'auto' takes the hybrid path only for large half-precision CUDA calls in the covariance form; 'hybrid'
    refuses fp32 and mixed dtypes, and the Gram form, in one line each."""
    from covmatch.loss import resolve_backend

    cuda = torch.device("cuda")
    pytest.importorskip("triton")
    bf16 = (torch.bfloat16,) * 4
    assert resolve_backend("auto", cuda, bf16, flops=3.4e11) == "hybrid"
    assert resolve_backend("auto", cuda, bf16, flops=3.2e9) == "triton"
    assert resolve_backend("auto", cuda, (torch.float32,) * 4, flops=3.4e11) != "hybrid"
    assert resolve_backend("auto", cuda, (torch.bfloat16,) * 3 + (torch.float16,), flops=3.4e11) == "triton"
    xr, yr, xs, ys = make_features((5, 4, 3, 2), torch.float32, device)
    with pytest.raises(TypeError, match="backend='hybrid' takes float16 or bfloat16 features"):
        covmatch_loss(xr, yr, xs, ys, backend="hybrid")
    half = [t.detach().half() for t in (xr, yr, xs, ys)]
    with pytest.raises(ValueError, match="backend='hybrid' is the covariance form"):
        covmatch_loss(*half, backend="hybrid", form="gram")
