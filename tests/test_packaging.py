"""Packaging promises: a light ``import covmatch``, no top-level ``kernels`` module, ruff-clean sources."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run_python(code: str, cwd: Path) -> str:
    env_code = "import os; os.environ.pop('TRITON_INTERPRET', None)\n" + code
    out = subprocess.run([sys.executable, "-c", env_code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_covmatch_is_light(tmp_path):
    """`import covmatch` loads neither the distillation stack nor triton, and does not initialise CUDA."""
    out = _run_python(
        "import json, sys, covmatch, torch\n"
        "heavy = [m for m in ('transformers', 'timm', 'deepspeed', 'triton') if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'cuda_init': torch.cuda.is_initialized(),"
        " 'version': covmatch.__version__}))",
        tmp_path,
    )
    facts = json.loads(out)
    assert facts == {"heavy": [], "cuda_init": False, "version": facts["version"]}


def test_kernels_live_under_covmatch(tmp_path):
    """Our kernels import as covmatch.kernels; a bare `import kernels` is not ours (PyPI's, or nothing)."""
    out = _run_python(
        "import importlib.util, json, covmatch.kernels as k\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(json.dumps({'ours': k.__file__, 'top': spec.origin if spec else None}))",
        tmp_path,
    )
    facts = json.loads(out)
    assert Path(facts["ours"]).name == "__init__.py"
    if facts["top"] is not None:
        assert not Path(facts["top"]).resolve().is_relative_to(REPO), facts["top"]


@pytest.mark.slow
def test_wheel_installs_kernels_only_under_covmatch(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("covmatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert all(top == "covmatch" or top.endswith(".dist-info") for top in tops), tops
    assert "covmatch/kernels/covariance.py" in names
    top_level = [n for n in names if n.endswith("top_level.txt")]
    for name in top_level:
        assert zipfile.ZipFile(wheel).read(name).decode().split() == ["covmatch"]


def test_sources_are_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it comes with the dev extra)")
    out = subprocess.run([ruff, "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
