"""Algorithm 1 of CovMatch, read top to bottom in ``Distiller.step`` (docs/design.md, *Algorithm 1 as
implemented*); ``Distiller.run`` is the loop around it, with logs, checkpoints and the set under ``--out``.

The parts it calls: ``OnlineModel`` (plain or DeepSpeed, ``online.py``), ``SyntheticParameters``
(``synthetic_params.py``), the random streams (``streams.py``), the objective (``objective.py``), precision
(``precision.py``), the processes (``distributed.py``), checkpoints (``checkpoint.py``) and the run's files
(``writer.py``). Under a launcher each rank holds a shard of the synthetic set and a slice of every real
batch; only rank 0 prints, logs and writes.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from covmatch.errors import ConfigError, DivergedError
from covmatch.pretrain import pretrained_dual_encoder
from covmatch.synthetic import SYNTHETIC_TENSORS, SyntheticSet, init_synthetic_set
from covmatch.visualize import nearest_token_ids

from . import checkpoint as ckpt
from .augment import affine_resample
from .compilation import begin_graphed_iteration, compile_encoders, compiled_graphs
from .config import DistillConfig
from .distributed import build_ds_config, launched_world_size, leave_process_group, load_ds_config, setup_processes
from .objective import make_objective
from .online import OnlineModel, build_online_model
from .precision import autocast_for
from .real_data import RealData
from .streams import stream_generator
from .synthetic_params import SyntheticParameters
from .writer import RunWriter, postfix, progress_bar, summarise, to_host

__all__ = ["Distiller", "distill"]


class Distiller:
    """One distillation run: ``step`` is one iteration of Algorithm 1, ``run`` loops it.

    Built in stages (each a method below): check the launch and the DeepSpeed config before any process
    group exists; join the processes; build the dual encoder; load the real data; draw the initial set;
    wrap the online model (plain or DeepSpeed).
    """

    def __init__(self, config: DistillConfig, *, log: Callable[[str], None] = print) -> None:
        self.config = config
        ds_config = self._check_launch()
        self.ranks, self.device = setup_processes(config.device, config.zero)
        self.world_size = self.ranks.world_size
        self.log = log if self.ranks.is_main else _silent
        self.online: Optional[OnlineModel] = None
        try:
            if config.precision == "fp16" and config.zero > 0 and self.device.type != "cuda":
                raise ConfigError("--fp16 with DeepSpeed needs a CUDA GPU; on CPU use --bf16 or full precision")
            if config.cuda_graphs and self.device.type != "cuda":
                raise ConfigError(f"--cuda-graphs needs a CUDA device; this run is on {self.device}")
            self.autocast = autocast_for(self.device, config.precision)
            if self.device.type == "cuda":  # every batch has the same shapes: let cuDNN pick its fastest kernels
                torch.backends.cudnn.benchmark = True
            torch.manual_seed(config.seed)
            self.model = self._build_model()
            # captions are decoded in the pretrained table every evaluation starts from, not the online
            # model's drifting one
            self.pretrained_embedding_table = self.model.pretrained_embedding_table()
            self.data = RealData(config, self.model.text.tokenizer, ranks=self.ranks, device=self.device)
            self.train_data = self.data.train  # under the train transform: the online model's batches
            self.target_data = self.data.target  # under the covariance target's
            initial = init_synthetic_set(
                self.train_data, self.model, config.preset, config.num_pairs, config.seed, config.init
            )
            self.initial_token_ids = nearest_token_ids(initial.text_embeds, self.pretrained_embedding_table).cpu()
            self.synthetic = SyntheticParameters(
                initial,
                config,
                ranks=self.ranks,
                device=self.device,
                text_encoder=self.model.text,
            )
            self.online = build_online_model(
                self.model, config, ranks=self.ranks, device=self.device, autocast=self.autocast, ds_config=ds_config
            )
        except BaseException:
            self.close()  # leave the process group: this object will not be used
            raise
        self.iteration = 0
        self._balance_checked = False  # the one early check of the modalities' relative steps
        # --normalize-loss: 1 / ||rho C_T||^2 of the target batch at the last reset, dividing both terms
        self.loss_normaliser: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ build stages

    def _check_launch(self) -> Optional[dict]:
        """What must hold before any process group or model exists; the DeepSpeed config under --zero."""
        config = self.config
        world = launched_world_size()
        if config.num_pairs % world:
            raise ConfigError(f"--num-pairs {config.num_pairs} does not split evenly over {world} processes")
        if min(config.preset.syn_batch, config.num_pairs) < world:
            raise ConfigError(f"--syn-batch {config.preset.syn_batch} is smaller than the {world} processes")
        if config.zero == 0:
            return None
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"--zero {config.zero} needs DeepSpeed: pip install 'covmatch[zero]'")
        return build_ds_config(
            config.zero,
            config.precision,
            config.preset.real_batch,
            grad_clip=config.grad_clip,
            user_config=load_ds_config(config.deepspeed_config),
            source=f"--deepspeed-config {config.deepspeed_config}",
        )

    def _build_model(self):
        """Pretrained encoders and random projections, with the memory and ablation switches applied."""
        config, preset = self.config, self.config.preset
        model = pretrained_dual_encoder(preset, progress=self.config.progress).to(self.device)
        if config.grad_checkpointing:
            model.image.set_grad_checkpointing(True)
            model.text.set_grad_checkpointing(True)
        if config.channels_last:
            model.image.set_channels_last(True)
        if config.frozen_text:
            model.text.requires_grad_(False)
        if config.compile:
            compile_encoders(model, cuda_graphs=config.cuda_graphs)
        return model

    @property
    def engine(self):
        """The DeepSpeed engine around the online model with --zero 1-3, else None."""
        return None if self.online is None else self.online.engine

    @property
    def skipped_steps(self) -> int:
        """Synthetic-set steps skipped because of an fp16 overflow (reading it synchronises)."""
        return int(self.synthetic.skipped)

    # ------------------------------------------------------------------ one iteration

    def step(self, real_batch, online_batch=None) -> Dict[str, torch.Tensor]:
        """Iteration t of Algorithm 1; ``real_batch`` (pixels, ids, mask, index) gives the covariance target,
        ``online_batch`` the online model's step (drawn from its own stream when None). Detached metrics."""
        cfg, t = self.config, self.iteration
        if cfg.cuda_graphs:
            begin_graphed_iteration()
        pixels, ids, mask = self._to_device(real_batch)
        pixels = self._augmented_target(pixels, t)
        reset = self._reset_due(t)
        if reset:
            self.online.reset(stream_generator(cfg.seed, "reset", t, device=self.device))
        if cfg.step_order == "paper":
            online_loss = self._online_update(online_batch, t)
        real = self.online.encode_real(pixels, ids, mask)
        objective = make_objective(
            self.model, real, rho=cfg.rho, lam=cfg.lam, backend=cfg.loss_backend, ranks=self.ranks
        )
        objective.scale = self._normaliser(objective, reset)
        parts = self.synthetic.backward(objective, t, autocast=self.autocast)
        skipped = self.synthetic.step()
        if cfg.step_order == "loss-first":
            online_loss = self._online_update(real_batch, t)
        self.iteration += 1
        metrics = {
            "loss": parts.total,
            "cov": parts.cov,
            "mean": parts.mean,
            "online": online_loss,
            "skipped": skipped,
            "online_skipped": self.online.last_skipped,
        }
        return {**metrics, **self.synthetic.relative_steps(skipped)}

    def _to_device(self, real_batch):
        return self.data.to_device(real_batch, self.synthetic.images.dtype)

    def _augmented_target(self, pixels: torch.Tensor, t: int) -> torch.Tensor:
        """The target batch through iteration t's augmentation maps (--dsa-shift / --dsa-scale), as the
        synthetic images are; unchanged when augmentation is off."""
        augmentation = self.synthetic.augmentation
        if not augmentation.enabled:
            return pixels
        maps = augmentation.real_maps(pixels.shape[0], self.config.seed, t, self.ranks.rank, self.world_size)
        return affine_resample(pixels, maps)

    def _reset_due(self, t: int) -> bool:
        """Every --reset-every iterations; the fixed-model ablation keeps its t = 0 state."""
        return t % self.config.preset.reset_every == 0 and (t == 0 or self.config.online != "fixed")

    def _normaliser(self, objective, reset: bool) -> Optional[torch.Tensor]:
        """The common scale of both loss terms under --normalize-loss, set at each reset (None: raw loss)."""
        if not self.config.preset.normalize_loss:
            return None
        if reset or self.loss_normaliser is None:
            self.loss_normaliser = objective.covariance_scale()
        return self.loss_normaliser

    def _online_update(self, real_batch, t: int) -> torch.Tensor:
        """One InfoNCE step: on a real batch (--online real; its own stream's batch t when None), or on the
        detached synthetic batch (--online synthetic); none with a fixed model."""
        if self.config.online == "fixed":
            return torch.zeros((), device=self.device)
        if self.config.online == "real":
            if real_batch is None:
                real_batch = next(iter(self.online_batches(t, t + 1)))
            pixels, ids, mask = self._to_device(real_batch)
            return self.online.train_step(pixels, {"input_ids": ids, "attention_mask": mask})
        batch = self.synthetic.batch(t)
        if batch.text_features is not None:
            text = {"text_features": batch.text_features.detach()}
        else:
            text = {"inputs_embeds": batch.text_embeds.detach(), "attention_mask": batch.attention_mask}
        return self.online.train_step(batch.images.detach(), text)

    # ------------------------------------------------------------------ results and state

    def synthetic_set(self) -> SyntheticSet:
        """The whole synthetic set (every rank's shard, gathered: all ranks must call this together)."""
        metadata = dict(self.synthetic.metadata)
        metadata.update(
            {
                "iteration": self.iteration,
                "data_seed": self.config.data_seed,
                "hyperparameters": self.config.to_dict(),
                "text_mode": "features" if self.config.text_features else "embeddings",
            }
        )
        table = self.pretrained_embedding_table
        syn = self.synthetic.gathered(metadata, lambda text: nearest_token_ids(text, table.to(text.device)))
        attended = syn.attention_mask.bool()
        changed = (syn.nearest_token_ids.cpu() != self.initial_token_ids) & attended
        syn.metadata["changed_token_share"] = float(changed.sum()) / max(1, int(attended.sum()))
        return syn

    def state_dict(self, *, light: bool = False) -> dict:
        """Everything a resume needs, gathered over ranks (collective): the whole synthetic set and its
        optimiser state, every rank's RNG state; the online model and its optimiser unless DeepSpeed saves them,
        or unless ``light`` and the next iteration resets them (then the marker ``online_omitted``, the fp16
        loss scale and DeepSpeed's step counters: the reset restores everything else they hold)."""
        gather = self.ranks.gather_rows
        rng = {"torch": gather(torch.get_rng_state().unsqueeze(0))}
        if self.device.type == "cuda":
            rng["cuda"] = gather(torch.cuda.get_rng_state(self.device).to(self.device).unsqueeze(0)).cpu()
        normaliser = self.loss_normaliser
        omit_online = light and self._reset_due(self.iteration)
        return {
            "iteration": self.iteration,
            "skipped_steps": self.skipped_steps,
            "loss_normaliser": float("nan") if normaliser is None else float(normaliser),
            **self.synthetic.state_dict(),
            "rng": rng,
            **(
                {"online_omitted": True, **self.online.boundary_state_dict()}
                if omit_online
                else self.online.state_dict()
            ),
        }

    def load_state_dict(self, state: dict) -> None:
        """Apply a checkpoint already validated by ``checkpoint.read_checkpoint`` (so nothing fails half-way);
        each rank takes its shard."""
        self.synthetic.load_state_dict(state, state["skipped_steps"])
        if state.get("online_omitted"):  # the next iteration resets the online model
            self.online.load_boundary_state_dict(state)
        else:
            self.online.load_state_dict(state)
        rank = self.ranks.rank
        torch.set_rng_state(state["rng"]["torch"][rank].clone())  # a row of its own (offset 0)
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"][rank].clone(), self.device)
        self.iteration = int(state["iteration"])
        saved = float(state.get("loss_normaliser", float("nan")))
        self.loss_normaliser = None if math.isnan(saved) else torch.tensor(saved, device=self.device)

    def close(self, *, finished: bool = False) -> None:
        """Release the DeepSpeed engine and leave the process group (if this run joined one).

        Torn down in order while the interpreter is fully alive: after a finished run every rank first
        waits at a barrier, so none closes its connections while a peer is still inside the last collective
        (not after a failure, where a peer may never arrive); then the engine and its optimiser, which hold
        process groups and ZeRO hooks; then the process groups themselves. A group left to interpreter
        shutdown takes its communication threads down with it in no particular order.
        """
        if not (self.ranks.distributed or self.config.zero > 0) or not dist.is_initialized():
            return
        if finished:
            self.ranks.barrier()
        if self.online is not None:
            self.online.close()
        leave_process_group(deepspeed_used=self.config.zero > 0)

    # ------------------------------------------------------------------ the loop

    def real_batches(self, start: int, stop: int):
        """The covariance targets' real batches of iterations ``start .. stop-1`` (stream 'real')."""
        return self.data.loader("real", start, stop)

    def online_batches(self, start: int, stop: int):
        """The online model's own real batches (stream 'online'), or Nones when it takes none of its own."""
        if self.config.online != "real" or self.config.step_order != "paper":
            return itertools.repeat(None, max(0, stop - start))
        return self.data.loader("online", start, stop)

    def run(self) -> SyntheticSet:
        """Distil until ``config.iterations``, with checkpoints, logs and grids under ``config.out``.

        A resumed run reads its checkpoint before it writes anything, so a refused resume changes nothing.
        A run whose loss or synthetic set becomes non-finite stops with DivergedError before its next save:
        the checkpoints and the set already on disk are from before the failure.
        """
        cfg = self.config
        out = Path(cfg.out) if cfg.out is not None else None
        if out is not None and (cfg.resume or cfg.auto_resume):
            # --auto-resume starts over a run stopped before its first checkpoint (its files are iteration 0's),
            # never one whose set is already there
            required = cfg.resume or (out / SYNTHETIC_TENSORS).exists()
            flag = "--resume" if cfg.resume else "--auto-resume"
            ckpt.resume_latest(self, out / ckpt.CHECKPOINT_DIR, required=required, log=self.log, flag=flag)
        writer = (
            RunWriter(out, cfg, self.model.text.tokenizer, start=self.iteration)
            if out is not None and self.ranks.is_main
            else None
        )
        if writer is not None:
            writer.truncate_log(self.iteration)
        if out is not None and self.iteration == 0:  # every run keeps its iteration-0 set, a paired baseline
            initial = self.synthetic_set()
            if writer is not None:
                initial.save(out / "initial")
        if cfg.compile and self.iteration < cfg.iterations:
            self.log("covmatch: --compile: the first iterations compile both encoders (minutes at the paper's size), "
                     "the others reuse the graphs")  # fmt: skip
        progress = progress_bar(cfg.iterations, self.iteration, enabled=cfg.progress and self.ranks.is_main)
        try:
            return self._iterate(cfg.iterations, out, writer, progress)
        finally:
            progress.close()
            if writer is not None:
                writer.close()

    def _iterate(self, total: int, out: Optional[Path], writer: Optional[RunWriter], progress) -> SyntheticSet:
        """Steps from the current iteration to ``total``: logs every --log-every, saves every --save-every."""
        cfg = self.config
        pending: List[Dict[str, torch.Tensor]] = []
        saved: Optional[SyntheticSet] = None
        tick = time.perf_counter()
        start = self.iteration
        for real_batch, online_batch in zip(self.real_batches(start, total), self.online_batches(start, total)):
            pending.append(self.step(real_batch, online_batch))
            t = self.iteration  # iterations done
            log_now = t % cfg.log_every == 0 or t == total
            save_now = out is not None and (t % cfg.save_every == 0 or t == total)
            if log_now or save_now:
                metrics = to_host(pending)  # the loop's one host sync per log or save
                self._stop_if_diverged(metrics, t - len(pending) + 1, out, check_set=save_now)
            if log_now:
                now = time.perf_counter()
                record = summarise(metrics, t, (now - tick) / len(pending), self.device)
                if cfg.compile:
                    record["compiled_graphs"] = compiled_graphs()
                self._warn_if_one_modality_stands_still(record)
                pending, tick = [], now
                progress.set_postfix(postfix(record), refresh=False)
                if writer is not None:
                    writer.log(record)
            progress.update(1)
            if save_now:
                saved = self._save(out, writer)
        if out is not None and (saved is None or saved.metadata["iteration"] != self.iteration):
            saved = self._save(out, writer)  # no step ran (0 iterations, or resumed at the end)
        return saved if saved is not None else self.synthetic_set()

    def _warn_if_one_modality_stands_still(self, record: dict) -> None:
        """Once, at the first log record: a modality whose relative step is under 1/30 of the other's is barely
        distilled (at a pretrained model pixels can receive a hundred times smaller relative gradients than
        caption embeddings)."""
        if self._balance_checked:
            return
        self._balance_checked = True
        images, captions = record.get("rel_step_images"), record.get("rel_step_captions")
        if not images or not captions or min(images, captions) * MODALITY_IMBALANCE >= max(images, captions):
            return
        slow, flag = ("images", "--lr-img") if images < captions else ("caption embeddings", "--lr-txt")
        self.log(
            f"covmatch: warning: per step the images move {images:.2g} of their norm and the caption embeddings "
            f"{captions:.2g} ({max(images, captions) / min(images, captions):.0f}x apart): the {slow} are barely "
            f"distilled; consider a larger {flag}{'' if self.config.preset.relative_steps else ' or --relative-steps'} "
            "(covmatch analyze reports this over the run)"
        )

    def _stop_if_diverged(
        self, metrics: Dict[str, torch.Tensor], first: int, out: Optional[Path], *, check_set: bool
    ) -> None:
        """Raise DivergedError if a loss term of the iterations ``first ..`` in ``metrics`` (host tensors; steps
        that fp16 loss scaling skipped aside: the set's for its terms, the online model's for its InfoNCE) or,
        before a save (``check_set``), the synthetic set itself is NaN or infinite.

        Loss terms are identical on every rank and the set's check is all-reduced, so all ranks stop together.
        """
        applied = metrics["skipped"] == 0
        online_applied = metrics["online_skipped"] == 0
        for i in range(len(applied)):
            for key, name in _TERM_NAMES.items():
                value = float(metrics[key][i])
                if (online_applied if key == "online" else applied)[i] and not math.isfinite(value):
                    raise DivergedError(
                        f"distillation diverged at iteration {first + i}: the {name} became {value}; "
                        f"{_saved_before(out)}; try {_TERM_HINTS[key]}"
                    )
        if check_set and self.synthetic.non_finite().item():
            raise DivergedError(
                f"distillation diverged by iteration {first + len(applied) - 1}: the synthetic set holds NaN or "
                f"infinite values; {_saved_before(out)}; try {_TERM_HINTS['cov']}"
            )

    def _save(self, out: Path, writer: Optional[RunWriter]) -> SyntheticSet:
        """Checkpoint, synthetic set and grid at the current iteration (collective; rank 0 writes)."""
        ckpt.save_checkpoint(self, out / ckpt.CHECKPOINT_DIR, keep=self.config.keep_checkpoints)
        syn = self.synthetic_set()
        if writer is not None:
            writer.save(syn, self.iteration)
        return syn


# A modality whose relative step is this many times smaller than the other's gets a warning.
MODALITY_IMBALANCE = 30.0

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
