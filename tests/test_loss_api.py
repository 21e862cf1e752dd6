"""The loss API around the numbers: helpers, backend resolution, and one clear error per bad input."""

from __future__ import annotations

import pytest
import torch

from covmatch import CovMatchLoss, covmatch_loss, covmatch_loss_with_grads, cross_covariance, mean_matching_loss
from covmatch.loss import resolve_backend

from .host_cost import count_dispatched_ops, no_kernel_launches
from .reference import centred_cov


def _four(n_real=4, n_syn=3, d_img=5, d_txt=2, dtype=torch.float32):
    return (
        torch.randn(n_real, d_img, dtype=dtype),
        torch.randn(n_real, d_txt, dtype=dtype),
        torch.randn(n_syn, d_img, dtype=dtype),
        torch.randn(n_syn, d_txt, dtype=dtype),
    )


# ------------------------------------------------------------------------------------------ helpers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cross_covariance(dtype):
    x = (torch.randn(50, 7, dtype=torch.float64) + 4).to(dtype)
    y = (torch.randn(50, 3, dtype=torch.float64) - 2).to(dtype)
    c = cross_covariance(x, y)
    assert c.shape == (7, 3) and c.dtype == torch.float32
    torch.testing.assert_close(c.double(), centred_cov(x.double(), y.double()), rtol=1e-5, atol=1e-6)
    biased = cross_covariance(x, y, unbiased=False)
    torch.testing.assert_close(biased.double(), centred_cov(x.double(), y.double()) * 49 / 50, rtol=1e-5, atol=1e-6)


def test_cross_covariance_gradients():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cross_covariance(a, b), (x, y))


def test_cross_covariance_biased_allows_one_row():
    c = cross_covariance(torch.ones(1, 2), torch.ones(1, 3), unbiased=False)
    assert torch.equal(c, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="at least 2"):
        cross_covariance(torch.ones(1, 2), torch.ones(1, 3))


def test_mean_matching_loss():
    real = torch.randn(10, 4)
    syn = torch.randn(3, 4, dtype=torch.float16)
    expected = ((real.double().mean(0) - syn.double().mean(0)) ** 2).sum()
    out = mean_matching_loss(real, syn)
    assert out.dim() == 0 and out.dtype == torch.float32
    assert abs(out.item() - expected.item()) < 1e-5
    with pytest.raises(ValueError, match=r"same feature dim.*\(10, 4\).*\(3, 5\)"):
        mean_matching_loss(real, torch.randn(3, 5))


# ------------------------------------------------------------------------------------------ backends


def test_backend_auto_on_cpu_is_torch():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cpu"), (torch.float64,)) == "torch"


def test_backend_auto_on_cuda_sends_large_exact_fp32_calls_to_torch(monkeypatch):
    """The dispatch rule alone (no GPU needed): cuBLAS's SGEMM beat Triton's exact fp32 dot on the H200."""
    from covmatch.loss.functional import FP32_TORCH_MIN_FLOPS, loss_flops

    monkeypatch.delenv("COVMATCH_BACKEND", raising=False)
    matmul = torch.backends.cuda.matmul  # a module object monkeypatch cannot set attributes on
    tf32 = matmul.allow_tf32
    cuda, fp32, bf16 = torch.device("cuda"), (torch.float32,) * 4, (torch.bfloat16,) * 4
    large, paper = loss_flops(128, 10_000, 2304, 768), loss_flops(128, 256, 2304, 768)
    assert paper < FP32_TORCH_MIN_FLOPS <= large
    try:
        matmul.allow_tf32 = False
        assert resolve_backend("auto", cuda, fp32, large) == "torch"
        assert resolve_backend("auto", cuda, fp32, paper) == "triton"  # host-bound: fewer launches win
        assert resolve_backend("auto", cuda, bf16, large) == "hybrid"  # cuBLAS products, fused epilogues
        assert resolve_backend("auto", cuda, bf16, paper) == "triton"
        mixed = (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)
        assert resolve_backend("auto", cuda, mixed, large) == "triton"
        assert resolve_backend("triton", cuda, fp32, large) == "triton"  # an explicit backend is kept
        matmul.allow_tf32 = True
        assert resolve_backend("auto", cuda, fp32, large) == "triton"  # TF32 on both paths: not measured apart
    finally:
        matmul.allow_tf32 = tf32


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv("COVMATCH_BACKEND", "triton")
    assert resolve_backend("auto", torch.device("cpu")) == "triton"  # the interpreter is on in tests
    monkeypatch.setenv("COVMATCH_BACKEND", "torch")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("triton", torch.device("cpu")) == "triton"  # explicit beats the variable
    monkeypatch.setenv("COVMATCH_BACKEND", "cuda")
    with pytest.raises(ValueError, match="COVMATCH_BACKEND must be one of"):
        resolve_backend("auto", torch.device("cpu"))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        covmatch_loss(*_four(), backend="triton")


def test_triton_rejects_float64():
    with pytest.raises(TypeError, match="float64 is torch-only"):
        covmatch_loss(*_four(dtype=torch.float64), backend="triton")


def test_unknown_backend_and_form():
    with pytest.raises(ValueError, match="backend must be one of"):
        covmatch_loss(*_four(), backend="cuda")
    with pytest.raises(ValueError, match="form must be one of"):
        covmatch_loss(*_four(), form="dense")
    with pytest.raises(ValueError, match="backend must be one of"):
        CovMatchLoss(backend="fast")


# ------------------------------------------------------------------------------------------ bad inputs


def test_fewer_than_two_rows():
    xr, yr, xs, ys = _four()
    with pytest.raises(ValueError, match=r"syn_img has 1 row\(s\) \(shape \(1, 5\)\).*at least 2"):
        covmatch_loss(xr, yr, xs[:1], ys[:1])


def test_pair_row_counts_differ():
    xr, yr, xs, ys = _four()
    with pytest.raises(
        ValueError, match=r"real_img and real_txt must have the same number of rows.*\(4, 5\).*\(3, 2\)"
    ):
        covmatch_loss(xr, yr[:3], xs, ys)


def test_feature_dims_differ():
    xr, yr, xs, ys = _four()
    with pytest.raises(ValueError, match=r"image feature dims differ.*\(4, 5\).*\(3, 6\)"):
        covmatch_loss(xr, yr, torch.randn(3, 6), ys)
    with pytest.raises(ValueError, match=r"text feature dims differ.*\(4, 2\).*\(3, 9\)"):
        covmatch_loss(xr, yr, xs, torch.randn(3, 9))


def test_not_two_dimensional():
    xr, yr, xs, ys = _four()
    with pytest.raises(ValueError, match=r"real_txt must be 2-D \[rows, features\], got shape \(4, 2, 1\)"):
        covmatch_loss(xr, yr[..., None], xs, ys)
    with pytest.raises(ValueError, match=r"syn_txt must be 2-D.*got shape \(3,\)"):
        covmatch_loss(xr, yr, xs, ys[:, 0])


def test_integer_and_non_tensor_inputs():
    xr, yr, xs, ys = _four()
    with pytest.raises(TypeError, match="syn_img must be a floating-point tensor.*torch.int64"):
        covmatch_loss(xr, yr, xs.long(), ys)
    with pytest.raises(TypeError, match="real_img must be a torch.Tensor, got list"):
        covmatch_loss(xr.tolist(), yr, xs, ys)


def test_devices_differ():
    xr, yr, xs, ys = _four()
    with pytest.raises(ValueError, match="real_img is on cpu but real_txt is on meta"):
        covmatch_loss(xr, yr.to("meta"), xs, ys)
    with pytest.raises(ValueError, match="real features are on cpu but synthetic features on meta"):
        covmatch_loss(xr, yr, xs.to("meta"), ys.to("meta"))


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        ({"rho": 0.0}, ValueError, "rho must be > 0"),
        ({"rho": float("nan")}, ValueError, "rho must be finite"),
        ({"lam": -0.1}, ValueError, "lam must be >= 0"),
        ({"lam": "0.1"}, TypeError, "lam must be a real number, got str"),
    ],
)
def test_bad_hyperparameters(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        covmatch_loss(*_four(), **kwargs)


# ------------------------------------------------------------------------------------------ host-side cost


def test_cached_constants_are_made_once_and_usable_by_autograd():
    """Gram row weights are made once per key (even first under inference mode) and can be saved for
    backward later."""
    from covmatch.loss.forms import gram_row_weights

    with torch.inference_mode():
        first = gram_row_weights(5, 4, 2.0, torch.float32, "cpu")
    again = gram_row_weights(5, 4, 2.0, torch.float32, torch.device("cpu"))
    assert again is first and not again.is_inference()
    torch.testing.assert_close(first, torch.tensor([0.5] * 5 + [-1 / 3] * 4))
    assert gram_row_weights(5, 4, 1.0, torch.float32, "cpu") is not first  # rho is part of the key
    x = torch.randn(9, requires_grad=True)
    (first * x).sum().backward()
    torch.testing.assert_close(x.grad, first)


@pytest.mark.parametrize(
    "form,lam,most_launches,most_ops",
    [("cov", 0.0, 5, 0), ("cov", 0.1, 5, 0), ("gram", 0.0, 4, 10), ("gram", 0.1, 4, 21)],
)
def test_fused_path_launches_little(form, lam, most_launches, most_ops):
    """At the paper's shape the loss is launch-bound, so every launch costs about what a kernel does: one
    forward + backward of the synthetic side in the covariance form is five Triton launches (column
    statistics, D, the final reduction, one per gradient; a split-K reduction per gradient where the output
    tiles do not fill the GPU) and no torch op at any lam (the eager formula: 58, see bench_host.py); the Gram
    form adds torch ops around its kernels."""
    real_img, real_txt, syn_img, syn_txt = _four(n_real=6, n_syn=5, d_img=7, d_txt=3)
    syn_img.requires_grad_()
    syn_txt.requires_grad_()

    def call():
        loss = covmatch_loss(real_img, real_txt, syn_img, syn_txt, rho=2.0, lam=lam, backend="triton", form=form)
        torch.autograd.grad(loss, (syn_img, syn_txt))

    with no_kernel_launches() as launches:
        call()  # makes the cached constants
        launches.clear()
        # ones_like is autograd's seed gradient of torch.autograd.grad(loss): the caller's, whatever the loss
        ops = [op for op in count_dispatched_ops(call) if op != "ones_like"]
    assert len(launches) <= most_launches, [r.name for r in launches]
    assert len(ops) <= most_ops, sorted(ops)
    if form == "cov":
        assert len(launches) + len(ops) <= 5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_named_in_profiles_and_unmarked_otherwise(backend):
    """The call is a named range in torch.profiler traces (bench_step.py attributes time by it), and costs
    no profiler marker when no profiler runs."""
    inputs = _four(n_real=6, n_syn=5, d_img=7, d_txt=3)

    def call():
        covmatch_loss(*inputs, rho=2.0, backend=backend)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    assert "covmatch_loss" in {event.key for event in prof.key_averages()}
    assert not [op for op in count_dispatched_ops(call, all_ops=True) if "record_function" in op]


# ---------------------------------------------------------------------------------------- a first-class op


def _small(requires_grad: bool = False):
    gen = torch.Generator().manual_seed(3)
    shapes = ((12, 9), (12, 5), (8, 9), (8, 5))
    return [(torch.randn(n, d, generator=gen) + 1.0).requires_grad_(requires_grad) for n, d in shapes]


def test_fused_op_passes_torch_library_checks():
    from covmatch.loss.triton_backend import fused_loss

    for form in ("cov", "gram"):
        args = (*_small(), 2.0, 0.1, form, [False, False, True, True])
        result = torch.library.opcheck(fused_loss, args, test_utils=("test_schema", "test_faketensor",
                                                                     "test_aot_dispatch_dynamic"))  # fmt: skip
        assert set(result.values()) == {"SUCCESS"}, result


def test_fused_path_under_func_grad_double_backward_and_vmap():
    xr, yr, xs, ys = _small()

    def loss(backend, syn_img, syn_txt=ys):
        return covmatch_loss(xr, yr, syn_img, syn_txt, rho=2.0, lam=0.1, backend=backend)

    expected = torch.func.grad(lambda s: loss("torch", s))(xs)
    torch.testing.assert_close(torch.func.grad(lambda s: loss("triton", s))(xs), expected)

    second = {}
    for backend in ("torch", "triton"):  # d/dY_S of ||dL/dX_S||^2: a gradient of a gradient
        a, b = xs.clone().requires_grad_(), ys.clone().requires_grad_()
        (g,) = torch.autograd.grad(loss(backend, a, b), a, create_graph=True)
        second[backend] = torch.autograd.grad((g * g).sum(), b)[0]
    torch.testing.assert_close(second["triton"], second["torch"])

    with pytest.raises(RuntimeError, match="fused .triton. path has no vmap rule; pass backend='torch'"):
        torch.func.vmap(lambda s: loss("triton", s))(torch.stack([xs, xs]))


def test_without_library_ops_the_fused_path_still_runs(monkeypatch):
    """A torch that cannot register the op (custom ops arrived in 2.4 and grew since) gets the plain
    functions: the same loss and gradients, in eager mode."""
    from covmatch.loss import triton_backend

    def refuse(*args, **kwargs):
        raise TypeError("no custom ops here")

    with monkeypatch.context() as patch:  # only while registering: torch registers ops of its own lazily
        patch.setattr(torch.library, "custom_op", refuse)
        plain = triton_backend._as_library_op(
            "fused_loss_test", triton_backend.fused_loss._init_fn, None, triton_backend._FUSED_LOSS_SCHEMA
        )
    assert not isinstance(plain, torch._library.custom_ops.CustomOpDef)
    monkeypatch.setattr(triton_backend, "fused_loss", plain)
    xr, yr, xs, ys = _small()
    xs.requires_grad_()
    loss = covmatch_loss(xr, yr, xs, ys, rho=2.0, lam=0.1, backend="triton")
    expected = covmatch_loss(xr, yr, xs, ys, rho=2.0, lam=0.1, backend="torch")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(loss, xs)[0], torch.autograd.grad(expected, xs)[0])
    assert "fused_loss_test" in triton_backend._OP_UNAVAILABLE


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("form", ["cov", "gram"])
def test_loss_with_grads_equals_autograd_and_keeps_no_graph(backend, form):
    """``covmatch_loss_with_grads`` (chunked and GradCache-style callers): the loss and the synthetic
    gradients autograd gives, times ``grad_scale`` (read on the device), and no graph attached."""
    real_img, real_txt, syn_img, syn_txt = _small()
    syn = [syn_img.clone().requires_grad_(), syn_txt.clone().requires_grad_()]
    expected = covmatch_loss(real_img, real_txt, *syn, rho=2.0, lam=0.1, backend="torch", form=form)
    expected_grads = torch.autograd.grad(expected, syn)
    scale = torch.tensor(3.0)
    loss, grad_img, grad_txt = covmatch_loss_with_grads(
        real_img, real_txt, syn_img, syn_txt, rho=2.0, lam=0.1, backend=backend, form=form, grad_scale=scale
    )
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_img, 3.0 * expected_grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_txt, 3.0 * expected_grads[1], rtol=1e-5, atol=1e-6)
    assert not (loss.requires_grad or grad_img.requires_grad or grad_txt.requires_grad)
    assert grad_img.dtype == syn_img.dtype and grad_img.shape == syn_img.shape
    with pytest.raises(TypeError, match="syn_txt must be a torch.Tensor"):
        covmatch_loss_with_grads(real_img, real_txt, syn_img, [1.0], backend=backend)
