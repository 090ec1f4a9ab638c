"""The README and the docs pages stay true: every `caitdeploy` command and --option they show, in any block
(synopses included, which the examples test does not run), exists in the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import click

from caitdeploy.cli.main import main
from caitdeploy.testing.docs import pages

README = Path(__file__).resolve().parents[2] / "README.md"
BENCH_GUIDE = README.parent / "docs" / "guides" / "bench.md"


def _commands_in_readme() -> list[tuple[str, list[str]]]:
    blocks, current, inside = [], [], False
    for line in "\n".join(p.read_text() for p in pages()).splitlines():
        if line.startswith("```"):
            if inside:
                blocks.append("\n".join(current))
            inside, current = not inside, []
        elif inside:
            current.append(line)
    out = []
    for block in blocks:
        # join continuation lines of a usage block (indented lines that follow a command)
        joined = re.sub(r"\n\s+(?=[\[-])", " ", block)
        for line in joined.splitlines():
            m = re.match(r"^\s*(?:\$ )?(?:\.venv/bin/)?caitdeploy ([a-z-]+)(.*)$", line)
            if m:
                out.append((m.group(1), re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(2))))
    return out


def test_readme_shows_every_command():
    shown = {cmd for cmd, _ in _commands_in_readme()}
    assert shown >= {"fuse", "export", "bench", "make-checkpoint", "inspect"}


def test_readme_options_exist():
    ctx = click.Context(main)
    found = _commands_in_readme()
    assert len(found) >= 10
    for cmd, flags in found:
        command = main.get_command(ctx, cmd)
        assert command is not None, f"README shows unknown command {cmd!r}"
        known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
        for flag in flags:
            assert flag in known, f"README shows `caitdeploy {cmd} {flag}`, which the CLI does not have"


def test_readme_documents_every_bench_record_key():
    from caitdeploy.bench.runners import RECORD_KEYS

    text = " ".join(BENCH_GUIDE.read_text().split())
    m = re.search(r"RECORD_SCHEMA`\): `([^`]+)` and the environment `([^`]+)`", text)
    assert m, "the bench guide lost its record-key list"
    assert (m.group(1) + " " + m.group(2)).split() == list(RECORD_KEYS)  # every key, in order, nothing else
