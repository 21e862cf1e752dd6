"""The README's and docs/*.md's commands stay true: every flag they show exists, their make targets exist,
the CLI reference is current, every design.md section they cite exists, every relative link resolves, and
they speak to users (no internal process wording)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from covmatch.analyze import build_parser as analyze_parser
from covmatch.distill.cli import build_parser as distill_parser
from covmatch.eval.cli import build_parser as eval_parser
from covmatch.export import build_parser as export_parser
from covmatch.prepare_data import build_parser as prepare_data_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README = "\n".join(path.read_text() for path in DOCS)  # the README and every docs page, checked alike
PARSERS = {"covmatch-distill": distill_parser, "covmatch-eval": eval_parser, "covmatch export": export_parser,
           "covmatch analyze": analyze_parser, "covmatch prepare-data": prepare_data_parser}  # fmt: skip


def _known_flags(parser) -> set:
    return {s for action in parser._actions for s in action.option_strings}


def _commands(tool: str):
    """Every README command line of ``tool`` (backslash continuations joined), from the tool's name on;
    launcher lines (``torchrun ... -m covmatch.distill ...``) count for the tool they launch."""
    module = tool.replace("covmatch-", "covmatch.") + " "
    text = README.replace("\\\n", " ")
    lines = []
    for line in text.splitlines():
        if line.strip().startswith(tool + " "):
            lines.append(line)
        elif module in line and line.strip().startswith(("torchrun ", "deepspeed ", "python ")):
            lines.append(line[line.index(module) :])
    return lines


@pytest.mark.parametrize("tool", sorted(PARSERS))
def test_readme_flags_exist(tool):
    lines = _commands(tool)
    assert lines, f"the README shows no {tool} command"
    known = _known_flags(PARSERS[tool]())
    for line in lines:
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line.split("#")[0]):
            assert flag in known, f"README uses {flag} in: {line.strip()}"


def test_readme_inline_flags_exist():
    from benchmarks.bench_data import build_parser as bench_data_parser  # the benchmarks' flags, quoted too
    from benchmarks.gpu_codegen import build_parser as gpu_codegen_parser

    known = set().union(*(_known_flags(p()) for p in [*PARSERS.values(), bench_data_parser, gpu_codegen_parser]))
    inline = set(re.findall(r"`(--[a-z][a-z0-9-]*)", README))
    assert inline and inline <= known, inline - known


def test_make_targets_exist():
    makefile = (REPO / "Makefile").read_text()
    for target in re.findall(r"^make (\w+)", README, flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_umbrella_command(capsys):
    from covmatch import __version__
    from covmatch.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"covmatch {__version__}"
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--version"])
    assert exc.value.code == 0 and __version__ in capsys.readouterr().out


def test_cli_reference_is_current():
    from covmatch.cli_reference import END, START, render

    block = (REPO / "docs" / "cli.md").read_text().split(START, 1)[1].split(END, 1)[0]
    assert block.strip() == render().strip(), "out of date: run python -m covmatch.cli_reference --write docs/cli.md"


def test_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert readme.index("pip install covmatch") < readme.index("## Quick start")
    for page in ("usage", "cli", "data", "loss", "distributed", "benchmarks", "study", "design", "development"):
        assert f"(docs/{page}.md)" in readme, page


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_docs_speak_to_users_and_their_links_resolve(path):
    text = path.read_text()
    process = r"\b(?:this session|previous session|the issue(?:'s)?|issue #\d+|lent to this project)\b"
    internal = re.findall(process, text, flags=re.I)
    assert not internal, internal
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (path.parent / target).exists(), f"{path.name}: broken link {target}"


def test_design_references_name_sections_that_exist():
    """Every reference to a section of docs/design.md in the sources names one of its headings."""
    design = (REPO / "docs" / "design.md").read_text()
    headings = set(re.findall(r"^## (.+)$", design, flags=re.M))
    cited = set()
    for path in [*REPO.glob("covmatch/**/*.py"), *REPO.glob("tests/*.py"),
                 *REPO.glob("benchmarks/*.py"), *REPO.glob("experiments/**/*.py"), *DOCS]:  # fmt: skip
        text = " ".join(path.read_text().split())  # references may wrap lines
        for ref in re.findall(r"(?:docs/)?design\.md,? \*([^*]+)\*((?: and \*[^*]+\*)*)", text):
            cited |= {ref[0], *re.findall(r"\*([^*]+)\*", ref[1])}
    assert cited, "no references found"
    assert cited <= headings, sorted(cited - headings)
    assert "DESIGN 1." not in " ".join(p.read_text() for p in REPO.glob("covmatch/**/*.py"))
