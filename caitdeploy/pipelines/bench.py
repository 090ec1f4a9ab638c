"""`caitdeploy bench` as a library: latency and throughput of fused model(s) against their dense architecture and
FLOPs-matched ToMe, over backends, precisions and batch sizes; the reports (JSON records, Markdown, plot) written
together at the end, or none of them.

    from caitdeploy.pipelines.bench import BenchOptions, bench

    result = bench(BenchOptions("deit_s.fused.safetensors", batches=(1, 64), backends="torch,ort",
                                json_path="bench.json"))
    for r in result.ok:
        print(r["model"], r["backend"], r["batch"], r["throughput_img_s"], r["speedup_vs_dense"])

`caitdeploy.bench` is the engine (`run.run_bench` measures, `report` renders and writes); this checks every
option and output path before any model is loaded, runs, and writes. Heavy imports (torch) happen inside the
functions, so `caitdeploy --help` stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caitdeploy.core.errors import CaitError, OptionError, safe_text

if TYPE_CHECKING:
    from caitdeploy.bench.runners import Timing

Log = Callable[[str], None]  # called with each line the run reports as it goes (models, ToMe's r, fp16 notes)


@dataclass(frozen=True)
class BenchOptions:
    """Every option of `caitdeploy bench`, named as its flag (`--batch` -> `batches`, `--json` -> `json_path`,
    `--markdown` -> `md_path`, `--plot` -> `plot_path`), with the CLI's defaults. Only `model` is required.
    Numbers may also be given as the CLI's text ("10", "2.0"): the same notation rules apply."""

    model: str | os.PathLike | Sequence[str | os.PathLike]  # one fused model file or several
    batches: int | str | Sequence[int | str] = (256,)  # batch sizes: 64, "1,64" or (1, 64) (1..65536)
    backends: str | Sequence[str] = "torch,ort"  # torch, compile, ort, openvino, trt, torch-triton
    dtype: str | Sequence[str] = "fp32"  # fp32, fp16, bf16, int8, int8-dynamic: "fp32,int8"
    baselines: str | Sequence[str] = "dense,tome"  # dense, tome, both or "none"
    tome_r: str | int = "auto"  # ToMe tokens merged per block: "auto" matches CAIT's FLOPs
    device: str = "auto"  # auto | cpu | cuda
    img_size: int | tuple[int, int] | str | None = None  # run every model at this input size: 512, (512, 1024)
    features: str | int | Sequence[int] | None = None  # block indices ("3,5,7,11"): benchmark feature extraction
    restore: str = "repeat"  # how CAIT's merged grid is restored: repeat | bilinear
    warmup: int | str = 10  # untimed calls before timing
    min_iters: int | str = 20  # timed calls per repeat, at least
    min_seconds: float | str = 2.0  # seconds per repeat, at least
    repeats: int | str = 2  # timed repeats (their medians give the spread)
    threads: int | str | None = None  # CPU threads for PyTorch and ONNX Runtime [default: all]
    compile_mode: str | None = None  # torch.compile mode [default: by device]
    work_dir: str | os.PathLike | None = None  # keep ONNX files and engines here [default: a temp folder]
    json_path: str | os.PathLike | None = None  # write the flat records as JSON
    md_path: str | os.PathLike | None = None  # write a Markdown table
    plot_path: str | os.PathLike | None = None  # write a plot (.png, .svg or .pdf)


@dataclass(frozen=True)
class BenchResult:
    """What `bench` measured and wrote. `records` are the flat records (`caitdeploy.bench.RECORD_KEYS`), one per
    (model, backend, precision, batch), n/a rows included (their `status` says why): the rows `--json` writes and
    the CLI's table shows."""

    records: list[dict[str, Any]]
    json_path: Path | None = None
    md_path: Path | None = None
    plot_path: Path | None = None

    @property
    def ok(self) -> list[dict[str, Any]]:
        """The records that were measured (status "ok")."""
        return [r for r in self.records if r["status"] == "ok"]

    @property
    def outputs(self) -> list[Path]:
        """Every file written."""
        return [p for p in (self.json_path, self.md_path, self.plot_path) if p]

    def json(self) -> str:
        """The records as `--json` writes them (non-finite floats as null)."""
        from caitdeploy.bench.report import records_json

        return records_json(self.records)

    def markdown(self, title: str | None = "caitdeploy bench") -> str:
        """The table as `--markdown` writes it."""
        from caitdeploy.bench.report import to_markdown

        return to_markdown(self.records, title=title)


@dataclass(frozen=True)
class BenchPlan:
    """What the options resolve to, once checked: no model has been loaded, nothing written."""

    models: list[str]
    batches: list[int]
    backends: list[str]
    dtypes: list[str]
    baselines: list[str]
    tome_r: str | int
    timing: Timing
    threads: int | None
    features: str | None  # normalised block list ("3,5"), None for logits


def _number(name: str, value: Any, kind: type = int, lo: float = 0, hi: float | None = None) -> Any:
    """A count or a time in plain ASCII notation (no '²', '٣', '1_0'; nan and inf are read so that the range check
    names them), within lo..hi; OptionError naming the field otherwise."""
    from caitdeploy.core.budgets import MAX_ITERS
    from caitdeploy.pipelines.common import parse_float, parse_int

    hi = MAX_ITERS if hi is None else hi
    v = parse_int(value) if kind is int else parse_float(value, finite=False)
    if v is None:
        raise OptionError(name, f"{safe_text(value, 40)!r}: not {'an integer' if kind is int else 'a number'}")
    if not lo <= v <= hi:  # NaN fails too
        raise OptionError(name, f"{v}: must be in {lo}..{hi:g}")
    return v


def check(options: BenchOptions) -> BenchPlan:
    """Check every option and output path before any model is loaded, in the order `caitdeploy bench` always has
    (the first error wins): CaitError, or OptionError naming the field. Nothing is read or written."""
    from caitdeploy.bench.run import parse_backends, parse_baselines, parse_batches, parse_dtypes, parse_tome_r
    from caitdeploy.bench.runners import Timing
    from caitdeploy.core.budgets import MAX_SECONDS
    from caitdeploy.core.paths import JSON_SUFFIXES, MARKDOWN_SUFFIXES, PLOT_SUFFIXES, Out, check_paths
    from caitdeploy.pipelines.common import check_dense_options, features_text

    o = options
    models = [str(o.model)] if isinstance(o.model, (str, os.PathLike)) else [str(m) for m in o.model]
    if not models:
        raise CaitError("no model given")
    timing = Timing(
        warmup=_number("warmup", o.warmup),
        min_iters=_number("min_iters", o.min_iters, lo=1),
        min_seconds=_number("min_seconds", o.min_seconds, float, hi=MAX_SECONDS),
        repeats=_number("repeats", o.repeats, lo=1),
    )
    threads = _number("threads", o.threads, lo=1, hi=1024) if o.threads is not None else None
    dtypes = parse_dtypes(o.dtype)
    features = features_text(o.features)
    _, parts = check_dense_options(o.img_size, features, o.restore)
    backends, baselines = parse_backends(o.backends), parse_baselines(o.baselines)
    batches = parse_batches([o.batches] if isinstance(o.batches, (int, str)) else o.batches)
    tome_r = parse_tome_r(o.tome_r)
    check_paths(
        {"MODEL": models},
        [
            Out(o.json_path, "--json", JSON_SUFFIXES),
            Out(o.md_path, "--markdown", MARKDOWN_SUFFIXES),
            Out(o.plot_path, "--plot", PLOT_SUFFIXES),
        ],
    )
    if o.work_dir is not None and Path(o.work_dir).exists() and not Path(o.work_dir).is_dir():
        raise CaitError(f"--work-dir {o.work_dir}: exists and is not a folder")
    return BenchPlan(
        models, batches, backends, dtypes, baselines, tome_r, timing, threads, ",".join(parts) if parts else None
    )


def bench(options: BenchOptions, progress: Log | None = None, *, progress_bar: bool = False) -> BenchResult:
    """Benchmark as `caitdeploy bench` does: check everything (`check`), load and measure every (model, backend,
    precision, batch), then write the reports asked for together, or none of them; CaitError, nothing written,
    when no measurement succeeded. `progress`, if given, is called with each line the run reports as it goes;
    `progress_bar` shows a tqdm bar on stderr (the CLI's, off with --quiet)."""
    from caitdeploy.bench.report import write_markdown, write_plot, write_records_json
    from caitdeploy.bench.run import run_bench
    from caitdeploy.core.errors import Staging

    o = options
    plan = check(o)
    records = run_bench(
        plan.models,
        batches=plan.batches,
        backends=plan.backends,
        dtype=plan.dtypes,
        baselines=plan.baselines,
        tome_r=plan.tome_r,
        device=o.device,
        timing=plan.timing,
        threads=plan.threads,
        work_dir=o.work_dir,
        compile_mode=o.compile_mode,
        progress=progress_bar,
        log=progress or (lambda s: None),
        img_size=o.img_size,
        features=plan.features,
        restore=o.restore,
    )
    if not any(r["status"] == "ok" for r in records):
        why = "; ".join(dict.fromkeys(f"{r['backend']}: {r['status']}" for r in records))
        raise CaitError(f"no measurement succeeded ({why[:600]}); nothing written")
    with Staging() as st:
        if o.json_path:
            write_records_json(records, o.json_path, staging=st)
        if o.md_path:
            write_markdown(records, o.md_path, title="caitdeploy bench", staging=st)
        if o.plot_path:
            write_plot(records, o.plot_path, staging=st)
    return BenchResult(records, *(Path(p) if p else None for p in (o.json_path, o.md_path, o.plot_path)))
