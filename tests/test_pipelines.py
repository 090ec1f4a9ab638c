"""The pipelines as a library: the README's Python API example runs, the library and `caitdeploy export` agree
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
from caitdeploy.pipelines.export import ExportOptions, check, export
from caitdeploy.pipelines.fuse import FuseOptions, fuse
from caitdeploy.pipelines.inspect import inspect
from conftest import random_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"
MODEL = "deit_s.fused.safetensors"   # the name the README's example uses


def readme_python_example() -> str:
    """The ```python block of the README's "Python API" section."""
    section = README.read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert m, "README lost its Python API example"
    return m.group(1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A small fused model under the README's file name, made as a user would: a checkpoint, `caitdeploy fuse`."""
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


def test_readme_python_example_runs(folder, tmp_path, monkeypatch, capsys):
    for f in (MODEL, "ck.pth"):
        (tmp_path / f).write_bytes((folder / f).read_bytes())
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python_example(), "README.md (Python API)", "exec"), {})  # noqa: S102 (the README's own code)
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


def test_library_report_is_the_cli_report(folder, tmp_path):
    """The same options through the CLI (--report) and the library: the same files, the same JSON key for key
    (timings aside)."""
    a, b = tmp_path / "cli", tmp_path / "lib"
    a.mkdir(), b.mkdir()
    r = CliRunner().invoke(main, ["export", str(folder / MODEL), "-o", str(a / "m.onnx"), "--report", str(a / "r.json"),
                                  "--triton-repo", str(a / "repo"), "--max-batch", "8", "--opt-batch", "4", "-q"])
    assert r.exit_code == 0, r.output
    res = export(ExportOptions(str(folder / MODEL), output=str(b / "m.onnx"), report_path=str(b / "r.json"),
                               triton_repo=str(b / "repo"), max_batch=8, opt_batch=4))
    cli_report, lib_report = (json.loads((d / "r.json").read_text()) for d in (a, b))
    assert shape(cli_report) == shape(lib_report) == shape(json.loads(json.dumps(res.report)))
    assert res.outputs == [b / "m.onnx", b / "repo/m/config.pbtxt", b / "r.json"]
    assert listing(a) == listing(b) and (a / "m.onnx").read_bytes() == (b / "m.onnx").read_bytes()


@pytest.mark.parametrize(("changes", "param", "flag_message"), [
    ({"int8_check": "held-out"}, "int8_check", "--int8-check is an --int8 option: add --int8"),
    ({"engine": "m.plan"}, "engine", "--engine is an engine option: add --trt"),
    ({"fp16_samples": -1}, "fp16_samples", "--fp16-samples must be in 0..65536, got -1"),
    ({"triton_repo": "repo", "features": [1, 2]}, "triton_repo", "--triton-repo serves classifiers"),
    ({"restore": "bilinear"}, "restore", "--restore applies to feature outputs: add --features"),
    ({"int8": "static", "calib_synthetic": 8, "dtype": "fp16"}, "int8", "--int8 quantizes the fp32 graph"),
])
def test_option_errors_name_the_parameter_before_any_work(folder, tmp_path, changes, param, flag_message):
    before = listing(folder)
    options = ExportOptions(str(folder / MODEL), output=str(tmp_path / "m.onnx"), **changes)
    for call in (check, export):
        with pytest.raises(OptionError) as e:
            call(options)
        assert e.value.param == param and e.value.as_flag().startswith(flag_message)
        assert str(e.value).startswith(param)   # the library's wording names the field
    assert listing(folder) == before and not any(tmp_path.iterdir())


def test_features_take_a_sequence_and_check_resolves_the_paths(folder):
    plan = check(ExportOptions(str(folder / MODEL), features=(2, 1)))
    assert plan.features == "2,1" and plan.onnx == folder / "deit_s.feat2-1.onnx" and plan.engine is None
    with pytest.raises(CaitError, match=r"^features .*block 7"):   # the model's depth, once it is loaded
        export(ExportOptions(str(folder / MODEL), features="7", output=str(folder / "never.onnx")))
    assert not (folder / "never.onnx").exists()


def test_fuse_and_inspect_are_the_cli(folder, tmp_path):
    """`fuse` writes what `caitdeploy fuse` writes (file and report), with the surgery's options alone in the
    report; `inspect` gives what `caitdeploy inspect --json` prints."""
    r = CliRunner().invoke(main, ["fuse", str(folder / "ck.pth"), "-o", str(tmp_path / "cli.fused.safetensors"),
                                  "--report", str(tmp_path / "cli.json"), "--align", "4", "-q"])
    assert r.exit_code == 0, r.output
    steps: list[int] = []
    res = fuse(FuseOptions(checkpoint=folder / "ck.pth", output=tmp_path / "lib.fused.safetensors", align=4,
                           report_path=tmp_path / "lib.json"), progress=steps.append)
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
