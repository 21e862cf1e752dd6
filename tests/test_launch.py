"""``PreboundLaunch``: after its first launch a plan's launch site calls the compiled kernel's launcher directly,
with every argument in the kernel's signature order (constexprs included), and goes back through
``kernel[grid]`` whenever the specialisation could differ (tensor alignment) or a hook is installed. Checked
with a stand-in kernel: the CPU has no compiled kernels."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from covmatch.kernels import _launch  # noqa: E402
from covmatch.kernels._launch import PreboundLaunch, TileConfig  # noqa: E402


class _Compiled:
    function, packed_metadata = "handle", "metadata"

    def __init__(self, calls):
        self.calls = calls

    def launch_metadata(self, grid, stream, *args):
        return ("metadata of", grid, stream)

    def run(self, *args):
        self.calls.append(("run", args))


class _Kernel:
    arg_names = ["x_ptr", "n", "BLOCK", "FLAG"]
    pre_run_hooks: list = []

    def __init__(self):
        self.calls = []
        self.compiled = _Compiled(self.calls)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return self.compiled

        return launch


@pytest.mark.skipif(not hasattr(_launch.triton, "knobs"), reason="a prebound launch is Triton >= 3.4's launcher call")
def test_prebound_launch_skips_the_binder_until_the_specialisation_could_differ(monkeypatch):
    monkeypatch.setattr(_launch, "_PREBIND", True)
    monkeypatch.setattr(_launch, "_current_stream", lambda: 7)
    kernel = _Kernel()
    launch = PreboundLaunch(kernel, (3, 2), dict(FLAG=True, BLOCK=64), TileConfig(64, 64, 32, num_warps=4))
    x = torch.zeros(64)
    launch((x, 10))
    launch((x, 10))
    assert kernel.calls[0][0] == "jit" and kernel.calls[0][3]["num_warps"] == 4
    kind, args = kernel.calls[1]
    assert kind == "run"
    assert args[:7] == (3, 2, 1, 7, "handle", "metadata", ("metadata of", (3, 2), 7))  # grid, stream, handles
    runtime = _launch.triton.knobs.runtime
    assert args[7:9] == (runtime.launch_enter_hook, runtime.launch_exit_hook)
    assert args[9:] == (x, 10, 64, True)  # arguments, then constexprs in signature order (BLOCK before FLAG)
    launch((torch.zeros(65)[1:], 10))  # a 4-byte offset: not the 16-byte alignment it was compiled for
    assert kernel.calls[2][0] == "jit"
    monkeypatch.setattr(kernel, "pre_run_hooks", [lambda *a, **k: None])
    launch((x, 10))
    assert kernel.calls[3][0] == "jit"


def test_prebound_launch_records_inside_recorded_launches():
    kernel = _Kernel()
    launch = PreboundLaunch(kernel, (1,), dict(BLOCK=64, FLAG=False), TileConfig(64, 64, 32))
    with _launch.recorded_launches() as records:
        launch((torch.zeros(4), 4), 10.0, 20.0)
    assert kernel.calls == [] and records[0].grid == (1,) and records[0].flops == 10.0
