"""SHA-256 of ``synthetic.safetensors`` from fixed-seed ``tiny`` runs: a refactor that must not change
behaviour leaves every hash as it was (on the same machine and library versions).

    python -m benchmarks.behaviour_hashes OUT_DIR            # prints one line per run, writes OUT_DIR/hashes.txt

Runs: one pass and ``--syn-chunk`` (with N larger than the synthetic batch, so batches are samples),
``--online real`` and ``--online fixed``, and two processes with ``--zero 2`` (needs DeepSpeed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

RUNS = {
    "online-real": ["--online", "real"],
    "online-real-chunk3": ["--online", "real", "--syn-chunk", "3"],
    "online-fixed": ["--online", "fixed"],
    "online-fixed-chunk3-n12": ["--online", "fixed", "--syn-chunk", "3", "--num-pairs", "12"],
    "online-real-chunk3-n12": ["--online", "real", "--syn-chunk", "3", "--num-pairs", "12"],
    "zero2-2ranks": ["--online", "real", "--zero", "2"],
}
COMMON = ["--preset", "tiny", "--device", "cpu", "--iterations", "6", "--no-progress", "--seed", "0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, out: Path) -> str:
    argv = [*COMMON, *RUNS[name], "--out", str(out / name), "--overwrite"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable]
    if "--zero" in argv:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    subprocess.run([*cmd, "-m", "covmatch.distill", *argv], check=True, env=env, capture_output=True, text=True)
    return hashlib.sha256((out / name / "synthetic.safetensors").read_bytes()).hexdigest()


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/behaviour-hashes")
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in RUNS:
        if "--zero" in RUNS[name] and importlib.util.find_spec("deepspeed") is None:
            lines.append(f"{name} skipped (no deepspeed)")
        else:
            lines.append(f"{name} {run(name, out)}")
        print(lines[-1], flush=True)
    (out / "hashes.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
