"""One error type for everything a user can get wrong; the CLI prints it as one line and exits 2."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


class CaitError(Exception):
    """A user-facing error. Its message names the file, key or block at fault."""


def check_output_dir(path: str | os.PathLike, what: str = "output") -> Path:
    """The directory `path` will be written to; CaitError, before any work, if it is missing or not writable.

    Probes with a real temporary file: `os.access` says yes to root on read-only mounts.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CaitError(f"{path}: {what} directory {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".caitdeploy-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CaitError(f"{path}: {what} directory {parent} is not writable ({e.strerror})") from None
    return parent


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    Never leaves a half-written output: on any exception the temporary file is removed.
    """
    path = Path(path)
    parent = check_output_dir(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the final file the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
