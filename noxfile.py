"""The lint and the two stacks CI tests, each in its own fresh virtual environment (nox; `make lint`, `make test`,
`make test-floor`).

    lint    ruff alone (the version pinned in pyproject's `dev` extra) on the whole tree   .nox/lint
    latest  Python 3.11, what `pip install -e '.[test]'` resolves today       .nox/latest (.venv links to it)
            + mypy on caitdeploy/ first (pinned in the `dev` and `test` extras; settings: pyproject.toml
            [tool.mypy]): a type error fails the leg before pytest runs
    floor   Python 3.12, the lent GPU machine's stack (.ci/floor-constraints.txt)  .nox/floor
            + the wheels gpu-check carries (wheels/gpu), installed offline and imported, and the rehearsal of
            `make gpu-check` on this CPU (benchmarks/gpu_check.py --rehearse), and the AOT compile with its triton

Run one leg: `make lint`, `make test` (latest) or `make test-floor`; arguments after `--` go to pytest, e.g.
`.nox/.runner/bin/nox -s floor -- tests/unit/export/test_int8.py`. Each leg prints the versions it ran.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tomllib

import nox

nox.options.sessions = ["lint", "latest"]
nox.options.error_on_missing_interpreters = True  # a missing Python fails the leg, it is never skipped
if hasattr(nox.options, "download_python"):
    nox.options.download_python = "never"  # no interpreter downloads: these machines reach PyPI only

VERSIONS = (
    "torch",
    "torchvision",
    "triton",
    "numpy",
    "onnxruntime",
    "onnx",
    "onnxscript",
    "onnx-ir",
    "safetensors",
    "timm",
    "polygraphy",
    "onnx-graphsurgeon",
    "tensorrt-rtx-cu13",
    "tritonclient",
    "nvidia-pytriton",
    "pytest",
)
PRINT_VERSIONS = (
    "import sys, platform; from importlib.metadata import version, PackageNotFoundError\n"
    "def v(n):\n    try: return version(n)\n    except PackageNotFoundError: return '-'\n"
    "print('stack: Python ' + platform.python_version() + ', ' + ', '.join(n + ' ' + v(n) for n in "
    "sys.argv[1:]))"
)


def find_python(version: str) -> str:
    """pythonX.Y on PATH if it runs; else pyenv's build of it (pyenv's shim refuses a version that is installed
    but not selected, as on these machines); else the bare version, which nox reports as missing."""
    exe = shutil.which(f"python{version}")
    if exe and subprocess.run([exe, "-c", ""], capture_output=True, check=False).returncode == 0:
        return exe
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = sorted(
        glob.glob(f"{root}/versions/{version}.*/bin/python{version}"),
        key=lambda p: [int(x) for x in p.split("/versions/")[1].split("/")[0].split(".") if x.isdigit()],
    )
    return found[-1] if found else version


def dev_pin(name: str, extra: str = "dev") -> str:
    """`name==X.Y.Z` as pyproject's `dev` extra pins it: the one place a tool's version is written (mypy is pinned
    in the `test` extra too, so the latest leg's environment has it: `extra="test"` reads that one)."""
    with open("pyproject.toml", "rb") as f:
        reqs = tomllib.load(f)["project"]["optional-dependencies"][extra]
    pins = [r for r in reqs if r.replace(" ", "").startswith(f"{name}==")]
    if len(pins) != 1:
        raise ValueError(f"pyproject.toml: the {extra} extra must pin {name} exactly once with ==, found {pins}")
    return pins[0]


def _mypy(session: nox.Session) -> None:
    """mypy (the version the `test` extra installed) on caitdeploy/ (settings: pyproject.toml [tool.mypy])."""
    pin = dev_pin("mypy")
    if dev_pin("mypy", extra="test").replace(" ", "") != pin.replace(" ", ""):
        session.error(f"pyproject.toml: the test extra must pin the dev extra's {pin}")
    session.run("python", "-m", "mypy", "--version")
    session.run("python", "-m", "mypy")


def _pytest(session: nox.Session) -> None:
    session.run("python", "-c", PRINT_VERSIONS, *VERSIONS)
    session.run("python", "-m", "pytest", *(session.posargs or ["-q"]))


@nox.session(python=find_python("3.11"))
def lint(session: nox.Session) -> None:
    """ruff lint and format check on every Python file of the repository (settings: pyproject.toml [tool.ruff]);
    nothing else installed."""
    session.install("--upgrade", "pip")
    pin = dev_pin("ruff")
    with open(".pre-commit-config.yaml") as f:  # the developers' hook runs the same ruff
        hook = re.search(r"ruff-pre-commit\s+rev:\s*v(\S+)", f.read())
    if not hook or f"ruff=={hook.group(1)}" != pin.replace(" ", ""):
        session.error(
            f".pre-commit-config.yaml: the ruff hook's rev must be v{pin.split('==')[1]} ({pin} in pyproject)"
        )
    session.install(pin)
    session.run("ruff", "--version")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=find_python("3.11"))
def latest(session: nox.Session) -> None:
    """The default stack: `pip install -e '.[test]'` on Python 3.11 (what a new user gets); mypy, then pytest."""
    session.install("--upgrade", "pip")
    session.install("-e", ".[test]")
    _mypy(session)
    _pytest(session)


@nox.session(python=find_python("3.12"))
def floor(session: nox.Session) -> None:
    """The GPU machine's stack, then the rehearsal of `make gpu-check` without CUDA."""
    session.install("--upgrade", "pip")
    session.install("-c", ".ci/floor-constraints.txt", "-e", ".[test-floor]")
    _pytest(session)
    if session.posargs:  # a chosen test subset: skip the rehearsal
        return
    session.run("python", "benchmarks/gpu_check.py", "--download-wheels")
    session.run("python", "benchmarks/gpu_check.py", "--rehearse", env={"GPU_CHECK_OUT": "out/gpu-rehearsal"})
    # every kernel for sm_80/86/89/90 with the GPU machine's triton (the rehearsal compiled its sm_90 step)
    session.run(
        "python",
        "-m",
        "caitdeploy.kernels.aot",
        "--quick",
        env={"TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"},
    )
