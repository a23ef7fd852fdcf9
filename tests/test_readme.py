"""The README stays true to the code: every option of every command is documented, and the block codes are real.

The commands come from ``planer.cli.build_parser()``, so a command or option added later fails here until the
README's "Commands and their options" names it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from planer.cli import build_parser, subcommands
from planer.models.arch import KINDS, Arch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def sections() -> dict[str, str]:
    """Each ``### `planer NAME``` section's text, up to the next heading."""
    found = {}
    for match in re.finditer(r"^### `planer (\S+)`\n(.*?)(?=^#)", README, flags=re.M | re.S):
        found[match.group(1)] = match.group(2)
    return found


def options(parser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]


def names(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


COMMANDS = subcommands(build_parser())


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_readme_lists_every_option_of_every_command(command):
    text = sections().get(command)
    assert text is not None, f"README has no '### `planer {command}`' section"
    missing = [o for o in options(COMMANDS[command]) if not names(text, o)]
    assert not missing, f"README's section on planer {command} does not name {', '.join(missing)}"
    table = re.search(rf"^\| `planer {command}` \|", README, flags=re.M)
    assert table, f"README's command table has no row for planer {command}"


def test_readme_names_the_top_level_options():
    assert all(names(README, o) for o in options(build_parser()))


def test_block_code_legend_matches_arch_short():
    legend = re.search(r"^\| code \| spec \| block \|\n\|---\|---\|---\|\n((?:\|.*\n)+)", README, flags=re.M)
    assert legend, "README has no block-code legend"
    kinds = set()
    for row in legend.group(1).splitlines():
        codes, specs = (re.findall(r"`([^`]+)`", cell) for cell in row.split("|")[1:3])
        assert len(codes) == len(specs) > 0, row
        for code, spec in zip(codes, specs):
            arch = Arch.parse(spec)
            assert arch.short() == code, f"README says {spec} is {code}, Arch.short() says {arch.short()}"
            kinds.add(arch.blocks[0].kind)
    assert kinds == set(KINDS)
