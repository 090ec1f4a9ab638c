"""Pieces every CLI subcommand shares: one-line errors, JSON reports, rich output."""
from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import click

from ..errors import CaitError, atomic_output


def handle_errors(fn: Callable) -> Callable:
    """Turn a CaitError (and a few predictable OS errors) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CaitError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except (PermissionError, FileNotFoundError, IsADirectoryError) as e:
            click.echo(f"error: {e.filename or ''}: {e.strerror}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as JSON atomically (no half-written report on failure)."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def console():
    """Rich console for reports; piped output (logs, CI, `make`) gets 120 columns instead of rich's 80."""
    import os

    from rich.console import Console

    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120
    return Console(stderr=False, highlight=False, width=width)


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"
