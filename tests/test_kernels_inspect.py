"""The fused loss compiled ahead of time for GPUs this machine does not have (``covmatch.loss.inspect``):
every kernel that multiplies matrices does so on the tensor cores for half-precision inputs; ptxas warns about
nothing (no C7515: tensor-core instructions serialised), nothing spills, every kernel fits sm_90's / sm_80's
shared memory, and each K-loop of the SASS is tensor-core work, asynchronous copies and address arithmetic only:
no CUDA-core FMA, no synchronous global load. One forward + backward of the synthetic side is at most six
device launches, torch ops included.

Compilation needs the compiled (not interpreted) kernels, so it runs in a subprocess without
TRITON_INTERPRET; the cases share two processes (about half a minute on 2 cores).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from covmatch.loss.inspect import aot_unavailable_reason, inspect_call  # noqa: E402

needs_aot = pytest.mark.skipif(aot_unavailable_reason() is not None, reason=str(aot_unavailable_reason()))

REPO = Path(__file__).resolve().parents[1]
PAPER = (128, 256, 2304, 768)
LARGE = (128, 10_000, 4096, 4096)
MATRIX_PRODUCT_KERNELS = {"_cov_diff_kernel", "_cov_grad_kernel", "_covmatch_gram_fwd_kernel", "_gram_grad_kernel"}

DRIVER = """
import json, sys
from pathlib import Path
import torch
from covmatch.loss.inspect import ARCHS, DTYPES, inspect_call
out = []
for arch, dtype, shape, tf32, *backend in json.loads(sys.argv[1]):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    dump = Path(sys.argv[2]) / f"{arch}-{dtype}-{'x'.join(map(str, shape))}-{tf32}-{backend}"
    reports, ops = inspect_call(tuple(shape), DTYPES[dtype], ARCHS[arch], dump, backend=(backend or ["triton"])[0])
    out.append({"case": [arch, dtype, shape, tf32, *backend], "ops": ops, "ptx": sorted(p.name for p in dump.iterdir()),
                "kernels": [{"name": r.name, "tc": r.tensor_core_instructions, "spills": r.spill_bytes,
                             "regs": r.registers, "smem": r.shared_bytes, "grid": list(r.grid),
                             "warnings": r.ptxas_warnings, "kloops": [vars(k) for k in r.kloops]}
                            for r in reports]})
print(json.dumps(out))
"""

HALF_CASES = [[arch, dtype, list(shape), False] for arch in ("sm_90", "sm_80") for dtype in ("bf16", "fp16")
              for shape in (PAPER, LARGE)]  # fmt: skip
FP32_CASES = [["sm_80", "fp32", list(PAPER), False], ["sm_80", "fp32", list(PAPER), True]]
HYBRID_CASES = [["sm_90", dtype, list(LARGE), False, "hybrid"] for dtype in ("bf16", "fp16")]


@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cases = HALF_CASES + FP32_CASES + HYBRID_CASES
    dump = tmp_path_factory.mktemp("inspect")
    # two processes, every other case each: compiling is single-threaded and the machine has two cores
    drivers = [subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(cases[k::2]), str(dump)], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (0, 1)]  # fmt: skip
    results = {}
    for driver in drivers:
        stdout, stderr = driver.communicate(timeout=900)
        assert driver.returncode == 0, stderr[-3000:]
        results.update({json.dumps(r["case"]): r for r in json.loads(stdout.strip().splitlines()[-1])})
    return results


@needs_aot
@pytest.mark.parametrize("case", HALF_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{'x'.join(map(str, c[2]))}")
def test_half_precision_compiles_to_clean_tensor_core_mainloops(inspected, case):
    result = inspected[json.dumps(case)]
    kernels = result["kernels"]
    assert {k["name"] for k in kernels} >= {"_cov_diff_kernel", "_cov_grad_kernel"}
    max_shared = {"sm_90": 232_448, "sm_80": 166_912}[case[0]]
    for k in kernels:
        assert k["spills"] == 0, k
        assert k["warnings"] == [], f"ptxas warns about {k['name']}: {k['warnings']}"
        assert k["smem"] <= max_shared, k
        if k["name"] in MATRIX_PRODUCT_KERNELS:
            assert k["tc"] > 0, f"{k['name']} multiplies matrices off the tensor cores: {k}"
            assert k["kloops"], f"{k['name']}: no K-loop found in its SASS"
            for loop in k["kloops"]:
                assert loop["ffma"] == 0 and loop["global_loads"] == 0, f"{k['name']} K-loop: {loop}"
    assert len(kernels) + len(result["ops"]) <= 6, (kernels, result["ops"])
    sms = {"sm_90": 132, "sm_80": 108}[case[0]]
    for k in kernels:  # at both shapes the GEMM tiles can fill the GPU: every SM gets a program
        if k["name"] in MATRIX_PRODUCT_KERNELS:
            assert math.prod(k["grid"]) >= sms, k
    assert len([p for p in result["ptx"] if p.endswith(".ptx")]) == len(kernels)


@needs_aot
def test_fp32_uses_tf32_tensor_cores_exactly_when_torch_allows_it(inspected):
    ieee, tf32 = (inspected[json.dumps(case)]["kernels"] for case in FP32_CASES)
    products = [k for k in ieee if k["name"] in MATRIX_PRODUCT_KERNELS]
    assert products and all(k["tc"] == 0 for k in products)  # allow_tf32 off (torch's default): exact fp32
    assert all(k["tc"] > 0 for k in tf32 if k["name"] in MATRIX_PRODUCT_KERNELS)


@needs_aot
@pytest.mark.parametrize("case", HYBRID_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_large_shape_path_is_four_gemms_and_clean_epilogues(inspected, case):
    """The hybrid path at the large shape: the four products are torch matmuls (cuBLAS), the rest four
    bandwidth-bound Triton kernels (column statistics, D's epilogue, the final reduction, one epilogue per
    gradient) that compile without warnings or spills."""
    result = inspected[json.dumps(case)]
    assert result["ops"] == ["mm"] * 4, result["ops"]
    names = [k["name"] for k in result["kernels"]]
    assert names == ["_column_stats_kernel", "_hybrid_diff_kernel", "_finish_kernel", "_grad_reduce_kernel",
                     "_grad_reduce_kernel"], names  # fmt: skip
    for k in result["kernels"]:
        assert k["spills"] == 0 and k["warnings"] == [] and k["smem"] <= 232_448, k


@needs_aot
def test_command_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    argv = ["--arch", "sm_90", "--dtype", "bf16", "--shape", "128,256,2304,768", "--dump", str(tmp_path)]
    run = subprocess.run([sys.executable, "-m", "covmatch.loss.inspect", *argv], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert lines[-1] == "launches: 6"
    assert all("tensor-core=" in line and "spills=0B" in line and "ptxas-warnings=0" in line for line in lines[:-1])
    bad_argv = ["-m", "covmatch.loss.inspect", "--shape", "1,2,3", "--dump", str(tmp_path)]
    bad = subprocess.run([sys.executable, *bad_argv], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert bad.returncode == 2 and "expected NR,NS,DX,DY" in bad.stderr


def test_older_triton_gets_one_clear_refusal(monkeypatch, tmp_path):
    """Before Triton 3.3 ``ASTSource`` takes constants by position: the tool says what it needs instead of
    failing inside Triton."""
    import triton.compiler

    class OldASTSource:
        def __init__(self, fn, signature, constants=None, attrs=None) -> None:
            raise AssertionError("not reached")

    monkeypatch.setattr(triton.compiler, "ASTSource", OldASTSource)
    monkeypatch.setattr("covmatch.loss.inspect.interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match=r"needs Triton >= 3\.3 \(this is Triton "):
        inspect_call(PAPER, torch.bfloat16, (9, 0), tmp_path / "dump")
    assert not (tmp_path / "dump").exists()
