"""``covmatch export RUN --format hf|lors --out DIR``: a distilled set in a form other code reads, with a
dataset card.

- ``hf``: a Hugging Face ``datasets`` imagefolder, ``DIR/train/NNNN.png`` (each synthetic image
  denormalised to RGB) and ``DIR/train/metadata.jsonl`` (``file_name``, the caption decoded to its nearest
  vocabulary tokens as ``text``), with the captions' token embeddings and attention mask in
  ``DIR/text_embeddings.safetensors``. Loads offline with ``datasets.load_dataset("imagefolder", data_dir=DIR)``.
- ``lors``: the tensors LoRS / MTT-VL evaluation code reads: ``images_best.pt`` ([N, 3, H, W], normalised with
  the CLIP mean and std those codebases use) and ``texts_best.pt`` ([N, d], the distilling text encoder's
  output features of each synthetic caption), both loadable with ``torch.load(path, weights_only=True)``.

Every export has a ``README.md`` dataset card: how the set was made (encoders, N, every hyperparameter,
data seed, covmatch version), how to load it, and the evaluation results found next to the run. The export
is written to a temporary folder and moved into place; an existing ``DIR`` is refused unless it is an
earlier export and ``--overwrite`` is given. Bad input is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from covmatch._version import __version__
from covmatch.cli_args import OneLineArgumentParser
from covmatch.data.datasets import CLIP_MEAN, CLIP_STD
from covmatch.errors import EXIT_BAD_INPUT, ConfigError, CovMatchError, one_line
from covmatch.eval.results import load_result
from covmatch.synthetic import SYNTHETIC_METADATA, SyntheticSet, atomic_write_bytes
from covmatch.visualize import decode_token_ids, denormalize

__all__ = ["FORMATS", "export", "find_results", "dataset_card", "main"]

PROG = "covmatch export"
FORMATS = ("hf", "lors")
EXPORT_MARK = "<!-- written by covmatch export -->"  # an export --overwrite may replace


def _preset_fields(syn: SyntheticSet) -> dict:
    hp = syn.metadata.get("hyperparameters") or {}
    return hp.get("preset") or {}


def _text_encoder(syn: SyntheticSet):
    """The distilling text encoder at its pretrained weights (what every evaluation starts from)."""
    from covmatch.models.text import TextEncoder

    p = _preset_fields(syn)
    return TextEncoder.create(
        syn.metadata.get("text_encoder") or p.get("text_encoder"),
        num_layers=p.get("text_layers"),
        pooling=p.get("text_pooling", "cls"),
        random_init=bool(p.get("text_random_init", False)),
        config_overrides=dict(tuple(kv) for kv in p.get("text_config_overrides", ())),
    )


def captions(syn: SyntheticSet, text_encoder) -> List[str]:
    """Each synthetic caption as its nearest vocabulary tokens (empty strings without them)."""
    if syn.nearest_token_ids is None:
        return [""] * len(syn)
    return decode_token_ids(syn.nearest_token_ids, syn.attention_mask, text_encoder.tokenizer)


@torch.no_grad()
def text_features(syn: SyntheticSet, text_encoder, batch: int = 256) -> torch.Tensor:
    """[N, d] output features of the synthetic captions (the learned ones under --text-features)."""
    if syn.text_features is not None:
        return syn.text_features.float()
    text_encoder.eval()
    out = [
        text_encoder(syn.text_embeds[i : i + batch], syn.attention_mask[i : i + batch]).float()
        for i in range(0, len(syn), batch)
    ]
    return torch.cat(out)


def find_results(run: Path) -> List[dict]:
    """covmatch-eval results of this set: in folders inside the run, or beside it naming it as --synthetic."""
    found = []
    candidates = sorted(run.glob("*/results.json")) + sorted(run.parent.glob("*/results.json"))
    for path in dict.fromkeys(candidates):
        try:
            result = load_result(path.parent)
        except CovMatchError:
            continue
        source = (result.get("config") or {}).get("synthetic")
        inside = path.parent.parent == run
        if inside or (source is not None and Path(source).resolve() == run.resolve()):
            found.append({**result, "path": str(path)})
    return found


def _results_md(results: Sequence[dict]) -> List[str]:
    if not results:
        return ["No covmatch-eval results were found next to the run."]
    lines = ["| results | split | encoders | runs | mean recall | i2t R@1 | t2i R@1 |", "|---|---|---|---|---|---|---|"]
    for r in results:
        s, config = r["summary"], r.get("config") or {}
        encoders = f"{config.get('image_encoder', '?')} + {config.get('text_encoder', '?')}"
        cells = [Path(r["path"]).parent.name, r.get("split", "test"), encoders, str(len(r["runs"]))]
        cells += [f"{s[k]['mean']:.1f} ± {s[k]['std']:.1f}" for k in ("mean", "i2t_R@1", "t2i_R@1") if k in s]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def dataset_card(syn: SyntheticSet, fmt: str, results: Sequence[dict], files: Dict[str, str]) -> str:
    """The README.md of an export: provenance, loading code, tensor notes, evaluation results."""
    meta = syn.metadata
    hp = dict(meta.get("hyperparameters") or {})
    resolved = hp.pop("resolved", {})
    n, (h, w) = len(syn), syn.images.shape[2:]
    front = ["---", "tags:", "- dataset-distillation", "- covmatch", "- synthetic", "size_categories:", "- n<1K"]
    if n >= 1000:
        front[-1] = "- 1K<n<10K"
    lines = front + ["---", EXPORT_MARK, "", f"# CovMatch synthetic set: {n} image–text pairs", ""]
    lines += [
        f"Distilled with covmatch {meta.get('covmatch_version', '?')} (exported with {__version__}) by matching the "
        "cross-covariance of image and text features between real and synthetic pairs (CovMatch, NeurIPS 2025).",
        "",
        "## How it was made",
        "",
        f"- Image encoder: `{meta.get('image_encoder')}` at {h}×{w} px; text encoder: `{meta.get('text_encoder')}` "
        f"(captions: {meta.get('seq_len')} token embeddings of dimension {meta.get('embed_dim')}; "
        f"text regime: {meta.get('text_mode', 'embeddings')}).",
        f"- N = {n} pairs after {meta.get('iteration')} iterations; rho {resolved.get('rho')}, "
        f"lam {resolved.get('lam')}; distillation seed {hp.get('seed')}, data seed {meta.get('data_seed')}.",
        f"- Pixel normalisation of the set: mean {meta.get('mean')}, std {meta.get('std')}.",
        "",
        "Every hyperparameter of the run:",
        "",
        "```json",
        json.dumps(hp, indent=1, sort_keys=True),
        "```",
        "",
        "## Files",
        "",
        *[f"- `{name}`: {what}" for name, what in files.items()],
        "",
        "## Loading",
        "",
        "```python",
    ]
    if fmt == "hf":
        lines += [
            "from datasets import load_dataset",
            "from safetensors.torch import load_file",
            "",
            'data = load_dataset("imagefolder", data_dir="THIS_FOLDER")["train"]  # image, text',
            'captions = load_file("THIS_FOLDER/text_embeddings.safetensors")  # text_embeds, attention_mask, ...',
        ]
    else:
        lines += [
            "import torch",
            "",
            'images = torch.load("THIS_FOLDER/images_best.pt", weights_only=True)  # [N, 3, H, W]',
            'texts = torch.load("THIS_FOLDER/texts_best.pt", weights_only=True)  # [N, d]',
        ]
    lines += ["```", "", "## Evaluation results", "", *_results_md(results), ""]
    return "\n".join(lines)


def _write_hf(syn: SyntheticSet, text_encoder, folder: Path) -> Dict[str, str]:
    from PIL import Image
    from safetensors.torch import save_file

    train = folder / "train"
    train.mkdir(parents=True)
    pixels = denormalize(syn.images.float(), syn.metadata["mean"], syn.metadata["std"])
    rgb = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    texts = captions(syn, text_encoder)
    with open(train / "metadata.jsonl", "w") as fh:
        for i, (image, text) in enumerate(zip(rgb, texts)):
            name = f"{i:05d}.png"
            Image.fromarray(image).save(train / name)
            fh.write(json.dumps({"file_name": name, "text": text, "index": i}) + "\n")
    tensors = {"text_embeds": syn.text_embeds.float().contiguous(), "attention_mask": syn.attention_mask.long()}
    if syn.nearest_token_ids is not None:
        tensors["nearest_token_ids"] = syn.nearest_token_ids.long()
    if syn.text_features is not None:
        tensors["text_features"] = syn.text_features.float().contiguous()
    save_file(tensors, str(folder / "text_embeddings.safetensors"), metadata={"format": "covmatch-export"})
    return {
        "train/NNNNN.png": "the synthetic images, denormalised and clamped to 8-bit RGB (the optimised float "
        "pixels, unrounded, are in the original run's synthetic.safetensors)",
        "train/metadata.jsonl": "file_name, text (each caption decoded to its nearest vocabulary tokens), index",
        "text_embeddings.safetensors": "text_embeds [N, L, E] (the learned captions: token embeddings the text "
        "encoder reads through inputs_embeds), attention_mask [N, L], nearest_token_ids [N, L]"
        + (", text_features [N, d]" if syn.text_features is not None else ""),
        SYNTHETIC_METADATA: "the set's full metadata as covmatch wrote it",
    }


def _write_lors(syn: SyntheticSet, text_encoder, folder: Path) -> Dict[str, str]:
    if syn.text_features is None and _preset_fields(syn).get("text_random_init"):
        raise ConfigError(
            "--format lors: the set's text encoder was randomly initialised (preset field text_random_init), so "
            "the text features it would export cannot be reproduced; use --format hf"
        )
    folder.mkdir(parents=True)

    def channels(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1)

    rgb = syn.images.float() * channels(syn.metadata["std"]) + channels(syn.metadata["mean"])  # unclamped
    images = (rgb - channels(CLIP_MEAN)) / channels(CLIP_STD)
    features = text_features(syn, text_encoder)
    torch.save(images.contiguous(), folder / "images_best.pt")
    torch.save(features.contiguous(), folder / "texts_best.pt")
    return {
        "images_best.pt": f"float32 {list(images.shape)}: the synthetic images normalised with the CLIP mean "
        f"{list(CLIP_MEAN)} and std {list(CLIP_STD)} (LoRS / MTT-VL's input normalisation)",
        "texts_best.pt": f"float32 {list(features.shape)}: the synthetic captions as output features of the "
        f"distilling text encoder `{syn.metadata.get('text_encoder')}` at its pretrained weights "
        f"({_preset_fields(syn).get('text_pooling', 'cls')} pooling)"
        + (" (learned directly: a --text-features run)" if syn.text_features is not None else ""),
        SYNTHETIC_METADATA: "the set's full metadata as covmatch wrote it",
    }


def export(run: Path, fmt: str, out: Path, *, overwrite: bool = False) -> Path:
    """Export the set in ``run`` as ``fmt`` into ``out`` (see the module docstring); returns ``out``."""
    run, out = Path(run), Path(out)
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        card = out / "README.md"
        earlier = card.is_file() and EXPORT_MARK in card.read_text(errors="ignore")
        if not (overwrite and earlier):
            hint = "add --overwrite to replace it" if earlier else "it is not an earlier export; pick another"
            raise ConfigError(f"--out {out}: exists and is not empty ({hint})")
    syn = SyntheticSet.load(run)
    text_encoder = _text_encoder(syn)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        folder = staging / "export"
        files = (_write_hf if fmt == "hf" else _write_lors)(syn, text_encoder, folder)
        (folder / SYNTHETIC_METADATA).write_text(json.dumps(syn.metadata, indent=2) + "\n")
        atomic_write_bytes(folder / "README.md", dataset_card(syn, fmt, find_results(run), files).encode())
        if out.exists():
            old = staging / "previous"
            out.rename(old)
        folder.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog=PROG,
        description="Export a distilled set as a Hugging Face imagefolder (hf) or as the tensors LoRS / MTT-VL "
        "evaluation code reads (lors), with a dataset card (README.md).",
    )
    p.add_argument("run", type=Path, help="a distillation run (or any folder with synthetic.safetensors)")
    p.add_argument("--format", required=True, choices=FORMATS, help="hf: a datasets imagefolder; lors: .pt tensors")
    p.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="the export folder (must not exist, or be empty)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export(args.run, args.format, args.out, overwrite=args.overwrite)
    except CovMatchError as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{PROG}: wrote {out} ({args.format}; README.md is its dataset card)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
