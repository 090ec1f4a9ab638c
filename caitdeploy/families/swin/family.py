"""The Swin family as a `Family` object (base.py): timm's SwinTransformer (v1) with per-head CAIT widths and ATME
merges inside a stage. Config `SwinConfig`, deploy model `CaitSwin` and the counts live in model.py; this module
adds the merge specs (STAGE.BLOCK:h|v), the paper's placement and defaults, and the timm adapter."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from caitdeploy.core.errors import CaitError, OptionError
from caitdeploy.families.base import BlockSite, Family
from caitdeploy.families.swin import model as SW
from caitdeploy.families.vit.config import ConfigError

if TYPE_CHECKING:
    from caitdeploy.families.layers import AttnImpl

DEFAULT_REDUCTION = 0.354  # the paper's ATME + CDCP setting (Tab. XIV; Tab. XII, CDCP only: --merges none, 0.267)


def parse_merges(text: str) -> dict[tuple[int, int], str]:
    """'2.4:h,2.5:v' -> {(2, 4): 'h', (2, 5): 'v'}; '' or 'none' -> {}."""
    if text.strip().lower() in ("", "none"):
        return {}
    pairs = [item.split(":") for item in text.split(",")]
    if any(len(p) != 2 for p in pairs):
        raise OptionError("merges", f"{text!r}: a Swin merge is STAGE.BLOCK:h|v, e.g. 2.4:h,2.5:v")
    keys = [k.strip() for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise OptionError("merges", f"{text!r}: a block is named twice; a block has at most one merge")
    try:
        return SW.parse_stage_merges({k: v.strip() for k, v in zip(keys, (v for _, v in pairs))})
    except ConfigError as e:
        raise OptionError("merges", f"{text!r}: {e}") from None


def merges_text(merges: dict[tuple[int, int], str]) -> str:
    return ",".join(f"{s}.{i}:{k}" for (s, i), k in sorted(merges.items())) or "none"


def merge_reduction(fmt: dict[str, Any], merges: dict[tuple[int, int], str]) -> float:
    """FLOPs reduction that ATME `merges` {(stage, block): kind} alone give the Swin of format config `fmt`;
    ConfigError for a merge that does not fit (an odd grid side)."""

    def flops(m):
        f = SW.check_format({**fmt, "merges": {f"{s}.{i}": k for (s, i), k in m.items()}})
        return SW.swin_flops(SW.swin_config_from_format(f))["total"]

    return 1 - flops(merges) / flops({})


def auto_merges(fmt: dict[str, Any], flops_reduction: float) -> tuple[dict[tuple[int, int], str], dict]:
    """The paper's Swin placement (Tab. XIV): HTM and VTM at the last two blocks of the longest stage (stage 3
    of Swin-T/S/B: 2.4:h,2.5:v on Swin-T); when those merges alone would cut more than `flops_reduction`, or
    a grid side is odd, HTM alone at its last block, else none (CDCP prunes channels for the whole target).
    Returns (merges, info: token / channel / total reduction)."""
    depths = list(fmt["depths"])
    s = max(range(len(depths)), key=lambda k: (depths[k], -k))
    n = depths[s]
    tries = ([{(s, n - 2): "h", (s, n - 1): "v"}] if n >= 2 else []) + [{(s, n - 1): "h"}, {}]
    for merges in tries:
        try:
            r = merge_reduction(fmt, merges)
        except ConfigError:
            continue
        if r <= flops_reduction + 1e-9:
            return merges, {
                "merges": merges,
                "token_reduction": r,
                "channel_reduction": flops_reduction - r,
                "flops_reduction": flops_reduction,
            }
    raise OptionError("merges", "auto: no Swin merge placement fits")  # unreachable: {} always fits


def timm_model(arch: str, num_classes: int | None = None, img_size: int | None = None, model_args: dict | None = None):
    """A randomly initialised timm SwinTransformer (v1), one-line OptionError for other names; `model_args`
    override timm's (embed_dim, depths, num_heads, ...)."""
    import timm
    from timm.models.swin_transformer import SwinTransformer

    if arch not in timm.list_models("swin_*"):
        raise OptionError("arch", f"{arch!r} is not a timm Swin (v1) model; e.g. swin_tiny_patch4_window7_224")
    kwargs: dict[str, Any] = {k: v for k, v in (("num_classes", num_classes), ("img_size", img_size)) if v is not None}
    kwargs.update(model_args or {})
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - timm's own refusal of a size, in one line
        raise OptionError("arch", f"{arch}: timm cannot build it ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(model, SwinTransformer):
        raise OptionError("arch", f"{arch!r} is not a timm SwinTransformer (v1)")
    return model.eval()


def initial_weights(model, merges: dict[tuple[int, int], str], arch: str | None = None):
    """(format config, SwinConfig, checkpoint-keyed tensors without compactors) of a timm Swin `model` with ATME
    `merges` (mean-initialised); the relative position tables of blocks whose window the merges clip are
    resized from the dense ones as timm resizes them. OptionError naming --merges for a merge that does not fit."""
    import torch
    from timm.layers import resize_rel_pos_bias_table

    try:
        fmt = SW.check_format(SW.format_config_of(model, merges, arch))
    except ConfigError as e:
        raise OptionError("merges", f": {e}") from None
    cfg = SW.swin_config_from_format(fmt)
    req, _ = SW.checkpoint_shapes(cfg)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith(SW.BUFFER_SUFFIXES)}
    for k, shape in req.items():
        if k.endswith("relative_position_bias_table") and tuple(sd[k].shape) != shape:
            s, i = (int(x) for x in k.split(".")[1:4:2])
            win, _ = cfg.window_shift(s, i)
            with warnings.catch_warnings():  # timm's interpolation warns about torch internals
                warnings.simplefilter("ignore")
                sd[k] = resize_rel_pos_bias_table(sd[k], new_window_size=win, new_bias_shape=shape)
    for (s, i), kind in merges.items():
        eye = torch.eye(cfg.dims[s])
        sd[f"layers.{s}.blocks.{i}.{SW._MERGE_NAME[kind]}.fc.weight"] = torch.cat([eye, eye], dim=1) / 2
        sd[f"layers.{s}.blocks.{i}.{SW._MERGE_NAME[kind]}.fc.bias"] = torch.zeros(cfg.dims[s])
    missing = sorted(set(req) - set(sd))
    if missing:  # a timm layout this version does not know
        raise CaitError(f"{arch}: timm's state dict lacks {missing[0]!r} (not a Swin v1 layout)")
    return fmt, cfg, sd


class SwinFamily(Family):
    name = SW.NAME
    description = SW.DESCRIPTION
    default_flops_reduction = DEFAULT_REDUCTION
    default_merges = "auto"
    merge_syntax = "STAGE.BLOCK:h|v"
    tome_note = "its bipartite merging needs global attention; Swin attends in windows"
    attention_op_note = (
        "a Swin model's window attention (relative position bias, shift masks) exports as "
        "MatMul + Softmax only: use --attention matmul"
    )
    kernels_note = "the Triton kernels are for the ViT families; a Swin model runs without them"
    buffer_suffixes = SW.BUFFER_SUFFIXES
    token_reduction_note = (
        "is for a ViT's --merges auto; a Swin's auto merges are the paper's placement (HTM + "
        "VTM at the last two blocks of the longest stage): give --merges STAGE.BLOCK:h|v,... to "
        "place them yourself"
    )

    def config_from_dict(self, raw: dict[str, Any]) -> SW.SwinConfig:
        return SW.SwinConfig.from_dict(raw)

    def check_config(self, config) -> None:
        SW.check_config(config)

    def config_from_format(self, fmt: dict[str, Any]) -> SW.SwinConfig:
        return SW.swin_config_from_format(SW.check_format(fmt))

    def build(self, config, attn_impl: AttnImpl = "sdpa", kernels: str | None = None):
        if kernels:
            raise ValueError(self.kernels_note)
        return SW.CaitSwin(config)

    def blocks(self, config) -> list:
        return [b for _, _, b in config.flat()]

    def with_blocks(self, config, blocks: list):
        from dataclasses import replace

        it = iter(blocks)
        return replace(config, stages=tuple(tuple(next(it) for _ in st) for st in config.stages))

    def deploy_type(self) -> type:
        return SW.CaitSwin

    def resized(self, config, state_dict: dict, img_size):
        config.at_size(img_size)  # ConfigError unless its windows and merges fit that size
        return config, state_dict

    # ---- accounting ----
    def flops(self, config) -> dict:
        f = SW.swin_flops(config)
        return {**f, "blocks": [{"total": b} for b in f["blocks"]]}

    def params(self, config) -> int:
        return SW.swin_params(config)

    def block_rows(self, config) -> list[dict]:
        return SW.swin_block_rows(config)

    def channel_savings(self, config, j: int) -> dict[str, int]:
        return SW.swin_channel_savings(config, j)

    def encoder_flops(self, config, last_block: int | None = None) -> int:
        """The stem, the stages up to the block's (their PatchMerging included), its blocks up to it."""
        flat = config.flat()
        last = len(flat) - 1 if last_block is None else last_block
        f = SW.swin_flops(config)
        stage = flat[last][0]
        in_stage = [j for j, (s, _, _) in enumerate(flat) if s == stage]
        merge = f["stages"][stage] - sum(f["blocks"][j] for j in in_stage)  # its PatchMerging
        return f["stem"] + sum(f["stages"][:stage]) + merge + sum(f["blocks"][in_stage[0] : last + 1])

    def activation_bytes(self, config, batch: int, elem_bytes: int = 4) -> int:
        return SW.swin_activation_bytes(config, batch, elem_bytes)

    def arch_name(self, config) -> str:
        return f"swin-d{config.dims[0]}-x{'.'.join(str(len(s)) for s in config.stages)}-{config.size_text}px"

    # ---- timm ----
    def owns_arch(self, arch: str) -> bool:
        return arch.startswith("swin_") and not arch.startswith("swinv2")

    def timm_model(self, arch, num_classes=None, img_size=None, model_args=None):
        return timm_model(arch, num_classes, img_size, model_args)

    def format_config_of(self, model, arch: str | None = None) -> dict[str, Any]:
        return SW.check_format(SW.format_config_of(model, {}, arch))

    def timm_keys(self, sd: dict) -> dict:
        from caitdeploy.families.swin.keys import timm_layout

        return timm_layout(sd)[0]

    def owns_timm_model(self, model) -> bool:
        from timm.models.swin_transformer import SwinTransformer

        return isinstance(model, SwinTransformer)

    # ---- training: `CaitSwin` at the dense widths with compactors, the timm weights and stochastic depth copied --
    train_in_place = False

    def compactor_model(self, model, merges: dict, arch: str | None = None):
        fmt, cfg, sd = initial_weights(model, merges, arch)
        net = SW.CaitSwin(cfg, compactors=True)
        net.load_state_dict(SW.from_checkpoint(cfg, sd, net.state_dict()))
        for s, i, _ in cfg.flat():  # timm's per-block rates (drop_path_rate), active in training only
            dp = getattr(model.layers[s].blocks[i], "drop_path1", None)
            net.layers[s].blocks[i].drop_prob = float(getattr(dp, "drop_prob", 0.0) or 0.0)
        return fmt, cfg, net

    def compactor_modules(self, config, model) -> list:
        out = []
        for j, (s, i, _) in enumerate(config.flat()):
            blk = model.layers[s].blocks[i]
            out += [(j, n, getattr(blk.attn, f"{n}_compactor")) for n in ("q", "k", "v")]
            out.append((j, "fc1", blk.fc1_compactor))
        return out

    def checkpoint_state(self, config, model) -> dict:
        return {SW.checkpoint_key(config, k): v for k, v in model.state_dict().items()}

    # ---- merges ----
    def parse_merges(self, text: str) -> dict[tuple[int, int], str]:
        return parse_merges(text)

    def merges_text(self, merges: dict) -> str:
        return merges_text(merges)

    def merge_reduction(self, fmt: dict[str, Any], merges: dict) -> float:
        try:
            return merge_reduction(fmt, merges)
        except ConfigError as e:
            raise OptionError("merges", f"{merges_text(merges)}: {e}") from None

    def auto_merges(self, fmt: dict[str, Any], flops_reduction: float, token_reduction: float | None = None):
        if token_reduction is not None:
            raise OptionError("token_reduction", self.token_reduction_note or "")
        return auto_merges(fmt, flops_reduction)

    # ---- checkpoints ----
    def initial_weights(self, model, merges: dict, arch: str | None = None):
        return initial_weights(model, merges, arch)

    whole_config_checkpoint = True

    def check_format(self, raw) -> dict[str, Any]:
        return SW.check_format(raw)

    def checkpoint_shapes(self, config):
        return SW.checkpoint_shapes(config)

    def block_sites(self, config) -> list[BlockSite]:
        return [
            BlockSite(j, f"block {j} (stage {s} block {i})", f"layers.{s}.blocks.{i}.", b.num_heads)
            for j, (s, i, b) in enumerate(config.flat())
        ]

    def compactor_key(self, config, j: int, name: str) -> str:
        s, i, _ = config.flat()[j]
        return f"layers.{s}.blocks.{i}." + (f"attn.{name}_compactor" if name != "fc1" else "mlp.fc1_compactor")

    def merges_summary(self, merges: dict) -> dict:
        return {f"{s}.{i}": k for (s, i), k in merges.items()}

    # ---- fuse: the sliced block tensors under CaitSwin's keys; every other tensor (norms, relative position
    # tables, merges, patch merging, stem, head) copied by `from_checkpoint` ----
    def fuse_start(self, ckpt) -> dict:
        return {}

    def fuse_block(self, ckpt, site: BlockSite, sliced: dict, out: dict) -> None:
        for k, v in sliced.items():
            out[site.prefix + k.removeprefix("mlp.")] = v

    def reference(self, ckpt, dtype=None):
        import torch

        from caitdeploy.families.swin.reference import reference_forward

        return lambda images: reference_forward(ckpt, images, dtype=dtype or torch.float64)

    def fuse_finish(self, ckpt, config, out: dict) -> dict:
        return {**SW.from_checkpoint(config, ckpt.state_dict), **out}  # the sliced tensors replace the dense ones


FAMILY = SwinFamily()
