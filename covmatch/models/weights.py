"""Loading weights from local files only: safetensors, or torch checkpoints read with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable

import torch
from torch import nn

from covmatch.errors import ConfigError, brief

__all__ = ["read_state_dict", "load_weights_into"]


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pth/.pt/.bin`` checkpoint (no pickle code executed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise ConfigError(f"{path}: not a readable safetensors file ({brief(err)})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"{path}: cannot load as a weights-only torch checkpoint ({brief(err)})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: expected a mapping of parameter names to tensors")
    return state


def load_weights_into(model: nn.Module, path: Path, *, ignore_prefixes: Iterable[str] = ()) -> None:
    """Load ``path`` into ``model``; every model parameter must be present with the right shape.

    Keys under ``ignore_prefixes`` (a classifier head the encoder does not have) are dropped.
    """
    state = read_state_dict(path)
    prefixes = tuple(p for p in ignore_prefixes if p)
    state = {k: v for k, v in state.items() if not (prefixes and k.startswith(prefixes))}
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ConfigError(
                f"{path}: tensor {key!r} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} (e.g. {missing[0]!r})")
        if unexpected:
            detail.append(f"unexpected {len(unexpected)} (e.g. {unexpected[0]!r})")
        raise ConfigError(f"{path}: weights do not fit the model: {', '.join(detail)}")
    model.load_state_dict(state, strict=True)
