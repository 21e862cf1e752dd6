"""The embedded study: does CovMatch distil data that generalises? Every distillation and evaluation behind
``experiments/embedded_study/results/study.md``, resumable, run in lanes of one pinned thread per core.

    python -m experiments.embedded_study plan          # every job, its estimated cost, what is done
    python -m experiments.embedded_study run [--lanes 2] [--stage tune|final|all] [--tables 1,2] [--hours H]
    python -m experiments.embedded_study report        # study.md, study.json and PNGs from what has finished
    python -m experiments.embedded_study regenerate    # the sets' tensors and logs, which git does not keep

``regenerate`` distils again every set whose committed record has no tensors (on the same machine and library
versions, bit-identical to the original run), so ``covmatch analyze``, ``covmatch export`` and new evaluations
can read it; evaluations are not rerun (their ``results.json`` are committed).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional, Sequence

from .design import all_distills, all_tables, choose_config, job_list
from .report import write_report
from .runner import _job_seconds, plan, run_jobs


def sets_to_regenerate(only: Optional[Sequence[str]] = None) -> List:
    """Every set a table reads (``only``: those of these tables) whose tensors are not here, in dependency
    order (a hybrid after the sets it is made from)."""
    wanted = set(all_distills()) if not only else {d for j in job_list("all", only) for d in (j.name, *j.requires())}
    distills = all_distills()
    ordered, seen = [], set()

    def add(name: str) -> None:
        if name in seen or name not in distills:
            return
        seen.add(name)
        for dep in distills[name].requires():
            add(dep)
        ordered.append(distills[name])

    for name in sorted(wanted):
        add(name)
    return [job for job in ordered if not job.done()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.embedded_study", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("plan", "run", "report", "regenerate"))
    parser.add_argument("--stage", choices=("tune", "final", "all"), default="all")
    parser.add_argument(
        "--tables", default=None, help="comma-separated table keys (tune, 1-8, 5t), run in that order; default all"
    )
    parser.add_argument("--lanes", type=int, default=2, help="jobs at a time, one pinned core each")
    parser.add_argument(
        "--cores", default=None, help="comma-separated cores the lanes are pinned to (default 0..lanes-1; sets --lanes)"
    )
    parser.add_argument("--hours", type=float, default=None, help="start no job after this many hours")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the jobs to do")
    args = parser.parse_args(argv)
    only = args.tables.split(",") if args.tables else None
    if args.action == "plan":
        plan(args.stage, only)
        return 0
    if args.action == "report":
        print(write_report(all_tables("all"), _job_seconds(), choose_config()))
        return 0
    cores = [int(c) for c in args.cores.split(",")] if args.cores else None
    lanes = len(cores) if cores else args.lanes
    if args.action == "regenerate":
        return 1 if run_jobs(sets_to_regenerate(only), lanes, args.hours, args.dry_run, cores) else 0
    failed = 0
    stages = ("tune", "final") if args.stage == "all" else (args.stage,)
    start = time.time()
    for stage in stages:  # the final stage is planned from the tune stage's val results
        hours = None if args.hours is None else max(0.0, args.hours - (time.time() - start) / 3600)
        failed += run_jobs(job_list(stage, only), lanes, hours, args.dry_run, cores)
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
