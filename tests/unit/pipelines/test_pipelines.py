"""The pipelines as a library: the Python API guide's example runs, the library and `caitdeploy export` agree
(options and defaults, report, errors), and every check comes before any work."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from caitdeploy.cli.main import main
from caitdeploy.core.errors import CaitError, OptionError
from caitdeploy.pipelines import bench as bench_pipeline
from caitdeploy.pipelines.bench import BenchOptions, bench
from caitdeploy.pipelines.convert import ConvertOptions, convert
from caitdeploy.pipelines.export import ExportOptions, check, export
from caitdeploy.pipelines.fuse import FuseOptions, fuse
from caitdeploy.pipelines.inspect import inspect
from caitdeploy.testing.checkpoints import random_checkpoint, write_tiny_fused

PYTHON_API = Path(__file__).resolve().parents[3] / "docs" / "guides" / "python-api.md"
MODEL = "deit_s.fused.safetensors"  # the name the guide's example uses


def guide_python_example() -> str:
    """The ```python block of the Python API guide (docs/guides/python-api.md)."""
    m = re.search(r"```python\n(.*?)```", PYTHON_API.read_text(), re.DOTALL)
    assert m, "the Python API guide lost its example"
    return m.group(1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A small fused model under the guide's file name, made as a user would: a checkpoint, `caitdeploy fuse`."""
    d = tmp_path_factory.mktemp("pipelines")
    torch.save(random_checkpoint(merges={1: "h"}), d / "ck.pth")
    r = CliRunner().invoke(main, ["fuse", str(d / "ck.pth"), "-o", str(d / MODEL), "-q"])
    assert r.exit_code == 0, r.output
    return d


def listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def shape(x):
    """The JSON's structure without its values: key order and nesting, the type of each leaf."""
    if isinstance(x, dict):
        return {k: shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [shape(v) for v in x[:1]]
    return type(x).__name__


@pytest.mark.slow
def test_python_api_guide_example_runs(folder, tmp_path, monkeypatch, capsys):
    for f in (MODEL, "ck.pth"):
        (tmp_path / f).write_bytes((folder / f).read_bytes())
    monkeypatch.chdir(tmp_path)
    exec(compile(guide_python_example(), "docs/guides/python-api.md", "exec"), {})  # noqa: S102 (the guide's code)
    out = capsys.readouterr().out
    assert [ln.split()[1] for ln in out.splitlines() if ln.startswith("step ")] == ["load", "onnx", "write"]
    assert re.search(r"^deit_s\.onnx \d+ nodes$", out, re.MULTILINE) and "verified: max |logit diff|" in out
    assert (tmp_path / "deit_s.onnx").is_file() and (tmp_path / "models/deit_s_cait/1/model.onnx").is_file()
    report = json.loads((tmp_path / "deit_s.export.json").read_text())
    assert report["model"] == MODEL and report["triton"]["preferred_batch_sizes"] == [8, 16]
    assert "written: deit_s.onnx models/deit_s_cait/config.pbtxt deit_s.export.json" in out


def flags_and_fields(command: str, options: type, cli_only: tuple[str, ...]) -> tuple[dict, dict]:
    """What the command's callback gets for each option when only its input file is given, and the defaults of
    its options dataclass's fields; the input file left out of both."""
    cmd = main.get_command(click.Context(main), command)
    flags = cmd.make_context(command, ["in.file"]).params
    (arg,) = [p.name for p in cmd.params if isinstance(p, click.Argument)]
    assert flags.pop(arg) == "in.file"
    flags = {k: v for k, v in flags.items() if k not in cli_only}
    fields = {f.name: f.default for f in dataclasses.fields(options)}
    assert fields.pop(arg) is dataclasses.MISSING
    return flags, fields


def test_options_are_the_cli_flags_with_the_same_defaults():
    """One field per option, named and defaulted as the flag is (`--no-verify` is verify=False; `--quiet` is the
    CLI's own)."""
    flags, fields = flags_and_fields("export", ExportOptions, ("no_verify", "quiet"))
    assert fields.pop("verify") is True and fields == flags
    flags, fields = flags_and_fields("fuse", FuseOptions, ("quiet",))
    assert fields == flags


@pytest.mark.slow
def test_library_report_is_the_cli_report(folder, tmp_path):
    """The same options through the CLI (--report) and the library: the same files, the same JSON key for key
    (timings aside)."""
    a, b = tmp_path / "cli", tmp_path / "lib"
    a.mkdir(), b.mkdir()
    r = CliRunner().invoke(
        main,
        [
            "export",
            str(folder / MODEL),
            "-o",
            str(a / "m.onnx"),
            "--report",
            str(a / "r.json"),
            "--triton-repo",
            str(a / "repo"),
            "--max-batch",
            "8",
            "--opt-batch",
            "4",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    res = export(
        ExportOptions(
            str(folder / MODEL),
            output=str(b / "m.onnx"),
            report_path=str(b / "r.json"),
            triton_repo=str(b / "repo"),
            max_batch=8,
            opt_batch=4,
        )
    )
    cli_report, lib_report = (json.loads((d / "r.json").read_text()) for d in (a, b))
    assert shape(cli_report) == shape(lib_report) == shape(json.loads(json.dumps(res.report)))
    assert res.outputs == [b / "m.onnx", b / "repo/m/config.pbtxt", b / "r.json"]
    assert listing(a) == listing(b) and (a / "m.onnx").read_bytes() == (b / "m.onnx").read_bytes()


@pytest.mark.parametrize(
    ("changes", "param", "flag_message"),
    [
        ({"int8_check": "held-out"}, "int8_check", "--int8-check is an --int8 option: add --int8"),
        ({"engine": "m.plan"}, "engine", "--engine is an engine option: add --trt"),
        ({"fp16_samples": -1}, "fp16_samples", "--fp16-samples must be in 0..65536, got -1"),
        ({"triton_repo": "repo", "features": [1, 2]}, "triton_repo", "--triton-repo serves classifiers"),
        ({"restore": "bilinear"}, "restore", "--restore applies to feature outputs: add --features"),
        ({"int8": "static", "calib_synthetic": 8, "dtype": "fp16"}, "int8", "--int8 quantizes the fp32 graph"),
    ],
)
def test_option_errors_name_the_parameter_before_any_work(folder, tmp_path, changes, param, flag_message):
    before = listing(folder)
    options = ExportOptions(str(folder / MODEL), output=str(tmp_path / "m.onnx"), **changes)
    for call in (check, export):
        with pytest.raises(OptionError) as e:
            call(options)
        assert e.value.param == param and e.value.as_flag().startswith(flag_message)
        assert str(e.value).startswith(param)  # the library's wording names the field
    assert listing(folder) == before and not any(tmp_path.iterdir())


def test_features_take_a_sequence_and_check_resolves_the_paths(folder):
    plan = check(ExportOptions(str(folder / MODEL), features=(2, 1)))
    assert plan.features == "2,1" and plan.onnx == folder / "deit_s.feat2-1.onnx" and plan.engine is None
    with pytest.raises(CaitError, match=r"^features .*block 7"):  # the model's depth, once it is loaded
        export(ExportOptions(str(folder / MODEL), features="7", output=str(folder / "never.onnx")))
    assert not (folder / "never.onnx").exists()


def test_fuse_and_inspect_are_the_cli(folder, tmp_path):
    """`fuse` writes what `caitdeploy fuse` writes (file and report), with the surgery's options alone in the
    report; `inspect` gives what `caitdeploy inspect --json` prints."""
    r = CliRunner().invoke(
        main,
        [
            "fuse",
            str(folder / "ck.pth"),
            "-o",
            str(tmp_path / "cli.fused.safetensors"),
            "--report",
            str(tmp_path / "cli.json"),
            "--align",
            "4",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    steps: list[int] = []
    res = fuse(
        FuseOptions(
            checkpoint=folder / "ck.pth",
            output=tmp_path / "lib.fused.safetensors",
            align=4,
            report_path=tmp_path / "lib.json",
        ),
        progress=steps.append,
    )
    assert steps == [0, 1, 2] and res.output == tmp_path / "lib.fused.safetensors"
    cli_report = json.loads((tmp_path / "cli.json").read_text())
    assert shape(cli_report) == shape(json.loads((tmp_path / "lib.json").read_text()))
    assert cli_report["options"] == res.report["options"] and "checkpoint" not in res.report["options"]
    with pytest.raises(OptionError, match="^align must be"):
        FuseOptions(checkpoint="ck.pth", align=0)
    info = inspect(res.output)
    assert info.kind == "fused"
    r = CliRunner().invoke(main, ["inspect", str(res.output), "--json"])
    assert r.exit_code == 0 and r.stdout == info.json() + "\n"


# ---- convert and bench ------------------------------------------------------------------------------------
SMALL_SIT = dict(img_size=64, embed_dim=48, num_heads=3, stage_blocks=(2, 1, 1, 1))


def cli_params(command: str, args: list[str]) -> dict:
    """What the command's callback gets for each option, given `args` (its input file and required options)."""
    cmd = main.get_command(click.Context(main), command)
    return cmd.make_context(command, args).params


@pytest.fixture(scope="module")
def sit_checkpoint(tmp_path_factory) -> Path:
    """A small SiT checkpoint (random weights, the upstream layout), as `caitdeploy convert --from sit` takes."""
    from caitdeploy.testing.upstream_sit import sit_state_dict

    path = tmp_path_factory.mktemp("convert") / "sit.pth"
    torch.save({"model": sit_state_dict("s", num_classes=10, **SMALL_SIT), "epoch": 1}, path)
    return path


def test_convert_and_bench_options_are_the_cli_flags():
    """ConvertOptions: one field per flag, same names and defaults. BenchOptions: the same, numbers typed where
    the CLI has text; both resolve to the same checked plan."""
    flags = cli_params("convert", ["in.file", "--from", "sit"])
    flags.pop("quiet")
    fields = {f.name: f.default for f in dataclasses.fields(ConvertOptions)}
    assert fields.pop("checkpoint") is fields.pop("source") is dataclasses.MISSING
    assert flags.pop("checkpoint") == "in.file" and flags.pop("source") == "sit" and flags == fields
    flags = cli_params("bench", ["in.file"])
    flags.pop("quiet")
    fields = {f.name: f.default for f in dataclasses.fields(BenchOptions)}
    assert fields.pop("model") is dataclasses.MISSING and flags.pop("model") == ("in.file",)
    text = {"batches": ("256",), "warmup": "10", "min_iters": "20", "min_seconds": "2.0", "repeats": "2"}
    assert flags == {**fields, **text}
    assert bench_pipeline.check(BenchOptions(("in.file",), **flags)) == bench_pipeline.check(BenchOptions("in.file"))


def test_convert_writes_what_the_cli_writes(sit_checkpoint, tmp_path):
    """The same conversion through `caitdeploy convert --report` and `convert()`: the same files and report (paths
    and timings aside); the result's fields are the report's and the fused file's."""
    from caitdeploy.formats.fused import load_fused

    a, b = tmp_path / "cli", tmp_path / "lib"
    a.mkdir(), b.mkdir()
    r = CliRunner().invoke(
        main,
        [
            "convert",
            str(sit_checkpoint),
            "--from",
            "sit",
            "--stages",
            "2,1,1,1",
            "--num-heads",
            "3",
            "-o",
            str(a / "s.fused.safetensors"),
            "--report",
            str(a / "r.json"),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    steps: list[str] = []
    res = convert(
        ConvertOptions(
            sit_checkpoint,
            "sit",
            stages=(2, 1, 1, 1),
            num_heads=3,
            output=b / "s.fused.safetensors",
            report_path=b / "r.json",
        ),
        progress=steps.append,
    )
    assert steps == ["convert", "write"] and listing(a) == listing(b) == ["r.json", "s.fused.safetensors"]
    assert res.output == b / "s.fused.safetensors" and res.outputs == [res.output, b / "r.json"]
    written = json.loads((b / "r.json").read_text())
    assert written == json.loads(json.dumps(res.report))  # the report is what --report writes
    cli_report = json.loads((a / "r.json").read_text())
    assert shape(cli_report) == shape(written)
    for key in ("output", "seconds"):
        cli_report.pop(key), written.pop(key)
    assert cli_report == written
    assert res.blocks == written["blocks"] and [blk["slim"] for blk in res.blocks] == [None, None, 8, 4, 2]
    assert (res.flops, res.flops_dense, res.params, res.params_dense) == tuple(
        written[k] for k in ("flops", "flops_dense", "params", "params_dense")
    )
    assert res.flops_reduction == pytest.approx(1 - res.flops / res.flops_dense) and 0 < res.flops_reduction < 1
    assert res.verify is not None and res.verify["max_abs_diff"] < 1e-5 and res.verify["batch"] == 2
    assert res.verify["torch_flops_per_img"] == res.flops and res.notes == written["notes"]
    config, _, meta = load_fused(res.output)
    assert config == res.config and config.family == written["family"] == "lvvit"
    assert meta["converted_from"] == "sit" and meta["flops"] == res.flops


@pytest.mark.parametrize(
    ("changes", "param", "flag_message"),
    [
        ({"stages": "2,x"}, "stages", "--stages '2,x': expected blocks per token stage"),
        ({"stages": (0, 1)}, "stages", "--stages (0, 1): 1..16 stages of >= 1 block each"),
        ({"num_heads": 0}, "num_heads", "--num-heads must be an integer in 1..256, got 0"),
        ({"variant": "xxl"}, "variant", "--variant must be one of t, xs, s, m, l"),
        ({"source": "foo"}, "source", "--source must be one of sit, lvvit, spvit, dimap"),
        ({"align": 8}, "align", "--align zero-pads SPViT's pruned FFN widths"),
        ({"verify_batch": -1}, "verify_batch", "--verify-batch must be an integer in 0..256"),
        ({"variant": "s", "source": "spvit"}, "variant", "--variant SPViT's layout is read from its keys"),
    ],
)
def test_convert_option_errors_name_the_field(sit_checkpoint, tmp_path, changes, param, flag_message):
    """A bad option is the library's error (not the CLI's exit), naming the field, and nothing is written."""
    options = dataclasses.replace(
        ConvertOptions(
            sit_checkpoint,
            "sit",
            stages="2,1,1,1",
            num_heads=3,
            output=tmp_path / "s.fused.safetensors",
            report_path=tmp_path / "r.json",
        ),
        **changes,
    )
    with pytest.raises(OptionError) as e:
        convert(options)
    assert e.value.param == param and e.value.as_flag().startswith(flag_message), e.value.as_flag()
    assert not any(tmp_path.iterdir())


def test_convert_refuses_a_mislabelled_checkpoint(sit_checkpoint, tmp_path):
    with pytest.raises(CaitError, match=r"is a SiT checkpoint \(tsm\.\* keys\), not --from spvit: use --from sit"):
        convert(ConvertOptions(sit_checkpoint, "spvit", output=tmp_path / "s.fused.safetensors"))
    with pytest.raises(CaitError, match=r"^--report .*expected a \.json file name"):  # paths before the file is read
        convert(ConvertOptions(sit_checkpoint, "sit", variant="s", report_path=tmp_path / "r.txt"))
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def tiny_fused(tmp_path_factory) -> Path:
    return write_tiny_fused(tmp_path_factory.mktemp("bench") / "tiny.fused.safetensors")


QUICK = dict(backends="torch", batches=2, warmup=0, min_iters=1, min_seconds=0, repeats=1, device="cpu")


def test_bench_returns_the_records_it_writes(tiny_fused, tmp_path):
    """`bench()`: one record per (model, backend, batch), the rows `--json` writes; the Markdown and the plot
    written together with them; what it reports as it goes passed to `progress`."""
    from caitdeploy.bench import RECORD_KEYS

    lines: list[str] = []
    res = bench(
        BenchOptions(
            tiny_fused, **QUICK, json_path=tmp_path / "b.json", md_path=tmp_path / "b.md", plot_path=tmp_path / "b.png"
        ),
        progress=lines.append,
    )
    assert res.outputs == [tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"]
    assert listing(tmp_path) == ["b.json", "b.md", "b.png"]
    assert [(r["model"], r["backend"], r["batch"]) for r in res.records] == [
        ("cait", "torch", 2),
        ("dense", "torch", 2),
        ("tome", "torch", 2),
    ]
    assert all(tuple(r) == RECORD_KEYS for r in res.records) and res.ok == res.records
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads(res.json())
    assert (tmp_path / "b.md").read_text() == res.markdown() and "ToMe r=" in res.markdown()
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    by = {r["model"]: r for r in res.records}
    assert by["cait"]["speedup_vs_dense"] == pytest.approx(by["dense"]["latency_ms_p50"] / by["cait"]["latency_ms_p50"])
    assert any("ToMe" in line and "GFLOPs/img" in line for line in lines)


@pytest.mark.parametrize(
    ("changes", "param", "flag_message"),
    [
        ({"warmup": "٣"}, "warmup", "--warmup '٣': not an integer"),
        ({"min_iters": 0}, "min_iters", "--min-iters 0: must be in 1..1e+06"),
        ({"min_seconds": float("inf")}, "min_seconds", "--min-seconds inf: must be in 0..3600"),
        ({"threads": "1_0"}, "threads", "--threads '1_0': not an integer"),
        ({"batches": "1,0"}, "batch", "--batch 0: must be in 1..65536"),
        ({"dtype": "fp64"}, "dtype", "--dtype 'fp64': choose from"),
        ({"backends": "foo"}, "backends", "--backends has unknown backend 'foo'"),
        ({"tome_r": "²"}, "tome_r", "--tome-r '²': 'auto' or a non-negative integer"),
        ({"restore": "bilinear"}, "restore", "--restore applies to feature outputs: add --features"),
        ({"device": "tpu"}, "device", "--device 'tpu': auto, cpu or cuda"),
    ],
)
def test_bench_option_errors_name_the_field(tiny_fused, tmp_path, changes, param, flag_message):
    """A bad option is the library's error, naming the field (the CLI shows it as the flag), before any model is
    loaded; nothing is written."""
    options = BenchOptions(tiny_fused, **{**QUICK, **changes}, json_path=tmp_path / "b.json")
    with pytest.raises(OptionError) as e:
        bench(options)
    assert e.value.param == param and e.value.as_flag().startswith(flag_message), e.value.as_flag()
    assert not any(tmp_path.iterdir())


def test_bench_writes_nothing_unless_something_ran(tiny_fused, tmp_path):
    with pytest.raises(CaitError, match=r"^--json .*is the input MODEL|^--json .*expected a \.json"):
        bench_pipeline.check(BenchOptions(tiny_fused, json_path=tiny_fused))
    with pytest.raises(CaitError, match=r"^no measurement succeeded \(trt: n/a: TensorRT needs a CUDA GPU\); nothing"):
        bench(
            BenchOptions(
                tiny_fused,
                **{**QUICK, "backends": "trt"},
                baselines="none",
                json_path=tmp_path / "b.json",
                md_path=tmp_path / "b.md",
            )
        )
    assert not any(tmp_path.iterdir())


def test_make_checkpoint_pipeline_writes_what_the_cli_writes(tmp_path):
    """`make_checkpoint(MakeCheckpointOptions(...))` -> the checkpoint and its report, the family's defaults filled in;
    a bad option is an OptionError naming the field, raised before any model is built, and nothing is written."""
    import json

    from caitdeploy.core.errors import OptionError
    from caitdeploy.formats.checkpoint import load_checkpoint
    from caitdeploy.pipelines.make_checkpoint import MakeCheckpointOptions, make_checkpoint

    out, rep = tmp_path / "ck.pth", tmp_path / "ck.json"
    r = make_checkpoint(
        MakeCheckpointOptions(arch="deit_tiny_patch16_224", img_size=64, num_classes=10, output=out, report_path=rep)
    )
    assert (r.family, r.flops_reduction, r.merges_text, r.auto_merges) == ("vit", 0.55, "4:h,8:v", False)
    assert r.output == out and r.report_path == rep and json.loads(rep.read_text())["merges"] == {"4": "h", "8": "v"}
    assert abs(r.summary["flops_reduction"] - 0.55) < 0.02
    ck = load_checkpoint(out)
    assert ck.config.merges == {4: "h", 8: "v"} and ck.compactor(0, "q") is not None
    for bad, field in (
        (dict(flops_reduction=0.99), "flops_reduction"),
        (dict(merges="4:x"), "merges"),
        (dict(arch="swin_tiny_patch4_window7_224", merges="4:h"), "merges"),
    ):
        dst = tmp_path / f"bad_{field}.pth"
        with pytest.raises(OptionError) as e:
            make_checkpoint(MakeCheckpointOptions(output=dst, **bad))
        assert e.value.param == field and not dst.exists()
