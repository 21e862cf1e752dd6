"""The embedded study's runner: jobs in lanes of one pinned thread per core, finished jobs never rerun.

A distillation is done when its set's metadata says it reached its iterations (a killed one resumes from
its checkpoint, ``--auto-resume``), an evaluation when its ``results.json`` exists. Each evaluation job is one
training run (one seed), so a killed session loses at most one run per lane.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from . import jobs as study_jobs
from .design import choose_config, job_list

# How often the runner looks for finished jobs and free lanes; jobs take minutes to hours.
POLL_SECONDS = 5.0


def _record(job, seconds: float, lane: int, rc: int, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    entry = {"job": job.name, "kind": type(job).__name__.lower(), "seconds": round(seconds, 1), "lane": lane,
             "rc": rc, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    with open(root / "jobs.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def _job_seconds() -> Dict[str, float]:
    """Wall seconds of every finished job (a resumed distillation: the sum of its sessions)."""
    seconds: Dict[str, float] = {}
    path = study_jobs.ROOT / "jobs.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            seconds[entry["job"]] = seconds.get(entry["job"], 0.0) + entry["seconds"]
    return seconds


def _lane_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(study_jobs.REPO) + os.pathsep + env.get("PYTHONPATH", "")})  # fmt: skip
    return env


def run_jobs(
    jobs: List,
    lanes: int,
    hours: Optional[float] = None,
    dry_run: bool = False,
    cores: Optional[List[int]] = None,
    root: Optional[Path] = None,
) -> int:
    """Run the jobs not yet done, ``lanes`` at a time, each pinned to its own core (lane k to ``cores[k]``,
    default core k); return how many failed. Logs go to ``root``/logs and wall times to ``root``/jobs.jsonl
    (default: the study's results folder).

    A job starts once the distillation it reads is done (and is dropped if that failed); none starts after
    ``hours``. Stopping the study (SIGTERM, Ctrl-C) stops its jobs: distillations resume from checkpoints.
    """
    by_name = {j.name: j for j in jobs}
    pending = [j for j in jobs if not j.done()]
    if dry_run:
        for job in pending:
            print(" ".join(job.command()))
        return 0
    root = study_jobs.ROOT if root is None else root
    (root / "logs").mkdir(parents=True, exist_ok=True)
    deadline = time.time() + hours * 3600 if hours else None
    cores = list(cores) if cores else list(range(lanes))
    pin = shutil.which("taskset") is not None and max(cores) < (os.cpu_count() or 1)
    running: Dict[int, Tuple[object, subprocess.Popen, float]] = {}
    failed: List[str] = []

    def stop(signum, frame):
        for _, proc, _ in running.values():
            proc.terminate()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        for lane, (job, proc, start) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[lane]
            seconds = time.time() - start
            _record(job, seconds, lane, proc.returncode, root)
            if proc.returncode != 0 or not job.done():
                failed.append(job.name)
                print(f"study: {job.name} FAILED (exit {proc.returncode}); log: {root / 'logs' / job.name}.log")
            else:
                print(f"study: {job.name} done in {seconds:.0f} s", flush=True)
        pending = [j for j in pending if not set(j.requires()) & set(failed)]
        open_to_start = deadline is None or time.time() < deadline
        for lane in range(lanes):
            if lane in running or not open_to_start:
                continue
            ready = [j for j in pending if all(by_name[d].done() for d in j.requires() if d in by_name)]
            if not ready:
                break
            job = ready[0]
            pending.remove(job)
            command = (["taskset", "-c", str(cores[lane])] if pin else []) + job.command()
            with open(root / "logs" / f"{job.name}.log", "a") as log:
                proc = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=_lane_env(), cwd=study_jobs.REPO
                )
            running[lane] = (job, proc, time.time())
            print(f"study: lane {lane}: {job.name}", flush=True)
        if not running:
            break  # everything done, failed, blocked by a failure, or past the deadline
        time.sleep(POLL_SECONDS)
    return len(failed)


# ---------------------------------------------------------------------------------------------- command line


def plan(stage: str, only: Optional[Sequence[str]]) -> None:
    """Every job, done or not, with its estimated single-core cost, and the totals."""
    jobs = job_list(stage, only)
    seconds = _job_seconds()
    todo = 0.0
    for job in jobs:
        state = "done" if job.done() else "todo"
        cost = seconds.get(job.name, job.cost()) if job.done() else job.cost()
        todo += 0 if job.done() else cost
        print(f"{state}  {cost / 60:6.1f} min  {job.name}")
    print(f"{len(jobs)} jobs, {sum(not j.done() for j in jobs)} to do: about {todo / 3600:.1f} CPU-hours left")
    if stage != "tune" and choose_config() is None:
        print("final stage: not planned until every tune candidate is scored on val")
