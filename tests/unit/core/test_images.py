"""Untrusted images (caitdeploy.core.images): every bound checked from the header before a pixel is decoded, damaged
files refused without decoding, one line naming the file; int8 calibration images go through the same checks."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from caitdeploy.core.budgets import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE
from caitdeploy.core.errors import CaitError
from caitdeploy.core.images import check_image, load_rgb, open_image, probe

REPO = Path(__file__).resolve().parents[3]


# ---- image writers --------------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(w: int, h: int, honest: bool = True) -> bytes:
    """A greyscale PNG of w x h black pixels: `honest` compresses every row (a real decompression bomb: tiny
    file, huge image); otherwise the image data is a few bytes (only the header matters to the check)."""
    c = zlib.compressobj(9)
    if honest:
        row = bytes(w + 1)
        idat = b"".join(c.compress(row) for _ in range(h)) + c.flush()
    else:
        idat = c.compress(bytes(64)) + c.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def write_image(path: Path, size=(40, 30), mode="RGB", fmt=None, **save) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    img = Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"), "RGB").convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **save)
    return path


def _hostile(d: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, pattern of the one-line error)."""
    d.mkdir(parents=True, exist_ok=True)
    ok_png = write_image(d / "ok.png").read_bytes()
    ok_jpg = write_image(d / "ok.jpg", fmt="JPEG", quality=90).read_bytes()
    prog = write_image(d / "prog.jpg", fmt="JPEG", quality=90, progressive=True).read_bytes()
    cases = {
        "zero bytes": (b"", r"the file is empty"),
        "garbage": (b"this is not an image at all", r"neither PNG nor JPEG"),
        "PNG signature only": (ok_png[:8], r"truncated PNG header"),
        "truncated PNG": (ok_png[: len(ok_png) // 2], r"truncated PNG"),
        "PNG with a damaged chunk": (ok_png[:60] + bytes([ok_png[60] ^ 0xFF]) + ok_png[61:], r"fails its CRC"),
        "truncated JPEG": (ok_jpg[: len(ok_jpg) // 2], r"truncated JPEG: no end-of-image marker"),
        "truncated progressive JPEG": (prog[:-200], r"truncated JPEG: no end-of-image marker"),
        "JPEG without a frame": (b"\xff\xd8\xff\xd9", r"corrupt JPEG"),
        "60000000 x 1": (png_bytes(60_000_000, 1), r"60000000x1 pixels: a side longer than the 16384 allowed"),
        "16385 x 2": (png_bytes(MAX_IMAGE_SIDE + 1, 2, honest=False), r"a side longer than the 16384"),
        "30000 x 30000": (png_bytes(30000, 30000, honest=False), r"30000x30000 pixels: a side longer"),
        "13000 x 13000": (png_bytes(13000, 13000), rf"13000x13000 pixels, more than the {MAX_IMAGE_PIXELS} allowed"),
        "0 x 5": (png_bytes(0, 5, honest=False), r"its header says 0x5 pixels"),
    }
    out = {}
    for i, (name, (data, pattern)) in enumerate(cases.items()):
        p = d / f"bad{i}.png"
        p.write_bytes(data)
        out[name] = (p, pattern)
    os.mkfifo(d / "fifo.png")
    out["a FIFO (never opened)"] = (d / "fifo.png", r"not a regular file")
    os.symlink("/dev/zero", d / "zero_device.png")
    out["a link to /dev/zero"] = (d / "zero_device.png", r"not a regular file")
    with open(d / "sparse.png", "wb") as f:  # 300 MB that take no disk: refused from stat, never read
        f.write(ok_png[:16])
        f.truncate(MAX_IMAGE_BYTES + 1)
    out["larger than the file bound"] = (d / "sparse.png", rf"{MAX_IMAGE_BYTES + 1} bytes, more than the")
    os.symlink(d / "sparse.png", d / "link.png")
    out["a link to a file too large"] = (d / "link.png", r"bytes, more than the")
    os.symlink(d / "missing.png", d / "broken.png")
    out["a broken link"] = (d / "broken.png", r"cannot read \(No such file")
    return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return _hostile(tmp_path_factory.mktemp("images"))


# ---- the checks -----------------------------------------------------------------------------------------
HOSTILE = [
    "zero bytes",
    "garbage",
    "PNG signature only",
    "truncated PNG",
    "PNG with a damaged chunk",
    "truncated JPEG",
    "truncated progressive JPEG",
    "JPEG without a frame",
    "60000000 x 1",
    "16385 x 2",
    "30000 x 30000",
    "13000 x 13000",
    "0 x 5",
    "a FIFO (never opened)",
    "a link to /dev/zero",
    "larger than the file bound",
    "a link to a file too large",
    "a broken link",
]


def test_the_table_is_complete(hostile):
    assert sorted(hostile) == sorted(HOSTILE)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_images_are_one_line_errors_naming_the_file(hostile, name):
    import re

    path, pattern = hostile[name]
    with pytest.raises(CaitError) as ei:
        check_image(path, "--data")
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"--data {path}: "), msg
    assert re.search(pattern, msg), msg
    with pytest.raises(CaitError):  # loading refuses it too (before decoding, or as a decode error)
        load_rgb(path, "--data")


def test_bounds_come_before_pil(hostile, monkeypatch):
    """The size checks read the header themselves: PIL never opens a file whose header is out of bounds."""
    from PIL import Image

    def never(*a, **k):
        raise AssertionError("PIL opened an image the checks refuse")

    monkeypatch.setattr(Image, "open", never)
    for name in ("60000000 x 1", "30000 x 30000", "13000 x 13000", "zero bytes", "a FIFO (never opened)"):
        with pytest.raises(CaitError):
            open_image(hostile[name][0])


def test_resize_bound_refuses_elongated_images(tmp_path):
    """16384 x 15 passes each bound, but resized to a shorter side of 256 (int8 calibration at 224) it would be
    279620 x 256 = 71.6 Mpx; at 16384 x 16 it is exactly 64 Mi pixels, within."""
    p = tmp_path / "thin.png"
    p.write_bytes(png_bytes(16384, 15, honest=False))
    assert probe(p).pixels == 16384 * 15
    with pytest.raises(
        CaitError,
        match=r"16384x15 pixels: resized to a shorter side of 256 it would be 279620x256, "
        r"more than the 67108864 pixels allowed \(too elongated\)",
    ):
        probe(p, "--calib", resize_shorter=256)
    assert probe(p, resize_shorter=128).width == 16384  # 139810 x 128: within
    q = tmp_path / "edge.png"
    q.write_bytes(png_bytes(16384, 16, honest=False))
    assert probe(q, resize_shorter=256).height == 16


@pytest.mark.parametrize(
    "mode,fmt,save",
    [
        ("RGB", "PNG", {}),
        ("L", "PNG", {}),
        ("RGBA", "PNG", {}),
        ("P", "PNG", {}),
        ("I;16", "PNG", {}),
        ("LA", "PNG", {}),
        ("RGB", "JPEG", {"quality": 90}),
        ("L", "JPEG", {}),
        ("CMYK", "JPEG", {}),
        ("RGB", "JPEG", {"progressive": True}),
        ("RGB", "PNG", {"optimize": True}),
    ],
)
def test_good_images_load_as_rgb(tmp_path, mode, fmt, save):
    p = write_image(tmp_path / f"x.{fmt.lower()}", (37, 23), mode, fmt, **save)
    info = check_image(p)
    assert (info.format, info.width, info.height) == (fmt, 37, 23)
    img = load_rgb(p)
    assert img.mode == "RGB" and img.size == (37, 23)


def test_jpeg_with_trailing_bytes_and_misnamed_files_are_accepted(tmp_path):
    """Camera trailers after the end-of-image marker are allowed; the content decides the format, not the name."""
    p = write_image(tmp_path / "t.jpg", fmt="JPEG")
    p.write_bytes(p.read_bytes() + b"\xff\xd8 trailer \xff\xd9 more")
    assert check_image(p).format == "JPEG" and load_rgb(p).size == (40, 30)
    q = write_image(tmp_path / "really_a_png.jpg", fmt="PNG")
    assert check_image(q).format == "PNG"


def test_other_formats_are_refused(tmp_path):
    """Only the PNG and JPEG decoders are used: a GIF or BMP named .png is refused, not decoded."""
    for fmt in ("GIF", "BMP", "TIFF"):
        p = write_image(tmp_path / f"{fmt}.png", fmt=fmt)
        with pytest.raises(CaitError, match="neither PNG nor JPEG"):
            check_image(p)


def test_damage_past_the_check_is_a_decode_error_naming_the_file(tmp_path):
    """A PNG whose compressed data is garbage with valid CRCs passes the structural check; decoding it is one
    line naming the file (what `train` reports mid-run)."""
    raw = b"".join(b"\x00" + bytes(range(96)) for _ in range(32))
    comp = zlib.compress(raw)
    idat = comp[:10] + bytes(b ^ 0x5A for b in comp[10:])
    p = tmp_path / "stream.png"
    p.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0))
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )
    check_image(p)
    with pytest.raises(CaitError, match=rf"^--data {p}: not a readable PNG/JPEG image \(.+\)$"):
        load_rgb(p, "--data")


# ---- int8 calibration images ------------------------------------------------------------------------------
def test_calibration_bombs_refused_under_a_memory_limit(tmp_path):
    """The 60,000,000 x 1 PNG passed the old 64 Mpx check and the resize asked for 19 G pixels; a 13000^2 PNG was
    decoded whole. With 1 GiB of address space beyond what the imports map, each is one line naming the file, in
    well under a second, and the process never grows past 1 GiB resident."""
    cases = {"long": png_bytes(60_000_000, 1), "square": png_bytes(13000, 13000), "thin": png_bytes(16384, 15)}
    for name, data in cases.items():
        d = tmp_path / name
        d.mkdir()
        write_image(d / "a_good.png", (70, 90))
        (d / "b_bomb.png").write_bytes(data)
    code = textwrap.dedent(f"""
        import resource, sys, time
        from caitdeploy.core.errors import CaitError
        from caitdeploy.export.quantize import calibration_images
        import PIL.Image, PIL.PngImagePlugin
        vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))
        for name in {list(cases)!r}:
            t = time.perf_counter()
            try:
                calibration_images({str(tmp_path)!r} + "/" + name, (3, 224, 224), samples=8)
                print(name, "ACCEPTED")
            except CaitError as e:
                print(name, round(time.perf_counter() - t, 2), str(e))
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent (the pytest process)
        print("maxrss_kb", next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in p.stdout.splitlines())
    assert "60000000x1 pixels: a side longer than the 16384" in lines["long"], lines
    assert "13000x13000 pixels, more than the 67108864 allowed" in lines["square"], lines
    assert "too elongated" in lines["thin"], lines
    for name in cases:
        seconds, msg = lines[name].split(" ", 1)
        assert float(seconds) < 2 and msg.startswith(f"--calib {tmp_path / name / 'b_bomb.png'}: "), lines[name]
    assert int(lines["maxrss_kb"]) < 1 << 20, lines["maxrss_kb"]  # < 1 GiB: nothing was decoded


def test_calibration_accepts_what_it_always_did(tmp_path):
    from caitdeploy.export.quantize import calibration_images

    write_image(tmp_path / "c" / "a.png", (90, 70))
    write_image(tmp_path / "c" / "b.jpg", (64, 64), fmt="JPEG")
    write_image(tmp_path / "c" / "c.png", (50, 120), mode="P")
    x, info = calibration_images(tmp_path / "c", (3, 64, 64))
    assert x.shape == (3, 3, 64, 64) and info["images"] == 3 and np.isfinite(x).all()
