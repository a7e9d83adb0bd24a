"""Every command in the README and the guides still parses: the subcommand exists, each flag
is accepted by its parser, each preset named exists, each benchmark or tool script exists.

Commands are read from fenced code blocks (a trailing backslash continues a line) and from
inline code spans. Placeholders (``PRESET``, ``RUN_OR_CKPT``, ``DIR``), optional parts in
brackets (``[-k 10]``), ``...`` and ``a|b`` values are allowed; their flags are still checked.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs" / "guide").glob("*.md"))]
SEPARATORS = {"&&", "||", ";", "|", ">", "2>&1"}
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*|<[^>]*>")
ENV = re.compile(r"[A-Z_][A-Z0-9_]*=\S*")
SCRIPT = re.compile(r"(?:^|\s)python3?\s+((?:benchmarks|tools)/[\w./-]+\.py)")


def snippets(text: str) -> Iterator[tuple[int, str]]:
    """(line number, code) of every fenced-block line (continuations joined) and every
    inline code span outside the fences."""
    fenced, pending, start = False, "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            if not pending:
                start = number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            yield start, pending + line
            pending = ""
        else:
            for span in re.findall(r"`([^`]+)`", line):
                yield number, span


def _tokens(code: str) -> list[str]:
    code = re.split(r"(?:^|\s)#", code, maxsplit=1)[0]  # a shell comment
    code = re.sub(r"^\s*\$\s+", "", code)  # a prompt
    try:
        return shlex.split(code)
    except ValueError:  # an unbalanced quote in prose
        return code.split()


def commands(tokens: list[str]) -> Iterator[list[str]]:
    """The argument lists after each ``nirdml`` (``nirdml ...``, ``python -m nirdml ...``,
    ``torchrun ... -m nirdml ...``), up to a shell separator."""
    for i, token in enumerate(tokens):
        before = tokens[i - 1] if i else ""
        at_command = not before or before in ("-m", *SEPARATORS) or ENV.fullmatch(before)
        if token == "nirdml" and at_command:  # not Python's `from nirdml import ...`
            rest = []
            for t in tokens[i + 1 :]:
                if t in SEPARATORS:
                    break
                rest.append(t)
            yield rest


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _is_flag(token: str) -> bool:
    return token.startswith("-") and not re.fullmatch(r"-[0-9.e+-]+", token)


def check(rest: list[str], parser, subparsers, presets) -> list[str]:
    """What is wrong with one command's arguments (empty: it parses)."""
    args = [t.strip("[]") for t in rest]
    args = [a for a in args if a not in ("", "...", "|")]
    if not args:
        return []
    first = args[0]
    if _is_flag(first):  # nirdml --help / --version
        known = parser._option_string_actions
        return [] if first.split("=")[0] in known else [f"nirdml has no option {first}"]
    if PLACEHOLDER.fullmatch(first):
        return []
    if first not in subparsers:
        return [f"no subcommand {first!r} (nirdml has {', '.join(subparsers)})"]
    sub = subparsers[first]
    actions = sub._option_string_actions
    problems, positionals, i = [], [], 1
    while i < len(args):
        token = args[i]
        i += 1
        if not _is_flag(token):
            positionals.append(token)
            continue
        flag = token.split("=")[0]
        action = actions.get(flag)
        if action is None:
            problems.append(f"nirdml {first} has no option {flag}")
            continue
        if "=" in token or action.nargs == 0:
            continue
        if action.nargs in ("+", "*"):
            while i < len(args) and not _is_flag(args[i]):
                i += 1
        else:
            i += 1 if action.nargs is None else int(action.nargs)
    if first in ("train", "features") and positionals:
        name = positionals[0]
        is_file = "/" in name or name.endswith((".yaml", ".yml"))
        if not (PLACEHOLDER.fullmatch(name) or is_file or name in presets):
            problems.append(f"no preset named {name!r} (nirdml presets lists them)")
    return problems


def test_every_documented_command_parses():
    from nirdml.cli import build_parser
    from nirdml.training.config import list_presets

    parser = build_parser()
    subparsers = _subparsers(parser)
    presets = set(list_presets())
    problems, seen, scripts = [], 0, 0
    for doc in DOCS:
        for number, code in snippets(doc.read_text()):
            where = f"{doc.relative_to(REPO_ROOT)}:{number}"
            for script in SCRIPT.findall(code):
                scripts += 1
                if not (REPO_ROOT / script).is_file():
                    problems.append(f"{where}: {script} does not exist")
            for rest in commands(_tokens(code)):
                seen += 1
                problems += [f"{where}: {p}" for p in check(rest, parser, subparsers, presets)]
    assert seen > 40 and scripts > 3, (seen, scripts)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("nirdml train digits --sett x=1", "has no option --sett"),
        ("nirdml trian digits", "no subcommand 'trian'"),
        ("nirdml train digts", "no preset named 'digts'"),
        ("nirdml evaluate RUN [--splits test]", "has no option --splits"),
    ],
)
def test_the_checker_finds_what_a_reader_would_trip_on(line, problem):
    from nirdml.cli import build_parser

    parser = build_parser()
    (rest,) = commands(_tokens(line))
    found = check(rest, parser, _subparsers(parser), {"digits"})
    assert any(problem in p for p in found), found


def test_snippets_join_continued_lines_and_read_inline_code():
    text = "Run `nirdml presets -v` first.\n```bash\nnirdml train digits \\\n  --quiet\n```\n"
    assert list(snippets(text)) == [(1, "nirdml presets -v"), (3, "nirdml train digits    --quiet")]
    assert Path(DOCS[0]).name == "README.md"
