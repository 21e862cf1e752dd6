"""``--compile`` on CPU (inductor) and what ``--cuda-graphs`` needs of a step, checked without a GPU.

The compiled run's synthetic set equals the eager run's (inductor's random numbers replaced by eager's, so
dropout draws the same masks), the compiled graphs stop growing after the first iterations, and the refusals
are one line each. A step is capturable only if every ordinary iteration dispatches the same ops on the same
shapes (the allocations a CUDA graph replays) and creates no tensor from host data.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from covmatch.distill import DistillConfig, Distiller
from covmatch.distill.cli import main as distill_main
from covmatch.distill.compilation import GRAPH_LIMIT, compiled_graphs
from covmatch.presets import get_preset


def _distiller(**overrides) -> Distiller:
    preset = get_preset("tiny", online="real", reset_every=2, iterations=4)
    return Distiller(DistillConfig(preset=preset, device="cpu", progress=False, **overrides), log=lambda _m: None)


def _run(d: Distiller, iterations: int, graphs: list) -> list:
    """``iterations`` steps; the compiled graphs after each go to ``graphs``; returns the steps' skip flags
    (synthetic set, online model) for an fp16 overflow."""
    skips = []
    for real, online in zip(d.real_batches(0, iterations), d.online_batches(0, iterations)):
        metrics = d.step(real, online)
        graphs.append(compiled_graphs())
        skips.append((int(metrics["skipped"]), int(metrics["online_skipped"])))
    return skips


# Inductor's C++ kernels without SIMD: a cold compile takes two thirds of the time (the tests' cost is the C++
# compiler's), and what is checked here, the set and the graphs, does not depend on vectorisation. The FX graph
# cache stays off: with it, a cache directory earlier runs had filled handed these tests vectorised kernels under
# the scalar setting, which then failed to compile against the scalar precompiled header (torch 2.14); off, the
# graphs are lowered afresh, and the C++ kernels still come from their own cache.
SCALAR_CPP = {"cpp.vec_isa_ok": False, "fx_graph_cache": False}


@pytest.mark.slow
def test_compiled_set_equals_eager_and_graphs_are_bounded():
    import torch._inductor.config as inductor_config

    with inductor_config.patch({**SCALAR_CPP, "fallback_random": True}):
        _compare_compiled_with_eager()


def _compare_compiled_with_eager() -> None:
    torch.manual_seed(0)
    eager = _distiller()
    initial = eager.synthetic.images.detach().clone()
    _run(eager, 4, [])
    assert not torch.equal(eager.synthetic.images, initial)  # the set moved
    torch.manual_seed(0)
    compiled = _distiller(compile=True)
    before = compiled_graphs()
    graphs: list = []
    _run(compiled, 4, graphs)  # resets at 0 and 2: every kind of iteration twice
    new = [g - before for g in graphs]
    assert 0 < new[-1] <= 2 * GRAPH_LIMIT and new[1] == new[-1], new  # nothing compiled after iteration 1
    for name in ("images", "text_embeds"):
        a, b = getattr(eager.synthetic, name), getattr(compiled.synthetic, name)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * a.abs().max().item())


# the tiny text encoder without dropout: eager and CUDA-graph runs then draw no random numbers in a step
NO_DROPOUT = (("hidden_dropout_prob", 0.0), ("attention_probs_dropout_prob", 0.0))


def _against_eager(device: str, settings: Optional[dict] = None, tolerance: float = 1e-3, **flags) -> list:
    """Five iterations (resets at 0, 2, 4; fp32 unless ``settings`` say otherwise; ``--syn-chunk 4``, so a step
    holds encoder outputs across encoder calls) with ``settings``, eager and with ``flags``: every learnt tensor
    of the set moves the same way, to ``tolerance`` of its step, the same steps are skipped for an fp16 overflow
    (returned), and on a GPU every compiled graph is captured."""
    from torch._dynamo.utils import counters

    overrides = get_preset("tiny").text_config_overrides + NO_DROPOUT
    preset = get_preset("tiny", online="real", reset_every=2, iterations=5, text_config_overrides=overrides)

    def distil(**extra) -> tuple:
        torch.manual_seed(0)
        config = DistillConfig(preset=preset, device=device, syn_chunk=4, progress=False, **(settings or {}), **extra)
        d = Distiller(config, log=lambda _m: None)
        initial = {name: t.detach().clone() for name, t in d.synthetic.learned().items()}
        skips = _run(d, 5, [])
        return d.synthetic.learned(), initial, skips

    eager, eager_start, eager_skips = distil()
    skipped = counters["inductor"]["cudagraph_skips"]
    other, other_start, other_skips = distil(**flags)
    assert counters["inductor"]["cudagraph_skips"] == skipped  # no graph fell back to launching kernel by kernel
    assert other_skips == eager_skips  # the same steps skipped for an fp16 overflow (none in fp32)
    for name in eager:  # the steps taken (learnt text features start from encoder outputs, rounded differently)
        moved = eager[name].detach() - eager_start[name]
        gap = (other[name].detach() - other_start[name]) - moved
        assert moved.norm() > 0 and gap.norm() <= tolerance * moved.norm(), (name, float(gap.norm() / moved.norm()))
    return eager_skips


@pytest.mark.slow
def test_compiled_fp16_set_with_chunks_and_checkpointing_equals_eager():
    """--compile under --fp16 (autocast, the loss scales, the online step the tiny model overflows in skipped
    as in eager) with --syn-chunk (a no-grad pass over the chunks, then one with autograd per chunk) and
    --grad-checkpointing (recomputed segments inside the compiled backward) distils the eager set, to half
    precision's rounding (0.2 % apart here)."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(SCALAR_CPP):
        skips = _against_eager("cpu", {"precision": "fp16"}, tolerance=1e-2, compile=True, grad_checkpointing=True)
    assert any(online for _, online in skips), skips  # the overflow this case is meant to include


def test_each_graphed_step_begins_one_cuda_graph_iteration(monkeypatch):
    """With --cuda-graphs every step marks, once and before its work, where its iteration of CUDA-graph replays
    begins, so encoder outputs the step holds are not freed by its later encoder calls."""
    d = _distiller()
    d.config.cuda_graphs = True  # the marking alone: a CPU run cannot capture
    marks: list = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(d.iteration))
    for real, online in zip(d.real_batches(0, 3), d.online_batches(0, 3)):
        d.step(real, online)
    assert marks == [0, 1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/run_gpu.sh runs it)")
@pytest.mark.parametrize("captions", [{}, {"frozen_text": True, "text_features": True}], ids=["embeddings", "features"])
def test_cuda_graphed_set_equals_eager_on_a_gpu(monkeypatch, captions):
    """Learnt token embeddings, and learnt text features (taken from a graphed encoder's output at the start)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions in fp32 in both runs
    try:
        _against_eager("cuda", captions, compile=True, cuda_graphs=True)
    finally:
        torch._dynamo.reset()  # the graphs and their CUDA-graph memory, before the next case


def test_a_compiled_run_says_its_first_iterations_compile(tmp_path):
    """The progress bar stands still while the encoders compile: the run says why, once, before it starts."""
    lines: list = []
    preset = get_preset("tiny", iterations=1)
    d = Distiller(DistillConfig(preset=preset, device="cpu", out=str(tmp_path), progress=False), log=lines.append)
    d.config.compile = True  # the message alone: compiling the encoders is the tests above
    d.run()
    assert [line for line in lines if "compile" in line] == [
        "covmatch: --compile: the first iterations compile both encoders (minutes at the paper's size), the others "
        "reuse the graphs"
    ]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--compile", "--zero", "3"], "--compile works with --zero 1 and 2, not 3"),
        (["--compile", "--cuda-graphs", "--zero", "2"], "--cuda-graphs is not supported with --zero"),
        (["--cuda-graphs"], "--cuda-graphs captures the compiled encoders: add --compile"),
        (["--compile", "--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs a CUDA device"),
    ],
)
def test_compile_refusals_are_one_line(tmp_path, capsys, argv, message):
    code = distill_main(["--preset", "tiny", "--out", str(tmp_path / "run"), "--no-progress", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run" / "synthetic.safetensors").exists()


class DispatchedShapes(TorchDispatchMode):
    """(op, output shapes and dtypes) of every op dispatched, and the ops that make tensors from host data
    (a Python number wrapped for an op, ``scalar_tensor``, is not one: CUDA ops take it as a scalar)."""

    HOST_DATA = {"lift_fresh", "lift_fresh_copy"}  # torch.tensor(data): a host buffer copied to the device

    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []
        self.from_host: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in self.HOST_DATA:
            self.from_host.append(name)
        flat = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((name, tuple((tuple(t.shape), t.dtype) for t in flat if isinstance(t, torch.Tensor))))
        return out


def test_ordinary_iterations_are_capturable():
    """Iterations 1 and 2 (neither resets) dispatch the same ops on the same shapes, and no step makes a tensor
    from host data: what a CUDA graph of the step needs besides no host syncs (tests/test_step_structure.py)."""
    preset = get_preset("tiny", online="real", reset_every=10, iterations=4)
    d = Distiller(DistillConfig(preset=preset, device="cpu", progress=False), log=lambda _m: None)
    batches = list(zip(d.real_batches(0, 3), d.online_batches(0, 3)))
    d.step(*batches[0])
    seen = []
    for real, online in batches[1:]:
        with DispatchedShapes() as mode:
            d.step(real, online)
        seen.append(mode)
    assert seen[0].ops == seen[1].ops
    assert seen[0].from_host == [] and seen[1].from_host == []
