"""Typed configuration: the single source of truth for every width in a (fused) CAIT ViT.

Imports nothing of the package. A dense ViT, a CAIT checkpoint and a fused model are all described by
one `CaitConfig`; only the per-block widths differ.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

MERGE_KINDS = ("h", "v")


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model."""


@dataclass(frozen=True)
class BlockConfig:
    """Widths of one transformer block after fusing.

    qk_dim: kept query/key channels per head (the same in q and k: attention-level consistency).
    v_dim: kept value channels per head.
    mlp_hidden: kept fc1 output channels.
    merge: ATME merge applied to the block input before norm1: None, "h" or "v".
    attn_scale: softmax scale, the ORIGINAL head_dim ** -0.5, never recomputed from qk_dim.
    """

    num_heads: int
    qk_dim: int
    v_dim: int
    mlp_hidden: int
    attn_scale: float
    merge: str | None = None

    def __post_init__(self) -> None:
        for name in ("num_heads", "qk_dim", "v_dim", "mlp_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"block {name} must be a positive integer, got {value!r}")
        if self.merge not in (None, *MERGE_KINDS):
            raise ConfigError(f"block merge must be None, 'h' or 'v', got {self.merge!r}")
        if not (self.attn_scale > 0 and math.isfinite(self.attn_scale)):
            raise ConfigError(f"block attn_scale must be a positive finite number, got {self.attn_scale!r}")


@dataclass(frozen=True)
class CaitConfig:
    """A ViT (timm layout, class token, token pooling) with per-block widths and ATME merges."""

    img_size: int
    patch_size: int
    in_chans: int
    num_classes: int
    embed_dim: int
    qkv_bias: bool
    blocks: tuple[BlockConfig, ...]
    ln_eps: float = 1e-6
    # widths of the unpruned model this one was fused from (for reports); empty for a dense model
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if not self.blocks:
            raise ConfigError("a model needs at least one block")
        object.__setattr__(self, "blocks", tuple(self.blocks))
        self.grids()  # validates merges against the grid

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def grid(self) -> tuple[int, int]:
        g = self.img_size // self.patch_size
        return (g, g)

    @property
    def merges(self) -> dict[int, str]:
        return {i: b.merge for i, b in enumerate(self.blocks) if b.merge}

    def grids(self) -> list[tuple[int, int]]:
        """Patch grid (Gh, Gw) seen by each block's attention (after that block's merge)."""
        gh, gw = self.grid
        out = []
        for i, b in enumerate(self.blocks):
            if b.merge == "h":
                if gw % 2:
                    raise ConfigError(f"block {i}: horizontal merge on an odd grid width {gw} (grid {gh}x{gw})")
                gw //= 2
            elif b.merge == "v":
                if gh % 2:
                    raise ConfigError(f"block {i}: vertical merge on an odd grid height {gh} (grid {gh}x{gw})")
                gh //= 2
            out.append((gh, gw))
        return out

    def input_grid(self, i: int) -> tuple[int, int]:
        """Patch grid entering block i (before its merge)."""
        return self.grid if i == 0 else self.grids()[i - 1]

    def tokens(self) -> list[int]:
        """Token count (class token included) seen by each block's attention."""
        return [1 + gh * gw for gh, gw in self.grids()]

    # ---- constructors ----------------------------------------------------------------------
    @classmethod
    def dense(
        cls,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        merges: dict[int, str] | None = None,
    ) -> "CaitConfig":
        """The unpruned model of a `cait-compactor/1` config (merges included, no channel pruning)."""
        if embed_dim % num_heads:
            raise ConfigError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        merges = {int(k): v for k, v in (merges or {}).items()}
        bad = [k for k in merges if not 0 <= k < depth]
        if bad:
            raise ConfigError(f"merge block index {bad[0]} is outside 0..{depth - 1}")
        d = embed_dim // num_heads
        hidden = int(embed_dim * mlp_ratio)
        blocks = tuple(
            BlockConfig(num_heads, d, d, hidden, d**-0.5, merges.get(i)) for i in range(depth)
        )
        return cls(img_size, patch_size, in_chans, num_classes, embed_dim, bool(qkv_bias), blocks)

    @classmethod
    def from_format(cls, cfg: dict[str, Any]) -> "CaitConfig":
        """Dense config from the `config` dict of a `cait-compactor/1` checkpoint."""
        return cls.dense(
            img_size=int(cfg["img_size"]),
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

    def without_merges(self) -> "CaitConfig":
        return replace(self, blocks=tuple(replace(b, merge=None) for b in self.blocks))

    def unpruned(self) -> "CaitConfig":
        """The dense architecture this model came from: same depth, width, heads, no merges."""
        src = self.source
        if src:
            return CaitConfig.from_format({**src, "merges": {}})
        return self.without_merges()

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocks"] = [asdict(b) for b in self.blocks]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CaitConfig":
        try:
            blocks = tuple(BlockConfig(**b) for b in d["blocks"])
            rest = {k: v for k, v in d.items() if k != "blocks"}
            return cls(blocks=blocks, **rest)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"malformed fused config: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CaitConfig":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ConfigError(f"fused config is not valid JSON: {e}") from None
