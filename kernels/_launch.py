"""Launch plumbing shared by the kernels: interpreter detection, dot precision, tile configs, autotuning.

Nothing here touches the GPU at import time. Tile configurations are chosen per shape class on first use
(timed on the device, then cached); ``COVMATCH_TRITON_SINGLE_CONFIG=1`` or the Triton interpreter
collapses every list to its first entry so tests are fast and deterministic.

What runs per call is kept to dictionary lookups and integer arithmetic (host time per call is measured by
``benchmarks/bench_host.py``): config choices are cached by exact shape, the interpreter flag is read once,
and grid sizes use plain integer division.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Sequence, Tuple

import torch
import triton
import triton.language as tl

__all__ = [
    "TileConfig",
    "cdiv",
    "interpreter_enabled",
    "single_config_mode",
    "dot_operand_dtype",
    "fp32_dot_precision",
    "pick_config",
    "candidate_configs",
    "shape_bucket",
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


def single_config_mode() -> bool:
    """True when every config list collapses to its first entry (interpreter, or tests on a GPU)."""
    return _INTERPRETER or _env_flag("COVMATCH_TRITON_SINGLE_CONFIG")


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


_CHOSEN: Dict[Tuple[str, Hashable], TileConfig] = {}  # by shape class (sizes rounded up to powers of two)
_CHOSEN_EXACT: Dict[Tuple[str, Hashable], TileConfig] = {}  # by exact key: the per-call lookup
_MAX_EXACT_KEYS = 4096


def pick_config(
    name: str,
    key: Tuple[Hashable, ...],
    configs: Sequence[TileConfig],
    launch: Callable[[TileConfig], object],
) -> TileConfig:
    """Return the fastest of ``configs`` for ``(name, key)``, timing each once with ``launch``.

    ``key`` holds the call's exact sizes (ints) and whatever else decides the choice (dtypes, flags). The
    choice is made once per shape class (ints rounded up by ``shape_bucket``) and then found by exact key,
    one dictionary lookup per call. ``launch(config)`` must run the kernel with that config and write only
    buffers it allocates itself, so timing runs leave nothing behind (which is why we do not use
    ``triton.autotune``: per-tile partial buffers are sized by the tile shape).
    """
    exact_key = (name, key)
    chosen = _CHOSEN_EXACT.get(exact_key)
    if chosen is not None:
        return chosen
    if len(_CHOSEN_EXACT) >= _MAX_EXACT_KEYS:  # many distinct shapes (ragged last chunks...): start over
        _CHOSEN_EXACT.clear()
    cache_key = (name, tuple(shape_bucket(k) if type(k) is int else k for k in key))
    if cache_key in _CHOSEN:
        _CHOSEN_EXACT[exact_key] = _CHOSEN[cache_key]
        return _CHOSEN[cache_key]
    if single_config_mode() or len(configs) == 1:
        best = configs[0]
    else:
        timings = []
        for config in configs:
            try:
                ms = triton.testing.do_bench(lambda c=config: launch(c), warmup=5, rep=20)
            except Exception:  # a config that does not fit the device (shared memory, registers)
                continue
            timings.append((ms, config))
        if not timings:
            raise RuntimeError(f"covmatch: no tile configuration of kernel {name!r} runs for shape {key}")
        best = min(timings, key=lambda t: t[0])[1]
    _CHOSEN[cache_key] = _CHOSEN_EXACT[exact_key] = best
    return best


def candidate_configs(interpreter_config: TileConfig, configs: Sequence[TileConfig]) -> Sequence[TileConfig]:
    """The configs to try: the GPU list, or one large-tile config under the interpreter (few programs)."""
    return (interpreter_config,) if interpreter_enabled() else configs


def shape_bucket(n: int) -> int:
    """Round a size up to a power of two so that tuning is keyed on a few shape classes."""
    return 1 << max(0, int(n - 1).bit_length())
