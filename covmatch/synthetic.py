"""The synthetic set: N image–text pairs as tensors, saved as safetensors + JSON metadata.

Images are pixels in the image encoder's normalised input space [N, 3, H, W]; captions are continuous token
embeddings [N, L, E] in the text encoder's input-embedding space with their attention mask [N, L].
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from covmatch._version import __version__
from covmatch.errors import CheckpointError, ConfigError, brief

__all__ = [
    "SyntheticSet",
    "SYNTHETIC_TENSORS",
    "SYNTHETIC_METADATA",
    "MATCHING_FIELDS",
    "atomic_write_bytes",
    "check_metadata_matches",
    "INIT_METHODS",
    "init_synthetic_set",
    "pick_balanced_pairs",
    "pick_initial_pairs",
    "real_pairs_set",
    "synthetic_metadata",
]

SYNTHETIC_TENSORS = "synthetic.safetensors"
INIT_METHODS = ("random", "balanced")  # how the initial real pairs are drawn (--init)
SYNTHETIC_METADATA = "synthetic.json"
FORMAT_VERSION = 1
# Metadata that must agree between a saved set and the encoders it is used with.
MATCHING_FIELDS = ("image_encoder", "text_encoder", "image_size", "seq_len", "embed_dim", "mean", "std")


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (mkstemp's own is 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``; the file
    gets the permissions any new file would (the umask's), so a set can be shared like other files."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _new_file_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class SyntheticSet:
    """N synthetic pairs and the metadata that says what they are for."""

    images: torch.Tensor  # [N, 3, H, W] float32
    text_embeds: torch.Tensor  # [N, L, E] float32
    attention_mask: torch.Tensor  # [N, L] int64
    metadata: Dict[str, Any] = field(default_factory=dict)
    # With a frozen text encoder (prior work's regime) captions are learned as text features [N, d_l].
    text_features: Optional[torch.Tensor] = None
    # [N, L] nearest vocabulary tokens of each caption in the distilling encoder's embedding table: lets
    # another text encoder read the captions (cross-architecture evaluation) and people inspect them.
    nearest_token_ids: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        self.check()

    def __len__(self) -> int:
        return self.images.shape[0]

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_real(
        cls,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        embedding_table: torch.Tensor,
        metadata: Dict[str, Any],
    ) -> SyntheticSet:
        """Initialise from real pairs: pixels as given, captions through the input-embedding table."""
        with torch.no_grad():
            embeds = embedding_table.detach().float()[input_ids.to(embedding_table.device)]
        return cls(images.detach().float().clone(), embeds.cpu().clone(), attention_mask.long().clone(), metadata)

    def check(self) -> None:
        """Shapes, dtypes and finiteness; raises CheckpointError naming the offending tensor."""
        n = self.images.shape[0] if self.images.dim() else -1
        if self.images.dim() != 4 or self.images.shape[1] != 3:
            raise CheckpointError(f"synthetic images must be [N, 3, H, W], got {tuple(self.images.shape)}")
        if self.text_embeds.dim() != 3 or self.text_embeds.shape[0] != n:
            raise CheckpointError(f"synthetic text_embeds must be [N={n}, L, E], got {tuple(self.text_embeds.shape)}")
        if tuple(self.attention_mask.shape) != tuple(self.text_embeds.shape[:2]):
            raise CheckpointError(
                f"attention_mask shape {tuple(self.attention_mask.shape)} does not match text_embeds "
                f"{tuple(self.text_embeds.shape)}"
            )
        for name, t in (("images", self.images), ("text_embeds", self.text_embeds)):
            if not t.is_floating_point():
                raise CheckpointError(f"synthetic {name} must be floating point, got {t.dtype}")
            if not torch.isfinite(t).all():
                raise CheckpointError(f"synthetic {name} contain NaN or inf values")
        if self.text_features is not None:
            if self.text_features.dim() != 2 or self.text_features.shape[0] != n:
                raise CheckpointError(
                    f"synthetic text_features must be [N={n}, d], got {tuple(self.text_features.shape)}"
                )
            if not torch.isfinite(self.text_features).all():
                raise CheckpointError("synthetic text_features contain NaN or inf values")
        if self.nearest_token_ids is not None and tuple(self.nearest_token_ids.shape) != tuple(
            self.attention_mask.shape
        ):
            raise CheckpointError(
                f"nearest_token_ids shape {tuple(self.nearest_token_ids.shape)} does not match the attention mask "
                f"{tuple(self.attention_mask.shape)}"
            )
        if self.attention_mask.dtype not in (torch.int64, torch.int32, torch.bool):
            raise CheckpointError(f"attention_mask must be an integer tensor, got {self.attention_mask.dtype}")

    def describe(self) -> Dict[str, Any]:
        """Shape facts recorded in the metadata and checked on load."""
        return {
            "num_pairs": len(self),
            "image_shape": list(self.images.shape[1:]),
            "seq_len": int(self.text_embeds.shape[1]),
            "embed_dim": int(self.text_embeds.shape[2]),
        }

    # ------------------------------------------------------------------ persistence

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        tensors = {
            "images": self.images.detach().float().contiguous().cpu(),
            "text_embeds": self.text_embeds.detach().float().contiguous().cpu(),
            "attention_mask": self.attention_mask.detach().long().contiguous().cpu(),
        }
        if self.text_features is not None:
            tensors["text_features"] = self.text_features.detach().float().contiguous().cpu()
        if self.nearest_token_ids is not None:
            tensors["nearest_token_ids"] = self.nearest_token_ids.detach().long().contiguous().cpu()
        return tensors

    def save(self, directory: Path) -> Path:
        """Write ``synthetic.safetensors`` and ``synthetic.json`` into ``directory``, each atomically."""
        from safetensors.torch import save

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        metadata = dict(self.metadata)
        metadata.update(self.describe())
        metadata["format_version"] = FORMAT_VERSION
        metadata.setdefault("covmatch_version", __version__)
        atomic_write_bytes(directory / SYNTHETIC_TENSORS, save(self.state_tensors(), metadata={"format": "covmatch"}))
        atomic_write_bytes(directory / SYNTHETIC_METADATA, (json.dumps(metadata, indent=2) + "\n").encode())
        return directory

    @classmethod
    def load(cls, directory: Path, expect: Optional[Dict[str, Any]] = None) -> SyntheticSet:
        """Read a saved set back, validating tensors against the metadata and the metadata against ``expect``."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        tensors_path, meta_path = directory / SYNTHETIC_TENSORS, directory / SYNTHETIC_METADATA
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: synthetic-set directory not found")
        for path in (tensors_path, meta_path):
            if not path.is_file():
                raise CheckpointError(
                    f"{path}: missing (a synthetic set is {SYNTHETIC_TENSORS} + {SYNTHETIC_METADATA})"
                )
        try:
            metadata = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{meta_path}: malformed JSON ({brief(err)})") from None
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{meta_path}: expected a JSON object")
        try:
            tensors = load_file(str(tensors_path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{tensors_path}: unreadable or truncated safetensors file ({brief(err)})") from None
        missing = [k for k in ("images", "text_embeds", "attention_mask") if k not in tensors]
        if missing:
            raise CheckpointError(f"{tensors_path}: missing tensor(s) {', '.join(missing)}")
        try:
            syn = cls(
                tensors["images"],
                tensors["text_embeds"],
                tensors["attention_mask"],
                metadata,
                tensors.get("text_features"),
                tensors.get("nearest_token_ids"),
            )
        except CheckpointError as err:
            raise CheckpointError(f"{tensors_path}: {err}") from None
        for key, value in syn.describe().items():
            if key in metadata and metadata[key] != value:
                raise CheckpointError(
                    f"{meta_path}: field {key!r} says {metadata[key]!r} but the tensors have {value!r}"
                )
        if expect:
            check_metadata_matches(metadata, expect, where=str(meta_path))
        return syn


def check_metadata_matches(metadata: Dict[str, Any], expect: Dict[str, Any], *, where: str) -> None:
    """Every field of ``expect`` among MATCHING_FIELDS must equal the saved one (floats compared loosely)."""
    for key in MATCHING_FIELDS:
        if key not in expect:
            continue
        saved, wanted = metadata.get(key), expect[key]
        if _same(saved, wanted):
            continue
        raise CheckpointError(
            f"{where}: the synthetic set was made for {key}={saved!r}, but this run uses {key}={wanted!r}"
        )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6)
        except (TypeError, ValueError):
            return False
    return a == b


def pick_initial_pairs(pairs: Sequence[Tuple[str, str]], num_pairs: int, seed: int) -> List[int]:
    """Indices of ``num_pairs`` train pairs with distinct images (one random caption each), from ``seed``."""
    from covmatch.data.sources import pairs_by_image  # the data stack (PIL, torchvision) is optional

    by_image = pairs_by_image(pairs)
    if num_pairs > len(by_image):
        raise ConfigError(
            f"cannot draw {num_pairs} pairs with distinct images from a train split of {len(by_image)} images"
        )
    gen = torch.Generator().manual_seed(seed)
    images = list(by_image)
    chosen = torch.randperm(len(images), generator=gen)[:num_pairs].tolist()
    picks = []
    for i in chosen:
        options = by_image[images[i]]
        picks.append(options[int(torch.randint(len(options), (1,), generator=gen))])
    return picks


def synthetic_metadata(preset, model) -> Dict[str, Any]:
    """What a synthetic set made with ``preset`` and ``model`` is for (checked when it is loaded back)."""
    from covmatch.data.datasets import CLIP_MEAN, CLIP_STD  # optional data stack, as above

    return {
        "image_encoder": model.image.name,
        "text_encoder": model.text.name,
        "tokenizer": getattr(model.text.tokenizer, "name_or_path", model.text.name),
        "image_size": preset.image_size,
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
        "seq_len": preset.seq_len,
        "embed_dim": model.text.embed_dim,
        "dataset": preset.dataset,
        "preset": preset.name,
    }


def pick_balanced_pairs(dataset, num_pairs: int, seed: int) -> List[int]:
    """Indices of ``num_pairs`` train pairs with distinct images, balanced over the classes of the dataset's
    source (the rule of the class-balanced coreset); one ConfigError line when the source has no labels."""
    from covmatch.data.sampling import candidate_pairs, class_balanced_pairs  # optional data stack, as above

    candidates = candidate_pairs(dataset.pairs, seed)
    if num_pairs > len(candidates):
        raise ConfigError(
            f"cannot draw {num_pairs} pairs with distinct images from a train split of {len(candidates)} images"
        )
    label = getattr(dataset.source, "label", None)
    return class_balanced_pairs(dataset.pairs, candidates, num_pairs, seed, label, "--init balanced")


def init_synthetic_set(dataset, model, preset, num_pairs: int, seed: int, init: str = "random") -> SyntheticSet:
    """N real pairs of ``dataset`` (a PairDataset) as the starting synthetic set, drawn at random or, with
    ``init="balanced"``, balanced over its classes: pixels through the evaluation transform, captions through
    the text encoder's input-embedding table (docs/design.md, *Algorithm 1 as implemented*)."""
    if init not in INIT_METHODS:
        raise ConfigError(f"--init must be one of {', '.join(INIT_METHODS)}, got {init!r}")
    if init == "balanced":
        picks = pick_balanced_pairs(dataset, num_pairs, seed)
    else:
        picks = pick_initial_pairs(dataset.pairs, num_pairs, seed)
    return real_pairs_set(dataset, model, preset, picks, init_seed=seed, init=init)


def real_pairs_set(dataset, model, preset, picks: Sequence[int], **metadata: Any) -> SyntheticSet:
    """The pairs ``picks`` of ``dataset`` (a PairDataset) as a synthetic set at iteration 0: pixels through the
    evaluation transform, captions through the text encoder's input-embedding table; ``metadata`` added to the
    set's (how the pairs were chosen)."""
    from covmatch.data.datasets import CLIP_MEAN, CLIP_STD, image_transform  # optional data stack

    picks = list(picks)
    transform = image_transform(preset.image_size, train=False, mean=CLIP_MEAN, std=CLIP_STD)
    images = torch.stack([transform(dataset.source.load_image(dataset.pairs[i][0])) for i in picks])
    info = synthetic_metadata(preset, model)
    info.update({**metadata, "init_pairs": picks, "iteration": 0})
    return SyntheticSet.from_real(
        images, dataset.input_ids[picks], dataset.attention_mask[picks], model.text.embedding_table, info
    )
