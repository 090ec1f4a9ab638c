"""The family protocol: everything the rest of caitdeploy asks of a model family.

A family is a package or module under `families/` with one `Family` object (`FAMILY`), registered by name in
`registry.py`. Fuse, make-checkpoint, train, export, bench, serve and inspect ask that object (through
`family_of(config)` or `family_for_arch(arch)`) and never test a family's name or config type. What a family
provides:

- identity: `name` (the config's "family" key), `description` (one line for tables);
- defaults: `default_flops_reduction`, `default_merges` (the paper's settings), `default_distill_alpha(fmt)`,
  `merge_syntax` (for messages);
- what does not apply, each a reason or None: `tome_note` (the ToMe baseline), `attention_op_note` (the ONNX
  attention operator), `kernels_note` (the Triton kernels), `token_reduction_note` (train --token-reduction);
- configs: `check_config(config)`, `config_from_dict(raw)` (its config type from a fused file's or ONNX file's metadata),
  `config_from_format(fmt)` (from a checkpoint's format config);
- configs' blocks: `blocks(config)` in flat order, `with_blocks(config, blocks)` (a pruned config);
- the deploy model: `build(config, attn_impl, kernels)`, `deploy_type()`, `resized(config, state_dict, img_size)` (to run a fused
  model at another input size);
- accounting, the one source of FLOPs and params: `flops`, `params`, `block_rows`, `channel_savings`,
  `activation_bytes`, and `arch_name` (a short name for tables);
- timm: `owns_arch(arch)`, `timm_model(...)`, `format_config_of(model, arch)` (the checkpoint's format config of
  a timm model, no merges), `timm_keys(sd)` (a foreign state-dict layout to timm's);
- ATME merges, one parser per family: `parse_merges`, `merges_text`, `merge_reduction`, `auto_merges`, and the
  shared `plan_merges` (auto or a spec, checked against the FLOPs target);
- checkpoints: `initial_weights(model, merges, arch)` (format config, config, checkpoint-keyed tensors with the
  merges at their starting value), `block_sites(config)` (where each prunable block's q/k/v/proj/fc1/fc2 live)
  and `compactor_key(config, j, name)`;
- fuse: `fuse_start`, `fuse_block`, `fuse_finish` place the sliced tensors under the deploy model's keys, and
  `reference(ckpt)` is the float64 forward a fused model is verified against.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from caitdeploy.core.errors import OptionError

if TYPE_CHECKING:
    from caitdeploy.families.layers import AttnImpl

AUTO = "auto"


@dataclass(frozen=True)
class BlockSite:
    """One prunable block of a checkpoint: its flat index, a label for messages, the key prefix of its timm-layout
    tensors (`attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`) and its head count."""

    index: int
    label: str
    prefix: str
    num_heads: int


def check_merge_budget(r: float, flops_reduction: float, text: str) -> None:
    """OptionError naming --merges `text` when the merges alone cut more FLOPs (`r`) than the target: CDCP could
    not prune at all and the result would miss it."""
    if r > flops_reduction + 1e-9:
        raise OptionError(
            "merges", f"{text}: the merges alone cut FLOPs by {r:.2%}, more than --flops-reduction {flops_reduction}"
        )


class Family(abc.ABC):
    """A model family (see the module docstring for the whole protocol)."""

    name: str = ""
    description: str = ""
    default_flops_reduction: float = 0.55
    default_merges: str = "4:h,8:v"
    merge_syntax: str = "BLOCK:h|v"
    tome_note: str | None = None
    attention_op_note: str | None = None
    kernels_note: str | None = None
    token_reduction_note: str | None = None  # why --token-reduction does not apply to its auto merges
    buffer_suffixes: tuple[str, ...] = ()  # state-dict keys of buffers its models rebuild (dropped on reading)

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # ---- configs and the deploy model ----
    @abc.abstractmethod
    def config_from_dict(self, raw: dict[str, Any]) -> Any:
        """Its config from a dict (ConfigError naming what is wrong)."""

    @abc.abstractmethod
    def check_config(self, config: Any) -> None:
        """ConfigError unless `config` is one this family builds (its type, its blocks' kinds)."""

    @abc.abstractmethod
    def config_from_format(self, fmt: dict[str, Any]) -> Any:
        """Its config from a checkpoint's format config (docs/CHECKPOINT_FORMAT.md); ConfigError (a ValueError)
        naming what is wrong."""

    @abc.abstractmethod
    def build(self, config: Any, attn_impl: AttnImpl = "sdpa", kernels: str | None = None) -> Any:
        """The deploy model (an nn.Module with `.config`)."""

    @abc.abstractmethod
    def deploy_type(self) -> type:
        """The class of its deploy model."""

    @abc.abstractmethod
    def resized(self, config: Any, state_dict: dict, img_size: Any) -> tuple[Any, dict]:
        """(config, state dict) to run at input size `img_size` (int, (H, W) or 'HxW'); ConfigError when the
        model cannot."""

    @abc.abstractmethod
    def blocks(self, config: Any) -> list:
        """Its blocks' configs in the flat order CDCP, fuse and the reports use (each with num_heads, qk_dim,
        v_dim, mlp_hidden, merge)."""

    @abc.abstractmethod
    def with_blocks(self, config: Any, blocks: list) -> Any:
        """`config` with its blocks replaced (flat order, as `blocks` gives them): a pruned config."""

    # ---- accounting: the one source of FLOPs and params ----
    @abc.abstractmethod
    def flops(self, config: Any) -> dict:
        """{"total", "patch_embed", "head", "blocks": [{"total", ...}, ...]} per image."""

    @abc.abstractmethod
    def params(self, config: Any) -> int:
        """Parameters of the deploy model."""

    @abc.abstractmethod
    def block_rows(self, config: Any) -> list[dict]:
        """One row per block: widths, tokens, FLOPs by part, params (fuse's report, inspect, benchmarks)."""

    @abc.abstractmethod
    def channel_savings(self, config: Any, j: int) -> dict[str, int]:
        """FLOPs saved in block j by one CDCP unit: {"qk", "v", "mlp"}."""

    @abc.abstractmethod
    def encoder_flops(self, config: Any, last_block: int | None = None) -> int:
        """FLOPs per image of a feature extractor: the stem and blocks 0..last_block (all by default), no head."""

    @abc.abstractmethod
    def activation_bytes(self, config: Any, batch: int, elem_bytes: int = 4) -> int:
        """Peak activation memory of one forward pass at `batch` (an estimate that does not overestimate)."""

    @abc.abstractmethod
    def arch_name(self, config: Any) -> str:
        """A short name of the dense architecture, e.g. 'vit-d384-x12-h6-224px'."""

    # ---- timm ----
    def owns_arch(self, arch: str) -> bool:
        """Whether timm architecture `arch` belongs to this family (make-checkpoint and train pick by it)."""
        return False

    def timm_model(
        self, arch: str, num_classes: int | None = None, img_size: int | None = None, model_args: dict | None = None
    ) -> Any:
        raise OptionError("arch", f"{arch}: family {self.name} is not built from a timm model")

    def format_config_of(self, model: Any, arch: str | None = None) -> dict[str, Any]:
        raise OptionError("arch", f"family {self.name} is not built from a timm model")

    def default_distill_alpha(self, fmt: dict[str, Any]) -> float:
        """train's hard-distillation weight when --distill-alpha is not given."""
        return 0.25

    def timm_keys(self, sd: dict) -> dict:
        """A state dict in a layout of its own (e.g. Microsoft's) as timm's keys; timm's stays as it is."""
        return sd

    def owns_timm_model(self, model: Any) -> bool:
        """Whether a timm model instance belongs to this family (train's `cait_wrap` picks by it)."""
        return False

    # ---- training with compactors ----
    # train_in_place: the timm model itself gets compactors and merges (training/wrappers.py's CaitTrainViT);
    # otherwise the family builds a compactor model of its own from the timm model (`compactor_model`).
    train_in_place: bool = True

    def compactor_model(self, model: Any, merges: dict, arch: str | None = None) -> tuple[dict[str, Any], Any, Any]:
        """(format config, config, a module with CDCP compactors after q, k, v and fc1 and the ATME merges, the
        timm weights copied) for training; only families with train_in_place False have one."""
        raise NotImplementedError(f"family {self.name} trains the timm model in place")

    def compactor_modules(self, config: Any, model: Any) -> list[tuple[int, str, Any]]:
        """(flat block, "q"|"k"|"v"|"fc1", compactor module) of a `compactor_model`."""
        raise NotImplementedError(f"family {self.name} trains the timm model in place")

    def checkpoint_state(self, config: Any, model: Any) -> dict:
        """A `compactor_model`'s state dict under the checkpoint's keys."""
        raise NotImplementedError(f"family {self.name} trains the timm model in place")

    # ---- ATME merges ----
    @abc.abstractmethod
    def parse_merges(self, text: str) -> dict:
        """A --merges spec (not "auto") -> {block: kind}; OptionError naming --merges."""

    @abc.abstractmethod
    def merges_text(self, merges: dict) -> str:
        """The spec of `merges` ("none" when empty)."""

    @abc.abstractmethod
    def merge_reduction(self, fmt: dict[str, Any], merges: dict) -> float:
        """FLOPs reduction `merges` alone give the model of format config `fmt`; OptionError naming --merges for a
        merge that does not fit."""

    @abc.abstractmethod
    def auto_merges(
        self, fmt: dict[str, Any], flops_reduction: float, token_reduction: float | None = None
    ) -> tuple[dict, dict[str, Any]]:
        """The paper's placement for a FLOPs target: (merges, info)."""

    def plan_merges(
        self, fmt: dict[str, Any], text: str | None, flops_reduction: float, token_reduction: float | None = None
    ) -> tuple[dict, dict[str, Any]]:
        """(merges, info) for --merges `text` (None: the family's default; "auto": `auto_merges`), checked against
        the target: the merges alone must not cut more than `flops_reduction`."""
        text = self.default_merges if text is None else text
        if text.strip().lower() == AUTO:
            return self.auto_merges(fmt, flops_reduction, token_reduction)
        if token_reduction is not None:
            raise OptionError("token_reduction", "is for --merges auto")
        merges = self.parse_merges(text)
        r = self.merge_reduction(fmt, merges)
        check_merge_budget(r, flops_reduction, self.merges_text(merges))
        return merges, {
            "merges": merges,
            "token_reduction": r,
            "channel_reduction": flops_reduction - r,
            "flops_reduction": flops_reduction,
        }

    # ---- checkpoints ----
    @abc.abstractmethod
    def initial_weights(self, model: Any, merges: dict, arch: str | None = None) -> tuple[dict[str, Any], Any, dict]:
        """(format config with the merges, config, checkpoint-keyed tensors without compactors, merges at their
        starting value: the mean of the two tokens) of a timm `model`."""

    # whole_config_checkpoint: its checkpoints carry their whole config, checked by `check_format`, and their
    # tensors' shapes follow from it (`checkpoint_shapes`); otherwise (the ViT) formats/checkpoint.py reads the
    # config with what the tensors' shapes and --arch tell
    whole_config_checkpoint: bool = False

    def check_format(self, raw: Any) -> dict[str, Any]:
        """A checkpoint's format config, checked (ConfigError naming what is wrong)."""
        raise NotImplementedError(f"family {self.name}: formats/checkpoint.py reads its checkpoints")

    def checkpoint_shapes(self, config: Any) -> tuple[dict[str, tuple], dict[str, tuple]]:
        """(required, optional) checkpoint keys -> shapes of a checkpoint of `config` (optional: compactors)."""
        raise NotImplementedError(f"family {self.name}: formats/checkpoint.py reads its checkpoints")

    @abc.abstractmethod
    def block_sites(self, config: Any) -> list[BlockSite]:
        """The prunable blocks of a checkpoint of `config`, in CDCP's flat order."""

    @abc.abstractmethod
    def compactor_key(self, config: Any, j: int, name: str) -> str:
        """The key prefix of block j's compactor `name` (q, k, v, fc1) in a checkpoint."""

    # ---- fuse: where the sliced tensors go ----
    @abc.abstractmethod
    def fuse_start(self, ckpt: Any) -> dict:
        """The deploy tensors outside the prunable blocks that fuse copies or folds before the blocks (may be
        empty when `fuse_finish` maps them)."""

    @abc.abstractmethod
    def fuse_block(self, ckpt: Any, site: BlockSite, sliced: dict, out: dict) -> None:
        """Put block `site`'s sliced tensors (`slice_block`'s keys: attn.qkv, attn.proj, mlp.fc1, mlp.fc2) and
        the block's other tensors into `out` under the deploy model's keys, folding what the deploy model does
        not have (layer scale, residual scaling)."""

    @abc.abstractmethod
    def fuse_finish(self, ckpt: Any, config: Any, out: dict) -> dict:
        """The whole deploy state dict of fused `config` from `out` and the checkpoint's other tensors."""

    @abc.abstractmethod
    def reference(self, ckpt: Any, dtype: Any = None) -> Any:
        """What a fused model of checkpoint `ckpt` must compute: images -> logits (float64, or `dtype`), the
        checkpoint's own forward (compactors applied as matrices, merges, dense widths), written apart from the
        deploy model. `eval` runs it in float32 for the accuracy the training produced."""

    def merges_summary(self, merges: dict) -> dict:
        """`merges` as JSON-able {key: kind} for reports."""
        return {str(k): v for k, v in merges.items()}
