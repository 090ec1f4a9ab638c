"""Which timm Vision Transformers caitdeploy supports: the single definition, used by `make-checkpoint`,
`train` (`cait_wrap`), `fuse --arch` (keys of unsupported features get a message naming the feature) and every
command that builds a timm model.

Supported: timm's `VisionTransformer` and `VisionTransformerDistilled` with a class token or none, a
distillation token, registers, a pos_embed with or without the prefix tokens (`no_embed_class`), token or
average pooling (with fc_norm), layer scale (DeiT III), qkv with or without bias, any patch size, image size
and LayerNorm eps (one eps for the whole model). Anything else is refused up front, naming the feature
(pre-norm, qk-norm, attention pooling, ...).
"""

from __future__ import annotations

import re

from caitdeploy.core.errors import CaitError

# state-dict keys of timm features the format does not describe -> the feature's name
UNSUPPORTED_KEYS = (
    (r"norm_pre\..*", "a pre-norm (norm_pre, e.g. CLIP)"),
    (r"attn_pool\..*", "attention pooling"),
    (r"blocks\.\d+\.attn\.[qk]_norm\..*", "qk-norm"),
    (r"blocks\.\d+\.attn\.norm\..*", "attention scale-norm"),
    (r"blocks\.\d+\.mlp\.norm\..*", "an MLP norm"),
    (r"patch_embed\.norm\..*", "a patch-embedding norm"),
)


def unsupported_feature(key: str) -> str | None:
    """The unsupported timm feature a state-dict key belongs to, or None."""
    for pattern, feature in UNSUPPORTED_KEYS:
        if re.fullmatch(pattern, key):
            return feature
    return None


def timm_model(arch: str, num_classes: int | None = None, img_size: int | None = None, model_args: dict | None = None):
    """A randomly initialised timm model of `arch`, refused (naming the feature) unless supported. `model_args`
    are passed to timm.create_model (e.g. depth=4, embed_dim=64 for a small variant)."""
    import timm

    kw = {"pretrained": False, **(model_args or {})}
    if num_classes is not None:
        kw["num_classes"] = num_classes
    if img_size is not None:
        kw["img_size"] = img_size
    if arch.startswith("lvvit_"):  # LV-ViT teachers (SiT's sizes): not in timm, built as a timm ViT with their stem
        from caitdeploy.families.lvvit import TEACHERS, timm_lvvit

        if arch.removeprefix("lvvit_") not in TEACHERS:
            raise CaitError(
                f"--arch {arch!r}: unknown LV-ViT size; choose one of {', '.join('lvvit_' + t for t in TEACHERS)}"
            )
        try:
            model = timm_lvvit(arch, **{k: v for k, v in kw.items() if k != "pretrained"})
        except ValueError as e:
            raise CaitError(f"--arch {arch!r}: {str(e).splitlines()[0]}") from None
        check_supported(model, f"--arch {arch!r}")
        return model
    try:
        model = timm.create_model(arch, **kw)
    except TypeError as e:  # e.g. a ResNet has no img_size: say what the model is instead
        import torch

        try:
            with torch.device("meta"):
                plain = timm.create_model(arch, pretrained=False)
        except Exception:  # noqa: BLE001 - fall back to the first error
            plain = None
        if plain is not None:
            check_supported(plain, f"--arch {arch!r}")
        raise CaitError(f"--arch {arch!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    except (RuntimeError, ValueError, KeyError) as e:  # unknown name
        raise CaitError(f"--arch {arch!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    check_supported(model, f"--arch {arch!r}")
    return model


def check_supported(vit, where: str = "model") -> None:
    """Raise CaitError, naming the feature, unless `vit` is a timm ViT whose forward the format describes exactly."""
    from timm.layers import LayerScale, PatchEmbed
    from timm.models.vision_transformer import Attention, Block, Mlp, VisionTransformer
    from torch import nn

    def bad(what: str):
        raise CaitError(f"{where}: unsupported model: {what}")

    ident = lambda m: m is None or isinstance(m, nn.Identity)  # noqa: E731
    if type(vit).__name__ == "SwinTransformer":
        bad(
            "a Swin is not a timm VisionTransformer: a Swin checkpoint carries its config (fuse it without "
            "--arch); make one with `make-checkpoint --arch swin_...` or `train --arch swin_...`"
        )
    if not isinstance(vit, VisionTransformer):
        bad(f"{type(vit).__name__} is not a timm VisionTransformer")
    cls_tok, dist = vit.cls_token is not None, getattr(vit, "dist_token", None) is not None
    regs = int(getattr(vit, "num_reg_tokens", 0) or 0)
    if vit.num_prefix_tokens != int(cls_tok) + int(dist) + regs:
        bad(f"{vit.num_prefix_tokens} prefix tokens that are not class/distillation/register tokens")
    if dist and (type(vit).__name__ != "VisionTransformerDistilled" or getattr(vit, "distilled_training", False)):
        bad("a distillation token outside timm's VisionTransformerDistilled eval forward")
    if vit.global_pool not in ("token", "avg") or vit.pos_embed is None:
        bad(f"global_pool {vit.global_pool!r} (supported: 'token', 'avg') or no pos_embed")
    if vit.global_pool == "token" and not cls_tok:
        bad("token pooling without a class token")
    if dist and vit.global_pool != "token":
        bad("a distillation token with average pooling")
    if getattr(vit, "dynamic_img_size", False) or getattr(vit, "attn_pool", None) is not None:
        bad("dynamic_img_size / attention pooling are not part of the format")
    for name in ("norm_pre", "patch_drop"):
        if not ident(getattr(vit, name, None)):
            bad(f"model.{name} must be Identity (a pre-norm, e.g. CLIP, is not part of the format)")
    if not ident(vit.fc_norm) and not ident(vit.norm):
        bad("both a final norm and an fc_norm")
    eps = set()
    for ln in (vit.norm, vit.fc_norm):
        if not ident(ln):
            if not isinstance(ln, nn.LayerNorm) or ln.weight is None:
                bad("final norm / fc_norm must be an affine LayerNorm")
            eps.add(float(ln.eps))
    if ident(vit.norm) and ident(vit.fc_norm):
        bad("no final norm")
    pe = vit.patch_embed
    if getattr(pe, "caitdeploy_stem", False):  # LV-ViT's conv stem (families/lvvit.py)
        pass
    elif (
        not isinstance(pe, PatchEmbed)
        or not ident(pe.norm)
        or pe.img_size[0] != pe.img_size[1]
        or pe.patch_size[0] != pe.patch_size[1]
        or not pe.flatten
        or pe.proj.bias is None
    ):
        bad("patch_embed must be a square PatchEmbed with a biased conv, no norm")
    heads = {int(b.attn.num_heads) for b in vit.blocks}
    if len(heads) != 1:
        bad(f"blocks use different head counts {sorted(heads)}")
    widths = {int(b.mlp.fc1.weight.shape[0]) for b in vit.blocks if isinstance(getattr(b.mlp, "fc1", None), nn.Linear)}
    if len(widths) > 1:
        bad(f"blocks use different mlp widths {sorted(widths)}")
    ls_kinds = set()
    for i, b in enumerate(vit.blocks):
        blk = f"block {i}"
        if type(b) is not Block or type(b.attn) is not Attention or type(b.mlp) is not Mlp:
            bad(
                f"{blk}: expected timm Block/Attention/Mlp, got {type(b).__name__}/{type(b.attn).__name__}/"
                f"{type(b.mlp).__name__}"
            )
        for ls in (b.ls1, b.ls2):
            if not ident(ls) and not isinstance(ls, LayerScale):
                bad(f"{blk}: layer scale must be timm's LayerScale")
        ls_kinds.add((ident(b.ls1), ident(b.ls2)))
        a = b.attn
        if (
            not (ident(a.q_norm) and ident(a.k_norm) and ident(getattr(a, "norm", None)))
            or getattr(a, "gate", None) is not None
        ):
            bad(f"{blk}: qk_norm / scale_norm / gated attention are not part of the format")
        if a.head_dim * a.num_heads != vit.embed_dim or a.proj.bias is None:
            bad(f"{blk}: attention width must equal embed_dim and proj must have a bias")
        if (a.qkv.bias is not None) != (vit.blocks[0].attn.qkv.bias is not None):
            bad(f"{blk}: qkv bias differs from block 0's")
        for n in ("norm1", "norm2"):
            ln = getattr(b, n)
            if not isinstance(ln, nn.LayerNorm) or ln.weight is None:
                bad(f"{blk}: {n} must be an affine LayerNorm")
            eps.add(float(ln.eps))
        m = b.mlp
        if (
            not isinstance(m.act, nn.GELU)
            or m.act.approximate != "none"
            or not ident(m.norm)
            or m.fc1.bias is None
            or m.fc2.bias is None
            or not isinstance(m.fc1, nn.Linear)
        ):
            bad(f"{blk}: mlp must be Linear -> GELU(erf) -> Linear with biases and no norm")
    if len(ls_kinds) > 1 or (ls_kinds and len(set(next(iter(ls_kinds)))) > 1):
        bad("layer scale on some branches only")
    if len(eps) != 1:
        bad(f"LayerNorms use different eps {sorted(eps)}")
    if not isinstance(vit.head, nn.Linear):
        bad("head must be a Linear classifier (num_classes > 0)")


def format_config_of(model, merges: dict[int, str] | None = None) -> dict:
    """The `cait-compactor/1` config of a supported timm ViT (`check_supported` first)."""
    from torch import nn

    blk = model.blocks[0]
    d = int(model.embed_dim)
    fc_norm = not isinstance(model.fc_norm, nn.Identity)
    ln = model.fc_norm if fc_norm else model.norm
    return {
        "img_size": int(model.patch_embed.img_size[0]),
        "patch_size": int(model.patch_embed.patch_size[0]),
        "in_chans": int(next(model.patch_embed.parameters()).shape[1]),
        "num_classes": int(model.num_classes),
        "embed_dim": d,
        "depth": len(model.blocks),
        "num_heads": int(blk.attn.num_heads),
        "mlp_ratio": blk.mlp.fc1.weight.shape[0] / d,
        "qkv_bias": blk.attn.qkv.bias is not None,
        "merges": {int(k): v for k, v in (merges or {}).items()},
        "class_token": model.cls_token is not None,
        "dist_token": getattr(model, "dist_token", None) is not None,
        "reg_tokens": int(getattr(model, "num_reg_tokens", 0) or 0),
        "no_embed_class": bool(model.no_embed_class),
        "global_pool": str(model.global_pool),
        "fc_norm": fc_norm,
        "ln_eps": float(ln.eps),
        "layer_scale": not isinstance(blk.ls1, nn.Identity),
        "family": "vit",
        **(
            {"family": "lvvit", "stem": model.patch_embed.stem, "skip_lam": float(getattr(model, "skip_lam", 1.0))}
            if getattr(model.patch_embed, "caitdeploy_stem", False)
            else {}
        ),
    }


def arch_config(arch: str) -> dict:
    """timm's definition of `arch` as a format config (built on the meta device: nothing allocated), with
    the name under "arch"; a one-line CaitError for an unknown or unsupported name."""
    import torch

    with torch.device("meta"):
        model = timm_model(arch)
    return {**format_config_of(model), "arch": arch}
