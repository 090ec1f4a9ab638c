"""PyTorch -> ONNX for deployment: clean graph, forbidden-op check, op census, ONNX Runtime verification.

Graph contract (what `export_onnx` writes):
- one input `images` [batch, C, H, W] float32 and one output `logits` [batch, num_classes] float32; only the
  batch dimension is dynamic (named "batch").
- dtype="fp16": weights and all compute are float16; the graph keeps float32 `images`/`logits` and converts at
  the edges with one Cast after the input and one Cast before the output, so clients and Triton configs are the
  same for both dtypes. LayerNormalization keeps `stash_type=1` (mean/variance computed in float32); Softmax is
  float16 in the graph (the ONNX op has no accumulation-type attribute; TensorRT and ONNX Runtime accumulate the
  row reduction in float32 internally) and its input is bounded because the scale is applied to q before QK^T.
- attention="matmul": a CaitViT is exported with its "math" attention: Mul(q, scale) -> MatMul(q, k^T) ->
  Softmax -> MatMul(., v), the pattern TensorRT fuses. attention="op": the ONNX `Attention` op (opset >= 23),
  whose q/k head width may differ from the v head width (the spec allows it; ONNX Runtime runs it).
- ATME merges are Slice (class token / patches) + Reshape [+ Transpose for vertical merges] + MatMul + Add +
  Concat: no Gather/Shape arithmetic, the batch stays -1 in every Reshape.

The exporter is torch.onnx's dynamo (torch.export) exporter with its onnxscript optimizer. The legacy
TorchScript exporter lowers `cls_token.expand(B, -1, -1)` with Equal + Where, which the forbidden-op rule
rejects; the dynamo exporter emits a plain Shape -> Expand, so no rewriting is needed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from caitdeploy.core.errors import CaitError, OptionError, atomic_output, check_output_dir
from caitdeploy.formats.onnx_meta import _all_nodes, _numel, io_signature, op_census

FORBIDDEN_OPS = (
    "TopK",
    "ArgMax",
    "ArgMin",
    "GatherElements",
    "GatherND",
    "ScatterElements",
    "ScatterND",
    "NonZero",
    "Loop",
    "If",
    "Where",
)
SUPPORTED_OPSETS = tuple(range(18, 24))  # 18..23: what torch's dynamo exporter emits natively
DEFAULT_OPSET = 18  # widest support (TensorRT 10, TensorRT-RTX, ONNX Runtime)
ATTENTION_OP_OPSET = 23  # first opset with the ONNX `Attention` op
DTYPES = ("fp32", "fp16")
ATTENTIONS = ("matmul", "op")
from caitdeploy.core.names import ONNX_FORMAT  # noqa: E402

INPUT_NAME, OUTPUT_NAME = "images", "logits"


def _first_line(e: BaseException) -> str:
    for line in str(e).strip().splitlines():
        if line.strip():
            return line.strip()[:300]
    return type(e).__name__


def check_options(dtype: str, opset: int | None, attention: str) -> int:
    """Validate export options; returns the opset to use (None -> the default for `attention`)."""
    if dtype not in DTYPES:
        raise CaitError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if attention not in ATTENTIONS:
        raise CaitError(f"unknown attention {attention!r}: choose one of {', '.join(ATTENTIONS)}")
    if opset is None:
        opset = ATTENTION_OP_OPSET if attention == "op" else DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in SUPPORTED_OPSETS:
        raise CaitError(f"unsupported opset {opset!r}: choose {SUPPORTED_OPSETS[0]}..{SUPPORTED_OPSETS[-1]}")
    if attention == "op" and opset < ATTENTION_OP_OPSET:
        raise OptionError("attention", f"op needs opset >= {ATTENTION_OP_OPSET} (the ONNX Attention op), got {opset}")
    return opset


# ---- graph utilities ----------------------------------------------------------------------------
def check_forbidden(model, forbid: Iterable[str], what: str = "model") -> None:
    """Raise CaitError naming the first forbidden op and its node."""
    forbid = set(forbid)
    if not forbid:
        return
    bad = [n for n in _all_nodes(model.graph) if n.op_type in forbid]
    if bad:
        n = bad[0]
        more = f" ({len(bad) - 1} more forbidden node(s))" if len(bad) > 1 else ""
        raise CaitError(
            f"{what}: the exported graph contains forbidden op {n.op_type} at node {n.name!r} "
            f"(inputs {list(n.input)}){more}; deploy graphs must not use "
            f"{', '.join(sorted(forbid))}"
        )


def clean_graph(model):
    """onnx-graphsurgeon: fold constants, drop dead nodes, topologically sort."""
    import onnx_graphsurgeon as gs

    try:  # graphsurgeon folds with ONNX Runtime sessions: its optimizer's notes are not for the terminal
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
    except ImportError:
        pass
    graph = gs.import_onnx(model)
    with contextlib.redirect_stdout(io.StringIO()):
        graph.fold_constants().cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out


def _set_batch_dim(value_info, name: str = "batch") -> None:
    dim = value_info.type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_param = name


# ---- export -------------------------------------------------------------------------------------
class _Fp16Graph(torch.nn.Module):
    """float32 images -> float16 model -> float32 outputs (one Cast at each edge of the graph)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor):
        out = self.inner(images.to(torch.float16))
        if isinstance(out, (tuple, list)):
            return tuple(t.to(torch.float32) for t in out)
        return out.to(torch.float32)


def feature_names(blocks: Iterable[int]) -> list[str]:
    """ONNX output names of a feature export: feat3, feat5, ..."""
    return [f"feat{b}" for b in blocks]


def _family(model):
    """The family of a deploy model of ours (its `config` names it), or None for any other module."""
    from caitdeploy.families import UnknownFamily, family_of

    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        fam = family_of(config)
    except UnknownFamily:
        return None
    return fam if isinstance(model, fam.deploy_type()) else None


def _is_cait(model) -> bool:
    """A deploy model of ours (config attached), of any registered family."""
    return _family(model) is not None


def _family_note(model, what: str) -> str | None:
    """The family's reason (`Family.<what>`) why a feature does not apply to `model`, or None."""
    fam = _family(model)
    return getattr(fam, what) if fam is not None else None


def _prepare(
    model: torch.nn.Module, dtype: str, attention: str, features: tuple[int, ...] | None = None, restore: str = "repeat"
) -> torch.nn.Module:
    """A copy of `model` ready to trace (the caller's model is never modified)."""
    m = copy.deepcopy(model).eval().float()
    inner: Any = getattr(m, "model", None) if not _is_cait(m) else m  # a FeatureModel around a CaitViT
    if _is_cait(inner) and hasattr(inner, "set_impl"):
        inner.set_impl("sdpa" if attention == "op" else "math")
    if features:
        from caitdeploy.families.vit.model import FeatureModel

        m = FeatureModel(m, features, restore)
    if dtype == "fp16":
        m = _Fp16Graph(m.half())
    return m


def _torch_export(module: torch.nn.Module, example: torch.Tensor, opset: int, output_names: list[str] | None = None):
    """Run torch.onnx's dynamo exporter; returns an onnx.ModelProto. Exporter chatter is swallowed."""
    batch = torch.export.Dim("batch")
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(
                module,
                (example,),
                None,
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=output_names or [OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                optimize=True,
                verbose=False,
                external_data=False,
            )
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; the user gets one line
        raise CaitError(f"torch.onnx export failed: {type(e).__name__}: {_first_line(e)}") from None
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
    assert prog is not None  # dynamo=True always returns an ONNXProgram
    return prog.model_proto


@torch.no_grad()
def verify_onnx(
    model_bytes: bytes,
    reference: torch.nn.Module,
    input_shape: tuple[int, ...],
    *,
    dtype: str,
    what: str = "exported",
    batches: tuple[int, ...] = (1, 7),
    fp16_samples: int = 256,
    chunk: int = 32,
    seed: int = 0,
    output_names: list[str] | None = None,
) -> dict[str, Any]:
    """ONNX Runtime CPU vs the float32 PyTorch model on seeded N(0, 1) images, through Polygraphy: its
    Comparator runs our `TorchRunner` and its own `OnnxrtRunner` on the same feeds, and `compare_accuracy`
    (`CompareFunc.simple`, absolute tolerance) decides the fp32 check.

    fp32: max |diff| <= 1e-4 * max(1, output scale) at every batch size in `batches`, for every output.
    fp16: the same batch sizes plus `fp16_samples` images in chunks; logits pass when top-1 agrees on >= 99%,
    feature maps when every image's map has cosine similarity >= 0.999 with PyTorch's.
    output_names: the graph's outputs, in the order `reference` returns them (default: one "logits").
    Raises CaitError when the check fails; returns the numbers either way (per output under "outputs").
    """
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.exception import PolygraphyException

    from caitdeploy.runtime import RuntimeSpec, TorchRunner, quiet_polygraphy

    names = list(output_names or [OUTPUT_NAME])
    quiet_polygraphy()
    ort.set_default_logger_severity(3)  # ONNX Runtime's own warnings are not sprayed on the terminal
    g = torch.Generator().manual_seed(seed)
    sizes = list(batches)
    if dtype == "fp16" and fp16_samples > 0:
        sizes += [chunk] * (-(-fp16_samples // chunk))
    feeds = [{INPUT_NAME: torch.randn(b, *input_shape, generator=g).numpy()} for b in sizes]
    ref_model = reference.eval()
    runners = [
        TorchRunner(
            ref_model,
            RuntimeSpec("cpu"),
            dtype=torch.float32,
            input_shape=tuple(input_shape),
            name="pytorch",
            output_names=names,
        ),
        OnnxrtRunner(SessionFromOnnx(model_bytes, providers=["CPUExecutionProvider"]), name="onnxruntime"),
    ]
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            results = Comparator.run(runners, data_loader=feeds)
    except (PolygraphyException, Exception) as e:  # noqa: BLE001 - session or run failures: one line
        raise CaitError(
            f"onnxruntime {ort.__version__} (CPU) cannot run the {what} graph: {_first_line(e)}; "
            "export with --no-verify to skip the check"
        ) from None
    (_, ref_iters), (_, ort_iters) = results
    per_output: dict[str, dict[str, Any]] = {}
    for name in names:
        refs = [torch.from_numpy(it[name]).float() for it in ref_iters]
        outs = [torch.from_numpy(it[name]).float() for it in ort_iters]
        per_batch: list[dict[str, Any]] = []
        for b, r, y in zip(sizes, refs, outs):
            if tuple(y.shape) != tuple(r.shape):
                raise CaitError(
                    f"{what}: ONNX output {name!r} shape {tuple(y.shape)} != PyTorch {tuple(r.shape)} at batch {b}"
                )
            if len(per_batch) < len(batches):
                per_batch.append({"batch": b, "max_abs_diff": float((y - r).abs().max())})
        ref, out = torch.cat(refs), torch.cat(outs)
        o: dict[str, Any] = {
            "batches": per_batch,
            "max_abs_diff": float((out - ref).abs().max()),
            "scale": float(ref.abs().max()),
            "std": float(ref.std()),
        }
        if ref.dim() == 2:
            top2 = ref.topk(2, dim=-1).values if ref.shape[-1] > 1 else None
            margin = (top2[:, 0] - top2[:, 1]) if top2 is not None else None
            o.update(
                top1_agree=float((out.argmax(-1) == ref.argmax(-1)).double().mean()),
                median_top1_margin=float(margin.median()) if margin is not None else None,
                ties=int((margin < 2 * o["max_abs_diff"]).sum()) if margin is not None else 0,
            )
        else:
            cos = torch.nn.functional.cosine_similarity(out.flatten(1).double(), ref.flatten(1).double(), dim=1)
            o["min_cosine"] = float(cos.min())
        per_output[name] = o
    first = per_output[names[0]]
    res: dict[str, Any] = {
        "dtype": dtype,
        "samples": int(sum(sizes)),
        "outputs": per_output,
        # the first output's numbers at the top level (the logits of a classifier)
        "batches": first["batches"],
        "max_abs_diff": first["max_abs_diff"],
        "logit_scale": first["scale"],
        "logit_std": first["std"],
        "top1_agree": first.get("top1_agree"),
        "median_top1_margin": first.get("median_top1_margin"),
        "seconds": time.perf_counter() - t0,
        "checked_by": "polygraphy Comparator (TorchRunner vs OnnxrtRunner)",
    }
    if dtype == "fp32":
        for o in per_output.values():
            o["tolerance"] = 1e-4 * max(1.0, o["scale"])
            o["passed"] = o["max_abs_diff"] <= o["tolerance"]
        with contextlib.redirect_stdout(io.StringIO()):  # Polygraphy's verdict, per-output tolerances
            acc = Comparator.compare_accuracy(
                results,
                compare_func=SimpleCompareFunc(atol={n: o["tolerance"] for n, o in per_output.items()}, rtol=0.0),
            )
        bad = [n for n, o in per_output.items() if not o["passed"]] or ([] if acc else names[:1])
        res.update(tolerance=first["tolerance"], passed=not bad)
        if bad:
            o = per_output[bad[0]]
            unit = "logit diff" if bad[0] == OUTPUT_NAME else f"{bad[0]} diff"
            raise CaitError(
                f"{what}: ONNX Runtime vs PyTorch max |{unit}| {o['max_abs_diff']:.3g} > tolerance "
                f"{o['tolerance']:.3g} (scale {o['scale']:.3g})"
            )
    else:
        for name, o in per_output.items():
            o["passed"] = (o["top1_agree"] >= 0.99) if "top1_agree" in o else (o["min_cosine"] >= 0.999)
        res.update(min_top1_agree=0.99, min_cosine=0.999, passed=all(o["passed"] for o in per_output.values()))
        for name, o in per_output.items():
            if o["passed"]:
                continue
            if "top1_agree" in o:
                raise CaitError(
                    f"{what}: fp16 top-1 agreement {100 * o['top1_agree']:.1f}% < 99% over "
                    f"{res['samples']} random images (max |logit diff| {o['max_abs_diff']:.3g}; {o['ties']} "
                    "images have a top-1/top-2 margin below 2x that: near-ties, e.g. random-init weights)"
                )
            raise CaitError(
                f"{what}: fp16 output {name!r}: cosine similarity {o['min_cosine']:.5f} < 0.999 on some "
                f"image (max |diff| {o['max_abs_diff']:.3g}, scale {o['scale']:.3g})"
            )
    return res


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, **options: Any) -> dict[str, Any]:
    """Export `model` to a clean, checked ONNX file at `path`: `export_onnx_bytes` (same keyword options), then an
    atomic write; returns the report."""
    path = Path(path)
    check_output_dir(path)
    data, report = export_onnx_bytes(model, path, **options)
    with atomic_output(path, ".onnx") as tmp:
        tmp.write_bytes(data)
    return report


def export_onnx_bytes(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    input_shape: tuple[int, ...] | None = None,
    dtype: str = "fp32",
    opset: int | None = None,
    attention: str = "matmul",
    forbid: Iterable[str] = FORBIDDEN_OPS,
    verify: bool = True,
    verify_batches: tuple[int, ...] = (1, 7),
    fp16_samples: int = 256,
    example_batch: int = 2,
    seed: int = 0,
    metadata: dict[str, str] | None = None,
    features=None,
    restore: str = "repeat",
    output_names: list[str] | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Export `model` (images [B, C, H, W] -> logits [B, classes]) to a clean, checked ONNX file.

    features (a CaitViT or CaitSwin): block indices; the graph's outputs are then `feat{i}` [B, D, Gh, Gw], each
    block's output on the full patch grid (`CaitViT.forward_features(x, blocks, restore)`; a Swin's on its
    stage's grid, `CaitSwin.forward_features`), and no logits.
    output_names: for another model that returns a tuple of feature maps [B, D, H, W] (a `FeatureModel`).

    input_shape: (C, H, W) without batch; a CaitViT supplies it from its config. opset None -> 18 for
    attention="matmul", 23 for "op". forbid: op types that make the export fail (CaitError naming op and node);
    pass () for models that legitimately use them. verify: compare ONNX Runtime CPU with `model` (see
    `verify_onnx`). Returns (the serialized model, the report); the caller writes it (`path` is only recorded).
    """
    import onnx

    from caitdeploy.core.preprocess import preprocess_spec

    t0 = time.perf_counter()
    opset = check_options(dtype, opset, attention)
    path = Path(path)  # where the caller will write it (recorded in the report); nothing is written here
    is_cait = _is_cait(model)
    config: Any = getattr(model, "config", None)  # a deploy model's config, of any family (used when is_cait)
    note = _family_note(model, "attention_op_note")
    if attention == "op" and note:
        raise OptionError("attention", f"op: {note}")
    if input_shape is None:
        if not is_cait:
            raise CaitError("export_onnx: input_shape=(C, H, W) is required for a model that is not a CaitViT")
        c = config
        input_shape = c.input_shape
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise CaitError(f"export_onnx: input_shape must be (C, H, W), got {input_shape}")

    blocks: tuple[int, ...] | None = None
    if features is not None:
        from caitdeploy.families.vit.config import RESTORE_MODES, ConfigError

        if not is_cait:
            raise CaitError("export_onnx: feature outputs need a CaitViT or CaitSwin")
        try:
            blocks = config.feature_blocks(features)
        except ConfigError as e:
            raise OptionError("features", str(e).removeprefix("features: ")) from None
        if restore not in RESTORE_MODES:
            raise OptionError("restore", f"{restore!r}: choose one of {', '.join(RESTORE_MODES)}")
    out_names = feature_names(blocks) if blocks else list(output_names or [OUTPUT_NAME])
    module = _prepare(model, dtype, attention, blocks, restore)
    example = torch.randn(example_batch, *input_shape, generator=torch.Generator().manual_seed(seed))
    raw = _torch_export(module, example, opset, out_names)
    t_export = time.perf_counter() - t0
    what = "CAIT model" if is_cait else type(model).__name__
    check_forbidden(raw, forbid, what)  # before cleaning too: a folded-away op must not hide a problem

    mp = clean_graph(raw)
    meta = {
        "caitdeploy.format": ONNX_FORMAT,
        "caitdeploy.dtype": dtype,
        "caitdeploy.io_dtype": "float32",
        "caitdeploy.attention": attention,
        "caitdeploy.model": type(model).__name__,
    }
    if is_cait:
        meta["caitdeploy.config"] = config.to_json()
    # the eval transform a client must repeat: the model's recorded data config, else timm's default
    meta["caitdeploy.preprocess"] = json.dumps(preprocess_spec(input_shape, getattr(model, "data_config", None)))
    if blocks:
        meta["caitdeploy.features"] = ",".join(map(str, blocks))
        meta["caitdeploy.restore"] = restore
    meta.update(metadata or {})
    del mp.metadata_props[:]
    for k, v in meta.items():
        mp.metadata_props.add(key=k, value=str(v))
    mp.producer_name = "caitdeploy"
    try:
        mp = onnx.shape_inference.infer_shapes(mp, check_type=True, strict_mode=True, data_prop=True)
        if [i.name for i in mp.graph.input] != [INPUT_NAME] or [o.name for o in mp.graph.output] != out_names:
            raise CaitError(
                f"{what}: expected one input {INPUT_NAME!r} and outputs {out_names}, got "
                f"{[i.name for i in mp.graph.input]} -> {[o.name for o in mp.graph.output]}"
            )
        _set_batch_dim(mp.graph.input[0])
        rank = 2 if out_names == [OUTPUT_NAME] else 4
        for o in mp.graph.output:
            if len(o.type.tensor_type.shape.dim) != rank:
                raise CaitError(
                    f"{what}: output {o.name!r} must be {'[batch, num_classes]' if rank == 2 else '[batch, D, Gh, Gw]'}"
                )
            _set_batch_dim(o)
        onnx.checker.check_model(mp, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise CaitError(f"{what}: the exported graph fails onnx.checker: {_first_line(e)}") from None
    check_forbidden(mp, forbid, what)
    census = op_census(mp)
    if is_cait:
        n_attn = census.get("Attention", 0)
        want = config.depth if attention == "op" else 0
        if n_attn != want:
            raise CaitError(f"{what}: expected {want} ONNX Attention nodes for --attention {attention}, found {n_attn}")
    data = mp.SerializeToString()
    t_clean = time.perf_counter() - t0 - t_export

    report: dict[str, Any] = {
        "output": str(path),
        "dtype": dtype,
        "io_dtype": "float32",
        "opset": opset,
        "attention": attention,
        "exporter": f"torch.onnx dynamo (torch {torch.__version__.split('+')[0]}, onnx {onnx.__version__})",
        "input_shape": ["batch", *input_shape],
        **io_signature(mp),
        "census": census,
        "nodes": sum(census.values()),
        "params": int(sum(_numel(t) for t in mp.graph.initializer)),
        "bytes": len(data),
        "forbidden_checked": sorted(set(forbid)),
    }
    if is_cait:
        from caitdeploy.families.flops import model_flops, model_params

        report.update(
            flops=model_flops(config)["total"],
            model_params=model_params(config),
            depth=config.depth,
            merges=config.merges,
            img_size=config.size_text,
        )
        if blocks:
            from caitdeploy.families.flops import encoder_flops

            report.update(
                features=list(blocks),
                restore=restore,
                flops=encoder_flops(config, blocks[-1]),
                feature_grid="stage" if hasattr(config, "stage_grids") else "patch",
            )
    if verify:
        from caitdeploy.families.vit.model import FeatureModel

        ref = FeatureModel(model, blocks, restore) if blocks else model
        report["verify"] = verify_onnx(
            data,
            ref,
            input_shape,
            dtype=dtype,
            what=f"{what} {dtype} ONNX",
            batches=verify_batches,
            fp16_samples=fp16_samples,
            seed=seed + 1,
            output_names=out_names,
        )
    t_verify = time.perf_counter() - t0 - t_export - t_clean
    report["seconds"] = {
        "export": t_export,
        "clean_check": t_clean,
        "verify": t_verify,
        "total": time.perf_counter() - t0,
    }
    return data, report
