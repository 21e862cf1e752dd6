"""The activation-memory count of benchmarks/count_memory.py: what it counts on a known graph, and what it
finds on the tiny preset (checkpointing shrinks the synthetic graph, --syn-chunk makes it flat in N)."""

from __future__ import annotations

import pytest
import torch

import benchmarks.bench_step as bench_step
from benchmarks.count_memory import SavedBytes, count_step


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
