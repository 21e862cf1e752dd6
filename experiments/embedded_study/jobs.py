"""The embedded study's jobs: one ``covmatch-distill`` run, one ``covmatch-eval`` training run, one
``covmatch analyze``, one hybrid set. Each knows its command, its output folder under ``ROOT``, whether it
is done, what it reads, and its rough single-core cost.

Outputs under ``ROOT`` (``experiments/embedded_study/results/``): ``sets/NAME/`` (each distilled set's record:
``synthetic.json``, ``config.json``, ``log.jsonl``; its tensors, checkpoints and grids are regenerated, not
committed), ``evals/NAME/results.json``, ``analysis/NAME/``, ``logs/`` (not committed), ``jobs.jsonl`` (wall
time of every finished job) and the report.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from covmatch.eval.coresets import CORESETS

# where everything goes; COVMATCH_STUDY_ROOT moves it (tests, a second checkout)
ROOT = Path(os.environ.get("COVMATCH_STUDY_ROOT") or Path(__file__).resolve().parent / "results")
REPO = Path(__file__).resolve().parents[2]

# Every set of the study was distilled with synthetic batches of 100 (all of S at N = 100), the demo preset's
# value then; the demo now takes the paper's min(N, 256), which only tune-scaling-batch and its table-6 rows use.
STUDY_SYN_BATCH = ("--syn-batch", "100")

# rough single-thread costs on the development CPU, for the plan (measured; refined by jobs.jsonl)
SECONDS_PER_ITERATION = {"real": 1.3, "synthetic": 1.1, "fixed": 0.45}
SECONDS_PER_EVAL_RUN_AT_100 = 70.0
SIX_LAYER_TEXT_COST = 6.5  # an evaluation with the six-layer text encoder (table 5t): 420-566 s measured
FULL_TRAIN_PAIRS = 50_000  # the embedded train split: 10,000 images x 5 captions
# Full-data reference: 2 epochs over the 50,000 train pairs (one epoch took about 10 minutes on one core; the
# protocol's 100 epochs would cost about 17 CPU-hours, over the whole study's budget).
FULL_DATA_EPOCHS = 2


@dataclass(frozen=True)
class Distill:
    """One ``covmatch-distill --preset demo`` run."""

    name: str
    flags: Tuple[str, ...]
    seed: int
    iterations: int
    num_pairs: int = 100

    @property
    def out(self) -> Path:
        return ROOT / "sets" / self.name

    def starts_over(self) -> bool:
        """Its record (config, log, synthetic.json: committed) is here but neither its tensors nor a checkpoint
        (a fresh clone: the large sets' tensors are not committed), so it is distilled again from iteration 0
        with ``--overwrite``, which rewrites that record."""
        checkpoints = self.out / "checkpoints"  # covmatch-distill's checkpoint folder under --out
        return (
            (self.out / "synthetic.json").is_file()
            and not (self.out / "synthetic.safetensors").is_file()
            and not (checkpoints.is_dir() and any(checkpoints.iterdir()))
        )

    def command(self) -> List[str]:
        return [
            sys.executable, "-m", "covmatch.distill", "--preset", "demo", "--out", str(self.out),
            "--overwrite" if self.starts_over() else "--auto-resume",
            "--no-progress", "--seed", str(self.seed), "--iterations", str(self.iterations),
            "--num-pairs", str(self.num_pairs), "--save-every", "100", "--log-every", "10", "--keep-checkpoints", "1",
            *(() if "--syn-batch" in self.flags else STUDY_SYN_BATCH), *self.flags,
        ]  # fmt: skip

    def done(self) -> bool:
        """Finished and its tensors here (the large sets' tensors are not committed: a fresh clone redistils
        those whose evaluations are still to run)."""
        meta = self.out / "synthetic.json"
        if not meta.is_file() or not (self.out / "synthetic.safetensors").is_file():
            return False
        try:
            return json.loads(meta.read_text()).get("iteration") == self.iterations
        except (OSError, ValueError):
            return False

    def cost(self) -> float:
        online = "real"
        if "--online" in self.flags:
            online = self.flags[self.flags.index("--online") + 1]
        return self.iterations * SECONDS_PER_ITERATION[online]

    def requires(self) -> Tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class Evaluate:
    """One ``covmatch-eval`` training run (one seed) of a distilled set, its iteration-0 set, or a coreset."""

    name: str
    source: str  # a Distill's name, "NAME/initial", or a coreset: random, balanced, herding, kcenter, full
    split: str
    seed: int
    flags: Tuple[str, ...] = ()
    num_pairs: int = 100

    @property
    def out(self) -> Path:
        return ROOT / "evals" / self.name

    def is_coreset(self) -> bool:
        return self.source in CORESETS

    def command(self) -> List[str]:
        if self.is_coreset():
            what = ["--coreset", self.source, "--num-pairs", str(self.num_pairs)]
        else:
            what = ["--synthetic", str(ROOT / "sets" / self.source)]
        return [
            sys.executable, "-m", "covmatch.eval", "--preset", "demo", *what, "--split", self.split,
            "--seed", str(self.seed), "--runs", "1", "--out", str(self.out), "--overwrite", "--no-progress",
            *self.flags,
        ]  # fmt: skip

    def done(self) -> bool:
        return (self.out / "results.json").is_file()

    def cost(self) -> float:
        epochs = 100
        if "--epochs" in self.flags:
            epochs = int(self.flags[self.flags.index("--epochs") + 1])
        pairs = FULL_TRAIN_PAIRS if self.source == "full" else self.num_pairs
        seconds = SECONDS_PER_EVAL_RUN_AT_100 * (0.35 + 0.65 * pairs / 100 * epochs / 100)
        return seconds * (SIX_LAYER_TEXT_COST if "--text-layers" in self.flags else 1.0)

    def requires(self) -> Tuple[str, ...]:
        return () if self.is_coreset() else (self.source.split("/")[0],)

    def mean(self) -> float:
        return float(json.loads((self.out / "results.json").read_text())["runs"][0]["mean"])

    def history(self) -> Optional[List[dict]]:
        """Per epoch, the training loss of the run (None for results written before histories were kept)."""
        histories = json.loads((self.out / "results.json").read_text()).get("histories")
        return histories[0] if histories else None


@dataclass(frozen=True)
class Analyze:
    """``covmatch analyze`` of a distilled set: feature stability of its online model, its covariance and mean
    match at the distilling encoders and at an unseen image encoder, how far it moved (the diagnosis)."""

    source: str  # a Distill's name
    real_pairs: int = 1024
    other_encoder: str = "test_resnet"

    @property
    def name(self) -> str:
        return f"analysis-{self.source}"

    @property
    def out(self) -> Path:
        return ROOT / "analysis" / self.source

    def command(self) -> List[str]:
        return [
            sys.executable, "-m", "covmatch.analyze", str(ROOT / "sets" / self.source), "--out", str(self.out),
            "--real-pairs", str(self.real_pairs), "--image-encoder", self.other_encoder,
        ]  # fmt: skip

    def done(self) -> bool:
        return (self.out / "analysis.json").is_file()

    def cost(self) -> float:
        return 150.0

    def requires(self) -> Tuple[str, ...]:
        return (self.source,)

    def result(self) -> dict:
        return json.loads((self.out / "analysis.json").read_text())


@dataclass(frozen=True)
class Hybrid:
    """A set made of the images of one set and the captions of another (``hybrid_set.py``): which
    modality holds what a distillation changed."""

    images: str  # a Distill's name, or "NAME/initial"
    captions: str

    @property
    def name(self) -> str:
        return f"hybrid-images-{self.images.replace('/', '-')}-captions-{self.captions.replace('/', '-')}"

    @property
    def out(self) -> Path:
        return ROOT / "sets" / self.name

    def command(self) -> List[str]:
        return [
            sys.executable, "-m", "experiments.embedded_study.hybrid_set", "--images", str(ROOT / "sets" / self.images),
            "--captions", str(ROOT / "sets" / self.captions), "--out", str(self.out),
        ]  # fmt: skip

    def done(self) -> bool:
        return (self.out / "synthetic.safetensors").is_file()

    def cost(self) -> float:
        return 10.0

    def requires(self) -> Tuple[str, ...]:
        return tuple(dict.fromkeys(source.split("/")[0] for source in (self.images, self.captions)))
