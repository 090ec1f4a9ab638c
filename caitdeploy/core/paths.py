"""Output paths are checked before any work: right extension, writable folder, never an input, never twice.

    plan = check_paths(inputs={"CHECKPOINT": "ck.pth"},
                       outputs=[Out("ck.fused.safetensors", "--output", MODEL_SUFFIXES["fused"]),
                                Out("r.json", "--report", (".json",))])

Every rule raises a one-line CaitError naming the option: an output whose extension names another format
(`fuse -o out.onnx`), an output that resolves (symlinks, `..`, hard links) to an input or to another output of
the same command, a missing or read-only folder, an output that is a folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from caitdeploy.core.errors import CaitError, check_output_dir, nearest_existing

# what each extension means; an output whose extension is listed here for another format is refused
KNOWN_SUFFIXES = {
    ".safetensors": "safetensors",
    ".pth": "torch checkpoint",
    ".pt": "torch checkpoint",
    ".bin": "torch checkpoint",
    ".ckpt": "torch checkpoint",
    ".onnx": "ONNX",
    ".plan": "TensorRT engine",
    ".engine": "TensorRT engine",
    ".trt": "TensorRT engine",
    ".json": "JSON",
    ".md": "Markdown",
    ".png": "PNG",
    ".svg": "SVG",
    ".pdf": "PDF",
    ".pbtxt": "Triton config",
    ".py": "Python source",
}
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")
FUSED_SUFFIXES = (".safetensors",)
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
JSON_SUFFIXES = (".json",)
MARKDOWN_SUFFIXES = (".md",)
PLOT_SUFFIXES = (".png", ".svg", ".pdf")


@dataclass(frozen=True)
class Out:
    """One output file of a command. suffixes: the accepted extensions, or None for any extension that does
    not name another format (e.g. a timing cache). create_dirs: the command creates missing folders on the way
    (a Triton repository entry); the nearest existing one must be a writable folder."""

    path: str | os.PathLike | None
    option: str
    suffixes: tuple[str, ...] | None = None
    create_dirs: bool = False


def _real(path: Path) -> str:
    """The path a write would land on: symlinks and `..` resolved, also for files that do not exist yet."""
    return os.path.realpath(path)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    a, b = Path(a), Path(b)
    if _real(a) == _real(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_suffix(path: str | os.PathLike, option: str, suffixes: tuple[str, ...] | None) -> None:
    suffix = Path(path).suffix.lower()
    if suffixes is None:
        if suffix in KNOWN_SUFFIXES:
            raise CaitError(
                f"{option} {path}: the extension {suffix} means {KNOWN_SUFFIXES[suffix]}; choose another name"
            )
        return
    if suffix not in suffixes:
        what = f" ({suffix} means {KNOWN_SUFFIXES[suffix]})" if suffix in KNOWN_SUFFIXES else ""
        raise CaitError(
            f"{option} {path}: expected a {' or '.join(suffixes)} file name, got {suffix or 'no extension'!r}{what}"
        )


def _check_creatable(path: Path, option: str) -> None:
    """The folders up to `path` can be created: the nearest existing ancestor is a writable folder."""
    parent = nearest_existing(path.parent)
    if parent.exists() and not parent.is_dir():
        raise CaitError(f"{option} {path}: {parent} is a file, not a folder")
    check_output_dir(parent / "probe", option)


def check_paths(
    inputs: Mapping[str, str | os.PathLike | Iterable[str | os.PathLike] | None], outputs: Iterable[Out]
) -> None:
    """Validate every output of a command against the inputs and each other; raises CaitError.

    inputs: option or argument name -> path (or several paths). Outputs whose path is None are skipped.
    """
    ins: list[tuple[str, Path]] = []
    for name, value in inputs.items():
        values = [value] if isinstance(value, (str, os.PathLike)) else list(value or [])
        ins.extend((name, Path(v)) for v in values if v is not None)
    seen: list[tuple[Out, Path]] = []
    for o in outputs:
        if o.path is None:
            continue
        p = Path(o.path)
        check_suffix(p, o.option, o.suffixes)
        if o.create_dirs and not p.parent.is_dir():
            _check_creatable(p, o.option)
        else:
            check_output_dir(p, o.option)
        for name, q in ins:
            if same_file(p, q):
                raise CaitError(f"{o.option} {p}: is the input {name} ({q}); refusing to overwrite an input")
        for other, q in seen:
            if same_file(p, q):
                raise CaitError(f"{o.option} {p}: is also the {other.option} output; give every output its own path")
        seen.append((o, p))


# ---- bounded reads ---------------------------------------------------------------------------------
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
MAX_SIDECAR_BYTES = 4 * MIB  # a JSON sidecar or report is a few KB
MAX_ONNX_BYTES = 2 * GIB  # protobuf's own limit on one serialized ONNX model (weights inline)
MAX_ENGINE_BYTES = 16 * GIB  # a TensorRT plan is about the size of its weights
MAX_TIMING_CACHE_BYTES = 1 * GIB


def _size_text(n: int) -> str:
    for div, unit in ((GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {unit}".replace(".0 ", " ")
    return f"{n} bytes"


def regular_file_size(path: str | os.PathLike, limit: int, what: str) -> int:
    """The size of the regular file `path` (symlinks followed), checked before anything reads it: CaitError,
    one line naming the file and the limit, for a missing file, a folder, a FIFO or device (whose reads never
    end) and a file larger than `limit` bytes."""
    from caitdeploy.core.errors import safe_text

    shown = safe_text(os.fspath(path), 300)
    try:
        st = os.stat(path)  # follows symlinks: the size of what a read would get
    except FileNotFoundError:
        raise CaitError(f"{shown}: no such file") from None
    except OSError as e:
        raise CaitError(f"{shown}: cannot read {what} ({e.strerror or type(e).__name__})") from None
    import stat

    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise CaitError(f"{shown}: {what} is {kind}")
    if st.st_size > limit:
        raise CaitError(
            f"{shown}: {what} is {_size_text(st.st_size)}, over the limit of {_size_text(limit)}; refusing to read it"
        )
    return st.st_size


def read_bounded(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The whole of the regular file `path`, at most `limit` bytes, checked BEFORE reading (see
    `regular_file_size`: symlinks resolved, non-regular files and files over `limit` refused in one line naming
    the file and the limit). At most limit + 1 bytes are ever read: a file that grew past the limit after the
    check is refused too, so memory stays bounded by `limit` whatever happens to the file meanwhile."""
    from caitdeploy.core.errors import safe_text

    size = regular_file_size(path, limit, what)
    shown = safe_text(os.fspath(path), 300)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CaitError(f"{shown}: cannot read {what} ({e.strerror or type(e).__name__})") from None
    import stat

    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for a FIFO or device after the check
            raise CaitError(f"{shown}: {what} is not a regular file")
        # one read of the size stat gave returns the whole file on local file systems (up to 2 GiB - 4 KiB
        # per call on Linux) without a second copy; anything else (short reads, a file that grew) is read in
        # chunks, never past limit + 1 bytes
        first = os.read(fd, min(size + 1, limit + 1, 0x7FFFF000))
        chunks, got = [first], len(first)
        if got == size:
            extra = os.read(fd, 1)
            if not extra:
                return first
            chunks.append(extra)
            got += 1
        while chunks[-1] and got <= limit:
            chunks.append(os.read(fd, min(limit + 1 - got, 64 * MIB)))
            got += len(chunks[-1])
    except OSError as e:
        raise CaitError(f"{shown}: cannot read {what} ({e.strerror or type(e).__name__})") from None
    finally:
        os.close(fd)
    if got > limit:
        raise CaitError(f"{shown}: {what} grew past the {_size_text(limit)} limit while it was read; refusing it")
    return b"".join(chunks)
