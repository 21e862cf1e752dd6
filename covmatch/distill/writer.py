"""What a run writes under ``--out`` (config.json, log.jsonl, the set and its image grids, and with
``--report-to`` TensorBoard events and a Weights & Biases run) and what it shows while it runs (the progress
bar and its log records)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Dict, List

import torch
from tqdm.auto import tqdm

from covmatch.synthetic import SyntheticSet
from covmatch.visualize import decode_token_ids, save_image_grid

__all__ = ["RunWriter", "TensorBoardReporter", "WandbReporter", "progress_bar", "to_host", "summarise", "postfix"]


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=initial, desc="distill", unit="it", disable=not enabled, dynamic_ncols=True)


def to_host(pending: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The device metrics of several iterations, stacked per name and copied to the host in one transfer each."""
    return {k: torch.stack([m[k].float() for m in pending]).cpu() for k in pending[0]}


def summarise(stacked: Dict[str, torch.Tensor], t: int, seconds_per_it: float, device) -> dict:
    """The log record of the iterations in ``stacked`` (``to_host``): mean of each metric, and the steps fp16
    loss scaling skipped, of the set (``skipped_steps``) and of the online model (``online_skipped_steps``)."""
    counts = {"skipped": "skipped_steps", "online_skipped": "online_skipped_steps"}
    record = {"iteration": t, **{k: float(v.mean()) for k, v in stacked.items() if k not in counts}}
    record.update({name: int(stacked[k].sum()) for k, name in counts.items() if k in stacked})
    record["s_per_it"] = seconds_per_it
    if device.type == "cuda":
        record["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def postfix(record: dict) -> dict:
    out = {k: f"{record[k]:.4g}" for k in ("loss", "cov", "mean", "online")}
    if "max_mem_gb" in record:
        out["mem"] = f"{record['max_mem_gb']:.1f}G"
    return out


class TensorBoardReporter:
    """Log records as TensorBoard scalars under ``RUN/tensorboard`` (a resumed run drops later events)."""

    def __init__(self, out: Path, config, start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # events logged after the resumed iteration belonged to the interrupted run
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if start else None)

    def log(self, record: dict) -> None:
        for key, value in record.items():
            if key != "iteration":
                self.writer.add_scalar(f"distill/{key}", value, record["iteration"])

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """Log records to a Weights & Biases run under ``RUN/wandb``: offline unless ``WANDB_MODE`` says otherwise
    (sync later with ``wandb sync RUN/wandb/offline-run-*``); a resumed run continues the same wandb run."""

    def __init__(self, out: Path, config, start: int) -> None:
        import wandb

        id_file = out / "wandb" / "covmatch-run-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        (out / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "covmatch"), name=out.name, id=run_id, resume="allow",
            dir=str(out), config=config.to_dict(), mode=os.environ.get("WANDB_MODE", "offline"),
        )  # fmt: skip
        id_file.write_text(run_id + "\n")

    def log(self, record: dict) -> None:
        self.run.log({f"distill/{k}": v for k, v in record.items() if k != "iteration"}, step=record["iteration"])

    def close(self) -> None:
        self.run.finish()


REPORTER_CLASSES = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter}


class RunWriter:
    """Everything a run writes under ``--out``: config.json, log.jsonl (always), the reporters ``--report-to``
    names, the result and its grids. ``start``: the iteration the run starts or resumes at."""

    def __init__(self, out: Path, config, tokenizer, start: int = 0) -> None:
        self.out = out
        self.config = config
        self.tokenizer = tokenizer  # decodes the grid's captions
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        self.log_path = out / "log.jsonl"
        self.reporters = [REPORTER_CLASSES[name](out, config, start) for name in config.report_to]

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
        for reporter in self.reporters:
            reporter.log(record)

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
        for reporter in self.reporters:
            reporter.close()
