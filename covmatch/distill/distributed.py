"""Several processes, one distillation: ranks, shards, all-reduced statistics, DeepSpeed ZeRO (docs/design.md,
*Sharded form*).

Launch with ``torchrun --nproc_per_node R -m covmatch.distill ...`` or ``deepspeed --num_gpus R --module
covmatch.distill ...``; without a launcher everything here reduces to one process (``Ranks()``) and costs
nothing. Rank r holds synthetic pairs ``[r*N/R, (r+1)*N/R)`` and its own slice of every real batch; the
moment sums of both sides are all-reduced in fp32, so every rank computes the same loss, and each rank
backpropagates only into its own shard. Only rank 0 prints, logs and writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

from covmatch.devices import resolve_device
from covmatch.errors import ConfigError

__all__ = [
    "Ranks",
    "setup_processes",
    "sum_over_ranks",
    "average_gradients",
    "build_ds_config",
    "load_ds_config",
    "gathered_parameters",
    "LocalPartitionSnapshot",
]

ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the distillation processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> slice:
        """The rows of an n-row global tensor that live on this rank (n divisible by the world size)."""
        size = n // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def all_reduce_sum(self, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
        """Element-wise sums over ranks in one flat message, in fp32 (fp64 if any input is fp64; never half
        precision: bf16 all-reduce is unreliable on gloo)."""
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        if not self.distributed:
            return [t.detach().to(dtype).clone() for t in tensors]
        flat = torch.cat([t.detach().to(dtype).reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
        return out

    def all_reduce_max_(self, tensor: torch.Tensor) -> None:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's shard (same shape everywhere), concatenated along dim 0 in rank order."""
        if not self.distributed:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def sum_over_ranks(local, ranks: Ranks):
    """The sum over ranks of ``local`` (a tensor, or a list of tensors reduced in one message),
    differentiable w.r.t. this rank's ``local`` only: the other ranks' contributions enter as constants,
    so the gradient on a local sample is that of the global loss."""
    if not ranks.distributed:
        return local
    tensors = local if isinstance(local, (list, tuple)) else [local]
    totals = ranks.all_reduce_sum(list(tensors))
    out = [t + (total.to(t.dtype) - t.detach()) for t, total in zip(tensors, totals)]
    return out if isinstance(local, (list, tuple)) else out[0]


def average_gradients(params: List[torch.Tensor], ranks: Ranks) -> None:
    """Data parallelism without DeepSpeed: one flat all-reduce of the gradients, divided by the world size."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    summed = ranks.all_reduce_sum(grads)
    for g, total in zip(grads, summed):
        g.copy_(total / ranks.world_size)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_world_size() -> int:
    """WORLD_SIZE as set by torchrun / the deepspeed launcher; 1 without a launcher."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable WORLD_SIZE={value!r} is not an integer") from None


def setup_processes(device_name: str, zero: int) -> Tuple[Ranks, torch.device]:
    """Join the process group a launcher prepared (or, for DeepSpeed without one, a group of one process).

    Returns this process's ranks and device: ``cuda:LOCAL_RANK`` under a launcher with CUDA, else CPU.
    """
    world = launched_world_size()
    if world == 1 and zero == 0:
        return Ranks(), resolve_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if world > 1 and device.type == "cuda":
        if device_name not in ("auto", "cuda"):
            raise ConfigError(f"--device {device_name}: under a launcher each process uses cuda:LOCAL_RANK; pass cuda")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # DeepSpeed without a launcher: a process group of one on a free local port (else it looks for MPI)
    solo = {"init_method": f"tcp://127.0.0.1:{_free_port()}", "rank": 0, "world_size": 1} if world == 1 else {}
    if world == 1:
        os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed.initialize insists on it
    if not dist.is_initialized():
        if zero > 0:
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, **solo)
        else:
            dist.init_process_group(backend=backend, **solo)
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank), device


# ---------------------------------------------------------------------------------------------- DeepSpeed


def build_ds_config(
    stage: int,
    precision: str,
    micro_batch: int,
    *,
    grad_clip: float = 0.0,
    user_config: Optional[dict] = None,
    source: str = "--deepspeed-config",
) -> dict:
    """The DeepSpeed config for the online model: ours from the flags, a user's JSON merged over it.

    covmatch owns the optimiser (a client ``torch.optim.SGD``), the schedule and the step structure, so a
    user config may not set those, nor contradict ``--zero`` / ``--fp16`` / ``--bf16`` / a non-zero
    ``--grad-clip`` (with ``--grad-clip 0`` its ``gradient_clipping`` applies).
    """
    if stage not in ZERO_STAGES[1:]:
        raise ConfigError(f"--zero {stage}: DeepSpeed runs stages 1, 2 or 3 (0 is plain PyTorch)")
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # a client SGD, not DeepSpeed's fused Adam
        # dynamic loss scaling as torch.amp.GradScaler does it (from 2^16, halved at every overflow, doubled
        # after 2,000 clean steps), so --fp16 skips the same steps with and without DeepSpeed; DeepSpeed's own
        # defaults halve at every second overflow (hysteresis 2) and double after 1,000 steps
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "hysteresis": 1,
            "loss_scale_window": 2000,
        },
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # always spelt out: DeepSpeed's own default is 1.0 from 0.19.3 on (0 before), and --grad-clip 0 means none
        "gradient_clipping": grad_clip,
    }
    if not user_config:
        return config
    for key in ("optimizer", "scheduler"):
        if key in user_config:
            raise ConfigError(f"{source}: '{key}' is set by covmatch (the online model's SGD); remove that section")
    user_clip = user_config.get("gradient_clipping")
    if grad_clip > 0 and user_clip is not None and user_clip != grad_clip:
        raise ConfigError(f"{source}: gradient_clipping={user_clip} contradicts --grad-clip {grad_clip}")
    if user_config.get("gradient_accumulation_steps", 1) != 1:
        raise ConfigError(f"{source}: gradient_accumulation_steps must be 1 (one online step per iteration)")
    merged = _deep_merge(config, user_config)
    if merged["zero_optimization"].get("stage") != stage:
        raise ConfigError(
            f"{source}: zero_optimization.stage={merged['zero_optimization'].get('stage')} contradicts --zero {stage}"
        )
    for mode in ("fp16", "bf16"):
        if bool(merged.get(mode, {}).get("enabled")) != (precision == mode):
            raise ConfigError(f"{source}: {mode}.enabled contradicts the precision flags ({precision})")
    batch = merged.get("train_batch_size")
    if batch is not None and batch != micro_batch * launched_world_size():
        raise ConfigError(
            f"{source}: train_batch_size={batch}, but --real-batch {micro_batch} x {launched_world_size()} "
            f"process(es) = {micro_batch * launched_world_size()}"
        )
    return merged


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_ds_config(path: Optional[Path]) -> Optional[dict]:
    """A user's DeepSpeed JSON, or one clear line saying why it cannot be used."""
    if path is None:
        return None
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed-config {path}: no such file") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--deepspeed-config {path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--deepspeed-config {path}: expected a JSON object at the top level")
    return data


def gathered_parameters(params: Iterable[torch.nn.Parameter], *, modify: bool = False):
    """Full parameters inside the block under ZeRO-3 (``modify``: rank 0's edits are kept); a no-op else."""
    params = list(params)
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


class LocalPartitionSnapshot:
    """ZeRO-3: this rank's partitions of some parameters, copied once while they hold the values to come back
    to; ``restore`` puts them back in one batched copy on the rank's own partitions: no gather, no full tensor.

    DeepSpeed keeps some parameters gathered between steps (the small ones under
    ``stage3_param_persistence_threshold``) and, with hierarchical partitioning (ZeRO++ hpZ), a secondary copy
    of each partition; ``settle`` brings those copies up to date once partitions changed, as DeepSpeed does
    after a step or after loading a checkpoint.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], optimizer) -> None:
        self.params = list(params)  # each with its partition (``applies_to``)
        self.values = [p.ds_tensor.detach().clone() for p in self.params]
        self.optimizer = optimizer

    @staticmethod
    def applies_to(params: Iterable[torch.nn.Parameter]) -> bool:
        """Whether every parameter is partitioned by ZeRO-3 with its partition in memory (not swapped to NVMe)."""
        params = list(params)
        return bool(params) and all(
            getattr(p, "ds_tensor", None) is not None and "nvme" not in str(getattr(p.ds_tensor, "final_location", ""))
            for p in params
        )

    def restore(self) -> None:
        """The partitions back to the snapshot; full copies of them still gathered are released (``settle``
        gathers the persistent ones again)."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        gathered = [p for p in self.params if p.ds_status == ZeroParamStatus.AVAILABLE]
        if gathered:
            gathered[0].partition(param_list=gathered)
        with torch.no_grad():
            torch._foreach_copy_([p.ds_tensor for p in self.params], self.values)

    def settle(self) -> None:
        """Secondary partitions dropped and DeepSpeed's persistent parameters gathered again (the model's
        parameters as a step leaves them)."""
        invalidate = getattr(self.optimizer, "invalidate_secondary_tensor", None)
        if invalidate is not None:
            invalidate()
        persistent = list(getattr(self.optimizer, "persistent_parameters", ()))
        if persistent:
            persistent[0].all_gather(param_list=persistent)


def leave_process_group(deepspeed_used: bool) -> None:
    """Destroy the default process group; through DeepSpeed's ``comm`` where it was used, which (from
    DeepSpeed 0.19.8) also drops the groups DeepSpeed cached, so that a later engine in this process builds
    new ones instead of failing on the destroyed ones."""
    if deepspeed_used:
        import deepspeed.comm

        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()
            return
    dist.destroy_process_group()
