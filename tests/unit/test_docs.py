"""The documentation: a short README, a complete rule table, links that resolve, and nothing that points outside
the repository (the repository must stand on its own)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = next(p for p in Path(__file__).resolve().parents if (p / "Snakefile").is_file())
README = REPO / "README.md"
WORKFLOW_DOC = REPO / "docs" / "workflow.md"
MAX_README_LINES = 150

TEXT_SUFFIXES = {".md", ".py", ".smk", ".yaml", ".rst", ".txt"}
TEXT_NAMES = {"Snakefile", "Makefile"}
# References to files outside the repository and to an external tracker's numbers. The patterns are spelled so that
# this file does not match them itself.
OUTSIDE = [
    ("a path into a sibling 'shared' folder", re.compile(r"\.\./shared")),
    ("the shared methods reference", re.compile(r"shared[/]METHODS")),
    ("the shared design reference", re.compile(r"shared[/]DESIGN")),
    (
        "the shared methods / design reference by bare file name (the repository's own is docs/methods.md)",
        re.compile(r"\b(?:METHODS|DESIGN)[.]md\b"),
    ),
    ("the outside papers folder", re.compile(r"\bpapers[/]")),
    ("a tracker number", re.compile(r"\bissues? #?\d+", re.IGNORECASE)),
]


def repository_files() -> list[Path]:
    """Tracked files plus new, not ignored ones (so the checks see files before their first commit)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted({REPO / line for line in out.splitlines() if line and (REPO / line).is_file()})


def text_files() -> list[Path]:
    return [p for p in repository_files() if p.suffix in TEXT_SUFFIXES or p.name in TEXT_NAMES]


def markdown_pages() -> list[Path]:
    return [README, *sorted((REPO / "docs").rglob("*.md"))]


# ------------------------------------------------------------------------------------------------ (a)
def test_readme_is_a_front_door_of_at_most_150_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_has_the_two_commands_and_the_layout():
    text = README.read_text()
    assert "make run" in text and "make test" in text
    for layer in ("stages/", "report/", "dag/", "engines/", "scorers/", "families/", "core/"):
        assert f"`{layer}`" in text, layer


# ------------------------------------------------------------------------------------------------ (b)
def workflow_rules() -> set[str]:
    snakemake = Path(sys.executable).parent / "snakemake"
    out = subprocess.run([str(snakemake), "--list-rules"], cwd=REPO, capture_output=True, text=True, check=True)
    rules = {line.strip() for line in out.stdout.splitlines() if re.fullmatch(r"\s*\w+\s*", line)}
    assert rules, f"snakemake --list-rules printed no rules:\n{out.stdout}\n{out.stderr}"
    return rules


def split_row(line: str) -> list[str]:
    """The cells of a Markdown table row (escaped pipes stay inside their cell)."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def rule_table(path: Path) -> list[str]:
    """First column of the first table in `path` whose header starts with 'rule', backticks removed."""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and split_row(line)[0].lower() == "rule":
            names = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                names.append(split_row(row)[0].strip("`").strip())
            return names
    raise AssertionError(f"{path} has no table whose first column is 'rule'")


def test_rule_table_names_exactly_the_workflow_rules():
    documented = rule_table(WORKFLOW_DOC)
    duplicates = sorted({n for n in documented if documented.count(n) > 1})
    assert not duplicates, f"rules listed twice in docs/workflow.md: {duplicates}"
    rules = workflow_rules()
    assert not rules - set(documented), f"rules missing from docs/workflow.md: {sorted(rules - set(documented))}"
    assert not set(documented) - rules, f"not rules of the workflow: {sorted(set(documented) - rules)}"


# ------------------------------------------------------------------------------------------------ (c)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)


def relative_links(page: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", page.read_text()))
    targets = LINK.findall(text) + REFERENCE.findall(text)
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) and not t.startswith("#")]


def test_markdown_pages_exist():
    pages = {p.relative_to(REPO).as_posix() for p in markdown_pages()}
    for required in (
        "docs/methods.md",
        "docs/workflow.md",
        "docs/results.md",
        "docs/cluster.md",
        "docs/dvc.md",
        "docs/paper-scale.md",
        "docs/benchmarks.md",
        "docs/findings/kfac-ablation.md",
        "docs/findings/likelihood-measurements.md",
        "docs/findings/vesde.md",
        "docs/findings/metagradients.md",
        "docs/findings/counterfactuals.md",
        "docs/design.md",
        "docs/adding-a-scorer.md",
    ):
        assert required in pages, f"{required} is missing"


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.split("#")[0]).resolve() for t in relative_links(README)}
    unlinked = [p.relative_to(REPO).as_posix() for p in markdown_pages()[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve_to_repository_files(page):
    files = {p.resolve() for p in repository_files()}
    directories = {parent for p in files for parent in p.parents}
    broken = []
    for target in relative_links(page):
        path = target.split("#")[0].split("?")[0]
        if not path:
            continue
        resolved = (page.parent / path).resolve()
        if resolved not in files and resolved not in directories:
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: links to nothing in the repository: {broken}"


# ------------------------------------------------------------------------------------------------ (d)
def outside_references(paths: list[Path]) -> list[str]:
    hits = []
    for path in paths:
        try:
            lines = path.read_text().splitlines()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(lines, 1):
            for what, pattern in OUTSIDE:
                if pattern.search(line):
                    hits.append(f"{path.relative_to(REPO)}:{number}: {what}: {line.strip()[:120]}")
    return hits


def test_no_outside_references_in_docs_configs_and_rules():
    hits = outside_references([p for p in text_files() if p.suffix != ".py"])
    assert not hits, "references outside the repository:\n" + "\n".join(hits)


def test_no_outside_references_in_python_files():
    hits = outside_references([p for p in text_files() if p.suffix == ".py"])
    assert not hits, "references outside the repository:\n" + "\n".join(hits)
