"""The layers (pyproject.toml, ``[tool.importlinter]``): each imports only the layers below it, function-local
imports included, so ``covmatch.kernels`` stays at the bottom and the tools at the top, and the embedded
study's modules form no cycle."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_layers_contract_is_kept():
    lint_imports = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(lint_imports).exists():
        pytest.fail("import-linter is not installed: pip install 'covmatch[dev]'")
    run = subprocess.run([lint_imports], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "2 kept, 0 broken" in run.stdout


def test_version_and_help_import_no_tool():
    """``covmatch --version`` and ``--help`` answer without importing any subcommand's module."""
    code = (
        "import sys, contextlib, io\n"
        "from covmatch.cli import COMMANDS, main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['--version']) == 0 and main(['--help']) == 0\n"
        "loaded = sorted(m for m in COMMANDS.values() if m in sys.modules)\n"
        "assert not loaded, loaded\n"
        "assert 'transformers' not in sys.modules and 'timm' not in sys.modules\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
