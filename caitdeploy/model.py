"""`CaitViT`: the deploy model. Pure PyTorch, no compactors; runs whatever widths its config gives.

State-dict keys follow timm's VisionTransformer, plus `blocks.{i}.merge.fc.*` for ATME merges. The fused
qkv projection is one Linear whose rows are [q: H*qk_dim | k: H*qk_dim | v: H*v_dim].
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import BlockConfig, CaitConfig

AttnImpl = Literal["math", "sdpa", "triton"]
ATTN_IMPLS = ("math", "sdpa", "triton")


def _triton_ok(x: torch.Tensor) -> bool:
    """Triton kernels run compiled on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests)."""
    if x.is_cuda:
        return True
    from .kernels import interpret_requested

    return interpret_requested()


def merge_tokens(x: torch.Tensor, grid_hw: tuple[int, int], kind: str) -> torch.Tensor:
    """Pair neighbouring patch tokens for an ATME merge (class token excluded).

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


class TokenMerge(nn.Module):
    """ATME: concatenate two neighbouring tokens and fuse them with one Linear(2D -> D)."""

    def __init__(self, dim: int, kind: str, grid_hw: tuple[int, int]):
        super().__init__()
        self.kind = kind
        self.grid_hw = grid_hw
        self.fc = nn.Linear(2 * dim, dim)
        self.use_triton = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton and _triton_ok(x):
            from .kernels import atme_merge_linear

            return atme_merge_linear(x, self.fc.weight, self.fc.bias, self.grid_hw, self.kind)
        cls_tok, patches = x[:, :1], x[:, 1:]
        return torch.cat([cls_tok, self.fc(merge_tokens(patches, self.grid_hw, self.kind))], dim=1)


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
        return (q.reshape(b, n, h, dqk).transpose(1, 2), k.reshape(b, n, h, dqk).transpose(1, 2),
                v.reshape(b, n, h, dv).transpose(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h, dv = self.num_heads, self.v_dim
        q, k, v = self.heads(x)
        if self.impl == "triton" and _triton_ok(x):
            from .kernels import attention

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
    def __init__(self, dim: int, cfg: BlockConfig, grid_in: tuple[int, int], qkv_bias: bool, eps: float):
        super().__init__()
        self.merge = TokenMerge(dim, cfg.merge, grid_in) if cfg.merge else None
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, cfg, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merge is not None:
            x = self.merge(x)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CaitViT(nn.Module):
    """A fused CAIT ViT (or any dense ViT) described by a `CaitConfig`.

    images: [B, in_chans, img_size, img_size] -> logits [B, num_classes].
    attn_impl: "sdpa" (default, fastest eager), "math" (explicit MatMul/Softmax/MatMul, used for export),
    or "triton" (kernels/ on CUDA, or on CPU under TRITON_INTERPRET=1; math elsewhere). kernels="triton" also
    routes ATME merges through the fused Triton merge-GEMM.
    """

    def __init__(self, config: CaitConfig, attn_impl: AttnImpl = "sdpa", kernels: str | None = None):
        super().__init__()
        self.config = config
        c = config
        d = c.embed_dim
        gh, gw = c.grid
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(c.in_chans, d, c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + gh * gw, d))
        self.blocks = nn.ModuleList(
            Block(d, b, c.input_grid(i), c.qkv_bias, c.ln_eps) for i, b in enumerate(c.blocks)
        )
        self.norm = nn.LayerNorm(d, eps=c.ln_eps)
        self.head = nn.Linear(d, c.num_classes)
        self.set_impl(attn_impl, kernels)

    def set_impl(self, attn_impl: AttnImpl = "sdpa", kernels: str | None = None) -> "CaitViT":
        """Choose the attention implementation and whether Triton kernels are used (on CUDA)."""
        if kernels not in (None, "triton"):
            raise ValueError(f"kernels must be None or 'triton', got {kernels!r}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        if kernels == "triton":
            attn_impl = "triton"
        for blk in self.blocks:
            blk.attn.impl = attn_impl
            if blk.merge is not None:
                blk.merge.use_triton = kernels == "triton"
        return self

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images)[:, 0])
