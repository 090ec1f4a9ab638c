"""Fixtures and process set-up for every test under tests/; the helpers themselves are in caitdeploy.testing."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run in the interpreter on CPU machines; triton reads this when it is first imported, and
# other tests (torch.compile) may import it before tests/unit/kernels/test_kernels.py does.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker gets its share of the cores: two workers on a 2-core machine each running two
# torch threads would oversubscribe the CPU and make every test slower than running them one after another.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_share)
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

# Helpers tests import live in caitdeploy.testing (benchmarks use them too); their asserts are rewritten as in a test.
pytest.register_assert_rewrite("caitdeploy.testing")

from caitdeploy.testing.checkpoints import random_checkpoint  # noqa: E402
from caitdeploy.testing.cli import one_line_error, run_cli_limited  # noqa: E402, F401 - re-exported


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
