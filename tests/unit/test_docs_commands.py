"""Every `scpretrain` command in README.md and docs/ is one the CLI accepts: its subcommand, its
options and their values parse (what a reader copies must not fail on a renamed or removed
flag). Running them is the docs' own business; their results sit beside them."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from scpretrain_dist.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands(page: Path) -> list[str]:
    """The `scpretrain ...` lines of a page's bash blocks, continuation lines joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            starts = [i for i, w in enumerate(words) if w == "scpretrain" or w.endswith("bin/scpretrain")]
            if starts:
                out.append(shlex.join(words[starts[0] + 1:]))
    return out


COMMANDS = [(page.name, cmd) for page in PAGES for cmd in _commands(page)]


def _strict_parser():
    """The CLI's parser, taking whole option names only (docs spell them out)."""
    parser = build_parser()
    todo = [parser]
    while todo:
        p = todo.pop()
        p.allow_abbrev = False
        for action in p._actions:
            if isinstance(action.choices, dict):  # subcommands
                todo += list(action.choices.values())
    return parser


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) >= 40 and {p for p, _ in COMMANDS} >= {"README.md", "benchmarks.md", "evaluation.md"}


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_a_documented_command_parses(page, command):
    args = _strict_parser().parse_args(shlex.split(command))
    if args.command == "submit":  # the job's own command, after `--`, parses too
        rest = shlex.split(command)
        job = rest[rest.index("--") + 1:]
        _strict_parser().parse_args([*job, "--work-dir", "/x"])
