"""The README's commands are real: each `pspnet ...` line in its shell blocks parses with the
CLI's own parser (a flag renamed or removed fails here, not in a user's first hour), and each
file or page it points to exists. What the commands print is shown by the demo's and the
daemon's own tests; this one holds the guide to the code."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pspnet.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def pspnet_commands(text: str) -> list[list[str]]:
    """Every `pspnet` invocation in the shell blocks, as argv after `pspnet`."""
    commands = []
    for block in shell_blocks(text):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in re.split(r"&&|\|\||;|\|", line):
                words = shlex.split(part.replace("$HOME", "/home/user"))
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                    words = words[1:]                        # VAR=value command ...
                if words[-1:] == ["&"]:
                    words = words[:-1]
                if ">" in words:                             # redirection of the output
                    words = words[:words.index(">")]
                if words and words[0] == "pspnet":
                    commands.append(words[1:])
    return commands


COMMANDS = pspnet_commands(README.read_text())


def test_the_readme_shows_each_command_a_user_needs():
    shown = {argv[0] for argv in COMMANDS if argv}
    assert {"build", "serve", "submit", "status", "eval", "bench", "batch", "keys",
            "worker"} <= shown, shown


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_each_readme_command_parses(argv):
    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:                                   # --help
            return
        raise AssertionError(f"`pspnet {' '.join(argv)}` does not parse "
                             f"(exit {exc.code})") from exc


def test_the_files_and_pages_it_names_exist():
    text = README.read_text()
    links = re.findall(r"\]\(([^)#]+)\)", text)
    named = re.findall(r"`((?:\./)?(?:scripts|docs|deploy|build_model|bench)/[\w./-]+)`", text)
    missing = [p for p in links + named if not (REPO / p).exists()]
    assert not missing, missing


def test_it_stays_a_guide():
    """Figures, design and history live in docs/; the README is for a user's first hour."""
    assert len(README.read_text().splitlines()) <= 260
