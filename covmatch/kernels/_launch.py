"""Launch plumbing shared by the kernels: interpreter detection, dot precision, tile configs, launches.

Nothing here touches the GPU at import time. Each kernel's tile configurations are an ordered list whose
first entry is what runs (deterministic, no search at run time, so a warm call can be captured in a CUDA
graph); ``COVMATCH_TRITON_AUTOTUNE=1`` times the list once per shape class, precision and device instead,
never during a CUDA-graph capture, and reports every configuration that fails with its error.

Every launch goes through ``launch_kernel``, so ``recorded_launches()`` can list exactly what one call
launches (kernel, grid, arguments, configuration, FLOPs, bytes) without running it:
``python -m covmatch.loss.inspect`` compiles those launches ahead of time for a GPU it does not have.

What runs per call is kept to dictionary lookups and integer arithmetic (host time per call is measured by
``benchmarks/bench_host.py``): config choices are cached by exact shape, the interpreter flag is read once,
and grid sizes use plain integer division.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "TileConfig",
    "cdiv",
    "interpreter_enabled",
    "autotune_enabled",
    "tuned_configs",
    "dot_operand_dtype",
    "fp32_dot_precision",
    "choose_config",
    "bench",
    "shape_bucket",
    "LaunchRecord",
    "NO_LAUNCH_OPS",
    "DispatchedOps",
    "launch_kernel",
    "PreboundLaunch",
    "recorded_launches",
    "target_arch",
    "sm_count",
]


@dataclass(frozen=True)
class TileConfig:
    """One tile shape for a 2-D tiled kernel (rows x cols of the output, inner step)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false")


# Read once, at import: Triton itself decides when it decorates the kernels (at this package's import)
# whether they run compiled or interpreted, so a later change of the variable would not change them either.
_INTERPRETER = _env_flag("TRITON_INTERPRET")


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` when this was imported)."""
    return _INTERPRETER


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for grid sizes on the host (``triton.cdiv`` is a constexpr function on recent Triton,
    whose call wrapper costs microseconds per call)."""
    return -(-a // b)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def dot_operand_dtype(*dtypes: torch.dtype):
    """Operand type for ``tl.dot`` over tensors of these dtypes: the shared half type, else fp32."""
    first = dtypes[0]
    if all(d == first for d in dtypes) and first in (torch.float16, torch.bfloat16):
        return _TL_DTYPES[first]
    return tl.float32


def fp32_dot_precision() -> str:
    """``tl.dot`` precision for fp32 operands: TF32 only where PyTorch itself would use it."""
    if _INTERPRETER:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


# ---------------------------------------------------------------------------------------- launches

# torch ops that launch nothing on any device (allocations, views, profiler markers): what launch counts skip
NO_LAUNCH_OPS = frozenset(
    {"empty", "empty_like", "new_empty", "empty_strided", "t", "view", "select", "slice", "unbind", "expand",
     "unsqueeze", "detach", "alias", "as_strided", "_record_function_enter_new", "_record_function_exit"}
)  # fmt: skip


class DispatchedOps(TorchDispatchMode):
    """Within: the names of the torch ops dispatched, except those in ``skip`` (by default the ones that launch
    nothing). A ``covmatch::`` op is looked into: what its implementation dispatches is recorded, not the op."""

    def __init__(self, skip: frozenset = NO_LAUNCH_OPS) -> None:
        super().__init__()
        self.skip = skip
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "covmatch":
            from torch._library.custom_ops import _maybe_get_opdef

            with self:
                return _maybe_get_opdef(func)._init_fn(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in self.skip:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


class LaunchRecord(NamedTuple):
    """One kernel launch as a host function would issue it (what ``recorded_launches`` collects; a tuple,
    cheap to make, since host time is measured with launches recorded instead of run)."""

    kernel: object  # the @triton.jit function
    grid: Tuple[int, ...]
    args: tuple  # positional arguments, tensors included
    constexprs: dict
    config: TileConfig
    flops: float = 0.0
    bytes_moved: float = 0.0

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__


_RECORDERS: List[List[LaunchRecord]] = []


def launch_kernel(
    kernel, grid: Tuple[int, ...], args: tuple, constexprs: dict, config: TileConfig, *,
    flops: float = 0.0, bytes_moved: float = 0.0,
) -> None:  # fmt: skip
    """``kernel[grid](*args, **constexprs)`` with the config's warps and stages, or, inside
    ``recorded_launches()``, its record instead (nothing runs; outputs stay uninitialised)."""
    if _RECORDERS:
        _RECORDERS[-1].append(LaunchRecord(kernel, tuple(grid), args, constexprs, config, flops, bytes_moved))
        return
    kernel[grid](*args, **constexprs, num_warps=config.num_warps, num_stages=config.num_stages)


# Triton >= 3.4 (``triton.knobs``): a compiled kernel's launcher takes the grid, the stream, the kernel's handles
# and every argument in signature order, constexprs included, which is how ``JITFunction.run`` calls it.
_PREBIND = hasattr(triton, "knobs") and not _INTERPRETER


def _alignment(args: tuple) -> tuple:
    return tuple(a.data_ptr() % 16 == 0 for a in args if isinstance(a, torch.Tensor))


class PreboundLaunch:
    """One launch site whose grid, constexprs and configuration are fixed (a plan's). The first launch goes
    through ``kernel[grid]`` (argument binding, specialisation, compilation or cache lookup); later launches
    call the compiled kernel's launcher directly, as ``JITFunction.run`` does once it has found the kernel
    (launch hooks and launch metadata included), skipping the binding and the cache lookup, as long as the
    tensor arguments' 16-byte alignment (part of the specialisation; integer arguments are the plan's, fixed)
    matches the first launch's and the kernel has no pre-run hook. Anything else goes through ``kernel[grid]``.
    Inside ``recorded_launches()`` a call records instead, like ``launch_kernel``."""

    __slots__ = ("kernel", "grid", "grid3", "constexprs", "config", "constexpr_values", "compiled", "aligned")

    def __init__(self, kernel, grid: Tuple[int, ...], constexprs: dict, config: TileConfig) -> None:
        self.kernel, self.grid, self.constexprs, self.config = kernel, tuple(grid), constexprs, config
        self.grid3 = (*self.grid, 1, 1)[:3]
        names = getattr(kernel, "arg_names", None) or getattr(getattr(kernel, "fn", None), "arg_names", [])
        self.constexpr_values = tuple(constexprs[name] for name in names if name in constexprs)
        self.compiled = None
        self.aligned: Optional[tuple] = None

    def __call__(self, args: tuple, flops: float = 0.0, bytes_moved: float = 0.0) -> None:
        if _RECORDERS:
            _RECORDERS[-1].append(LaunchRecord(self.kernel, self.grid, args, self.constexprs, self.config, flops,
                                               bytes_moved))  # fmt: skip
            return
        compiled = self.compiled
        if compiled is not None and not self.kernel.pre_run_hooks and _alignment(args) == self.aligned:
            # what JITFunction.run does once it has found the compiled kernel
            stream = _current_stream()
            every = (*args, *self.constexpr_values)
            runtime = triton.knobs.runtime
            compiled.run(*self.grid3, stream, compiled.function, compiled.packed_metadata,
                         compiled.launch_metadata(self.grid, stream, *every), runtime.launch_enter_hook,
                         runtime.launch_exit_hook, *every)  # fmt: skip
            return
        config = self.config
        result = self.kernel[self.grid](*args, **self.constexprs, num_warps=config.num_warps,
                                        num_stages=config.num_stages)  # fmt: skip
        if _PREBIND and compiled is None and hasattr(result, "packed_metadata"):
            self.compiled, self.aligned = result, _alignment(args)


def _current_stream():
    driver = triton.runtime.driver.active
    return driver.get_current_stream(driver.get_current_device())


@contextlib.contextmanager
def recorded_launches() -> Iterator[List[LaunchRecord]]:
    """Within: the fused loss runs all its host code but launches nothing; the list fills with the launches."""
    records: List[LaunchRecord] = []
    _RECORDERS.append(records)
    try:
        yield records
    finally:
        _RECORDERS.remove(records)


# ---------------------------------------------------------------------------------------- tile configs

_TARGET: List[Tuple[int, int]] = []  # an architecture set by ``target_arch`` (ahead-of-time inspection)


@contextlib.contextmanager
def target_arch(capability: Tuple[int, int]) -> Iterator[None]:
    """Within: choose configurations as for a GPU of this compute capability (e.g. (9, 0)), whatever runs."""
    _TARGET.append(tuple(capability))
    try:
        yield
    finally:
        _TARGET.pop()


def _capability() -> Optional[Tuple[int, int]]:
    if _TARGET:
        return _TARGET[-1]
    if torch.cuda.is_available():
        return torch.cuda.get_device_capability()
    return None


@dataclass
class _Tuned:
    chosen: Dict[Hashable, TileConfig] = field(default_factory=dict)
    failures: Dict[Hashable, List[str]] = field(default_factory=dict)


_TUNED = _Tuned()


def autotune_enabled() -> bool:
    return _env_flag("COVMATCH_TRITON_AUTOTUNE") and not _INTERPRETER


def tuned_configs() -> Dict[str, str]:
    """What ``COVMATCH_TRITON_AUTOTUNE=1`` has chosen so far: ``"kernel capability shape-class"`` to
    ``"BMxBNxBK wW sS"`` (tile, warps, pipeline stages), for benchmarks to record next to their times."""
    return {
        f"{name} sm{''.join(map(str, cap or ()))} {'x'.join(map(str, key))}": (
            f"{c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}"
        )
        for (name, cap, key), c in _TUNED.chosen.items()
    }


# streaming multiprocessors of the targets ``target_arch`` compiles for (H100/H200 SXM, A100)
_TARGET_SMS = {(9, 0): 132, (8, 0): 108}
_DEVICE_SMS: Dict[int, int] = {}
_DEFAULT_CHOICE: Dict[Hashable, TileConfig] = {}
_MAX_DEFAULT_KEYS = 4096


def sm_count() -> int:
    """SMs of the device the call runs on (or of the ``target_arch``); 1 without a GPU (the interpreter)."""
    if _TARGET:
        return _TARGET_SMS.get(_TARGET[-1], 132)
    if not torch.cuda.is_available():
        return 1
    index = torch.cuda.current_device()
    if index not in _DEVICE_SMS:
        _DEVICE_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _DEVICE_SMS[index]


def choose_config(
    name: str,
    key: Tuple[Hashable, ...],
    configs: Sequence[TileConfig],
    time_config: Optional[Callable[[TileConfig], float]] = None,
    programs: Optional[Callable[[TileConfig], int]] = None,
) -> TileConfig:
    """The configuration kernel ``name`` runs with for ``key`` (its sizes, dtypes and dot precision).

    By default the first of ``configs`` (ordered largest tile first for the kernel's operand kind) whose
    grid (``programs(config)``) covers every SM of the device, else the one with the most programs:
    deterministic and free of any search, so a call can be captured in a CUDA graph. With
    ``COVMATCH_TRITON_AUTOTUNE=1`` and a ``time_config`` (milliseconds of one run of a config), each shape
    class (sizes rounded up to powers of two), precision and device capability is timed once, outside any
    CUDA-graph capture; a config that fails is reported with its error (``RuntimeWarning``) and skipped.
    """
    if isinstance(configs, TileConfig):
        configs = (configs,)
    if len(configs) == 1:
        return configs[0]
    if time_config is None or not autotune_enabled():
        return _default_choice(name, key, configs, programs)
    cache_key = (name, _capability(), tuple(shape_bucket(k) if type(k) is int else k for k in key))
    chosen = _TUNED.chosen.get(cache_key)
    if chosen is not None:
        return chosen
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return _default_choice(name, key, configs, programs)  # no timing inside a capture
    timings, failures = [], []
    for config in configs:
        try:
            timings.append((time_config(config), config))
        except Exception as err:  # a config that does not fit the device (shared memory, registers)
            failures.append(f"{config}: {type(err).__name__}: {err}")
    for failure in failures:
        warnings.warn(
            f"covmatch: tile configuration of {name} for {key} failed: {failure}", RuntimeWarning, stacklevel=3
        )
    _TUNED.failures[cache_key] = failures
    if not timings:
        raise RuntimeError(f"covmatch: no tile configuration of kernel {name!r} runs for {key}: {failures}")
    _TUNED.chosen[cache_key] = best = min(timings, key=lambda t: t[0])[1]
    return best


def _default_choice(name, key, configs, programs) -> TileConfig:
    """The first config whose grid fills the device's SMs (cached by exact key: one lookup per call)."""
    sms = sm_count()
    cache_key = (name, key, sms)
    chosen = _DEFAULT_CHOICE.get(cache_key)
    if chosen is None:
        if programs is None:
            chosen = configs[0]
        else:
            counts = [programs(c) for c in configs]
            filling = [c for c, n in zip(configs, counts) if n >= sms]
            chosen = filling[0] if filling else configs[max(range(len(configs)), key=counts.__getitem__)]
        if len(_DEFAULT_CHOICE) >= _MAX_DEFAULT_KEYS:
            _DEFAULT_CHOICE.clear()
        _DEFAULT_CHOICE[cache_key] = chosen
    return chosen


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` on the GPU (for ``choose_config``'s ``time_config``)."""
    return triton.testing.do_bench(fn, warmup=5, rep=20)


def shape_bucket(n: int) -> int:
    """Round a size up to a power of two so that tuning is keyed on a few shape classes."""
    return 1 << max(0, int(n - 1).bit_length())
