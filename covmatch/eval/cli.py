"""``covmatch-eval``: train fresh dual encoders on a synthetic set or a coreset and report retrieval recall.

    covmatch-eval --synthetic runs/demo/distill --out runs/demo/eval-covmatch
    covmatch-eval --coreset random --num-pairs 100 --out runs/demo/eval-random
    covmatch-eval --compare runs/demo/eval-covmatch runs/demo/eval-random --out runs/demo/compare

Bad input prints one line ``covmatch-eval: error: ...`` and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from covmatch._version import __version__
from covmatch.cli_args import (
    OneLineArgumentParser,
    add_precision_flags,
    add_preset_flags,
    add_setting_flags,
    flag_dests,
    flags_of,
    parse_with_config,
    precision_from,
    preset_fields,
    preset_overrides,
)
from covmatch.errors import EXIT_BAD_INPUT, EXIT_DIVERGED, ConfigError, CovMatchError, DivergedError, one_line
from covmatch.presets import DATA, ENCODERS, EVALUATION, PRESETS, get_preset
from covmatch.settings import RUNTIME, settings_of

from .config import PROTOCOL, WHAT, EvalConfig
from .results import bar_chart, load_result, results_table
from .runner import evaluate

__all__ = ["build_parser", "config_from_args", "main"]

PROG = "covmatch-eval"
# preset fields covmatch-eval sets besides its training protocol (EVALUATION) and dataset (DATA)
ENCODER_FIELDS = ("image_encoder", "image_weights", "image_encoder_kwargs", "text_encoder", "text_layers")
PRESET_FIELDS = ("num_pairs", *preset_fields(EVALUATION), *ENCODER_FIELDS, *preset_fields(DATA))
FLAGS = flags_of(EvalConfig)  # field -> flag: what errors from EvalConfig and the preset are renamed to


def build_parser() -> argparse.ArgumentParser:
    """covmatch-eval's flags: generated from EvalConfig's and the preset's fields (``covmatch.settings``)."""
    p = OneLineArgumentParser(
        prog=PROG,
        description="Evaluate a distilled set (or a coreset baseline) by training fresh dual encoders on it and "
        "measuring image-text retrieval on the test split (final epoch; --select-on-val picks the epoch on val).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "--config", type=Path, default=None, metavar="FILE", help="JSON/YAML settings by flag name (flags here win)"
    )
    groups = {WHAT: p.add_mutually_exclusive_group()}
    for name in (PROTOCOL, EVALUATION, ENCODERS, DATA, RUNTIME):
        groups[name] = p.add_argument_group(name)
    groups[WHAT].add_argument(
        "--compare", type=Path, nargs="+", metavar="DIR", help="result directories to tabulate and plot together"
    )
    groups[PROTOCOL].add_argument("--preset", choices=sorted(PRESETS), default="demo", help="named configuration")
    add_preset_flags(groups[PROTOCOL], ("num_pairs",), names={"num_pairs": "--num-pairs"})
    add_preset_flags(groups[EVALUATION], preset_fields(EVALUATION))
    add_preset_flags(groups[ENCODERS], ENCODER_FIELDS)
    add_preset_flags(groups[DATA], preset_fields(DATA))
    add_precision_flags(groups[RUNTIME])
    add_setting_flags(groups, EvalConfig)
    groups[RUNTIME].add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The evaluation the parsed flags describe (preset fields overridden by the flags that were set)."""
    preset = get_preset(args.preset, **preset_overrides(args, PRESET_FIELDS))
    flagged = {info.name: getattr(args, info.name) for info in settings_of(EvalConfig) if info.group is not None}
    return EvalConfig(preset=preset, precision=precision_from(args), progress=not args.no_progress, **flagged)


def config_file_defaults(data: dict, path: Path) -> dict:
    """Argument defaults from a --config file of flags by name (``lr-encoder`` or ``lr_encoder``)."""
    dests = flag_dests(build_parser())
    unknown = [key for key in data if key not in dests]
    if unknown:
        raise ConfigError(f"--config {path}: unknown key {unknown[0]!r}")
    return {dests[key]: value for key, value in data.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse_with_config(build_parser(), argv, config_file_defaults)
        chosen = [flag for flag, value in (("--synthetic", args.synthetic), ("--coreset", args.coreset),
                                           ("--compare", args.compare)) if value]  # fmt: skip
        if len(chosen) != 1:
            raise ConfigError("give exactly one of --synthetic, --coreset, --compare (here or in --config)")
        if args.out is None:
            raise ConfigError("--out is required (on the command line or in --config)")
        out = Path(args.out)
        if args.compare:
            results = [load_result(d) for d in args.compare]
            out.mkdir(parents=True, exist_ok=True)
            (out / "comparison.md").write_text(results_table(results))
            bar_chart(results, out / "comparison.png")
            print(results_table(results))
            print(f"{PROG}: wrote {out}/comparison.md and {out}/comparison.png")
            return 0
        result = evaluate(config_from_args(args))
    except CovMatchError as err:
        err = err.naming(FLAGS) if isinstance(err, ConfigError) else err
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DivergedError as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_DIVERGED
    print(results_table([result]))
    print(f"{PROG}: wrote {out}/results.json, results.md, recall.png")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
