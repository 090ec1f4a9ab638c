"""CAIT training for any timm ViT: compactors + ATME merges around the original modules, CDCP control.

    model = cait_wrap(timm_vit, merges={4: "h", 8: "v"})     # forward = the `cait-compactor/1` forward
    ctl = CDCPController(model, flops_reduction=0.45)        # paper defaults: lam 1e-5, +0.025% every 25 its
    opt = torch.optim.SGD([{"params": model.compactor_parameters(), "weight_decay": 0},
                           {"params": model.base_parameters()}], lr=..., momentum=0.9)
    for x, y in loader:
        opt.zero_grad(); F.cross_entropy(model(x), y).backward()
        ctl.step()                                           # Eq. 2 gradients; masks re-selected on schedule
        opt.step()
    ctl.finalize()                                           # optional: masked rows -> exactly 0
    save_checkpoint(model, "cait.pth")                       # then `caitdeploy fuse cait.pth`

How the model is built. `cait_wrap` never changes a timm module's class and copies no forward state: it
builds new modules (`CaitTrainViT`, `CaitTrainBlock`, `CaitTrainAttention`, `CaitTrainMlp`) that HOLD the
original `Linear`/`LayerNorm`/`PatchEmbed` modules and parameters (shared, not copied: training the
wrapper trains the timm model's weights) under the same attribute names, and add the compactors and
merges. So `state_dict()` has exactly the `cait-compactor/1` keys and `forward` is the format's forward:
merge before norm1, q_h <- q_h C_h^T (k, v likewise), softmax scale from the ORIGINAL head width,
fc1 output <- h C^T before GELU. Dropout / drop-path modules of the timm model are reused (identity in eval).

The compactor gradient (the paper's Eq. 2, in the form of ResRep's gradient resetting):

    G(C_row) = dL/dC_row * mask_row + lam * C_row / ||C_row||

Masked rows (mask 0) get only the lasso term, so plain SGD shrinks their norm by lr*lam per step (more with
momentum) towards zero; kept rows get the task gradient plus the same lasso term (`lasso_on_kept=True`,
the paper's form; with `lasso_on_kept=False` kept rows get the task gradient only). Use SGD for the
compactors and no weight decay on them: an adaptive optimizer (Adam) rescales the lasso term and breaks
the lr*lam shrink rate. Masks are re-selected every `every` iterations by `cdcp.channel_scores` +
`cdcp.cdcp_select` at a FLOPs reduction raised by `step_ratio` per update until `flops_reduction`, so every
mask the model ever holds satisfies head-level and attention-level consistency. A re-selection may
re-admit a channel (it then gets its task gradient back), as in ResRep.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from caitdeploy.compress.cdcp import cdcp_select, channel_scores, save_checkpoint_dict
from caitdeploy.core.errors import CaitError
from caitdeploy.core.names import FORMAT, MERGE_KEY
from caitdeploy.families.flops import model_flops
from caitdeploy.families.layers import Compactor
from caitdeploy.families.timm_compat import check_supported, format_config_of
from caitdeploy.families.vit.config import CaitConfig, ConfigError

__all__ = [
    "CDCPController",
    "CaitTrainAttention",
    "CaitTrainBlock",
    "CaitTrainFamily",
    "CaitTrainMlp",
    "CaitTrainViT",
    "Compactor",
    "TokenMergeTrain",
    "cait_wrap",
    "checkpoint_dict",
    "save_checkpoint",
]


# ---- modules ------------------------------------------------------------------------------------
class CompactorLike(Protocol):
    """What CDCP asks of a compactor module (`families.layers.Compactor`, or a family's own)."""

    weight: nn.Parameter
    mask: torch.Tensor


class TokenMergeTrain(nn.Module):
    """ATME merge (HTM "h" / VTM "v"): Linear(2D -> D) on neighbouring token pairs, class token untouched.

    Initialised to the mean of the two tokens: W = [I/2, I/2], b = 0.
    """

    def __init__(self, dim: int, kind: str, grid_hw: tuple[int, int], device=None, dtype=None, prefix: int = 1):
        super().__init__()
        if kind not in MERGE_KEY:
            raise CaitError(f"merge kind {kind!r} must be 'h' or 'v'")
        gh, gw = grid_hw
        self.kind, self.grid_hw, self.prefix = kind, (gh, gw), prefix
        self.fc = nn.Linear(2 * dim, dim, device=device, dtype=dtype)
        with torch.no_grad():
            eye = torch.eye(dim, device=device, dtype=dtype)
            self.fc.weight.copy_(torch.cat([eye, eye], dim=1) / 2)
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from caitdeploy.families.layers import (
            merge_tokens,  # the one token-pairing function (CaitViT's); the reference keeps its own
        )

        p = self.prefix
        merged = self.fc(merge_tokens(x[:, p:], self.grid_hw, self.kind))
        return torch.cat([x[:, :p], merged], dim=1) if p else merged


class CaitTrainAttention(nn.Module):
    """timm Attention's qkv/proj (shared) + per-head q/k/v compactors."""

    q_compactor: Compactor  # added in __init__ (add_module)
    k_compactor: Compactor
    v_compactor: Compactor

    def __init__(self, attn: Any):  # a timm Attention
        super().__init__()
        self.num_heads, self.head_dim = int(attn.num_heads), int(attn.head_dim)
        self.scale = self.head_dim**-0.5  # the ORIGINAL head width, whatever the compactors prune
        self.qkv, self.proj = attn.qkv, attn.proj
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        w = attn.qkv.weight
        for name in ("q", "k", "v"):
            self.add_module(f"{name}_compactor", Compactor(self.num_heads, self.head_dim, w.device, w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, d]
        q, k, v = self.q_compactor(q), self.k_compactor(k), self.v_compactor(v)
        p = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, h * d)))


class CaitTrainMlp(nn.Module):
    """timm Mlp's fc1/act/fc2 (shared) + the fc1 compactor between fc1 and the activation."""

    def __init__(self, mlp: Any):  # a timm Mlp
        super().__init__()
        self.fc1, self.act, self.drop1, self.fc2, self.drop2 = mlp.fc1, mlp.act, mlp.drop1, mlp.fc2, mlp.drop2
        w = mlp.fc1.weight
        self.fc1_compactor = Compactor(None, w.shape[0], w.device, w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1_compactor(self.fc1(x))))))


class CaitTrainBlock(nn.Module):
    def __init__(
        self,
        blk: Any,
        merge: str | None,
        grid_in: tuple[int, int],
        prefix: int = 1,  # a timm Block
        skip_lam: float = 1.0,
    ):
        super().__init__()
        self.skip_lam = skip_lam  # LV-ViT divides both residual branches by it
        d = blk.norm1.weight.shape[0]
        if merge is not None:
            w = blk.norm1.weight
            self.add_module(MERGE_KEY[merge], TokenMergeTrain(d, merge, grid_in, w.device, w.dtype, prefix))
        self.merge_kind = merge
        self.norm1, self.norm2 = blk.norm1, blk.norm2
        self.attn = CaitTrainAttention(blk.attn)
        self.mlp = CaitTrainMlp(blk.mlp)
        self.drop_path1, self.drop_path2 = blk.drop_path1, blk.drop_path2
        self.ls1, self.ls2 = blk.ls1, blk.ls2  # layer scale (DeiT III) or Identity: `ls1.gamma` keys

    @property
    def merge(self) -> TokenMergeTrain | None:
        return None if self.merge_kind is None else getattr(self, MERGE_KEY[self.merge_kind])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (merge := self.merge) is not None:  # set exactly when merge_kind is
            x = merge(x)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x)))) / self.skip_lam
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))) / self.skip_lam


class _CompactorModel(Protocol):
    """What CompactorGroups' methods use of the nn.Module that mixes it in."""

    def compactors(self) -> list[tuple[int, str, CompactorLike]]: ...

    def compactor_parameters(self) -> list[nn.Parameter]: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


class CompactorGroups:
    """The parameter groups and masks of a CAIT training model, from its `compactors()`: (block, name, module)
    for every compactor, blocks numbered from 0 in order; `checkpoint_state_dict()` is its state under the
    checkpoint's keys (a model wrapped in place: its own state dict)."""

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()  # type: ignore[attr-defined]

    def compactor_parameters(self: _CompactorModel) -> list[nn.Parameter]:
        return [m.weight for _, _, m in self.compactors()]

    def base_parameters(self: _CompactorModel) -> list[nn.Parameter]:
        ids = {id(p) for p in self.compactor_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    def masks(self: _CompactorModel) -> list[dict[str, torch.Tensor]]:
        out: list[dict[str, torch.Tensor]] = []
        for i, n, m in self.compactors():
            while len(out) <= i:
                out.append({})
            out[i][n] = m.mask.detach().clone()
        return out


class CaitTrainViT(CompactorGroups, nn.Module):
    """A timm ViT with CAIT compactors and ATME merges; `state_dict()` is a `cait-compactor/1` state dict."""

    def __init__(self, vit: Any, merges: dict[int, str]):  # a timm VisionTransformer
        super().__init__()
        check_supported(vit, "cait_wrap")
        merges = {int(k): v for k, v in merges.items()}
        self.format_config = format_config_of(vit, merges)
        try:
            self.cait_config = CaitConfig.from_format(self.format_config)
        except ConfigError as e:
            raise CaitError(f"merges {merges}: {e}") from None
        c = self.cait_config
        for name in ("cls_token", "dist_token", "reg_token"):  # shared Parameters (None where absent)
            if getattr(vit, name, None) is not None:
                setattr(self, name, getattr(vit, name))
        self.pos_embed = vit.pos_embed
        self.patch_embed, self.pos_drop = vit.patch_embed, vit.pos_drop
        lam = float(self.format_config.get("skip_lam", 1.0))
        self.blocks = nn.ModuleList(
            CaitTrainBlock(b, merges.get(i), c.input_grid(i), c.num_prefix_tokens, lam)
            for i, b in enumerate(vit.blocks)
        )
        self.norm, self.fc_norm, self.head_drop, self.head = vit.norm, vit.fc_norm, vit.head_drop, vit.head
        if c.dist_token:
            self.head_dist = vit.head_dist

    @property
    def merges(self) -> dict[int, str]:
        return dict(self.cait_config.merges)

    def forward_features(self, x: torch.Tensor, blocks=None, restore: str = "repeat"):
        """Tokens after the final norm; with `blocks`, full-grid feature maps [B, D, Gh, Gw] of those blocks'
        outputs, exactly as `CaitViT.forward_features(x, blocks, restore)` gives them (dense prediction heads
        train on these)."""
        from caitdeploy.families.layers import restore_grid

        c = self.cait_config
        wanted = c.feature_blocks(blocks) if blocks is not None else ()
        from caitdeploy.families.vit.model import add_position

        x = self.patch_embed(x)
        prefix = [
            getattr(self, n).expand(x.shape[0], -1, -1)
            for n in ("cls_token", "dist_token", "reg_token")
            if hasattr(self, n)
        ]
        x = self.pos_drop(add_position(x, prefix, self.pos_embed, c.no_embed_class))
        out: list[torch.Tensor] = []
        grids, p = c.grids(), c.num_prefix_tokens
        for i, blk in enumerate(self.blocks):
            if wanted and i > wanted[-1]:
                return out
            x = blk(x)
            if i in wanted:
                out.append(restore_grid(x[:, p:], grids[i], c.grid, restore))
        return out if wanted else self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """timm's eval output: class token, patch-token mean ('avg', then fc_norm), or with a distillation
        token the mean of both heads (also in training: the distillation loss is the trainer's business)."""
        from caitdeploy.families.vit.model import pool_logits

        return pool_logits(
            self.forward_features(x),
            self.cait_config,
            self.head,
            getattr(self, "head_dist", None),
            self.fc_norm,
            self.head_drop,
        )

    # ---- parameter groups ----
    def compactors(self) -> list[tuple[int, str, CompactorLike]]:
        """(block, name, module) for every compactor; name in q, k, v, fc1."""
        out: list[tuple[int, str, CompactorLike]] = []
        for i, b in enumerate(cast("Iterable[CaitTrainBlock]", self.blocks)):
            out += [(i, n, getattr(b.attn, f"{n}_compactor")) for n in ("q", "k", "v")]
            out.append((i, "fc1", b.mlp.fc1_compactor))
        return out


class CaitTrainFamily(CompactorGroups, nn.Module):
    """CAIT training for a family that does not train its timm model in place (`Family.train_in_place` False, e.g.
    Swin): the family's own compactor model (`Family.compactor_model`: the deploy model at the dense widths with CDCP
    compactors after q, k, v (per head) and fc1, and ATME merges; the timm weights copied, and the stochastic-depth
    rates where the family has them). Blocks are numbered flat, as in CDCP's selection."""

    def __init__(self, family, model: nn.Module, merges: dict, arch: str | None = None):
        super().__init__()
        self.family = family
        self.format_config, self.cait_config, self.model = family.compactor_model(model, merges, arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def compactors(self) -> list[tuple[int, str, CompactorLike]]:
        return self.family.compactor_modules(self.cait_config, self.model)

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under the checkpoint's keys."""
        return self.family.checkpoint_state(self.cait_config, self.model)


def cait_wrap(model: nn.Module, merges: dict | None = None, arch: str | None = None) -> CaitTrainViT | CaitTrainFamily:
    """Wrap a timm model for CAIT training (identity compactors, mean-initialised merges).

    A timm VisionTransformer gives a `CaitTrainViT`, which shares (does not copy) the timm model's parameters;
    merges: block index -> "h" | "v". A model of a family that builds its own compactor model (a timm
    SwinTransformer v1) gives a `CaitTrainFamily` (weights copied); merges: (stage, block) -> "h" | "v". `arch`
    (the timm name) is recorded in its checkpoint's config.
    """
    from caitdeploy.families.registry import family_for_timm_model

    fam = family_for_timm_model(model)
    if not fam.train_in_place:
        return CaitTrainFamily(fam, model, {} if merges is None else merges, arch)
    return CaitTrainViT(model, {} if merges is None else merges)


# ---- checkpoint ---------------------------------------------------------------------------------
def checkpoint_dict(model: CaitTrainViT | CaitTrainFamily, data_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"format", "config", "state_dict"[, "data_config"]} of the model as it is now (tensors detached, on CPU,
    cloned). `data_config` (timm's `mean`, `std`, `crop_pct`, `interpolation`) records the eval transform the
    model was trained with, for `export` and `eval` to repeat."""
    sd = model.checkpoint_state_dict()
    sd = {k: v.detach().cpu().clone().contiguous() for k, v in sd.items()}
    cfg = {**model.format_config, "merges": {str(k): v for k, v in model.format_config["merges"].items()}}
    out: dict[str, Any] = {"format": FORMAT, "config": cfg, "state_dict": sd}
    if data_config is not None:
        out["data_config"] = dict(data_config)
    return out


def save_checkpoint(model: CaitTrainViT, path: str | os.PathLike, data_config: dict[str, Any] | None = None) -> Path:
    """Write a `cait-compactor/1` checkpoint atomically (.pth, or .safetensors by suffix)."""
    return save_checkpoint_dict(checkpoint_dict(model, data_config), path)


# ---- CDCP controller ----------------------------------------------------------------------------
class CDCPController:
    """Compactor gradients (Eq. 2) and the gradual CDCP mask schedule for a `CaitTrainViT`.

    flops_reduction: final target, relative to the dense model without merges (as `cdcp_select`).
    lam: lasso strength; step_ratio: FLOPs reduction added at each mask update; every: iterations
    between updates (paper: 1e-5, 0.00025, 25). The schedule starts at the reduction the merges alone
    give, so the first update already prunes channels. align: kept widths multiple of this (cdcp_select).
    lasso_on_kept: apply lam * C/||C|| to kept rows too (the paper's / ResRep's form). sync: called with the
    model after each mask update (`caitdeploy.training.loop` broadcasts rank 0's masks under DDP).
    """

    STATE_KEYS = ("ratio", "iteration", "updates", "summary", "history", "frozen")

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state (the masks themselves are model buffers, saved with the model)."""
        import copy

        return {k: copy.deepcopy(getattr(self, k)) for k in self.STATE_KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in self.STATE_KEYS if k not in state]
        if missing:
            raise CaitError(f"CDCP state lacks {missing[0]!r}")
        for k in self.STATE_KEYS:
            setattr(self, k, state[k])

    def __init__(
        self,
        model: CaitTrainViT | CaitTrainFamily,
        flops_reduction: float,
        lam: float = 1e-5,
        step_ratio: float = 0.00025,
        every: int = 25,
        align: int = 1,
        lasso_on_kept: bool = True,
        sync=None,
    ):
        if not isinstance(model, CompactorGroups):
            raise CaitError("CDCPController needs a model from cait_wrap()")
        if not 0 <= flops_reduction < 1:
            raise CaitError(f"flops_reduction must be in [0, 1), got {flops_reduction}")
        if lam < 0 or step_ratio <= 0 or every < 1 or align < 1:
            raise CaitError("need lam >= 0, step_ratio > 0, every >= 1, align >= 1")
        self.model, self.target = model, float(flops_reduction)
        self.lam, self.step_ratio, self.every, self.align = float(lam), float(step_ratio), int(every), int(align)
        self.lasso_on_kept = bool(lasso_on_kept)
        cfg = model.cait_config
        self.flops_dense = model_flops(cfg.unpruned())["total"]
        self.merge_reduction = 1 - model_flops(cfg)["total"] / self.flops_dense
        if self.target < self.merge_reduction:
            raise CaitError(
                f"flops_reduction {self.target:.4f} is below what the merges alone give ({self.merge_reduction:.4f})"
            )
        self.ratio = self.merge_reduction  # FLOPs reduction the current masks were selected for
        self.iteration = 0
        self.updates = 0
        self.summary: dict[str, Any] = {
            "flops_dense": self.flops_dense,
            "flops_pruned": model_flops(cfg)["total"],
            "flops_reduction": self.merge_reduction,
        }
        self.history: list[dict[str, Any]] = []
        self.frozen = False  # True: step() no longer re-selects masks
        self.sync = sync  # called with the model after every mask update (DDP: make every rank hold rank 0's)

    # ---- state ----
    @property
    def done(self) -> bool:
        """The masks reach the final FLOPs target."""
        return self.ratio >= self.target

    @property
    def flops(self) -> int:
        """FLOPs per image of the model the current masks describe (merges included)."""
        return int(self.summary["flops_pruned"])

    @property
    def flops_reduction(self) -> float:
        """Achieved reduction of the current masks vs the dense model without merges."""
        return float(self.summary["flops_reduction"])

    def masks(self) -> list[dict[str, torch.Tensor]]:
        return self.model.masks()

    # ---- mask selection ----
    @torch.no_grad()
    def update_masks(self, ratio: float | None = None) -> dict[str, Any]:
        """Re-select every mask with CDCP at `ratio` (default: the next step of the schedule)."""
        if ratio is None:
            ratio = min(self.target, self.ratio + self.step_ratio)
        cfg = self.model.cait_config
        scores = channel_scores({k: v.detach().cpu() for k, v in self.model.checkpoint_state_dict().items()}, cfg)
        masks, summary = cdcp_select(cfg, scores, ratio, self.align)
        for i, n, m in self.model.compactors():
            m.mask.copy_(masks[i][n].to(m.mask))
        if self.sync is not None:
            self.sync(self.model)
        self.ratio, self.summary = ratio, summary
        self.updates += 1
        self.history.append(
            {
                "iteration": self.iteration,
                "ratio": ratio,
                "flops_reduction": summary["flops_reduction"],
                "kept": [{k: int(v.sum()) for k, v in mm.items()} for mm in masks],
            }
        )
        return summary

    # ---- gradients ----
    @torch.no_grad()
    def modify_gradients(self) -> None:
        """Eq. 2 on every compactor: grad <- grad * mask + lam * row / ||row|| (per output row)."""
        for _, _, m in self.model.compactors():
            w = m.weight
            if w.grad is None:
                w.grad = torch.zeros_like(w)
            mask = m.mask.unsqueeze(-1).to(w.grad.dtype)
            w.grad.mul_(mask)
            if self.lam:
                norm = w.norm(dim=-1, keepdim=True)
                lasso = self.lam * w / norm.clamp_min(1e-12)
                if not self.lasso_on_kept:
                    lasso = lasso * (1 - mask)
                w.grad.add_(lasso)

    def step(self) -> None:
        """Call after `loss.backward()`, before `optimizer.step()`.

        Every `every` iterations (the first one included) the masks are re-selected at the next ratio of the
        schedule (at the target once it is reached, so a channel may still come back; see `freeze`), then the
        compactor gradients are replaced by Eq. 2 for the current masks.
        """
        if self.iteration % self.every == 0 and not self.frozen:
            self.update_masks()
        self.modify_gradients()
        self.iteration += 1

    def freeze(self) -> None:
        """Stop re-selecting masks (e.g. for the last iterations, so the masked rows only shrink)."""
        self.frozen = True

    @torch.no_grad()
    def max_masked_norm(self) -> float:
        """Largest compactor-row norm among masked rows (what `fuse` checks against --max-dropped-norm)."""
        out = 0.0
        for _, _, m in self.model.compactors():
            dropped = m.mask == 0
            if bool(dropped.any()):
                out = max(out, float(m.weight.detach().norm(dim=-1)[dropped].max()))
        return out

    @torch.no_grad()
    def finalize(self) -> float:
        """Set every masked compactor row to exactly zero; returns the largest norm it removed.

        Training drives masked rows towards zero but (with finite steps) not to it: this makes the checkpoint
        compute exactly what the fused model computes. Evaluate the model after calling it.
        """
        removed = self.max_masked_norm()
        for _, _, m in self.model.compactors():
            m.weight.mul_(m.mask.unsqueeze(-1).to(m.weight.dtype))
        return removed
