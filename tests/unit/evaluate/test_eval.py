"""`caitdeploy eval`: real artifacts (a checkpoint fused and exported by the real commands), real images (PNG and
JPEG on disk, scikit-learn's digits where installed), ONNX Runtime; a planted accuracy loss must fail the gate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from caitdeploy.cli.main import main
from caitdeploy.core.errors import CaitError
from caitdeploy.core.preprocess import check_data_config, image_array, preprocess_spec
from caitdeploy.evaluate.data import find_images, natural_key
from caitdeploy.evaluate.metrics import agreement, top_k_correct, wilson_interval


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _png(path, size=(40, 48), mode="RGB", seed=0, ext=None):
    rng = np.random.default_rng(seed)
    shape = {"RGB": (size[1], size[0], 3), "L": (size[1], size[0]), "LA": (size[1], size[0], 2)}[mode]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random(shape) * 255).astype(np.uint8), mode).save(path)
    return path


# ---- the transform ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "mode", "ext"), [((70, 90), "RGB", "png"), ((300, 200), "RGB", "jpg"), ((33, 33), "L", "png")]
)
def test_transform_is_timms_eval_transform(tmp_path, size, mode, ext):
    """The same tensor, to float rounding, as timm's create_transform(is_training=False) on the same file."""
    from timm.data import create_transform

    p = _png(tmp_path / f"x.{ext}", size, mode)
    for crop_pct, interp in ((0.875, "bicubic"), (1.0, "bilinear"), (0.9, "nearest")):
        dc = check_data_config({"crop_pct": crop_pct, "interpolation": interp}, 3)
        t = create_transform(
            (3, 32, 32), is_training=False, interpolation=interp, mean=dc["mean"], std=dc["std"], crop_pct=crop_pct
        )
        want = t(Image.open(p).convert("RGB")).numpy()
        got = image_array(p, preprocess_spec((3, 32, 32), dc), 3)
        assert got.shape == want.shape == (3, 32, 32)
        assert np.abs(got - want).max() < 1e-5, (crop_pct, interp)


def test_data_config_is_checked_in_one_line():
    for bad, msg in [
        ({"mean": [0.5]}, "'mean' must be a list of 3"),
        ({"std": [0, 1, 1]}, "'std' values must be in (0, 1000]"),
        ({"crop_pct": 2}, "'crop_pct' must be a number in [0.05, 1]"),
        ({"interpolation": "lanczos9"}, "'interpolation' must be one of"),
        ({"resize": 3}, "unknown key 'resize'"),
        ([1, 2], "expected a JSON object"),
    ]:
        with pytest.raises(CaitError, match="dc: ") as e:
            check_data_config(bad, 3, "dc")
        assert msg in str(e.value) and "\n" not in str(e.value)


# ---- the numbers ----------------------------------------------------------------------------------------------
def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(95, 100)
    assert (lo, hi) == (pytest.approx(0.8882, abs=1e-4), pytest.approx(0.9785, abs=1e-4))
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_top_k_and_agreement():
    logits = np.array([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 2.0, 0.0]])
    labels = np.array([0, 2, 0])
    assert top_k_correct(logits, labels, 1).tolist() == [True, False, False]
    assert top_k_correct(logits, labels, 2).tolist() == [True, True, False]
    assert top_k_correct(logits, labels, 9).all()
    other = logits.copy()
    other[2] = [3.0, 1.0, 2.0, 0.0]
    a = agreement(other, logits)
    assert a.top1 == pytest.approx(2 / 3) and a.disagree.tolist() == [2] and a.max_abs_diff == 2.0
    assert a.cosine_min < 1.0 and agreement(logits, logits).cosine_min == pytest.approx(1.0)


# ---- the images -------------------------------------------------------------------------------------------------
def test_imagefolder_classes_in_natural_order_and_csv(tmp_path):
    for cls in ("10", "2", "cat"):
        _png(tmp_path / "f" / cls / "a.png")
    ds = find_images(tmp_path / "f")
    assert ds.classes == ["2", "10", "cat"] and ds.labels.tolist() == [0, 1, 2]
    assert sorted(["b10", "b9", "a"], key=natural_key) == ["a", "b9", "b10"]
    _png(tmp_path / "c" / "x.jpg", ext="jpg")
    _png(tmp_path / "c" / "y.png")
    (tmp_path / "c" / "l.csv").write_text("path,label\nx.jpg,7\ny.png,3\n")
    ds = find_images(tmp_path / "c" / "l.csv")
    assert ds.source == "csv" and ds.labels.tolist() == [7, 3] and ds.name(0) == "x.jpg"
    ds = find_images(tmp_path / "c")  # images directly in the folder: no labels
    assert ds.source == "unlabelled" and ds.labels is None


def test_bad_data_is_one_line_or_skipped_and_counted(tmp_path):
    _png(tmp_path / "d" / "0" / "good.png")
    (tmp_path / "d" / "1").mkdir()
    (tmp_path / "d" / "1" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "d" / "1" / "empty.jpg").write_bytes(b"")
    with pytest.raises(CaitError) as e:
        find_images(tmp_path / "d")
    assert "and 1 more bad image" in str(e.value) and "--skip-bad-images" in str(e.value)
    ds = find_images(tmp_path / "d", skip_bad=True)
    assert len(ds) == 1 and len(ds.skipped) == 2
    for text, msg in [
        ("a.png\n", "expected 2 fields"),
        ("a.png,cat\n", "label 'cat' is not a class index"),
        (",3\n", "empty path"),
    ]:
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(CaitError, match=msg):
            find_images(tmp_path / "bad.csv")
    _png(tmp_path / "mixed" / "a.png")
    _png(tmp_path / "mixed" / "cls" / "b.png")
    with pytest.raises(CaitError, match="holds both images"):
        find_images(tmp_path / "mixed")


# ---- the command, on artifacts made by the real commands ----------------------------------------------------------
@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    """A checkpoint with a recorded data_config, fused, exported to ONNX fp32 and int8 dynamic; a planted copy of the
    fused file (one head's query weights scrambled); 40 labelled images in an ImageFolder."""
    from caitdeploy.compress.cdcp import save_checkpoint_dict
    from caitdeploy.testing.checkpoints import random_checkpoint

    d = tmp_path_factory.mktemp("eval")
    ck = random_checkpoint(img_size=32, num_classes=4, seed=1)
    ck["data_config"] = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "crop_pct": 0.9}
    save_checkpoint_dict(ck, d / "ck.pth")
    assert _cli("fuse", d / "ck.pth", "-o", d / "f.safetensors", "-q").exit_code == 0
    assert _cli("export", d / "f.safetensors", "-o", d / "f.onnx", "-q").exit_code == 0
    assert _cli("export", d / "f.safetensors", "-o", d / "f8.onnx", "--int8", "dynamic", "-q").exit_code == 0
    for i in range(40):
        _png(d / "data" / f"c{i % 4}" / f"{i}.png", size=(36 + i, 40), seed=i)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(d / "f.safetensors"), "pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    w = sd["blocks.1.attn.qkv.weight"]
    qk = json.loads(meta["config"])["blocks"][1]["qk_dim"]
    w[:qk] = w[:qk].flip(0) * 4  # head 0's query rows: scrambled and scaled
    save_file(sd, str(d / "planted.safetensors"), metadata=meta)
    return d


def test_eval_scores_every_artifact_and_matches_an_independent_count(arts, tmp_path):
    js, md, png = tmp_path / "e.json", tmp_path / "e.md", tmp_path / "e.png"
    r = _cli(
        "eval",
        arts / "ck.pth",
        arts / "f.safetensors",
        arts / "f.onnx",
        arts / "f8.onnx",
        "--data",
        arts / "data",
        "--torch-dtype",
        "fp32,bf16",
        "--batch",
        "7",
        "--json",
        js,
        "--markdown",
        md,
        "--plot",
        png,
        "--min-agreement",
        "0.9",
        "--onnx-runtimes",
        "ort",
    )
    assert r.exit_code == 0, r.output + r.stderr
    recs = json.loads(js.read_text())
    assert [(x["kind"], x["precision"]) for x in recs] == [
        ("checkpoint", "fp32"),
        ("fused", "fp32"),
        ("fused", "bf16"),
        ("onnx", "fp32"),
        ("onnx", "int8 dynamic"),
    ]
    assert all(x["status"] == "ok" and x["images"] == 40 and x["img_per_s"] > 0 for x in recs)
    ref, fused, onnx = recs[0], recs[1], recs[3]
    assert ref["reference"] and ref["agree_top1"] is None
    assert fused["agree_top1"] == onnx["agree_top1"] == 1.0 and fused["cosine_min"] > 0.99999
    assert fused["top1"] == onnx["top1"] == ref["top1"]
    assert ref["top1_ci_low"] <= ref["top1"] <= ref["top1_ci_high"]
    # an independent count: timm's own eval transform on each file, the fused model in PyTorch
    from timm.data import create_transform

    from caitdeploy.formats.fused import load_model

    model = load_model(arts / "f.safetensors")
    t = create_transform(
        (3, 32, 32), is_training=False, interpolation="bicubic", mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=0.9
    )
    ds = find_images(arts / "data")
    x = torch.stack([t(Image.open(p).convert("RGB")) for p in ds.files])
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    assert fused["top1"] == pytest.approx(float((pred == ds.labels).mean()))
    assert md.read_text().count("\n| ") == 6 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "caitdeploy.preprocess" in {p.key for p in __import__("onnx").load(arts / "f.onnx").metadata_props}


def test_a_planted_loss_fails_the_gate_in_one_line(arts, tmp_path):
    js = tmp_path / "e.json"
    r = _cli(
        "eval",
        arts / "f.safetensors",
        arts / "f.onnx",
        arts / "planted.safetensors",
        "--data",
        arts / "data",
        "--min-agreement",
        "0.999",
        "--onnx-runtimes",
        "ort",
        "--json",
        js,
        "-q",
    )
    assert r.exit_code == 1, r.output + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("eval failed: planted.safetensors [torch fp32]: top-1 agreement")
    assert "--min-agreement 0.999" in lines[0]
    recs = json.loads(js.read_text())  # the reports are written whatever the gates say
    assert recs[1]["agree_top1"] == 1.0 and recs[2]["agree_top1"] < 0.999 and recs[2]["disagreements"] >= 1
    d = recs[2]["disagree_images"][0]
    assert set(d) == {"index", "file", "label", "reference", "predicted"} and d["reference"] != d["predicted"]
    # the honest ones alone pass the same gate
    ok = _cli(
        "eval", arts / "f.safetensors", arts / "f.onnx", "--data", arts / "data", "--min-agreement", "0.999", "-q"
    )
    assert ok.exit_code == 0 and not ok.stderr


def test_features_compared_without_labels(arts, tmp_path):
    assert (
        _cli("export", arts / "f.safetensors", "-o", tmp_path / "feat.onnx", "--features", "0,2", "-q").exit_code == 0
    )
    for i in range(3):
        _png(tmp_path / "imgs" / f"{i}.png", seed=i)
    js = tmp_path / "e.json"
    r = _cli(
        "eval",
        arts / "f.safetensors",
        tmp_path / "feat.onnx",
        "--data",
        tmp_path / "imgs",
        "--features",
        "0,2",
        "--json",
        js,
        "--min-cosine",
        "0.999",
        "-q",
    )
    assert r.exit_code == 0, r.stderr
    rec = json.loads(js.read_text())[1]
    assert rec["labelled"] is False and rec["top1"] is None and rec["feature_cosine_min"] > 0.9999


def test_hostile_and_wrong_input_one_line_exit_2_nothing_written(arts, tmp_path):
    js = tmp_path / "e.json"
    from caitdeploy.compress.cdcp import save_checkpoint_dict
    from caitdeploy.testing.checkpoints import random_checkpoint

    other = random_checkpoint(img_size=32, num_classes=4, seed=1)  # no data_config: timm's default transform
    save_checkpoint_dict(other, tmp_path / "default.pth")
    (tmp_path / "l.csv").write_text("x.png,9\n")
    _png(tmp_path / "x.png")
    (tmp_path / "notes.txt").write_text("x")
    cases = [
        (
            [arts / "f.safetensors", tmp_path / "default.pth"],
            "expect different preprocessing (resize_shorter 35 vs 36)",
        ),
        (
            [arts / "f.safetensors", "--data", tmp_path / "l.csv"],
            "class index 9 but f.safetensors [torch fp32] has 4 classes",
        ),
        ([tmp_path / "notes.txt"], "eval takes checkpoints"),
        ([tmp_path / "missing.onnx"], "no such file"),
        ([arts / "f.safetensors", "--min-agreement", "99.9"], "--min-agreement '99.9': give a fraction in 0..1"),
        ([arts / "f.safetensors", "--torch-dtype", "fp8"], "--torch-dtype 'fp8'"),
        ([arts / "f.safetensors", "--reference", "nope.onnx"], "--reference 'nope.onnx' is none of the artifacts"),
        ([arts / "f.safetensors", "--model", "cait"], "add --url"),
        ([arts / "f.safetensors", "--data", tmp_path / "nowhere"], "--data "),
        ([arts / "f.safetensors", "--batch", "0"], "--batch '0'"),
    ]
    for args, msg in cases:
        data = [] if "--data" in args else ["--data", arts / "data"]
        r = _cli("eval", *args, *data, "--json", js)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and msg in lines[0], (args, r.stderr)
        assert not js.exists()


@pytest.mark.skipif(not __import__("importlib").util.find_spec("sklearn"), reason="scikit-learn (the examples extra)")
def test_digits_imagefolder_is_read_in_timms_class_order(tmp_path):
    from caitdeploy.testing.files import write_digits

    write_digits(tmp_path)
    ds = find_images(tmp_path / "val", resize_shorter=36)
    assert len(ds) == 360 and ds.classes == [str(i) for i in range(10)]
    assert np.bincount(ds.labels).min() > 20


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the engine would be run")
def test_an_engine_without_a_gpu_is_a_row_saying_why(arts, tmp_path):
    (tmp_path / "m.engine").write_bytes(b"not run on this machine")
    js = tmp_path / "e.json"
    r = _cli(
        "eval",
        arts / "f.onnx",
        tmp_path / "m.engine",
        "--data",
        arts / "data",
        "--json",
        js,
        "--limit",
        "8",
        "--onnx-runtimes",
        "ort",
    )
    assert r.exit_code == 0, r.stderr
    assert "n/a: TensorRT engines run on an NVIDIA GPU; this machine has none" in " ".join(r.output.split())
    recs = json.loads(js.read_text())
    assert recs[1]["status"].startswith("n/a: ") and recs[1]["top1"] is None and recs[0]["images"] == 8
    from caitdeploy.evaluate.run import RECORD_KEYS

    assert list(recs[0])[: len(RECORD_KEYS)] == list(RECORD_KEYS)  # stable keys, in order, then env_*
    assert all(k.startswith("env_") for k in list(recs[0])[len(RECORD_KEYS) :])
