"""The memory counts of benchmarks/count_memory.py: what they count on known tensors and graphs, and what they
find on the tiny preset (checkpointing shrinks the synthetic graph, --syn-chunk makes it flat in N, the whole
step's live bytes hold the state and the saved activations)."""

from __future__ import annotations

import pytest
import torch

import benchmarks.bench_step as bench_step
import benchmarks.count_memory as count_memory
from benchmarks.count_memory import LiveBytes, SavedBytes, count_live_step, count_step


def test_saved_bytes_leaves_out_views_of_parameters():
    w = torch.nn.Parameter(torch.randn(32, 64))
    x = torch.randn(16, 64, requires_grad=True)
    counter = SavedBytes([w])
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        y = torch.nn.functional.linear(x, w)  # saves x and a transposed view of w
    assert counter.live == 4 * 16 * 64
    y.sum().backward()


def test_saved_bytes_counts_each_storage_once_without_parameters_and_frees_with_the_graph():
    w = torch.nn.Parameter(torch.randn(64, 32))
    x = torch.randn(16, 64, requires_grad=True)
    counter = SavedBytes([w])
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        h = x @ w  # saves x (and w, a parameter: not an activation)
        y = h.sin()  # saves h
        z = (y * y).sum()  # saves y twice: one storage
    assert counter.live == 4 * (16 * 64 + 16 * 32 + 16 * 32)
    z.backward()
    assert counter.live == 0
    counter.phase()
    assert counter.phases == [4 * (16 * 64 + 16 * 32 + 16 * 32)]


@pytest.fixture()
def tiny(monkeypatch):
    monkeypatch.setattr(bench_step, "PAPER", dict(name="tiny"))


def test_memory_switches_do_what_they_say_on_the_tiny_preset(tiny):
    plain = [count_step("fp32", False, None, 8, n)[1] for n in (4, 8)]
    assert plain[1] > 1.3 * plain[0]  # the synthetic graph grows with the synthetic batch
    checkpointed = count_step("fp32", True, None, 8, 8)[1]
    assert checkpointed < 0.8 * plain[1]
    chunked = [count_step("fp32", False, 2, 8, n)[1] for n in (4, 8)]
    assert chunked[1] <= 1.05 * chunked[0] < plain[0]  # one chunk's graph at a time
    online = [count_step("fp32", False, None, r, 4)[0] for r in (8, 16)]
    assert online[1] > 1.3 * online[0]  # the online step's graph grows with the real batch


def test_live_bytes_counts_each_storage_from_its_op_until_it_is_freed():
    kept = torch.zeros(100)
    with LiveBytes([kept]) as live:
        a = torch.empty(1000)
        view = a[:10]  # the same storage: counted once
        b = torch.empty(500)
        assert live.live == 4 * (100 + 1000 + 500)
        del a, view
        assert live.live == 4 * (100 + 500)
        c = b * 2
        assert live.live == 4 * (100 + 500 + 500) and c.shape == b.shape
    assert live.peak == 4 * (100 + 1000 + 500)


def test_the_whole_step_holds_the_state_and_the_saved_activations(tiny):
    state, (forward, online, synthetic) = count_live_step("fp32", False, 4, 8)
    online_graph, synthetic_graph = count_step("fp32", False, None, 4, 8)
    d = bench_step._distiller("fp32", False, None, 8)
    weights = sum(p.numel() * p.element_size() for p in d.model.parameters())
    assert state >= 3 * weights  # the weights, their momentum, the pretrained copy a reset restores
    # each graph whole at the end of its forward (less the inputs it saves, which are in the state: 5 %)
    assert forward >= state + 0.95 * online_graph
    assert synthetic >= state + 0.95 * synthetic_graph
    assert online >= state + weights  # the online model's gradients, whole at its step
    larger_state, larger = count_live_step("fp32", False, 16, 32)
    assert larger_state > state and larger[0] > forward and larger[2] > synthetic  # the set and the batches grow


def test_the_whole_step_is_counted_at_the_asked_batches(tiny, monkeypatch):
    monkeypatch.setattr(count_memory, "WHOLE_STEP_CASES", (("fp32", "fp32", False),))
    lines = count_memory.main(["--whole-step", "--real-batch", "4", "--syn-batch", "8"])
    state, peaks = count_live_step("fp32", False, 4, 8)
    assert len(lines) == 3 and "--real-batch 4 --syn-batch 8" in lines[0]
    assert lines[2].startswith(f"fp32: peak {max(peaks) / 2**30:.2f} GiB in the ")
    assert lines[2].endswith(f"state between steps {state / 2**30:.2f} GiB")
