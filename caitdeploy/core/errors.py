"""One error type for everything a user can get wrong, and all-or-nothing outputs.

`CaitError` is a user-input error: the CLI prints it as one line and exits 2. Every file a command writes goes
through `Staging`: each output is written to a hidden temporary file next to its target and renamed onto it
only when the whole command succeeded, so on any error (or SIGINT/SIGTERM) nothing at all is written. Temporary
files carry the host and pid that made them; one left by a killed process (SIGKILL) is removed by the next
`Staging` that writes into the same folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Self

TMP_TAG = ".cdtmp-"  # hidden temp names: .<target name>.cdtmp-<host>-<pid>-<random>.tmp


MAX_MESSAGE = 1000


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` as one printable line of at most `limit` characters: line breaks (\\n, \\r, U+2028, U+2029,
    U+0085) and other control characters from untrusted names and values are escaped, long text is cut."""
    out = "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in str(text))
    return out if len(out) <= limit else out[: limit - 3] + "..."


class _Tok(str):
    """Punctuation `render` has already written (never a value from the input)."""


class _Leave(int):
    """`render` leaves the container with this id()."""


def render(value: object, limit: int = 80) -> str:
    """A bounded, cycle-safe, repr-like text of an untrusted value for a message: never `str()` or `repr()` of
    the whole (a pickle's shared references can make that walk 2^64 items, a deep list overflow the stack, a
    huge int refuse to convert). It stops after `limit` characters or 4 x `limit` visited items, whatever the
    value; containers it is already inside show as `...`."""
    out: list[str] = []
    size = 0
    budget = 4 * limit
    work: list[object] = [value]  # values, punctuation already rendered (_Tok), container exits (_Leave)
    inside: list[int] = []
    while work and size <= limit and budget > 0:
        v = work.pop()
        budget -= 1
        if isinstance(v, _Leave):
            inside.remove(int(v))
            continue
        if isinstance(v, _Tok):
            text = str(v)
        elif isinstance(v, (list, tuple, dict, set, frozenset)):
            if id(v) in inside:
                text = "..."
            else:
                if isinstance(v, dict):
                    items: list[object] = []
                    for k, x in v.items():
                        items += [k, _Tok(": "), x, _Tok(", ")]
                        if len(items) > 4 * limit:
                            break
                    opn, cls = "{", "}"
                else:
                    items = []
                    for x in v:
                        items += [x, _Tok(", ")]
                        if len(items) > 2 * limit:
                            break
                    opn, cls = {list: ("[", "]"), tuple: ("(", ")")}.get(type(v), ("{", "}"))
                if items:
                    items.pop()  # the last separator
                inside.append(id(v))
                work += [_Leave(id(v)), _Tok(cls), *reversed(items)]
                text = opn
        elif isinstance(v, bool) or v is None:
            text = str(v)
        elif isinstance(v, int):
            text = str(v) if v.bit_length() <= 256 else f"<int of {v.bit_length()} bits>"
        elif isinstance(v, float):
            text = repr(v)
        elif isinstance(v, (str, bytes)):
            text = repr(v[: limit + 1])
        else:
            shape = getattr(v, "shape", None)
            text = f"<{type(v).__name__}{' of shape ' + str(tuple(shape)) if isinstance(shape, tuple) else ''}>"
        out.append(text)
        size += len(text)
    text = one_line("".join(out))
    return text if size <= limit and not work else text[: max(limit - 3, 0)] + "..."


class CaitError(Exception):
    """A user-facing error. Its message names the file, key, block or option at fault; it is always one
    printable line of at most MAX_MESSAGE characters, whatever untrusted text it quotes."""

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(str(message)))


class OptionError(CaitError):
    """A bad parameter value. The library names the parameter (`max_dropped_norm must be ...`); the CLI shows
    the same message with the parameter as its flag (`--max-dropped-norm must be ...`)."""

    def __init__(self, param: str, message: str) -> None:
        self.param, self.detail = param, message
        self.sep = "" if message.startswith((":", "=")) and not message.startswith("= ") else " "
        super().__init__(f"{param}{self.sep}{message}")

    def as_flag(self) -> str:
        return one_line(f"--{self.param.replace('_', '-')}{self.sep}{self.detail}")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary files that a killed caitdeploy process on this host left in `folder`."""
    removed: list[Path] = []
    pat = re.compile(r"^\..+" + re.escape(TMP_TAG) + re.escape(_host()) + r"-(\d+)-[^/]*\.tmp$")
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = pat.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            p = Path(folder) / name
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _os_error(path: Path, e: OSError, doing: str) -> CaitError:
    why = e.strerror or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        why += ": free some space and run again"
    return CaitError(f"{path}: cannot {doing} ({why}); nothing was written")


def nearest_existing(folder: Path) -> Path:
    """`folder` or its nearest ancestor that exists (where missing folders on the way would be created)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_output_dir(path: str | os.PathLike, what: str = "output") -> Path:
    """The directory `path` will be written to; CaitError, before any work, if it is missing or not writable.

    Probes with a real temporary file: `os.access` says yes to root on read-only mounts.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise CaitError(f"{path}: {what} is a directory")
    if not parent.is_dir():
        raise CaitError(f"{path}: {what} directory {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".probe{TMP_TAG}{_host()}-{os.getpid()}-", suffix=".tmp", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CaitError(f"{path}: {what} directory {parent} is not writable ({e.strerror})") from None
    return parent


class Staging:
    """All-or-nothing outputs: `stage(path)` gives a temporary path next to `path`; `commit()` renames every
    staged file onto its target (with ordinary permissions, 0666 & ~umask); `abort()` removes them all.

    As a context manager it commits when the block succeeds and aborts on any exception, KeyboardInterrupt
    and SystemExit (how SIGTERM arrives, see `install_signal_handlers`) included.
    """

    def __init__(self) -> None:
        self._items: list[tuple[Path, Path]] = []

    def stage(self, path: str | os.PathLike, suffix: str = "", create_dirs: bool = False) -> Path:
        """A temporary file for `path`. create_dirs: missing folders on the way to `path` are made at commit
        time (the temporary file waits in the nearest existing folder), so an error leaves no folder either."""
        path = Path(path)
        if create_dirs and not path.parent.is_dir():
            parent = nearest_existing(path.parent)
            check_output_dir(parent / path.name)
        else:
            parent = check_output_dir(path)
        sweep_stale_temps(parent)
        try:
            fd, tmp = tempfile.mkstemp(
                prefix=f".{path.name[:80]}{TMP_TAG}{_host()}-{os.getpid()}-", suffix=suffix + ".tmp", dir=parent
            )
        except OSError as e:
            raise _os_error(path, e, "create a temporary file") from None
        os.close(fd)
        self._items.append((Path(tmp), path))
        return Path(tmp)

    def write_bytes(self, path: str | os.PathLike, data: bytes, create_dirs: bool = False) -> Path:
        tmp = self.stage(path, create_dirs=create_dirs)
        try:
            tmp.write_bytes(data)
        except OSError as e:
            raise _os_error(Path(path), e, "write") from None
        return tmp

    def write_text(self, path: str | os.PathLike, text: str, create_dirs: bool = False) -> Path:
        return self.write_bytes(path, text.encode(), create_dirs)

    def commit(self) -> list[Path]:
        mode = 0o666 & ~_umask()
        for tmp, final in self._items:
            try:
                os.chmod(tmp, mode)  # mkstemp makes 0600 and some writers (safetensors) recreate the file
            except OSError as e:
                self.abort()
                raise _os_error(final, e, "write") from None
        for tmp, final in self._items:
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, final)
            except OSError as e:
                self.abort()
                raise _os_error(final, e, "write") from None
        done = [final for _, final in self._items]
        self._items = []
        return done

    def abort(self) -> None:
        for tmp, _ in self._items:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._items = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    Never leaves a half-written output: on any exception the temporary file is removed. An OSError while
    writing (a full disk, a file-size limit) becomes a one-line CaitError naming `path`.
    """
    with Staging() as st:
        tmp = st.stage(path, suffix)
        try:
            yield tmp
        except OSError as e:
            raise _os_error(Path(path), e, "write") from None


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP raise SystemExit (143, 129), so `Staging` removes its temporary files as it does
    on Ctrl-C. SIGKILL cannot be caught: `sweep_stale_temps` cleans up after it on the next run.

    A blocked-signal mask is inherited across exec: a command started by a runner that blocks SIGTERM
    (some job runners and thread pools do) would otherwise never see `kill`/`timeout` and would run on to
    the end. The signals handled here are unblocked, so a handler installed is a handler that runs."""
    import signal

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    sigs = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    for sig in sigs:
        with contextlib.suppress(ValueError, OSError):  # not the main thread
            signal.signal(sig, _exit)
    if hasattr(signal, "pthread_sigmask"):
        with contextlib.suppress(ValueError, OSError):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)


# ---- text from files, for output ------------------------------------------------------------------
MAX_SHOWN = 200


def safe_text(value: object, limit: int = MAX_SHOWN) -> str:
    """Untrusted text (a name, producer, op type or metadata value from a file, a file name) as one printable
    line of at most `limit` characters, for any output that is not JSON: control characters (ESC and the rest
    of C0, DEL, C1), line and paragraph breaks, bidi overrides and isolates (U+202A-U+202E, U+2066-U+2069) and
    other invisible format characters are shown escaped (`\\x1b`, `\\n`, `\\u202e`), so a file cannot clear the
    screen, colour the output, reorder it or forge an `error:` line. Rich markup is a second, separate matter:
    print through `commands.common.rich_safe` (or a console with markup off)."""
    text = value if isinstance(value, str) else render(value, limit)  # never str() of an untrusted whole
    pieces: list[str] = []
    total = 0
    for ch in text:
        pieces.append(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1])
        total += len(pieces[-1])
        if total > limit:
            break
    if total <= limit:
        return "".join(pieces)
    out, n = [], 0
    for piece in pieces:  # cut between characters, never inside an escape
        if n + len(piece) > limit - 3:
            break
        out.append(piece)
        n += len(piece)
    return "".join(out) + "..."
