# covmatch: `make demo` runs the main job on the embedded dataset, `make test` the test suite; both
# create .venv and install everything on first use.
#
# TORCH_SPEC is what gets installed when the venv has no torch yet. The default pins the CPU machines'
# local wheels; on a GPU box pass your own, e.g. `make test TORCH_SPEC="torch==2.11.0"`, or point VENV
# at an environment that already has torch.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
# --no-compile: pip does not compile every file of torch, transformers, sympy... to bytecode one at a time
# (about 45 s of a fresh install on 2 cores); the demo, one process, compiles what it imports. The test
# suite starts many processes, so `make test` compiles everything once, on all cores (COMPILE_ALL), which
# matters where PYTHONDONTWRITEBYTECODE is set (nothing imported would ever be cached).
PIP_INSTALL := $(PY) -m pip install --no-compile
SITE_PACKAGES = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# a few packages ship files for other Python versions that do not compile; like pip, ignore them
COMPILE_ALL = $(PY) -m compileall -q -j 0 $(SITE_PACKAGES) >/dev/null 2>&1 || true
STAMP := $(VENV)/.covmatch-installed
DEMO_STAMP := $(VENV)/.covmatch-demo-installed

.PHONY: install test test-oldest demo lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Everything (tests, DeepSpeed, lint tools); it also satisfies the demo.
$(STAMP): setup.py pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP_INSTALL) $(TORCH_SPEC)
	$(PIP_INSTALL) -e ".[all]"
	$(COMPILE_ALL)
	touch $(STAMP) $(DEMO_STAMP)

# What the demo needs and no more (no DeepSpeed, whose install builds from source, no test tools).
$(DEMO_STAMP): setup.py pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP_INSTALL) $(TORCH_SPEC)
	$(PIP_INSTALL) -e ".[distill]"
	touch $(DEMO_STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest

demo: $(DEMO_STAMP)
	$(PY) -m covmatch.demo --runs 1

# The suite on the oldest versions setup.py declares (docs/development.md, Versions), in a venv of its own.
OLDEST_PYTHON ?= python3.9
OLDEST_VENV ?= .venv-oldest
OLDEST_TORCH := torch==2.4.1 torchvision==0.19.1 "numpy<2"
OLDEST_PINS := transformers==4.40.2 timm==1.0.10 deepspeed==0.16.9

# torch first: DeepSpeed's sdist imports it to build
test-oldest:
	@test -x $(OLDEST_VENV)/bin/python || $(OLDEST_PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 9)' 2>/dev/null \
		|| { echo "make test-oldest: '$(OLDEST_PYTHON)' is not a working Python 3.9; pass OLDEST_PYTHON=/path/to/python3.9" >&2; exit 2; }
	test -x $(OLDEST_VENV)/bin/python || $(OLDEST_PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --no-compile $(OLDEST_TORCH)
	$(OLDEST_VENV)/bin/python -m pip install --no-compile -e ".[all]" $(OLDEST_TORCH) $(OLDEST_PINS)
	$(OLDEST_VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check covmatch tests benchmarks experiments docs/examples setup.py
	$(VENV)/bin/ruff format --check covmatch tests benchmarks experiments docs/examples setup.py
	$(VENV)/bin/lint-imports

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache
