"""``covmatch``: one entry point for the tools (``covmatch distill|eval|demo ...``) and ``--version``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from covmatch._version import __version__

__all__ = ["OneLineArgumentParser", "main"]


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (and exit code 2), without the usage block."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


USAGE = """usage: covmatch [--version] {distill,eval,demo} ...

  distill   distil a dataset into N synthetic pairs (same as covmatch-distill)
  eval      train fresh models on a synthetic set or a coreset and test retrieval (same as covmatch-eval)
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
    if command == "distill":
        from covmatch.distill.cli import main as run
    elif command == "eval":
        from covmatch.eval.cli import main as run
    elif command == "demo":
        from covmatch.demo import main as run
    else:
        print(f"covmatch: error: unknown command {command!r} (choose distill, eval or demo)", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
