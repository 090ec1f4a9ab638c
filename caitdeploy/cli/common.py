"""Pieces every CLI subcommand shares: one-line errors, JSON reports, rich output."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from caitdeploy.core.errors import CaitError, OptionError, safe_text

# the report writer and the dense option check belong to the pipelines; re-exported for the commands
from caitdeploy.pipelines.common import check_dense_options, json_text, write_json  # noqa: F401

DEBUG = {"on": False}  # set by `caitdeploy --debug` or CAITDEPLOY_DEBUG=1


def debug_enabled() -> bool:
    import os

    return DEBUG["on"] or os.environ.get("CAITDEPLOY_DEBUG", "") not in ("", "0")


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def handle_errors(fn: Callable) -> Callable:
    """The error contract of every command.

    - CaitError (bad input, bad option, unwritable output): one line `error: ...` on stderr, exit 2;
    - OSError from the system (a vanished file, a full disk): one line naming the file, exit 2;
    - Ctrl-C / SIGTERM: `interrupted`, exit 130 / 143, temporary files removed;
    - anything else is a bug: one line saying so, exit 1; the traceback only with --debug.
    Nothing is written in any of these cases (outputs are staged and committed only on success).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from caitdeploy.core.errors import install_signal_handlers

        install_signal_handlers()
        try:
            return fn(*args, **kwargs)
        except OptionError as e:  # the library names the parameter; the user typed its flag
            click.echo(f"error: {e.as_flag()}", err=True)
            sys.exit(2)
        except CaitError as e:
            click.echo(f"error: {_one_line(str(e), 2000)}", err=True)
            sys.exit(2)
        except OSError as e:
            if debug_enabled():
                raise
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            click.echo(f"error: {where}{e.strerror or _one_line(str(e))}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except SystemExit as e:
            if isinstance(e.code, int) and e.code > 128:  # a signal (install_signal_handlers)
                click.echo("interrupted", err=True)
            raise
        except MemoryError:
            if debug_enabled():
                raise
            click.echo(
                "error: out of memory (the memory budget check should have refused this first: a bug in "
                "caitdeploy; set CAITDEPLOY_MAX_MEMORY_MB lower or re-run with --debug)",
                err=True,
            )
            sys.exit(1)
        except Exception as e:  # the contract: a bug gets one line, not a traceback
            if debug_enabled():
                raise
            from caitdeploy import __version__

            click.echo(
                f"internal error (a bug in caitdeploy {__version__}): {type(e).__name__}: "
                f"{_one_line(str(e), 300)}; re-run with --debug for the traceback",
                err=True,
            )
            sys.exit(1)

    return wrapper


def console():
    """Rich console for reports; piped output (logs, CI, `make`) gets 120 columns instead of rich's 80."""
    import os

    from rich.console import Console

    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120
    return Console(stderr=False, highlight=False, width=width)


def print_plain(con, text: Any, limit: int = 4000) -> None:
    """Print one report line on a rich console with nothing interpreted: `text` passes through `safe_text`
    (control characters, ESC, line breaks, bidi overrides escaped; at most `limit` characters) and rich's
    markup (`[red]`), emoji codes (`:x:`), highlighting and wrapping are off, so no inserted line break can
    start a line with text from a file."""
    con.print(safe_text(text, limit), markup=False, emoji=False, highlight=False, soft_wrap=True)


def rich_safe(text: Any, limit: int = 200) -> str:
    """Untrusted text for a rich renderable that parses markup (a table cell, a title): `safe_text`, then
    rich's markup escaped."""
    from rich.markup import escape

    return escape(safe_text(text, limit))


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def block_table(rows: list[dict[str, Any]], title: str | None = None):
    """The one rich table of per-block widths (rows from `flops.block_rows`, as fuse's report and inspect give
    them). Rows with `qk_pruned` etc. show the kept count before alignment in parentheses; rows with
    `flops_dense` get a dense column."""
    from rich.table import Table
    from rich.text import Text

    # a title is plain text (no markup), never wrapped (no line of its own for part of a name); callers print
    # file names with print_plain above the table instead, where they are never cropped
    t = Table(
        title=Text(safe_text(title, 300), no_wrap=True, overflow="ellipsis") if title is not None else None,
        show_lines=False,
    )
    dense = any("flops_dense" in r for r in rows)
    for col in (
        "block",
        "merge",
        "tokens",
        "heads",
        "qk/head",
        "v/head",
        "mlp",
        "GFLOPs",
        *(("dense",) if dense else ()),
    ):
        t.add_column(col, justify="right", no_wrap=True)

    def width(r, key, pruned):
        v = r[key]
        return f"{v}" + (f" ({r[pruned]})" if pruned in r and r[pruned] != v else "")

    for r in rows:
        op = (
            " ".join(
                x
                for x in (
                    r["merge"],
                    f"slim {r['slim']}" if r.get("slim") else None,
                    r["kind"] if r.get("kind", "attn") != "attn" else None,
                )
                if x
            )
            or "-"
        )
        cells = [
            str(r["block"]),
            op,
            str(r["tokens"]),
            str(r["heads"]),
            width(r, "qk_per_head", "qk_pruned"),
            width(r, "v_per_head", "v_pruned"),
            width(r, "mlp", "mlp_pruned"),
            f"{r['flops'] / 1e9:.3f}",
        ]
        if dense:
            cells.append(f"{r['flops_dense'] / 1e9:.3f}")
        t.add_row(*(rich_safe(c, 80) for c in cells))
    return t
