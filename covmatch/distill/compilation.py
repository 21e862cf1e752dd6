"""``--compile`` and ``--cuda-graphs``: both encoders under ``torch.compile`` (docs/design.md, *Compiled step*).

Each encoder module is compiled in place (``nn.Module.compile``: state-dict keys unchanged), so every pass of an
iteration goes through it: the online model's forward and backward, the target batch's features, and the
synthetic pass differentiated to pixels and token embeddings. Each distinct pass is one graph per encoder
(train or eval mode, parameters trainable or frozen, grad mode, autocast dtype, batch shape), compiled on its
first use and replayed after; ``GRAPH_LIMIT`` bounds them per encoder (past it Dynamo runs that pass eagerly
and warns), and ``compiled_graphs`` counts them for the run's log.
"""

from __future__ import annotations

import torch

__all__ = ["GRAPH_LIMIT", "begin_graphed_iteration", "compile_encoders", "compiled_graphs"]

# Graphs per compiled encoder: an iteration needs at most six (online train, target eval, synthetic with frozen
# parameters, times the synthetic chunk's ragged tail and the initial set's encoding); twice that for headroom.
GRAPH_LIMIT = 16


def compile_encoders(model: torch.nn.Module, *, cuda_graphs: bool = False) -> None:
    """Compile ``model.image`` and ``model.text`` in place, with static shapes; ``cuda_graphs`` captures their
    graphs in CUDA graphs (``mode="reduce-overhead"``)."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), GRAPH_LIMIT))
    mode = "reduce-overhead" if cuda_graphs else None
    model.image.compile(mode=mode, dynamic=False)
    model.text.compile(mode=mode, dynamic=False)


def begin_graphed_iteration() -> None:
    """Start one iteration of CUDA-graph replays (``--cuda-graphs``): every output of the compiled encoders stays
    valid until the next call. Left to its own rule, CUDA-graph trees start a new iteration at each encoder call
    with no backward pending and free the earlier calls' outputs, among them features the step still holds: the
    target batch's image features while its captions are encoded, the first ``--syn-chunk`` chunks' features
    while the next are encoded (in fp32, where no cast copies them out)."""
    torch.compiler.cudagraph_mark_step_begin()


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far (all compiled functions together)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
