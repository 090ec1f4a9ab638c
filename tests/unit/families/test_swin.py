"""Swin deploy model (issue 15, first part): timm parity, analytic FLOPs, the Tab. XIV merge arithmetic, pruned
widths and merges through a dynamic-batch ONNX."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from caitdeploy.families.flops import flop_counter
from caitdeploy.families.swin.model import CaitSwin, SwinConfig, from_checkpoint, swin_config_of, swin_flops

FORBIDDEN = {"TopK", "ArgMax", "GatherElements", "GatherND", "ScatterElements", "ScatterND", "NonZero", "Loop", "If"}


def small_timm(seed=0):
    import timm

    torch.manual_seed(seed)
    m = timm.create_model(
        "swin_tiny_patch4_window7_224", embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), num_classes=10
    ).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m


def pruned_merged(cfg: SwinConfig) -> SwinConfig:
    """Pruned widths everywhere (q/k and v per head, mlp) and an HTM before the odd (shifted) block 1 of stage 2:
    14x14 -> 14x7, shifted along the height only; stage 3 then pads 14x7 to 14x8 and runs on 7x4 tokens with a
    7x4 window (a non-square relative position table)."""
    stages = []
    for s, blocks in enumerate(cfg.stages):
        out = []
        for i, b in enumerate(blocks):
            merge = {(2, 1): "h"}.get((s, i))
            out.append(
                replace(
                    b,
                    qk_dim=max(1, b.qk_dim - 5),
                    v_dim=max(1, b.v_dim - 3),
                    mlp_hidden=b.mlp_hidden * 2 // 3,
                    merge=merge,
                )
            )
        stages.append(tuple(out))
    return replace(cfg, stages=tuple(stages))


def test_dense_equals_timm():
    m = small_timm()
    cfg = swin_config_of(m)
    d = CaitSwin(cfg).eval()
    d.load_state_dict(from_checkpoint(cfg, m.state_dict()), strict=True)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        ref, out = m(x), d(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()


@pytest.mark.parametrize("variant", ["dense", "pruned_merged"])
def test_analytic_flops_equal_flop_counter(variant):
    cfg = swin_config_of(small_timm())
    if variant != "dense":
        cfg = pruned_merged(cfg)
    d = CaitSwin(cfg).eval()
    with flop_counter() as fc, torch.no_grad():
        d(torch.randn(1, 3, 224, 224))
    assert swin_flops(cfg)["total"] == fc.get_total_flops()


def test_tab14_merge_arithmetic():
    """HTM then VTM at the last two blocks of Swin-T's stage 3: 14x14 -> 14x7 -> 7x7; stage 4 pads 7x7 to 8x8
    and runs on 4x4 tokens with a 4x4 window and no shift. The merges alone remove about 20% of the FLOPs
    (paper: 20.1%)."""
    import timm

    with torch.device("meta"):
        full = timm.create_model("swin_tiny_patch4_window7_224")
    dense = swin_config_of(full)
    cait = swin_config_of(full, {(2, 4): "h", (2, 5): "v"})
    assert cait.grids()[2][-2:] == [(14, 7), (7, 7)] and cait.grids()[3] == [(4, 4), (4, 4)]
    assert cait.window_shift(2, 5) == ((7, 7), (0, 0)) and cait.window_shift(3, 1) == ((4, 4), (0, 0))
    small = pruned_merged(swin_config_of(small_timm()))
    assert small.grids()[2] == [(14, 14), (14, 7)] and small.grids()[3] == [(7, 4), (7, 4)]
    assert small.window_shift(2, 1) == ((7, 7), (3, 0))  # height 14 > 7 still shifts; width 7 does not
    assert small.window_shift(3, 1) == ((7, 4), (0, 0))
    f0, f1 = swin_flops(dense)["total"], swin_flops(cait)["total"]
    assert f0 == pytest.approx(8.98e9, rel=1e-3)  # Swin-T: 4.49 GMACs
    assert 0.195 < 1 - f1 / f0 < 0.21


def test_merge_on_odd_side_is_refused():
    cfg = swin_config_of(small_timm())
    stages = list(cfg.stages)
    stages[3] = (replace(stages[3][0], merge="h"), stages[3][1])  # stage 4 grid 7x7: odd
    with pytest.raises(ValueError, match="horizontal merge on an odd grid width 7"):
        replace(cfg, stages=tuple(stages))


def test_pruned_merged_onnx_dynamic_batch(tmp_path):
    import onnx
    import onnxruntime as ort

    cfg = pruned_merged(swin_config_of(small_timm()))
    torch.manual_seed(1)
    d = CaitSwin(cfg).eval()
    with torch.no_grad():
        for p in d.parameters():
            p.normal_(0, 0.05)
    path = tmp_path / "swin.onnx"
    torch.onnx.export(
        d,
        (torch.randn(2, 3, 224, 224),),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=18,
        dynamo=False,
    )
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert not ops & FORBIDDEN
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # a batch cast to int in window_reverse would break 5 while passing 2
        x = torch.randn(batch, 3, 224, 224)
        with torch.no_grad():
            ref = d(x).numpy()
        out = sess.run(None, {"images": x.numpy()})[0]
        assert out.shape == (batch, 10) and np.abs(out - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_merged_pruned_equals_timm_blocks():
    """An independent reference: timm's own SwinTransformerBlock / PatchMerging modules (their window clipping,
    shift rule, masks and padding), built at each block's merged grid, with the same weights; pruned to head
    width 12 (q, k and v alike, as timm's head_dim allows) and an mlp of 2.5x; HTM before stage 2's shifted
    block 1 and VTM before stage 1's block 0. Only the merge Linears are ours."""
    from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock

    torch.manual_seed(3)
    base = swin_config_of(small_timm())
    merges = {(1, 0): "v", (2, 1): "h"}
    stages = tuple(
        tuple(
            replace(b, qk_dim=12, v_dim=12, mlp_hidden=int(base.dims[s] * 2.5), merge=merges.get((s, i)))
            for i, b in enumerate(blocks)
        )
        for s, blocks in enumerate(base.stages)
    )
    cfg = replace(base, stages=stages)
    d = CaitSwin(cfg).eval()
    with torch.no_grad():
        for p in d.parameters():
            p.normal_(0, 0.05)
    grids = cfg.grids()
    ref_stages = []
    for s, blocks in enumerate(cfg.stages):
        mods = []
        if s:
            pm = PatchMerging(cfg.dims[s - 1], cfg.dims[s])
            pm.load_state_dict(d.layers[s].downsample.state_dict())
            mods.append(pm)
        for i, b in enumerate(blocks):
            tb = SwinTransformerBlock(
                cfg.dims[s],
                grids[s][i],
                num_heads=b.num_heads,
                head_dim=12,
                window_size=7,
                shift_size=0 if i % 2 == 0 else 3,
                mlp_ratio=2.5,
            )
            mine = d.layers[s].blocks[i]
            sd = {k: v for k, v in mine.state_dict().items() if not k.startswith("merge.")}
            sd = {k.replace("fc1.", "mlp.fc1.").replace("fc2.", "mlp.fc2."): v for k, v in sd.items()}
            tb.load_state_dict(sd, strict=False)
            assert tb.window_size == mine.win and tb.shift_size == mine.shift  # timm's own rule agrees
            mods.append((mine.merge, b.merge, grids[s][i], tb))
        ref_stages.append(mods)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        y = d.patch_norm(d.patch_embed(x).permute(0, 2, 3, 1))
        for mods in ref_stages:
            for m in mods:
                if isinstance(m, PatchMerging):
                    y = m(y)
                    continue
                merge, kind, (_h, _w), tb = m
                if kind == "h":
                    y = merge(torch.cat([y[:, :, 0::2], y[:, :, 1::2]], dim=-1))
                elif kind == "v":
                    y = merge(torch.cat([y[:, 0::2], y[:, 1::2]], dim=-1))
                y = tb(y)
        ref = d.head(d.norm(y).mean(dim=(1, 2)))
        out = d(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()


def test_dimap_zero_rows_dropped_exactly():
    """DIMAP-style unstructured masks: scattered zeros change nothing, whole zero rows/columns are removed and
    the smaller model computes the same logits (the constant GELU(b) of a zero fc1 row folded into fc2's bias)."""
    from caitdeploy.convert.dimap import drop_zero_rows, sparsity

    m = small_timm(seed=4)
    cfg = swin_config_of(m)
    sd = from_checkpoint(cfg, m.state_dict())
    g = torch.Generator().manual_seed(0)
    for k, v in sd.items():  # scattered zeros: 30% of every matrix
        if k.endswith(".weight") and v.ndim == 2:
            v.mul_((torch.rand(v.shape, generator=g) > 0.3).float())
    for s, blocks in enumerate(cfg.stages):
        for i, b in enumerate(blocks):
            p = f"layers.{s}.blocks.{i}."
            sd[p + "fc1.weight"][::3] = 0  # constant units (bias kept)
            sd[p + "fc2.weight"][:, 1::5] = 0  # units that feed nothing
            hd = b.qk_dim
            for h in range(b.num_heads):  # q channels: 2 in head 0, 3 in the others
                for c in range(2 if h == 0 else 3):
                    sd[p + "attn.qkv.weight"][h * hd + c] = 0
                    sd[p + "attn.qkv.bias"][h * hd + c] = 0
                sd[p + "attn.proj.weight"][:, h * hd + 4] = 0  # one v channel per head via proj
    rep = sparsity(sd)
    assert all(r["zeros"] >= 0.29 for r in rep if ".blocks." in r["key"])
    dense = CaitSwin(cfg).eval()
    dense.load_state_dict(sd, strict=True)
    small_cfg, small_sd, kept = drop_zero_rows(cfg, sd)
    small = CaitSwin(small_cfg).eval()
    small.load_state_dict(small_sd, strict=True)
    b0 = kept[0]
    assert b0["qk"][1] == b0["qk"][0] - 2 and b0["v"][1] == b0["v"][0] - 1 and b0["mlp"][1] < b0["mlp"][0] * 0.6
    assert swin_flops(small_cfg)["total"] < swin_flops(cfg)["total"]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(small(x), dense(x), atol=1e-5, rtol=0)


# ---- the Swin family end to end: checkpoint -> fuse -> fused file -> export (issue 15, second part) --------
SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
ARCH = "swin_tiny_patch4_window7_224"


def small_checkpoint(tmp_path, merges=None, reduction=0.3, perturb=True, weights=None, seed=0):
    """A CAIT-Swin checkpoint on the small Swin: CDCP masks for `reduction`, and (perturb) random compactors
    whose dropped rows are zero and random merge weights, so fusing is checked on non-trivial folds."""
    from caitdeploy.compress.cdcp import make_checkpoint, save_checkpoint_dict

    ckpt, summary = make_checkpoint(
        ARCH,
        reduction,
        merges if merges is not None else {(2, 1): "h"},
        weights=weights,
        seed=seed,
        num_classes=10,
        model_args=SMALL,
    )
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        sd = ckpt["state_dict"]
        for k in list(sd):
            if k.endswith("_compactor.weight"):
                mask = sd[k[: -len("weight")] + "mask"]
                noise = torch.randn(sd[k].shape, generator=g) * 0.1
                sd[k] = (sd[k] + noise) * mask.unsqueeze(-1)  # dropped rows stay zero
            elif ".htm." in k or ".vtm." in k or "relative_position_bias_table" in k:
                sd[k] = torch.randn(sd[k].shape, generator=g) * 0.1
    path = tmp_path / "swin_ckpt.safetensors"
    save_checkpoint_dict(ckpt, path)
    return path, ckpt, summary


def test_swin_checkpoint_fuses_exactly(tmp_path):
    """Random compactors (non-identity kept rows) and a merge that leaves stage 3 on a 7x4 grid: the fused model
    equals the checkpoint's own float64 forward, its FLOPs equal torch's counter, its widths are the masks'."""
    from caitdeploy.compress.fuse import FuseOptions, fuse_file
    from caitdeploy.families.swin.reference import reference_forward
    from caitdeploy.formats.checkpoint import load_checkpoint
    from caitdeploy.formats.fused import load_model

    path, _ckpt, summary = small_checkpoint(tmp_path)
    assert abs(summary["flops_reduction"] - 0.3) < 0.01
    rep = fuse_file(path, tmp_path / "f.safetensors", FuseOptions(align=1))
    assert rep["verify"]["max_abs_diff"] < 1e-4 and rep["verify"]["top1_agree"] == 1.0
    assert rep["flops_fused"] == rep["verify"]["torch_flops_per_img"]
    assert abs(rep["flops_reduction"] - summary["flops_reduction"]) < 1e-9
    model = load_model(tmp_path / "f.safetensors")
    cfg = model.config
    assert cfg.family == "swin" and cfg.merges == {"2.1": "h"} and cfg.grids()[3] == [(7, 4), (7, 4)]
    kept = [k["q"] // b.num_heads for k, (_, _, b) in zip(summary["kept"], cfg.flat())]
    assert [b.qk_dim for _, _, b in cfg.flat()] == kept
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        ref = reference_forward(load_checkpoint(path), x.double())
        assert (model(x).double() - ref).abs().max() < 1e-4


def test_swin_identity_fuse_equals_timm(tmp_path):
    """No pruning, no merges: the fused Swin computes timm's forward (1e-5)."""
    from safetensors.torch import save_file

    from caitdeploy.compress.fuse import FuseOptions, fuse_file
    from caitdeploy.formats.fused import load_model

    m = small_timm(seed=3)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "w.safetensors"))
    path, _, _ = small_checkpoint(
        tmp_path, merges={}, reduction=0.0, perturb=False, weights=str(tmp_path / "w.safetensors")
    )
    fuse_file(path, tmp_path / "f.safetensors", FuseOptions(align=1))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (load_model(tmp_path / "f.safetensors")(x) - m(x)).abs().max() < 1e-5


@pytest.mark.slow
def test_swin_export_dynamic_batch(tmp_path):
    """The fused Swin through the project's exporter: clean census, ONNX Runtime equals PyTorch at batch 1 and 5."""
    import onnx
    import onnxruntime as ort

    from caitdeploy.compress.fuse import FuseOptions, fuse_file
    from caitdeploy.export.onnx import FORBIDDEN_OPS, export_onnx_bytes
    from caitdeploy.formats.fused import load_model

    path, _, _ = small_checkpoint(tmp_path)
    fuse_file(path, tmp_path / "f.safetensors", FuseOptions(align=8))
    model = load_model(tmp_path / "f.safetensors", attn_impl="math")
    data, rep = export_onnx_bytes(model, tmp_path / "f.onnx", verify_batches=(1, 5))
    assert rep["verify"]["passed"] and [b["batch"] for b in rep["verify"]["batches"]] == [1, 5]
    assert not set(rep["census"]) & set(FORBIDDEN_OPS) and "Gather" not in rep["census"]
    assert rep["flops"] == swin_flops(model.config)["total"]
    meta = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    assert '"family": "swin"' in meta["caitdeploy.config"]
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 224, 224)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(sess.run(None, {"images": x.numpy()})[0], ref, atol=1e-4, rtol=0)


def test_swin_bad_inputs_one_line(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from caitdeploy.core.errors import CaitError, OptionError
    from caitdeploy.families.swin.family import parse_merges as parse_swin_merges
    from caitdeploy.formats.checkpoint import load_checkpoint

    path, ckpt, _ = small_checkpoint(tmp_path, perturb=False)
    sd = load_file(str(path))
    meta = {"format": "cait-compactor/1", "config": json.dumps(ckpt["config"])}

    def bad(sd2, config=None):
        p = tmp_path / "bad.safetensors"
        save_file(sd2, str(p), metadata={**meta, **({"config": json.dumps(config)} if config else {})})
        with pytest.raises(CaitError) as e:
            load_checkpoint(p)
        return str(e.value)

    assert "missing key 'layers.1.blocks.0.attn.qkv.weight'" in bad(
        {k: v for k, v in sd.items() if k != "layers.1.blocks.0.attn.qkv.weight"}
    )
    assert "has no mask" in bad({k: v for k, v in sd.items() if k != "layers.0.blocks.1.attn.q_compactor.mask"})
    assert "stage 3 block 1: vertical merge on an odd grid height 7" in bad(
        sd, {**ckpt["config"], "merges": {"3.1": "v"}}
    )
    assert "stage 2 block 1: horizontal merge on an odd grid width 7" in bad(
        sd, {**ckpt["config"], "merges": {"2.0": "h", "2.1": "h"}}
    )
    assert "merge 5.0: no such block" in bad(sd, {**ckpt["config"], "merges": {"5.0": "h"}})
    assert "unexpected key 'layers.2.blocks.1.htm.fc." in bad(sd, {**ckpt["config"], "merges": {}})
    assert "unknown key 'depth'" in bad(sd, {**ckpt["config"], "depth": 12})
    nan = dict(sd)
    nan["layers.2.blocks.0.mlp.fc1.weight"] = nan["layers.2.blocks.0.mlp.fc1.weight"].clone()
    nan["layers.2.blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    assert "'layers.2.blocks.0.mlp.fc1.weight' contains NaN" in bad(nan)
    zero = dict(sd)
    zero["layers.1.blocks.0.attn.v_compactor.mask"] = torch.zeros_like(zero["layers.1.blocks.0.attn.v_compactor.mask"])
    assert "block layers.1.blocks.0: every v channel head 0 is masked" in bad(zero)
    with pytest.raises(OptionError, match="STAGE.BLOCK"):
        parse_swin_merges("4:h")
    with pytest.raises(OptionError, match="named twice"):
        parse_swin_merges("2.4:h,2.4:v")


@pytest.mark.parametrize("layout", ["timm", "microsoft"])
def test_convert_dimap_exact(tmp_path, layout):
    """`convert --from dimap`: per-layer sparsity reported, whole zero rows removed, the result equal to the
    dense timm forward; Microsoft's layout (PatchMerging at the end of a stage, `head.*`) read as timm's."""

    from click.testing import CliRunner
    from safetensors.torch import save_file

    from caitdeploy.cli.main import main
    from caitdeploy.formats.fused import load_model
    from caitdeploy.testing.upstream_swin import dimap_state_dict, to_microsoft

    m = small_timm(seed=5)
    sd = dimap_state_dict(m)
    m.load_state_dict(sd)
    if layout == "microsoft":
        sd = to_microsoft(sd)
    src = tmp_path / "dimap.pth"
    torch.save({"model": sd}, src)
    r = CliRunner().invoke(
        main,
        [
            "convert",
            str(src),
            "--from",
            "dimap",
            "-o",
            str(tmp_path / "d.safetensors"),
            "--report",
            str(tmp_path / "r.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert f"{layout} layout" in text and "sparsity:" in text
    import json

    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["verify"]["max_abs_diff"] < 1e-4 and 0.45 < rep["sparsity"]["zeros"] < 0.6
    assert len(rep["sparsity"]["layers"]) > 20
    cfg = load_model(tmp_path / "d.safetensors").config
    dense = swin_config_of(m)
    for (s, i, b), (_, _, d) in zip(cfg.flat(), dense.flat()):
        assert b.mlp_hidden == d.mlp_hidden - (5 + i) - (0 if 7 < 5 + i else 1)  # zero fc1 rows, fc2 column 7
        assert b.qk_dim == d.qk_dim - 2 and b.v_dim == d.v_dim - 2  # a q and a k position; a v row, a proj column
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (load_model(tmp_path / "d.safetensors")(x) - m(x)).abs().max() < 1e-4
    save_file({"x": torch.zeros(2)}, str(tmp_path / "junk.safetensors"))
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "junk.safetensors"), "--from", "dimap"])
    assert r.exit_code == 2 and "not --from dimap" in r.output


SPVIT_KINDS = [["attn", "conv1"], ["conv3", "skip"], ["attn", "conv3"], ["conv1", "attn"]]


@pytest.mark.slow
def test_convert_spvit_swin(tmp_path):
    """`convert --from spvit` detects SPViT-Swin; attention, 1x1, 3x3 (whole map) and skipped blocks with pruned
    FFNs fold into the Swin family exactly (the float64 reference is written from the upstream format); the
    fused file exports with a dynamic batch and its FLOPs equal torch's counter."""
    from click.testing import CliRunner

    from caitdeploy.cli.main import main
    from caitdeploy.convert import convert_file
    from caitdeploy.export.onnx import export_onnx_bytes
    from caitdeploy.formats.fused import load_model
    from caitdeploy.testing.upstream_swin import spvit_swin_state_dict

    src = tmp_path / "spvit_swin.pth"
    torch.save({"model": spvit_swin_state_dict(small_timm(0), SPVIT_KINDS)}, src)
    rep = convert_file(src, "spvit", tmp_path / "s.safetensors", align=8)
    assert rep["source"] == "spvit-swin" and rep["verify"]["max_abs_diff"] < 1e-4
    assert rep["verify"]["top1_agree"] == 1.0 and rep["flops"] < rep["flops_dense"]
    model = load_model(tmp_path / "s.safetensors", attn_impl="math")
    assert [b.kind for _, _, b in model.config.flat()] == [k for row in SPVIT_KINDS for k in row]
    assert all(b.mlp_hidden % 8 == 0 for _, _, b in model.config.flat())
    _, erep = export_onnx_bytes(model, tmp_path / "s.onnx", verify_batches=(1, 5))
    assert erep["verify"]["passed"] and erep["census"]["Conv"] == 1 + 2  # stem + the 3x3 blocks (1x1: MatMul)
    r = CliRunner().invoke(main, ["convert", str(src), "--from", "dimap"])
    assert r.exit_code == 2 and "SPViT-Swin" in r.output and "use --from spvit" in r.output


def test_spvit_swin_3x3_tap_order():
    """The 3x3 kernel's layout: head_probs column 0 is the centre, columns [1, 2, 3, 4, 0, 5, 6, 7, 8] fill the
    kernel column-major. A mixture that puts all weight of column t on head 0 makes the kernel's tap at that
    position v_0 and the others zero."""
    from caitdeploy.convert.spvit_swin import SWIN_TAPS, conv_weights

    c, h = 8, 2
    for t in range(9):
        probs = torch.full((h, 9), -1e6)
        probs[1] = 0.0
        probs[0, t] = 1e6  # column t: head 0 only; other columns: head 1 only
        v = torch.randn(c, c)
        sd = {
            "p.attn.v.weight": v,
            "p.attn.v.bias": torch.zeros(c),
            "p.attn.proj.weight": torch.randn(c, c),
            "p.attn.proj.bias": torch.zeros(c),
            "p.attn.head_probs": probs,
        }
        w1, _, _, _ = conv_weights(sd, "p.", "conv3", h)
        pos = SWIN_TAPS.index(t)
        row, col = pos % 3, pos // 3
        assert torch.allclose(w1[:, :, row, col], v[: c // h].double())
        w0, *_ = conv_weights(sd, "p.", "conv1", h)
        assert torch.allclose(w0[:, :, 0, 0], v[: c // h].double() if t == 0 else v[c // h :].double())


def test_cait_wrap_swin_trains_and_fuses(tmp_path):
    """`cait_wrap` of a timm Swin with a Tab. XIV-style merge: CDCP's controller trains compactors (Eq. 2, masks
    re-selected), `finalize` zeroes the masked rows, the checkpoint written from the wrapper fuses strictly and
    the fused model equals the wrapper's forward."""
    from caitdeploy.compress.fuse import FuseOptions, fuse_file
    from caitdeploy.formats.fused import load_model
    from caitdeploy.training.wrappers import CDCPController, cait_wrap, save_checkpoint

    torch.manual_seed(0)
    m = small_timm(seed=2)
    wrap = cait_wrap(m, {(2, 1): "h"})
    ctl = CDCPController(wrap, 0.3, lam=1e-3, step_ratio=0.1, every=1)
    opt = torch.optim.SGD(
        [{"params": wrap.base_parameters(), "lr": 1e-3}, {"params": wrap.compactor_parameters(), "lr": 1e-2}]
    )
    x, y = torch.randn(4, 3, 224, 224), torch.randint(0, 10, (4,))
    for _ in range(4):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(wrap(x), y).backward()
        ctl.step()
        opt.step()
    assert ctl.done and abs(ctl.flops_reduction - 0.3) < 0.01
    ctl.finalize()
    save_checkpoint(wrap.eval(), tmp_path / "w.safetensors")
    rep = fuse_file(tmp_path / "w.safetensors", tmp_path / "f.safetensors", FuseOptions(align=1))
    assert rep["verify"]["max_abs_diff"] < 1e-4 and abs(rep["flops_reduction"] - ctl.flops_reduction) < 1e-9
    with torch.no_grad():
        assert (load_model(tmp_path / "f.safetensors")(x) - wrap(x)).abs().max() < 1e-4


# ---- feature maps (a Swin backbone for dense prediction) ----------------------------------------------------
def test_swin_feature_maps_equal_timm_stages():
    """No merges, no pruning: the maps after each stage's last block are timm's stage outputs (its
    forward_intermediates, no norm), exactly; encoder FLOPs count the stem, the patch mergings and the blocks."""
    from caitdeploy.families.flops import encoder_flops
    from caitdeploy.training.wrappers import cait_wrap

    m = small_timm(seed=4)
    w = cait_wrap(m, {}).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = m.forward_intermediates(x, indices=4, intermediates_only=True, norm=False)
        ours = w.model.forward_features(x, "1,3,5,-1")
    assert [tuple(t.shape) for t in ours] == [(2, 32, 56, 56), (2, 64, 28, 28), (2, 128, 14, 14), (2, 256, 7, 7)]
    for a, b in zip(ours, ref):
        assert (a - b).abs().max() < 1e-5
    f = swin_flops(w.cait_config)
    assert encoder_flops(w.cait_config) == f["total"] - f["head"]
    assert encoder_flops(w.cait_config, 1) == f["stem"] + f["blocks"][0] + f["blocks"][1]
    assert encoder_flops(w.cait_config, 2) == f["stem"] + f["stages"][0] + f["stages"][1] - f["blocks"][3]


@pytest.mark.slow
def test_swin_feature_export_merged_pruned(tmp_path):
    """A fused, merged (2.1:h) and pruned Swin exported with --features: each map on its stage's grid, the merged
    stage restored exactly (each merged token in both columns it came from), later stages on the grid the merge
    leaves, ONNX Runtime equal to PyTorch at batch 1 and 5, no data-dependent ops."""
    from caitdeploy.compress.fuse import FuseOptions, fuse_file
    from caitdeploy.export.onnx import FORBIDDEN_OPS, export_onnx_bytes
    from caitdeploy.formats.fused import load_model

    path, _, _ = small_checkpoint(tmp_path)
    fuse_file(path, tmp_path / "f.safetensors", FuseOptions(align=1))
    model = load_model(tmp_path / "f.safetensors", attn_impl="math")
    assert model.config.stage_grids() == [(56, 56), (28, 28), (14, 14), (7, 4)]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        f4, f5, f7 = model.forward_features(x, [4, 5, 7])
        (b5,) = model.forward_features(x, [5], restore="bilinear")
    assert f5.shape == b5.shape == (2, 128, 14, 14) and f7.shape == (2, 256, 7, 4) and f4.shape == f5.shape
    assert torch.equal(f5[..., 0::2], f5[..., 1::2]) and not torch.equal(f4[..., 0::2], f4[..., 1::2])
    _data, rep = export_onnx_bytes(model, tmp_path / "f.onnx", features="1,3,5,7", verify_batches=(1, 5))
    assert rep["verify"]["passed"] and rep["feature_grid"] == "stage"
    assert [o["shape"][1:] for o in rep["outputs"]] == [[32, 56, 56], [64, 28, 28], [128, 14, 14], [256, 7, 4]]
    assert not set(rep["census"]) & set(FORBIDDEN_OPS)


def test_swin_make_checkpoint_auto_merges(tmp_path):
    """make-checkpoint on a Swin places the paper's merges by the model's stages (auto: the longest stage's last
    two blocks), so a deeper stage 3 (Swin-S, 18 blocks) does not overshoot the target."""
    from click.testing import CliRunner

    from caitdeploy.cli.main import main
    from caitdeploy.compress.cdcp import make_checkpoint

    deep = dict(embed_dim=32, depths=(2, 2, 6, 2), num_heads=(1, 2, 2, 4))
    _, summary = make_checkpoint(ARCH, 0.354, None, num_classes=10, model_args=deep)
    assert summary["merges"] == {"2.4": "h", "2.5": "v"} and abs(summary["flops_reduction"] - 0.354) < 0.005
    deeper = dict(embed_dim=32, depths=(2, 2, 10, 2), num_heads=(1, 2, 2, 4))
    _, summary = make_checkpoint(ARCH, 0.354, None, num_classes=10, model_args=deeper)
    assert summary["merges"] == {"2.8": "h", "2.9": "v"} and abs(summary["flops_reduction"] - 0.354) < 0.005
    out = tmp_path / "x.safetensors"
    res = CliRunner().invoke(
        main, ["make-checkpoint", "--arch", "swin_small_patch4_window7_224", "--merges", "2.4:h,2.5:v", "-o", str(out)]
    )
    assert res.exit_code == 2 and "the merges alone cut FLOPs by 46.90%" in res.stderr and not out.exists()
