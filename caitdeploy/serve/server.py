"""Run a real Triton Inference Server on a model repository.

`TritonServer(repo).start()` uses a `tritonserver` on PATH if there is one, else the server bundled in the
`nvidia-pytriton` wheel (Python backend only). For the bundled one it prepares, in a private work folder, a
backend directory with the Python-backend stub matching this interpreter, puts the wheel's libraries and this
interpreter's libpython on LD_LIBRARY_PATH and this venv's bin first on PATH (so the stub finds onnxruntime),
gives the server its own shared-memory prefix, waits until every model of the repository is READY (or reports
Triton's own reason for the first that is not), and on `stop()` terminates it and removes its /dev/shm
segments. Every failure is one CaitError line.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CaitError

READY_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def check_repository(repo: Path) -> list[str]:
    """Model names of a Triton repository (folders with a config.pbtxt and a numeric version folder)."""
    if not repo.is_dir():
        raise CaitError(f"{repo}: not a folder (a Triton model repository is a folder of model folders)")
    models = []
    for d in sorted(repo.iterdir()):
        if d.is_dir() and (d / "config.pbtxt").is_file() and any(v.is_dir() and v.name.isdigit() for v in d.iterdir()):
            models.append(d.name)
    if not models:
        raise CaitError(f"{repo}: not a Triton model repository: no <model>/config.pbtxt with a <model>/<version>/ "
                        "folder (write one with `caitdeploy export MODEL --triton-repo DIR`)")
    return models


def find_server() -> tuple[Path, str]:
    """(tritonserver binary, where it came from)."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path), "PATH"
    try:
        import pytriton
    except ImportError:
        raise CaitError("no tritonserver: none on PATH and nvidia-pytriton is not installed "
                        "(pip install nvidia-pytriton, or use NVIDIA's Triton server image)") from None
    binary = Path(pytriton.__file__).parent / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise CaitError(f"nvidia-pytriton is installed but has no server binary at {binary}")
    return binary, f"nvidia-pytriton {getattr(pytriton, '__version__', '')}".strip()


def _bundled_backends(work: Path) -> Path:
    """A backend folder for the bundled server: its python backend plus the stub for this Python."""
    import pytriton

    dist = Path(pytriton.__file__).parent / "tritonserver"
    stub = dist / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / "triton_python_backend_stub"
    if not stub.is_file():
        raise CaitError(f"nvidia-pytriton has no Python-backend stub for Python {sys.version_info[0]}."
                        f"{sys.version_info[1]}")
    backends = work / "backends"
    (backends / "python").mkdir(parents=True)
    for f in (dist / "backends" / "python").iterdir():
        if f.is_file():
            (backends / "python" / f.name).symlink_to(f)
    shutil.copy(stub, backends / "python" / "triton_python_backend_stub")
    return backends


@dataclass
class TritonServer:
    """A tritonserver process on `repo`; use as a context manager or start()/stop()."""

    repo: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    models: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        self.repo = Path(self.repo)
        self.shm_prefix = f"caitdeploy_{uuid.uuid4().hex[:12]}_"
        self._work: tempfile.TemporaryDirectory | None = None
        self.log_path: Path | None = None

    @property
    def http_url(self) -> str:
        return f"localhost:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    def _env_and_args(self, binary: Path, work: Path) -> tuple[dict[str, str], list[str]]:
        env = dict(os.environ)
        args = [str(binary), f"--model-repository={self.repo.resolve()}", f"--http-port={self.http_port}",
                f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}", "--exit-on-error=false",
                "--strict-readiness=true", "--exit-timeout-secs=10", f"--log-verbose={self.log_verbose}",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}"]
        if self.source != "PATH":
            libs = Path(binary).parents[3] / "nvidia_pytriton.libs"
            lib_dirs = [str(libs), sysconfig.get_config_var("LIBDIR") or ""]
            env["LD_LIBRARY_PATH"] = ":".join([d for d in lib_dirs if d] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
            env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
            args += [f"--backend-directory={_bundled_backends(work)}", f"--cache-directory={work}"]
        return env, args + list(self.extra_args)

    def start(self, timeout: float = READY_TIMEOUT_S) -> "TritonServer":
        self.models = check_repository(self.repo)
        for name, port in (("http", self.http_port), ("grpc", self.grpc_port), ("metrics", self.metrics_port)):
            if port_in_use(port):
                raise CaitError(f"--{name}-port {port}: the port is in use")
        binary, self.source = find_server()
        self._work = tempfile.TemporaryDirectory(prefix="caitdeploy-serve-")
        work = Path(self._work.name)
        env, args = self._env_and_args(binary, work)
        self.log_path = work / "tritonserver.log"
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            self.stop()
            raise CaitError(f"{binary}: cannot start ({e.strerror})") from None
        finally:
            log.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _get(self, path: str, data: bytes | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=data, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def repository_index(self) -> list[dict[str, Any]]:
        status, body = self._get("/v2/repository/index", b"{}")
        return json.loads(body) if status == 200 else []

    def _wait_ready(self, timeout: float) -> None:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise CaitError(f"tritonserver exited with code {self.proc.returncode}: {self.log_tail()}")
            try:
                index = self.repository_index()
            except (urllib.error.URLError, ConnectionError, OSError, json.JSONDecodeError):
                time.sleep(0.2)
                continue
            states = {m.get("name"): m for m in index}
            bad = [m for m in states.values() if m.get("state") == "UNAVAILABLE"]
            if bad:
                m = bad[0]
                raise CaitError(f"model {m.get('name')!r} failed to load: {m.get('reason') or self.log_tail()}")
            if self.models and all(states.get(n, {}).get("state") == "READY" for n in self.models):
                status, _ = self._get("/v2/health/ready")
                if status == 200:
                    return
            time.sleep(0.2)
        raise CaitError(f"tritonserver did not become ready in {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, n: int = 400) -> str:
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and (" E" in ln[:2] or "rror" in ln)]
        return (lines[-1] if lines else (text.strip().splitlines() or [""])[-1])[-n:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        for seg in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            try:
                seg.unlink()
            except OSError:
                pass
        if self._work is not None:
            self._work.cleanup()
            self._work = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
