"""Untrusted images (PNG, JPEG): every bound is checked before a pixel is decoded.

    info = probe(path, "--calib")            # stat + the format's own header: format, width x height
    check_stream(path, info, "--calib")      # the whole file's structure, without decoding: PNG chunks and
                                             # CRCs up to IEND, JPEG segments up to the scan, then an EOI
    im = open_image(path, "--calib")         # a PIL image opened lazily (header only) after `probe`'s checks
    rgb = load_rgb(path, "--data")           # decoded to RGB, decode errors as one line

The bounds (limits.py): the file's size (`MAX_IMAGE_BYTES`, read from `stat` with symlinks resolved, before
the file is opened; a FIFO or a device is refused, never read), each side (`MAX_IMAGE_SIDE`: a 60,000,000 x 1
PNG is 175 KB and passes any area bound, then a resize to a model's input asks for billions of pixels), the
area (`MAX_IMAGE_PIXELS`), and with `resize_shorter` the area of the image once its shorter side is resized to
that length (what timm's eval transform and int8 calibration do). Width and height come from the format's
header, read here (PNG IHDR, JPEG SOFn) before PIL sees the file; PIL then opens it restricted to the PNG and
JPEG decoders, with `Image.MAX_IMAGE_PIXELS` at the same bound as a second guard. Every refusal is a
`CaitError` of one line naming the file (after the `what` prefix, e.g. the option that named the folder).
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from caitdeploy.core.budgets import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE
from caitdeploy.core.errors import CaitError

__all__ = ["IMAGE_SUFFIXES", "ImageInfo", "check_image", "check_stream", "load_rgb", "open_image", "probe"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PIL_FORMATS = ("PNG", "JPEG")
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (C4 DHT, C8 JPG and CC DAC are not frames)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD9)}  # TEM, RST0-7, SOI: markers without a length


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    format: str  # "PNG" or "JPEG"
    width: int
    height: int
    bytes: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _fail(what: str, path, why: str) -> CaitError:
    return CaitError(f"{what + ' ' if what else ''}{path}: {why}")


def _unreadable(what: str, path, why: str) -> CaitError:
    return _fail(what, path, f"not a readable PNG/JPEG image ({why})")


def _stat(path: Path, what: str) -> os.stat_result:
    """The file's stat, symlinks resolved: a regular file of 1..MAX_IMAGE_BYTES bytes."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise _fail(what, path, f"cannot read ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _fail(what, path, "not a regular file (a folder, FIFO or device is never read as an image)")
    if st.st_size == 0:
        raise _unreadable(what, path, "the file is empty")
    if st.st_size > MAX_IMAGE_BYTES:
        raise _fail(what, path, f"{st.st_size} bytes, more than the {MAX_IMAGE_BYTES} an image may have")
    return st


def _check_size(what: str, path, w: int, h: int, resize_shorter: int | None) -> None:
    if w < 1 or h < 1:
        raise _unreadable(what, path, f"its header says {w}x{h} pixels")
    if w > MAX_IMAGE_SIDE or h > MAX_IMAGE_SIDE:
        raise _fail(
            what, path, f"{w}x{h} pixels: a side longer than the {MAX_IMAGE_SIDE} allowed (refused before decoding)"
        )
    if w * h > MAX_IMAGE_PIXELS:
        raise _fail(what, path, f"{w}x{h} pixels, more than the {MAX_IMAGE_PIXELS} allowed (refused before decoding)")
    if resize_shorter:
        scale = resize_shorter / min(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        if nw * nh > MAX_IMAGE_PIXELS:
            raise _fail(
                what,
                path,
                f"{w}x{h} pixels: resized to a shorter side of {resize_shorter} it would be "
                f"{nw}x{nh}, more than the {MAX_IMAGE_PIXELS} pixels allowed (too elongated)",
            )


def _png_size(f, what: str, path) -> tuple[int, int]:
    ihdr = f.read(25)  # length, "IHDR", width, height, depth, colour type, compression, filter, interlace, (crc)
    if len(ihdr) < 24:
        raise _unreadable(what, path, "truncated PNG header")
    length, ctype, w, h = struct.unpack(">I4sII", ihdr[:16])
    if ctype != b"IHDR" or length != 13:
        raise _unreadable(what, path, "PNG without an IHDR chunk first")
    return w, h


def _jpeg_size(f, size: int, what: str, path) -> tuple[int, int]:
    """Width and height from the first SOFn, walking the marker segments before it (APPn, DQT, DHT, ...)."""
    pos = 2
    for _ in range(100_000):  # segments are >= 4 bytes: the file size bounds the walk anyway
        f.seek(pos)
        head = f.read(4)
        if len(head) < 2 or head[0] != 0xFF:
            raise _unreadable(
                what,
                path,
                "truncated JPEG: no frame header (SOF)" if len(head) < 2 else f"corrupt JPEG: no marker at byte {pos}",
            )
        marker = head[1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):
            raise _unreadable(what, path, "corrupt JPEG: no frame header (SOF) before the image data")
        if len(head) < 4:
            raise _unreadable(what, path, "truncated JPEG header")
        length = int.from_bytes(head[2:4], "big")
        if length < 2 or pos + 2 + length > size:
            raise _unreadable(what, path, f"truncated or corrupt JPEG segment at byte {pos}")
        if marker in _SOF:
            sof = f.read(5)  # precision, height, width
            if len(sof) < 5 or length < 7:
                raise _unreadable(what, path, "truncated JPEG frame header")
            h, w = struct.unpack(">HH", sof[1:5])
            return w, h
        pos += 2 + length
    raise _unreadable(what, path, "corrupt JPEG: too many segments before the frame header")


def probe(path: str | os.PathLike, what: str = "", resize_shorter: int | None = None) -> ImageInfo:
    """Format and size from the file's own header, every bound checked; nothing decoded, no PIL involved."""
    path = Path(path)
    st = _stat(path, what)
    try:
        with open(path, "rb") as f:
            fst = os.fstat(f.fileno())  # the file opened is the file checked (not swapped since the stat)
            if not stat.S_ISREG(fst.st_mode) or fst.st_size != st.st_size:
                raise _fail(what, path, "changed while it was being read")
            magic = f.read(8)
            if magic == _PNG_SIG:
                fmt, (w, h) = "PNG", _png_size(f, what, path)
            elif magic[:3] == b"\xff\xd8\xff":
                fmt, (w, h) = "JPEG", _jpeg_size(f, st.st_size, what, path)
            else:
                kind = (
                    "an image truncated before its header" if len(magic) < 8 else f"the file starts with {magic[:8]!r}"
                )
                raise _unreadable(what, path, f"neither PNG nor JPEG: {kind}")
    except OSError as e:
        raise _fail(what, path, f"cannot read ({e.strerror or type(e).__name__})") from None
    _check_size(what, path, w, h, resize_shorter)
    return ImageInfo(path, fmt, w, h, st.st_size)


def _check_png(mm, n: int) -> str | None:
    pos, seen_idat = 8, False
    while True:
        if pos + 8 > n:
            return "truncated PNG: no IEND chunk"
        length, ctype = struct.unpack(">I4s", mm[pos : pos + 8])
        end = pos + 8 + length + 4
        if length > 0x7FFFFFFF or end > n:
            return f"truncated PNG: chunk {ctype.decode('latin-1')!r} at byte {pos} runs past the end of the file"
        crc = zlib.crc32(memoryview(mm)[pos + 4 : pos + 8 + length])
        if crc != int.from_bytes(mm[end - 4 : end], "big") and not ctype[:1].islower():  # critical chunk: corrupt
            return f"corrupt PNG: chunk {ctype.decode('latin-1')!r} at byte {pos} fails its CRC"
        seen_idat |= ctype == b"IDAT"
        if ctype == b"IEND":
            return None if seen_idat else "corrupt PNG: no image data (IDAT)"
        pos = end


def _check_jpeg(mm, n: int) -> str | None:
    """Marker segments up to the first scan (a frame header before it), then an end-of-image marker after it.
    Entropy-coded data never holds FF D9 (an FF in it is followed by 00 or RSTn), so a file cut anywhere after
    its first scan has no EOI past that scan; trailing bytes after the EOI (camera trailers) are allowed."""
    pos, frame = 2, False
    while True:
        if pos + 4 > n:
            return "truncated JPEG: no image data"
        if mm[pos] != 0xFF:
            return f"corrupt JPEG: no marker at byte {pos}"
        marker = mm[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0xD9:
            return "corrupt JPEG: no image data before the end-of-image marker"
        if marker in _STANDALONE:
            pos += 2
            continue
        length = int.from_bytes(mm[pos + 2 : pos + 4], "big")
        end = pos + 2 + length
        if length < 2 or end > n:
            return f"truncated JPEG: segment at byte {pos} runs past the end of the file"
        frame |= marker in _SOF
        if marker == 0xDA:
            if not frame:
                return "corrupt JPEG: image data before the frame header (SOF)"
            return None if mm.rfind(b"\xff\xd9", end) >= 0 else "truncated JPEG: no end-of-image marker (EOI)"
        pos = end


def check_stream(path: str | os.PathLike, info: ImageInfo, what: str = "") -> None:
    """The whole file's structure, without decoding a pixel: a PNG's chunks (each inside the file, critical
    chunks' CRCs, IDAT, up to IEND); a JPEG's segments up to its first scan and an end-of-image marker after it. A truncated or
    damaged file is refused here instead of failing mid-run. The file is memory-mapped (read-only), not read."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = os.fstat(f.fileno()).st_size
            if n != info.bytes:
                raise _fail(what, path, "changed while it was being read")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                why = _check_png(mm, n) if info.format == "PNG" else _check_jpeg(mm, n)
    except (OSError, ValueError) as e:
        raise _fail(what, path, f"cannot read ({getattr(e, 'strerror', None) or type(e).__name__})") from None
    if why is not None:
        raise _unreadable(what, path, why)


def check_image(path: str | os.PathLike, what: str = "", resize_shorter: int | None = None) -> ImageInfo:
    """`probe` and `check_stream`: everything that can be known about the file without decoding it."""
    info = probe(path, what, resize_shorter)
    check_stream(path, info, what)
    return info


def open_image(path: str | os.PathLike, what: str = "", resize_shorter: int | None = None):
    """A PIL image of `path`, opened lazily (only the header read) after `probe`'s checks, restricted to the
    PNG and JPEG decoders; the caller closes it (`with im:`). Decoding it (convert, resize, load) stays within
    the bounds; the caller maps decode errors with `decode_error`."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    info = probe(path, what, resize_shorter)
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL's own guard, the same bound (a second line of defence)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the checks above say it
            im = Image.open(path, formats=PIL_FORMATS)
    except Image.DecompressionBombError:
        raise _fail(what, path, f"more than the {MAX_IMAGE_PIXELS} pixels allowed (refused before decoding)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise decode_error(path, e, what) from None
    if im.size != (info.width, info.height):  # two readings of one header disagree: refuse the file
        w, h = im.size
        im.close()
        raise _unreadable(what, path, f"corrupt header ({info.width}x{info.height} or {w}x{h} pixels)")
    return im


def decode_error(path: str | os.PathLike, e: BaseException, what: str = "") -> CaitError:
    """A decode failure (PIL's OSError "image file is truncated", a ValueError, ...) as one line naming the file."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return _unreadable(what, path, first)


def load_rgb(path: str | os.PathLike, what: str = "", resize_shorter: int | None = None):
    """The image decoded as RGB (what timm's folder reader gives), within the bounds; one-line CaitError."""
    from PIL import Image

    im = open_image(path, what, resize_shorter)
    try:
        with im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise decode_error(path, e, what) from None
