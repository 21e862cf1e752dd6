"""Static verification of the fused loss for a GPU this machine may not have.

    python -m covmatch.loss.inspect --arch sm_90 --dtype bf16 --shape 128,256,2304,768 --dump DIR

Runs one forward + backward of the fused loss (synthetic side differentiated, as distillation calls it) on
meta tensors, through the same host code a GPU call runs: the launches it records are exactly the kernels,
grids and tile configurations that call would launch for that architecture (``target_arch``). Each is
compiled ahead of time with Triton for ``--arch`` (its ``.ptx`` and ``.cubin`` written into ``--dump``) and
assembled with the ``ptxas`` Triton ships, and one line per launch gives its name, grid, tile configuration, registers,
spill bytes, shared memory, tensor-core instructions (``wgmma.mma_async`` on sm_90, ``mma.sync`` on
sm_80), fp32 FMAs, FLOPs and bytes moved, what ptxas warns about (``ptxas-warnings=``; e.g. C7515,
tensor-core instructions serialised) and, read from the SASS (``nvdisasm``, shipped with Triton), the
K-loop: instructions per iteration of each loop that issues tensor-core instructions, with the CUDA-core
FMAs (``FFMA``) and the synchronous global loads (``LDG``) among them (``kloop=instructions/FFMA/LDG``).
The last line is ``launches: N``: every device launch of the call, torch ops included (autograd's seed
gradient of ``backward()``, the caller's, is left out).

Needs Triton >= 3.3 (its ``tt.divisibility`` attribute format) and no GPU. It lives in the loss package, above
the kernels, because it runs the loss's host code to learn what a call launches.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from covmatch.kernels import interpreter_enabled
from covmatch.kernels._launch import DispatchedOps, LaunchRecord, recorded_launches, target_arch

from .forms import choose_form
from .triton_backend import FusedCall

__all__ = ["KernelReport", "inspect_call", "main"]

ARCHS = {"sm_90": (9, 0), "sm_80": (8, 0)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SIGNATURE_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
                     torch.int64: "i64", torch.float64: "fp64"}  # fmt: skip
TENSOR_CORE_PATTERNS = {(9, 0): r"\bwgmma\.mma_async\b", (8, 0): r"\bmma\.sync\b"}
SASS_TENSOR_CORE = {(9, 0): ("HGMMA",), (8, 0): ("HMMA",)}
# sm_90 and sm_80 allow at most this much shared memory per block (227 KB and 163 KB)
MAX_SHARED_BYTES = {(9, 0): 232_448, (8, 0): 166_912}


@dataclass
class KLoop:
    """One loop of the SASS that issues tensor-core instructions: what one of its iterations executes."""

    instructions: int
    tensor_core: int
    ffma: int
    global_loads: int


@dataclass
class KernelReport:
    """What ahead-of-time compilation says about one launch."""

    name: str
    grid: Tuple[int, ...]
    tile: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    tensor_core_instructions: int
    fp32_fmas: int
    flops: float
    bytes_moved: float
    ptx: Path
    ptxas_warnings: List[str]
    kloops: List[KLoop]

    def line(self) -> str:
        loops = ",".join(f"{k.instructions}/{k.ffma}/{k.global_loads}" for k in self.kloops) or "-"
        return (f"{self.name:22s} grid={'x'.join(map(str, self.grid)):9s} tile={self.tile:22s} "
                f"regs={self.registers:3d} spills={self.spill_bytes}B smem={self.shared_bytes}B "
                f"tensor-core={self.tensor_core_instructions} fp32-fma={self.fp32_fmas} "
                f"ptxas-warnings={len(self.ptxas_warnings)} kloop={loops} "
                f"flops={self.flops:.3g} bytes={self.bytes_moved:.3g}")  # fmt: skip


def record_call(
    shape: Tuple[int, int, int, int], dtype: torch.dtype, capability: Tuple[int, int], *,
    rho: float = 2.0, lam: float = 0.1, form: str = "auto", backend: str = "triton",
) -> Tuple[List[LaunchRecord], List[str]]:  # fmt: skip
    """The Triton launches and the launching torch ops of one forward + synthetic-side backward, through the
    fused kernels (``backend`` 'triton') or the large-shape path ('hybrid': its GEMMs are the torch ops)."""
    n_real, n_syn, dim_x, dim_y = shape

    def features(n: int, d: int) -> torch.Tensor:
        return torch.empty(n, d, dtype=dtype, device="meta")

    real_x, real_y, syn_x, syn_y = (
        features(n_real, dim_x),
        features(n_real, dim_y),
        features(n_syn, dim_x),
        features(n_syn, dim_y),
    )
    inputs, needs = (real_x, real_y, syn_x, syn_y), [False, False, True, True]
    seed = torch.ones((), device="meta")  # the caller's backward() makes this
    with target_arch(capability), recorded_launches() as launches, DispatchedOps() as ops:
        # the eager path's host functions (on meta tensors the op's registered fake would run instead)
        resolved = "hybrid" if backend == "hybrid" else choose_form(form, n_real, n_syn, dim_x, dim_y)
        call = FusedCall(inputs, rho, lam, resolved, needs)
        loss, aux = call.forward(*inputs)
        call.backward(inputs, aux, seed)
    return list(launches), list(ops.ops)


def _signature(record: LaunchRecord):
    """Triton's signature, constants and specialisation attributes for the launch's arguments, as the JIT
    would make them: 16-byte aligned pointers and ints divisible by 16 get ``tt.divisibility``, ints equal
    to 1 become constants."""
    names = [n for n in record.kernel.arg_names if n not in record.constexprs]
    signature, constants, attrs = {}, dict(record.constexprs), {}
    for name, value in zip(names, record.args):
        position = record.kernel.arg_names.index(name)
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _SIGNATURE_DTYPES[value.dtype]
            attrs[(position,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name], constants[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(position,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{record.name}: argument {name} of type {type(value).__name__}")
    for name in record.constexprs:
        signature[name] = "constexpr"
    return signature, constants, attrs


def nvidia_tool(name: str) -> str:
    """The CUDA tool (``ptxas``, ``nvdisasm``) Triton uses: the one ``TRITON_<NAME>_PATH`` names (inductor points
    ``TRITON_PTXAS_PATH`` at the ptxas a CUDA build of torch ships), else Triton's copy, else one on PATH."""
    import triton

    env = os.environ.get(f"TRITON_{name.upper()}_PATH")
    shipped = Path(triton.__file__).parent / "backends/nvidia/bin" / name
    if env:
        return env
    return str(shipped) if shipped.is_file() else (shutil.which(name) or str(shipped))


def ptxas_info(ptx: Path, capability: Tuple[int, int]) -> Tuple[int, int, List[str], Path]:
    """(registers, spill bytes, performance warnings, cubin) from Triton's ptxas for one kernel's PTX."""
    arch = f"sm_{capability[0]}{capability[1]}" + ("a" if capability[0] >= 9 else "")
    cubin = ptx.with_suffix(".cubin")
    run = subprocess.run([nvidia_tool("ptxas"), f"-arch={arch}", "-v", str(ptx), "-o", str(cubin)],
                         capture_output=True, text=True)  # fmt: skip
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed on {ptx}: {run.stderr.strip().splitlines()[-1:]}")
    registers = max((int(m) for m in re.findall(r"Used (\d+) registers", run.stderr)), default=0)
    spills = sum(int(m) for m in re.findall(r"(\d+) bytes spill (?:stores|loads)", run.stderr))
    warnings = [line.strip() for line in run.stderr.splitlines()
                if re.search(r"\(C\d{4}\)|[Ww]arning|Performance", line)]  # fmt: skip
    return registers, spills, warnings, cubin


_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)[^;]*;")
_SASS_BRANCH = re.compile(r"\bBRA\b.*`\((\.L\w+)\)")
_SASS_LABEL = re.compile(r"^(\.L\w+):")


def sass_kloops(sass: str, tensor_core_ops: Sequence[str]) -> List[KLoop]:
    """The loops of a SASS listing (a label and a later branch back to it) that issue tensor-core
    instructions, each as the counts of one iteration."""
    opcodes: List[str] = []
    labels = {}
    loops = []
    for line in sass.splitlines():
        label = _SASS_LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(opcodes)
            continue
        found = _SASS_LINE.match(line)
        if not found:
            continue
        opcodes.append(found.group(1))
        branch = _SASS_BRANCH.search(line)
        if branch and branch.group(1) in labels:  # a backward branch closes a loop
            loops.append(opcodes[labels[branch.group(1)] :])
    out = []
    for body in loops:
        tensor_core = sum(op in tensor_core_ops for op in body)
        if tensor_core:
            out.append(KLoop(len(body), tensor_core, body.count("FFMA"), body.count("LDG")))
    return out


def _sass(cubin: Path) -> str:
    run = subprocess.run([nvidia_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"nvdisasm failed on {cubin}: {run.stderr.strip().splitlines()[-1:]}")
    return run.stdout


def aot_unavailable_reason() -> Optional[str]:
    """Why this Triton cannot compile the recorded launches ahead of time, or None: the form of
    ``ASTSource`` used here (constexprs and attributes by name) arrived in Triton 3.3."""
    import triton
    from triton.compiler import ASTSource

    if "constexprs" in ASTSource.__init__.__code__.co_varnames:
        return None
    return f"ahead-of-time compilation needs Triton >= 3.3 (this is Triton {triton.__version__})"


def compile_launch(record: LaunchRecord, capability: Tuple[int, int], ptx_path: Path) -> KernelReport:
    """Compile one recorded launch ahead of time for ``capability`` and read what the compiler emitted."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants, attrs = _signature(record)
    source = ASTSource(record.kernel, signature, constexprs=constants, attrs=attrs)
    options = dict(num_warps=record.config.num_warps, num_stages=record.config.num_stages)
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    compiled = triton.compile(source, target=target, options=options)
    ptx = compiled.asm["ptx"]
    ptx_path.write_text(ptx)
    registers, spills, warnings, cubin = ptxas_info(ptx_path, capability)
    kloops = sass_kloops(_sass(cubin), SASS_TENSOR_CORE[capability])
    c = record.config
    tile = f"{c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}"
    return KernelReport(
        record.name, record.grid, tile, registers, spills, int(compiled.metadata.shared),
        len(re.findall(TENSOR_CORE_PATTERNS[capability], ptx)), len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
        record.flops, record.bytes_moved, ptx_path, warnings, kloops,
    )  # fmt: skip


def inspect_call(
    shape: Tuple[int, int, int, int], dtype: torch.dtype, capability: Tuple[int, int], dump: Path, **kw
) -> Tuple[List[KernelReport], List[str]]:
    """Reports of every Triton launch of one call (PTX files in ``dump``) and its launching torch ops."""
    if interpreter_enabled():
        raise RuntimeError("TRITON_INTERPRET=1 is set: ahead-of-time compilation needs the compiled kernels")
    reason = aot_unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    dump.mkdir(parents=True, exist_ok=True)
    launches, torch_ops = record_call(shape, dtype, capability, **kw)
    reports = [compile_launch(r, capability, dump / f"{i:02d}_{r.name}.ptx") for i, r in enumerate(launches)]
    return reports, torch_ops


def _shape(text: str) -> Tuple[int, int, int, int]:
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"expected NR,NS,DX,DY (four positive integers), got {text!r}")
    shape = tuple(int(p) for p in parts)
    if shape[0] < 2 or shape[1] < 2:
        raise argparse.ArgumentTypeError(f"a covariance needs two rows per set, got {text!r}")
    return shape


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m covmatch.loss.inspect", description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="sm_90", help="GPU architecture to compile for")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of all four feature matrices")
    p.add_argument("--shape", type=_shape, default=(128, 256, 2304, 768), help="n_real,n_syn,d_img,d_txt")
    p.add_argument("--lam", type=float, default=0.1, help="mean-term weight of the call")
    p.add_argument("--form", choices=("auto", "cov", "gram"), default="auto", help="algebraic form")
    p.add_argument("--backend", choices=("triton", "hybrid"), default="triton",
                   help="the fused kernels, or the large-shape path (cuBLAS products, fused epilogues)")  # fmt: skip
    p.add_argument("--dump", type=Path, required=True, help="folder for one .ptx per launch")
    args = p.parse_args(argv)
    try:
        reports, torch_ops = inspect_call(args.shape, DTYPES[args.dtype], ARCHS[args.arch], args.dump,
                                          lam=args.lam, form=args.form, backend=args.backend)  # fmt: skip
    except (RuntimeError, ImportError) as err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 2
    for report in reports:
        print(report.line())
    for op in torch_ops:
        print(f"torch op: {op}")
    print(f"launches: {len(reports) + len(torch_ops)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
