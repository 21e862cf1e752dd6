"""Algorithm 1 of CovMatch (DESIGN 1.5), read top to bottom in ``Distiller.step``.

Every random choice that the loop makes (real batch, synthetic batch, projection re-initialisation) is
drawn from a generator seeded by (seed, iteration), so a resumed run draws exactly what an uninterrupted
one would; the only stateful randomness (dropout in the online step) is the global RNG, checkpointed.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, Sampler

from covmatch.data.build import build_source, build_train_dataset
from covmatch.data.sources import pairs_by_image
from covmatch.errors import ConfigError
from covmatch.models import build_dual_encoder
from covmatch.synthetic import SyntheticSet, init_synthetic_set
from covmatch.visualize import nearest_token_ids

from . import checkpoint as ckpt
from .config import DistillConfig
from .objective import DistillObjective, Features, LossParts, SyntheticBatch, synthetic_backward

__all__ = ["Distiller", "distill", "resolve_device", "stream_generator"]


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else must be a device that exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device name (try cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for CUDA, but no CUDA device is available here")
    return device


# Independent random streams, each a pure function of (seed, stream, iteration).
_STREAMS = {"real": 1, "synthetic": 2, "reset": 3, "online": 4}


def stream_generator(seed: int, stream: str, iteration: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + _STREAMS[stream]) * 10_000_019 + iteration)


class RealBatchSampler(Sampler):
    """Index batches for iterations ``start .. stop-1``: batch t is drawn from ``stream_generator(seed, 'real', t)``
    (without replacement within a batch), so batches do not depend on what ran before."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int, stop: int) -> None:
        self.num_items, self.batch_size, self.seed = num_items, min(batch_size, num_items), seed
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[List[int]]:
        for t in range(self.start, self.stop):
            gen = stream_generator(self.seed, "real", t)
            yield torch.randperm(self.num_items, generator=gen)[: self.batch_size].tolist()

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def _collate(items):
    pixels, ids, mask, index = zip(*items)
    return torch.stack(pixels), torch.stack(ids), torch.stack(mask), torch.tensor(index)


class Distiller:
    """Owns the online model, the synthetic tensors and both optimisers; ``run`` loops ``step``."""

    def __init__(self, config: DistillConfig, *, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.log = log
        self.device = resolve_device(config.device)
        preset = config.preset
        torch.manual_seed(config.seed)

        # Online model: pretrained encoders + random projections.
        self.model = build_dual_encoder(preset).to(self.device)
        if config.grad_checkpointing:
            self.model.image.set_grad_checkpointing(True)
            self.model.text.set_grad_checkpointing(True)
        if config.frozen_text:
            self.model.text.requires_grad_(False)

        # Real data and the initial synthetic set.
        self.source = build_source(
            preset,
            ann_root=config.ann_root,
            image_root=config.image_root,
            validate=config.validate_data,
            seed=config.seed,
        )
        self.train_data = build_train_dataset(self.source, self.model.text.tokenizer, preset, augment=True)
        num_images = len(pairs_by_image(self.train_data.pairs))
        if config.num_pairs > num_images:
            raise ConfigError(f"--num-pairs {config.num_pairs} is larger than the train split ({num_images} images)")
        initial = init_synthetic_set(self.train_data, self.model, preset, config.num_pairs, config.seed)
        self.syn_metadata = dict(initial.metadata)
        self.syn_images = initial.images.to(self.device)
        self.syn_text = initial.text_embeds.to(self.device)
        self.syn_mask = initial.attention_mask.to(self.device)
        self.syn_text_features: Optional[torch.Tensor] = None
        if config.frozen_text:
            # Prior work's regime: the text encoder is frozen and not differentiated through, so synthetic
            # captions are learned directly as text features, initialised from the real captions.
            with torch.no_grad():
                self.syn_text_features = self.model.text(self.syn_text, self.syn_mask).float()
        self._setup_synthetic_optimizer()
        self._setup_online_optimizer()
        amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.precision)
        self.amp_dtype = amp
        self.syn_scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.online_scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.iteration = 0
        self.skipped_steps = 0

    # ------------------------------------------------------------------ setup

    def _learned_tensors(self) -> Dict[str, torch.Tensor]:
        """The synthetic tensors this run updates (per --distill and --frozen-text)."""
        mode = self.config.distill_mode
        out = {}
        if mode in ("both", "images"):
            out["images"] = self.syn_images
        if mode in ("both", "texts"):
            key = "text_features" if self.config.frozen_text else "text_embeds"
            out[key] = self.syn_text_features if self.config.frozen_text else self.syn_text
        return out

    def _setup_synthetic_optimizer(self) -> None:
        p = self.config.preset
        groups = []
        for name, tensor in self._learned_tensors().items():
            tensor.requires_grad_(True)
            groups.append({"params": [tensor], "lr": p.lr_img if name == "images" else p.lr_txt, "name": name})
        self.syn_optimizer = torch.optim.SGD(groups, lr=p.lr_img, momentum=p.syn_momentum)

    def _setup_online_optimizer(self) -> None:
        """Fresh online optimiser (no state): encoders at the encoder lr, projections at the head lr."""
        p = self.config.preset
        encoders = [q for q in self.model.encoder_parameters() if q.requires_grad]
        groups = [{"params": encoders, "lr": p.online_lr_encoder}] if encoders else []
        groups.append({"params": self.model.head_parameters(), "lr": p.online_lr_proj})
        self.online_optimizer = torch.optim.SGD(groups, lr=p.online_lr_proj, momentum=p.online_momentum)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ one iteration

    def synthetic_indices(self, t: int) -> torch.Tensor:
        n, b = self.config.num_pairs, self.config.preset.syn_batch
        if n <= b:
            return torch.arange(n)
        return torch.randperm(n, generator=stream_generator(self.config.seed, "synthetic", t))[:b]

    def synthetic_batch(self, t: int) -> SyntheticBatch:
        idx = self.synthetic_indices(t).to(self.device)
        take_all = idx.numel() == self.config.num_pairs

        def view(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if x is None:
                return None
            return x if take_all else x[idx]

        return SyntheticBatch(
            view(self.syn_images), view(self.syn_text), view(self.syn_mask), view(self.syn_text_features)
        )

    def step(self, real_batch) -> Dict[str, torch.Tensor]:
        """One iteration t of Algorithm 1 on ``real_batch`` (pixels, ids, mask, index); returns detached metrics."""
        cfg, t = self.config, self.iteration
        model = self.model
        pixels, ids, mask = (x.to(self.device, non_blocking=True) for x in real_batch[:3])

        # 1. Periodic reset of the online model (not in the fixed-model ablation, which keeps its t=0 state).
        if t % cfg.preset.reset_every == 0 and (t == 0 or cfg.online != "fixed"):
            model.reset(stream_generator(cfg.seed, "reset", t))
            self._setup_online_optimizer()
            self.online_scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")

        # 2. Features of the real batch (no grad), encoders in eval mode: deterministic feature extraction.
        model.eval()
        with torch.no_grad(), self._autocast():
            real = Features(model.image(pixels).float(), model.text.encode_ids(ids, mask).float())

        # 3. Synthetic batch: gradient of the CovMatch loss w.r.t. pixels and text embeddings.
        objective = DistillObjective(
            model, real, rho=cfg.rho, lam=cfg.lam, backend=cfg.loss_backend, normalize=cfg.preset.normalize_loss
        )
        self.syn_optimizer.zero_grad(set_to_none=True)
        loss_scale = None
        if self.syn_scaler.is_enabled():  # the current scale as a device tensor (scale() also initialises it)
            loss_scale = self.syn_scaler.scale(torch.ones((), device=self.device))
        parts: LossParts = synthetic_backward(
            objective, self.synthetic_batch(t), chunk=cfg.syn_chunk, loss_scale=loss_scale, autocast=self._autocast
        )

        # 4. SGD (momentum 0.5) on the synthetic set; with fp16, an overflowing step is skipped, never applied.
        if self.syn_scaler.is_enabled():
            scale_before = self.syn_scaler.get_scale()
            self.syn_scaler.step(self.syn_optimizer)
            self.syn_scaler.update()
            skipped = torch.tensor(float(self.syn_scaler.get_scale() < scale_before))
            self.skipped_steps += int(skipped.item())
        else:
            self.syn_optimizer.step()
            skipped = torch.zeros(())

        # 5. Online update: one InfoNCE step training both encoders and the projections.
        online_loss = self._online_step(pixels, ids, mask, t)
        self.iteration += 1
        return {
            "loss": parts.total,
            "cov": parts.cov,
            "mean": parts.mean,
            "online": online_loss,
            "skipped": skipped,
        }

    def _online_step(self, pixels, ids, mask, t: int) -> torch.Tensor:
        cfg, model = self.config, self.model
        if cfg.online == "fixed":
            return torch.zeros((), device=self.device)
        model.train()
        with self._autocast():
            if cfg.online == "real":
                image_z = model.encode_image(pixels)
                text_z = model.encode_text_ids(ids, mask)
            else:  # "synthetic": train the online model on the (detached) synthetic batch
                batch = self.synthetic_batch(t)
                image_z = model.encode_image(batch.images.detach())
                if batch.text_features is not None:
                    text_z = model.text_proj(batch.text_features.detach())
                else:
                    text_z = model.encode_text(batch.text_embeds.detach(), batch.attention_mask)
            loss = model.contrastive_loss(image_z, text_z)
        self.online_optimizer.zero_grad(set_to_none=True)
        self.online_scaler.scale(loss).backward()
        self.online_scaler.step(self.online_optimizer)
        self.online_scaler.update()
        model.eval()
        return loss.detach()

    # ------------------------------------------------------------------ results and state

    def synthetic_set(self) -> SyntheticSet:
        metadata = dict(self.syn_metadata)
        metadata.update(
            {
                "iteration": self.iteration,
                "hyperparameters": self.config.to_dict(),
                "text_mode": "features" if self.config.frozen_text else "embeddings",
            }
        )
        features = None if self.syn_text_features is None else self.syn_text_features.detach().cpu()
        return SyntheticSet(
            self.syn_images.detach().cpu(),
            self.syn_text.detach().cpu(),
            self.syn_mask.detach().cpu(),
            metadata,
            features,
            nearest_token_ids(self.syn_text, self.model.text.embedding_table),
        )

    def state_dict(self) -> dict:
        synthetic = {"images": self.syn_images.detach(), "text_embeds": self.syn_text.detach()}
        if self.syn_text_features is not None:
            synthetic["text_features"] = self.syn_text_features.detach()
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "iteration": self.iteration,
            "skipped_steps": self.skipped_steps,
            "synthetic": synthetic,
            "syn_optimizer": self.syn_optimizer.state_dict(),
            "model": self.model.state_dict(),
            "online_optimizer": self.online_optimizer.state_dict(),
            "syn_scaler": self.syn_scaler.state_dict(),
            "online_scaler": self.online_scaler.state_dict(),
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        """Apply a checkpoint already validated by ``checkpoint.validate_state`` (so nothing fails half-way)."""
        with torch.no_grad():
            self.syn_images.copy_(state["synthetic"]["images"])
            self.syn_text.copy_(state["synthetic"]["text_embeds"])
            if self.syn_text_features is not None:
                self.syn_text_features.copy_(state["synthetic"]["text_features"])
        self.syn_optimizer.load_state_dict(state["syn_optimizer"])
        self.model.load_state_dict(state["model"])
        self.online_optimizer.load_state_dict(state["online_optimizer"])
        if state["syn_scaler"]:
            self.syn_scaler.load_state_dict(state["syn_scaler"])
        if state["online_scaler"]:
            self.online_scaler.load_state_dict(state["online_scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.iteration = int(state["iteration"])
        self.skipped_steps = int(state["skipped_steps"])

    # ------------------------------------------------------------------ the loop

    def real_batches(self, start: int, stop: int) -> DataLoader:
        sampler = RealBatchSampler(len(self.train_data), self.config.preset.real_batch, self.config.seed, start, stop)
        return DataLoader(
            self.train_data,
            batch_sampler=sampler,
            num_workers=self.config.workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            # its own generator: creating the iterator must not draw from the (checkpointed) global RNG
            generator=torch.Generator().manual_seed(self.config.seed),
        )

    def run(self) -> SyntheticSet:
        """Distil until ``config.iterations``, with checkpoints, logs and grids under ``config.out``."""
        cfg = self.config
        out = Path(cfg.out) if cfg.out is not None else None
        writer = _RunWriter(out, self) if out is not None else None
        if writer is not None and cfg.resume:
            ckpt.resume_latest(self, out / ckpt.CHECKPOINT_DIR, log=self.log)
            writer.truncate_log(self.iteration)
        total = cfg.iterations
        progress = _progress(total, self.iteration, enabled=cfg.progress)
        pending: List[Dict[str, torch.Tensor]] = []
        saved_at = None
        tick = time.perf_counter()
        for real_batch in self.real_batches(self.iteration, total):
            metrics = self.step(real_batch)
            pending.append(metrics)
            t = self.iteration  # iterations done
            if t % cfg.log_every == 0 or t == total:
                now = time.perf_counter()
                record = _summarise(pending, t, (now - tick) / len(pending), self.device)
                pending, tick = [], now
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(f"distillation loss became {record['loss']} at iteration {t}")
                progress.set_postfix(_postfix(record), refresh=False)
                if writer is not None:
                    writer.log(record)
            progress.update(1)
            if writer is not None and (t % cfg.save_every == 0 or t == total):
                writer.save(t)
                saved_at = t
        progress.close()
        if writer is not None:
            if saved_at != self.iteration:  # no step ran (0 iterations, or resumed at the end)
                writer.save(self.iteration)
            writer.close()
        return self.synthetic_set()


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="distill", unit="it", disable=not enabled, dynamic_ncols=True)


def _summarise(pending: List[Dict[str, torch.Tensor]], t: int, seconds_per_it: float, device) -> dict:
    stacked = {k: torch.stack([m[k].float().cpu() for m in pending]) for k in pending[0]}  # one sync per log
    record = {"iteration": t, **{k: float(v.mean()) for k, v in stacked.items() if k != "skipped"}}
    record["skipped_steps"] = int(stacked["skipped"].sum())
    record["s_per_it"] = seconds_per_it
    if device.type == "cuda":
        record["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def _postfix(record: dict) -> dict:
    out = {k: f"{record[k]:.4g}" for k in ("loss", "cov", "mean", "online")}
    if "max_mem_gb" in record:
        out["mem"] = f"{record['max_mem_gb']:.1f}G"
    return out


class _RunWriter:
    """Everything a run writes under ``--out``: log.jsonl, TensorBoard events, checkpoints, grids, result."""

    def __init__(self, out: Path, distiller: Distiller) -> None:
        self.out = out
        self.distiller = distiller
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(distiller.config.to_dict(), indent=2) + "\n")
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

    def save(self, t: int) -> None:
        d = self.distiller
        ckpt.save_checkpoint(d, self.out / ckpt.CHECKPOINT_DIR, keep=d.config.keep_checkpoints)
        syn = d.synthetic_set()
        syn.save(self.out)
        if d.config.grid_every_save:
            from covmatch.visualize import decode_token_ids, save_image_grid

            captions = decode_token_ids(syn.nearest_token_ids, syn.attention_mask, d.model.text.tokenizer)
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


def distill(config: DistillConfig, *, log: Callable[[str], None] = print) -> SyntheticSet:
    """Run CovMatch distillation as configured and return the synthetic set (also saved under ``config.out``)."""
    return Distiller(config, log=log).run()
