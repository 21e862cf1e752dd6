"""What inductor generates for a Hopper GPU (sm_90, 132 SMs: H100 or H200) from the compiled distillation step, on
a machine without one: the Triton kernels and library calls in each compiled graph, how often an iteration calls
each graph, and whether inductor would capture the graph in a CUDA graph (``--cuda-graphs``).

    python -m benchmarks.gpu_codegen                    # the paper architecture at shrunk widths, bf16
    python -m benchmarks.gpu_codegen --full-widths      # the paper's widths and 224 px images (slower)
    python -m benchmarks.gpu_codegen --ptxas            # also compile every Triton kernel for sm_90, read ptxas -v
    python -m benchmarks.gpu_codegen --traffic          # the Triton kernels' bytes per iteration at the paper's batches
    python -m benchmarks.gpu_codegen --option combo_kernels=True --write-code DIR  # try a setting, keep the code

How: the step runs on the CPU with both encoders compiled by a backend that hands inductor each forward and
backward graph AOTAutograd makes, with every input moved to a fake ``cuda:0`` (fake tensors; the device's
properties and Triton's target are those of an sm_90 part), and then runs the graph itself eagerly on the CPU.
Inductor's CUDA code generation runs to its end (fusion, Triton sources, the wrapper that calls them and cuBLAS /
cuDNN, the graph partitions CUDA graphs capture, the reasons to skip capturing) and the wrapper's launch lines
are counted. Nothing runs on a GPU, and nothing here is timed.

Limits: every graph input moves to the GPU, so a host tensor that reaches a graph on a real GPU is not seen
(the GPU test of ``--cuda-graphs`` is); the aten graph is traced on the CPU, so an op chosen per device (the
attention kernel behind ``scaled_dot_product_attention``) keeps its CPU variant, counted as one library call like
its CUDA one; a library call counts as one launch (cuDNN's convolution backward may launch more); with no timings
autotuning picks nothing, which changes kernel configurations, not their number. The fake device leans on
inductor's internals: it was checked with torch 2.11 (the GPU machines' version) and 2.14 (the version the tests
pin), and refuses an older torch.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence
from unittest import mock

os.environ.setdefault("COVMATCH_BENCH_SMOKE", "1")  # the step runs on the CPU, whatever the machine has

import torch  # noqa: E402

from .compiled_structure import GRAPH_CALL, build, kernels_of, unsupported_reason  # noqa: E402

# an H100 SXM's properties as torch reports them (an H200 has the same SMs, registers and shared memory)
HOPPER = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3 (fake)", major=9, minor=0, multi_processor_count=132, total_memory=80 * 2**30,
    max_threads_per_multi_processor=2048, max_threads_per_block=1024, warp_size=32, regs_per_multiprocessor=65536,
    shared_memory_per_block=49152, shared_memory_per_block_optin=232448, shared_memory_per_multiprocessor=233472,
    L2_cache_size=50 * 2**20, gcnArchName="", uuid="fake", is_integrated=False,
)  # fmt: skip


@contextlib.contextmanager
def fake_hopper() -> Iterator[None]:
    """Inductor's CUDA code generation without a GPU: the queries it makes of the device (properties, capability,
    current device and stream, RNG state) answered as for ``HOPPER``, Triton's active driver replaced by one that
    only names the sm_90 target, and compiled kernels never loaded. Caches off, so nothing of it is reused later."""
    import torch._inductor.config as inductor_config
    import torch._inductor.scheduler as scheduler
    from torch._dynamo import device_interface
    from torch._inductor.runtime import triton_helpers, triton_heuristics
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class TargetOnlyDriver:
        """What inductor asks of Triton's driver while generating and compiling code, for a device not present."""

        utils = types.SimpleNamespace(
            get_device_properties=lambda _device: {
                "max_shared_mem": HOPPER.shared_memory_per_block_optin,
                "max_num_regs": HOPPER.regs_per_multiprocessor,
                "multiprocessor_count": HOPPER.multi_processor_count,
                "warpSize": HOPPER.warp_size,
            }
        )

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self) -> int:
            return 0

        def set_current_device(self, _device) -> None:
            pass

        def get_current_stream(self, _device=None) -> int:
            return 0

        def get_active_torch_device(self) -> torch.device:
            return torch.device("cuda", 0)

        def get_device_interface(self):
            return torch.cuda

    cuda = {
        "is_available": lambda: True, "is_initialized": lambda: True, "device_count": lambda: 1,
        "current_device": lambda: 0, "set_device": _no_op, "_exchange_device": lambda _i: 0,
        "_maybe_exchange_device": lambda _i: 0, "get_device_properties": lambda _d=None: HOPPER,
        "get_device_capability": lambda _d=None: (9, 0), "synchronize": _no_op,
        "is_current_stream_capturing": lambda: False, "set_rng_state": _no_op,
        "get_rng_state": lambda device="cuda": torch.zeros(16, dtype=torch.uint8),
    }  # fmt: skip
    interface = {
        "current_device": lambda: 0, "device_count": lambda: 1, "is_available": lambda: True, "set_device": _no_op,
        "get_compute_capability": lambda _d=None: 90, "get_device_properties": lambda _d=None: HOPPER,
        "get_raw_stream": lambda _d=None: 0, "exchange_device": lambda _i: 0, "maybe_exchange_device": lambda _i: 0,
        "synchronize": _no_op, "memory_allocated": lambda *_a: 0, "is_bf16_supported": lambda *_a, **_k: True,
    }  # fmt: skip
    previous_driver = driver._active
    with contextlib.ExitStack() as stack:
        for name, value in cuda.items():
            stack.enter_context(mock.patch.object(torch.cuda, name, value))
        for name, value in interface.items():
            if hasattr(device_interface.CudaInterface, name):
                stack.enter_context(mock.patch.object(device_interface.CudaInterface, name, staticmethod(value)))
        stack.enter_context(mock.patch.dict(device_interface.caching_worker_device_properties, {"cuda": [HOPPER]}))
        stack.enter_context(mock.patch.dict(device_interface.caching_worker_current_devices, {"cuda": 0}))
        stack.enter_context(mock.patch.object(scheduler, "has_triton", lambda: True))
        stack.enter_context(mock.patch.object(triton_helpers, "set_driver_to_gpu", _no_op))
        stack.enter_context(mock.patch.object(triton_heuristics.CachingAutotuner, "_make_launchers", _no_op))
        stack.enter_context(
            inductor_config.patch({"fx_graph_cache": False, "force_disable_caches": True, "compile_threads": 1})
        )
        driver.set_active(TargetOnlyDriver())
        stack.callback(setattr, driver, "_active", previous_driver)
        stack.callback(_forget_the_fake_device)
        yield


def _no_op(*_args, **_kwargs) -> None:
    return None


def _forget_the_fake_device() -> None:
    """Clear what torch cached of the fake device, so that later code in this process sees the machine as it is."""
    import torch.utils._triton as torch_triton
    from torch._inductor.runtime.hints import DeviceProperties

    for cached in (torch_triton.has_triton, torch_triton.triton_backend, torch_triton.triton_hash_with_backend,
                   DeviceProperties.create):  # fmt: skip
        cached.cache_clear()


# --- what a generated wrapper launches ---------------------------------------------------------------------------

_TRITON_SOURCE = re.compile(r"'''.*?'''", re.DOTALL)  # the kernels' Triton sources, embedded in the wrapper
_TRITON_LAUNCH = re.compile(r"^\s*(\w+)\.run\(")
_EXTERN_CALL = re.compile(r"\bextern_kernels\.(\w+)\(")
_ATEN_CALL = re.compile(r"\b(?:torch\.ops\.aten|aten)\.(\w+)(?:\.\w+)?\(")
_BUFFER_OP = re.compile(r"\w\.(copy_|zero_|fill_)\(")
_PARTITION_CALL = re.compile(r"\bself\.partitions\[\d+\]\(|\bpartition_\d+\(\w+_args\)")
_FUNCTION = re.compile(r"^\s*def (\w+)\(")
_KERNEL_SOURCE = re.compile(r"async_compile\.triton\('(\w+)', '''(.*?)'''", re.DOTALL)  # name, Triton source
_KERNEL_TRAFFIC = re.compile(r"'kernel_num_gb': ([0-9.e+-]+)")  # in a kernel's inductor_meta (benchmark_kernel)


@dataclasses.dataclass
class WrapperLaunches:
    """Launches in one call of a generated wrapper: Triton kernels, library calls (cuBLAS, cuDNN, attention), aten
    ops it falls back to; how many of them sit outside the graph partitions CUDA graphs capture, and how many
    partitions one call replays."""

    triton: int = 0
    library: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    aten: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    partitions: int = 0
    outside_partitions: int = 0
    triton_gb: float = 0.0  # bytes the Triton launches read and write, by inductor's estimate (when it made one)

    @property
    def total(self) -> int:
        return self.triton + sum(self.library.values()) + sum(self.aten.values())


def wrapper_launches(source: str) -> WrapperLaunches:
    """Count the launch lines of a wrapper inductor generated for a GPU (the module ``output_code`` logs). Lines
    in ``partition_K`` functions are captured by CUDA graphs; lines elsewhere (``call`` with no partitions, or
    between partition calls) are launched one by one on every call."""
    counts = WrapperLaunches()
    traffic = {name: float(found.group(1)) for name, kernel in _KERNEL_SOURCE.findall(source)
               if (found := _KERNEL_TRAFFIC.search(kernel)) is not None}  # fmt: skip
    code = _TRITON_SOURCE.sub("''", source)
    has_partitions = re.search(r"^def partition_\d+\(", code, re.MULTILINE) is not None
    function = None
    for line in code.splitlines():
        match = _FUNCTION.match(line)
        if match:
            function = match.group(1)
            continue
        if line and not line[0].isspace():
            function = None
        if function is None or line.lstrip().startswith("#"):
            continue
        in_partition = function.startswith("partition_")
        if function == "call" and _PARTITION_CALL.search(line):
            counts.partitions += 1
            continue
        if function != "call" and not in_partition:
            continue
        launched = 0
        if (match := _TRITON_LAUNCH.match(line)) is not None:
            counts.triton += 1
            counts.triton_gb += traffic.get(match.group(1), 0.0)
            launched = 1
        elif (match := _EXTERN_CALL.search(line)) is not None:
            counts.library[match.group(1)] += 1
            launched = 1
        elif (match := _ATEN_CALL.search(line)) is not None or (match := _BUFFER_OP.search(line)) is not None:
            counts.aten[match.group(1)] += 1
            launched = 1
        if launched and has_partitions and not in_partition:
            counts.outside_partitions += launched
    if not has_partitions:  # one graph: the whole call is captured
        counts.partitions = 1
    return counts


# --- the backend -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GraphRecord:
    """One graph inductor compiled: what its GPU wrapper launches, why CUDA graphs would skip it, how many of its
    inputs a CUDA graph copies in on each replay (those that are not parameters or buffers), its calls so far."""

    name: str
    kind: str  # forward, backward or inference
    launches: WrapperLaunches
    skip_reasons: List[str]
    copied_inputs: int
    source: str = dataclasses.field(repr=False, default="")
    calls: int = 0


class GpuCodegenBackend:
    """A ``torch.compile`` backend that lowers each graph for a fake sm_90 GPU, records what the generated code
    launches and its CUDA-graph decisions in ``graphs`` (Triton kernels generated, not compiled), and runs the
    graph eagerly on the CPU.
    ``options`` are inductor settings for the GPU lowering alone (``{"combo_kernels": True}``, say)."""

    def __init__(self, options: Optional[Dict[str, object]] = None) -> None:
        self.graphs: List[GraphRecord] = []
        self.options = dict(options or {})

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        import torch._functorch.config as functorch_config
        from torch._inductor.compile_fx import compile_fx

        with functorch_config.patch(enable_autograd_cache=False):  # a cached graph would skip the GPU lowering
            return compile_fx(gm, example_inputs, inner_compile=self._inner_compile)

    def _inner_compile(self, gm: torch.fx.GraphModule, example_inputs, **kwargs):
        """Lower the graph for the fake GPU, then return it to run eagerly here: the CPU has no use for inductor's
        C++ code, whose compilation would take most of the run. Each call is counted and shows in a profile as a
        compiled graph's call (what ``compiled_structure.kernels_of`` looks for)."""
        record = self._lower_for_gpu(gm, example_inputs, kwargs)
        label = f"{GRAPH_CALL} ({record.name}, run eagerly)"

        def run_eagerly(inputs):
            record.calls += 1
            arguments = list(inputs)
            inputs.clear()  # the boxed convention: the callee owns the inputs
            with torch.profiler.record_function(label):
                return gm(*arguments)

        run_eagerly._boxed_call = True
        return run_eagerly

    def _lower_for_gpu(self, gm: torch.fx.GraphModule, example_inputs, kwargs) -> GraphRecord:
        import torch._inductor.config as inductor_config
        from torch._guards import TracingContext, detect_fake_mode
        from torch._inductor import compile_fx as compile_fx_module
        from torch._inductor import output_code
        from torch._inductor.compile_fx import compile_fx_inner
        from torch._inductor.cudagraph_utils import BoxedDeviceIndex
        from torch._inductor.graph import GraphLowering
        from torch._inductor.runtime import triton_heuristics
        from torch._inductor.utils import BoxedBool
        from torch._subclasses.fake_tensor import FakeTensorMode

        context = TracingContext.try_get()
        fake_mode = (context.fake_mode if context is not None else None) or detect_fake_mode(example_inputs)
        fake_mode = fake_mode or FakeTensorMode()
        gpu_inputs = [_on_fake_gpu(t, fake_mode) for t in example_inputs]
        sources: List[str] = []
        reasons: List[str] = []
        codegen = GraphLowering.codegen

        def keep_source(graph, *args, **kw):
            result = codegen(graph, *args, **kw)
            code = result[0] if isinstance(result, tuple) else result
            sources.append(getattr(code, "value", code))
            return result

        def keep_reason(message, *args, **kw) -> None:
            reasons.append(str(message))

        # CUDA graphs on, with a forward device of its own. The forward's output strides go to the tracing context as
        # in a GPU run, so the backward is lowered for the layouts the GPU forward saves (channels-last, say).
        gpu_kwargs = dict(kwargs, cudagraphs=BoxedBool(True), boxed_forward_device_index=BoxedDeviceIndex(0))
        with contextlib.ExitStack() as stack:
            stack.enter_context(fake_hopper())
            stack.enter_context(inductor_config.patch(self.options))
            stack.enter_context(mock.patch.object(GraphLowering, "codegen", keep_source))
            stack.enter_context(mock.patch.object(triton_heuristics.CachingAutotuner, "precompile", _no_op))
            # a skipped backward's wrapper tells the CUDA-graph manager at run time; nothing runs here
            stack.enter_context(mock.patch.object(output_code, "maybe_handle_backward_generation", _no_op))
            for module in (output_code, compile_fx_module):
                if hasattr(module, "log_cudagraph_skip_and_bump_counter"):
                    stack.enter_context(mock.patch.object(module, "log_cudagraph_skip_and_bump_counter", keep_reason))
            compile_fx_inner(_on_gpu_graph(gm), gpu_inputs, **gpu_kwargs)
        if not sources:
            raise RuntimeError("inductor generated no GPU wrapper for a graph (was it served from a cache?)")
        kind = "backward" if kwargs.get("is_backward") else "inference" if kwargs.get("is_inference") else "forward"
        static = set(kwargs.get("static_input_idxs") or ())
        copied = sum(1 for i, t in enumerate(example_inputs) if isinstance(t, torch.Tensor) and i not in static)
        record = GraphRecord(f"graph {len(self.graphs)}", kind, wrapper_launches(sources[-1]), reasons, copied,
                             sources[-1])  # fmt: skip
        self.graphs.append(record)
        return record


def _on_fake_gpu(tensor, fake_mode):
    """A fake tensor on ``cuda:0`` with ``tensor``'s shape, strides and dtype (anything else unchanged)."""
    from torch._subclasses.fake_tensor import FakeTensor

    if not isinstance(tensor, torch.Tensor):
        return tensor
    meta = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
    return FakeTensor(fake_mode, meta, torch.device("cuda", 0))


def _on_gpu_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of an aten graph whose ops that name the CPU as a device (factories, random seeds) name ``cuda:0``."""
    from torch.fx.node import map_aggregate

    def on_gpu(value):
        is_cpu = isinstance(value, torch.device) and value.type == "cpu"
        return torch.device("cuda", 0) if is_cpu else value

    gpu = copy.deepcopy(gm)
    for node in gpu.graph.nodes:
        node.args = map_aggregate(node.args, on_gpu)
        node.kwargs = map_aggregate(node.kwargs, on_gpu)
    gpu.recompile()
    return gpu


# --- ptxas on the compiled kernels -------------------------------------------------------------------------------


@dataclasses.dataclass
class PtxasReport:
    kernels: int = 0
    configurations: int = 0
    max_registers: int = 0
    spilling: List[str] = dataclasses.field(default_factory=list)
    warnings: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    ptxas: str = ""  # the ptxas that ran, with its release


def ptxas_report(wrappers: Sequence[str]) -> PtxasReport:
    """Compile every Triton kernel of the given GPU wrappers for sm_90, in each of its autotuning configurations,
    and read ``ptxas -arch=sm_90a -v`` on its PTX (``covmatch.loss.inspect``'s reading): registers, spills, and
    the warnings ptxas prints."""
    import torch._inductor.config as inductor_config
    from torch._inductor.codecache import PyCodeCache

    from covmatch.loss.inspect import nvidia_tool, ptxas_info

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("ptxas_report compiles Triton kernels: run it where TRITON_INTERPRET is not set")
    kernels = {source: name for wrapper in wrappers for name, source in _KERNEL_SOURCE.findall(wrapper)}
    report = PtxasReport(kernels=len(kernels))
    # the static launcher keeps only a cubin; Triton's own CompiledKernel keeps the PTX
    static_launcher_off = inductor_config.patch(use_static_cuda_launcher=False)
    with tempfile.TemporaryDirectory() as scratch, fake_hopper(), static_launcher_off:
        for source, name in kernels.items():
            autotuner = getattr(PyCodeCache.load(source), name)
            for config in autotuner.configs:
                kernel = autotuner._precompile_config(config).kernel
                report.configurations += 1
                if not report.ptxas:  # once a kernel compiled: inductor has chosen the ptxas by then
                    ptxas = nvidia_tool("ptxas")
                    release = subprocess.run([ptxas, "--version"], capture_output=True, text=True, check=False)
                    found = re.search(r"release (\d+\.\d+)", release.stdout)
                    report.ptxas = f"{ptxas} (release {found.group(1) if found else 'unknown'})"
                ptx = Path(scratch) / f"{name}.ptx"  # named in ptxas_info's error
                ptx.write_text(kernel.asm["ptx"])
                registers, spills, warnings, _cubin = ptxas_info(ptx, (9, 0))
                report.max_registers = max(report.max_registers, registers)
                if spills:
                    report.spilling.append(f"{name} {config}")
                report.warnings.update(warning[:100] for warning in warnings)
    return report


# --- the run -----------------------------------------------------------------------------------------------------


def run_step(
    backend: GpuCodegenBackend, *, preset_name: str = "paper", full_widths: bool = False, precision: str = "bf16",
    batch: int = 4, syn_batch: Optional[int] = None, syn_chunk: Optional[int] = None,
    grad_checkpointing: bool = False,
) -> Dict[str, int]:  # fmt: skip
    """Build a distiller (``paper``: its architecture at shrunk widths unless ``full_widths``; or another preset;
    real batch ``batch``, synthetic batch ``syn_batch`` or the same) with both encoders compiled by ``backend``,
    take two steps to compile every graph, then count the graph calls of a third, profiled, and the ops outside
    the graphs (as ``compiled_structure`` counts them)."""
    from covmatch.distill import engine

    from .bench_step import _device_batches

    def compile_with_backend(model, *, cuda_graphs: bool = False) -> None:
        for encoder in (model.image, model.text):
            encoder.compile(backend=backend, dynamic=False)

    with mock.patch.object(engine, "compile_encoders", compile_with_backend):
        distiller = build(preset_name, precision, True, batch, syn_batch=syn_batch, full_widths=full_widths,
                          syn_chunk=syn_chunk, grad_checkpointing=grad_checkpointing)  # fmt: skip
    steps = _device_batches(distiller, 0, 3)
    for step in steps[:2]:
        distiller.step(*step)
    for record in backend.graphs:
        record.calls = 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        distiller.step(*steps[2])
    counted = kernels_of(prof)
    return {"outside": counted["outside"], "graph_calls": counted["graph_calls"]}


def summarize(graphs: Sequence[GraphRecord], outside: int, print_line: Callable[[str], None] = print) -> Dict[str, int]:
    """Print one line per graph and the launches per iteration: with ``--compile`` (every kernel and library call
    of each graph call, plus the ops outside the graphs) and with ``--cuda-graphs`` (a replay per partition, the
    launches outside partitions, a copy per non-static input, plus the ops outside the graphs)."""
    compile_total, graphed_total = outside, outside
    for record in graphs:
        launches = record.launches
        library = ", ".join(f"{n} {c}" for n, c in launches.library.most_common())
        aten = ", ".join(f"{n} {c}" for n, c in launches.aten.most_common()) or "none"
        skip = "; ".join(sorted(set(record.skip_reasons))) or "no"
        print_line(f"{record.name:9s} {record.kind:9s} x{record.calls} per iteration: {launches.total} launches "
                   f"(Triton {launches.triton}; library {library or 'none'}; aten {aten}); CUDA-graph partitions "
                   f"{launches.partitions}, launches outside them {launches.outside_partitions}, inputs copied in "
                   f"{record.copied_inputs}; CUDA graphs skipped: {skip}")  # fmt: skip
        compile_total += record.calls * launches.total
        if record.skip_reasons:
            graphed_total += record.calls * launches.total
        else:
            graphed_total += record.calls * (launches.partitions + launches.outside_partitions + record.copied_inputs)
    skipped = sum(1 for r in graphs if r.skip_reasons)
    print_line(f"graphs: {len(graphs)} ({skipped} that CUDA graphs would skip); ops outside the graphs per "
               f"iteration: {outside}")  # fmt: skip
    print_line(f"launches per iteration on sm_90: --compile {compile_total}, --compile --cuda-graphs {graphed_total}")
    return {"compile": compile_total, "cuda_graphs": graphed_total, "skipped": skipped}


# memory bandwidth, TB/s: H200 (HBM3e) and H100 SXM (HBM3)
BANDWIDTH = {"H200": 4.8, "H100": 3.35}
PAPER_BATCHES = (128, 256)  # real and synthetic batch of the paper's configuration


def triton_traffic(step_options: Dict[str, object], inductor_options: Dict[str, object]) -> Dict[str, float]:
    """GB the Triton kernels of one iteration read and write, by inductor's own estimate per kernel
    (``benchmark_kernel``), at real / synthetic batches 2 / 4 and 4 / 8, extrapolated linearly to the paper's
    128 / 256 (a kernel's traffic is its weights' plus its activations', linear in the batch). The library calls
    (convolutions, GEMMs, attention) move bytes of their own, not counted here."""
    measured = {}
    for real in (2, 4):
        backend = GpuCodegenBackend(dict(inductor_options, benchmark_kernel=True))
        try:
            run_step(backend, batch=real, syn_batch=2 * real, **step_options)
        finally:
            torch._dynamo.reset()
        measured[real] = sum(record.calls * record.launches.triton_gb for record in backend.graphs)
    per_pair = (measured[4] - measured[2]) / 2
    return {"at 2/4": measured[2], "at 4/8": measured[4], "paper": measured[4] + per_pair * (PAPER_BATCHES[0] - 4)}


def _inductor_option(text: str):
    """``NAME=VALUE`` as (name, value), the value read as a Python literal where it is one (True, 4, "x")."""
    import ast

    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--option {text!r}: expected NAME=VALUE")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_codegen", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", help="paper (its architecture) or another preset")
    parser.add_argument("--full-widths", action="store_true", help="the paper's widths and 224 px (default: shrunk)")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--batch", type=int, default=4, help="real and synthetic batch")
    parser.add_argument("--syn-chunk", type=int, help="encode the synthetic batch this many pairs at a time")
    parser.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing in both encoders")
    parser.add_argument("--ptxas", action="store_true", help="compile every Triton kernel for sm_90, run ptxas -v")
    parser.add_argument("--traffic", action="store_true",
                        help="the Triton kernels' memory traffic per iteration at the paper's batches")  # fmt: skip
    parser.add_argument("--write-code", metavar="DIR", help="write each graph's generated GPU module into DIR")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="an inductor setting for the GPU lowering (combo_kernels=True); repeatable")  # fmt: skip
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if unsupported_reason() is not None:
        parser.error(unsupported_reason())  # exits with 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        options = dict(_inductor_option(option) for option in args.option)
        import torch._inductor.config as inductor_config

        with inductor_config.patch(options):  # an unknown setting fails here, not halfway through the run
            pass
    except (ValueError, AttributeError, KeyError) as error:
        parser.error(f"--option: {error}")  # exits with 2
    if args.write_code and os.path.isdir(args.write_code) and os.listdir(args.write_code):
        parser.error(f"--write-code {args.write_code}: the directory is not empty; name a new one")  # exits with 2
    backend = GpuCodegenBackend(options)
    counted = run_step(
        backend, preset_name=args.preset, full_widths=args.full_widths, precision=args.precision, batch=args.batch,
        syn_chunk=args.syn_chunk, grad_checkpointing=args.grad_checkpointing,
    )  # fmt: skip
    summarize(backend.graphs, counted["outside"])
    if args.write_code:
        os.makedirs(args.write_code, exist_ok=True)
        for i, record in enumerate(backend.graphs):
            with open(os.path.join(args.write_code, f"graph_{i}_{record.kind}.py"), "w") as handle:
                handle.write(record.source)
    if args.traffic:
        step_options = dict(preset_name=args.preset, full_widths=args.full_widths, precision=args.precision,
                            syn_chunk=args.syn_chunk, grad_checkpointing=args.grad_checkpointing)  # fmt: skip
        gb = triton_traffic(step_options, options)
        at_paper = ", ".join(f"{gb['paper'] / tbps:.3g} ms at {card} {tbps} TB/s" for card, tbps in BANDWIDTH.items())
        print(f"Triton kernels' memory traffic per iteration (inductor's estimate; library calls not counted): "
              f"{gb['at 2/4']:.3g} GB at real / synthetic batches 2 / 4, {gb['at 4/8']:.3g} GB at 4 / 8, "
              f"{gb['paper']:.3g} GB at {PAPER_BATCHES[0]} / {PAPER_BATCHES[1]} (linear): {at_paper}")  # fmt: skip
    if args.ptxas:
        report = ptxas_report([record.source for record in backend.graphs])
        warnings = "; ".join(f"{w} ({n})" for w, n in report.warnings.most_common()) or "none"
        print(f"{report.ptxas} -arch=sm_90a: {report.kernels} Triton kernels, {report.configurations} "
              f"configurations, at most {report.max_registers} registers; spilling: "
              f"{', '.join(report.spilling) or 'none'}; warnings: {warnings}")  # fmt: skip
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
