"""The benchmark tooling itself: CSV rows, the target summary, the plots, and run_gpu.sh end to end in
smoke mode (the benchmarks' own smoke cases run from benchmarks/ in the same suite)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import append_row
from benchmarks.plot import main as plot_main
from benchmarks.summarize import summarize

ROOT = Path(__file__).resolve().parents[1]


def _loss_row(shape, dtype, impl, median_ms, floor_ms, pss="fwdbwd"):
    return {"impl": impl, "pass": pss, "shape": shape, "dtype": dtype, "median_ms": median_ms,
            "p20_ms": median_ms, "p80_ms": median_ms, "gemm_floor_ms": floor_ms, "grad_rel_err": 1e-3,
            "smoke": "False", "device": "NVIDIA H200"}  # fmt: skip


def _step_row(precision, chunk, syn_batch, s_per_it, peak, table_extra=None):
    row = {"preset": "paper", "precision": precision, "grad_checkpointing": False, "syn_chunk": chunk, "zero": 0,
           "syn_batch": syn_batch, "real_batch": 128, "s_per_it": s_per_it, "p20_s": s_per_it, "p80_s": s_per_it,
           "peak_mem_gb": peak, "model_tflop_per_it": 20.0, "achieved_tflops": 20.0 / s_per_it,
           "smoke": "False", "device": "NVIDIA H200"}  # fmt: skip
    row.update(table_extra or {})
    return row


def test_append_row_widens_an_older_file(tmp_path):
    path = tmp_path / "t.csv"
    append_row("t", {"a": 1}, path=path)
    append_row("t", {"a": 2, "b": 3}, path=path)
    append_row("t", {"a": 4}, path=path)
    rows = list(csv.DictReader(path.open()))
    assert [(r["a"], r["b"]) for r in rows] == [("1", ""), ("2", "3"), ("4", "")]
    assert all(r["run"] == rows[0]["run"] and r["torch"] for r in rows)


def test_summary_checks_every_target(tmp_path):
    """Ratios within the run, each target met / missed, and cases that did not run reported as such."""
    for impl, ms in (("triton", 1.0), ("torch", 1.4), ("eager", 3.5), ("compiled", 1.2)):
        append_row("loss", _loss_row("paper", "bfloat16", impl, ms, 0.8), path=tmp_path / "loss.csv")
    append_row("loss", _loss_row("square-4096-N=10000", "bfloat16", "triton", 13.0, 10.0), path=tmp_path / "loss.csv")
    append_row("step", _step_row("bf16", 0, 256, 0.08, 9.5, {"launches_per_it": 5000}), path=tmp_path / "step.csv")
    append_row("step", _step_row("bf16", 0, 256, 0.2, 6.0, {"grad_checkpointing": True}), path=tmp_path / "step.csv")
    for mode, seconds, busy, launches in (("compile", 0.07, 0.7, 1100), ("cuda-graphs", 0.05, 0.85, 150)):
        extra = {"compile": mode, "gpu_busy_share": busy, "launches_per_it": launches}
        append_row("step", _step_row("bf16", 0, 256, seconds, 9.0, extra), path=tmp_path / "step.csv")
    for n, peak, state in ((256, 4.0, 0.5), (4096, 11.2, 7.5)):
        extra = {"syn_state_gb": state, "peak_excl_syn_state_gb": peak - state}
        append_row("step_scaling", _step_row("bf16", 64, n, 0.1, peak, extra), path=tmp_path / "step_scaling.csv")
    text = summarize(tmp_path)
    assert "NVIDIA H200" in text and "SMOKE" not in text
    targets = {line.split("|")[1].strip(): line.split("|")[2:5] for line in text.splitlines() if line.count("|") == 5}
    assert targets["bfloat16: triton vs eager"] == [" 3.5 ", " >= 3.0 ", " met "]
    assert targets["bfloat16: triton vs torch.compile"] == [" 1.2 ", " >= 1.5 ", " missed "]
    assert targets["bfloat16: triton / GEMM floor"] == [" 1.25 ", " <= 1.5 ", " met "]
    assert targets["bfloat16: triton / GEMM floor at square-4096-N=10000"] == [" 1.3 ", " <= 1.2 ", " missed "]
    assert targets["bf16 iteration, s (cuda-graphs)"] == [" 0.05 ", " <= 0.1 ", " met "]  # the fastest mode
    assert targets["bf16 iteration, GPU busy (cuda-graphs)"] == [" 0.85 ", " >= 0.8 ", " met "]
    assert targets["bf16 iteration, peak GiB"] == [" 9.5 ", " <= 8.0 ", " missed "]
    assert targets["bf16 iteration with checkpointing, peak GiB"] == [" 6 ", " <= 8.0 ", " met "]
    assert targets["launches per iteration, --compile / eager"] == [" 0.22 ", " <= 0.2 ", " missed "]
    assert targets["launches per iteration, --cuda-graphs / eager"] == [" 0.03 ", " <= 0.2 ", " met "]
    assert targets["--syn-chunk peak memory, batch 4096 / batch 256"] == [" 2.8 ", " <= 1.1 ", " missed "]
    assert targets["the same without the set's own storage, 4096 / 256"] == [" 1.06 ", " <= 1.1 ", " met "]
    assert "| 4096 | n/a | 11.2 | 7.5 | 3.7 | 0.1 |" in text
    # 250 TFLOP/s of 989.5
    assert "| bf16 | False | 0 | 0 | False | eager | 0.08 | 9.5 | 20 | 250 | 25.3% | n/a | 5000 |" in text

    append_row("loss", _loss_row("paper", "float16", "eager", 3.0, 0.8), path=tmp_path / "loss.csv")
    targets = {line.split("|")[1].strip(): line.split("|")[4] for line in summarize(tmp_path).splitlines()
               if line.count("|") == 5}  # fmt: skip
    assert targets["float16: triton vs eager"] == " not measured "  # its triton case did not run


def test_plots_from_csvs(tmp_path):
    pytest.importorskip("matplotlib")
    for impl, ms in (("triton", 1.0), ("eager", 3.5)):
        append_row("loss", _loss_row("paper", "bfloat16", impl, ms, 0.8), path=tmp_path / "loss.csv")
    append_row("step", _step_row("bf16", 0, 256, 0.08, 9.5), path=tmp_path / "step.csv")
    append_row("step_scaling", _step_row("bf16", 64, 256, 0.1, 4.0), path=tmp_path / "step_scaling.csv")
    assert plot_main([str(tmp_path)]) == 0
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "step.png").stat().st_size > 0


def test_run_gpu_script_in_smoke_mode(tmp_path):
    """benchmarks/run_gpu.sh end to end on the CPU, with a few cases per stage: it must leave the files the GPU
    run is fetched for (at most 8 files come back from the device machine) and a summary."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(out),
        "CARRY": str(tmp_path / "no-carry"),
        "COVMATCH_BENCH_SMOKE": "1",
        "TRITON_INTERPRET": "1",
        "RUN_GPU_TESTS_K": "forms",
        "RUN_GPU_BENCH_K": "smoke-a and float32 and triton-fwdbwd or headline or synthetic_batch or cost and cov-lam",
    }
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["host.csv", "loss.csv", "loss.png", "run_gpu.log", "step.csv", "step.png", "step_scaling.csv",
                     "summary.md"]  # fmt: skip
    log = (out / "run_gpu.log").read_text()
    assert "2 passed" in log and "time limit" not in log and "=== done" in log
    assert "cache path (a reader thread" in log and "\nimages/s: " in log  # the data stage
    assert "=== bf16-nockpt-nochunk-N8 eager: the 15 ops and kernels with the most self_cpu_time_total" in log
    summary = (out / "summary.md").read_text()
    assert "SMOKE MODE" in summary and "| triton-cov | 0.0 |" in summary


def test_count_flops_extrapolates_linearly():
    """benchmarks/count_flops.py (the README's FLOPs per paper iteration): the fit from small batches
    predicts a direct count at other batch sizes."""
    from benchmarks.count_flops import count_iteration
    from benchmarks.count_flops import main as count_flops

    lines = count_flops(["--preset", "tiny", "--small", "2", "4", "--real-batch", "12", "--syn-batch", "6"])
    assert float(lines[1].split("linearity check at (4, 8): ")[1].split(" %")[0]) < 1.0
    predicted = float(lines[2].split(": ")[1].split(" GFLOP")[0]) * 1e9
    direct = count_iteration("tiny", 12, 6)
    assert predicted == pytest.approx(direct, rel=0.02)


def test_count_launches_files_every_op_under_its_phase():
    """benchmarks/count_launches.py: the phases of an iteration, and a reset that costs a handful of ops (one
    batched copy, four draws on the device, no optimiser rebuilt)."""
    from benchmarks.count_launches import count_iteration

    ordinary = count_iteration("tiny", 4, 4, "fp32", reset=False).by_phase
    reset = count_iteration("tiny", 4, 4, "fp32", reset=True).by_phase
    for phase in ("online step (forward, backward, SGD)", "target features", "synthetic forward, loss, backward",
                  "synthetic SGD step"):  # fmt: skip
        assert sum(ordinary[phase].values()) > 0 and ordinary[phase] == reset[phase], phase
    assert "reset" not in ordinary and 0 < sum(reset["reset"].values()) < 20
    assert reset["reset"]["_foreach_copy_"] == 1 and reset["synthetic SGD step"]["_fused_sgd_"] >= 1


def test_compiled_structure_tells_compiled_kernels_from_eager_launches():
    """benchmarks/compiled_structure.py's count: inductor's kernels, the calls of compiled graphs, and the
    eager ops around them (what a CUDA-graph replay still launches one by one)."""
    _skip_where_compiled_counts_cannot_run()
    import torch
    import torch._inductor.config as inductor_config

    from benchmarks.compiled_structure import kernels_of

    compiled = torch.compile(lambda x: (x.sin() + 1).cos() * x, dynamic=False)
    x = torch.randn(64)
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        compiled(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            (compiled(x) + 1).neg().sum()
    counted = kernels_of(prof)
    assert counted["graph_calls"] == 1 and counted["inductor"] >= 1  # one fused kernel for the compiled function
    assert counted["outside"] == counted["aten"] == 3, counted  # add, neg, sum: eager


GPU_WRAPPER = """
triton_poi_fused_add_0 = async_compile.triton('triton_poi_fused_add_0', '''
@triton_heuristics.pointwise(inductor_meta={'kernel_name': 'triton_poi_fused_add_0', 'kernel_num_gb': 0.25})
def triton_poi_fused_add_0(in_ptr0, xnumel):
    tmp0.run(x)  # inside a Triton source: not a launch
''')


def partition_0(args):
    primals_1, primals_2 = args
    with torch.cuda._DeviceGuard(0):
        # Topologically Sorted Source Nodes: [mm], Original ATen: [aten.mm]
        extern_kernels.mm(primals_1, primals_2, out=buf0)
        triton_poi_fused_add_0.run(buf0, 64, stream=raw_stream0)
        buf1.zero_()
        buf2 = torch.ops.aten._efficient_attention_forward.default(buf0, buf0, buf0)
    return (buf0, )


class Runner:
    def __init__(self, partitions):
        self.partitions = partitions

    def call(self, args):
        (buf0, ) = self.partitions[0](partition0_args)
        buf3 = torch.ops.aten.nonzero.default(buf0)
        (buf4, ) = self.partitions[1](partition1_args)
        return (buf4, )
"""


def _skip_where_compiled_counts_cannot_run() -> None:
    from benchmarks.compiled_structure import unsupported_reason

    if unsupported_reason() is not None:
        pytest.skip(unsupported_reason())


def test_gpu_codegen_refuses_in_one_line(monkeypatch, tmp_path, capsys):
    """An older torch, an unknown inductor setting and a directory that holds files each get one line on stderr
    and exit 2, before anything runs."""
    from benchmarks import gpu_codegen

    (tmp_path / "kept.py").write_text("# a user's file\n")
    monkeypatch.setattr(gpu_codegen.torch, "__version__", "2.14.1")  # the other refusals, on any torch
    cases = [
        (["--write-code", str(tmp_path)], "--write-code", "not empty"),
        (["--option", "no_such_setting=1"], "--option", "no_such_setting"),
    ]
    for argv, flag, words in cases:
        with pytest.raises(SystemExit) as exited:
            gpu_codegen.main(argv)
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert exited.value.code == 2 and flag in error and words in error, error
    monkeypatch.setattr(gpu_codegen.torch, "__version__", "2.4.1")
    with pytest.raises(SystemExit) as exited:
        gpu_codegen.main([])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 2 and "need torch >= 2.11 (this is torch 2.4.1)" in error, error
    assert (tmp_path / "kept.py").read_text() == "# a user's file\n"


def test_gpu_codegen_counts_the_launch_lines_of_a_wrapper():
    """benchmarks/gpu_codegen.py reads inductor's GPU wrapper: Triton launches (with the traffic inductor estimates
    for them), library calls and aten fallbacks, inside the partitions CUDA graphs capture or between them; a
    Triton kernel's own source is not a launch."""
    from benchmarks.gpu_codegen import wrapper_launches

    counted = wrapper_launches(GPU_WRAPPER)
    assert counted.triton == 1 and counted.library == {"mm": 1}
    assert counted.aten == {"zero_": 1, "_efficient_attention_forward": 1, "nonzero": 1}
    assert counted.total == 5 and counted.partitions == 2 and counted.outside_partitions == 1
    assert counted.triton_gb == 0.25  # the launched kernel's traffic, from its inductor_meta


@pytest.mark.slow
def test_gpu_codegen_lowers_forward_and_backward_for_a_gpu_without_one():
    """The fake-Hopper lowering end to end on a small model: a forward and a backward graph for cuda:0 with
    Triton kernels and cuBLAS calls, counted once per call, no reason to skip CUDA graphs; the model itself ran
    on the CPU and computed what eager does."""
    _skip_where_compiled_counts_cannot_run()
    import torch

    from benchmarks.gpu_codegen import GpuCodegenBackend

    torch.manual_seed(0)
    layers = (torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
    model = torch.nn.Sequential(*layers)
    x = torch.randn(16, 32)
    backend = GpuCodegenBackend()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    loss = compiled(x).square().mean()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().mean().backward()
    torch._dynamo.reset()
    assert torch.allclose(loss, model(x).square().mean().detach(), atol=1e-6)
    assert all(torch.allclose(a, p.grad, atol=1e-5) for a, p in zip(grads, model.parameters()))
    kinds = [g.kind for g in backend.graphs]
    assert kinds == ["forward", "backward"], kinds
    for graph in backend.graphs:
        assert graph.calls == 1 and graph.skip_reasons == [] and graph.launches.triton >= 1, graph
        assert "cuda:0" in graph.source and "extern_kernels" in graph.source
    assert sum(sum(graph.launches.library.values()) for graph in backend.graphs) >= 3  # GEMMs forward and back


PTXAS_CHECK = """
import json, torch
from benchmarks.gpu_codegen import GpuCodegenBackend, ptxas_report
backend = GpuCodegenBackend()
model = torch.compile(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.LayerNorm(64)),
                      backend=backend)
model(torch.randn(16, 32)).sum().backward()
report = ptxas_report([graph.source for graph in backend.graphs])
print(json.dumps({"kernels": report.kernels, "configurations": report.configurations,
                  "registers": report.max_registers, "spilling": report.spilling, "ptxas": report.ptxas}))
"""


@pytest.mark.slow
def test_gpu_codegen_compiles_the_generated_kernels_for_sm_90():
    """``--ptxas``: every generated Triton kernel compiles for sm_90 in each autotuning configuration, and ptxas
    reports its registers (a process of its own: the tests run Triton in its interpreter, which compiles nothing)."""
    _skip_where_compiled_counts_cannot_run()
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", PTXAS_CHECK], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["kernels"] >= 2 and report["configurations"] >= report["kernels"], report
    assert report["registers"] > 0 and report["spilling"] == [], report
    assert "ptxas (release " in report["ptxas"], report


@pytest.mark.slow
def test_gpu_codegen_finds_every_graph_of_a_chunked_step_capturable():
    """The compiled ``tiny`` step in bf16 with ``--syn-chunk``, lowered for sm_90: every graph an iteration calls is one
    inductor would capture in a CUDA graph (no mutated inputs, no CPU ops, no dynamic shapes), and replaying them
    launches far fewer kernels than ``--compile`` alone."""
    _skip_where_compiled_counts_cannot_run()
    import torch

    from benchmarks.gpu_codegen import GpuCodegenBackend, run_step, summarize

    backend = GpuCodegenBackend()
    try:
        counted = run_step(backend, preset_name="tiny", precision="bf16", batch=4, syn_chunk=2)
    finally:
        torch._dynamo.reset()
    assert len(backend.graphs) >= 8, [g.kind for g in backend.graphs]  # online, target, synthetic chunks, backwards
    assert [g for g in backend.graphs if g.skip_reasons] == []
    called = [g for g in backend.graphs if g.calls]
    assert {g.kind for g in called} == {"forward", "backward", "inference"}
    assert sum(g.calls for g in called) == counted["graph_calls"]
    totals = summarize(backend.graphs, counted["outside"], print_line=lambda _line: None)
    assert totals["skipped"] == 0 and 0 < totals["cuda_graphs"] < totals["compile"] / 3, totals
