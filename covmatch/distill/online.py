"""The online model of Algorithm 1: a dual encoder trained by InfoNCE and reset to its pretrained state
every K iterations. Two variants with one interface, chosen once at build: plain PyTorch (data-parallel by
one gradient all-reduce under a launcher) and a DeepSpeed ZeRO engine.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Dict, Optional

import torch

from covmatch.models import DualEncoder

from .distributed import LocalPartitionSnapshot, Ranks, average_gradients, gathered_parameters
from .objective import Features
from .precision import ScaledStep, sgd

__all__ = ["OnlineModel", "DeepSpeedOnlineModel", "build_online_model"]


class OnlineModel:
    """The plain online model: ``reset``, ``encode_real``, ``train_step``, and its state for checkpoints."""

    engine = None  # no DeepSpeed engine
    fused_sgd = True  # one fused kernel per step where torch has one (no host sync under fp16)

    def __init__(self, model: DualEncoder, settings, *, ranks: Ranks, device: torch.device, autocast) -> None:
        self.model = model
        self.settings = settings  # the DistillConfig: learning rates, momentum, precision, clipping
        self.ranks = ranks
        self.device = device
        self.autocast: Callable[[], ContextManager] = autocast
        self.last_skipped = torch.zeros((), device=device)  # 1.0 where the last step overflowed in fp16 (skipped)
        self._build_optimizer()

    def _build_optimizer(self) -> None:
        """SGD (``precision.sgd``, or multi-tensor foreach with no state for DeepSpeed to wrap): encoders at the
        encoder learning rate, projections at the head's; under fp16 its loss scaling, one ``GradScaler`` for
        the whole run."""
        p = self.settings.preset
        encoders = [q for q in self.model.encoder_parameters() if q.requires_grad]
        groups = [{"params": encoders, "lr": p.online_lr_encoder}] if encoders else []
        groups.append({"params": self.model.head_parameters(), "lr": p.online_lr_proj})
        if self.fused_sgd:
            self.optimizer = sgd(groups, self.device, lr=p.online_lr_proj, momentum=p.online_momentum)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=p.online_lr_proj, momentum=p.online_momentum, foreach=True)
        self.scaled_step = ScaledStep(
            self.optimizer, self.device, enabled=self.settings.precision == "fp16", ranks=self.ranks
        )

    def reset(self, generator: torch.Generator) -> None:
        """Back to the pretrained encoders, fresh projections from ``generator`` (on the model's device), and
        the optimiser's momentum zeroed in place: with no dampening, SGD's first step from a zero buffer is the
        step from none, and nothing is reallocated. The fp16 loss scale carries on: set back to 2^16 at every
        reset, the first steps of each cycle would overflow again until it has come down to where it was."""
        self.model.reset(generator)
        with torch.no_grad():
            buffers = [
                s["momentum_buffer"] for s in self.optimizer.state.values() if s.get("momentum_buffer") is not None
            ]
            if buffers:
                torch._foreach_zero_(buffers)

    @torch.no_grad()
    def encode_real(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> Features:
        """Encoder features of a real batch, in eval mode (deterministic), without autograd."""
        self.model.eval()
        with self.autocast():
            return Features(self.model.image(pixels).float(), self.model.text.encode_ids(ids, mask).float())

    def train_step(self, pixels: torch.Tensor, text: Dict[str, torch.Tensor]) -> torch.Tensor:
        """One InfoNCE step on a batch (captions as ``input_ids``, ``inputs_embeds`` or ``text_features``
        keyword arguments of ``DualEncoder.forward``); returns the detached loss."""
        self.model.train()
        with self.autocast():
            loss = self._forward(pixels, text)
        self._backward_and_step(loss)
        self.model.eval()
        return loss.detach()

    def _forward(self, pixels, text) -> torch.Tensor:
        return self.model(pixels, **text)

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        scale = self.scaled_step.loss_scale()
        (loss if scale is None else loss * scale).backward()
        if self.ranks.distributed:
            average_gradients([p for g in self.optimizer.param_groups for p in g["params"]], self.ranks)
        self.last_skipped = self.scaled_step(clip_norm=self.settings.grad_clip)
        # spent: freed now rather than at the next step, so that they are not held through the synthetic pass,
        # usually the iteration's largest graph (they are one fp32 copy of the trainable weights)
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "online_optimizer": self.optimizer.state_dict(),
            "online_scaler": self.scaled_step.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["online_optimizer"])
        self.scaled_step.load_state_dict(state["online_scaler"])

    def boundary_state_dict(self) -> dict:
        """What a checkpoint taken where the next iteration resets the model keeps: the loss scale."""
        return {"online_scaler": self.scaled_step.state_dict()}

    def load_boundary_state_dict(self, state: dict) -> None:
        self.scaled_step.load_state_dict(state.get("online_scaler", {}))  # none saved: the initial scale

    def close(self) -> None:
        """Nothing to release."""


# DeepSpeed's engine counters its own checkpoint restores, and the state of its fp16 DynamicLossScaler (the rest
# of the scaler is the configuration it was built with)
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")
DYNAMIC_SCALER_STATE = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


class DeepSpeedOnlineModel(OnlineModel):
    """The online model inside a DeepSpeed engine (``--zero 1-3``): DeepSpeed does loss scaling, gradient
    reduction, clipping and ZeRO sharding; it saves its own state (``save``/``load`` in checkpoints), except at a
    reset boundary, where the reset restores it."""

    fused_sgd = False  # DeepSpeed steps the optimiser on its own flat partitions and checks overflows itself

    def __init__(self, model, settings, *, ranks, device, autocast, ds_config: dict) -> None:
        super().__init__(model, settings, ranks=ranks, device=device, autocast=autocast)
        import deepspeed

        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, config=ds_config
        )
        self._skip_flags = torch.tensor([0.0, 1.0], device=device)  # DeepSpeed counts skips on the host
        self._local_pretrained: Optional[LocalPartitionSnapshot] = None  # ZeRO-3, from the first reset on

    def reset(self, generator: torch.Generator) -> None:
        """As the plain model's reset, on DeepSpeed's state. Under ZeRO-3 no rank ever holds the whole model
        or a full copy of its pretrained state: the first reset restores the encoders module by module (each
        module's parameters gathered, filled from the host snapshot, partitioned again), and every rank then
        keeps its own partitions of them, which later resets copy back in place; the heads are gathered."""
        model = self.model
        heads = [*model.image_proj.parameters(), *model.text_proj.parameters(), model.logit_scale]
        if not LocalPartitionSnapshot.applies_to(model.encoder_parameters()):  # ZeRO-1/2, or ZeRO-3 on NVMe
            zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
            with gathered_parameters(model.parameters(), modify=True):
                model.restore_pretrained(keep_on_device=not zero3)
                model.reinitialise_heads(generator)
        else:
            if self._local_pretrained is not None:
                self._local_pretrained.restore()
            else:
                for module in [*model.image.modules(), *model.text.modules()]:
                    own = list(module.parameters(recurse=False))
                    if own:
                        with gathered_parameters(own, modify=True):
                            model.restore_pretrained(own, keep_on_device=False)
                self._local_pretrained = LocalPartitionSnapshot(model.encoder_parameters(), self.engine.optimizer)
            model.restore_pretrained(model.encoder_buffers(), keep_on_device=False)
            with gathered_parameters(heads, modify=True):
                model.reinitialise_heads(generator)
            self._local_pretrained.settle()
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "refresh_fp32_params"):  # ZeRO / mixed precision: fp32 master copy <- weights
            optimizer.refresh_fp32_params()
        getattr(optimizer, "optimizer", optimizer).state.clear()  # momentum buffers; the loss scale carries on

    def _forward(self, pixels, text) -> torch.Tensor:
        return self.engine(pixels, **text)

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        skipped_before = self.engine.skipped_steps
        self.engine.backward(loss)
        self.engine.step()
        self.last_skipped = self._skip_flags[self.engine.skipped_steps - skipped_before]

    def state_dict(self) -> dict:
        return {}  # in DeepSpeed's own checkpoint

    def load_state_dict(self, state: dict) -> None:
        """Loaded by ``load`` from DeepSpeed's checkpoint."""

    def boundary_state_dict(self) -> dict:
        """What a checkpoint taken where the next iteration resets the model keeps of the engine, in place of
        DeepSpeed's own checkpoint: the counters its checkpoint restores and, under fp16, the dynamic loss
        scaler's state (the reset restores the weights and their fp32 master copy, and clears the momentum)."""
        state = {"online_engine_counters": {name: int(getattr(self.engine, name)) for name in ENGINE_COUNTERS}}
        scaler = getattr(self.engine.optimizer, "loss_scaler", None)
        if getattr(scaler, "dynamic", False):
            state["online_loss_scaler"] = {name: float(getattr(scaler, name)) for name in DYNAMIC_SCALER_STATE}
        return state

    def load_boundary_state_dict(self, state: dict) -> None:
        counters = state.get("online_engine_counters", {})
        for name in ENGINE_COUNTERS:
            if name in counters:
                setattr(self.engine, name, int(counters[name]))
        scaler = getattr(self.engine.optimizer, "loss_scaler", None)
        saved = state.get("online_loss_scaler", {})  # none saved: the initial scale
        if getattr(scaler, "dynamic", False):
            for name in DYNAMIC_SCALER_STATE:
                if name in saved:
                    setattr(scaler, name, float(saved[name]) if name == "cur_scale" else int(saved[name]))

    def save(self, directory: str) -> None:
        self.engine.save_checkpoint(directory, tag="online", save_latest=False)

    def load(self, directory: str) -> None:
        self.engine.load_checkpoint(directory, tag="online", load_optimizer_states=True, load_lr_scheduler_states=False)

    def close(self) -> None:
        """Destroy the engine and its optimiser (they hold process groups and ZeRO hooks)."""
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
            self.optimizer = None


def build_online_model(
    model: DualEncoder, settings, *, ranks: Ranks, device: torch.device, autocast, ds_config: Optional[dict]
) -> OnlineModel:
    """The DeepSpeed variant when ``ds_config`` is given (``--zero 1-3``), else the plain one."""
    if ds_config is not None:
        return DeepSpeedOnlineModel(model, settings, ranks=ranks, device=device, autocast=autocast, ds_config=ds_config)
    return OnlineModel(model, settings, ranks=ranks, device=device, autocast=autocast)
