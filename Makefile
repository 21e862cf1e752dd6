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
# --no-compile: Python compiles a module's bytecode when it is first imported instead of pip compiling
# every file of torch, transformers, sympy... at install (about 45 s of a fresh install on 2 cores).
PIP_INSTALL := $(PY) -m pip install --no-compile
STAMP := $(VENV)/.covmatch-installed
DEMO_STAMP := $(VENV)/.covmatch-demo-installed

.PHONY: install test demo lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Everything (tests, DeepSpeed, lint tools); it also satisfies the demo.
$(STAMP): setup.py pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP_INSTALL) $(TORCH_SPEC)
	$(PIP_INSTALL) -e ".[all]"
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

lint: $(STAMP)
	$(VENV)/bin/ruff check covmatch kernels tests benchmarks setup.py
	$(VENV)/bin/ruff format --check covmatch kernels tests benchmarks setup.py

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache
