"""Whether the glyph-scene benchmark can tell distillation methods apart, checked before any method is judged
on it: the six checks of ``ACCEPTANCE``, measured on the val split and written to ``results/acceptance.json``.

    python -m experiments.glyph_benchmark.acceptance plan     # every job, its estimated cost, what is done
    python -m experiments.glyph_benchmark.acceptance run      # resumable, two lanes (one core each)
    python -m experiments.glyph_benchmark.acceptance report   # acceptance.json and acceptance.md

Jobs: the pretraining of the three image-encoder families (each on its own concept set), the energy spectrum
(``spectrum.py``), the linear model against a linear probe (``linear_model.py``), and evaluation runs under the
``glyphs`` preset's protocol (``covmatch-eval``, one training run each): the full train split (2 epochs, as the
embedded study's full-data reference: the protocol's 100 would cost about 100 CPU-hours at 64 px), random
pairs and greedy concept-cover coresets of 100 (five subsets each) at the distilling encoder, random pairs of
100 at each unseen encoder (five subsets each). A check whose inputs are not all measured is reported as not
measured, with what is missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from covmatch.pretrain import default_cache_path
from experiments.embedded_study.jobs import Evaluate
from experiments.embedded_study.runner import run_jobs

from .spectrum import RESULTS

PRESET = "glyphs"
IMAGE_SIZE = 64
DISTILLING_ENCODER = "test_nfnet"
# unseen image encoders: name -> (timm name, timm keyword arguments). timm's test_efficientnet (stride 32: 2x2
# at 64 px) scored 0.49 of the distilling encoder's random pairs (random-test_efficientnet-* in results/evals);
# with output_stride=16 its last stages are dilated and end at 4x4, as the other two families' do.
UNSEEN_ENCODERS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "test_resnet": ("test_resnet", ()),
    "test_efficientnet-os16": ("test_efficientnet", ("output_stride=16",)),
}
ENCODERS = {DISTILLING_ENCODER: (DISTILLING_ENCODER, ()), **UNSEEN_ENCODERS}
SUBSETS = 5  # random or concept-cover subsets per coreset row
REFERENCE_RUNS = 3  # evaluation runs of the (one) reference set
FULL_DATA_EPOCHS = 2
SPLIT = "val"  # the benchmark's design is chosen on val; test stays for the methods' final numbers
# the evaluation's encoder learning rate, chosen on val with random pairs (seed 0) before the other runs: the
# preset takes the best that trains stably (0.01 collapses to constant embeddings through the whitened features)
ENCODER_LRS = ("0.01", "0.003", "0.001", "0.0001", "0.0")

# check -> (what it is, the target: at least this)
ACCEPTANCE: Dict[str, Tuple[str, float]] = {
    "full_over_random": ("full-data mean recall / random 100 pairs", 2.5),
    "full_over_cover": ("full data / a greedy concept-cover coreset of 100", 1.5),
    "directions_for_95pct_energy": (
        "singular directions holding 95 % of the full-data cross-covariance energy at the distilling encoders",
        100,
    ),
    "linear_model_over_probe": ("retrieval of the theory's linear model built from C_full / a linear probe", 0.6),
    "reference_over_cover": (
        "a reference set of 100 learnt by unrolling the evaluation's training on frozen features, realised in "
        "pixels and tokens / concept-cover 100",
        1.15,
    ),
    "unseen_over_distilling_random": (
        "random 100 on each unseen image encoder / on the distilling one (the smallest ratio)",
        0.7,
    ),
}


@dataclass(frozen=True)
class Pretrain:
    """The glyph-scene pretraining of one image encoder of ``ENCODERS`` (cached where ``--image-weights
    glyphs-pretrained`` finds it)."""

    encoder: str  # a name of ENCODERS

    @property
    def name(self) -> str:
        return f"pretrain-{self.encoder}"

    def _kwargs(self) -> Dict[str, object]:
        return {k: int(v) for k, v in (item.split("=") for item in ENCODERS[self.encoder][1])}

    def command(self) -> List[str]:
        timm_name, kwargs = ENCODERS[self.encoder]
        flags = ["--image-encoder-kwargs", ", ".join(kwargs)] if kwargs else []
        return [sys.executable, "-m", "covmatch.pretrain", "--dataset", "glyphs", "--encoder", timm_name,
                "--image-size", str(IMAGE_SIZE), *flags]  # fmt: skip

    def done(self) -> bool:
        timm_name = ENCODERS[self.encoder][0]
        return default_cache_path(timm_name, IMAGE_SIZE, self._kwargs(), dataset="glyphs").is_file()

    def cost(self) -> float:
        return 400.0

    def requires(self) -> Tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class Measure:
    """One of the benchmark's own measurements (``spectrum`` or ``linear_model``), its glyphs entry."""

    module: str

    @property
    def name(self) -> str:
        return self.module.replace("_", "-")

    @property
    def result_path(self) -> Path:
        return RESULTS / f"{self.module}.json"

    def command(self) -> List[str]:
        return [sys.executable, "-m", f"experiments.glyph_benchmark.{self.module}", "--datasets", "glyphs"]

    def done(self) -> bool:
        return self.result_path.is_file() and "glyphs" in json.loads(self.result_path.read_text())

    def cost(self) -> float:
        return 300.0

    def requires(self) -> Tuple[str, ...]:
        return (Pretrain(DISTILLING_ENCODER).name,)

    def result(self) -> dict:
        return json.loads(self.result_path.read_text())["glyphs"]


@dataclass(frozen=True)
class Reference:
    """The reference set (``reference_set.py``): done when its tensors are here, or when every evaluation of it
    is (git keeps its record and results, not its tensors)."""

    name: str = "reference"

    def command(self) -> List[str]:
        return [sys.executable, "-m", "experiments.glyph_benchmark.reference_set", "--no-progress"]

    def done(self) -> bool:
        return (RESULTS / "reference" / "synthetic.safetensors").is_file() or all(r.done() for r in reference_runs())

    def cost(self) -> float:
        return 900.0

    def requires(self) -> Tuple[str, ...]:
        return (Pretrain(DISTILLING_ENCODER).name,)


@dataclass(frozen=True)
class GlyphEvaluate(Evaluate):
    """One ``covmatch-eval --preset glyphs`` training run of a coreset or of a set under ``RESULTS`` (the
    reference), at the distilling or an unseen encoder."""

    encoder: str = DISTILLING_ENCODER

    @property
    def out(self) -> Path:
        return RESULTS / "evals" / self.name

    def command(self) -> List[str]:
        encoder = []
        if self.encoder != DISTILLING_ENCODER:
            timm_name, kwargs = UNSEEN_ENCODERS[self.encoder]
            encoder = ["--image-encoder", timm_name, "--image-weights", "glyphs-pretrained"]
            if kwargs:
                encoder += ["--image-encoder-kwargs", ", ".join(kwargs)]
        what = ["--coreset", self.source, "--num-pairs", str(self.num_pairs)]
        if not self.is_coreset():
            what = ["--synthetic", str(self.set_path())]
        return [
            sys.executable, "-m", "covmatch.eval", "--preset", PRESET, *what, "--split", self.split,
            "--seed", str(self.seed), "--runs", "1",
            "--out", str(self.out), "--overwrite", "--no-progress", *encoder, *self.flags,
        ]  # fmt: skip

    def set_path(self) -> Path:
        """The folder of the set it evaluates (not a coreset)."""
        return RESULTS / self.source

    def cost(self) -> float:
        return 4.0 * super().cost()  # 64 px: about four times the embedded study's 32-px runs

    def requires(self) -> Tuple[str, ...]:
        return (Pretrain(self.encoder).name, *(() if self.is_coreset() else (self.source,)))


def reference_runs() -> List[GlyphEvaluate]:
    return [GlyphEvaluate(f"reference-{seed}", "reference", SPLIT, seed) for seed in range(REFERENCE_RUNS)]


def coreset_runs(source: str, encoder: str = DISTILLING_ENCODER) -> List[GlyphEvaluate]:
    prefix = source if encoder == DISTILLING_ENCODER else f"{source}-{encoder}"
    return [GlyphEvaluate(f"{prefix}-{seed}", source, SPLIT, seed, encoder=encoder) for seed in range(SUBSETS)]


def full_data_run() -> GlyphEvaluate:
    return GlyphEvaluate("full-0", "full", SPLIT, 0, flags=("--epochs", str(FULL_DATA_EPOCHS)))


def tuning_runs() -> List[GlyphEvaluate]:
    return [
        GlyphEvaluate(f"tune-lr-encoder-{lr}", "random", SPLIT, 0, flags=("--lr-encoder", lr)) for lr in ENCODER_LRS
    ]


def job_list() -> List:
    """Every job, cheapest evidence first: pretraining, the spectrum and the linear model, the coresets, the
    full-data run last (the longest)."""
    jobs: List = [Pretrain(DISTILLING_ENCODER), Measure("spectrum"), Measure("linear_model"), *tuning_runs()]
    jobs += [Pretrain(encoder) for encoder in UNSEEN_ENCODERS]
    jobs += coreset_runs("random") + coreset_runs("cover")
    for encoder in UNSEEN_ENCODERS:
        jobs += coreset_runs("random", encoder)
    return jobs + [Reference(), *reference_runs(), full_data_run()]


# ---------------------------------------------------------------------------------------------- the report


def _mean_recall(runs: List[GlyphEvaluate]) -> Optional[Dict[str, float]]:
    """Mean and standard deviation of the runs' mean recall; None until every run is done."""
    if not all(run.done() for run in runs):
        return None
    values = [run.mean() for run in runs]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.mean(values), "std": spread, "runs": len(values)}


def _check(key: str, value: Optional[float], inputs: dict, missing: str = "") -> dict:
    what, target = ACCEPTANCE[key]
    entry = {"what": what, "target": f">= {target:g}", "value": value, "inputs": inputs}
    if value is None:
        entry.update(passed=None, missing=missing)
    else:
        entry["passed"] = value >= target
    return entry


def acceptance() -> dict:
    """Every check as far as it is measured."""
    full, random = _mean_recall([full_data_run()]), _mean_recall(coreset_runs("random"))
    cover = _mean_recall(coreset_runs("cover"))
    checks = {}
    checks["full_over_random"] = _check(
        "full_over_random", full and random and full["mean"] / random["mean"], {"full": full, "random": random},
        "the full-data or random-pair runs are not all done",
    )  # fmt: skip
    checks["full_over_cover"] = _check(
        "full_over_cover", full and cover and full["mean"] / cover["mean"], {"full": full, "cover": cover},
        "the full-data or concept-cover runs are not all done",
    )  # fmt: skip
    spectrum = Measure("spectrum")
    directions = spectrum.result()["directions"]["95pct"] if spectrum.done() else None
    checks["directions_for_95pct_energy"] = _check(
        "directions_for_95pct_energy", directions, spectrum.result() if spectrum.done() else {}, "spectrum.py not run"
    )
    linear = Measure("linear_model")
    result = linear.result() if linear.done() else {}
    checks["linear_model_over_probe"] = _check(
        "linear_model_over_probe", result.get("linear_model_over_probe"),
        {k: result[k]["mean"] for k in ("linear_model", "probe") if k in result}, "linear_model.py not run",
    )  # fmt: skip
    reference = _mean_recall(reference_runs())
    checks["reference_over_cover"] = _check(
        "reference_over_cover", reference and cover and reference["mean"] / cover["mean"],
        {"reference": reference, "cover": cover}, "the reference-set or concept-cover runs are not all done",
    )  # fmt: skip
    unseen = {encoder: _mean_recall(coreset_runs("random", encoder)) for encoder in UNSEEN_ENCODERS}
    ratios = {e: r["mean"] / random["mean"] for e, r in unseen.items() if r and random}
    checks["unseen_over_distilling_random"] = _check(
        "unseen_over_distilling_random", min(ratios.values()) if len(ratios) == len(unseen) else None,
        {"distilling": random, **unseen, "ratios": ratios}, "the random-pair runs are not all done",
    )  # fmt: skip
    measured = [c["passed"] for c in checks.values() if c["passed"] is not None]
    tuning = {run.flags[1]: run.mean() for run in tuning_runs() if run.done()}
    return {
        "split": SPLIT,
        "preset": PRESET,
        "eval_lr_encoder_on_val": tuning,
        "checks": checks,
        "measured": len(measured),
        "passed": sum(measured),
        "accepted": len(measured) == len(checks) and all(measured),
    }


def _fmt(value) -> str:
    return "not measured" if value is None else f"{value:.3g}"


def write_report(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "acceptance.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Glyph-scene benchmark: acceptance (val split)", "",
             f"{result['passed']} of {result['measured']} measured checks pass; {len(result['checks'])} checks in all.",
             "", "| check | what | value | target | passed |", "|---|---|---|---|---|"]  # fmt: skip
    for key, check in result["checks"].items():
        passed = {True: "yes", False: "**no**", None: "-"}[check["passed"]]
        value = _fmt(check["value"]) if check["value"] is not None else f"not measured: {check['missing']}"
        lines.append(f"| `{key}` | {check['what']} | {value} | {check['target']} | {passed} |")
    (RESULTS / "acceptance.md").write_text("\n".join(lines) + "\n")


def print_plan(jobs: List) -> None:
    """Every job, done or not, with its estimated single-core cost, and what is left."""
    todo = [job for job in jobs if not job.done()]
    for job in jobs:
        print(f"{'done' if job.done() else 'todo'}  {job.cost() / 60:6.1f} min  {job.name}")
    print(f"{len(jobs)} jobs, {len(todo)} to do: about {sum(j.cost() for j in todo) / 3600:.1f} CPU-hours")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.glyph_benchmark.acceptance",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plan", help="every job, its estimated single-core cost, what is done")
    run = sub.add_parser("run", help="run what is not done (resumable)")
    run.add_argument("--lanes", type=int, default=2, help="jobs at a time, one core each")
    run.add_argument("--hours", type=float, default=None, help="start no job after this many hours")
    sub.add_parser("report", help="write acceptance.json and acceptance.md from what has finished")
    args = parser.parse_args(argv)
    jobs = job_list()
    if args.command == "plan":
        print_plan(jobs)
        return 0
    if args.command == "run":
        failed = run_jobs(jobs, args.lanes, hours=args.hours, root=RESULTS)
        write_report(acceptance())
        return 1 if failed else 0
    write_report(acceptance())
    print((RESULTS / "acceptance.md").read_text())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
