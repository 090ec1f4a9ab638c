"""Live serving: a real Triton Inference Server (the one bundled in nvidia-pytriton) on a repository written by
`caitdeploy export --triton-repo DIR --triton-backend python`; real HTTP and gRPC clients, no mocks."""

from __future__ import annotations

import concurrent.futures as cf
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip(
    "pytriton",
    reason="nvidia-pytriton is not installed (pip install nvidia-pytriton)"
    + (
        f"; it needs numpy < 2 and this stack has numpy {np.__version__} (the floor leg)"
        if int(np.__version__.split(".")[0]) >= 2
        else ""
    ),
)

from caitdeploy.cli.main import main
from caitdeploy.core.errors import CaitError
from caitdeploy.formats.fused import load_model
from caitdeploy.serve.server import TritonServer, free_port
from caitdeploy.testing.checkpoints import write_tiny_fused


def _ports():
    return dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    fused = write_tiny_fused(d / "m.fused.safetensors")
    repo = d / "repo"
    r = CliRunner().invoke(
        main,
        [
            "export",
            str(fused),
            "-o",
            str(d / "cait.onnx"),
            "-q",
            "--no-verify",
            "--triton-repo",
            str(repo),
            "--triton-backend",
            "python",
            "--name",
            "cait",
            "--max-batch",
            "16",
            "--opt-batch",
            "8",
            "--triton-warmup",
            "--max-queue-delay-us",
            "20000",
        ],
    )  # 20 ms: concurrent requests surely batch
    assert r.exit_code == 0, r.stderr
    import shutil  # a second model in the same repository: the same entry under another name

    shutil.copytree(repo / "cait", repo / "cait_b")
    cfg = repo / "cait_b" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('name: "cait"', 'name: "cait_b"'))
    server = TritonServer(repo, **_ports())
    server.start()
    text = (repo / "cait" / "config.pbtxt").read_text()
    assert "model_warmup [" in text and "max_queue_delay_microseconds: 20000" in text
    yield server, load_model(fused, attn_impl="math")
    prefix, proc = server.shm_prefix, server.proc
    server.stop()
    assert proc.poll() is not None  # no process left
    assert not list(Path("/dev/shm").glob(f"{prefix}*"))  # no shared memory left


def _x(n, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)).numpy()


def test_http_and_grpc_logits_equal_the_fused_model(served):
    import tritonclient.grpc as tg
    import tritonclient.http as th

    server, model = served
    x = _x(3)
    ref = model(torch.from_numpy(x)).detach().numpy()
    hc = th.InferenceServerClient(server.http_url)
    inp = th.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    y_http = hc.infer("cait", [inp]).as_numpy("logits")
    gc = tg.InferenceServerClient(server.grpc_url)
    ginp = tg.InferInput("images", list(x.shape), "FP32")
    ginp.set_data_from_numpy(x)
    y_grpc = gc.infer("cait_b", [ginp]).as_numpy("logits")
    for y in (y_http, y_grpc):
        assert y.shape == ref.shape and np.abs(y - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_concurrent_requests_are_batched_and_counted(served):
    import tritonclient.http as th

    server, _ = served
    n = 24

    def one(i):
        c = th.InferenceServerClient(server.http_url)
        inp = th.InferInput("images", [1, 3, 64, 64], "FP32")
        inp.set_data_from_numpy(_x(1, seed=i))
        return c.infer("cait", [inp]).as_numpy("logits").shape

    before = _stats(server, "cait")
    with cf.ThreadPoolExecutor(12) as pool:
        assert list(pool.map(one, range(n))) == [(1, 10)] * n
    after = _stats(server, "cait")
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == n
    assert executions < inferences, (executions, inferences)  # the dynamic batcher merged requests
    metrics = urllib.request.urlopen(f"http://localhost:{server.metrics_port}/metrics", timeout=5).read().decode()
    count = [ln for ln in metrics.splitlines() if ln.startswith("nv_inference_count{") and 'model="cait"' in ln]
    assert count and float(count[0].rsplit(" ", 1)[1]) >= n


def _stats(server, model):
    body = urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats", timeout=5).read()
    s = json.loads(body)["model_stats"][0]
    return {"inference_count": int(s["inference_count"]), "execution_count": int(s["execution_count"])}


def test_a_broken_model_gives_tritons_reason_in_one_line(tmp_path):
    repo = tmp_path / "repo"
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text(
        'name: "broken"\nbackend: "python"\nmax_batch_size: 1\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
    )
    (repo / "broken" / "1" / "model.py").write_text(
        "class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('weights missing')\n"
    )
    server = TritonServer(repo, **_ports())
    with pytest.raises(CaitError, match=r"model 'broken' failed to load: .*weights missing"):
        server.start(timeout=60)
    assert server.proc.poll() is not None
    assert "\n" not in str(CaitError("x"))


def test_serve_refuses_what_is_not_a_repository(tmp_path):
    r = CliRunner().invoke(main, ["serve", str(tmp_path)])
    assert r.exit_code == 2 and "not a Triton model repository" in r.stderr


def test_loadtest_against_the_live_server(served, tmp_path):
    server, _ = served
    js, md = tmp_path / "lt.json", tmp_path / "lt.md"
    r = CliRunner().invoke(
        main,
        [
            "loadtest",
            f"localhost:{server.http_port}",
            "--model",
            "cait",
            "--model",
            "cait_b",
            "--concurrency",
            "1,4",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "--json",
            str(js),
            "--markdown",
            str(md),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.stderr
    recs = json.loads(js.read_text())
    assert [(x["model"], x["concurrency"]) for x in recs] == [("cait", 1), ("cait", 4), ("cait_b", 1), ("cait_b", 4)]
    for x in recs:
        assert x["requests"] > 0 and x["errors"] == 0 and x["server_executions"] > 0
        assert x["latency_ms_p50"] <= x["latency_ms_p90"] <= x["latency_ms_p99"]
        assert x["throughput_req_s"] == pytest.approx(x["requests"] / x["duration_s"], rel=1e-3)
    assert md.read_text().count("\n| cait") == 4
    bad = CliRunner().invoke(
        main, ["loadtest", f"localhost:{server.http_port}", "--model", "nope", "--duration", "0.2"]
    )
    assert bad.exit_code == 2 and "model 'nope' is not ready" in bad.stderr


def test_bad_requests_fail_alone_while_the_good_ones_batched_with_them_succeed(served):
    """gRPC requests declaring 2^40 rows pass Triton's own checks (the batch size overflows to 0) and reach the
    model without their batch dimension; before model.py checked each request (and config.pbtxt reshaped the
    input so that the Python backend counts their rows as the batcher does), the batch they joined failed."""
    import grpc
    import tritonclient.http as th
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    server, model = served

    def good(i):
        c = th.InferenceServerClient(server.http_url)
        try:
            inp = th.InferInput("images", [1, 3, 64, 64], "FP32")
            inp.set_data_from_numpy(_x(1, seed=i))
            return c.infer("cait", [inp]).as_numpy("logits")
        finally:
            c.close()

    def bad(i):
        req = service_pb2.ModelInferRequest(model_name="cait")
        t = req.inputs.add(name="images", datatype="FP32", shape=[2**40, 3, 64, 64])
        t.contents.fp32_contents.extend(_x(1, seed=i).ravel().tolist())
        with grpc.insecure_channel(server.grpc_url) as ch:
            try:
                service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)
            except grpc.RpcError as e:
                return e.code(), e.details()
        return None

    before = _stats(server, "cait")
    with cf.ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(bad if i % 5 == 0 else good, i) for i in range(60)]
        results = [f.result() for f in futures]
    after = _stats(server, "cait")
    goods = [r for i, r in enumerate(results) if i % 5]
    bads = [r for i, r in enumerate(results) if i % 5 == 0]
    assert len(goods) == 48 and all(r.shape == (1, 10) for r in goods)
    ref = model(torch.from_numpy(_x(1, seed=1))).detach().numpy()
    assert np.abs(goods[0] - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    assert len(bads) == 12
    for r in bads:
        assert r is not None and r[0] == grpc.StatusCode.INVALID_ARGUMENT, r
        assert "input 'images' reached the model without its batch dimension" in r[1]
    executions = after["execution_count"] - before["execution_count"]
    assert executions < 60, executions  # requests were batched, the bad ones with good ones among them


def test_the_server_listens_on_loopback_only(served):
    server, _ = served
    for port in (server.http_port, server.grpc_port, server.metrics_port):
        addrs = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                local, st = line.split()[1], line.split()[3]
                if st == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    addrs.add(local.rsplit(":", 1)[0])
        assert addrs and addrs <= {"0100007F", "0000000000000000FFFF00000100007F"}, (port, addrs)


def test_eval_scores_the_live_model_like_the_fused_file(served, tmp_path):
    """`eval --url` through the load-test client: the served model agrees with the fused file it was exported from."""
    from PIL import Image

    server, _ = served
    rng = np.random.default_rng(0)
    for i in range(6):
        (tmp_path / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((70, 80, 3)) * 255).astype(np.uint8)).save(
            tmp_path / "data" / f"c{i % 2}" / f"{i}.png"
        )
    fused = server.repo.parent / "m.fused.safetensors"
    js = tmp_path / "e.json"
    r = CliRunner().invoke(
        main,
        [
            "eval",
            str(fused),
            "--url",
            f"localhost:{server.http_port}",
            "--model",
            "cait",
            "--data",
            str(tmp_path / "data"),
            "--batch",
            "4",
            "--min-agreement",
            "1.0",
            "--min-cosine",
            "0.9999",
            "--json",
            str(js),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.stderr
    live = json.loads(js.read_text())[1]
    assert live["kind"] == "triton" and live["images"] == 6 and live["agree_top1"] == 1.0 and live["img_per_s"] > 0
    bad = CliRunner().invoke(
        main, ["eval", "--url", f"localhost:{server.http_port}", "--model", "nope", "--data", str(tmp_path / "data")]
    )
    assert bad.exit_code == 2 and "model 'nope' is not ready" in bad.stderr


def test_openvino_in_the_python_backend_serves_the_ir_and_the_onnx(tmp_path):
    """`--triton-backend python-openvino`: model.py runs the OpenVINO IR (with --openvino) or the ONNX file with
    OpenVINO inside a real server; logits equal the fused model, batched requests included."""
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'caitdeploy[openvino]')")
    import tritonclient.http as th

    fused = write_tiny_fused(tmp_path / "m.fused.safetensors")
    repo = tmp_path / "repo"
    common = ["-q", "--no-verify", "--triton-repo", str(repo), "--triton-backend", "python-openvino"]
    common += ["--max-batch", "8", "--opt-batch", "4", "--max-queue-delay-us", "20000"]
    for name, extra in (("ov_ir", ["--openvino"]), ("ov_onnx", [])):
        r = CliRunner().invoke(
            main, ["export", str(fused), "-o", str(tmp_path / f"{name}.onnx"), "--name", name, *common, *extra]
        )
        assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in (repo / "ov_ir" / "1").iterdir()) == ["model.bin", "model.py", "model.xml"]
    assert sorted(p.name for p in (repo / "ov_onnx" / "1").iterdir()) == ["model.onnx", "model.py"]
    assert 'key: "runtime" value: { string_value: "openvino" }' in (repo / "ov_ir" / "config.pbtxt").read_text()
    model = load_model(fused, attn_impl="math")
    server = TritonServer(repo, **_ports())
    server.start()
    try:
        for name in ("ov_ir", "ov_onnx"):

            def one(i, name=name):
                x = _x(1 + i % 3, seed=i)
                c = th.InferenceServerClient(server.http_url)
                inp = th.InferInput("images", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                return x, c.infer(name, [inp]).as_numpy("logits")

            before = _stats(server, name)
            with cf.ThreadPoolExecutor(6) as pool:
                results = list(pool.map(one, range(12)))
            for x, y in results:
                ref = model(torch.from_numpy(x)).detach().numpy()
                assert y.shape == ref.shape and np.abs(y - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), name
            after = _stats(server, name)
            assert after["inference_count"] - before["inference_count"] == sum(1 + i % 3 for i in range(12))
            assert after["execution_count"] - before["execution_count"] < 12  # requests were batched
    finally:
        server.stop()
