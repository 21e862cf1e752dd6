"""Packaging promises: a light ``import covmatch``, no top-level ``kernels`` module, ruff-clean sources."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
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


@pytest.mark.parametrize("where", ["elsewhere", "checkout"])
def test_kernels_live_under_covmatch(tmp_path, where):
    """Our kernels import as covmatch.kernels; a bare `import kernels` is not ours (PyPI's, which transformers
    imports, or nothing), also from the root of a checkout, where the current folder comes first on sys.path."""
    out = _run_python(
        "import importlib.util, json, sys, covmatch.kernels as k\n"
        "sys.path.insert(0, '')\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(json.dumps({'ours': k.__file__, 'top': spec.origin if spec else None}))",
        tmp_path if where == "elsewhere" else REPO,
    )
    facts = json.loads(out)
    assert Path(facts["ours"]).name == "__init__.py"
    if facts["top"] is not None:  # an installed distribution (a venv may live inside the checkout)
        assert {"site-packages", "dist-packages"} & set(Path(facts["top"]).parts), facts["top"]


SUBPACKAGES = (
    "covmatch.data",
    "covmatch.distill",
    "covmatch.eval",
    "covmatch.kernels",
    "covmatch.loss",
    "covmatch.models",
)


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> dict:
    """The wheel built from a copy of this tree, installed by pip into a fresh virtualenv whose only other
    packages are this environment's dependencies (added as a plain path, so the checkout's editable
    install is not among them)."""
    build = tmp_path_factory.mktemp("wheel")
    # a copy of the sources only: setuptools would otherwise reuse (and leave) a build/ in the checkout
    source = build / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__"))
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(build)]
    out = subprocess.run([*argv, str(source)], cwd=build, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = build.glob("covmatch-*.whl")
    env = build / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())  # fmt: skip
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_covmatch_test_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(deps)))
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q"]
    out = subprocess.run([*install, str(wheel)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return {"python": python, "bin": env / "bin", "site": site, "cwd": build}


def _run_in(wheel_env: dict, *argv) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    return subprocess.run(argv, cwd=wheel_env["cwd"], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_wheel_holds_every_subpackage_and_no_top_level_kernels(wheel_env):
    site = wheel_env["site"]
    ours = {p.name for p in site.iterdir() if not p.name.startswith(("_", "pip")) and p.suffix != ".pth"}
    assert all(name == "covmatch" or name.endswith(".dist-info") for name in ours), ours
    for name in SUBPACKAGES:
        assert (site / name.replace(".", "/") / "__init__.py").is_file(), name
    assert (site / "covmatch" / "kernels" / "covariance.py").is_file()
    for top_level in site.glob("covmatch-*.dist-info/top_level.txt"):
        assert top_level.read_text().split() == ["covmatch"]


@pytest.mark.slow
def test_every_subpackage_imports_from_the_wheel(wheel_env):
    code = (
        "import importlib, json\n"
        f"names = {list(SUBPACKAGES)!r} + ['covmatch.distill.engine', 'covmatch.eval.cli', 'covmatch.demo']\n"
        "print(json.dumps({n: importlib.import_module(n).__file__ for n in names}))"
    )
    out = _run_in(wheel_env, wheel_env["python"], "-c", code)
    assert out.returncode == 0, out.stderr
    for name, path in json.loads(out.stdout).items():
        assert Path(path).resolve().is_relative_to(wheel_env["site"].resolve()), (name, path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv",
    [["-m", "covmatch.distill"], ["-m", "covmatch.eval"], ["covmatch-distill"], ["covmatch-eval"], ["covmatch"]],
    ids=" ".join,
)
def test_commands_run_from_the_wheel(wheel_env, argv):
    command = [wheel_env["python"], *argv] if argv[0] == "-m" else [wheel_env["bin"] / argv[0]]
    out = _run_in(wheel_env, *command, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_sources_are_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it comes with the dev extra)")
    out = subprocess.run([ruff, "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_modules_with_triton_kernels_keep_evaluated_annotations():
    """A ``@triton.jit`` kernel's ``tl.constexpr`` annotations must be objects, not strings: Triton 3.0's
    interpreter tells constexpr parameters apart by comparing the annotation with ``tl.constexpr``, so
    ``from __future__ import annotations`` in a kernel module breaks every interpreted launch there."""
    stringified = [
        str(path.relative_to(REPO))
        for path in sorted((REPO / "covmatch").rglob("*.py"))
        if re.search(r"^@triton\.jit", text := path.read_text(encoding="utf-8"), re.MULTILINE)
        and "from __future__ import annotations" in text
    ]
    assert stringified == []
