"""export_onnx: census, forbidden ops, ATME merge structure, fp32/fp16 tolerance with ONNX Runtime, Attention op.

The test model is a small CaitViT (4 blocks, 4x4 patch grid, an "h" and a "v" merge, q/k head width != v head
width in some blocks). Random-init weights give logits of ~1e-1 with near-ties between classes, which makes a
top-1 comparison meaningless; the head weights are drawn from N(0, 1) so logits spread over several units (median top-1/top-2
margin printed in the report) and fp16 top-1 agreement measures the graph, not noise.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from caitdeploy.core.errors import CaitError
from caitdeploy.export.onnx import FORBIDDEN_OPS, export_onnx
from caitdeploy.families.vit.config import BlockConfig, CaitConfig
from caitdeploy.families.vit.model import CaitViT
from caitdeploy.formats.onnx_meta import op_census

SCALE = 16**-0.5


def small_cait(seed: int = 0) -> CaitViT:
    blocks = (
        BlockConfig(3, 8, 16, 96, SCALE),
        BlockConfig(3, 16, 8, 64, SCALE, "h"),
        BlockConfig(3, 8, 8, 64, SCALE, "v"),
        BlockConfig(3, 16, 16, 128, SCALE),
    )
    cfg = CaitConfig(64, 16, 3, 10, 48, True, blocks)
    torch.manual_seed(seed)
    m = CaitViT(cfg).eval()
    with torch.no_grad():  # torch's default init, then a head with a real logit spread
        m.head.weight.normal_(0, 1.0)
    return m


@pytest.fixture(scope="module")
def model():
    return small_cait()


@pytest.fixture(scope="module")
def fp32(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("fp32") / "m.onnx"
    report = export_onnx(model, path)
    return path, report


def _ort(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_fp32_census_io_and_metadata(model, fp32):
    path, report = fp32
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    census = op_census(m)
    assert census == report["census"]
    assert not set(census) & set(FORBIDDEN_OPS)
    depth = model.config.depth
    assert census["Softmax"] == depth and census["LayerNormalization"] == 2 * depth + 1
    assert census.get("Attention", 0) == 0
    # IO contract: images [batch, 3, 64, 64] -> logits [batch, 10], float32, batch symbolic
    (inp,), (out,) = m.graph.input, m.graph.output
    assert inp.name == "images" and out.name == "logits"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 64, 64]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 10]
    meta = {p.key: p.value for p in m.metadata_props}
    assert CaitConfig.from_json(meta["caitdeploy.config"]) == model.config
    assert report["opset"] == 18 and {o.domain: o.version for o in m.opset_import}[""] == 18
    # the caller's model was not switched to another attention implementation
    assert all(b.attn.impl == "sdpa" for b in model.blocks)


def test_fp32_scale_applied_to_q_before_first_matmul(fp32):
    m = onnx.load(str(fp32[0]))
    producers = {o: n for n in m.graph.node for o in n.output}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    for sm in (n for n in m.graph.node if n.op_type == "Softmax"):
        mm = producers[sm.input[0]]
        assert mm.op_type == "MatMul"
        mul = producers[mm.input[0]]
        assert mul.op_type == "Mul", "scale must be a Mul on q feeding the first MatMul"
        consts = [inits[i] for i in mul.input if i in inits]
        assert consts and np.allclose(float(consts[0]), SCALE)


def _merge_nodes(m):
    """Nodes of each ATME merge: walk back from a Concat feeding a LayerNormalization to the residual Add."""
    producers = {o: n for n in m.graph.node for o in n.output}
    consts = {i.name for i in m.graph.initializer} | {
        o for n in m.graph.node if n.op_type == "Constant" for o in n.output
    }
    merges = []
    for ln in (n for n in m.graph.node if n.op_type == "LayerNormalization"):
        cat = producers.get(ln.input[0])
        if cat is None or cat.op_type != "Concat" or any(i == "images" for i in cat.input):
            continue
        seen, stack = [], [cat]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.append(n)
            for i in n.input:
                p = producers.get(i)
                if p is None or i in consts or p.op_type == "Constant":
                    continue
                residual = p.op_type == "Add" and all(x not in consts for x in p.input)
                if not residual:
                    stack.append(p)
        merges.append(seen)
    return merges


def test_merges_are_only_reshape_transpose_matmul_add(model, fp32):
    m = onnx.load(str(fp32[0]))
    merges = _merge_nodes(m)
    assert len(merges) == len(model.config.merges) == 2
    kinds = [model.config.merges[i] for i in sorted(model.config.merges)]
    for nodes, kind in zip(merges, kinds):
        ops = sorted(n.op_type for n in nodes)
        # class token split/concat: 2 Slice + 1 Concat; the merge itself: Reshape [+Transpose] + MatMul + Add
        core = [o for o in ops if o not in ("Slice", "Concat")]
        assert ops.count("Slice") == 2 and ops.count("Concat") == 1
        assert set(core) <= {"Reshape", "Transpose", "MatMul", "Add", "Gemm"}, ops
        assert core.count("MatMul") + core.count("Gemm") == 1
        if kind == "v":
            assert core.count("Transpose") == 1 and core.count("Reshape") == 2
        else:
            assert core.count("Transpose") == 0 and core.count("Reshape") == 1
        # every Reshape keeps the batch as -1 (constant shape, no Shape/Gather arithmetic)
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
        for r in (n for n in nodes if n.op_type == "Reshape"):
            assert r.input[1] in inits and inits[r.input[1]][0] == -1


def test_fp32_matches_pytorch_at_batch_1_and_7(model, fp32):
    path, report = fp32
    v = report["verify"]
    assert v["passed"] and [b["batch"] for b in v["batches"]] == [1, 7]
    assert v["max_abs_diff"] <= 1e-4 * max(1.0, v["logit_scale"])
    assert v["logit_std"] > 1.0  # the head scaling gives a real logit spread
    sess = _ort(path)
    for b in (1, 7):
        x = torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(100 + b))
        got = sess.run(["logits"], {"images": x.numpy()})[0]
        with torch.no_grad():
            ref = model(x).numpy()
        assert got.shape == (b, 10)
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_fp16_graph_and_agreement(model, tmp_path):
    path = tmp_path / "m16.onnx"
    report = export_onnx(model, path, dtype="fp16", fp16_samples=256)
    v = report["verify"]
    print(
        f"fp16: max|diff| {v['max_abs_diff']:.4g}, logit scale {v['logit_scale']:.3g}, top-1 "
        f"{100 * v['top1_agree']:.2f}% over {v['samples']} images, median margin {v['median_top1_margin']:.3g}"
    )
    assert v["samples"] >= 256 + 8 and v["top1_agree"] >= 0.99
    assert 0 < v["max_abs_diff"] < 0.02 * v["logit_scale"]
    m = onnx.load(str(path))
    floats = [i for i in m.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    big = [i for i in floats if np.prod(i.dims) > 1]
    assert big and all(i.data_type == onnx.TensorProto.FLOAT16 for i in big), "weights must be float16"
    casts = [n for n in m.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2
    assert {tuple(c.input) for c in casts} >= {("images",)} and any(c.output[0] == "logits" for c in casts)
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    for ln in (n for n in m.graph.node if n.op_type == "LayerNormalization"):
        stash = {a.name: a.i for a in ln.attribute}.get("stash_type", 1)
        assert stash == 1, "LayerNormalization must accumulate in float32"


def test_attention_op_with_unequal_qk_and_v_widths(model, tmp_path):
    path = tmp_path / "attn.onnx"
    report = export_onnx(model, path, attention="op")
    assert report["opset"] == 23 and report["census"]["Attention"] == model.config.depth
    assert "Softmax" not in report["census"]
    m = onnx.load(str(path))
    shapes = {
        v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in list(m.graph.value_info)
    }
    attn = [n for n in m.graph.node if n.op_type == "Attention"]
    widths = [(shapes[n.input[0]][-1], shapes[n.input[2]][-1]) for n in attn]
    assert widths == [(b.qk_dim, b.v_dim) for b in model.config.blocks]
    assert any(q != v for q, v in widths)
    scales = [{a.name: a.f for a in n.attribute}["scale"] for n in attn]
    assert np.allclose(scales, SCALE)
    assert report["verify"]["passed"] and report["verify"]["max_abs_diff"] <= 1e-4 * report["verify"]["logit_scale"]


class TopKHead(torch.nn.Module):
    """Images -> logits through a top-k pooling: a legitimate model that uses a forbidden op."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 8, 8, stride=8)
        self.head = torch.nn.Linear(8 * 4, 5)

    def forward(self, images):
        x = self.proj(images).flatten(2)  # [B, 8, 16]
        top = torch.topk(x, 4, dim=-1).values.flatten(1)  # [B, 32]
        return self.head(top)


def test_forbidden_op_fails_loudly_and_writes_nothing(tmp_path):
    path = tmp_path / "topk.onnx"
    with pytest.raises(CaitError) as e:
        export_onnx(TopKHead().eval(), path, input_shape=(3, 32, 32))
    msg = str(e.value)
    assert "TopK" in msg and "node '" in msg and "\n" not in msg
    assert not path.exists() and not list(tmp_path.iterdir())
    # an arbitrary module exports with forbid=(): dynamic batch, verified against PyTorch
    report = export_onnx(TopKHead().eval(), path, input_shape=(3, 32, 32), forbid=())
    assert report["census"]["TopK"] == 1 and report["verify"]["passed"]
    assert "flops" not in report


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"dtype": "bf16"}, "unknown dtype"),
        ({"opset": 17}, "unsupported opset 17"),
        ({"opset": 99}, "unsupported opset 99"),
        ({"attention": "flash"}, "unknown attention"),
        ({"attention": "op", "opset": 18}, "needs opset >= 23"),
    ],
)
def test_bad_options(model, tmp_path, kw, needle):
    with pytest.raises(CaitError, match=needle):
        export_onnx(model, tmp_path / "x.onnx", **kw)
    assert not (tmp_path / "x.onnx").exists()


def test_input_shape_required_for_plain_modules(tmp_path):
    with pytest.raises(CaitError, match="input_shape"):
        export_onnx(TopKHead(), tmp_path / "x.onnx", forbid=())
