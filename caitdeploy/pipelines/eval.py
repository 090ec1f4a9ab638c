"""`caitdeploy eval` as a library: the accuracy of every artifact (checkpoint, fused file, ONNX fp32 / fp16 / int8,
engine, live Triton model) on the same labelled images, side by side, as a gate.

    from caitdeploy.pipelines.eval import EvalOptions, evaluate

    result = evaluate(EvalOptions(["digits_cait.pth", "digits_cait.onnx"], data="digits_test",
                                  min_agreement=0.999, json_path="eval.json"))
    for r in result.records:
        print(r["artifact"], r["precision"], r["top1"], r["agree_top1"])
    if result.failures:
        print(result.failures[0])

Order: every option and output path checked; every artifact opened (headers and weights validated, nothing run);
their eval transforms compared (one line naming the two artifacts that disagree); every image listed and checked
without decoding it; labels checked against each artifact's class count; then the run, then the reports written
together (or none). Gates (`min_top1`, `min_agreement`, `min_cosine`) never stop the reports: `failures` lists
each failed gate in one line, and the CLI exits 1 when there is one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caitdeploy.core.errors import CaitError, OptionError, safe_text

Log = Callable[[str], None]
TORCH_DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class EvalOptions:
    """Every option of `caitdeploy eval`, named as its flag (`--json` -> `json_path`, `--markdown` -> `md_path`,
    `--plot` -> `plot_path`, `--model` -> `triton_models`). `artifacts` and `data` are required (artifacts may be
    empty when `url` and `triton_models` name a live model)."""

    artifacts: Sequence[str | os.PathLike]
    data: str | os.PathLike
    reference: str | None = None  # one of the artifacts (as given, or its file name) [default: the first]
    batch: int | str = 32  # images per model call
    threads: int | str | None = None  # CPU threads of PyTorch and ONNX Runtime [default: all]
    torch_dtype: str | Sequence[str] = "fp32"  # fused files run in these: fp32, bf16 ("fp32,bf16")
    onnx_runtimes: str | Sequence[str] = "auto"  # ONNX files run on: ort, openvino; auto: ort + openvino if installed
    url: str | None = None  # a live Triton server, HOST:PORT
    triton_models: Sequence[str] = ()  # model names on that server
    protocol: str = "http"
    features: str | None = None  # block indices ("3,5"): compare these feature maps (no labels needed)
    restore: str = "repeat"
    limit: int | str | None = None  # the first N images only
    skip_bad_images: bool = False
    show_disagreements: int | str = 10
    min_top1: float | str | None = None  # gates, fractions in [0, 1]
    min_agreement: float | str | None = None
    min_cosine: float | str | None = None
    json_path: str | os.PathLike | None = None
    md_path: str | os.PathLike | None = None
    plot_path: str | os.PathLike | None = None


@dataclass(frozen=True)
class EvalResult:
    records: list[dict[str, Any]]  # one per artifact row (`caitdeploy.evaluate.run.RECORD_KEYS`)
    failures: list[str] = field(default_factory=list)  # one line per failed gate
    summary: str = ""
    disagreements: list[str] = field(default_factory=list)  # one line per artifact that disagrees somewhere
    outputs: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Plan:
    batch: int
    threads: int | None
    dtypes: list[str]
    features: tuple[int, ...] | None
    onnx_runtimes: list[str]
    limit: int | None
    show: int
    gates: dict[str, float]


def _int(name: str, v: Any, lo: int, hi: int) -> int:
    from caitdeploy.pipelines.common import parse_int

    n = parse_int(v)
    if n is None or not lo <= n <= hi:
        raise OptionError(name, f"{safe_text(v, 40)!r}: give an integer in {lo}..{hi}")
    return n


def _fraction(name: str, v: Any) -> float:
    from caitdeploy.pipelines.common import parse_float

    x = parse_float(v)
    if x is None or not 0.0 <= x <= 1.0:
        raise OptionError(name, f"{safe_text(v, 40)!r}: give a fraction in 0..1 (0.999, not 99.9)")
    return x


def check(o: EvalOptions) -> _Plan:
    """Every option and output path, before anything is read (OptionError naming the field, first error wins)."""
    from caitdeploy.core.paths import JSON_SUFFIXES, MARKDOWN_SUFFIXES, Out, check_paths
    from caitdeploy.families.vit.config import RESTORE_MODES

    if not list(o.artifacts) and not o.triton_models:
        raise CaitError("no artifact given: name checkpoint, fused, ONNX or engine files, or --url with --model")
    if o.triton_models and not o.url:
        raise OptionError("triton_models", "names a model on a Triton server: add --url HOST:PORT")
    if o.url and not o.triton_models:
        raise OptionError("url", "add --model NAME (the model on that server to evaluate)")
    batch = _int("batch", o.batch, 1, 4096)
    threads = _int("threads", o.threads, 1, 1024) if o.threads is not None else None
    raw = o.torch_dtype.split(",") if isinstance(o.torch_dtype, str) else list(o.torch_dtype)
    dtypes = list(dict.fromkeys(d.strip() for d in raw if d.strip()))
    bad = [d for d in dtypes if d not in TORCH_DTYPES]
    if bad or not dtypes:
        raise OptionError("torch_dtype", f"{safe_text(bad[0] if bad else '', 20)!r}: choose fp32, bf16 or fp32,bf16")
    rts = o.onnx_runtimes.split(",") if isinstance(o.onnx_runtimes, str) else list(o.onnx_runtimes)
    rts = list(dict.fromkeys(r.strip() for r in rts if r.strip()))
    if rts == ["auto"]:
        from caitdeploy.runtime.openvino_runner import openvino_version

        rts = ["ort", "openvino"] if openvino_version() else ["ort"]
    bad_rt = [r for r in rts if r not in ("ort", "openvino")]
    if bad_rt or not rts:
        raise OptionError(
            "onnx_runtimes", f"{safe_text(bad_rt[0] if bad_rt else '', 20)!r}: choose ort, openvino or auto"
        )
    if "openvino" in rts:
        from caitdeploy.runtime.openvino_runner import openvino_version

        if not openvino_version():
            raise OptionError("onnx_runtimes", "openvino is not installed (pip install 'caitdeploy[openvino]')")
    features = None
    if o.features is not None:
        parts = [p.strip() for p in str(o.features).split(",") if p.strip()]
        if not parts or not all(p.isascii() and p.isdigit() and len(p) <= 6 for p in parts):
            raise OptionError("features", f"{safe_text(o.features, 40)!r}: give block indices, e.g. 3,5,7,11")
        features = tuple(int(p) for p in parts)
    if o.restore not in RESTORE_MODES:
        raise OptionError("restore", f"{safe_text(o.restore, 20)!r}: choose one of {', '.join(RESTORE_MODES)}")
    if o.protocol not in ("http", "grpc"):
        raise OptionError("protocol", f"{safe_text(o.protocol, 20)!r}: choose http or grpc")
    limit = _int("limit", o.limit, 1, 10_000_000) if o.limit is not None else None
    show = _int("show_disagreements", o.show_disagreements, 0, 100_000)
    gates = {
        k: _fraction(k, getattr(o, k)) for k in ("min_top1", "min_agreement", "min_cosine") if getattr(o, k) is not None
    }
    check_paths(
        {"ARTIFACT": [str(a) for a in o.artifacts]},
        [
            Out(o.json_path, "--json", JSON_SUFFIXES),
            Out(o.md_path, "--markdown", MARKDOWN_SUFFIXES),
            Out(o.plot_path, "--plot", (".png",)),
        ],
    )
    return _Plan(batch, threads, dtypes, features, rts, limit, show, gates)


def _open(o: EvalOptions, plan: _Plan) -> list[Any]:
    from caitdeploy.evaluate import artifacts as A

    arts = []
    for a in o.artifacts:
        p = Path(a)
        kind = A.detect_kind(p)
        if kind == "checkpoint":
            arts.append(A.open_checkpoint(p, plan.threads, plan.features))
        elif kind == "fused":
            arts += [A.open_fused(p, plan.threads, d, plan.features, o.restore) for d in plan.dtypes]
        elif kind == "onnx":
            base = A.open_onnx(p, plan.threads)
            if "ort" in plan.onnx_runtimes:
                arts.append(base)
            if "openvino" in plan.onnx_runtimes:
                arts.append(A.on_openvino(base))
        else:
            arts.append(A.open_engine(p))
    for m in o.triton_models:
        arts.append(A.open_triton(str(o.url), m, o.protocol))
    return arts


def _reference(o: EvalOptions, arts: list[Any]) -> int:
    if o.reference is None:
        i = 0
    else:
        want = str(o.reference)
        hits = [i for i, a in enumerate(arts) if want in (a.path, Path(a.path).name, a.name, f"{a.name} {a.runtime}")]
        if not hits:
            raise OptionError("reference", f"{safe_text(want, 80)!r} is none of the artifacts given")
        i = hits[0]
    if arts[i].na is not None:
        raise OptionError("reference", f"{arts[i].path} cannot run here ({arts[i].na}): choose another reference")
    return i


def _common_spec(arts: list[Any]) -> dict[str, Any]:
    """The one eval transform every artifact expects (CaitError naming two that disagree)."""
    from caitdeploy.core.preprocess import preprocess_spec, spec_difference

    first = None
    for a in arts:
        if a.spec is None or a.na is not None:
            continue
        if first is None:
            first = a
            continue
        why = spec_difference(first.spec, a.spec)
        if why:
            raise CaitError(
                f"{a.name} and {first.name} expect different preprocessing ({why}): evaluate them on their own"
            )
    if first is None:  # only live Triton models: their input shape and timm's default transform
        shape = next(a.input_shape for a in arts if a.na is None)
        return preprocess_spec(shape)
    for a in arts:
        if a.na is None and a.input_shape is not None and tuple(a.input_shape) != tuple(first.input_shape):
            raise CaitError(f"{a.name} takes {list(a.input_shape)} images, {first.name} {list(first.input_shape)}")
    return first.spec


def _gate_failures(records: list[dict[str, Any]], gates: dict[str, float]) -> list[str]:
    out = []
    for r in records:
        if r["status"] != "ok":
            continue
        from caitdeploy.evaluate.report import label

        name = label(r)
        checks = [
            ("min_top1", "top-1", r["top1"]),
            ("min_agreement", "top-1 agreement", None if r["reference"] else r["agree_top1"]),
            (
                "min_cosine",
                "cosine min",
                None
                if r["reference"]
                else (r["cosine_min"] if r["cosine_min"] is not None else r["feature_cosine_min"]),
            ),
        ]
        for key, what, v in checks:
            if key in gates and v is not None and v < gates[key]:
                flag = "--" + key.replace("_", "-")
                out.append(f"{name}: {what} {v:.4f} < {flag} {gates[key]}")
    return out


def evaluate(options: EvalOptions, progress: Log | None = None, *, progress_bar: bool = False) -> EvalResult:
    """Score every artifact as `caitdeploy eval` does and write the reports asked for together (or none)."""
    from caitdeploy.bench.runners import environment
    from caitdeploy.core.errors import Staging
    from caitdeploy.evaluate.data import find_images
    from caitdeploy.evaluate.report import disagreement_lines, summary_line, write_reports
    from caitdeploy.evaluate.run import measure

    o = options
    log = progress or (lambda s: None)
    plan = check(o)
    arts = _open(o, plan)
    ref = _reference(o, arts)
    spec = _common_spec(arts)
    if plan.features is None and not arts[ref].logits:
        raise CaitError(f"{arts[ref].name} gives feature maps: add --features with its blocks to compare them")
    for a in arts:
        if a.na is None and a.logits != arts[ref].logits:
            raise CaitError(f"{a.name} and the reference {arts[ref].name} give different outputs (logits vs features)")
    images = find_images(o.data, spec["resize_shorter"], o.skip_bad_images, plan.limit)
    if images.skipped:
        log(f"--skip-bad-images: skipped {len(images.skipped)} images that cannot be used (first: {images.skipped[0]})")
    if images.labels is not None:
        top = int(images.labels.max())
        for a in arts:
            if a.num_classes is not None and top >= a.num_classes:
                raise CaitError(
                    f"--data {o.data}: class index {top} but {a.name} has {a.num_classes} classes "
                    "(ImageFolder classes are numbered in natural order of their folder names)"
                )
    import torch

    if plan.threads:
        torch.set_num_threads(plan.threads)
    records = measure(arts, images, spec, ref, plan.batch, progress=progress_bar, log=log)
    env = environment()
    for r in records:
        idx = (r["disagree_images"] or [])[: plan.show]
        r["disagree_images"] = [
            {
                "index": j,
                "file": images.name(j),
                "label": int(images.labels[j]) if images.labels is not None else None,
            }
            for j in idx
        ]
        r.update(env)
    _predictions(records, arts, ref)
    failures = _gate_failures(records, plan.gates)
    with Staging() as st:
        write_reports(records, o.json_path, o.md_path, o.plot_path, st)
    outputs = [Path(p) for p in (o.json_path, o.md_path, o.plot_path) if p]
    return EvalResult(
        records,
        failures,
        summary_line(records, str(o.data)),
        disagreement_lines(records, plan.show),
        outputs,
    )


def _predictions(records: list[dict[str, Any]], arts: list[Any], ref: int) -> None:
    """Fill each disagreement's predicted classes (the reference's and the artifact's), kept by `measure`."""
    preds = {i: r.pop("_pred", None) for i, r in enumerate(records)}
    for i, r in enumerate(records):
        for d in r["disagree_images"]:
            d["reference"] = int(preds[ref][d["index"]]) if preds.get(ref) is not None else None
            d["predicted"] = int(preds[i][d["index"]]) if preds.get(i) is not None else None
