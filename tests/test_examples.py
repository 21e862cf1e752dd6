"""The scripts in docs/examples run as a user would start them (tiny sizes) and their loss goes down."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_own_distillation_loop(capsys):
    final = _load("own_distillation_loop").main(["--steps", "30", "--device", "cpu"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    first = float(lines[0].split()[-1])
    assert final < first, lines


@pytest.mark.slow
def test_compiled_step(capsys):
    final = _load("compiled_step").main(["--steps", "12", "--device", "cpu", "--compile-backend", "aot_eager"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert final < float(lines[0].split()[-1]), lines
