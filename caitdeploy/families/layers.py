"""The deploy model's building blocks, shared by every family: ATME merge, attention whose q/k width may differ
from its v width, MLP, the block. Pure PyTorch, no compactors; they run whatever widths their config gives.

State-dict keys follow timm's VisionTransformer, plus `blocks.{i}.merge.fc.*` for ATME merges. The fused
qkv projection is one Linear whose rows are [q: H*qk_dim | k: H*qk_dim | v: H*v_dim].
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from caitdeploy.families.vit.config import BlockConfig

AttnImpl = Literal["math", "sdpa", "triton"]
ATTN_IMPLS = ("math", "sdpa", "triton")


def _triton_ok(x: torch.Tensor) -> bool:
    """Triton kernels run compiled on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests)."""
    if x.is_cuda:
        return True
    from caitdeploy.kernels import interpret_requested

    return interpret_requested()


def merge_tokens(x: torch.Tensor, grid_hw: tuple[int, int], kind: str) -> torch.Tensor:
    """Pair neighbouring patch tokens for an ATME merge (prefix tokens excluded).

    x: [B, Gh*Gw, D] patch tokens, row-major. Returns [B, Gh*Gw/2, 2D]:
    kind "h": token (r, c) = [x(r, 2c), x(r, 2c+1)], a contiguous reshape;
    kind "v": token (r, c) = [x(2r, c), x(2r+1, c)], a reshape + transpose.
    Batch stays -1 so an exported graph keeps it dynamic without shape arithmetic.
    """
    gh, gw = grid_hw
    d = x.shape[-1]
    if kind == "h":
        return x.reshape(-1, gh * (gw // 2), 2 * d)
    if kind == "v":
        x = x.reshape(-1, gh // 2, 2, gw, d).transpose(2, 3)
        return x.reshape(-1, (gh // 2) * gw, 2 * d)
    raise ValueError(f"unknown merge kind {kind!r}")


def restore_grid(
    tokens: torch.Tensor, grid_hw: tuple[int, int], full_hw: tuple[int, int], mode: str = "repeat"
) -> torch.Tensor:
    """Patch tokens on a (merged) grid -> a feature map on the full patch grid.

    tokens: [B, gh*gw, D], row-major, no prefix tokens. Returns [B, D, Gh, Gw] with Gh = fh*gh, Gw = fw*gw.
    mode "repeat": the exact inverse of the ATME grouping. A horizontal merge pairs columns (2c, 2c+1), a
    vertical one rows (2r, 2r+1), so after any sequence of them patch (r, c) lives in merged token
    (r // fh, c // fw) and each merged token is copied back to its fh x fw patches (Reshape + Expand).
    mode "bilinear": bilinear upsampling, align_corners=False (Resize in ONNX).
    """
    gh, gw = grid_hw
    big_h, big_w = full_hw
    d = tokens.shape[-1]
    fmap = tokens.transpose(1, 2).reshape(-1, d, gh, gw)
    if (gh, gw) == (big_h, big_w):
        return fmap
    fh, fw = big_h // gh, big_w // gw
    if (fh * gh, fw * gw) != (big_h, big_w):
        raise ValueError(f"grid {gh}x{gw} does not divide the patch grid {big_h}x{big_w}")
    if mode == "bilinear":  # integer factors: the same sampling as size=(Gh, Gw), with constant scales in ONNX
        return F.interpolate(fmap, scale_factor=(float(fh), float(fw)), mode="bilinear", align_corners=False)
    if mode != "repeat":
        raise ValueError(f"unknown restore mode {mode!r}: repeat or bilinear")
    fmap = fmap.reshape(-1, d, gh, 1, gw, 1).expand(-1, -1, -1, fh, -1, fw)
    return fmap.reshape(-1, d, big_h, big_w)


class TokenMerge(nn.Module):
    """ATME: concatenate two neighbouring patch tokens and fuse them with one Linear(2D -> D); the `prefix`
    tokens (class, distillation, registers) pass through untouched."""

    def __init__(self, dim: int, kind: str, grid_hw: tuple[int, int], prefix: int = 1):
        super().__init__()
        self.kind = kind
        self.grid_hw = grid_hw
        self.prefix = prefix
        self.fc = nn.Linear(2 * dim, dim)
        self.use_triton = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton and self.prefix == 1 and _triton_ok(x):  # the fused kernel knows one class token
            from caitdeploy.kernels import atme_merge_linear

            return atme_merge_linear(x, self.fc.weight, self.fc.bias, self.grid_hw, self.kind)
        p = self.prefix
        merged = self.fc(merge_tokens(x[:, p:], self.grid_hw, self.kind))
        return torch.cat([x[:, :p], merged], dim=1) if p else merged


class Attention(nn.Module):
    """Multi-head attention whose q/k head width may differ from its v head width."""

    def __init__(self, dim: int, cfg: BlockConfig, qkv_bias: bool, impl: AttnImpl = "sdpa"):
        super().__init__()
        self.num_heads, self.qk_dim, self.v_dim = cfg.num_heads, cfg.qk_dim, cfg.v_dim
        self.scale = cfg.attn_scale
        self.impl: AttnImpl = impl
        h = cfg.num_heads
        self.qkv = nn.Linear(dim, h * (2 * cfg.qk_dim + cfg.v_dim), bias=qkv_bias)
        self.proj = nn.Linear(h * cfg.v_dim, dim)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, N, D] -> q, k [B, H, N, qk_dim] and v [B, H, N, v_dim]."""
        b, n, _ = x.shape
        h, dqk, dv = self.num_heads, self.qk_dim, self.v_dim
        q, k, v = self.qkv(x).split([h * dqk, h * dqk, h * dv], dim=-1)
        return (
            q.reshape(b, n, h, dqk).transpose(1, 2),
            k.reshape(b, n, h, dqk).transpose(1, 2),
            v.reshape(b, n, h, dv).transpose(1, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h, dv = self.num_heads, self.v_dim
        q, k, v = self.heads(x)
        if self.impl == "triton" and _triton_ok(x):
            from caitdeploy.kernels import attention

            out = attention(q, k, v, self.scale)
        elif self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            # scale on q before the first MatMul: the pattern TensorRT fuses into one attention kernel
            attn = (q * self.scale) @ k.transpose(-2, -1)
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, h * dv))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: [merge] [slim] x + mixer(norm1(x)), x + mlp(norm2(x)).

    The mixer is attention (kind "attn"), or what the block kind's family module builds (`mixer`): SPViT's
    convolutions, or nothing ("skip": the block adds norm1(x) itself, as SPViT's pruned attention does).
    """

    def __init__(
        self,
        dim: int,
        cfg: BlockConfig,
        grid_in: tuple[int, int],
        qkv_bias: bool,
        eps: float,
        prefix: int = 1,
        mixer: nn.Module | None = None,
        slim: nn.Module | None = None,
    ):
        super().__init__()
        self.merge = TokenMerge(dim, cfg.merge, grid_in, prefix) if cfg.merge else None
        self.slim = slim
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, cfg, qkv_bias) if cfg.kind == "attn" else mixer
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merge is not None:
            x = self.merge(x)
        if self.slim is not None:
            x = self.slim(x)
        y = self.norm1(x)
        x = x + (y if self.attn is None else self.attn(y))
        return x + self.mlp(self.norm2(x))


class Compactor(nn.Module):
    """CDCP's compactor in the checkpoint form: `weight` [H, d, d] per head (`heads` given; after q, k or v) or
    [F, F] (`heads` None; after fc1), applied as y <- y @ W^T (per head on [B, H, N, d]); `mask` (1 = kept) the
    channels CDCP keeps. Identity at init. Every training model and the checkpoints' compactor models use it."""

    mask: torch.Tensor  # a buffer (registered in __init__)

    def __init__(self, heads: int | None, width: int, device=None, dtype=None):
        super().__init__()
        eye = torch.eye(width, device=device, dtype=dtype)
        self.weight = nn.Parameter(eye if heads is None else eye.repeat(heads, 1, 1))
        self.register_buffer("mask", torch.ones(width if heads is None else (heads, width), device=device, dtype=dtype))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self.weight.transpose(-1, -2)
