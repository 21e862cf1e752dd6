"""End-to-end distillation-iteration benchmark: seconds per iteration and peak memory of ``Distiller.step``
for the paper's architecture (NFNet-L0 at 224 px + a BERT-base-shaped encoder, random weights: speed does
not depend on them) across precisions, activation checkpointing, ``--syn-chunk`` and synthetic batch size;
model FLOPs counted with ``torch.utils.flop_counter`` and the share of time in the loss vs the encoders.

Smoke mode (CPU) runs the ``tiny`` preset instead and asserts nothing about time.
"""

from __future__ import annotations

import time

import pytest
import torch

from covmatch.distill import DistillConfig, Distiller
from covmatch.presets import get_preset

from .common import DEVICE, SMOKE, append_row, percentiles, synchronize

# bert-base-uncased's shape on all-MiniLM-L6-v2's tokenizer (the same 30,522-token uncased vocabulary)
BERT_BASE = (("hidden_size", 768), ("num_hidden_layers", 12), ("num_attention_heads", 12), ("intermediate_size", 3072))

if SMOKE:
    BASE = dict(name="tiny")
    CASES = [("fp32", False, None, 8), ("bf16", True, 4, 8)]
    SYN_SWEEP = [8, 16]
else:
    BASE = dict(
        name="paper",
        dataset="shapes",
        shapes_train_images=2_000,
        shapes_eval_images=100,
        image_weights=None,
        text_encoder="all-MiniLM-L6-v2",
        text_random_init=True,
        text_config_overrides=BERT_BASE,
        train_augment=False,
    )
    CASES = [(p, ckpt, chunk, 256) for p in ("fp32", "bf16", "fp16") for ckpt in (False, True) for chunk in (None, 64)]
    SYN_SWEEP = [64, 256, 1024, 4096]


def _distiller(precision: str, grad_ckpt: bool, chunk, syn_batch: int, zero: int = 0) -> Distiller:
    name = BASE["name"]
    overrides = {k: v for k, v in BASE.items() if k != "name"}
    preset = get_preset(name, num_pairs=syn_batch, syn_batch=syn_batch, iterations=10_000, **overrides)
    config = DistillConfig(
        preset=preset,
        device=str(DEVICE),
        precision=precision,
        grad_checkpointing=grad_ckpt,
        syn_chunk=chunk,
        zero=zero,
        progress=False,
    )
    return Distiller(config, log=lambda _msg: None)


def _measure(d: Distiller, iterations: int):
    batches = iter(d.real_batches(0, iterations + 2))
    for _ in range(2):  # warm-up (autotuning, cuDNN plans, allocator)
        d.step(next(batches))
    synchronize()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
    times = []
    for batch in batches:
        start = time.perf_counter()
        d.step(batch)
        synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(DEVICE) / 2**30 if DEVICE.type == "cuda" else float("nan")
    return percentiles(times), peak, batch


def _flops_and_loss_share(d: Distiller, batch) -> tuple:
    """Model FLOPs of one iteration (counted) and the fraction of device time inside covmatch_loss."""
    from torch.utils.flop_counter import FlopCounterMode

    # Model FLOPs exclude the recomputation of checkpointing and of --syn-chunk's second pass (and
    # FlopCounterMode's module tracking cannot follow either), so count one plain iteration.
    ckpt, chunk = d.config.grad_checkpointing, d.config.syn_chunk
    d.model.image.set_grad_checkpointing(False)
    d.model.text.set_grad_checkpointing(False)
    d.config.syn_chunk = None
    counter = FlopCounterMode(display=False)
    with counter:
        d.step(batch)
    flops = counter.get_total_flops()
    d.config.syn_chunk = chunk
    if ckpt:
        d.model.image.set_grad_checkpointing(True)
        d.model.text.set_grad_checkpointing(True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if DEVICE.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        with torch.profiler.record_function("iteration"):
            d.step(batch)
        synchronize()
    events = {e.key: e for e in prof.key_averages()}
    attr = "device_time_total" if DEVICE.type == "cuda" else "cpu_time_total"
    total = getattr(events["iteration"], attr, 0) or getattr(events["iteration"], "cpu_time_total", 0)
    loss = events.get("covmatch_loss")
    share = (getattr(loss, attr, 0) / total) if (loss is not None and total) else float("nan")
    return flops, share


@pytest.mark.parametrize("precision,grad_ckpt,chunk,syn_batch", CASES)
def test_distillation_step(precision, grad_ckpt, chunk, syn_batch):
    d = _distiller(precision, grad_ckpt, chunk, syn_batch)
    timing, peak, batch = _measure(d, iterations=1 if SMOKE else 5)
    flops, share = _flops_and_loss_share(d, batch)
    append_row(
        "step",
        {
            "preset": BASE["name"],
            "precision": precision,
            "grad_checkpointing": grad_ckpt,
            "syn_chunk": chunk or 0,
            "syn_batch": syn_batch,
            "real_batch": d.config.preset.real_batch,
            "s_per_it": timing["median_ms"] / 1e3,
            "p20_s": timing["p20_ms"] / 1e3,
            "p80_s": timing["p80_ms"] / 1e3,
            "peak_mem_gb": peak,
            "model_tflop_per_it": flops / 1e12,
            "achieved_tflops": flops / (timing["median_ms"] * 1e-3) / 1e12,
            "loss_time_share": share,
        },
    )
    assert flops > 0


@pytest.mark.parametrize("syn_batch", SYN_SWEEP)
@pytest.mark.parametrize("chunk", [None, 8 if SMOKE else 64], ids=["single-pass", "chunked"])
def test_memory_vs_synthetic_batch(syn_batch, chunk):
    if not SMOKE and chunk is None and syn_batch > 1024:
        pytest.skip("single-pass at this synthetic batch exceeds the memory the comparison is about")
    d = _distiller("bf16" if not SMOKE else "fp32", False, chunk, syn_batch)
    timing, peak, _ = _measure(d, iterations=1 if SMOKE else 3)
    append_row(
        "step_scaling",
        {"syn_batch": syn_batch, "syn_chunk": chunk or 0, "s_per_it": timing["median_ms"] / 1e3, "peak_mem_gb": peak},
    )


def test_distillation_step_deepspeed():
    """``--fp16 --zero 2`` (bf16 in smoke mode: DeepSpeed's fp16 needs CUDA) in one process, no launcher."""
    pytest.importorskip("deepspeed")
    precision, syn_batch = ("bf16", 8) if SMOKE else ("fp16", 256)
    d = _distiller(precision, False, None, syn_batch, zero=2)
    try:
        timing, peak, _ = _measure(d, iterations=1 if SMOKE else 5)
    finally:
        d.close()
    append_row(
        "step_deepspeed",
        {
            "preset": BASE["name"],
            "precision": precision,
            "zero": 2,
            "syn_batch": syn_batch,
            "s_per_it": timing["median_ms"] / 1e3,
            "p20_s": timing["p20_ms"] / 1e3,
            "p80_s": timing["p80_ms"] / 1e3,
            "peak_mem_gb": peak,
        },
    )
