"""Algorithm 1 of CovMatch (docs/design.md, *Algorithm 1 as implemented*), read top to bottom in ``Distiller.step``.

Every random choice that the loop makes (real batch, synthetic batch, projection re-initialisation) is
drawn from a generator seeded by (seed, iteration), so a resumed run draws exactly what an uninterrupted
one would; the only stateful randomness (dropout in the online step) is the global RNG, checkpointed.

Under a launcher (``torchrun`` / ``deepspeed``) each rank holds a shard of the synthetic set and a slice of
every real batch, and the loss is computed from all-reduced statistics (``distributed.py``); with
``--zero 1-3`` the online model is a DeepSpeed engine. Only rank 0 prints, logs and writes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, Sampler

from covmatch.data.build import build_source, build_train_dataset
from covmatch.data.sources import pairs_by_image
from covmatch.errors import ConfigError, DivergedError
from covmatch.models import build_dual_encoder
from covmatch.synthetic import SyntheticSet, init_synthetic_set
from covmatch.visualize import nearest_token_ids

from . import checkpoint as ckpt
from .config import DistillConfig
from .distributed import (
    Ranks,
    build_ds_config,
    gathered_parameters,
    launched_world_size,
    load_ds_config,
    setup_processes,
)
from .objective import Features, LossParts, SyntheticBatch, make_objective, synthetic_backward

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
    key = (seed * 1_000_003 + _STREAMS[stream]) * 10_000_019 + iteration
    return torch.Generator().manual_seed(key % 2**64)  # any seed: manual_seed takes 64 bits


class RealBatchSampler(Sampler):
    """Index batches for iterations ``start .. stop-1``: batch t is drawn from ``stream_generator(seed, 'real', t)``
    (without replacement within a batch), so batches do not depend on what ran before. With R ranks, rank r
    takes the r-th slice of one permutation: the ranks' batches are disjoint and their union is what one
    process with an R times larger batch would draw."""

    def __init__(
        self, num_items: int, batch_size: int, seed: int, start: int, stop: int, ranks: Optional[Ranks] = None
    ) -> None:
        ranks = ranks or Ranks()
        self.num_items, self.batch_size, self.seed = num_items, min(batch_size, num_items), seed
        self.start, self.stop = start, stop
        self.offset = ranks.rank * self.batch_size

    def __iter__(self) -> Iterator[List[int]]:
        for t in range(self.start, self.stop):
            gen = stream_generator(self.seed, "real", t)
            perm = torch.randperm(self.num_items, generator=gen)
            yield perm[self.offset : self.offset + self.batch_size].tolist()

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def _collate(items):
    pixels, ids, mask, index = zip(*items)
    return torch.stack(pixels), torch.stack(ids), torch.stack(mask), torch.tensor(index)


class Distiller:
    """Owns the online model, the synthetic tensors and both optimisers; ``run`` loops ``step``."""

    def __init__(self, config: DistillConfig, *, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.ds_config = None
        if config.zero > 0:  # checked before any process group or model exists
            if importlib.util.find_spec("deepspeed") is None:
                raise ConfigError(f"--zero {config.zero} needs DeepSpeed: pip install 'covmatch[zero]'")
            self.ds_config = build_ds_config(
                config.zero,
                config.precision,
                config.preset.real_batch,
                grad_clip=config.grad_clip,
                user_config=load_ds_config(config.deepspeed_config),
                source=f"--deepspeed-config {config.deepspeed_config}",
            )
        world = launched_world_size()
        if config.num_pairs % world:
            raise ConfigError(f"--num-pairs {config.num_pairs} does not split evenly over {world} processes")
        if min(config.preset.syn_batch, config.num_pairs) < world:
            raise ConfigError(f"--syn-batch {config.preset.syn_batch} is smaller than the {world} processes")
        self.engine = None  # the DeepSpeed engine around self.model with --zero 1-3
        self.ranks, self.device = setup_processes(config.device, config.zero)
        self.world_size = self.ranks.world_size
        self.log = log if self.ranks.is_main else _silent
        if config.precision == "fp16" and config.zero > 0 and self.device.type != "cuda":
            self.close()
            raise ConfigError("--fp16 with DeepSpeed needs a CUDA GPU; on CPU use --bf16 or full precision")
        try:
            self._build()
        except BaseException:
            self.close()  # leave the process group: this object will not be used
            raise

    def _build(self) -> None:
        """Model, data, synthetic set and optimisers (after the process group exists)."""
        config, preset = self.config, self.config.preset
        torch.manual_seed(config.seed)

        # Online model: pretrained encoders + random projections.
        self.model = build_dual_encoder(preset).to(self.device)
        if config.grad_checkpointing:
            self.model.image.set_grad_checkpointing(True)
            self.model.text.set_grad_checkpointing(True)
        if config.channels_last:
            self.model.image.set_channels_last(True)
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
        if self.world_size > 1 and preset.real_batch * self.world_size > len(self.train_data):
            raise ConfigError(
                f"--real-batch {preset.real_batch} per process x {self.world_size} processes is more than the "
                f"{len(self.train_data)} train pairs"
            )
        # Every rank builds the same initial set and keeps its own shard of it.
        initial = init_synthetic_set(self.train_data, self.model, preset, config.num_pairs, config.seed)
        shard = self.ranks.shard(config.num_pairs)
        self.syn_metadata = dict(initial.metadata)
        self.syn_images = initial.images[shard].to(self.device)
        self.syn_text = initial.text_embeds[shard].to(self.device)
        self.syn_mask = initial.attention_mask[shard].to(self.device)
        self.syn_text_features: Optional[torch.Tensor] = None
        if config.frozen_text:
            # Prior work's regime: the text encoder is frozen and not differentiated through, so synthetic
            # captions are learned directly as text features, initialised from the real captions.
            with torch.no_grad():
                self.syn_text_features = self.model.text(self.syn_text, self.syn_mask).float()
        self._setup_synthetic_optimizer()
        self._setup_online_optimizer()
        if config.zero > 0:
            self._setup_deepspeed()
        amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.precision)
        self.amp_dtype = amp
        self.syn_scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.online_scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.iteration = 0
        self._skipped = torch.zeros((), device=self.device)  # steps skipped for fp16 overflow, kept on the device

    @property
    def skipped_steps(self) -> int:
        """Synthetic-set steps skipped because of an fp16 overflow (reading it synchronises)."""
        return int(self._skipped)

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

    def _setup_deepspeed(self) -> None:
        """Wrap the online model and its SGD in a DeepSpeed engine (ZeRO stage, precision, clipping from flags)."""
        import deepspeed

        self.engine, self.online_optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.online_optimizer, config=self.ds_config
        )

    def _reset_online(self, generator: torch.Generator) -> None:
        """Online model back to the pretrained encoders with fresh projections, and no optimiser state."""
        if self.engine is None:
            self.model.reset(generator)
            self._setup_online_optimizer()
            self.online_scaler = torch.amp.GradScaler(self.device.type, enabled=self.config.precision == "fp16")
            return
        with gathered_parameters(self.model.parameters(), modify=True):  # ZeRO-3: full tensors, then re-shard
            self.model.reset(generator)
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "refresh_fp32_params"):  # ZeRO / mixed precision: fp32 master copy <- weights
            optimizer.refresh_fp32_params()
        getattr(optimizer, "optimizer", optimizer).state.clear()  # momentum buffers

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ one iteration

    def synthetic_indices(self, t: int) -> torch.Tensor:
        """Indices into this rank's shard: of one global permutation (the same on every rank), the first
        ``syn_batch / R`` that fall in the shard, so every rank runs the same number of samples."""
        n, b = self.config.num_pairs, min(self.config.preset.syn_batch, self.config.num_pairs)
        if n <= b:
            return torch.arange(self.syn_images.shape[0])
        perm = torch.randperm(n, generator=stream_generator(self.config.seed, "synthetic", t))
        shard = self.ranks.shard(n)
        mine = perm[(perm >= shard.start) & (perm < shard.stop)] - shard.start
        return mine[: b // self.world_size]

    def synthetic_batch(self, t: int) -> SyntheticBatch:
        idx = self.synthetic_indices(t).to(self.device)
        rows = None if idx.numel() == self.syn_images.shape[0] else idx
        return SyntheticBatch(self.syn_images, self.syn_text, self.syn_mask, self.syn_text_features, rows=rows)

    def step(self, real_batch) -> Dict[str, torch.Tensor]:
        """One iteration t of Algorithm 1 on ``real_batch`` (pixels, ids, mask, index); returns detached metrics."""
        cfg, t = self.config, self.iteration
        model = self.model
        pixels = real_batch[0].to(self.device, dtype=self.syn_images.dtype, non_blocking=True)
        ids, mask = (x.to(self.device, non_blocking=True) for x in real_batch[1:3])

        # 1. Periodic reset of the online model (not in the fixed-model ablation, which keeps its t=0 state).
        if t % cfg.preset.reset_every == 0 and (t == 0 or cfg.online != "fixed"):
            self._reset_online(stream_generator(cfg.seed, "reset", t))

        # 2. Features of the real batch (no grad), encoders in eval mode: deterministic feature extraction.
        model.eval()
        with torch.no_grad(), self._autocast():
            real = Features(model.image(pixels).float(), model.text.encode_ids(ids, mask).float())

        # 3. Synthetic batch: gradient of the CovMatch loss w.r.t. pixels and text embeddings.
        objective = make_objective(
            model,
            real,
            rho=cfg.rho,
            lam=cfg.lam,
            backend=cfg.loss_backend,
            normalize=cfg.preset.normalize_loss,
            ranks=self.ranks,
        )
        self.syn_optimizer.zero_grad(set_to_none=True)
        loss_scale = None
        if self.syn_scaler.is_enabled():  # the current scale as a device tensor (scale() also initialises it)
            loss_scale = self.syn_scaler.scale(torch.ones((), device=self.device))
        parts: LossParts = synthetic_backward(
            objective, self.synthetic_batch(t), chunk=cfg.syn_chunk, loss_scale=loss_scale, autocast=self._autocast
        )

        # 4. SGD (momentum 0.5) on the synthetic set; with fp16, an overflowing step is skipped, never applied.
        # The overflow flag stays on the device (no host sync per iteration).
        if self.syn_scaler.is_enabled():
            self.syn_scaler.unscale_(self.syn_optimizer)
            found = self.syn_scaler._per_optimizer_states[id(self.syn_optimizer)]["found_inf_per_device"]
            for flag in found.values():  # one rank's overflow skips the step on every rank
                self.ranks.all_reduce_max_(flag)
            skipped = torch.stack([f.to(self.device) for f in found.values()]).amax().clamp(max=1.0)
            self.syn_scaler.step(self.syn_optimizer)
            self.syn_scaler.update()
            self._skipped = self._skipped + skipped
        else:
            self.syn_optimizer.step()
            skipped = torch.zeros((), device=self.device)

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
        if cfg.online == "real":
            inputs = {"input_ids": ids, "attention_mask": mask}
        else:  # "synthetic": train the online model on the (detached) synthetic batch
            batch = self.synthetic_batch(t)
            pixels = batch.images.detach()
            if batch.text_features is not None:
                inputs = {"text_features": batch.text_features.detach()}
            else:
                inputs = {"inputs_embeds": batch.text_embeds.detach(), "attention_mask": batch.attention_mask}
        model.train()
        if self.engine is not None:  # DeepSpeed: loss scaling, gradient reduction, clipping, ZeRO
            with self._autocast():
                loss = self.engine(pixels, **inputs)
            self.engine.backward(loss)
            self.engine.step()
        else:
            with self._autocast():
                loss = model(pixels, **inputs)
            self.online_optimizer.zero_grad(set_to_none=True)
            self.online_scaler.scale(loss).backward()
            params = [p for g in self.online_optimizer.param_groups for p in g["params"]]
            if self.ranks.distributed:
                _average_gradients(params, self.ranks)
            if cfg.grad_clip > 0:
                self.online_scaler.unscale_(self.online_optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.online_scaler.step(self.online_optimizer)
            self.online_scaler.update()
        model.eval()
        return loss.detach()

    # ------------------------------------------------------------------ results and state

    def synthetic_set(self) -> SyntheticSet:
        """The whole synthetic set (every rank's shard, gathered: all ranks must call this together)."""
        metadata = dict(self.syn_metadata)
        metadata.update(
            {
                "iteration": self.iteration,
                "hyperparameters": self.config.to_dict(),
                "text_mode": "features" if self.config.frozen_text else "embeddings",
            }
        )

        def gathered_copy(x: torch.Tensor) -> torch.Tensor:  # a copy: the set must not alias the live tensors
            return self.ranks.gather_rows(x.detach()).to("cpu", copy=True)

        text = self.ranks.gather_rows(self.syn_text.detach())
        features = None if self.syn_text_features is None else gathered_copy(self.syn_text_features)
        table = self.model.text.embedding_table
        with gathered_parameters([table]):
            nearest = nearest_token_ids(text, table)
        return SyntheticSet(
            gathered_copy(self.syn_images),
            text.to("cpu", copy=True),
            gathered_copy(self.syn_mask),
            metadata,
            features,
            nearest,
        )

    def state_dict(self) -> dict:
        """Everything a resume needs, gathered over ranks (collective): the whole synthetic set and its
        optimiser state, every rank's RNG state; the online model and its optimiser unless DeepSpeed saves them."""
        gather = self.ranks.gather_rows
        synthetic = {"images": gather(self.syn_images.detach()), "text_embeds": gather(self.syn_text.detach())}
        if self.syn_text_features is not None:
            synthetic["text_features"] = gather(self.syn_text_features.detach())
        syn_opt = self.syn_optimizer.state_dict()
        syn_opt["state"] = {
            k: {name: gather(v) if torch.is_tensor(v) and v.dim() > 0 else v for name, v in entry.items()}
            for k, entry in syn_opt["state"].items()
        }
        rng = {"torch": gather(torch.get_rng_state().unsqueeze(0))}
        if self.device.type == "cuda":
            rng["cuda"] = gather(torch.cuda.get_rng_state(self.device).to(self.device).unsqueeze(0)).cpu()
        state = {
            "iteration": self.iteration,
            "skipped_steps": self.skipped_steps,
            "synthetic": synthetic,
            "syn_optimizer": syn_opt,
            "syn_scaler": self.syn_scaler.state_dict(),
            "rng": rng,
        }
        if self.engine is None:
            state["model"] = self.model.state_dict()
            state["online_optimizer"] = self.online_optimizer.state_dict()
            state["online_scaler"] = self.online_scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Apply a checkpoint already validated by ``checkpoint.validate_state`` (so nothing fails half-way);
        each rank takes its shard."""
        shard = self.ranks.shard(self.config.num_pairs)
        with torch.no_grad():
            self.syn_images.copy_(state["synthetic"]["images"][shard])
            self.syn_text.copy_(state["synthetic"]["text_embeds"][shard])
            if self.syn_text_features is not None:
                self.syn_text_features.copy_(state["synthetic"]["text_features"][shard])
        syn_opt = dict(state["syn_optimizer"])
        syn_opt["state"] = {
            k: {name: v[shard] if torch.is_tensor(v) and v.dim() > 0 else v for name, v in entry.items()}
            for k, entry in syn_opt["state"].items()
        }
        self.syn_optimizer.load_state_dict(syn_opt)
        if state["syn_scaler"]:
            self.syn_scaler.load_state_dict(state["syn_scaler"])
        if self.engine is None:
            self.model.load_state_dict(state["model"])
            self.online_optimizer.load_state_dict(state["online_optimizer"])
            if state["online_scaler"]:
                self.online_scaler.load_state_dict(state["online_scaler"])
        rank = self.ranks.rank
        torch.set_rng_state(state["rng"]["torch"][rank].clone())  # a row of its own (offset 0)
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"][rank].clone(), self.device)
        self.iteration = int(state["iteration"])
        self._skipped = torch.tensor(float(state["skipped_steps"]), device=self.device)

    def close(self, *, finished: bool = False) -> None:
        """Release the DeepSpeed engine and leave the process group (if this run joined one).

        Torn down in order while the interpreter is fully alive: after a finished run every rank first
        waits at a barrier, so none closes its connections while a peer is still inside the last collective
        (not after a failure, where a peer may never arrive); then the engine and its optimiser, which hold
        process groups and ZeRO hooks, are destroyed; then the process groups themselves. A group left to
        interpreter shutdown takes its communication threads down with it in no particular order.
        """
        import torch.distributed as dist

        if not (self.ranks.distributed or self.config.zero > 0) or not dist.is_initialized():
            return
        if finished:
            self.ranks.barrier()
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
            self.online_optimizer = None
        dist.destroy_process_group()

    # ------------------------------------------------------------------ the loop

    def real_batches(self, start: int, stop: int) -> DataLoader:
        sampler = RealBatchSampler(
            len(self.train_data), self.config.preset.real_batch, self.config.seed, start, stop, self.ranks
        )
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
        """Distil until ``config.iterations``, with checkpoints, logs and grids under ``config.out``.

        A resumed run reads its checkpoint before it writes anything, so a refused resume changes nothing.
        A run whose loss or synthetic set becomes non-finite stops with DivergedError before its next save:
        the checkpoints and the set already on disk are from before the failure.
        """
        cfg = self.config
        out = Path(cfg.out) if cfg.out is not None else None
        if out is not None and (cfg.resume or cfg.auto_resume):
            has_run_files = any((out / name).exists() for name in ckpt.RUN_OUTPUTS)
            required = cfg.resume or has_run_files
            ckpt.resume_latest(self, out / ckpt.CHECKPOINT_DIR, required=required, log=self.log)
        writer = _RunWriter(out, self) if out is not None and self.ranks.is_main else None
        if writer is not None:
            writer.truncate_log(self.iteration)
        total = cfg.iterations
        progress = _progress(total, self.iteration, enabled=cfg.progress and self.ranks.is_main)
        try:
            return self._iterate(total, out, writer, progress)
        finally:
            progress.close()
            if writer is not None:
                writer.close()

    def _iterate(self, total: int, out: Optional[Path], writer: Optional[_RunWriter], progress) -> SyntheticSet:
        """Steps from the current iteration to ``total``: logs every --log-every, saves every --save-every."""
        cfg = self.config
        pending: List[Dict[str, torch.Tensor]] = []
        saved: Optional[SyntheticSet] = None
        tick = time.perf_counter()
        for real_batch in self.real_batches(self.iteration, total):
            metrics = self.step(real_batch)
            pending.append(metrics)
            t = self.iteration  # iterations done
            log_now = t % cfg.log_every == 0 or t == total
            save_now = out is not None and (t % cfg.save_every == 0 or t == total)
            if log_now or save_now:
                self._stop_if_diverged(pending, t - len(pending) + 1, out)
            if log_now:
                now = time.perf_counter()
                record = _summarise(pending, t, (now - tick) / len(pending), self.device)
                pending, tick = [], now
                progress.set_postfix(_postfix(record), refresh=False)
                if writer is not None:
                    writer.log(record)
            progress.update(1)
            if save_now:
                saved = self._save(out, writer)
        if out is not None and (saved is None or saved.metadata["iteration"] != self.iteration):
            saved = self._save(out, writer)  # no step ran (0 iterations, or resumed at the end)
        return saved if saved is not None else self.synthetic_set()

    def _stop_if_diverged(self, pending: List[Dict[str, torch.Tensor]], first: int, out: Optional[Path]) -> None:
        """Raise DivergedError if a loss term of the iterations ``first ..`` in ``pending`` (steps that
        fp16 loss scaling skipped aside), or the synthetic set itself, is NaN or infinite.

        Loss terms are identical on every rank and the set's check is all-reduced, so all ranks stop together.
        """
        terms = {k: torch.stack([m[k].float() for m in pending]).cpu() for k in _TERM_NAMES}
        applied = torch.stack([m["skipped"] for m in pending]).cpu() == 0
        for i in range(len(pending)):
            for key, name in _TERM_NAMES.items():
                value = float(terms[key][i])
                if applied[i] and not math.isfinite(value):
                    raise DivergedError(
                        f"distillation diverged at iteration {first + i}: the {name} became {value}; "
                        f"{_saved_before(out)}; try {_TERM_HINTS[key]}"
                    )
        bad = torch.zeros((), device=self.device)
        for tensor in self._learned_tensors().values():
            bad = torch.maximum(bad, (~torch.isfinite(tensor.detach())).any().float())
        self.ranks.all_reduce_max_(bad)
        if bad.item():
            raise DivergedError(
                f"distillation diverged by iteration {first + len(pending) - 1}: the synthetic set holds NaN or "
                f"infinite values; {_saved_before(out)}; try {_TERM_HINTS['cov']}"
            )

    def _save(self, out: Path, writer: Optional[_RunWriter]) -> SyntheticSet:
        """Checkpoint, synthetic set and grid at the current iteration (collective; rank 0 writes)."""
        ckpt.save_checkpoint(self, out / ckpt.CHECKPOINT_DIR, keep=self.config.keep_checkpoints)
        syn = self.synthetic_set()
        if writer is not None:
            writer.save(syn, self.iteration)
        return syn


# What each logged loss term is, and what to try when it diverges.
_TERM_NAMES = {
    "cov": "covariance term ||rho C_T - C_S||^2",
    "mean": "mean-matching term",
    "online": "online model's InfoNCE loss",
    "loss": "distillation loss",
}
_TERM_HINTS = {
    "cov": "a lower --lr-img / --lr-txt, or --normalize-loss",
    "mean": "a lower --lam, --lr-img or --lr-txt",
    "online": "a lower --online-lr-encoder / --online-lr-proj, or --grad-clip 1.0",
    "loss": "a lower --lr-img / --lr-txt, or --normalize-loss",
}


def _saved_before(out: Optional[Path]) -> str:
    """Where the last state saved before a failure is (the run saves nothing after it)."""
    if out is None:
        return "nothing was saved (no --out)"
    found = ckpt.list_checkpoints(out / ckpt.CHECKPOINT_DIR)
    if not found:
        return "nothing was saved yet"
    return f"{found[0]} and {out / 'synthetic.safetensors'} hold the last good state"


def _silent(message: str) -> None:
    """The log of ranks other than 0."""


def _average_gradients(params: List[torch.Tensor], ranks: Ranks) -> None:
    """Data parallelism without DeepSpeed (--zero 0 under a launcher): one flat all-reduce of the gradients."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    summed = ranks.all_reduce_sum(grads)
    for g, total in zip(grads, summed):
        g.copy_(total / ranks.world_size)


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

    def save(self, syn: SyntheticSet, t: int) -> None:
        """The synthetic set (atomically) and, if asked, its image grid with decoded captions."""
        d = self.distiller
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
    distiller = Distiller(config, log=log)
    finished = False
    try:
        syn = distiller.run()
        finished = True
        return syn
    finally:
        distiller.close(finished=finished)
