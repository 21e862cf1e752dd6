"""Atomic checkpoints of a distillation run, the last K kept, validated in full before anything is applied.

A checkpoint saved where the next iteration resets the online model leaves that model and its optimiser out
(``online_omitted``; with DeepSpeed, its whole checkpoint): the reset restores all they hold, so it is about
the synthetic set's size, not the encoders'. A checkpoint is one ``torch.save`` file of tensors, numbers and
strings only, read back with ``weights_only=True`` (no pickled code). It is written to a temporary file and
moved into place with ``os.replace``, so a crash never leaves a half-written checkpoint under the final name.
With several processes, rank 0 writes the whole (gathered) synthetic set. With DeepSpeed (``--zero 1-3``) the
online model and its sharded optimiser state are saved by DeepSpeed into ``step_<t>.online/`` first, and the
``step_<t>.pt`` file, written last, marks the checkpoint complete.
"""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path
from typing import Callable, List, Optional

import torch

from covmatch._version import __version__
from covmatch.errors import CheckpointError, brief
from covmatch.synthetic import atomic_write_bytes

from .config import CHECKPOINT_DIR, RUN_OUTPUTS

__all__ = [
    "CHECKPOINT_DIR",
    "RUN_OUTPUTS",
    "save_checkpoint",
    "list_checkpoints",
    "read_checkpoint",
    "resume_latest",
    "fingerprint",
]


class LayoutMismatchError(CheckpointError):
    """The checkpoint was written with another number of processes or ZeRO stage: resuming would not
    continue that run, and starting over would overwrite it, so this stops the run instead of skipping."""


FORMAT = 1
_NAME = re.compile(r"^step_(\d{8})\.pt$")


def fingerprint(distiller) -> dict:
    """What must match for a checkpoint to belong to this run (shapes and the settings that shape them)."""
    cfg = distiller.config
    return {
        "num_pairs": cfg.num_pairs,
        "preset": cfg.preset.name,
        "image_encoder": cfg.preset.image_encoder,
        "text_encoder": cfg.preset.text_encoder,
        "image_size": cfg.preset.image_size,
        "seq_len": cfg.preset.seq_len,
        "seed": cfg.seed,
        "data_seed": cfg.data_seed,
        "frozen_text": cfg.frozen_text,
        "text_features": cfg.text_features,
        "distill_mode": cfg.distill_mode,
        "world_size": getattr(distiller, "world_size", 1),
        "zero": cfg.zero,
    }


def online_dir(path: Path) -> Path:
    """Where DeepSpeed keeps the online engine's state that belongs to checkpoint ``path``."""
    return Path(path).with_suffix(".online")


def save_checkpoint(distiller, directory: Path, *, keep: int) -> Path:
    """Write ``step_<iteration>.pt`` atomically and delete all but the newest ``keep`` checkpoints.

    Collective: every rank calls it (the state is gathered, DeepSpeed saves its shards); rank 0 writes.
    """
    directory = Path(directory)
    ranks = distiller.ranks
    state = distiller.state_dict(light=True)  # at a reset boundary without the online model the reset restores
    path = directory / f"step_{distiller.iteration:08d}.pt"
    if distiller.engine is not None and not state.get("online_omitted"):
        distiller.online.save(str(online_dir(path)))
        ranks.barrier()  # every shard is on disk before the .pt says the checkpoint is complete
    if ranks.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT,
            "covmatch_version": __version__,
            "fingerprint": fingerprint(distiller),
            "state": state,
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        for old in list_checkpoints(directory)[keep:]:
            old.unlink(missing_ok=True)
            shutil.rmtree(online_dir(old), ignore_errors=True)
    ranks.barrier()
    return path


def list_checkpoints(directory: Path) -> List[Path]:
    """Checkpoint files in ``directory``, newest (highest iteration) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def read_checkpoint(path: Path, distiller) -> dict:
    """Load and fully validate a checkpoint against ``distiller``; returns its state or raises CheckpointError."""
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable or truncated ({type(err).__name__}: {brief(err, 120)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state" not in payload:
        raise CheckpointError(f"{path}: not a covmatch checkpoint of format {FORMAT}")
    expected = fingerprint(distiller)
    saved = payload.get("fingerprint", {})
    if "data_seed" not in saved:  # written before --data-seed existed, when --seed also drew the data
        saved = {**saved, "data_seed": saved.get("seed")}
    if "text_features" not in saved:  # written when --frozen-text also meant learnt text features
        saved = {**saved, "text_features": saved.get("frozen_text")}
    for key, value in expected.items():
        if saved.get(key) != value:
            if key == "world_size":
                raise LayoutMismatchError(
                    f"{path}: written by a run with {saved.get(key)} process(es), this run has {value}; "
                    "resume with the same world size"
                )
            if key == "zero":
                raise LayoutMismatchError(
                    f"{path}: written with --zero {saved.get(key)}, this run has --zero {value}; resume with the same"
                )
            raise CheckpointError(f"{path}: made with {key}={saved.get(key)!r}, this run has {key}={value!r}")
    state = payload["state"]
    current = distiller.state_dict()
    omitted = isinstance(state, dict) and state.get("online_omitted")  # saved at a reset boundary: no online model
    if omitted:
        current = {k: v for k, v in current.items() if k not in distiller.online.state_dict()}
    _check_like(state, current, str(path), "")
    if omitted:
        _check_boundary_numbers(state, str(path))
    elif distiller.engine is not None and not (online_dir(path) / "online").is_dir():
        raise CheckpointError(f"{path}: its DeepSpeed state {online_dir(path)}/online is missing")
    return state


def _check_boundary_numbers(state: dict, where: str) -> None:
    """The loss scaler (plain or DeepSpeed's) and DeepSpeed's counters a reset-boundary checkpoint keeps in place
    of the online model are mappings of numbers."""
    for key in ("online_scaler", "online_engine_counters", "online_loss_scaler"):
        values = state.get(key, {})
        if not isinstance(values, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()
        ):
            raise CheckpointError(f"{where}: {key} should be a mapping of numbers")


def _check_like(saved, current, where: str, prefix: str) -> None:
    """Same nested keys, and tensors of the same shape and dtype, as the running state."""
    if isinstance(current, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            raise CheckpointError(f"{where}: {prefix or 'value'} should be a tensor")
        if saved.shape != current.shape or saved.dtype != current.dtype:
            raise CheckpointError(
                f"{where}: {prefix} has shape {tuple(saved.shape)} {saved.dtype}, "
                f"expected {tuple(current.shape)} {current.dtype}"
            )
        return
    if isinstance(current, dict):
        if not isinstance(saved, dict):
            raise CheckpointError(f"{where}: {prefix or 'state'} should be a mapping")
        missing = [k for k in current if k not in saved]
        if missing:
            raise CheckpointError(f"{where}: missing {prefix + '.' if prefix else ''}{missing[0]}")
        # optimiser momentum buffers appear only after a first step: check what both have
        for key in current:
            _check_like(saved[key], current[key], where, f"{prefix}.{key}" if prefix else str(key))


def resume_latest(
    distiller, directory: Path, *, required: bool = True, log: Callable[[str], None] = print, flag: str = "--resume"
) -> Optional[Path]:
    """Apply the newest valid checkpoint in ``directory`` (older ones are tried when newer ones are bad).

    When none can be applied, raises CheckpointError naming each checkpoint and why, before anything is
    changed; only with ``required=False`` and no checkpoint at all does it return None (start afresh).
    """
    found = list_checkpoints(directory)
    problems: List[str] = []
    for path in found:
        try:
            state = read_checkpoint(path, distiller)
        except LayoutMismatchError:
            raise
        except CheckpointError as err:
            problems.append(str(err))
            continue
        distiller.load_state_dict(state)
        if distiller.engine is not None and not state.get("online_omitted"):
            distiller.online.load(str(online_dir(path)))
        for problem in problems:
            log(f"covmatch: skipping checkpoint: {problem}")
        log(f"covmatch: resumed from {path} (iteration {distiller.iteration})")
        return path
    if problems:
        raise CheckpointError(
            f"no checkpoint in {directory} can be resumed ({'; '.join(problems)}); nothing was changed"
        )
    if required:
        raise CheckpointError(f"{flag}: {directory} holds no checkpoint; nothing was changed")
    return None
