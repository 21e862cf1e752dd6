"""What a run writes under ``--out`` (config.json, log.jsonl, TensorBoard events, the set and its image grids)
and what it shows while it runs (the progress bar and its log records)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import torch
from tqdm.auto import tqdm

from covmatch.synthetic import SyntheticSet
from covmatch.visualize import decode_token_ids, save_image_grid

__all__ = ["RunWriter", "progress_bar", "to_host", "summarise", "postfix"]


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=initial, desc="distill", unit="it", disable=not enabled, dynamic_ncols=True)


def to_host(pending: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The device metrics of several iterations, stacked per name and copied to the host in one transfer each."""
    return {k: torch.stack([m[k].float() for m in pending]).cpu() for k in pending[0]}


def summarise(stacked: Dict[str, torch.Tensor], t: int, seconds_per_it: float, device) -> dict:
    """The log record of the iterations in ``stacked`` (``to_host``): mean of each metric, skipped steps."""
    record = {"iteration": t, **{k: float(v.mean()) for k, v in stacked.items() if k != "skipped"}}
    record["skipped_steps"] = int(stacked["skipped"].sum())
    record["s_per_it"] = seconds_per_it
    if device.type == "cuda":
        record["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def postfix(record: dict) -> dict:
    out = {k: f"{record[k]:.4g}" for k in ("loss", "cov", "mean", "online")}
    if "max_mem_gb" in record:
        out["mem"] = f"{record['max_mem_gb']:.1f}G"
    return out


class RunWriter:
    """Everything a run writes under ``--out``: log.jsonl, TensorBoard events, checkpoints, grids, result."""

    def __init__(self, out: Path, config, tokenizer) -> None:
        self.out = out
        self.config = config
        self.tokenizer = tokenizer  # decodes the grid's captions
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        self.log_path = out / "log.jsonl"
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass

    def truncate_log(self, iteration: int) -> None:
        """Drop log lines past the resumed iteration (they belonged to the interrupted run)."""
        if not self.log_path.exists():
            return
        kept = [
            line
            for line in self.log_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("iteration", 0) <= iteration
        ]
        self.log_path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        with self.log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "iteration":
                    self.tb.add_scalar(f"distill/{key}", value, record["iteration"])

    def save(self, syn: SyntheticSet, t: int) -> None:
        """The synthetic set (atomically) and, if asked, its image grid with decoded captions."""
        syn.save(self.out)
        if self.config.grid_every_save:
            captions = decode_token_ids(syn.nearest_token_ids, syn.attention_mask, self.tokenizer)
            save_image_grid(
                syn.images,
                self.out / "grids" / f"grid_{t:07d}.png",
                mean=syn.metadata["mean"],
                std=syn.metadata["std"],
                captions=captions,
                title=f"synthetic set, iteration {t}",
            )

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
