"""`caitdeploy` command line: thin click commands, one module each in this package (`cli/`)."""

from __future__ import annotations

import click

from caitdeploy import __version__


class _Group(click.Group):
    """click's own usage errors (unknown option, value out of range) follow the one-line contract too."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        import sys

        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)  # UsageError and BadParameter carry one, a plain ClickException not
            cmd = f"{ctx.command_path}: " if ctx is not None else ""
            msg = " ".join(e.format_message().split())
            click.echo(f"error: {cmd}{msg} (see --help)", err=True)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="caitdeploy")
@click.option("--debug", is_flag=True, help="Show the traceback of an internal error (or set CAITDEPLOY_DEBUG=1).")
def main(debug: bool) -> None:
    """Deploy CAIT-compressed Vision Transformers: fuse, export, benchmark."""
    from caitdeploy.cli.common import DEBUG

    DEBUG["on"] = debug


def _register() -> None:
    from caitdeploy.cli.bench import bench_cmd
    from caitdeploy.cli.convert import convert_cmd
    from caitdeploy.cli.eval import eval_cmd
    from caitdeploy.cli.export import export_cmd
    from caitdeploy.cli.fuse import fuse_cmd
    from caitdeploy.cli.inspect import inspect_cmd
    from caitdeploy.cli.loadtest import loadtest_cmd
    from caitdeploy.cli.make_checkpoint import make_checkpoint_cmd
    from caitdeploy.cli.serve import serve_cmd
    from caitdeploy.cli.train import train_cmd

    # a new subcommand: one import above, one name here
    for cmd in (
        make_checkpoint_cmd,
        fuse_cmd,
        convert_cmd,
        bench_cmd,
        export_cmd,
        eval_cmd,
        inspect_cmd,
        serve_cmd,
        loadtest_cmd,
        train_cmd,
    ):
        main.add_command(cmd)


_register()

if __name__ == "__main__":
    main()
