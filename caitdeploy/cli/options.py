"""The click parameter types every command's numeric (and size / block-list) options go through.

Values arrive as text. `int()` and `float()` take more than a user means: `int('٣')` is 3, `int('1_000')` is
1000, `float('nan')` is a float, and `str.isdigit('²')` is True while `int('²')` fails. Every type here takes
plain ASCII notation only, checks a real range, and otherwise fails as a click usage error, which the CLI
(`cli._Group`) prints as one line, exit 2, before any work:

    error: caitdeploy make-checkpoint: Invalid value for '--seed': 18446744073709551616 is not in the range
    0<=x<=4294967295. (see --help)

(Int and Float are click's IntRange / FloatRange with a strict parser in front: `--help` shows their ranges
and the wording is the one the older options had).

    Int(lo, hi)          an integer in lo..hi, both inclusive
    Float(lo, hi)        a finite float in [lo, hi] (lo_open / hi_open for open ends); NaN and Inf refused
    PORT                 a TCP port, 1..65535
    ImageSize()          `224` or `224x320` (HEIGHTxWIDTH), each side within config.BOUNDS["img_size"]; the value
                         stays text (`224`, `224x320`), as the commands pass it on
    BlockList()          `3,5,7,11`: block indices >= 0 (checked against the model's depth once it is loaded);
                         the value stays text, normalised
                         (these two word their errors as the library's checks of the same values do:
                         `--img-size 'abc': give one integer ...`, `--features block 7 is outside 0..3`)
    StrictInt(), StrictFloat()
                         the notation only (StrictFloat also passes `nan` / `inf` on), for the few options whose
                         range a library function checks with its own message (`limits.check_float`,
                         `export.tensorrt.check_build_options`): the option's help or the command names it

`parse_int` / `parse_float` (from `pipelines.common`) are the same rules for option text a command or a
pipeline parses itself (comma lists).
"""

from __future__ import annotations

import math
from typing import Any

import click

from caitdeploy.core.errors import safe_text

# the notation rules live with the pipelines, which check option text given to them as the commands do
from caitdeploy.pipelines.common import _INT, MAX_CHARS, parse_float, parse_int

INT64 = 1 << 63


def _shown(value: Any) -> str:
    return f"'{safe_text(value, 40)}'"


class Int(click.IntRange):
    """An integer in lo..hi (inclusive), ASCII digits only. A click IntRange underneath: `--help` shows the range
    and out-of-range values get its message."""

    def __init__(self, lo: int, hi: int) -> None:
        super().__init__(lo, hi)
        self.lo, self.hi = lo, hi

    def convert(self, value, param, ctx):
        v = parse_int(value)
        if v is None:
            self.fail(f"{_shown(value)} is not a valid integer.", param, ctx)
        return super().convert(v, param, ctx)

    def __repr__(self) -> str:
        return f"Int({self.lo}, {self.hi})"


class Float(click.FloatRange):
    """A finite float in [lo, hi] (open ends with lo_open / hi_open), ASCII decimal notation only; NaN and Inf
    refused. A click FloatRange underneath (range in `--help`, its message out of range)."""

    def __init__(self, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
        super().__init__(lo, hi, min_open=lo_open, max_open=hi_open)
        self.lo, self.hi = lo, hi

    def convert(self, value, param, ctx):
        v = parse_float(value, finite=False)
        if v is None:
            self.fail(f"{_shown(value)} is not a valid float.", param, ctx)
        if not math.isfinite(v):
            self.fail(f"{_shown(value)} is not a finite number.", param, ctx)
        return super().convert(v, param, ctx)

    def __repr__(self) -> str:
        return f"Float({self.lo}, {self.hi})"


class StrictInt(click.ParamType):
    """ASCII integer notation within +-2**63; the option's real range is checked by a library function."""

    name = "integer"

    def convert(self, value, param, ctx):
        v = parse_int(value)
        if v is None:
            self.fail(f"{_shown(value)} is not a valid integer.", param, ctx)
        if not -INT64 <= v < INT64:
            self.fail(f"{v} is not in the range {-INT64}<=x<={INT64 - 1}.", param, ctx)
        return v


class StrictFloat(click.ParamType):
    """ASCII decimal notation, or `nan` / `inf` spelled out, passed on to a library check (`limits.check_float`)
    that refuses them, and values out of range, naming the option."""

    name = "float"

    def convert(self, value, param, ctx):
        v = parse_float(value, finite=False)
        if v is None:
            self.fail(f"{_shown(value)} is not a valid float.", param, ctx)
        return v


PORT = Int(1, 65535)
PORT.name = "port"


def _flag(param) -> str:
    opts = [o for o in (getattr(param, "opts", None) or []) if o.startswith("--")]
    return max(opts, key=len) if opts else f"--{getattr(param, 'name', None) or 'value'}".replace("_", "-")


def _option_error(param, ctx, detail: str):
    """A usage error worded as the library's OptionError (`--img-size 'abc': give ...`): the image size and
    block list are also checked by library functions (config.image_size, config.parse_feature_blocks) and the
    two must read the same."""
    raise click.UsageError(f"{_flag(param)} {detail}", ctx)


class ImageSize(click.ParamType):
    """An input resolution: `224` (square) or `224x320` (height x width), ASCII digits, each side within
    config.BOUNDS["img_size"] (config.image_size, the same parser the library uses); the value stays text,
    normalised (`224`, `224x320`)."""

    name = "size"

    def get_metavar(self, param, ctx=None) -> str:
        return "N|HxW"

    def convert(self, value, param, ctx):
        from caitdeploy.families.vit.config import ConfigError, image_size

        text = str(value)
        if len(text) > MAX_CHARS:
            _option_error(param, ctx, f"{_shown(value)}: give one integer or HEIGHTxWIDTH, e.g. 512 or 512x1024")
        try:
            size = image_size(text)
        except ConfigError as e:
            _option_error(param, ctx, safe_text(str(e).removeprefix("img_size "), 300))
        return str(size) if isinstance(size, int) else f"{size[0]}x{size[1]}"


class BlockList(click.ParamType):
    """Block indices `3,5,7,11`, each >= 0 (the model's depth bounds them once it is known); text, normalised."""

    name = "blocks"

    def get_metavar(self, param, ctx=None) -> str:
        return "I,J,..."

    def convert(self, value, param, ctx):
        from caitdeploy.families.vit.config import BOUNDS

        hi = BOUNDS["depth"][1] - 1
        text = str(value)
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if len(text) > 4096 or not parts or not all(_INT.fullmatch(p) and len(p) <= 9 for p in parts):
            _option_error(param, ctx, f"{_shown(value)}: give block indices, e.g. 3,5,7,11")
        idx = [int(p) for p in parts]
        for i in idx:
            if not 0 <= i <= hi:
                _option_error(
                    param,
                    ctx,
                    f"block {i} is outside 0..{hi} (blocks count from 0, the first block; "
                    "negative indices are not taken)",
                )
        return ",".join(map(str, idx))
