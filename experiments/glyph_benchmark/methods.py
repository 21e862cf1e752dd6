"""CovMatch on the glyph scenes: tuned on val, then scored on test once against its iteration-0 sets, the
coresets and the reference set, with transfer to unseen encoders and N = 100 and 500.

    python -m experiments.glyph_benchmark.methods plan     # every job, its estimated cost, what is done
    python -m experiments.glyph_benchmark.methods run      # resumable, two lanes (one core each)
    python -m experiments.glyph_benchmark.methods report   # methods.json and methods.md

Two stages. ``tune`` distils each candidate of ``TUNE_CANDIDATES`` (two regimes: the fixed pretrained model,
and the paper's online model trained on real data and reset every 50 iterations) from seed 0 and scores it on
**val** with three evaluation runs, against its iteration-0 set scored with the same three seeds. ``final``
takes each regime's best candidate on val and scores on **test**, at the final epoch: three distillation seeds
x three evaluation runs and the iteration-0 sets likewise (paired by distillation and evaluation seed); random
pairs and concept-cover coresets (five subsets each), herding and k-center (three runs each), the reference set
(three runs); the better regime's sets and their iteration-0 sets at two unseen image encoders and one other
text encoder, with random pairs there; and N = 500. ``final`` rows are planned as far as the tuning allows: the
coresets and the reference set at once, a regime's rows once its candidates are scored, the rest once both are.

Outputs under ``results/methods/``: ``sets/NAME/`` (each set's record; tensors regenerated, not committed),
``evals/NAME/results.json``, ``jobs.jsonl``, ``methods.json`` and ``methods.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from experiments.embedded_study.jobs import Distill
from experiments.embedded_study.runner import run_jobs

from .acceptance import (
    DISTILLING_ENCODER,
    PRESET,
    UNSEEN_ENCODERS,
    GlyphEvaluate,
    Pretrain,
    Reference,
    print_plan,
)
from .spectrum import RESULTS

ROOT = RESULTS / "methods"
ITERATIONS = 300  # per distillation, tune and final alike: six reset cycles of the paper regime
TUNE_SEED = 0
EVAL_SEEDS = (0, 1, 2)
DISTILL_SEEDS = (0, 1, 2)
SUBSETS = (0, 1, 2, 3, 4)  # random and concept-cover coresets: one subset per evaluation run
LARGE_N = 500
LARGE_N_SEEDS = (0, 1, 2)  # at N = 500: one evaluation run per distillation seed, coresets likewise

# The regimes, every flag spelled out so that a change of the preset leaves the runs as they were.
FIXED = ("--online", "fixed", "--lr-txt", "1")
RELATIVE = ("--relative-steps",)
FIXED_RELATIVE = ("--online", "fixed", *RELATIVE)
PAPER = ("--online", "real", "--step-order", "paper", "--reset-every", "50")
SLOW_ONLINE = ("--online-lr-encoder", "0.001", "--online-lr-proj", "0.01")
SLOWER_ONLINE = ("--online-lr-encoder", "0.0001", "--online-lr-proj", "0.001")
# Candidates per regime. The untuned first look (first_look/, lr_img 30, 150 iterations) moved pixels by 2e-4
# of their norm per step against 6e-3 for caption embeddings: lr_img 10x and 33x larger bring the two within
# 3x and 1x. The embedded study found the paper regime better with its online model 10x or 100x slower than the
# demo's.
TUNE_CANDIDATES: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "fixed": {
        "fixed-lr30": FIXED + ("--lr-img", "30"),
        "fixed-lr300": FIXED + ("--lr-img", "300"),
        "fixed-lr1000": FIXED + ("--lr-img", "1000"),
        # --relative-steps: each modality's gradient scaled to its tensor's norm; the rates are relative steps
        "fixed-rel0.001": FIXED_RELATIVE + ("--lr-img", "0.001", "--lr-txt", "0.001"),
        "fixed-rel0.003": FIXED_RELATIVE + ("--lr-img", "0.003", "--lr-txt", "0.003"),
        "fixed-rel0.01": FIXED_RELATIVE + ("--lr-img", "0.01", "--lr-txt", "0.01"),
    },
    # With plain learning rates the paper regime diverged: lr_img 300 (slow and demo online rates) and 1,000
    # (slow) within 13 iterations, 30 (slow) at loss 1.8e7 by iteration 8. Once the online model has moved, the
    # set's gradients grow step by step (relative pixel steps 4e-4, 8e-4, 8e-3, 0.31, 1.0 at lr_img 30) until
    # its whitened features explode. Relative steps bound every step, so the paper regime is tuned with them.
    "paper": {
        "paper-slow-rel0.001": PAPER + SLOW_ONLINE + RELATIVE + ("--lr-img", "0.001", "--lr-txt", "0.001"),
        "paper-slow-rel0.003": PAPER + SLOW_ONLINE + RELATIVE + ("--lr-img", "0.003", "--lr-txt", "0.003"),
        "paper-slower-rel0.003": PAPER + SLOWER_ONLINE + RELATIVE + ("--lr-img", "0.003", "--lr-txt", "0.003"),
    },
}
# the other text encoder of the transfer rows: all six layers of all-MiniLM-L6-v2 (the distilling one is its first)
TEXT_TRANSFER = {"text6": ("--text-layers", "6")}
SECONDS_PER_ITERATION = {"fixed": 0.55, "real": 1.6}


@dataclass(frozen=True)
class GlyphDistill(Distill):
    """One ``covmatch-distill --preset glyphs`` run."""

    @property
    def out(self) -> Path:
        return ROOT / "sets" / self.name

    def command(self) -> List[str]:
        return [
            sys.executable, "-m", "covmatch.distill", "--preset", PRESET, "--out", str(self.out),
            "--overwrite" if self.starts_over() else "--auto-resume", "--no-progress", "--seed", str(self.seed),
            "--iterations", str(self.iterations), "--num-pairs", str(self.num_pairs), "--save-every", "100",
            "--log-every", "10", "--keep-checkpoints", "1", *self.flags,
        ]  # fmt: skip

    def cost(self) -> float:
        online = self.flags[self.flags.index("--online") + 1]
        return self.iterations * SECONDS_PER_ITERATION[online] * (1.0 if self.num_pairs <= 256 else 2.0)

    def requires(self) -> Tuple[str, ...]:
        return (Pretrain(DISTILLING_ENCODER).name,)


@dataclass(frozen=True)
class ReferenceTensors(Reference):
    """The reference set's tensors (the test runs need them, not only its val records)."""

    def done(self) -> bool:
        return (RESULTS / "reference" / "synthetic.safetensors").is_file()


@dataclass(frozen=True)
class MethodEvaluate(GlyphEvaluate):
    """One evaluation run of a set of this study (``NAME`` or ``NAME/initial``), the reference set or a
    coreset."""

    @property
    def out(self) -> Path:
        return ROOT / "evals" / self.name

    def set_path(self) -> Path:
        return RESULTS / "reference" if self.source == "reference" else ROOT / "sets" / self.source

    def requires(self) -> Tuple[str, ...]:
        sets = () if self.is_coreset() else (self.source.split("/")[0],)
        return (Pretrain(self.encoder).name, *sets)


# ---------------------------------------------------------------------------------------------- the design


def _distill(name: str, flags: Tuple[str, ...], seed: int, num_pairs: int = 100) -> GlyphDistill:
    return GlyphDistill(name, flags, seed, ITERATIONS, num_pairs)


def tune_jobs() -> List:
    jobs: List = []
    for candidates in TUNE_CANDIDATES.values():
        for name, flags in candidates.items():
            jobs.append(_distill(f"tune-{name}", flags, TUNE_SEED))
            jobs += [MethodEvaluate(f"tune-{name}-e{e}", f"tune-{name}", "val", e) for e in EVAL_SEEDS]
    first = next(iter(TUNE_CANDIDATES["fixed"]))  # every candidate starts from this iteration-0 set (seed 0)
    jobs += [MethodEvaluate(f"tune-initial-e{e}", f"tune-{first}/initial", "val", e) for e in EVAL_SEEDS]
    return jobs


def _mean(runs: Sequence[MethodEvaluate]) -> Optional[float]:
    return statistics.mean(r.mean() for r in runs) if runs and all(r.done() for r in runs) else None


def choose(regime: str) -> Optional[str]:
    """The regime's candidate with the best val mean recall; None until all of them are scored."""
    scores = {}
    for name in TUNE_CANDIDATES[regime]:
        score = _mean([MethodEvaluate(f"tune-{name}-e{e}", f"tune-{name}", "val", e) for e in EVAL_SEEDS])
        if score is None:
            return None
        scores[name] = score
    return max(scores, key=scores.get)


def chosen_sets(regime: str, num_pairs: int = 100) -> Dict[int, GlyphDistill]:
    """The chosen candidate's set per distillation seed (seed 0 at N = 100: the tune stage's set)."""
    name = choose(regime)
    flags = TUNE_CANDIDATES[regime][name]
    if num_pairs == 100:
        seeds = DISTILL_SEEDS
        return {s: _distill(f"tune-{name}" if s == TUNE_SEED else f"{name}-s{s}", flags, s) for s in seeds}
    return {s: _distill(f"{name}-n{num_pairs}-s{s}", flags, s, num_pairs) for s in LARGE_N_SEEDS}


def best_regime() -> Optional[str]:
    """The regime whose chosen candidate scored higher on val (transfer and N = 500 take it)."""
    chosen = {regime: choose(regime) for regime in TUNE_CANDIDATES}
    if None in chosen.values():
        return None
    scores = {
        regime: _mean([MethodEvaluate(f"tune-{n}-e{e}", f"tune-{n}", "val", e) for e in EVAL_SEEDS])
        for regime, n in chosen.items()
    }
    return max(scores, key=scores.get)


def _test(name: str, source: str, seed: int, **kwargs) -> MethodEvaluate:
    return MethodEvaluate(name, source, "test", seed, **kwargs)


def set_rows(regime: str) -> Dict[str, List[MethodEvaluate]]:
    """A regime's test row at N = 100: its sets, 3 distillation seeds x 3 evaluation runs."""
    sets = chosen_sets(regime)
    return {regime: [_test(f"test-{job.name}-e{e}", job.name, e) for job in sets.values() for e in EVAL_SEEDS]}


def initial_rows(regime: str) -> Dict[str, List[MethodEvaluate]]:
    """The iteration-0 sets of the regime's distillations, seeded as its runs: an iteration-0 set depends on
    the distillation seed and N only (the same bytes in either regime), so both regimes pair with this row."""
    sets = chosen_sets(regime)
    runs = [_test(f"test-initial-s{s}-e{e}", f"{job.name}/initial", e) for s, job in sets.items() for e in EVAL_SEEDS]
    return {"initial": runs}


def baseline_rows(num_pairs: int = 100) -> Dict[str, List[MethodEvaluate]]:
    """Coresets and the reference set on test (at N = 500: random and cover, one run per seed)."""
    if num_pairs != 100:
        seeds = LARGE_N_SEEDS
        return {
            f"{c}/n{num_pairs}": [_test(f"test-{c}-n{num_pairs}-{s}", c, s, num_pairs=num_pairs) for s in seeds]
            for c in ("random", "cover")
        }
    rows = {c: [_test(f"test-{c}-{s}", c, s) for s in SUBSETS] for c in ("random", "cover")}
    rows.update({c: [_test(f"test-{c}-e{e}", c, e) for e in EVAL_SEEDS] for c in ("herding", "kcenter")})
    rows["reference"] = [_test(f"test-reference-e{e}", "reference", e) for e in EVAL_SEEDS]
    return rows


def transfer_rows(regime: str) -> Dict[str, List[MethodEvaluate]]:
    """The regime's sets, their iteration-0 sets (one run per distillation seed, seeded alike) and random
    pairs (five subsets) at each unseen encoder."""
    rows: Dict[str, List[MethodEvaluate]] = {}
    sets = chosen_sets(regime)
    unseen = {name: {"encoder": name} for name in UNSEEN_ENCODERS}
    unseen.update({name: {"flags": flags} for name, flags in TEXT_TRANSFER.items()})
    for encoder, kwargs in unseen.items():
        rows[f"{regime}@{encoder}"] = [_test(f"test-{j.name}-{encoder}", j.name, s, **kwargs) for s, j in sets.items()]
        rows[f"initial@{encoder}"] = [
            _test(f"test-initial-s{s}-{encoder}", f"{j.name}/initial", s, **kwargs) for s, j in sets.items()
        ]
        rows[f"random@{encoder}"] = [_test(f"test-random-{s}-{encoder}", "random", s, **kwargs) for s in SUBSETS]
    return rows


def large_n_rows(regime: str) -> Dict[str, List[MethodEvaluate]]:
    sets = chosen_sets(regime, LARGE_N)
    return {
        f"{regime}/n{LARGE_N}": [_test(f"test-{j.name}", j.name, s) for s, j in sets.items()],
        f"initial/n{LARGE_N}": [
            _test(f"test-initial-n{LARGE_N}-s{s}", f"{j.name}/initial", s) for s, j in sets.items()
        ],
        **baseline_rows(LARGE_N),
    }


def final_rows() -> Dict[str, List[MethodEvaluate]]:
    """Every test row planned so far, in the order they run: the coresets and the reference set at once (they
    need no tuning), a regime's sets once its candidates are scored (the iteration-0 row with the fixed regime,
    whose distillations are the cheaper), N = 500 and transfer once both are."""
    rows: Dict[str, List[MethodEvaluate]] = {}
    if choose("fixed") is not None:
        rows.update({**set_rows("fixed"), **initial_rows("fixed")})
    rows.update(baseline_rows())
    if choose("paper") is not None:
        rows.update(set_rows("paper"))
    best = best_regime()
    if best is not None:
        rows.update({**large_n_rows(best), **transfer_rows(best)})
    return rows


def job_list() -> List:
    """The tune stage, then the final stage as far as it is planned, row by row, each distillation just before
    the first evaluation that reads it."""
    jobs: List = [Pretrain(DISTILLING_ENCODER), *tune_jobs()]
    jobs += [Pretrain(encoder) for encoder in UNSEEN_ENCODERS] + [ReferenceTensors()]
    distills = {job.name: job for regime in TUNE_CANDIDATES if choose(regime) for job in chosen_sets(regime).values()}
    if best_regime() is not None:
        distills.update({job.name: job for job in chosen_sets(best_regime(), LARGE_N).values()})
    planned = {job.name for job in jobs}
    rows = final_rows()
    for run in (run for runs in rows.values() for run in runs):
        for name in run.requires():
            if name in distills and name not in planned:
                jobs.append(distills[name])
                planned.add(name)
        jobs.append(run)
    return jobs


# ---------------------------------------------------------------------------------------------- the report


def _summary(runs: Sequence[MethodEvaluate]) -> Optional[dict]:
    done = [r for r in runs if r.done()]
    if not done:
        return None
    values = [r.mean() for r in done]
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": len(values), "of": len(runs)}  # fmt: skip


def _paired(runs: Sequence[MethodEvaluate], initial: Sequence[MethodEvaluate]) -> Optional[dict]:
    """Run-by-run differences from the iteration-0 sets (same distillation and evaluation seeds)."""
    pairs = [(a.mean(), b.mean()) for a, b in zip(runs, initial) if a.done() and b.done()]
    if not pairs:
        return None
    diffs = [a - b for a, b in pairs]
    return {"mean": statistics.mean(diffs), "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "positive": sum(d > 0 for d in diffs), "pairs": len(diffs)}  # fmt: skip


def same_initial_sets() -> Dict[str, Optional[bool]]:
    """Per distillation seed at N = 100: whether the regimes' iteration-0 sets are the same bytes (None while a
    regime's tensors are not here), which pairing both regimes with one iteration-0 row assumes."""
    if best_regime() is None:
        return {}
    sets = {regime: chosen_sets(regime) for regime in TUNE_CANDIDATES}
    out: Dict[str, Optional[bool]] = {}
    for seed in DISTILL_SEEDS:
        files = [s[seed].out / "initial" / "synthetic.safetensors" for s in sets.values()]
        present = all(f.is_file() for f in files)
        out[f"s{seed}"] = len({hashlib.sha256(f.read_bytes()).hexdigest() for f in files}) == 1 if present else None
    return out


def report() -> dict:
    tune = {}
    initial = [MethodEvaluate(f"tune-initial-e{e}", "", "val", e) for e in EVAL_SEEDS]
    tune["initial"] = {"row": _summary(initial)}
    for regime, candidates in TUNE_CANDIDATES.items():
        for name, flags in candidates.items():
            runs = [MethodEvaluate(f"tune-{name}-e{e}", f"tune-{name}", "val", e) for e in EVAL_SEEDS]
            tune[name] = {"regime": regime, "flags": list(flags), "row": _summary(runs),
                          "minus_initial": _paired(runs, initial)}  # fmt: skip
    chosen = {regime: choose(regime) for regime in TUNE_CANDIDATES}
    result = {"split_tune": "val", "split_final": "test", "iterations": ITERATIONS, "tune": tune, "chosen": chosen,
              "best_regime": best_regime()}  # fmt: skip
    rows = final_rows()
    final = {}
    for key, runs in rows.items():
        entry = {"row": _summary(runs)}
        regime = key.split("/")[0].split("@")[0]
        if regime in TUNE_CANDIDATES and key.replace(regime, "initial", 1) in rows:
            entry["minus_initial"] = _paired(runs, rows[key.replace(regime, "initial", 1)])
        final[key] = entry
    result["final"] = final
    result["same_initial_sets"] = same_initial_sets()
    return result


def _fmt(summary: Optional[dict]) -> str:
    if summary is None:
        return "not run"
    runs = f" ({summary['runs']} of {summary['of']} runs)" if summary.get("of", 0) > summary["runs"] else ""
    return f"{summary['mean']:.2f} ± {summary['std']:.2f}{runs}"


def _fmt_paired(paired: Optional[dict]) -> str:
    if paired is None:
        return ""
    return f"{paired['mean']:+.2f} ± {paired['std']:.2f} ({paired['positive']}/{paired['pairs']} positive)"


def write_report(result: dict) -> None:
    ROOT.mkdir(parents=True, exist_ok=True)
    (ROOT / "methods.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# CovMatch on the glyph scenes", "",
             f"Mean recall (R@1/5/10 both ways, averaged) at the final epoch; every distillation {ITERATIONS} "
             "iterations; ± is the standard deviation over runs.", "",
             "## Tuning (val, distillation seed 0, three evaluation runs each)", "",
             "| candidate | regime | val | minus its iteration-0 set (paired by evaluation seed) |",
             "|---|---|---|---|"]  # fmt: skip
    for name, entry in result["tune"].items():
        lines.append(f"| {name} | {entry.get('regime', '-')} | {_fmt(entry['row'])} | "
                     f"{_fmt_paired(entry.get('minus_initial'))} |")  # fmt: skip
    lines += ["", f"Chosen per regime: {result['chosen']}; better regime: {result['best_regime']}.", ""]
    if result["final"]:
        lines += ["## Test (scored once)", "", "| row | test | minus its iteration-0 sets (paired) |", "|---|---|---|"]
        for key, entry in result["final"].items():
            lines.append(f"| {key} | {_fmt(entry['row'])} | {_fmt_paired(entry.get('minus_initial'))} |")
        same = ", ".join(f"{k} {'-' if v is None else v}" for k, v in result["same_initial_sets"].items())
        lines += ["", f"Iteration-0 sets the same bytes in both regimes (per distillation seed; -: not yet): {same}."]
    (ROOT / "methods.md").write_text("\n".join(lines) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.glyph_benchmark.methods",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plan", help="every job, its estimated single-core cost, what is done")
    run = sub.add_parser("run", help="run what is not done (resumable)")
    run.add_argument("--lanes", type=int, default=2, help="jobs at a time, one core each")
    run.add_argument("--cores", type=int, nargs="+", default=None, help="the cores of the lanes (default 0, 1, ...)")
    run.add_argument("--hours", type=float, default=None, help="start no job after this many hours")
    sub.add_parser("report", help="write methods.json and methods.md from what has finished")
    args = parser.parse_args(argv)
    if args.command == "plan":
        print_plan(job_list())
        if best_regime() is None:
            print("each regime's test rows, transfer and N = 500: planned once its tune candidates are scored on val")
        return 0
    if args.command == "run":
        failed, finished = 0, None
        deadline = time.time() + args.hours * 3600 if args.hours else None
        while True:  # the final stage's jobs appear once the tune stage is scored; a failed job is tried once more
            jobs = job_list()
            done = {job.name for job in jobs if job.done()}
            hours = None if deadline is None else (deadline - time.time()) / 3600
            if len(done) == len(jobs) or done == finished or (hours is not None and hours <= 0):
                break
            finished = done
            failed = run_jobs(jobs, args.lanes, hours=hours, cores=args.cores, root=ROOT)
            write_report(report())
        return 1 if failed else 0
    write_report(report())
    print((ROOT / "methods.md").read_text())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
