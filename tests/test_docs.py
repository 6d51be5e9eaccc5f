"""The documentation a user reads is true of the repository: its generated tables (the README's demo,
the evidence result) are the committed metrics.json's, every relative link and every cited file
exists, the generated configuration reference is current, no internal work-item number or path outside
the repository is left, and each command's --help fits one screen and names an existing docs page."""
from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest

from toolkit import docgen
from toolkit.helpscreen import SCREEN_LINES
from toolkit.report import reproduce

ROOT = Path(__file__).resolve().parents[1]
LINKED_DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")),
               "benchmarks/README.md", "launchers/README.md"]


def tracked_text_files() -> list[Path]:
    """The repository's text files, this one left out: its patterns and examples name what they forbid."""
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    files = []
    for name in names:
        path = ROOT / name
        if not path.is_file() or path.suffix in (".png", ".gz", ".gguf", ".safetensors") or path == Path(__file__).resolve():
            continue
        head = path.read_bytes()[:4096]
        if b"\0" not in head:
            files.append(path)
    return files


# ---------------------------------------------------------------- tables generated from committed results


def test_the_docs_generated_tables_are_the_committed_metrics():
    blocks = {doc: reproduce.generated_blocks((ROOT / doc).read_text(encoding="utf-8")) for doc in docgen.GENERATED_TABLE_DOCS}
    assert any(kind == "demo-table" for kind, _, _ in blocks[Path("README.md")]), (
        "README.md has no generated demo table (<!-- demo-table: DIR --> ... <!-- demo-table:end -->)")
    for doc, found in blocks.items():
        for kind, source, block in found:
            expected = reproduce.TABLES[kind](reproduce.read_metrics(ROOT / source), source)
            assert block == expected, (f"{doc}'s {kind} differs from {source}/metrics.json: "
                                       "run `make docs` (python -m toolkit.docgen)")


# ---------------------------------------------------------------- links and cited files


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {github_anchor(m[1]) for m in re.finditer(r"^#{1,6} +(.+?) *#*$", text, flags=re.M)}


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    return [link for link in links if not re.match(r"[a-z]+:", link)]


@pytest.mark.parametrize("doc", LINKED_DOCS)
def test_every_relative_link_resolves_to_a_file_and_heading(doc):
    path = ROOT / doc
    assert path.is_file(), doc
    broken = []
    for link in relative_links(path):
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        if not file.exists() or ROOT not in (file, *file.parents):
            broken.append(f"{link} (no such file in the repository)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{link} (no heading #{anchor} in {file.relative_to(ROOT)})")
    assert not broken, f"{doc}: " + "; ".join(broken)


CITED_MD = re.compile(r"(?<![\w/.-])((?:\.\./)*[\w.-]+(?:/[\w.-]+)*\.md)\b")
DESIGN_SECTION = re.compile(r"docs/design\.md,? (?:section|s) ?(\d+)")
SOURCES = ("toolkit", "tests", "benchmarks", "launchers")
WRITTEN_BY_THE_TOOLKIT = {"report.md"}  # a run's RUN_DIR/report/report.md: named, not cited


def source_files() -> list[Path]:
    return [p for p in tracked_text_files()
            if p.relative_to(ROOT).parts[0] in SOURCES and p.suffix in (".py", ".sh", ".sbatch", ".yaml", ".txt")]


def test_no_docstring_or_comment_cites_a_file_that_does_not_exist():
    """Every "*.md" a source file names is a file of the repository (from the root, or beside the
    file), and every "docs/design.md section N" is a section there."""
    sections = {m[1] for m in re.finditer(r"^## (\d+)\. ", (ROOT / "docs/design.md").read_text(), flags=re.M)}
    missing = []
    for path in source_files():
        text = path.read_text(encoding="utf-8")
        for m in CITED_MD.finditer(text):
            cited = m[1]
            if cited in WRITTEN_BY_THE_TOOLKIT:
                continue
            if not ((ROOT / cited).exists() or (path.parent / cited).exists()):
                missing.append(f"{path.relative_to(ROOT)}: {cited}")
        for m in DESIGN_SECTION.finditer(text):
            if m[1] not in sections:
                missing.append(f"{path.relative_to(ROOT)}: docs/design.md section {m[1]} (sections: {sorted(sections)})")
    assert not missing, "cited but not in the repository: " + "; ".join(missing)


def test_no_tracked_file_points_outside_the_repository():
    outside = [f"{p.relative_to(ROOT)}:{n}" for p in tracked_text_files()
               for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
               if re.search(r"\.\./shared/|/work/shared|shared/device/", line)]
    assert not outside, "references outside the repository: " + ", ".join(outside)


# ---------------------------------------------------------------- generated reference, work items


def test_the_configuration_reference_is_up_to_date():
    committed = (ROOT / docgen.CONFIG_DOC).read_text(encoding="utf-8")
    assert committed == docgen.configuration_markdown(), "docs/configuration.md is stale: run `make docs`"
    for key in ("probe.placement.num_actors", "train.options.zero_stage", "selection.replay_ratio", "noise_floor"):
        assert f"| `{key}` |" in committed, key


INTERNAL_NUMBER = re.compile(r"\b(?:issues?|work items?) ?#?\d+\b|(?<![\w/&#])#\d{1,3}\b(?![\w-])", re.I)


def test_no_internal_work_item_numbers_in_tracked_text():
    hits = []
    for path in tracked_text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for m in INTERNAL_NUMBER.finditer(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {m[0]!r}")
    assert not hits, "internal work-item references: " + "; ".join(hits[:20])


def test_the_work_item_pattern_finds_what_it_should():
    for text in ("done (issue 19)", "Issue 13's checks", "see #21", "issues 19 and 20", "work item 3"):
        assert INTERNAL_NUMBER.search(text), text
    for text in ("color #495057", "ray-project/ray#54868", "&#39;", "## 2. SliCK", "cuda:0", "section 4"):
        assert not INTERNAL_NUMBER.search(text), text


# ---------------------------------------------------------------- --help on one screen


def all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    from toolkit.bench import load_benchmark
    from toolkit.cli import build_parser

    found = []

    def walk(name, parser):
        found.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    if sub.add_help:  # the bench commands hand everything to their script's own parser
                        walk(f"{name} {sub_name}".strip(), sub)

    walk("", build_parser())
    for bench in ("sampling", "train"):
        module = load_benchmark(bench)
        try:
            module.parse_args(["--help"], prog=f"gradual bench {bench}")
        except SystemExit:
            pass
        found.append((f"bench {bench}", None))
    return found


def help_text(name: str, parser, capsys) -> str:
    if parser is not None:
        return parser.format_help()
    from toolkit.bench import load_benchmark

    module = load_benchmark(name.split()[1])
    with pytest.raises(SystemExit):
        module.parse_args(["--help"], prog=f"gradual {name}")
    return capsys.readouterr().out


def test_every_help_fits_one_screen_and_names_an_existing_page(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")
    names = []
    for name, parser in all_parsers():
        capsys.readouterr()
        text = help_text(name, parser, capsys)
        lines = text.rstrip("\n").splitlines()
        names.append(name)
        assert len(lines) <= SCREEN_LINES, f"gradual {name} --help: {len(lines)} lines"
        assert max(len(line) for line in lines) <= 110, f"gradual {name} --help: a line over 110 columns"
        page = re.search(r"More: (\S+)", text)
        assert page and (ROOT / page[1]).is_file(), f"gradual {name} --help names no existing docs page"
    assert {"", "probe", "train", "run", "report", "data subset", "bench sampling", "bench train"} <= set(names)


def test_help_all_still_lists_every_flag_with_its_help(monkeypatch, capsys):
    from toolkit.cli import main

    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        main(["train", "--help-all"])
    full = capsys.readouterr().out
    assert "--micro-batch-size N" in full and "global batch (sequences per optimizer step)" in full
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    short = capsys.readouterr().out
    assert "--micro-batch-size" in short and "global batch (sequences" not in short
