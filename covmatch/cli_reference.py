"""The CLI reference (docs/cli.md), generated from the argument parsers so that it cannot drift.

``python -m covmatch.cli_reference`` prints it; ``--write docs/cli.md`` replaces the block between the
``<!-- cli-reference -->`` markers. A test fails when the file's block differs from what this renders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from covmatch.analyze import build_parser as analyze_parser
from covmatch.cli_args import default_text
from covmatch.distill.cli import build_parser as distill_parser
from covmatch.eval.cli import build_parser as eval_parser
from covmatch.export import build_parser as export_parser
from covmatch.prepare_data import build_parser as prepare_data_parser

__all__ = ["render", "replace_block", "main"]

START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"


def _parsers():
    return {
        "covmatch-distill": distill_parser(),
        "covmatch-eval": eval_parser(),
        "covmatch export": export_parser(),
        "covmatch analyze": analyze_parser(),
        "covmatch prepare-data": prepare_data_parser(),
    }


def _flag_cell(action: argparse.Action) -> str:
    if not action.option_strings:  # a positional argument
        return f"`{action.metavar or action.dest.upper()}`"
    flags = ", ".join(f"`{s}`" for s in action.option_strings)
    if action.choices is not None:
        return f"{flags} {{{','.join(str(c) for c in action.choices)}}}"
    if action.nargs == 0:
        return flags
    metavar = action.metavar or action.dest.upper()
    return f"{flags} {metavar}" + (" ..." if action.nargs in ("+", "*") else "")


def _default_cell(action: argparse.Action) -> str:
    if action.required:
        return "required"
    shown = default_text(action)
    return f"`{shown}`" if shown else ""


def render() -> str:
    """Markdown: one table per command, its flags in their ``--help`` groups (hidden flags and --help left out)."""
    out = []
    for name, parser in _parsers().items():
        out.append(f"**`{name}`** — {parser.description.split('. ')[0].rstrip('.')}.\n")
        out.append("| flag | default | what |")
        out.append("|---|---|---|")
        for group in parser._action_groups:
            actions = [a for a in group._group_actions
                       if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]  # fmt: skip
            if not actions:
                continue
            if group.title not in ("options", "optional arguments", "positional arguments"):
                out.append(f"| *{group.title}* | | |")
            for action in actions:
                what = (action.help or "").replace("%(prog)s", name)
                what = what.replace("|", "\\|").replace("*", "\\*")
                out.append(f"| {_flag_cell(action)} | {_default_cell(action)} | {what} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def replace_block(text: str, block: str) -> str:
    """``text`` with the part between the markers replaced by ``block``."""
    if START not in text or END not in text:
        raise ValueError(f"no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}{END}{tail}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covmatch.cli_reference", description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, default=None, help="rewrite the reference block of this file")
    args = parser.parse_args(argv)
    block = render()
    if args.write is None:
        print(block, end="")
        return 0
    args.write.write_text(replace_block(args.write.read_text(), block))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
