"""``covmatch analyze RUN``: the diagnostics of a distillation run, as a table and plots.

    covmatch analyze runs/demo/distill [--out DIR] [--real-pairs 2048] [--image-encoder NAME --image-weights W]

- **Feature stability** of the online model, the linear-regime assumption the method rests on: the cosine
  similarity between features of the same real images right after a reset and after each online step of
  one reset cycle (replayed from the run's configuration; 1 throughout with a fixed model).
- **How closely the set matches**, at the pretrained encoders every evaluation starts from and at any other
  image encoder given: ``||rho C_T - C_S||^2 / ||rho C_T||^2`` against a large real sample, and the mean
  gaps ``||mu_T - mu_S||^2 / ||mu_T||^2`` of image and text features, for the run's iteration-0 set and
  its final set.
- **How far the set moved** from its iteration-0 state: pixel and token-embedding distances (relative to
  the initial norms) and the share of caption tokens whose nearest vocabulary token changed.

Writes ``analysis.json``, ``analysis.md``, ``stability.png`` and ``movement.png`` into ``--out`` (default:
RUN/analysis). Bad input is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from covmatch.cli_args import OneLineArgumentParser
from covmatch.data.build import build_source, build_train_dataset
from covmatch.devices import resolve_device
from covmatch.distill.config import DistillConfig
from covmatch.distill.engine import Distiller
from covmatch.distill.streams import stream_generator
from covmatch.errors import EXIT_BAD_INPUT, CheckpointError, CovMatchError, one_line
from covmatch.loss import cross_covariance
from covmatch.presets import Preset
from covmatch.pretrain import pretrained_dual_encoder
from covmatch.synthetic import SyntheticSet, atomic_write_bytes

__all__ = ["run_config", "encode_pairs", "feature_stability", "match_errors", "movement", "analyze", "main"]

PROG = "covmatch analyze"


def run_config(syn: SyntheticSet, where: str) -> DistillConfig:
    """The DistillConfig a saved set was distilled with (from its metadata), for replays."""
    hp = syn.metadata.get("hyperparameters")
    if not isinstance(hp, dict) or not isinstance(hp.get("preset"), dict):
        raise CheckpointError(f"{where}: synthetic.json has no 'hyperparameters' of a covmatch run")
    preset_fields = {f.name for f in dataclasses.fields(Preset)}
    preset = dict(hp["preset"])
    preset["text_config_overrides"] = tuple(tuple(p) for p in preset.get("text_config_overrides", ()))
    config_fields = {f.name for f in dataclasses.fields(DistillConfig)} - {"preset", "out"}
    settings = {k: v for k, v in hp.items() if k in config_fields}
    for key in ("ann_root", "image_root", "data_dir", "deepspeed_config"):
        if settings.get(key) is not None:
            settings[key] = Path(settings[key])
    settings.update(resume=False, auto_resume=False, overwrite=False, progress=False, zero=0, deepspeed_config=None)
    return DistillConfig(preset=Preset(**{k: v for k, v in preset.items() if k in preset_fields}), **settings)


@torch.no_grad()
def encode_pairs(model, dataset, indices: Sequence[int], device, batch: int = 256):
    """Encoder features (float64, on the CPU) of pairs ``indices`` of a PairDataset."""
    images, texts = [], []
    for start in range(0, len(indices), batch):
        items = [dataset[int(i)] for i in indices[start : start + batch]]
        pixels = torch.stack([it[0] for it in items]).to(device)
        ids, mask = torch.stack([it[1] for it in items]).to(device), torch.stack([it[2] for it in items]).to(device)
        images.append(model.image(pixels).double().cpu())
        texts.append(model.text.encode_ids(ids, mask).double().cpu())
    return torch.cat(images), torch.cat(texts)


def feature_stability(config: DistillConfig, probe_pairs: int = 256) -> Dict[str, List[float]]:
    """Mean cosine similarity of probe features after each online step of the first reset cycle to those
    right after the reset (index 0), for image and text features; a fixed model stays at 1."""
    steps = config.preset.reset_every
    if config.online == "fixed":
        return {"image": [1.0] * (steps + 1), "text": [1.0] * (steps + 1)}
    d = Distiller(dataclasses.replace(config, out=None), log=lambda _m: None)
    try:
        probe = torch.randperm(len(d.target_data), generator=torch.Generator().manual_seed(7))[:probe_pairs]
        d.online.reset(stream_generator(config.seed, "reset", 0, device=d.device))
        d.model.eval()
        base = encode_pairs(d.model, d.target_data, probe.tolist(), d.device)
        out: Dict[str, List[float]] = {"image": [1.0], "text": [1.0]}
        for t in range(steps):
            d._online_update(None, t)
            now = encode_pairs(d.model, d.target_data, probe.tolist(), d.device)
            for key, a, b in (("image", base[0], now[0]), ("text", base[1], now[1])):
                out[key].append(float(F.cosine_similarity(a, b, dim=1).mean()))
        return out
    finally:
        d.close()


@torch.no_grad()
def _set_features(model, syn: SyntheticSet, device):
    image = model.image(syn.images.to(device)).double().cpu()
    if syn.text_features is not None:
        return image, syn.text_features.double()
    return image, model.text(syn.text_embeds.to(device), syn.attention_mask.to(device)).double().cpu()


def _relative_gap(target: torch.Tensor, estimate: torch.Tensor) -> float:
    return float((target - estimate).pow(2).sum() / target.pow(2).sum())


def spread(features: torch.Tensor) -> float:
    """sqrt of the trace of the features' covariance: how far the rows scatter around their mean."""
    centred = features.double() - features.double().mean(0)
    return float(centred.pow(2).sum().div(features.shape[0] - 1).sqrt())


def coupling(image: torch.Tensor, text: torch.Tensor) -> float:
    """‖C‖_F / (spread(image) spread(text)), in [0, 1]: how much of the two spreads the pairing couples."""
    c = cross_covariance(image.double(), text.double()).double()
    return float(c.norm() / (spread(image) * spread(text)))


def match_errors(model, real_image, real_text, sets: Dict[str, SyntheticSet], rho: float, device) -> dict:
    """Relative covariance error and feature-mean gaps of each set against the real sample, and how its
    covariance's size compares with the real one's: ``cov_scale`` = ‖C_S‖/‖C_T‖ is exactly the product of
    ``image_spread``, ``text_spread`` and ``coupling``, each the set's value over the real sample's."""
    c_t = cross_covariance(real_image, real_text)
    target = rho * c_t
    real_spreads = spread(real_image), spread(real_text)
    real_coupling = coupling(real_image, real_text)
    out = {}
    for name, syn in sets.items():
        image, text = _set_features(model, syn, device)
        c_s = cross_covariance(image, text)
        out[name] = {
            "cov_error": float((target - c_s).pow(2).sum() / target.pow(2).sum()),
            "image_mean_gap": _relative_gap(real_image.mean(0), image.mean(0)),
            "text_mean_gap": _relative_gap(real_text.mean(0), text.mean(0)),
            "cov_scale": float(c_s.double().norm() / c_t.double().norm()),
            "image_spread": spread(image) / real_spreads[0],
            "text_spread": spread(text) / real_spreads[1],
            "coupling": coupling(image, text) / real_coupling,
        }
    return out


def movement(initial: SyntheticSet, final: SyntheticSet) -> dict:
    """How far the final set is from its iteration-0 state, per pair and overall."""
    pixel = (final.images - initial.images).flatten(1).norm(dim=1) / initial.images.flatten(1).norm(dim=1)
    mask = final.attention_mask.bool()
    token = (final.text_embeds - initial.text_embeds).norm(dim=-1)[mask] / initial.text_embeds.norm(dim=-1)[mask]
    out = {
        "pixel_relative_distance": {"mean": float(pixel.mean()), "max": float(pixel.max())},
        "token_relative_distance": {"mean": float(token.mean()), "max": float(token.max())},
        "per_pair_pixel": pixel.tolist(),
        "per_token": token.tolist(),
    }
    if final.nearest_token_ids is not None and initial.nearest_token_ids is not None:
        changed = (final.nearest_token_ids != initial.nearest_token_ids) & mask
        out["changed_token_share"] = float(changed.sum()) / max(1, int(mask.sum()))
    return out


def modality_steps(run: Path) -> Optional[dict]:
    """The relative step of each modality per iteration (``||delta|| / ||x||``, as the run logged it): first
    logged, mean and last, and how many times the faster modality moves the slower one; None for a run whose
    log has none (made before they were logged, or distilling one modality)."""
    log = run / "log.jsonl"
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    records = [r for r in records if "rel_step_images" in r and "rel_step_captions" in r]
    if not records:
        return None
    out = {}
    for key, name in (("rel_step_images", "images"), ("rel_step_captions", "captions")):
        values = [r[key] for r in records]
        out[name] = {"first": values[0], "mean": sum(values) / len(values), "last": values[-1]}
    low, high = sorted((out["images"]["mean"], out["captions"]["mean"]))
    out["ratio"] = high / low if low > 0 else float("inf")
    out["first_iteration"] = records[0]["iteration"]
    return out


def analyze(run: Path, out: Path, *, real_pairs: int, other_encoders: Sequence[tuple], device_name: str) -> dict:
    """Every diagnostic of ``run``, written under ``out``; returns what analysis.json holds."""
    final = SyntheticSet.load(run)
    initial_dir = run / "initial"
    if not (initial_dir / "synthetic.safetensors").is_file():
        raise CheckpointError(f"{initial_dir}: no iteration-0 set (runs made before it was saved have none)")
    initial = SyntheticSet.load(initial_dir)
    config = run_config(final, str(run / "synthetic.json"))
    preset, device = config.preset, resolve_device(device_name)
    sets = {"iteration 0": initial, f"iteration {final.metadata.get('iteration')}": final}
    # the run's own encoder with its timm arguments; the others as timm builds them by default
    encoders = [(preset.image_encoder, preset.image_weights, preset.image_encoder_kwargs)]
    encoders += [(name, weights, "") for name, weights in other_encoders]
    source = build_source(
        preset, ann_root=config.ann_root, image_root=config.image_root, data_dir=config.data_dir, seed=config.data_seed
    )
    match = {}
    for name, weights, kwargs in encoders:
        weights = preset.image_weights if weights is None else weights
        model_preset = dataclasses.replace(
            preset, image_encoder=name, image_weights=weights, image_encoder_kwargs=kwargs
        )
        model = pretrained_dual_encoder(model_preset).to(device).eval()
        data = build_train_dataset(source, model.text.tokenizer, preset, augment=False)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(123))[:real_pairs].tolist()
        real_image, real_text = encode_pairs(model, data, order, device)
        match[name] = match_errors(model, real_image, real_text, sets, config.rho, device)
    result = {
        "run": str(run),
        "real_pairs": real_pairs,
        "online": config.online,
        "rho": config.rho,
        "reset_every": preset.reset_every,
        "feature_stability": feature_stability(config),
        "match": match,
        "movement": movement(initial, final),
        "modality_steps": modality_steps(run),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "analysis.json", (json.dumps(result, indent=2) + "\n").encode())
    atomic_write_bytes(out / "analysis.md", render(result).encode())
    _plots(result, out)
    return result


def render(result: dict) -> str:
    """analysis.md: the three diagnostics as tables."""
    stab = result["feature_stability"]
    lines = [f"# Analysis of {result['run']}", "", f"## Feature stability (online: {result['online']})", "",
             "| online steps since reset | image cosine | text cosine |", "|---|---|---|"]  # fmt: skip
    for t, (a, b) in enumerate(zip(stab["image"], stab["text"])):
        lines.append(f"| {t} | {a:.4f} | {b:.4f} |")
    lines += ["", f"## Match against {result['real_pairs']} real pairs", "",
              f"cov scale = ‖C_S‖/‖C_T‖ (the loss asks for ρ = {result['rho']}) = image spread × text spread × "
              "coupling, each relative to the real sample's.", "",
              "| image encoder | set | cov error | image mean gap | text mean gap | cov scale | image spread | "
              "text spread | coupling |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for encoder, sets in result["match"].items():
        for name, m in sets.items():
            lines.append(
                f"| {encoder} | {name} | {m['cov_error']:.4f} | {m['image_mean_gap']:.4f} | {m['text_mean_gap']:.4f} "
                f"| {m['cov_scale']:.3f} | {m['image_spread']:.3f} | {m['text_spread']:.3f} | {m['coupling']:.3f} |"
            )
    mv = result["movement"]
    lines += ["", "## Movement from iteration 0", "",
              f"- pixels: relative distance mean {mv['pixel_relative_distance']['mean']:.4f}, "
              f"max {mv['pixel_relative_distance']['max']:.4f}",
              f"- token embeddings: relative distance mean {mv['token_relative_distance']['mean']:.4f}, "
              f"max {mv['token_relative_distance']['max']:.4f}"]  # fmt: skip
    if "changed_token_share" in mv:
        lines.append(f"- caption tokens whose nearest vocabulary token changed: {mv['changed_token_share']:.1%}")
    steps = result.get("modality_steps")
    if steps:
        lines += ["", "## Relative step per iteration, ||delta|| / ||x||", "",
                  "| modality | first logged | mean | last |", "|---|---|---|---|"]  # fmt: skip
        for name in ("images", "captions"):
            m = steps[name]
            lines.append(f"| {name} | {m['first']:.3g} | {m['mean']:.3g} | {m['last']:.3g} |")
        note = " (under 1/30: the slower modality is barely distilled)" if steps["ratio"] > 30 else ""
        lines += ["", f"The faster modality moves {steps['ratio']:.3g} times as far per step as the slower{note}."]
    return "\n".join(lines) + "\n"


def _plots(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stab = result["feature_stability"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(stab["image"], label="image features")
    ax.plot(stab["text"], label="text features")
    ax.set_xlabel("online steps since reset")
    ax.set_ylabel("cosine similarity to the reset state")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "stability.png", dpi=150)
    plt.close(fig)
    mv = result["movement"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    axes[0].hist(mv["per_pair_pixel"], bins=30)
    axes[0].set_xlabel("pixel distance / initial norm (per pair)")
    axes[1].hist(mv["per_token"], bins=30)
    axes[1].set_xlabel("token-embedding distance / initial norm (per token)")
    fig.tight_layout()
    fig.savefig(out / "movement.png", dpi=150)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a covmatch-distill --out directory")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="where to write (default: RUN/analysis)")
    p.add_argument(
        "--real-pairs", type=int, default=2048, metavar="N", help="real train pairs behind the reference statistics"
    )
    p.add_argument(
        "--image-encoder", action="append", default=[], metavar="TIMM_NAME",
        help="another timm image encoder (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--image-weights", action="append", default=[], metavar="FILE", help="its weights (file, 'cache' or preset's)"
    )
    p.add_argument("--device", default="auto", metavar="DEVICE", help="auto, cpu, cuda or cuda:K")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.real_pairs < 2:
            raise CovMatchError(f"--real-pairs must be >= 2, got {args.real_pairs}")
        if args.image_weights and len(args.image_weights) != len(args.image_encoder):
            raise CovMatchError("give --image-weights once per --image-encoder, or not at all")
        weights = args.image_weights or [None] * len(args.image_encoder)  # None: the run's preset's weights
        out = args.out or args.run / "analysis"
        result = analyze(args.run, out, real_pairs=args.real_pairs,
                         other_encoders=list(zip(args.image_encoder, weights)), device_name=args.device)  # fmt: skip
    except CovMatchError as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(render(result))
    print(f"{PROG}: wrote {out}/analysis.json, analysis.md, stability.png, movement.png")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
