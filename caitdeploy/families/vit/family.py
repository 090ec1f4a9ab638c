"""The ViT families as `Family` objects (base.py): timm's VisionTransformer ("vit") and the variants that share its
config and deploy model, `CaitConfig` and `CaitViT`: LV-ViT/SiT ("lvvit") and SPViT-DeiT ("spvit").

A variant differs only in its hooks, a module with `check_config`, `make_stem`, `make_mixer`, `make_slim` and
their counts (vit/model.py for plain ViTs, lvvit.py, spvit.py); `VitFamily(hooks)` gives the rest. Only "vit"
is built from a timm model by name (make-checkpoint, train); LV-ViT and SPViT arrive through `convert`.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from caitdeploy.core.errors import OptionError
from caitdeploy.families.base import BlockSite, Family
from caitdeploy.families.vit import flops as F
from caitdeploy.families.vit.config import CaitConfig, ConfigError

if TYPE_CHECKING:
    from caitdeploy.families.layers import AttnImpl

TOKEN_SHARE = 0.75  # default share of the FLOPs reduction given to token merging (4:h,8:v on DeiT-S at 55%)


def parse_merges(text: str) -> dict[int, str]:
    """'4:h,8:v' -> {4: 'h', 8: 'v'}; '' or 'none' -> {}."""
    out: dict[int, str] = {}
    if text.strip().lower() in ("", "none"):
        return out
    for item in text.split(","):
        try:
            k, v = item.split(":")
            block = int(k)
        except ValueError:
            raise OptionError("merges", f"{text!r}: expected BLOCK:h|v[,BLOCK:h|v...], e.g. 4:h,8:v") from None
        if v not in ("h", "v"):
            raise OptionError("merges", f"{text!r}: merge kind {v!r} must be 'h' or 'v'")
        if block in out:
            raise OptionError(
                "merges",
                f"{text!r}: block {block} is named twice ({out[block]} and {v}); a block has at most one merge",
            )
        out[block] = v
    return out


def merges_text(merges: dict[int, str]) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(merges.items())) or "none"


def merge_reduction(fmt: dict[str, Any], merges: dict[int, str], dense: int | None = None) -> float:
    """FLOPs reduction (vs the dense model, whose FLOPs `dense` may give) that `merges` alone give a model of
    format config `fmt`; ValueError (a ConfigError) for a merge that does not fit."""
    if dense is None:
        dense = F.model_flops(CaitConfig.from_format({**fmt, "merges": {}}))["total"]
    return 1 - F.model_flops(CaitConfig.from_format({**fmt, "merges": merges}))["total"] / dense


def auto_merges(
    fmt: dict[str, Any], flops_reduction: float, token_reduction: float | None = None
) -> tuple[dict[int, str], dict[str, Any]]:
    """The paper's rule for ATME blocks: divide the blocks uniformly (a horizontal merge after the first third,
    a vertical one after the second: 4:h,8:v for 12 blocks), then move them to the pair whose merge-only FLOPs
    reduction is closest to the token-FLOPs target (`token_reduction`, default TOKEN_SHARE x flops_reduction),
    never above `flops_reduction` (CDCP prunes channels for the rest). Ties go to the pair nearest the uniform
    one; each block moved costs 0.2 points of reduction, so the uniform pair wins when it is within reach.
    Returns (merges, info: uniform pair, chosen pair, token / channel / total reduction)."""
    depth = int(fmt["depth"])
    target = TOKEN_SHARE * flops_reduction if token_reduction is None else float(token_reduction)
    if not 0 <= target <= flops_reduction:
        raise OptionError("token_reduction", f"{target:.4f}: must be in 0..--flops-reduction ({flops_reduction})")
    u1, u2 = max(1, round(depth / 3)), max(2, round(2 * depth / 3))
    dense = F.model_flops(CaitConfig.from_format({**fmt, "merges": {}}))["total"]
    best = None
    for b1 in range(1, depth):
        for b2 in [*range(b1 + 1, depth), None]:
            merges = {b1: "h"} if b2 is None else {b1: "h", b2: "v"}
            try:
                r = merge_reduction(fmt, merges, dense)
            except ValueError:  # a merge on an odd grid side
                continue
            if r > flops_reduction + 1e-9:
                continue
            moved = abs(b1 - u1) + (abs(b2 - u2) if b2 is not None else depth)
            cost = abs(r - target) + 0.002 * moved
            if best is None or cost < best[0]:
                best = (cost, merges, r)
    if best is None:
        raise OptionError(
            "merges",
            f"auto: no merge placement fits {depth} blocks, grid "
            f"{CaitConfig.from_format({**fmt, 'merges': {}}).grid} and --flops-reduction "
            f"{flops_reduction}; give --merges BLOCK:h|v,... or none",
        )
    _, merges, r = best
    info = {
        "uniform": {u1: "h", u2: "v"},
        "merges": merges,
        "token_target": target,
        "token_reduction": r,
        "channel_reduction": flops_reduction - r,
        "flops_reduction": flops_reduction,
    }
    return merges, info


class VitFamily(Family):
    """A family whose config is a `CaitConfig` and whose deploy model is a `CaitViT`, with `hooks` for its stem,
    mixers and token slimming."""

    def __init__(self, name: str, hooks: str, timm_built: bool = False):
        self.name = name
        self._hooks = hooks  # the hooks module's name, imported when first needed
        self.timm_built = timm_built

    @property
    def hooks(self) -> ModuleType:
        import importlib

        return importlib.import_module(self._hooks)

    @property
    def description(self) -> str:  # type: ignore[override]
        return self.hooks.DESCRIPTION

    def __getattr__(self, name: str) -> Any:  # the variant's hooks: make_stem, fuse_stem, stem_shapes, ...
        if name.startswith("_") or name in ("hooks", "name", "timm_built"):
            raise AttributeError(name)
        return getattr(self.hooks, name)

    # ---- configs and the deploy model ----
    def config_from_dict(self, raw: dict[str, Any]) -> CaitConfig:
        return CaitConfig.from_dict(raw)

    def check_config(self, config) -> None:
        if not isinstance(config, CaitConfig):
            raise ConfigError(f"family {self.name!r} needs a ViT config (embed_dim, depth, blocks)")
        self.hooks.check_config(config)

    def config_from_format(self, fmt: dict[str, Any]) -> CaitConfig:
        return CaitConfig.from_format(fmt)

    def build(self, config: CaitConfig, attn_impl: AttnImpl = "sdpa", kernels: str | None = None):
        from caitdeploy.families.vit.model import CaitViT

        return CaitViT(config, attn_impl=attn_impl, kernels=kernels)

    def blocks(self, config: CaitConfig) -> list:
        return list(config.blocks)

    def with_blocks(self, config: CaitConfig, blocks: list) -> CaitConfig:
        from dataclasses import replace

        return replace(config, blocks=tuple(blocks))

    def deploy_type(self) -> type:
        from caitdeploy.families.vit.model import CaitViT

        return CaitViT

    def resized(self, config: CaitConfig, state_dict: dict, img_size):
        from caitdeploy.families.vit.resize import resize_state_dict

        return resize_state_dict(config, state_dict, img_size)

    # ---- accounting ----
    def flops(self, config: CaitConfig) -> dict:
        return F.model_flops(config)

    def params(self, config: CaitConfig) -> int:
        return F.model_params(config)

    def block_rows(self, config: CaitConfig) -> list[dict]:
        return F.block_rows(config)

    def channel_savings(self, config: CaitConfig, j: int) -> dict[str, int]:
        return F.channel_savings(config, j)

    def encoder_flops(self, config: CaitConfig, last_block: int | None = None) -> int:
        return F.encoder_flops(config, last_block)

    def activation_bytes(self, config: CaitConfig, batch: int, elem_bytes: int = 4) -> int:
        return F.activation_bytes(config, batch, elem_bytes)

    def arch_name(self, config: CaitConfig) -> str:
        return f"vit-d{config.embed_dim}-x{config.depth}-h{config.blocks[0].num_heads}-{config.size_text}px"

    # ---- timm ----
    def owns_arch(self, arch: str) -> bool:
        return self.timm_built

    def default_distill_alpha(self, fmt: dict[str, Any]) -> float:
        return 0.1 if fmt["embed_dim"] <= 192 else 0.25  # the paper's recipe: 0.1 for DeiT-Tiny

    def owns_timm_model(self, model) -> bool:
        return self.timm_built

    def timm_model(
        self, arch: str, num_classes: int | None = None, img_size: int | None = None, model_args: dict | None = None
    ):
        from caitdeploy.families.timm_compat import timm_model

        return timm_model(arch, num_classes, img_size, model_args)

    def format_config_of(self, model, arch: str | None = None) -> dict[str, Any]:
        from caitdeploy.families.timm_compat import format_config_of

        fmt = format_config_of(model, {})
        return {**fmt, "arch": arch} if arch is not None else fmt

    # ---- merges ----
    def parse_merges(self, text: str) -> dict[int, str]:
        return parse_merges(text)

    def merges_text(self, merges: dict) -> str:
        return merges_text(merges)

    def merge_reduction(self, fmt: dict[str, Any], merges: dict) -> float:
        try:
            return merge_reduction(fmt, merges)
        except ValueError as e:
            raise OptionError("merges", f"{merges_text(merges)}: {e}") from None

    def auto_merges(self, fmt: dict[str, Any], flops_reduction: float, token_reduction: float | None = None):
        return auto_merges(fmt, flops_reduction, token_reduction)

    # ---- checkpoints ----
    def initial_weights(self, model, merges: dict, arch: str | None = None):
        import torch

        from caitdeploy.core.names import merge_prefix

        fmt = {**self.format_config_of(model, arch), "merges": dict(merges)}
        try:
            cfg = CaitConfig.from_format(fmt)
        except ValueError as e:
            raise OptionError("merges", f": {e}") from None
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        d = fmt["embed_dim"]
        for i, kind in merges.items():
            eye = torch.eye(d)
            sd[merge_prefix(i, kind) + ".weight"] = torch.cat([eye, eye], dim=1) / 2
            sd[merge_prefix(i, kind) + ".bias"] = torch.zeros(d)
        return fmt, cfg, sd

    def block_sites(self, config: CaitConfig) -> list[BlockSite]:
        return [BlockSite(i, f"block {i}", f"blocks.{i}.", b.num_heads) for i, b in enumerate(config.blocks)]

    def compactor_key(self, config: CaitConfig, j: int, name: str) -> str:
        from caitdeploy.core.names import compactor_prefix

        return compactor_prefix(j, name)

    def merges_summary(self, merges: dict) -> dict:
        return dict(merges)

    # ---- fuse ----
    def fuse_start(self, ckpt) -> dict:
        sd, cfg = ckpt.state_dict, ckpt.config
        out = dict(self.hooks.fuse_stem(cfg, sd.__getitem__))
        norm = "fc_norm" if cfg.fc_norm else "norm"
        for k in (
            "cls_token",
            "dist_token",
            "reg_token",
            "pos_embed",
            f"{norm}.weight",
            f"{norm}.bias",
            "head.weight",
            "head.bias",
            "head_dist.weight",
            "head_dist.bias",
        ):
            if k in sd:
                out[k] = sd[k]
        return out

    def fuse_block(self, ckpt, site: BlockSite, sliced: dict, out: dict) -> None:
        from caitdeploy.core.names import FUSED_MERGE, merge_prefix

        sd, p, i = ckpt.state_dict, site.prefix, site.index
        for k, v in sliced.items():
            out[p + k] = v
        for k in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.proj.bias", "mlp.fc2.bias"):
            out[p + k] = sd[p + k]
        lam = float(ckpt.format_config.get("skip_lam", 1.0))
        for layer, gamma in (("attn.proj", "ls1.gamma"), ("mlp.fc2", "ls2.gamma")):
            # layer scale (DeiT III) and LV-ViT's residual 1/skip_lam fold into the Linear: diag(g) W x + g b
            g = sd.get(p + gamma)
            if g is not None or lam != 1.0:
                w, b = out[p + layer + ".weight"], out[p + layer + ".bias"]
                g = torch.full_like(b, 1 / lam) if g is None else g.to(b.dtype) / lam
                out[p + layer + ".weight"], out[p + layer + ".bias"] = w * g[:, None], b * g
        merge = ckpt.config.blocks[i].merge
        if merge:
            for k in ("weight", "bias"):
                out[f"{p}{FUSED_MERGE}.fc.{k}"] = sd[f"{merge_prefix(i, merge)}.{k}"]

    def fuse_finish(self, ckpt, config: CaitConfig, out: dict) -> dict:
        return out

    def reference(self, ckpt, dtype=None):
        import torch

        from caitdeploy.families.vit.reference import reference_forward

        return lambda images: reference_forward(ckpt, images, dtype=dtype or torch.float64)


__all__ = [
    "TOKEN_SHARE",
    "ConfigError",
    "VitFamily",
    "auto_merges",
    "merge_reduction",
    "merges_text",
    "parse_merges",
]


VIT = VitFamily("vit", "caitdeploy.families.vit.model", timm_built=True)
LVVIT = VitFamily("lvvit", "caitdeploy.families.lvvit")
SPVIT = VitFamily("spvit", "caitdeploy.families.spvit")
