"""`cait-compactor/1` checkpoints: safe loading, config inference and validation.

Every check raises `CaitError` with a message that names the file and the key or block at fault.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from caitdeploy.core.errors import CaitError, render
from caitdeploy.core.names import ATTN_COMPACTORS, FORMAT, MERGE_KEY, compactor_prefix, merge_prefix
from caitdeploy.families.vit.config import FORMAT_KEYS, FORMAT_OPTIONAL, CaitConfig, ConfigError


@dataclass
class Checkpoint:
    """A validated CAIT training checkpoint of any family. Keys are the timm model's (plus compactors and merges);
    blocks are numbered flat, in the family's `block_sites` order."""

    path: Path
    format_config: dict[str, Any]  # the `config` of the format (a ViT's merges keyed by int)
    config: Any  # the family's config: the unpruned model with its merges
    state_dict: dict[str, torch.Tensor]
    inferred: dict[str, Any] = field(default_factory=dict)  # config values inferred from shapes
    notes: list[str] = field(default_factory=list)  # what loading changed (e.g. half -> float32)
    data_config: dict[str, Any] | None = None  # the eval transform the training used (timm's keys), if recorded

    def compactor(self, block: int, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(weight, mask) of flat block `block`'s compactor ("q", "k", "v" or "fc1"), or None when absent
        (identity)."""
        from caitdeploy.families import family_of

        prefix = family_of(self.config).compactor_key(self.config, block, name)
        w = self.state_dict.get(prefix + ".weight")
        return None if w is None else (w, self.state_dict[prefix + ".mask"])


# ---- loading ------------------------------------------------------------------------------------
_TORCH_HINTS = (
    "weights_only",
    "re-running",
    "trusted source",
    "documentation",
    "torch.serialization",
    "add_safe_globals",
    "safe_globals",
    "pytorch 2.6",
    "https://",
)


def _first_line(e: BaseException) -> str:
    """The first line of an exception's text that is not one of torch's hints (never "re-run with
    weights_only=False": caitdeploy never does that)."""
    for line in str(e).strip().splitlines():
        line = line.strip()
        if line and not any(h in line.lower() for h in _TORCH_HINTS):
            return line[:200]
    return type(e).__name__


from caitdeploy.core.safepickle import REFUSED  # noqa: E402


def _refusal(path: Path, e: BaseException) -> CaitError:
    text = str(e)
    if m := re.search(r"GLOBAL ([\w.]+)", text):
        what = f"it references {m.group(1)}"
    elif m := re.search(r"(Unsupported (?:operand|class)[^\n.]*)", text):
        what = m.group(1).strip()
    else:
        what = _first_line(e)
    return CaitError(f"{path}: refused: the pickle needs code to load ({what}); {REFUSED}")


def _check_zip(path: Path) -> None:
    """A torch.save file is a zip of stored (uncompressed) records; anything else is refused before torch
    reads it, so a compressed record cannot inflate in memory and a legacy pickle cannot declare storages."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        if magic[:1] == b"\x80":
            if (code := _pickle_global(path)) is not None:
                raise CaitError(f"{path}: refused: the pickle needs code to load (it references {code}); {REFUSED}")
            raise CaitError(
                f"{path}: a legacy (pre-1.6) torch.save file or a bare pickle: re-save it with "
                "torch.save (zip format, the default since torch 1.6) or convert it to .safetensors"
            )
        raise CaitError(f"{path}: not a readable checkpoint: not a torch.save file (no zip header){_hint_suffix(path)}")
    from caitdeploy.core.safepickle import PickleRefused, check_torch_zip

    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            _check_records(path, infos, size)
            check_torch_zip(z, size)  # the pickle itself, statically, before torch.load builds anything
    except PickleRefused as e:
        raise CaitError(f"{path}: {e}") from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CaitError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None


def _check_records(path: Path, infos: list[zipfile.ZipInfo], size: int) -> None:
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise CaitError(
                f"{path}: zip record {info.filename!r} is compressed; torch.save never compresses "
                "(refused: a compressed record could inflate far beyond the file)"
            )
        if info.file_size > size:
            raise CaitError(
                f"{path}: zip record {info.filename!r} claims {info.file_size} bytes, more than the {size}-byte file"
            )


def _pickle_global(path: Path, limit: int = 1 << 20) -> str | None:
    """The first module.name a bare pickle imports (GLOBAL / STACK_GLOBAL), read with pickletools, which only
    parses opcodes and never runs them; None when there is none in the first `limit` bytes."""
    import io
    import pickletools

    with open(path, "rb") as f:
        data = f.read(limit)
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name == "GLOBAL":
                return str(arg).replace(" ", ".")
            if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                return f"{strings[-2]}.{strings[-1]}"
            if isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - a malformed pickle: no global found before the damage
        return None
    return None


def _hint_suffix(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    looks_st = len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (100 << 20)
    return "; it looks like safetensors: name it *.safetensors" if looks_st else ""


def read_container(path: Path) -> dict[str, Any]:
    """Raw top-level dict of a .pth (weights_only, memory-mapped) or .safetensors file."""
    if not path.exists():
        raise CaitError(f"{path}: no such file")
    if not path.is_file():
        raise CaitError(f"{path}: not a regular file")
    if path.suffix == ".safetensors":
        from caitdeploy.core.tensorfile import read_safetensors
        from caitdeploy.families.vit.config import ConfigError, strict_json

        tensors, meta = read_safetensors(path)
        out: dict[str, Any] = {"state_dict": tensors}
        if "format" in meta:
            out["format"] = meta["format"]
        for key in ("config", "data_config"):
            if key in meta:
                try:
                    out[key] = strict_json(meta[key], f"metadata {key!r}")
                except ConfigError as e:
                    raise CaitError(f"{path}: {e}") from None
        return out
    _check_zip(path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the one-line error says enough
            warnings.simplefilter("ignore")
            # training scripts (SiT, SPViT, DeiT) store their argparse.Namespace beside the weights: a plain
            # attribute bag, allowed; anything else that needs code stays refused
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        if "truncated" in str(e) or "ran out of input" in str(e).lower():
            raise CaitError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None
        raise _refusal(path, e) from None
    except Exception as e:  # noqa: BLE001 - the safe loader on a malformed file raises anything (AssertionError,
        # struct.error, ...): every such file is corrupt, and the one-line error says so
        raise CaitError(f"{path}: truncated or corrupt checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise CaitError(f"{path}: top level is a {type(obj).__name__}, expected a dict")
    return obj


def _strip_prefixes(sd: dict[str, Any]) -> dict[str, Any]:
    """Remove a `module.` (DDP) or `model.` (training wrappers) prefix shared by every key, repeatedly."""
    if not all(isinstance(k, str) for k in sd):
        return sd  # check_tensors names the key that is not a string
    while sd:
        for prefix in ("module.", "model."):
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                break
        else:
            return sd
    return sd


HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_tensors(path: Path, sd: dict[Any, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every value a real, dense, finite-size weight; half precision upcast to float32; integer/bool masks
    accepted as 0/1; storage really holding the elements. Returns (state dict, notes for the report)."""
    from caitdeploy.core.budgets import stored_elements_check, tensor_problem

    out: dict[str, torch.Tensor] = {}
    upcast: dict[str, int] = {}
    # BatchNorm's step counter (int64): eval-mode BatchNorm never reads it
    sd = {
        k: v
        for k, v in sd.items()
        if not (
            isinstance(k, str) and k.endswith(".num_batches_tracked") and isinstance(v, torch.Tensor) and v.numel() == 1
        )
    }
    for k, v in sd.items():
        if not isinstance(k, str):
            raise CaitError(f"{path}: state dict key {k!r} is not a string")
        if (why := tensor_problem(k, v)) is not None:
            raise CaitError(f"{path}: {why}")
    try:
        stored_elements_check(sd)
    except CaitError as e:
        raise CaitError(f"{path}: {e}") from None
    for k, v in sd.items():
        if v.is_floating_point():
            if v.dtype in HALF_DTYPES:
                upcast[str(v.dtype).removeprefix("torch.")] = upcast.get(str(v.dtype).removeprefix("torch."), 0) + 1
                v = v.float()
            elif v.dtype not in (torch.float32, torch.float64):
                raise CaitError(
                    f"{path}: key {k!r} has dtype {v.dtype}; expected float32, float64, float16 or bfloat16"
                )
        elif k.endswith("_compactor.mask"):
            v = v.float()  # integer or bool masks: their 0/1 values are checked with the float ones
        else:
            raise CaitError(f"{path}: key {k!r} has {v.dtype} values: CAIT weights are floating point")
        out[k] = v
    notes = [f"{n} {dt} tensors upcast to float32 for surgery (the fused model is float32)" for dt, n in upcast.items()]
    return out, notes


def load_checkpoint(path: str | os.PathLike, arch: str | None = None) -> Checkpoint:
    """Load and validate a `cait-compactor/1` (or timm/DeiT-style `{"model": ...}`) checkpoint of any family; a
    family whose checkpoints carry their whole config (`Family.whole_config_checkpoint`: Swin) is read from it
    alone.

    arch: a timm model name giving what shapes cannot tell (heads, pooling, LayerNorm eps); the checkpoint's
    shapes must agree with it."""
    from caitdeploy.families.timm_compat import arch_config

    path = Path(path)
    arch_cfg = arch_config(arch) if arch is not None else None  # an unknown name fails before the file is read
    raw = read_container(path)
    inferred: dict[str, Any] = {}
    fam = _declared_family(raw)
    if fam is not None and fam.whole_config_checkpoint:
        if arch_cfg is not None:
            raise CaitError(f"{path}: a {fam.name} checkpoint carries its whole config: leave out --arch")
        ck = _load_whole_config(path, raw, fam)
        ck.data_config = _data_config(path, raw, ck.config)
        return ck
    if "format" in raw:
        if raw["format"] != FORMAT:
            raise CaitError(f"{path}: unknown format {render(raw['format'])}, expected {FORMAT!r}")
        for key in ("config", "state_dict"):
            if not isinstance(raw.get(key), dict):
                raise CaitError(f"{path}: missing or malformed top-level key {key!r}")
        sd, notes = check_tensors(path, _strip_prefixes(raw["state_dict"]))
        fmt_cfg = _check_format_config(path, raw["config"])
    else:
        found = raw.get("model", raw.get("state_dict"))
        if not isinstance(found, dict):
            raise CaitError(f"{path}: no 'format' key and no 'model'/'state_dict' dict: not a CAIT checkpoint")
        sd, notes = check_tensors(path, _strip_prefixes(found))
        fmt_cfg, inferred = infer_config(path, sd, arch_cfg)
    if arch is not None and arch_cfg is not None:  # both or neither
        _agree(path, fmt_cfg, arch_cfg, arch)
    try:
        config = CaitConfig.from_format(fmt_cfg)
    except ConfigError as e:
        raise CaitError(f"{path}: config {e}") from None
    try:
        from caitdeploy.families import family

        family(config.family).check_config(config)
    except ValueError as e:
        raise CaitError(f"{path}: config {e}") from None
    ckpt = Checkpoint(path, fmt_cfg, config, dict(sd), inferred, notes, _data_config(path, raw, config))
    validate(ckpt)
    return ckpt


def _data_config(path: Path, raw: dict[str, Any], config: Any) -> dict[str, Any] | None:
    """The optional top-level `data_config` (timm's eval-transform keys), checked against the input channels."""
    if raw.get("data_config") is None or "format" not in raw:
        return None
    from caitdeploy.core.preprocess import check_data_config

    return check_data_config(raw["data_config"], config.input_shape[0], f"{path}: data_config")


def _check_format_config(path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Types and bounds of a format config, and its merges (one per block, inside the model)."""
    from caitdeploy.families.vit.config import ConfigError, check_bound

    for key in FORMAT_KEYS:
        if key not in cfg:
            raise CaitError(f"{path}: config is missing key {key!r}")
    unknown = [k for k in cfg if k not in (*FORMAT_KEYS, *FORMAT_OPTIONAL, "merges")]
    if unknown:
        raise CaitError(f"{path}: config has unknown key {render(unknown[0])}")
    out = {**{k: default for k, (default, _) in FORMAT_OPTIONAL.items()}, **cfg}
    for key, (_, types) in FORMAT_OPTIONAL.items():
        v = out[key]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise CaitError(
                f"{path}: config key {key!r} has value {render(v)}, expected {' or '.join(t.__name__ for t in types)}"
            )
    if not (isinstance(out["skip_lam"], (int, float)) and 0.01 <= out["skip_lam"] <= 100):  # NaN fails too
        raise CaitError(f"{path}: config key 'skip_lam' = {render(out['skip_lam'])} is outside 0.01..100")
    for key in FORMAT_KEYS:
        want = {"mlp_ratio": (int, float), "qkv_bias": (bool,)}.get(key, (int,))
        if not isinstance(cfg[key], want) or (key != "qkv_bias" and isinstance(cfg[key], bool)):
            raise CaitError(f"{path}: config key {key!r} has value {render(cfg[key])}, expected {want[-1].__name__}")
    try:
        check_bound(cfg["depth"], "depth")
    except ConfigError as e:
        raise CaitError(f"{path}: config {e}") from None
    merges = cfg.get("merges", {}) or {}
    if not isinstance(merges, dict):
        raise CaitError(f"{path}: config key 'merges' must map block index -> 'h'|'v'")
    out["merges"] = {}
    for k, v in merges.items():
        try:
            i = int(k) if isinstance(k, (int, str)) and not isinstance(k, bool) else int("x")
        except (TypeError, ValueError):
            raise CaitError(f"{path}: config merges key {render(k)} is not a block index") from None
        if not isinstance(v, str) or v not in MERGE_KEY:
            raise CaitError(f"{path}: config merges[{render(k)}] = {render(v)}, expected 'h' or 'v'")
        if not 0 <= i < cfg["depth"]:
            raise CaitError(f"{path}: config merges block {i} is outside 0..{cfg['depth'] - 1}")
        if i in out["merges"]:
            raise CaitError(
                f"{path}: config merges name block {i} twice ({render(out['merges'][i])} and {render(v)}); "
                "a block has at most one merge"
            )
        out["merges"][i] = v
    return out


def infer_config(
    path: Path, sd: dict[str, torch.Tensor], arch_cfg: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Config of a timm/DeiT-style state dict from its shapes and keys (class, distillation and register
    tokens, layer scale, fc_norm); `arch_cfg` (timm's definition, `--arch`) supplies what shapes cannot tell:
    the head count (without per-head compactors), the pooling and the LayerNorm eps. Returns (config, the
    values inferred from the file)."""
    from caitdeploy.families.vit.config import BOUNDS

    def need(key: str, ndim: int) -> torch.Tensor:
        if key not in sd:
            raise CaitError(f"{path}: cannot infer the config: key {key!r} is missing")
        if sd[key].dim() != ndim:
            raise CaitError(f"{path}: key {key!r} has shape {tuple(sd[key].shape)}, expected {ndim} dimensions")
        return sd[key]

    pw = need("patch_embed.proj.weight", 4)
    d = pw.shape[0]
    class_token, dist_token = "cls_token" in sd, "dist_token" in sd
    reg = need("reg_token", 3).shape[1] if "reg_token" in sd else 0
    prefix = int(class_token) + int(dist_token) + reg
    n_pos = need("pos_embed", 3).shape[1]
    no_embed_class = None
    for candidate, n_patch in ((False, n_pos - prefix), (True, n_pos)):
        g = math.isqrt(max(n_patch, 0))
        if n_patch >= 1 and g * g == n_patch and (candidate is False or prefix):
            no_embed_class = candidate
            break
    if no_embed_class is None:
        raise CaitError(
            f"{path}: cannot infer img_size: pos_embed has {n_pos} positions; neither they nor they "
            f"minus the {prefix} prefix tokens form a square grid"
        )
    g = math.isqrt(n_pos - (0 if no_embed_class else prefix))
    if pw.shape[-1] != pw.shape[-2]:
        raise CaitError(f"{path}: key 'patch_embed.proj.weight' has a non-square kernel {tuple(pw.shape[-2:])}")
    idx = [int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d{1,6})\.", k))]
    depth = 1 + max(idx, default=-1)
    if depth == 0:
        raise CaitError(f"{path}: cannot infer depth: no 'blocks.{{i}}.*' keys")
    if depth > BOUNDS["depth"][1]:
        raise CaitError(
            f"{path}: key prefix 'blocks.{depth - 1}.' gives depth {depth}, outside 1..{BOUNDS['depth'][1]} "
            "(the bound for real ViTs)"
        )
    heads = [
        sd[k].shape[0]
        for k in sd
        if re.fullmatch(r"blocks\.\d+\.attn\.[qkv]_compactor\.weight", k) and sd[k].dim() == 3
    ]
    if heads:
        num_heads = heads[0]
    elif arch_cfg is not None:
        num_heads = arch_cfg["num_heads"]
    else:
        raise CaitError(
            f"{path}: cannot infer num_heads from a state dict without per-head compactors: pass "
            "--arch with the timm model name (e.g. --arch deit_tiny_patch16_224), or write a "
            "cait-compactor/1 checkpoint with a 'config'"
        )
    merges: dict[int, str] = {}
    for k in sd:
        if m := re.fullmatch(r"blocks\.(\d+)\.(htm|vtm)\.fc\.weight", k):
            i, kind = int(m.group(1)), "h" if m.group(2) == "htm" else "v"
            if i in merges:
                raise CaitError(f"{path}: block {i} has both an htm and a vtm merge; a block has at most one")
            merges[i] = kind
    fc1 = need("blocks.0.mlp.fc1.weight", 2)
    fc_norm = "fc_norm.weight" in sd
    cfg = {
        "img_size": g * pw.shape[-1],
        "patch_size": pw.shape[-1],
        "in_chans": pw.shape[1],
        "num_classes": need("head.weight", 2).shape[0],
        "embed_dim": d,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": fc1.shape[0] / d if d else 0.0,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "merges": merges,
        "class_token": class_token,
        "dist_token": dist_token,
        "reg_tokens": reg,
        "no_embed_class": no_embed_class,
        "fc_norm": fc_norm,
        "global_pool": "avg" if (fc_norm or not class_token) else "token",
        "layer_scale": "blocks.0.ls1.gamma" in sd,
    }
    inferred = dict(cfg)
    if arch_cfg is not None:  # what the file cannot say: timm's definition
        cfg.update(global_pool=arch_cfg["global_pool"], ln_eps=arch_cfg["ln_eps"], arch=arch_cfg["arch"])
        if not heads:
            inferred.pop("num_heads")
    return {**{k: v for k, (v, _) in FORMAT_OPTIONAL.items()}, **cfg}, inferred


def _agree(path: Path, cfg: dict[str, Any], arch_cfg: dict[str, Any], arch: str) -> None:
    """The checkpoint's structure must be the one timm defines for `arch` (image size may differ: timm
    models run at other resolutions with a resized pos_embed)."""
    for key in (
        "patch_size",
        "embed_dim",
        "depth",
        "num_heads",
        "qkv_bias",
        "class_token",
        "dist_token",
        "reg_tokens",
        "no_embed_class",
        "fc_norm",
        "layer_scale",
        "global_pool",
    ):
        if key in arch_cfg and cfg.get(key) != arch_cfg[key]:
            raise CaitError(
                f"{path}: does not match --arch {arch}: the checkpoint has {key} = {render(cfg.get(key))}, "
                f"timm's {arch} has {render(arch_cfg[key])}"
            )
    if abs(cfg["mlp_ratio"] - arch_cfg["mlp_ratio"]) > 1e-6:
        raise CaitError(
            f"{path}: does not match --arch {arch}: mlp width ratio {cfg['mlp_ratio']:g} vs {arch_cfg['mlp_ratio']:g}"
        )


# ---- validation ---------------------------------------------------------------------------------
def expected_shapes(cfg: CaitConfig, fmt: dict[str, Any]) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(required, optional) key -> shape for a checkpoint of this config."""
    from caitdeploy.families import family

    d, h = cfg.embed_dim, fmt["num_heads"]
    hd, hidden = d // h, int(d * fmt["mlp_ratio"])
    req: dict[str, tuple] = {"cls_token": (1, 1, d)} if cfg.class_token else {}
    fam: Any = family(cfg.family)  # a VitFamily: its variant's hooks give the stem's shapes
    req.update(
        {
            "pos_embed": (1, cfg.pos_embed_len, d),
            **fam.stem_shapes(cfg),
            "head.weight": (cfg.num_classes, d),
            "head.bias": (cfg.num_classes,),
        }
    )
    if cfg.dist_token:
        req.update(
            {"dist_token": (1, 1, d), "head_dist.weight": (cfg.num_classes, d), "head_dist.bias": (cfg.num_classes,)}
        )
    if cfg.reg_tokens:
        req["reg_token"] = (1, cfg.reg_tokens, d)
    norm = "fc_norm" if cfg.fc_norm else "norm"
    req.update({f"{norm}.weight": (d,), f"{norm}.bias": (d,)})
    opt: dict[str, tuple] = {}
    for i, blk in enumerate(cfg.blocks):
        b = f"blocks.{i}."
        req.update(
            {
                b + "norm1.weight": (d,),
                b + "norm1.bias": (d,),
                b + "norm2.weight": (d,),
                b + "norm2.bias": (d,),
                b + "attn.qkv.weight": (3 * d, d),
                b + "attn.proj.weight": (d, d),
                b + "attn.proj.bias": (d,),
                b + "mlp.fc1.weight": (hidden, d),
                b + "mlp.fc1.bias": (hidden,),
                b + "mlp.fc2.weight": (d, hidden),
                b + "mlp.fc2.bias": (d,),
            }
        )
        if fmt.get("layer_scale"):
            req.update({b + "ls1.gamma": (d,), b + "ls2.gamma": (d,)})
        if cfg.qkv_bias:
            req[b + "attn.qkv.bias"] = (3 * d,)
        if blk.merge:
            m = merge_prefix(i, blk.merge) + "."
            req.update({m + "weight": (d, 2 * d), m + "bias": (d,)})
        for name in ATTN_COMPACTORS:
            c = compactor_prefix(i, name)
            opt.update({c + ".weight": (h, hd, hd), c + ".mask": (h, hd)})
        c = compactor_prefix(i, "fc1")
        opt.update({c + ".weight": (hidden, hidden), c + ".mask": (hidden,)})
    return req, opt


def _all_finite(t: torch.Tensor) -> bool:
    # min/max propagate NaN and Inf: one reduction pass, ~5x faster than isfinite(t).all() on big tensors
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def validate(ckpt: Checkpoint) -> None:
    cfg = ckpt.config
    req, opt = expected_shapes(cfg, ckpt.format_config)
    validate_state_dict(ckpt.path, ckpt.state_dict, req, opt, cfg)


def validate_state_dict(
    path: Path, sd: dict[str, torch.Tensor], req: dict[str, tuple], opt: dict[str, tuple], cfg: CaitConfig | None = None
) -> None:
    """Exactly the keys `req` (+ any of `opt`), each of its shape and finite; compactor weights and masks in
    pairs, masks 0/1, no head or fc1 masked whole. `cfg` (a ViT config) adds merge hints."""
    missing = [k for k in req if k not in sd]
    if missing:
        raise CaitError(
            f"{path}: missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    extra = [k for k in sd if k not in req and k not in opt]
    if extra:
        from caitdeploy.families.timm_compat import unsupported_feature

        if (feature := next((f for k in extra if (f := unsupported_feature(k))), None)) is not None:
            key = next(k for k in extra if unsupported_feature(k))
            raise CaitError(f"{path}: key {key!r}: {feature} is not supported (not part of {FORMAT})")
        hint = ""
        if cfg is not None and (m := re.fullmatch(r"blocks\.(\d+)\.(htm|vtm)\..*", extra[0])):
            hint = (
                f" (config merges say block {m.group(1)} has {cfg.blocks[int(m.group(1))].merge or 'no'} merge)"
                if int(m.group(1)) < cfg.depth
                else ""
            )
        raise CaitError(f"{path}: unexpected key {extra[0]!r}{hint}")
    for k, v in sd.items():
        want = req.get(k, opt.get(k))
        if tuple(v.shape) != want:
            raise CaitError(f"{path}: key {k!r} has shape {tuple(v.shape)}, expected {want}")
        if v.is_floating_point() and v.numel() and not _all_finite(v):
            raise CaitError(f"{path}: key {k!r} contains NaN or Inf")
    for k, mask in sd.items():
        if k.endswith("_compactor.weight") and k.replace(".weight", ".mask") not in sd:
            raise CaitError(f"{path}: compactor {k!r} has no mask (missing key {k.replace('.weight', '.mask')!r})")
        if k.endswith("_compactor.mask"):
            if k.replace(".mask", ".weight") not in sd:
                raise CaitError(f"{path}: mask {k!r} has no compactor (missing key {k.replace('.mask', '.weight')!r})")
            if not bool(((mask == 0) | (mask == 1)).all()):
                bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
                raise CaitError(f"{path}: key {k!r} must hold only 0 and 1, found {bad:g}")
            kept = (mask != 0).reshape(-1, mask.shape[-1]).sum(-1) if mask.dim() == 2 else (mask != 0).sum().reshape(1)
            if bool((kept == 0).any()):
                blk = re.sub(r"^blocks\.(\d+)$", r"\1", re.split(r"\.(?:attn|mlp)\.", k)[0])
                which = k.split(".")[-2].replace("_compactor", "")
                where = f" head {int((kept == 0).nonzero()[0])}" if mask.dim() == 2 else ""
                raise CaitError(f"{path}: block {blk}: every {which} channel{where} is masked ({k!r})")


# ---- families whose checkpoints carry their whole config (Family.whole_config_checkpoint) ------------------
def _declared_family(raw: dict[str, Any]):
    """The family a `cait-compactor/1` file's config names (None: not one, or no family named, or an unknown one,
    left for the format check to name)."""
    from caitdeploy.families import UnknownFamily, family

    cfg = raw.get("config") if "format" in raw else None
    if not isinstance(cfg, dict) or "family" not in cfg:
        return None
    try:
        return family(cfg["family"])
    except UnknownFamily:
        return None


def _load_whole_config(path: Path, raw: dict[str, Any], fam) -> Checkpoint:
    from caitdeploy.families.registry import buffer_suffixes

    if raw["format"] != FORMAT:
        raise CaitError(f"{path}: unknown format {render(raw['format'])}, expected {FORMAT!r}")
    if not isinstance(raw.get("state_dict"), dict):
        raise CaitError(f"{path}: missing or malformed top-level key 'state_dict'")
    try:
        fmt = fam.check_format(raw["config"])
        cfg = fam.config_from_format(fmt)
    except ConfigError as e:
        raise CaitError(f"{path}: config {e}") from None
    sd = {
        k: v
        for k, v in _strip_prefixes(raw["state_dict"]).items()
        if not (isinstance(k, str) and k.endswith(buffer_suffixes()))
    }
    sd, notes = check_tensors(path, sd)
    req, opt = fam.checkpoint_shapes(cfg)
    validate_state_dict(path, sd, req, opt)
    return Checkpoint(path, fmt, cfg, sd, notes=notes)
