"""The generated CLI reference (docs/gen_cli.py, built into the site by docs/hooks.py) names every command and
every visible option of the click group, so the docs site cannot silently miss one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from caitdeploy.cli.main import main

GEN = Path(__file__).resolve().parents[2] / "docs" / "gen_cli.py"


def _markdown() -> str:
    """The page as the site build makes it (`python docs/gen_cli.py -` prints it), in a separate process."""
    return subprocess.run([sys.executable, str(GEN), "-"], capture_output=True, text=True, check=True).stdout


def test_cli_reference_names_every_command_and_option():
    text = _markdown()
    ctx = click.Context(main, info_name="caitdeploy", **main.context_settings)  # -h and --help, as the CLI has
    assert "`-h`" in text
    for name, cmd in main.commands.items():
        assert f"`caitdeploy {name}`" in text, name
        sub_ctx = click.Context(cmd, info_name=name, parent=ctx, **cmd.context_settings)
        section = text.split(f"`caitdeploy {name}`", 1)[1].split("\n### ", 1)[0]
        for p in cmd.get_params(sub_ctx):
            if isinstance(p, click.Option) and not p.hidden:
                for opt in p.opts:
                    assert f"`{opt}`" in section, (name, opt)
