"""Typed configuration: the single source of truth for every width in a (fused) CAIT ViT.

Imports nothing of the package. A dense ViT, a CAIT checkpoint and a fused model are all described by
one `CaitConfig`; only the per-block widths differ.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from caitdeploy.core.errors import render

MERGE_KINDS = ("h", "v")
# token mixer of a block: multi-head attention, SPViT's 1x1 / 3x3 convolution (cross-head mixed, BatchNorm
# folded), or nothing at all (SPViT's pruned attention: the mixer returns its LayerNorm input)
BLOCK_KINDS = ("attn", "conv1", "conv3", "skip")
GLOBAL_POOLS = ("token", "avg")
RESTORE_MODES = ("repeat", "bilinear")  # how a merged grid goes back to the full patch grid (feature outputs)

# Structural bounds (inclusive) on untrusted sizes: what real ViTs use, with room (ViT-22B: depth 48, width 6144,
# 48 heads, mlp 24576). A config outside them is refused, naming the key and the bound, before any loop or
# allocation depends on it. `limits.py` holds the memory rule built on top of them.
BOUNDS: dict[str, tuple[int, int]] = {
    "img_size": (1, 8192),
    "patch_size": (1, 128),
    "in_chans": (1, 64),
    "num_classes": (1, 262144),
    "embed_dim": (1, 16384),
    "depth": (1, 256),
    "num_heads": (1, 256),
    "mlp_hidden": (1, 131072),
    "qk_dim": (1, 4096),  # per-head widths of a fused model (alignment may pad past the original)
    "v_dim": (1, 4096),
    "tokens": (2, 65537),  # prefix tokens + patch grid
    "reg_tokens": (0, 64),
}
MLP_RATIO_MAX = 16.0
LN_EPS_MAX = 0.1
MAX_JSON_BYTES = 4 << 20  # a 256-block config is about 40 KB


MODEL_OPTIONS = (
    "ln_eps",
    "family",
    "class_token",
    "dist_token",
    "reg_tokens",
    "no_embed_class",
    "global_pool",
    "fc_norm",
    "stem",
)
STEMS = ("patch", "4c", "6c")  # a patch projection, or LV-ViT's 4 / 6 conv stem (downsampling by 16)

FORMAT_KEYS = (
    "img_size",
    "patch_size",
    "in_chans",
    "num_classes",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
)
# The ViT family's checkpoint schema (docs/CHECKPOINT_FORMAT.md; Swin's is swin/model.py's FORMAT_KEYS and
# FORMAT_OPTIONAL): the required `config` keys of a cait-compactor/1 checkpoint, and the optional ones -> (default, accepted types). The model options of
# `CaitConfig` plus two the training model has and the fused model folds away: `layer_scale` (DeiT III's
# ls1/ls2 gammas, folded into proj/fc2) and `skip_lam` (LV-ViT's residual divisor, folded likewise); `arch`
# names the timm model the checkpoint came from (informational).
FORMAT_OPTIONAL: dict[str, tuple] = {
    "family": ("vit", (str,)),
    "arch": (None, (str, type(None))),
    "class_token": (True, (bool,)),
    "dist_token": (False, (bool,)),
    "reg_tokens": (0, (int,)),
    "no_embed_class": (False, (bool,)),
    "global_pool": ("token", (str,)),
    "fc_norm": (False, (bool,)),
    "ln_eps": (1e-6, (int, float)),
    "layer_scale": (False, (bool,)),
    "skip_lam": (1.0, (int, float)),
    "stem": ("patch", (str,)),
}
FOLDED_OPTIONS = ("arch", "layer_scale", "skip_lam")  # in a checkpoint's config, not in a deploy config
assert set(MODEL_OPTIONS) == set(FORMAT_OPTIONAL) - set(FOLDED_OPTIONS), "the ViT schema and CaitConfig disagree"


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model."""


def parse_feature_blocks(blocks, depth: int) -> tuple[int, ...]:
    """Block indices for feature outputs: an int, an int sequence or text '3,5,7,11'; negative indices count
    from the end. Sorted, without duplicates; ConfigError naming the entry otherwise."""
    if isinstance(blocks, str):
        parts = [p.strip() for p in blocks.split(",") if p.strip()]
        try:
            items = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"features {short(blocks)}: give block indices, e.g. 3,5,7,11") from None
    elif isinstance(blocks, int) and not isinstance(blocks, bool):
        items = [blocks]
    else:
        items = list(blocks)
    if not items:
        raise ConfigError("features: give at least one block index")
    out = set()
    for b in items:
        if isinstance(b, bool) or not isinstance(b, int):
            raise ConfigError(f"features: block index {short(b)} is not an integer")
        if not -depth <= b < depth:
            raise ConfigError(f"features: block {b} is outside 0..{depth - 1} (the model has {depth})")
        out.add(b % depth)
    return tuple(sorted(out))


def short(value: Any, limit: int = 60) -> str:
    """repr of an untrusted value, bounded and cycle-safe (errors.render), cut to `limit` characters."""
    return render(value, limit)


def check_bound(value, key: str, bound: str | None = None, what: str = "") -> int:
    """`value` as an int within BOUNDS[bound or key]; ConfigError naming `key` otherwise."""
    lo, hi = BOUNDS[bound or key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what}{key} must be an integer, got {short(value)}")
    if not lo <= value <= hi:
        raise ConfigError(f"{what}{key} = {value} is outside {lo}..{hi} (the bound for real ViTs)")
    return value


def image_size(value: Any) -> int | tuple[int, int]:
    """An input size as the config stores it: an int for a square image, (height, width) otherwise.
    Takes an int, a 2-sequence, or text '512' / '512x1024' (height x width); each side within BOUNDS."""
    v = value
    if isinstance(v, str):
        parts = v.lower().replace("×", "x").split("x")
        # ASCII digits only: str.isdigit() also takes '²' and '٣', which int() refuses or misreads
        if not 1 <= len(parts) <= 2 or not all(
            p.strip().isascii() and p.strip().isdigit() and len(p.strip()) <= 9 for p in parts
        ):
            raise ConfigError(f"img_size {short(value)}: give one integer or HEIGHTxWIDTH, e.g. 512 or 512x1024")
        v = [int(p) for p in parts]
        v = v[0] if len(v) == 1 else v
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise ConfigError(f"img_size {short(value)}: give one integer or [height, width]")
        h, w = (check_bound(x, "img_size") for x in v)
        return h if h == w else (h, w)
    return check_bound(v, "img_size")


def size_and_restore(img_size: Any, restore: str) -> int | tuple[int, int] | None:
    """The --img-size / --restore pair of export and bench: the size as the config stores it (None if not
    given); OptionError naming the option otherwise."""
    from caitdeploy.core.errors import OptionError

    size = None
    if img_size is not None:
        try:
            size = image_size(img_size)
        except ConfigError as e:
            raise OptionError("img_size", str(e).removeprefix("img_size ")) from None
    if restore not in RESTORE_MODES:
        raise OptionError("restore", f"{restore!r}: choose one of {', '.join(RESTORE_MODES)}")
    return size


@dataclass(frozen=True)
class BlockConfig:
    """Widths of one transformer block after fusing.

    qk_dim: kept query/key channels per head (the same in q and k: attention-level consistency).
    v_dim: kept value channels per head.
    mlp_hidden: kept fc1 output channels.
    merge: ATME merge applied to the block input before norm1: None, "h" or "v".
    attn_scale: softmax scale, the ORIGINAL head_dim ** -0.5, never recomputed from qk_dim.
    kind: the token mixer, "attn" (default), "conv1"/"conv3" (SPViT convolution over the patch grid, v_dim
        channels per head; qk_dim unused) or "skip" (no mixer: the block adds its LayerNorm output).
    slim: SiT token slimming before this block (after its merge): the patch tokens become `slim` learned
        mixtures of them (no longer a grid), or None.
    """

    num_heads: int
    qk_dim: int
    v_dim: int
    mlp_hidden: int
    attn_scale: float
    merge: str | None = None
    kind: str = "attn"
    slim: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_heads", "qk_dim", "v_dim", "mlp_hidden"):
            check_bound(getattr(self, name), name, what="block ")
        if self.merge not in (None, *MERGE_KINDS):
            raise ConfigError(f"block merge must be None, 'h' or 'v', got {short(self.merge)}")
        if self.kind not in BLOCK_KINDS:
            raise ConfigError(f"block kind must be one of {', '.join(BLOCK_KINDS)}, got {short(self.kind)}")
        if self.slim is not None:
            check_bound(self.slim, "slim", bound="tokens", what="block ")
        if isinstance(self.attn_scale, bool) or not isinstance(self.attn_scale, (int, float)):
            raise ConfigError(f"block attn_scale must be a number, got {short(self.attn_scale)}")
        if not (self.attn_scale > 0 and math.isfinite(self.attn_scale)):
            raise ConfigError(f"block attn_scale must be a positive finite number, got {render(self.attn_scale)}")


@dataclass(frozen=True)
class CaitConfig:
    """A ViT (timm layout) with per-block widths, ATME merges and the options of its model family.

    Prefix tokens, in order: class token, distillation token, registers (timm's order). `global_pool`
    "token" reads the class token (with a distillation token: the mean of `head` on it and `head_dist` on the
    distillation token, timm's eval output); "avg" averages the patch tokens. `fc_norm`: the final LayerNorm
    comes after pooling (timm's fc_norm) instead of before. `no_embed_class`: pos_embed covers the patch
    tokens only. `family` names the model family (models/): its stem and block variants.
    """

    img_size: int | tuple[int, int]  # square side, or (height, width) for a non-square input
    patch_size: int
    in_chans: int
    num_classes: int
    embed_dim: int
    qkv_bias: bool
    blocks: tuple[BlockConfig, ...]
    ln_eps: float = 1e-6
    # widths of the unpruned model this one was fused from (for reports); empty for a dense model
    source: dict[str, Any] = field(default_factory=dict)
    family: str = "vit"
    class_token: bool = True
    dist_token: bool = False
    reg_tokens: int = 0
    no_embed_class: bool = False
    global_pool: str = "token"
    fc_norm: bool = False
    stem: str = "patch"  # "patch" (one patch-sized conv) or LV-ViT's "4c" / "6c" conv stems (family "lvvit")

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_size", image_size(self.img_size))
        for key in ("patch_size", "in_chans", "num_classes", "embed_dim"):
            check_bound(getattr(self, key), key)
        if not isinstance(self.qkv_bias, bool):
            raise ConfigError(f"qkv_bias must be true or false, got {short(self.qkv_bias)}")
        if (
            isinstance(self.ln_eps, bool)
            or not isinstance(self.ln_eps, (int, float))
            or not (0 < self.ln_eps <= LN_EPS_MAX)
        ):  # NaN fails the comparison too
            raise ConfigError(f"ln_eps must be a number in (0, {LN_EPS_MAX:g}], got {short(self.ln_eps)}")
        if not isinstance(self.source, dict):
            raise ConfigError(f"source must be a dict, got {type(self.source).__name__}")
        for key in ("class_token", "dist_token", "no_embed_class", "fc_norm"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {short(getattr(self, key))}")
        check_bound(self.reg_tokens, "reg_tokens")
        if self.stem not in STEMS:
            raise ConfigError(f"stem must be one of {', '.join(STEMS)}, got {short(self.stem)}")
        if self.stem != "patch" and (self.patch_size != 16 or self.embed_dim % 8):
            raise ConfigError(
                f"stem {render(self.stem)} downsamples by 16 into embed_dim / 8.. channels: it needs "
                f"patch_size 16 and embed_dim divisible by 8 (got {self.patch_size}, {self.embed_dim})"
            )
        if not isinstance(self.family, str) or not self.family.isidentifier() or len(self.family) > 32:
            raise ConfigError(f"family must be a short name, got {short(self.family)}")
        if self.global_pool not in GLOBAL_POOLS:
            raise ConfigError(f"global_pool must be one of {', '.join(GLOBAL_POOLS)}, got {short(self.global_pool)}")
        if self.global_pool == "token" and not self.class_token:
            raise ConfigError("global_pool 'token' needs a class token")
        if self.dist_token and (not self.class_token or self.global_pool != "token"):
            raise ConfigError("a distillation token needs a class token and global_pool 'token'")
        for side, name in zip(self.image_hw, ("height", "width")):
            if side % self.patch_size:
                raise ConfigError(
                    f"img_size {self.size_text}: image {name} {side} is not a multiple of patch_size {self.patch_size}"
                )
        gh, gw = self.grid
        check_bound(self.num_prefix_tokens + gh * gw, "tokens (prefix tokens + patch grid)", bound="tokens")
        if not isinstance(self.blocks, (tuple, list)) or not self.blocks:
            raise ConfigError("a model needs at least one block")
        check_bound(len(self.blocks), "depth")
        if not all(isinstance(b, BlockConfig) for b in self.blocks):
            raise ConfigError("blocks must be BlockConfig objects")
        object.__setattr__(self, "blocks", tuple(self.blocks))
        self.grids()  # validates merges against the grid

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def image_hw(self) -> tuple[int, int]:
        """(height, width) of the input images."""
        s = self.img_size
        return (s, s) if isinstance(s, int) else (s[0], s[1])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one input image."""
        return (self.in_chans, *self.image_hw)

    @property
    def size_text(self) -> str:
        """'224' for a square input, '512x1024' (height x width) otherwise."""
        h, w = self.image_hw
        return str(h) if h == w else f"{h}x{w}"

    @property
    def grid(self) -> tuple[int, int]:
        """(Gh, Gw): the patch grid of the input."""
        h, w = self.image_hw
        return (h // self.patch_size, w // self.patch_size)

    def at_size(self, img_size) -> CaitConfig:
        """The same model run on another input size (int, (H, W) or 'HxW'): merges and 3x3 convolutions are
        re-checked against the new grid (ConfigError naming the block when a merged side is odd). The
        `source` widths follow, so `unpruned()` gives the dense model at the same size."""
        hw = image_size(img_size)
        src = dict(self.source)
        if src:
            src["img_size"] = hw if isinstance(hw, int) else list(hw)
        try:
            return replace(self, img_size=hw, source=src)
        except ConfigError as e:
            text = str(hw) if isinstance(hw, int) else f"{hw[0]}x{hw[1]}"
            raise ConfigError(str(e) if str(e).startswith("img_size") else f"img_size {text}: {e}") from None

    @property
    def merges(self) -> dict[int, str]:
        return {i: b.merge for i, b in enumerate(self.blocks) if b.merge}

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.dist_token) + self.reg_tokens

    def grids(self) -> list[tuple[int, int]]:
        """Patch tokens (Gh, Gw) seen by each block's mixer (after that block's merge and slimming).

        After a token slimming the tokens are no longer a grid: they count as (1, slim) and a later merge or
        3x3 convolution is refused."""
        gh, gw = self.grid
        spatial = True
        out = []
        for i, b in enumerate(self.blocks):
            if b.merge and not spatial:
                raise ConfigError(
                    f"block {i}: a {b.merge} merge after token slimming (the tokens are no longer a grid)"
                )
            if b.merge == "h":
                if gw % 2:
                    raise ConfigError(
                        f"block {i}: horizontal merge on an odd grid width {gw} (grid {gh}x{gw}); "
                        "merges need even grid sides"
                    )
                gw //= 2
            elif b.merge == "v":
                if gh % 2:
                    raise ConfigError(
                        f"block {i}: vertical merge on an odd grid height {gh} (grid {gh}x{gw}); "
                        "merges need even grid sides"
                    )
                gh //= 2
            if b.slim is not None:
                if b.slim > gh * gw:
                    raise ConfigError(f"block {i}: token slimming to {b.slim} tokens from only {gh * gw}")
                gh, gw, spatial = 1, b.slim, False
            if b.kind == "conv3" and not spatial:
                raise ConfigError(
                    f"block {i}: a 3x3 convolution after token slimming (the tokens are no longer a grid)"
                )
            out.append((gh, gw))
        return out

    def feature_blocks(self, blocks) -> tuple[int, ...]:
        """Validated block indices for feature outputs (after each listed block): an int sequence or text
        '3,5,7,11'; negative indices count from the end; refused, naming the block, when a block's tokens are
        no longer a grid (after token slimming). Returns them sorted, without duplicates."""
        out = parse_feature_blocks(blocks, self.depth)
        for b in out:
            if any(blk.slim is not None for blk in self.blocks[: b + 1]):
                raise ConfigError(f"features: block {b} comes after token slimming; its tokens are no longer a grid")
        return out

    def patch_tokens_in(self, i: int) -> int:
        """Patch tokens entering block i (before its merge and slimming)."""
        gh, gw = self.input_grid(i)
        return gh * gw

    def input_grid(self, i: int) -> tuple[int, int]:
        """Patch grid entering block i (before its merge)."""
        return self.grid if i == 0 else self.grids()[i - 1]

    def tokens(self) -> list[int]:
        """Token count (class token included) seen by each block's attention."""
        p = self.num_prefix_tokens
        return [p + gh * gw for gh, gw in self.grids()]

    @property
    def pos_embed_len(self) -> int:
        gh, gw = self.grid
        return gh * gw + (0 if self.no_embed_class else self.num_prefix_tokens)

    # ---- constructors ----------------------------------------------------------------------
    @classmethod
    def dense(
        cls,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        merges: dict[int, str] | None = None,
        **options: Any,
    ) -> CaitConfig:
        """The unpruned model of a `cait-compactor/1` config (merges included, no channel pruning).

        options: the model-level fields beyond the widths (ln_eps, family, class_token, dist_token,
        reg_tokens, no_embed_class, global_pool, fc_norm, stem)."""
        check_bound(depth, "depth")
        check_bound(num_heads, "num_heads")
        check_bound(embed_dim, "embed_dim")
        if not (
            isinstance(mlp_ratio, (int, float)) and not isinstance(mlp_ratio, bool) and 0 < mlp_ratio <= MLP_RATIO_MAX
        ):  # NaN and Inf fail too
            raise ConfigError(f"mlp_ratio must be a number in (0, {MLP_RATIO_MAX:g}], got {short(mlp_ratio)}")
        if embed_dim % num_heads:
            raise ConfigError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        merges = {int(k): v for k, v in (merges or {}).items()}
        bad = [k for k in merges if not 0 <= k < depth]
        if bad:
            raise ConfigError(f"merge block index {bad[0]} is outside 0..{depth - 1}")
        d = embed_dim // num_heads
        hidden = int(embed_dim * mlp_ratio)
        check_bound(hidden, "mlp hidden width (embed_dim * mlp_ratio)", bound="mlp_hidden")
        blocks = tuple(BlockConfig(num_heads, d, d, hidden, d**-0.5, merges.get(i)) for i in range(depth))
        bad_opt = [k for k in options if k not in MODEL_OPTIONS]
        if bad_opt:
            raise ConfigError(f"unknown model option {short(bad_opt[0])}")
        return cls(img_size, patch_size, in_chans, num_classes, embed_dim, bool(qkv_bias), blocks, **options)

    def options(self) -> dict[str, Any]:
        """The model-level fields beyond the widths (what `dense(**options)` takes)."""
        return {k: getattr(self, k) for k in MODEL_OPTIONS}

    @classmethod
    def from_format(cls, cfg: dict[str, Any]) -> CaitConfig:
        """Dense config from the `config` dict of a `cait-compactor/1` checkpoint (its optional keys
        included; the training-only ones, layer_scale and skip_lam, are folded away by `fuse`)."""
        return cls.dense(
            **{k: cfg[k] for k in MODEL_OPTIONS if k in cfg},
            img_size=image_size(cfg["img_size"]),
            patch_size=int(cfg["patch_size"]),
            in_chans=int(cfg["in_chans"]),
            num_classes=int(cfg["num_classes"]),
            embed_dim=int(cfg["embed_dim"]),
            depth=int(cfg["depth"]),
            num_heads=int(cfg["num_heads"]),
            mlp_ratio=float(cfg["mlp_ratio"]),
            qkv_bias=bool(cfg["qkv_bias"]),
            merges={int(k): v for k, v in cfg.get("merges", {}).items()},
        )

    def without_merges(self) -> CaitConfig:
        return replace(self, blocks=tuple(replace(b, merge=None) for b in self.blocks))

    def unpruned(self) -> CaitConfig:
        """The dense architecture this model came from: same depth, width, heads, no merges."""
        src = self.source
        if src:
            return CaitConfig.from_format({**src, "merges": {}})
        return replace(self, blocks=tuple(replace(b, merge=None, slim=None, kind="attn") for b in self.blocks))

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocks"] = [asdict(b) for b in self.blocks]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CaitConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        blocks_in = d.get("blocks")
        if not isinstance(blocks_in, list) or not blocks_in:
            raise ConfigError("config 'blocks' must be a non-empty list")
        check_bound(len(blocks_in), "depth")
        blocks = []
        for i, b in enumerate(blocks_in):
            if not isinstance(b, dict):
                raise ConfigError(f"config blocks[{i}] must be an object, got {type(b).__name__}")
            try:
                blocks.append(BlockConfig(**b))
            except TypeError as e:
                raise ConfigError(f"config blocks[{i}]: {short(str(e), 120)}") from None
            except ConfigError as e:
                raise ConfigError(f"config blocks[{i}]: {e}") from None
        rest = {k: v for k, v in d.items() if k != "blocks"}
        try:
            return cls(blocks=tuple(blocks), **rest)
        except TypeError as e:
            raise ConfigError(f"malformed config: {short(str(e), 120)}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CaitConfig:
        return cls.from_dict(strict_json(text, "config"))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ConfigError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str):
    raise ConfigError(f"{name} is not a JSON number")


def strict_json(text: Any, what: str) -> Any:
    """Parse untrusted JSON: oversized text, duplicate keys, NaN/Infinity and runaway nesting are refused."""
    if not isinstance(text, (str, bytes)):
        raise ConfigError(f"{what} must be JSON text, got {type(text).__name__}")
    if len(text) > MAX_JSON_BYTES:
        raise ConfigError(f"{what} JSON is {len(text)} bytes, more than the {MAX_JSON_BYTES} a config needs")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except ConfigError as e:  # (a ValueError too: first)
        raise ConfigError(f"{what} JSON: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit integer
        raise ConfigError(f"{what} is not valid JSON ({(str(e).splitlines() or [''])[0][:120]})") from None
