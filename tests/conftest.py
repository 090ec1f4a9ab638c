"""Shared test helpers: CAIT checkpoints built from random weights (no downloads)."""
from __future__ import annotations

import math
import os

import pytest
import torch

# Triton kernels run in the interpreter on CPU machines; triton reads this when it is first imported, and
# other tests (torch.compile) may import it before tests/test_kernels.py does.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker gets its share of the cores: two workers on a 2-core machine each running two
# torch threads would oversubscribe the CPU and make every test slower than running them one after another.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_share)
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

from caitdeploy.families.vit.config import CaitConfig
from caitdeploy.families.vit.model import CaitViT
from caitdeploy.formats.checkpoint import FORMAT, MERGE_KEY


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return q


def random_checkpoint(*, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0, img_size=32, patch_size=8,
                      num_classes=10, merges=None, qkv_bias=True, keep=0.6, seed=0, dropped_scale=0.0,
                      qk_differs=False, unequal_heads=False) -> dict:
    """A `cait-compactor/1` dict with random weights, random orthogonal compactors and CDCP-like masks.

    keep: fraction of channels kept (same count in every head, same q/k positions) unless
    qk_differs / unequal_heads break attention-/head-level consistency on purpose.
    dropped_scale: norm scale of the dropped compactor rows (0 = exactly zero, as converged CDCP leaves them).
    """
    g = torch.Generator().manual_seed(seed)
    merges = merges or {}
    fmt = {"img_size": img_size, "patch_size": patch_size, "in_chans": 3, "num_classes": num_classes,
           "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio,
           "qkv_bias": qkv_bias, "merges": {str(k): v for k, v in merges.items()}}
    cfg = CaitConfig.from_format({**fmt, "merges": merges})
    torch.manual_seed(seed)
    model = CaitViT(cfg)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("weight") and v.dim() >= 2:
            fan_in = v[0].numel()
            sd[k] = torch.randn(v.shape, generator=g) / math.sqrt(fan_in)
        elif "norm" in k and k.endswith("weight"):
            sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
    sd["head.weight"] *= 8  # a real logit spread, so top-1 comparisons mean something
    for i, kind in merges.items():
        sd[f"blocks.{i}.{MERGE_KEY[kind]}.fc.weight"] = sd.pop(f"blocks.{i}.merge.fc.weight")
        sd[f"blocks.{i}.{MERGE_KEY[kind]}.fc.bias"] = sd.pop(f"blocks.{i}.merge.fc.bias")
    d = embed_dim // num_heads
    hidden = int(embed_dim * mlp_ratio)
    for i in range(depth):
        n_keep = max(1, round(keep * d))
        masks = {}
        qk = torch.zeros(num_heads, d)
        for h in range(num_heads):
            n = n_keep - (1 if unequal_heads and h == 1 else 0)
            qk[h, torch.randperm(d, generator=g)[:n]] = 1
        masks["q"] = qk
        masks["k"] = qk.clone()
        if qk_differs:
            row = masks["k"][0]
            on, off = row.nonzero()[0], (row == 0).nonzero()[0]
            row[on], row[off] = 0, 1
        v = torch.zeros(num_heads, d)
        for h in range(num_heads):
            v[h, torch.randperm(d, generator=g)[: max(1, round(0.8 * keep * d))]] = 1
        masks["v"] = v
        f = torch.zeros(hidden)
        f[torch.randperm(hidden, generator=g)[: max(1, round(keep * hidden))]] = 1
        masks["fc1"] = f
        for name in ("q", "k", "v"):
            c = torch.stack([_orthogonal(d, g) for _ in range(num_heads)])
            m = masks[name].unsqueeze(-1)
            c = c * m + dropped_scale * torch.randn(c.shape, generator=g) / math.sqrt(d) * (1 - m)
            sd[f"blocks.{i}.attn.{name}_compactor.weight"] = c
            sd[f"blocks.{i}.attn.{name}_compactor.mask"] = masks[name]
        c = _orthogonal(hidden, g)
        m = masks["fc1"].unsqueeze(-1)
        sd[f"blocks.{i}.mlp.fc1_compactor.weight"] = c * m + dropped_scale * torch.randn(c.shape, generator=g) / math.sqrt(hidden) * (1 - m)
        sd[f"blocks.{i}.mlp.fc1_compactor.mask"] = masks["fc1"]
    return {"format": FORMAT, "config": fmt, "state_dict": sd}


@pytest.fixture
def make_ckpt(tmp_path):
    """Write a random checkpoint to tmp_path and return its path."""

    def _make(name="ckpt.pth", **kw):
        path = tmp_path / name
        ckpt = random_checkpoint(**kw)
        if path.suffix == ".safetensors":
            from caitdeploy.compress.cdcp import save_checkpoint_dict
            save_checkpoint_dict(ckpt, path)
        else:
            torch.save(ckpt, path)
        return path

    return _make


def run_cli_limited(cases: dict[str, list[str]], cwd, address_space: int = 4 << 30, timeout: float = 600):
    """Each case's CLI args through the real CLI in ONE fresh process under RLIMIT_AS = `address_space` (imports
    paid once). Returns ({name: (exit code, stderr, seconds)}, peak RSS of that process in KiB (VmHWM))."""
    import json
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import json, resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, ({address_space}, {address_space}))
        from click.testing import CliRunner
        from caitdeploy.cli.main import main
        out = {{}}
        for name, args in {cases!r}.items():
            t0 = time.perf_counter()
            r = CliRunner().invoke(main, args)
            out[name] = [r.exit_code, r.stderr, time.perf_counter() - t0]
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent (the pytest process)
        hwm = [int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
        print(json.dumps([out, hwm]))
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    out, peak = json.loads(p.stdout.strip().splitlines()[-1])
    return {k: tuple(v) for k, v in out.items()}, peak


def one_line_error(res, pattern: str | None = None, code: int = 2) -> str:
    """The error contract of every command: exit `code`, exactly one non-empty stderr line, starting with
    'error: ' (or, for exit 1, 'internal error'), no traceback; `pattern` searched in that line."""
    import re

    assert res.exit_code == code, (res.exit_code, res.output, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") or (code == 1 and lines[0].startswith("internal error")), lines[0]
    assert "Traceback" not in res.output
    if pattern is not None:
        assert re.search(pattern, lines[0]), lines[0]
    return lines[0]
