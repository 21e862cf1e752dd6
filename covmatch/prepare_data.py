"""``covmatch prepare-data``: decode a dataset's images once into a cache that ``covmatch-distill`` and
``covmatch-eval`` read with ``--data-cache DIR`` (``covmatch.data.cache``).

    covmatch prepare-data --preset paper --dataset karpathy --ann-root ann/ --image-root images/ --data-cache cache/

Bad input prints one line ``covmatch prepare-data: error: ...`` and exits with code 2; nothing is left behind.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from tqdm.auto import tqdm

from covmatch._version import __version__
from covmatch.cli_args import OneLineArgumentParser, add_preset_flags, preset_overrides
from covmatch.data.build import build_source
from covmatch.data.cache import build_cache, cache_bytes, cache_side
from covmatch.data.generated import GENERATED_DATASETS
from covmatch.data.sources import SPLITS
from covmatch.errors import EXIT_BAD_INPUT, ConfigError, CovMatchError, one_line
from covmatch.presets import PRESETS, get_preset
from covmatch.settings import CommonSettings, resolved_workers, settings_of

__all__ = ["build_parser", "main"]

PROG = "covmatch prepare-data"
PRESET_FIELDS = ("dataset", "image_size", "train_augment")  # what the stored side depends on


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog=PROG,
        description="Decode a dataset's images once into a memory-mapped uint8 cache (the preset's image size plus "
        "the margin its random crop needs) that covmatch-distill and covmatch-eval read with --data-cache.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="named configuration")
    add_preset_flags(p, PRESET_FIELDS)
    for info in settings_of(CommonSettings):
        if info.name in ("ann_root", "image_root", "data_dir"):
            p.add_argument(info.flag, dest=info.name, type=Path, default=None, metavar=info.metavar, help=info.help)
    p.add_argument("--data-seed", type=int, default=0, metavar="N", help="seed of the embedded dataset's draw")
    p.add_argument(
        "--data-cache", type=Path, required=True, metavar="DIR", help="the cache folder to write (refused if it "
        "exists, unless --overwrite)"
    )  # fmt: skip
    p.add_argument("--splits", default=",".join(SPLITS), metavar="LIST", help="comma-separated splits to decode")
    p.add_argument("--overwrite", action="store_true", help="rebuild an existing cache in --data-cache")
    p.add_argument(
        "--workers", type=int, default=None, metavar="N",
        help="decoding worker processes (default: cores - 1, up to 8, for files; 0 for the embedded dataset)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        preset = get_preset(args.preset, **preset_overrides(args, PRESET_FIELDS))
        preset.check()
        splits = [s.strip() for s in args.splits.split(",") if s.strip()]
        unknown = [s for s in splits if s not in SPLITS]
        if unknown or not splits:
            raise ConfigError(f"--splits: unknown split {unknown[0]!r}; choose from {', '.join(SPLITS)}" if unknown
                              else "--splits names no split")  # fmt: skip
        if args.workers is not None and args.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {args.workers}")
        source = build_source(
            preset, ann_root=args.ann_root, image_root=args.image_root, data_dir=args.data_dir, seed=args.data_seed
        )
        side = cache_side(preset.image_size, augment=preset.train_augment)
        workers = resolved_workers(args.workers, decodes_files=preset.dataset not in GENERATED_DATASETS)

        def bar(total: int, desc: str):
            return tqdm(total=total, desc=desc, unit="img", disable=args.no_progress, leave=False)

        start = time.perf_counter()
        manifest = build_cache(
            source, args.data_cache, side=side, splits=splits, workers=workers, overwrite=args.overwrite,
            progress=bar, describe={"preset": preset.name, "image_size": preset.image_size},
        )  # fmt: skip
    except ConfigError as err:
        names = {"data_cache": "--data-cache", "overwrite": "--overwrite", "image_size": "--image-size"}
        print(f"{PROG}: error: {one_line(err.naming(names))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CovMatchError as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    counts = {split: entry["count"] for split, entry in manifest["splits"].items()}
    size = cache_bytes(counts, side) / 2**30
    listed = ", ".join(f"{split} {n:,}" for split, n in counts.items())
    print(f"{PROG}: {listed} images at {side} x {side} ({size:.2f} GiB) in {time.perf_counter() - start:.0f} s "
          f"-> {args.data_cache}/")  # fmt: skip
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
