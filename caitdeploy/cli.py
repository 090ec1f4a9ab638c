"""`caitdeploy` command line: thin click commands, one module each under `commands/`."""
from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="caitdeploy")
def main() -> None:
    """Deploy CAIT-compressed Vision Transformers: fuse, export, benchmark."""


def _register() -> None:
    from .commands.fuse import fuse_cmd
    from .commands.make_checkpoint import make_checkpoint_cmd

    main.add_command(make_checkpoint_cmd)
    main.add_command(fuse_cmd)
    # further subcommands register below, one line each
    from .commands.bench import bench_cmd; main.add_command(bench_cmd)
    from .commands.export import export_cmd; main.add_command(export_cmd)
    from .commands.inspect import inspect_cmd; main.add_command(inspect_cmd)


_register()

if __name__ == "__main__":
    main()
