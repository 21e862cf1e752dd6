"""``covmatch``: one entry point for the tools (``covmatch distill|eval|analyze|export|demo ...``) and ``--version``."""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

from covmatch._version import __version__

__all__ = ["main", "COMMANDS"]

# each subcommand's module, whose main(argv) runs it
COMMANDS = {
    "distill": "covmatch.distill.cli",
    "eval": "covmatch.eval.cli",
    "analyze": "covmatch.analyze",
    "export": "covmatch.export",
    "prepare-data": "covmatch.prepare_data",
    "demo": "covmatch.demo",
}

USAGE = """usage: covmatch [--version] {distill,eval,analyze,export,prepare-data,demo} ...

  distill   distil a dataset into N synthetic pairs (same as covmatch-distill)
  eval      train fresh models on a synthetic set or a coreset and test retrieval (same as covmatch-eval)
  analyze   a run's diagnostics: feature stability, match error, how far the set moved
  export    a distilled set as a Hugging Face imagefolder or LoRS/MTT-VL tensors, with a dataset card
  prepare-data  decode a dataset's images once into a cache the other commands read (--data-cache)
  demo      the main job on the embedded dataset (same as make demo)
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] == "--version":
        print(f"covmatch {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(
            f"covmatch: error: unknown command {command!r} (choose {', '.join(COMMANDS)})",
            file=sys.stderr,
        )
        return 2
    # imported on demand: `covmatch --version` and `--help` load none of the tools
    return importlib.import_module(COMMANDS[command]).main(rest)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
