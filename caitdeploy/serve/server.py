"""Run a real Triton Inference Server on a model repository.

`TritonServer(repo).start()` uses a `tritonserver` on PATH if there is one, else the server bundled in the
`nvidia-pytriton` wheel (Python backend only). For the bundled one it prepares, in a private work folder, a
backend directory with the Python-backend stub matching this interpreter, puts the wheel's libraries and this
interpreter's libpython on LD_LIBRARY_PATH and this venv's bin first on PATH (so the stub finds onnxruntime),
gives the server its own shared-memory prefix, waits until every model of the repository is READY (or reports
Triton's own reason for the first that is not), and on `stop()` terminates it and removes its /dev/shm
segments. Every failure is one CaitError line.

Hostile surroundings:
- HTTP, gRPC and metrics bind 127.0.0.1 unless `host` says otherwise (Triton's own default is 0.0.0.0).
- The server dies with the process that started it: the kernel sends it SIGKILL when that thread dies
  (PR_SET_PDEATHSIG, Linux), SIGKILL of the CLI included. A small watchdog process, which sees the CLI die
  through a pipe closing, then kills what is left of the server's process group (the Python-backend stubs)
  and removes the work folder and shared memory. Names carry host and pid, so whatever a lost watchdog
  leaves is swept by the next start (`sweep_stale_servers`), like `errors.sweep_stale_temps` does for files.
- `serve_forever` restarts a server that dies while serving (one request can abort tritonserver: a bug in
  Triton, not ours), so one crash is not an outage.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import math
import os
import re
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from caitdeploy.core.errors import CaitError, OptionError, _host, _pid_alive

READY_TIMEOUT_S = 120.0
TIMEOUT_RANGE = (1.0, 3600.0)
DEFAULT_HOST = "127.0.0.1"
WORK_PREFIX = "caitdeploy-serve-"  # <tmp>/caitdeploy-serve-<host>-<pid>-<random>
SHM_PREFIX = "caitdeploy_"  # /dev/shm/caitdeploy_<host>-<pid>-<random>_<backend's own name>
SHM_DIR = Path("/dev/shm")
STOP_GRACE_S = 20.0  # SIGTERM, then SIGKILL after this


# ---- addresses and ports ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_host(host: str) -> str:
    """The IPv4 address to bind (`localhost` means 127.0.0.1); OptionError for anything else. No names: Triton
    binds what it is given and what we print must be what it binds. No IPv6: the HTTP server of the bundled
    tritonserver (2.51 in nvidia-pytriton 0.7.0) binds 255.255.255.255 when given `::1` and never answers."""
    text = str(host).strip()
    if text.lower() == "localhost":
        return DEFAULT_HOST
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        raise OptionError(
            "host",
            f"{text!r}: give an IPv4 address of this machine, e.g. 127.0.0.1 (the default) "
            "or 0.0.0.0 for every interface",
        ) from None
    if address.version != 4:
        raise OptionError(
            "host",
            f"{text!r}: give an IPv4 address (tritonserver's HTTP endpoint cannot bind IPv6 "
            "addresses), e.g. 127.0.0.1 or 0.0.0.0",
        )
    return str(address)


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def client_host(host: str) -> str:
    """Where a local client reaches a server bound to `host` (0.0.0.0 means loopback too)."""
    return "127.0.0.1" if host == "0.0.0.0" else host


def port_in_use(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise OptionError("host", f"{host}: not an address of this machine ({e.strerror})") from None
            return True
    return False


def check_ports(ports: dict[str, int], host: str) -> None:
    """Before anything starts: each port in 1..65535, no two the same (Triton would fail later with a line
    about something else), none in use on `host`. `ports`: option name ("http") -> port."""
    for name, port in ports.items():
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise OptionError(f"{name}_port", f"{port!r}: a TCP port is 1..65535")
    names = list(ports)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if ports[a] == ports[b]:
                raise CaitError(f"--{a}-port and --{b}-port are both {ports[a]}: give each its own port")
    for name, port in ports.items():
        if port_in_use(port, host):
            raise CaitError(f"--{name}-port {port}: {host}:{port} is already in use (another server?)")


def check_timeout(timeout: float) -> float:
    lo, hi = TIMEOUT_RANGE
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or not lo <= timeout <= hi
    ):
        raise OptionError("timeout", f"{timeout!r}: seconds to wait for the models, a number in {lo:g}..{hi:g}")
    return float(timeout)


def describe_exit(code: int) -> str:
    """`code -6 (SIGABRT)` for a signal, `code 1` otherwise."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"code {code} ({signal.Signals(-code).name})"
    return f"code {code}"


# ---- repository and server binary ----------------------------------------------------------------------
def check_repository(repo: Path) -> list[str]:
    """Model names of a Triton repository (folders with a config.pbtxt and a numeric version folder)."""
    if not repo.is_dir():
        raise CaitError(f"{repo}: not a folder (a Triton model repository is a folder of model folders)")
    models = []
    for d in sorted(repo.iterdir()):
        if d.is_dir() and (d / "config.pbtxt").is_file() and any(v.is_dir() and v.name.isdigit() for v in d.iterdir()):
            models.append(d.name)
    if not models:
        raise CaitError(
            f"{repo}: not a Triton model repository: no <model>/config.pbtxt with a <model>/<version>/ "
            "folder (write one with `caitdeploy export MODEL --triton-repo DIR`)"
        )
    return models


def find_server() -> tuple[Path, str]:
    """(tritonserver binary, where it came from)."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path), "PATH"
    try:
        import pytriton
    except ImportError:
        raise CaitError(
            "no tritonserver: none on PATH and nvidia-pytriton is not installed "
            "(pip install nvidia-pytriton, or use NVIDIA's Triton server image)"
        ) from None
    binary = Path(pytriton.__file__).parent / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise CaitError(f"nvidia-pytriton is installed but has no server binary at {binary}")
    return binary, f"nvidia-pytriton {getattr(pytriton, '__version__', '')}".strip()


def _bundled_backends(work: Path) -> Path:
    """A backend folder for the bundled server: its python backend plus the stub for this Python (made once
    per work folder; a restart reuses it)."""
    import pytriton

    backends = work / "backends"
    if (backends / "python" / "triton_python_backend_stub").is_file():
        return backends
    dist = Path(pytriton.__file__).parent / "tritonserver"
    stub = dist / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / "triton_python_backend_stub"
    if not stub.is_file():
        raise CaitError(
            f"nvidia-pytriton has no Python-backend stub for Python {sys.version_info[0]}.{sys.version_info[1]}"
        )
    (backends / "python").mkdir(parents=True, exist_ok=True)
    for f in (dist / "backends" / "python").iterdir():
        if f.is_file() and not (backends / "python" / f.name).exists():
            (backends / "python" / f.name).symlink_to(f)
    shutil.copy(stub, backends / "python" / "triton_python_backend_stub")
    return backends


# ---- the server dies with us, and what it leaves goes -------------------------------------------------
def _owner_tag(pid: int | None = None) -> str:
    return f"{_host()}-{os.getpid() if pid is None else pid}-"


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that asks the kernel to SIGKILL the child when the thread that started it dies
    (prctl PR_SET_PDEATHSIG; Linux). None elsewhere: there the watchdog alone cleans up.

    The signal follows the *thread*: start the server from a thread that lives as long as it should."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    ulong = ctypes.c_ulong

    def preexec() -> None:
        prctl(ctypes.c_int(1), ulong(signal.SIGKILL), ulong(0), ulong(0), ulong(0))  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _kill_group(pgid: int | None, sig: int = signal.SIGKILL) -> None:
    """Signal the server's process group (tritonserver and its Python-backend stubs). A group id is not
    reused while any member lives, so this cannot hit a stranger."""
    if pgid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def _remove_shm(prefix: str) -> None:
    for seg in SHM_DIR.glob(f"{prefix}*"):
        with contextlib.suppress(OSError):
            seg.unlink()


def sweep_stale_servers() -> list[Path]:
    """Remove work folders and shared-memory segments that a caitdeploy process on this host, now dead,
    left behind (killed together with its watchdog). Those of live processes are never touched."""
    removed: list[Path] = []
    for folder, prefix in ((Path(tempfile.gettempdir()), WORK_PREFIX), (SHM_DIR, SHM_PREFIX)):
        pat = re.compile("^" + re.escape(prefix + _host()) + r"-(\d+)-")
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            m = pat.match(name)
            if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
                continue
            p = folder / name
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p)
    return removed


def _watchdog(work: str, shm_prefix: str) -> None:
    """The watchdog process: block until the pipe from the CLI closes (it exited or was killed), then kill
    the server's process group if it is still there (its stubs outlive a SIGKILLed tritonserver) and remove
    the work folder and shared memory. On a normal stop there is nothing left to do."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    try:
        pgid = int((Path(work) / "server.pid").read_text())
    except (OSError, ValueError):
        pgid = 0
    _kill_group(pgid)
    _remove_shm(shm_prefix)
    shutil.rmtree(work, ignore_errors=True)


def _start_watchdog(work: Path, shm_prefix: str) -> subprocess.Popen | None:
    env = dict(os.environ)  # the folder that holds the caitdeploy package, whatever the current directory
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    code = "import sys; from caitdeploy.serve.server import _watchdog; _watchdog(sys.argv[1], sys.argv[2])"
    try:
        return subprocess.Popen(
            [sys.executable, "-c", code, str(work), shm_prefix],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )  # Ctrl-C in the terminal is for the CLI, not for it
    except OSError:
        return None  # the next start's sweep is the fallback


# ---- the server -------------------------------------------------------------------------------------
_LOG_NOISE = ("DCGM", "NVML", "CudaDriverHelper", "pinned memory", "failed to load all models", "CUDA driver")
_GLOG = re.compile(r"^[EF]\d{4} [\d:.]+\s+\d+ [^\]]*\] ?")


@dataclass
class TritonServer:
    """A tritonserver process on `repo`; use as a context manager or start()/stop().

    host: the address HTTP, gRPC and metrics bind (IPv4; 127.0.0.1 by default, 0.0.0.0 for every interface)."""

    repo: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    models: list[str] = field(default_factory=list)
    source: str = ""
    host: str = DEFAULT_HOST

    def __post_init__(self) -> None:
        self.repo = Path(self.repo)
        self.host = parse_host(self.host)
        self.shm_prefix = ""
        self._work: Path | None = None
        self._watch: subprocess.Popen | None = None
        self._binary: Path | None = None
        self._starts = 0
        self._reaped = 0
        self.log_path: Path | None = None
        self.restarts = 0

    @property
    def http_url(self) -> str:
        """host:port where a client on this machine reaches the HTTP endpoint."""
        return f"{client_host(self.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{client_host(self.host)}:{self.grpc_port}"

    @property
    def ports(self) -> dict[str, int]:
        return {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port}

    def _env_and_args(self, binary: Path, work: Path) -> tuple[dict[str, str], list[str]]:
        env = dict(os.environ)
        args = [
            str(binary),
            f"--model-repository={self.repo.resolve()}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--exit-on-error=false",
            "--strict-readiness=true",
            "--exit-timeout-secs=10",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        if self.source != "PATH":
            libs = Path(binary).parents[3] / "nvidia_pytriton.libs"
            lib_dirs = [str(libs), sysconfig.get_config_var("LIBDIR") or ""]
            env["LD_LIBRARY_PATH"] = ":".join([d for d in lib_dirs if d] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
            env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
            args += [f"--backend-directory={_bundled_backends(work)}", f"--cache-directory={work}"]
        return env, args + list(self.extra_args)

    def start(self, timeout: float = READY_TIMEOUT_S) -> Self:
        """Check everything, start the server and wait until every model is READY, at most `timeout` s."""
        timeout = check_timeout(timeout)
        t0 = time.monotonic()
        self.models = check_repository(self.repo)
        check_ports(self.ports, self.host)
        self._binary, self.source = find_server()
        sweep_stale_servers()
        self._work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX + _owner_tag()))
        try:
            self._watch = _start_watchdog(self._work, SHM_PREFIX + _owner_tag())
            self._launch()
            self._wait_ready(t0 + timeout, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self) -> None:
        """Start one tritonserver process (a fresh shared-memory prefix and log each time)."""
        self._starts += 1
        self.shm_prefix = f"{SHM_PREFIX}{_owner_tag()}{uuid.uuid4().hex[:8]}_"
        work = self._work
        assert self._binary is not None and work is not None, "_launch runs inside start()"
        env, args = self._env_and_args(self._binary, work)
        self.log_path = work / f"tritonserver-{self._starts}.log"
        with open(self.log_path, "wb") as log:  # the server keeps its own descriptor
            try:
                self.proc = subprocess.Popen(
                    args,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # Ctrl-C reaches the CLI only: it stops the server
                    preexec_fn=_die_with_parent(),  # noqa: PLW1509 - prctl in the child; no other way to set it
                )
            except OSError as e:
                raise CaitError(f"{self._binary}: cannot start ({e.strerror})") from None
        (work / "server.pid").write_text(str(self.proc.pid))  # for the watchdog

    def _get(self, path: str, data: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=data, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def repository_index(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        status, body = self._get("/v2/repository/index", b"{}", timeout)
        return json.loads(body) if status == 200 else []

    def _load_problem(self, index: list[dict[str, Any]]) -> str | None:
        """Why a model will not become READY, or None while all is well. The endpoints come up only after
        the repository is loaded, so once the index answers, a model neither READY nor LOADING has failed
        (a config Triton cannot parse leaves the model in the index with no state at all)."""
        states = {m.get("name"): m for m in index}
        for name in self.models:
            m = states.get(name)
            state = (m or {}).get("state")
            if state in ("READY", "LOADING"):
                continue
            reason = (m or {}).get("reason") or self.log_tail(about=name)
            return f"model {name!r} failed to load: {reason}"
        return None

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        assert self.proc is not None, "_wait_ready runs after _launch"
        while True:
            left = deadline - time.monotonic()
            if self.proc.poll() is not None:
                raise CaitError(f"tritonserver exited with {describe_exit(self.proc.returncode)}: {self.log_tail()}")
            if left <= 0:
                raise CaitError(
                    f"tritonserver did not become ready within the timeout of {timeout:g} s (a "
                    f"larger --timeout gives slow models longer): {self.log_tail()}"
                )
            try:
                index = self.repository_index(timeout=max(0.1, min(2.0, left)))
            except (urllib.error.URLError, ConnectionError, OSError, json.JSONDecodeError):
                time.sleep(min(0.2, max(left, 0)))
                continue
            problem = self._load_problem(index)
            if problem:
                raise CaitError(problem)
            states = {m.get("name"): m.get("state") for m in index}
            if all(states.get(n) == "READY" for n in self.models):
                with contextlib.suppress(urllib.error.URLError, OSError):
                    if self._get("/v2/health/ready", timeout=max(0.1, min(2.0, left)))[0] == 200:
                        return
            time.sleep(min(0.2, max(left, 0)))

    def log_tail(self, n: int = 400, about: str | None = None) -> str:
        """Triton's most telling log line: the last error (one about model `about` first), glog prefix and
        the GPU-less machine's noise (DCGM, NVML, CUDA) left out; else the last line."""
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        errors = [
            _GLOG.sub("", ln).strip().strip('"')
            for ln in lines
            if (_GLOG.match(ln) or "ERROR" in ln[:20] or ln.startswith("terminate called"))
            and not any(k in ln for k in _LOG_NOISE)
        ]
        if about:
            errors = [e for e in errors if f"'{about}'" in e or f'"{about}"' in e] or errors
        quiet = [ln for ln in lines if not any(k in ln for k in _LOG_NOISE)]
        return (errors[-1] if errors else (quiet or lines or [""])[-1])[-n:]

    def serve_forever(self, timeout: float = READY_TIMEOUT_S, log: Callable[[str], None] = print) -> None:
        """Block while the server serves. If it dies (one request can abort tritonserver: a bug in Triton),
        log one line with its exit code and start it again, ready within `timeout` s, so one crash is not
        an outage. There is no limit on restarts: a client that keeps crashing it must not end the service
        for everyone (each restart takes a second or two, which bounds what it costs). A server that does
        not come back is a CaitError. Returns only by exception (Ctrl-C, SIGTERM's SystemExit)."""
        assert self.proc is not None, "serve_forever runs after start()"
        while True:
            while self.proc.poll() is None:
                time.sleep(0.2)
            code, why = self.proc.returncode, self.log_tail()
            t0 = time.monotonic()
            self._reap()
            try:
                self._launch()
                self._wait_ready(t0 + timeout, timeout)
            except CaitError as e:
                raise CaitError(
                    f"tritonserver exited with {describe_exit(code)} ({why}) and did not come back: {e}"
                ) from None
            self.restarts += 1
            log(
                f"tritonserver exited with {describe_exit(code)} while serving ({why}); restarted it, ready again "
                f"in {time.monotonic() - t0:.1f} s (restart {self.restarts})"
            )

    def _reap(self) -> None:
        """After the server process is gone: its stubs and its shared memory go too."""
        if self.proc is not None and self.proc.pid != self._reaped:
            _kill_group(self.proc.pid)  # no need to wait: nothing of theirs blocks a restart
            self._reaped = self.proc.pid  # once: the group id is free for others afterwards
        if self.shm_prefix:
            _remove_shm(self.shm_prefix)

    def stop(self) -> None:
        """Terminate the server (SIGKILL after STOP_GRACE_S, or at once on a second Ctrl-C), remove its
        shared memory and work folder, and end the watchdog."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                _kill_group(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=STOP_GRACE_S)
                except (subprocess.TimeoutExpired, KeyboardInterrupt):
                    _kill_group(self.proc.pid)
                    self.proc.wait(timeout=10)
            self._reap()
        finally:
            if self._work is not None:
                shutil.rmtree(self._work, ignore_errors=True)
                self._work = None
            if self._watch is not None:
                with contextlib.suppress(OSError):
                    if self._watch.stdin is not None:  # always: _start_watchdog opens it with stdin=PIPE
                        self._watch.stdin.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._watch.wait(timeout=10)
                self._watch = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
