"""Evaluation results: mean and spread over runs, the paper-style table, the bar chart, and results.json
(written atomically, read back with every field checked)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Sequence

from covmatch.errors import ConfigError, brief
from covmatch.synthetic import atomic_write_bytes

from .metrics import metric_keys

__all__ = ["summarise_runs", "results_table", "bar_chart", "load_result", "write_result"]


def summarise_runs(runs: List[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Mean and (sample) std per metric over runs."""
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        out[key] = {"mean": mean, "std": std}
    return out


def _mean_std(stat: Dict[str, float], single: bool) -> str:
    return f"{stat['mean']:.1f}" if single else f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def results_table(results: Sequence[dict]) -> str:
    """A markdown table like the paper's: one row per method, mean ± std per metric (no spread for one run)."""
    keys = metric_keys()
    head = "| method | N | runs | " + " | ".join(keys) + " | time (s) |"
    rule = "|" + "---|" * (len(keys) + 4)
    rows = [head, rule]
    for r in results:
        single = len(r["runs"]) == 1
        cells = [_mean_std(r["summary"][k], single) for k in keys]
        rows.append(
            f"| {r['method']} | {r['num_pairs']} | {len(r['runs'])} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |"
        )
    return "\n".join(rows) + "\n"


def bar_chart(results: Sequence[dict], path: Path) -> Path:
    """Grouped bars of every recall metric per method, with std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = metric_keys()
    width = 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(1.2 * len(keys) + 2, 3.6))
    for j, r in enumerate(results):
        xs = [i + j * width for i in range(len(keys))]
        ax.bar(
            xs,
            [r["summary"][k]["mean"] for k in keys],
            width,
            yerr=[r["summary"][k]["std"] for k in keys],
            label=f"{r['method']} (N={r['num_pairs']})",
            capsize=2,
        )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], keys, fontsize=8)
    ax.set_ylabel("recall (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def load_result(directory: Path) -> dict:
    """A results.json written by covmatch-eval, checked for every field the table and chart read."""
    path = Path(directory) / "results.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no results.json (run covmatch-eval with --out {directory} first)")
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: malformed JSON ({brief(err)})") from None
    if not isinstance(result, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    fields = (("method", str), ("num_pairs", int), ("runs", list), ("summary", dict), ("seconds", (int, float)))
    for key, kind in fields:
        if not isinstance(result.get(key), kind):
            raise ConfigError(f"{path}: field {key!r} is missing or not a {getattr(kind, '__name__', 'number')}")
    if not result["runs"]:
        raise ConfigError(f"{path}: field 'runs' is empty")
    for key in metric_keys():
        stat = result["summary"].get(key)
        if not (isinstance(stat, dict) and all(isinstance(stat.get(s), (int, float)) for s in ("mean", "std"))):
            raise ConfigError(f"{path}: field 'summary.{key}' is missing or lacks numeric mean and std")
    return result


def write_result(out: Path, result: dict) -> None:
    """results.json and results.md, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "results.json", (json.dumps(result, indent=2) + "\n").encode())
    atomic_write_bytes(out / "results.md", results_table([result]).encode())
