"""What ``--compile`` changes in one distillation iteration, measured on the CPU in one run: kernels per iteration
(eager: the aten ops that launch work; compiled: inductor's generated kernels plus the aten ops called around
and from them, the extern GEMMs and convolutions included) and host time per iteration, eager against compiled.

    python -m benchmarks.compiled_structure                    # the paper architecture at shrunk widths, bf16
    python -m benchmarks.compiled_structure --preset tiny --precision fp32 --iterations 5

The paper architecture keeps its depth and op sequence (NFNet-L0, a 12-layer BERT) at shrunk widths (64 px
images, hidden size 128) so that a CPU iteration is short; both counts come from one profiler method
(``torch.profiler`` events: inductor's kernels by name, and the lowest aten ops that do work, a composite op's
callees counted once each, views and allocations not at all), so eager and compiled are counted alike. On a
GPU inductor emits Triton kernels, not C++ ones, and fuses by similar rules: expect similar counts, not equal
ones. The last line is ``kernels: EAGER -> COMPILED``.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from typing import Optional, Sequence

os.environ.setdefault("COVMATCH_BENCH_SMOKE", "1")  # counting runs on the CPU, whatever the machine has

import torch  # noqa: E402
from torch.torch_version import TorchVersion  # noqa: E402

from covmatch.distill import DistillConfig, Distiller  # noqa: E402
from covmatch.distill.compilation import compiled_graphs  # noqa: E402
from covmatch.kernels._launch import NO_LAUNCH_OPS  # noqa: E402

from .bench_step import PAPER, _device_batches, _preset  # noqa: E402
from .count_launches import VIEW_OPS  # noqa: E402

SHRUNK_BERT = (("hidden_size", 128), ("num_hidden_layers", 12), ("num_attention_heads", 2), ("intermediate_size", 512))
SHRUNK = dict(PAPER, image_size=64, proj_dim=256, text_config_overrides=SHRUNK_BERT)
# besides views and allocations: ops that launch nothing themselves, and composites that are no-ops when nothing
# runs below them (a reshape that is a view, a cast to the dtype a tensor has)
NOT_LAUNCHING = NO_LAUNCH_OPS | VIEW_OPS | {"resize_", "set_", "as_strided_", "resolve_conj", "resolve_neg",
                                            "reshape", "contiguous", "to", "flatten", "type_as", "view_as"}  # fmt: skip


def build(
    preset_name: str, precision: str, compile: bool, batches: int, *, syn_batch: Optional[int] = None,
    full_widths: bool = False, **config: object,
) -> Distiller:  # fmt: skip
    """A CPU distiller with the online model on real data: ``paper`` is its architecture at shrunk widths (at its
    own with ``full_widths``), another name a preset; real batch ``batches``, synthetic ``syn_batch`` or the same;
    ``config``: more DistillConfig fields (syn_chunk, grad_checkpointing)."""
    base = dict(PAPER if full_widths else SHRUNK) if preset_name == "paper" else {"name": preset_name}
    base.update(real_batch=batches, online="real", reset_every=1_000)
    name = base.pop("name")
    preset = _preset(name, syn_batch or batches, **base)
    settings = DistillConfig(preset=preset, device="cpu", precision=precision, compile=compile, progress=False,
                             **config)  # fmt: skip
    return Distiller(settings, log=lambda _msg: None)


def _is_kernel(event) -> bool:
    return "cpp_fused" in event.name or event.name.startswith("triton_")  # graph_K_cpp_fused_... on the CPU


def _launches(event, names: collections.Counter) -> int:
    """Kernels an aten op runs: those of the ops below it, or itself when none below it launches (a view, an
    allocation or a conjugation check launches nothing). A ``_foreach_`` op is one launch: on a GPU it is one
    multi-tensor kernel (a few for hundreds of tensors), on the CPU a loop of per-tensor ops."""
    if event.name.startswith("aten::_foreach_"):
        names[event.name[6:]] += 1
        return 1
    below = sum(_launches(c, names) for c in event.cpu_children if c.name.startswith("aten::"))
    if below or event.name[6:] in NOT_LAUNCHING:
        return below
    names[event.name[6:]] += 1
    return 1


def kernels_of(prof) -> dict:
    """Kernels in a profile: inductor's generated kernels, and the lowest aten ops that do work (the ops of a
    composite counted once each, views and allocations not at all), with the most common of those; how many
    of the aten ones ran outside the compiled graphs, and how many times a compiled graph was called."""
    inductor, aten, outside, graph_calls = 0, 0, 0, 0
    names: collections.Counter = collections.Counter()
    for event in prof.events():
        if _is_kernel(event):
            inductor += 1
        elif event.name.startswith(GRAPH_CALL):
            graph_calls += 1
        elif event.name.startswith("aten::") and not _has_ancestor(event, lambda name: name.startswith("aten::")):
            launches = _launches(event, names)
            aten += launches
            if not _has_ancestor(event, lambda name: name.startswith(GRAPH_CALL)):
                outside += launches
    return {"inductor": inductor, "aten": aten, "total": inductor + aten, "top": names.most_common(6),
            "outside": outside, "graph_calls": graph_calls}  # fmt: skip


# the profiler range around each call of a compiled graph (forward or backward) at run time
GRAPH_CALL = "## Call CompiledFxGraph"
# The oldest torch these counts (and gpu_codegen's fake GPU) were checked with: they read inductor's profiler
# ranges and internals, which older versions name or lack differently (2.4 has no GRAPH_CALL range).
OLDEST_TORCH = (2, 11)


def unsupported_reason() -> Optional[str]:
    """Why this torch cannot run the compiled-graph counts, or None."""
    if TorchVersion(torch.__version__) >= OLDEST_TORCH:
        return None
    oldest = ".".join(map(str, OLDEST_TORCH))
    return f"the compiled-graph counts need torch >= {oldest} (this is torch {torch.__version__})"


def _has_ancestor(event, test) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if test(parent.name):
            return True
        parent = parent.cpu_parent
    return False


def measure(preset_name: str, precision: str, compile: bool, iterations: int, batches: int) -> dict:
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # inductor's C++ kernels as named profiler events
    d = build(preset_name, precision, compile, batches)
    steps = _device_batches(d, 0, iterations + 3)
    start = time.perf_counter()
    for batch in steps[:2]:  # warm-up: compilation, if any
        d.step(*batch)
    warmup = time.perf_counter() - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        d.step(*steps[2])
    times = []
    for batch in steps[3:]:
        start = time.perf_counter()
        d.step(*batch)
        times.append(time.perf_counter() - start)
    return {"kernels": kernels_of(prof), "seconds": statistics.median(times), "warmup": warmup}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compiled_structure", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--preset", default="paper", help="paper (its architecture at shrunk widths) or a preset")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations after the profiled one")
    parser.add_argument("--batch", type=int, default=4, help="real and synthetic batch")
    args = parser.parse_args(argv)
    if unsupported_reason() is not None:
        parser.error(unsupported_reason())  # exits with 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {}
    for compile in (False, True):
        results[compile] = measure(args.preset, args.precision, compile, args.iterations, args.batch)
        r = results[compile]
        k = r["kernels"]
        label = "compiled" if compile else "eager"
        print(f"{label:9s} kernels per iteration {k['total']:5d} (inductor {k['inductor']}, aten {k['aten']}); "
              f"{r['seconds'] * 1e3:.1f} ms per iteration (median of {args.iterations}); "
              f"warm-up {r['warmup']:.0f} s")  # fmt: skip
        print(f"          most common aten ops: {', '.join(f'{n} {c}' for n, c in k['top'])}")
    print(f"compiled graphs: {compiled_graphs()}")
    k = results[True]["kernels"]
    print(f"compiled  outside the compiled graphs {k['outside']} kernels, {k['graph_calls']} calls of compiled graphs; "
          f"with --cuda-graphs each call is one graph launch: about {k['outside'] + k['graph_calls']} launches per "
          "iteration (an estimate from this count; measured on a GPU by bench_step)")  # fmt: skip
    eager, compiled = results[False], results[True]
    print(f"host time per iteration: {eager['seconds'] * 1e3:.1f} -> {compiled['seconds'] * 1e3:.1f} ms "
          f"({eager['seconds'] / compiled['seconds']:.2f}x)")  # fmt: skip
    print(f"kernels: {eager['kernels']['total']} -> {compiled['kernels']['total']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
