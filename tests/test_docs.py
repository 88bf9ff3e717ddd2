"""The README and docs/ tell the truth about the CLI and point at files that exist.

Every `vqpix` command written in a code block or an inline code span of README.md and docs/*.md
must name an existing subcommand and only options that its `--help` lists; every relative link
and image path must resolve (a `#fragment` to a heading of the page it names).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest
from click.testing import CliRunner

from keras_vqpix_cli.main import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def shell_text(page: Path) -> list[str]:
    """The page's code: fenced blocks (continued lines joined) and inline code spans."""
    text = page.read_text()
    blocks = [block.replace("\\\n", " ") for block in FENCE.findall(text)]
    prose = FENCE.sub("", text)
    return blocks + INLINE.findall(prose)


def vqpix_commands(page: Path) -> list[tuple[str, list[str]]]:
    """(subcommand, options) of every `vqpix SUB ...` in the page's code, up to `&&`, `|`, `;`."""
    found = []
    for code in shell_text(page):
        for line in code.splitlines():
            line = line.split("#", 1)[0] if line.lstrip().startswith(("vqpix", ".venv")) else line
            for command in re.split(r"&&|\|\||[|;]", line):
                match = re.search(r"(?:^|[\s/])vqpix\s+([a-z][a-z-]*)(.*)", command)
                if match:
                    options = re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", match.group(2))
                    found.append((match.group(1), options))
    return found


@cache
def help_options(subcommand: str) -> frozenset[str] | None:
    """The options `vqpix SUBCOMMAND --help` lists, or None for no such subcommand."""
    if subcommand not in main.commands:
        return None
    result = CliRunner().invoke(main, [subcommand, "--help"])
    assert result.exit_code == 0, result.output
    return frozenset(re.findall(r"(--[a-z][a-z-]*)", result.output))


def headings(page: Path) -> set[str]:
    """GitHub's anchors of the page's headings."""
    text = FENCE.sub("", page.read_text())
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def wrong_commands(page: Path) -> list[str]:
    """The page's `vqpix` commands that name no subcommand, or an option it does not have."""
    wrong = []
    for subcommand, options in vqpix_commands(page):
        known = help_options(subcommand)
        if known is None:
            wrong.append(f"vqpix {subcommand}: no such command")
        else:
            wrong += [f"vqpix {subcommand} {o}: no such option" for o in options if o not in known]
    return wrong


def broken_links(page: Path) -> list[str]:
    """The page's relative links and images whose file (or heading) does not exist."""
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        missing = not resolved.exists()
        if missing or (
            fragment and resolved.suffix == ".md" and fragment not in headings(resolved)
        ):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_vqpix_command_and_option_exists(page):
    assert not wrong_commands(page)
    if page.name == "README.md":
        commands = {command for command, _ in vqpix_commands(page)}
        assert commands >= {"train", "evaluate", "sample", "export"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_image_resolves(page):
    assert not broken_links(page)


def test_the_checks_catch_a_wrong_command_and_a_broken_link(tmp_path):
    (tmp_path / "there.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text(
        "Run `vqpix trian --out x` or\n\n```bash\nvqpix train --epoch 3 && vqpix sample R\n```\n"
        "[gone](missing.md) [here](#nowhere) [ok](there.md#a-heading) [bad](there.md#b)\n\n"
        "# Title\n"
    )
    assert sorted(wrong_commands(page)) == [
        "vqpix train --epoch: no such option",
        "vqpix trian: no such command",
    ]
    assert broken_links(page) == ["missing.md", "#nowhere", "there.md#b"]
