"""Family "lvvit": LV-ViT (a convolutional stem, residual branches divided by `skip_lam`) and SiT, LV-ViT with
Token Slimming Modules. Formats: docs/formats/sit.md.

Deploy form (what `convert --from sit|lvvit` and `fuse` of a CAIT-LV-ViT checkpoint write): the stem's
BatchNorms folded into its convolutions (`patch_embed.conv{k}.weight/bias`, GELU after every conv but the
last), `skip_lam` folded into `proj`/`fc2`, each TSM's `scale` folded into its second Linear
(`blocks.{i}.slim.{norm,fc1,fc2}.*`). Checkpoint form (`cait-compactor/1` with family "lvvit", and the
upstream files): `patch_embed.conv{k}.weight` without bias and `patch_embed.bn{k}.*`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from caitdeploy.families.vit.config import CaitConfig
from caitdeploy.families.vit.model import make_mixer, mixer_flops, mixer_params  # noqa: F401 - this family has no other block kinds

NAME = "lvvit"
DESCRIPTION = "LV-ViT (conv stem, skip_lam) and SiT (LV-ViT + token slimming)"
BN_EPS = 1e-5
# stem kind -> (out channels as a divisor of embed_dim, stride) per 3x3 conv (padding 1)
STEM_LAYERS = {"4c": ((8, 2), (4, 2), (2, 2), (1, 2)), "6c": ((8, 2), (8, 1), (8, 1), (4, 2), (2, 2), (1, 2))}
TSM_RATIO = 0.5  # TSM hidden width = int(embed_dim * 0.5)

# Released sizes (Sense-X/SiT; the dense LV-ViT teachers share the student's stem and blocks). mlp ratio 3,
# qkv without bias, LayerNorm eps 1e-5, keep ratio 0.5 per stage; `stages`: blocks per token stage.
VARIANTS: dict[str, dict[str, Any]] = {
    "t": dict(
        img_size=224, embed_dim=320, depth=14, num_heads=5, skip_lam=2.0, stem="4c", stages=(1, 1, 1, 11), teacher="t"
    ),
    "xs": dict(
        img_size=224, embed_dim=384, depth=16, num_heads=6, skip_lam=2.0, stem="4c", stages=(1, 1, 1, 13), teacher="s"
    ),
    "s": dict(
        img_size=224, embed_dim=384, depth=16, num_heads=6, skip_lam=2.0, stem="4c", stages=(9, 3, 2, 2), teacher="s"
    ),
    "m": dict(
        img_size=224, embed_dim=512, depth=20, num_heads=8, skip_lam=2.0, stem="4c", stages=(10, 4, 3, 3), teacher="m"
    ),
    "l": dict(
        img_size=288, embed_dim=768, depth=24, num_heads=12, skip_lam=3.0, stem="6c", stages=(10, 4, 3, 7), teacher="l"
    ),
}
TEACHERS = {"t": "t", "s": "s", "m": "m", "l": "l"}  # dense LV-ViT name -> the SiT variant with its sizes


def stem_layers(c: CaitConfig) -> list[tuple[int, int, int, bool]]:
    """(in channels, out channels, stride, GELU after) of every stem conv."""
    out, cin = [], c.in_chans
    layers = STEM_LAYERS[c.stem]
    for j, (div, stride) in enumerate(layers):
        out.append((cin, c.embed_dim // div, stride, j < len(layers) - 1))
        cin = c.embed_dim // div
    return out


def slim_plan(num_patches: int, stages: tuple[int, ...], keep: float = 0.5) -> dict[int, int]:
    """Block index (0-based) -> tokens kept by the TSM before it: stage s keeps int(N * keep**s)."""
    out = {}
    for s in range(1, len(stages)):
        out[sum(stages[:s])] = int(num_patches * keep**s)
    return out


# ---- modules --------------------------------------------------------------------------------------
class ConvStem(nn.Module):
    """Deploy stem: 3x3 convs (BatchNorm folded in: with bias), GELU between. images -> [B, Gh*Gw, D]."""

    def __init__(self, c: CaitConfig):
        super().__init__()
        self.depth = 0
        for j, (cin, cout, stride, _) in enumerate(stem_layers(c), start=1):
            self.add_module(f"conv{j}", nn.Conv2d(cin, cout, 3, stride=stride, padding=1))
            self.depth = j

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for j in range(1, self.depth + 1):
            x = getattr(self, f"conv{j}")(x)
            if j < self.depth:
                x = F.gelu(x)
        return x.flatten(2).transpose(1, 2)


class ConvBNStem(nn.Module):
    """Training/checkpoint stem (upstream layout): 3x3 conv without bias + BatchNorm (+ GELU) per layer.

    Takes timm's embed_layer arguments, so `timm...VisionTransformer(embed_layer=...)` builds an LV-ViT whose
    state dict has the upstream stem keys."""

    caitdeploy_stem = True

    def __init__(
        self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384, stem: str = "4c", **_
    ):
        super().__init__()
        size = img_size if isinstance(img_size, int) else img_size[0]
        self.img_size, self.patch_size = (size, size), (16, 16)
        self.grid_size = (size // 16, size // 16)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.stem = stem
        layers = STEM_LAYERS[stem]
        cin = in_chans
        for j, (div, stride) in enumerate(layers, start=1):
            self.add_module(f"conv{j}", nn.Conv2d(cin, embed_dim // div, 3, stride=stride, padding=1, bias=False))
            self.add_module(f"bn{j}", nn.BatchNorm2d(embed_dim // div, eps=BN_EPS))
            cin = embed_dim // div
        self.depth = len(layers)

    def feat_ratio(self, as_scalar: bool = True):
        return 16 if as_scalar else (16, 16)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for j in range(1, self.depth + 1):
            x = getattr(self, f"bn{j}")(getattr(self, f"conv{j}")(x))
            if j < self.depth:
                x = F.gelu(x)
        return x.flatten(2).transpose(1, 2)


class TokenSlim(nn.Module):
    """SiT's Token Slimming Module (eval form, `scale` folded into fc2): the patch tokens X [B, N, D] become
    M convex mixtures, Y = softmax_N(fc2(GELU(fc1(LN(X)))))^T X; prefix tokens pass through. In ONNX:
    LayerNormalization, MatMul, Erf, Transpose, Softmax, MatMul."""

    def __init__(self, dim: int, hidden: int, out_tokens: int, eps: float, prefix: int = 1):
        super().__init__()
        self.prefix = prefix
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.prefix
        patches = x[:, p:]
        logits = self.fc2(F.gelu(self.fc1(self.norm(patches))))  # [B, N, M]
        mixed = logits.transpose(1, 2).softmax(dim=-1) @ patches  # [B, M, D]
        return torch.cat([x[:, :p], mixed], dim=1) if p else mixed


# ---- the family interface ---------------------------------------------------------------------------
def check_config(c: CaitConfig) -> None:
    from caitdeploy.families.vit.config import ConfigError

    for i, b in enumerate(c.blocks):
        if b.kind != "attn":
            raise ConfigError(f"block {i}: family 'lvvit' has attention blocks only (kind {b.kind!r})")
    if c.stem == "patch":
        return
    if any(s % 16 for s in c.image_hw):
        raise ConfigError(f"img_size {c.size_text}: LV-ViT's conv stem needs multiples of 16")


def make_stem(c: CaitConfig) -> nn.Module:
    if c.stem == "patch":
        from caitdeploy.families.vit.model import PatchEmbed

        return PatchEmbed(c.in_chans, c.embed_dim, c.patch_size)
    return ConvStem(c)


def stem_shapes(c: CaitConfig) -> dict[str, tuple[int, ...]]:
    if c.stem == "patch":
        from caitdeploy.families.vit.model import stem_shapes as plain

        return plain(c)
    out: dict[str, tuple[int, ...]] = {}
    for j, (cin, cout, _, _) in enumerate(stem_layers(c), start=1):
        out[f"patch_embed.conv{j}.weight"] = (cout, cin, 3, 3)
        for s in ("weight", "bias", "running_mean", "running_var"):
            out[f"patch_embed.bn{j}.{s}"] = (cout,)
    return out


def fold_bn(w: torch.Tensor, gamma, beta, mean, var, eps: float = BN_EPS, bias: torch.Tensor | None = None):
    """BatchNorm (eval) after a conv, folded into it: (W * s, (b - mean) * s + beta), s = gamma / sqrt(var + eps)."""
    s = gamma / torch.sqrt(var + eps)
    b = -mean if bias is None else bias - mean
    return w * s.reshape(-1, *([1] * (w.dim() - 1))), b * s + beta


def fuse_stem(c: CaitConfig, get) -> dict[str, torch.Tensor]:
    if c.stem == "patch":
        from caitdeploy.families.vit.model import fuse_stem as plain

        return plain(c, get)
    out = {}
    for j in range(1, len(STEM_LAYERS[c.stem]) + 1):
        p = f"patch_embed.bn{j}."
        w, b = fold_bn(
            get(f"patch_embed.conv{j}.weight").double(),
            *(get(p + s).double() for s in ("weight", "bias", "running_mean", "running_var")),
        )
        out[f"patch_embed.conv{j}.weight"], out[f"patch_embed.conv{j}.bias"] = w.float(), b.float()
    return out


def reference_stem(c: CaitConfig, get, images: torch.Tensor) -> torch.Tensor:
    """The checkpoint's stem as the format defines it: conv, BatchNorm (eval), GELU, unfolded."""
    if c.stem == "patch":
        from caitdeploy.families.vit.model import reference_stem as plain

        return plain(c, get, images)
    x = images
    for j, (_, _, stride, gelu) in enumerate(stem_layers(c), start=1):
        p = f"patch_embed.bn{j}."
        x = F.conv2d(x, get(f"patch_embed.conv{j}.weight"), stride=stride, padding=1)
        x = F.batch_norm(
            x,
            get(p + "running_mean"),
            get(p + "running_var"),
            get(p + "weight"),
            get(p + "bias"),
            training=False,
            eps=BN_EPS,
        )
        x = F.gelu(x) if gelu else x
    return x.flatten(2).transpose(1, 2)


def _stem_sizes(c: CaitConfig):
    """(in channels, out channels, output pixels) of every stem convolution."""
    h, w = c.image_hw
    for cin, cout, stride, _ in stem_layers(c):
        if stride == 2:
            h, w = (h + 1) // 2, (w + 1) // 2
        yield cin, cout, h * w


def stem_flops(c: CaitConfig) -> int:
    if c.stem == "patch":
        from caitdeploy.families.vit.model import stem_flops as plain

        return plain(c)
    return sum(2 * pixels * cout * cin * 9 for cin, cout, pixels in _stem_sizes(c))


def stem_params(c: CaitConfig) -> int:
    if c.stem == "patch":
        from caitdeploy.families.vit.model import stem_params as plain

        return plain(c)
    return sum(cout * cin * 9 + cout for cin, cout, _ in _stem_sizes(c))


def _slim_sizes(c: CaitConfig, i: int) -> tuple[int, int, int, int]:
    """(input patch tokens, width, hidden, output tokens) of the TSM before block i."""
    b = c.blocks[i]
    n_in = c.patch_tokens_in(i) // (2 if b.merge else 1)
    assert b.slim is not None, f"block {i} has no token slimming module"
    return n_in, c.embed_dim, int(c.embed_dim * TSM_RATIO), b.slim


def make_slim(c: CaitConfig, i: int) -> nn.Module:
    _, d, hidden, m = _slim_sizes(c, i)
    return TokenSlim(d, hidden, m, c.ln_eps, c.num_prefix_tokens)


def slim_flops(c: CaitConfig, i: int) -> int:
    n, d, t, m = _slim_sizes(c, i)
    return 2 * n * d * t + 2 * n * t * m + 2 * m * n * d


def slim_params(c: CaitConfig, i: int) -> int:
    _, d, t, m = _slim_sizes(c, i)
    return 2 * d + d * t + t + t * m + m


def dense_config(
    variant: str,
    num_classes: int = 1000,
    img_size: int | None = None,
    slim: bool = False,
    merges: dict[int, str] | None = None,
) -> CaitConfig:
    """The LV-ViT teacher (or, with slim=True, the SiT student) of a released variant."""
    from dataclasses import replace

    v = VARIANTS[variant]
    img = img_size or v["img_size"]
    cfg = CaitConfig.dense(
        img_size=img,
        patch_size=16,
        num_classes=num_classes,
        embed_dim=v["embed_dim"],
        depth=v["depth"],
        num_heads=v["num_heads"],
        mlp_ratio=3.0,
        qkv_bias=False,
        merges=merges,
        ln_eps=1e-5,
        family=NAME,
        stem=v["stem"],
    )
    if not slim:
        return cfg
    plan = slim_plan((img // 16) ** 2, v["stages"])
    return replace(cfg, blocks=tuple(replace(b, slim=plan.get(i)) for i, b in enumerate(cfg.blocks)))


def timm_lvvit(name: str, num_classes: int = 1000, img_size: int | None = None):
    """A random-init LV-ViT teacher (`lvvit_t|s|m|l`) as a timm VisionTransformer with the upstream stem
    (`ConvBNStem`), for `make-checkpoint` and `cait_wrap`; its `skip_lam` attribute is the residual divisor
    the CAIT training model applies (timm's own forward does not)."""
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    size = name.removeprefix("lvvit_")
    if not name.startswith("lvvit_") or size not in TEACHERS:
        raise KeyError(name)
    v = VARIANTS[TEACHERS[size]]
    model = VisionTransformer(
        img_size=img_size or v["img_size"],
        patch_size=16,
        num_classes=num_classes,
        embed_dim=v["embed_dim"],
        depth=v["depth"],
        num_heads=v["num_heads"],
        mlp_ratio=3.0,
        qkv_bias=False,
        norm_layer=partial(nn.LayerNorm, eps=1e-5),
        embed_layer=partial(ConvBNStem, stem=v["stem"]),
    )
    model.skip_lam = float(v["skip_lam"])  # type: ignore[assignment]  # torch types Module attributes as Tensor | Module
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding is exercised even at random init
        for m in model.patch_embed.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_var is not None and m.running_mean is not None:
                m.running_var.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)
    return model
