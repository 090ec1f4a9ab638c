"""Which timm Vision Transformers caitdeploy supports: the single definition, used by `make-checkpoint`,
`train` (`cait_wrap`), `fuse` (keys of unsupported features get a message naming the feature) and every
command that builds a timm model. Anything else is refused up front, naming the feature (layer scale,
distillation token, registers, pooling, ...). A later issue widens this set.
"""
from __future__ import annotations

import re

from .errors import CaitError

# state-dict keys of timm features the format does not describe -> the feature's name
UNSUPPORTED_KEYS = (
    (r"blocks\.\d+\.ls[12]\.gamma", "layer scale (ls1/ls2, e.g. DeiT III)"),
    (r"dist_token|head_dist\..*", "a distillation token (DeiT distilled)"),
    (r"reg_token", "register tokens"),
    (r"fc_norm\..*", "a final fc_norm (average pooling)"),
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


def timm_model(arch: str, num_classes: int | None = None, img_size: int | None = None):
    """A randomly initialised timm model of `arch`, refused (naming the feature) unless supported."""
    import timm

    kw = {"pretrained": False}
    if num_classes is not None:
        kw["num_classes"] = num_classes
    if img_size is not None:
        kw["img_size"] = img_size
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
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import Attention, Block, Mlp, VisionTransformer
    from torch import nn

    def bad(what: str):
        raise CaitError(f"{where}: unsupported model: {what}")

    ident = lambda m: m is None or isinstance(m, nn.Identity)  # noqa: E731
    if not isinstance(vit, VisionTransformer):
        bad(f"{type(vit).__name__} is not a timm VisionTransformer")
    if getattr(vit, "dist_token", None) is not None:
        bad("a distillation token (DeiT distilled) is not part of the format")
    if getattr(vit, "reg_token", None) is not None:
        bad("register tokens are not part of the format")
    if vit.cls_token is None or vit.num_prefix_tokens != 1:
        bad("needs exactly one class token")
    if vit.global_pool != "token" or vit.pos_embed is None or getattr(vit, "no_embed_class", False):
        bad("needs global_pool='token' and a pos_embed that covers the class token")
    if getattr(vit, "dynamic_img_size", False) or getattr(vit, "attn_pool", None) is not None:
        bad("dynamic_img_size / attention pooling are not part of the format")
    for name in ("norm_pre", "fc_norm", "patch_drop"):
        if not ident(getattr(vit, name, None)):
            bad(f"model.{name} must be Identity")
    pe = vit.patch_embed
    if not isinstance(pe, PatchEmbed) or not ident(pe.norm) or pe.img_size[0] != pe.img_size[1] \
            or pe.patch_size[0] != pe.patch_size[1] or not pe.flatten or pe.proj.bias is None:
        bad("patch_embed must be a square PatchEmbed with a biased conv, no norm")
    heads = {int(b.attn.num_heads) for b in vit.blocks}
    if len(heads) != 1:
        bad(f"blocks use different head counts {sorted(heads)}")
    for i, b in enumerate(vit.blocks):
        blk = f"block {i}"
        if type(b) is not Block or type(b.attn) is not Attention or type(b.mlp) is not Mlp:
            bad(f"{blk}: expected timm Block/Attention/Mlp, got {type(b).__name__}/{type(b.attn).__name__}/"
                f"{type(b.mlp).__name__}")
        if not (ident(b.ls1) and ident(b.ls2)):
            bad(f"{blk}: layer scale (ls1/ls2, init_values) is not part of the format")
        a = b.attn
        if not (ident(a.q_norm) and ident(a.k_norm) and ident(getattr(a, "norm", None))) \
                or getattr(a, "gate", None) is not None:
            bad(f"{blk}: qk_norm / scale_norm / gated attention are not part of the format")
        if a.head_dim * a.num_heads != vit.embed_dim or a.proj.bias is None:
            bad(f"{blk}: attention width must equal embed_dim and proj must have a bias")
        for n in ("norm1", "norm2"):
            ln = getattr(b, n)
            if not isinstance(ln, nn.LayerNorm) or abs(ln.eps - 1e-6) > 1e-12 or ln.weight is None:
                bad(f"{blk}: {n} must be LayerNorm(eps=1e-6) with affine parameters")
        m = b.mlp
        if not isinstance(m.act, nn.GELU) or m.act.approximate != "none" or not ident(m.norm) \
                or m.fc1.bias is None or m.fc2.bias is None or not isinstance(m.fc1, nn.Linear):
            bad(f"{blk}: mlp must be Linear -> GELU(erf) -> Linear with biases and no norm")
    if not isinstance(vit.norm, nn.LayerNorm) or abs(vit.norm.eps - 1e-6) > 1e-12:
        bad("final norm must be LayerNorm(eps=1e-6)")
    if not isinstance(vit.head, nn.Linear):
        bad("head must be a Linear classifier (num_classes > 0)")


