"""Launching NVIDIA Triton Inference Server from the pip-installed ``nvidia-pytriton`` wheel.

The wheel ships a real ``tritonserver`` binary, the Python backend and one backend stub per Python
version, but not as a directory layout the server can use directly: the stub lives apart from the
backend, and the binary needs the wheel's bundled shared libraries on ``LD_LIBRARY_PATH``. This module
finds those pieces, assembles a backend directory, and runs the server as a child process bound to
loopback, with every model loaded at startup and nothing loadable afterwards.

Typical use::

    with TritonServer(repo) as server:     # picks free ports, waits until ready
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TextIO

__all__ = [
    "ServerStartError",
    "TritonDist",
    "TritonNotFoundError",
    "TritonServer",
    "default_backend_dir",
    "execution_env_path",
    "fill_template",
    "find_triton_dist",
    "free_port",
    "prepare_backend_dir",
]

INSTALL_HINT = (
    "install it into this environment with `pip install nvidia-pytriton==0.7.0` (it ships tritonserver "
    "2.51 with the Python backend), or set MMGPT_TRITON_HOME to a Triton install directory such as "
    "/opt/tritonserver in NVIDIA's tritonserver container"
)

# Files of the Python backend that go into <backend dir>/python/ next to the stub.
_PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_STUB_NAME = "triton_python_backend_stub"
# Shared with the entry point (mmgpt.serving.contract): the drain marker at the repository's root, and the
# folder in a model's directory where each instance keeps a file (holding its pid) while it answers. (Not a
# folder at the root: Triton would take it for a model.)
DRAIN_FILE = ".draining"
ENTRY_BUSY_DIR = "busy"
ADMIN_HEADER = "mmgpt-admin-key"  # the header that unlocks the model-repository API of a supervised server


def proc_stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command (state, ppid, pgrp, ...; rss is [21]); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()  # the command may hold spaces and parentheses


def process_alive(pid: int) -> bool:
    """Is process `pid` running (not gone, not a zombie)?"""
    fields = proc_stat(pid)
    return bool(fields) and fields[0] != "Z"


def group_processes(pgid: int) -> dict[int, list[str]]:
    """pid -> stat fields (`proc_stat`) of every process in process group `pgid`."""
    found = {}
    for entry in Path("/proc").iterdir():
        fields = proc_stat(entry.name) if entry.name.isdigit() else None
        if fields and len(fields) > 2 and int(fields[2]) == pgid:
            found[int(entry.name)] = fields
    return found


def metric_total(url: str, name: str, timeout: float = 5.0) -> float | None:
    """Sum of a Prometheus family's samples at `url` (0 if absent); None if it cannot be read."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})?\s+(\S+)$", text, re.M))


class TritonNotFoundError(RuntimeError):
    """A part of the Triton server installation is missing."""


class ServerStartError(RuntimeError):
    """The server process died or did not become ready; the message ends with the server log's tail."""


# --------------------------------------------------------------------------------------------------
# Locating the installation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TritonDist:
    """Where the pieces of one Triton installation are."""

    server_bin: Path  # the tritonserver executable
    python_backend_dir: Path  # holds libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub built for this Python version
    libs_dir: Path | None  # shared libraries the binaries need (None: the system provides them)
    caches_dir: Path | None  # response-cache implementations (optional)


def _python_version() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def _pytriton_root() -> Path | None:
    # find_spec does not import pytriton (which would pull in its whole client stack).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_triton_dist(
    pytriton_root: Path | None = None,
    *,
    python_version: str | None = None,
    triton_home: Path | None = None,
) -> TritonDist:
    """Find tritonserver, the Python backend, its stub for ``python_version`` and the shared libs.

    Looks in ``triton_home`` (or ``$MMGPT_TRITON_HOME``) when given, a classic install tree with
    ``bin/tritonserver`` and ``backends/python/``; otherwise in the installed ``pytriton`` package
    (``pytriton_root`` overrides where that is, for tests). Raises TritonNotFoundError naming each
    missing piece and what to install.
    """
    version = python_version or _python_version()
    home = triton_home or (
        Path(os.environ["MMGPT_TRITON_HOME"]) if os.environ.get("MMGPT_TRITON_HOME") else None
    )
    if home is not None:
        home = home.resolve()
        dist = TritonDist(
            server_bin=home / "bin" / "tritonserver",
            python_backend_dir=home / "backends" / "python",
            stub=home / "backends" / "python" / _STUB_NAME,
            libs_dir=(home / "lib") if (home / "lib").is_dir() else None,
            caches_dir=(home / "caches") if (home / "caches").is_dir() else None,
        )
        where = f"Triton install {home} (MMGPT_TRITON_HOME)"
    else:
        root = pytriton_root or _pytriton_root()
        if root is None:
            raise TritonNotFoundError(
                f"the `pytriton` package is not installed in {sys.prefix}: {INSTALL_HINT}"
            )
        root = root.resolve()
        dist_dir = root / "tritonserver"
        # Wheel installs put the bundled libraries next to the package; an editable checkout keeps them
        # inside it (the same rule pytriton itself follows).
        libs = root.parent / "nvidia_pytriton.libs"
        if not libs.is_dir() and (dist_dir / "external_libs").is_dir():
            libs = dist_dir / "external_libs"
        dist = TritonDist(
            server_bin=dist_dir / "bin" / "tritonserver",
            python_backend_dir=dist_dir / "backends" / "python",
            stub=dist_dir / "python_backend_stubs" / version / _STUB_NAME,
            libs_dir=libs,
            caches_dir=(dist_dir / "caches") if (dist_dir / "caches").is_dir() else None,
        )
        where = f"pytriton package at {root}"

    missing: list[str] = []
    if not dist.server_bin.is_file():
        missing.append(f"tritonserver binary ({dist.server_bin})")
    for name in _PYTHON_BACKEND_FILES:
        if not (dist.python_backend_dir / name).is_file():
            missing.append(f"Python backend file {name} ({dist.python_backend_dir / name})")
    if not dist.stub.is_file():
        missing.append(f"Python backend stub for Python {version} ({dist.stub})")
    if dist.libs_dir is not None and not dist.libs_dir.is_dir():
        missing.append(f"shared libraries directory nvidia_pytriton.libs ({dist.libs_dir})")
    if missing:
        raise TritonNotFoundError(
            f"{where} is incomplete; missing: " + "; ".join(missing) + f". To fix: {INSTALL_HINT}"
        )
    return dist


# --------------------------------------------------------------------------------------------------
# Backend directory
# --------------------------------------------------------------------------------------------------


def _fingerprint(paths: Sequence[Path]) -> str:
    # Path, size and mtime identify the installed files well enough to tell a stale copy from a good one
    # without hashing megabytes on every start.
    items = []
    for p in paths:
        st = p.stat()
        items.append([str(p), st.st_size, st.st_mtime_ns])
    return json.dumps(items)


def default_backend_dir(dist: TritonDist | None = None) -> Path:
    """A per-user cache location for the assembled backend directory, keyed by installation and Python."""
    dist = dist or find_triton_dist()
    key = hashlib.sha256(f"{dist.python_backend_dir}|{dist.stub}".encode()).hexdigest()[:12]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    try:
        base.mkdir(parents=True, exist_ok=True)
        if not os.access(base, os.W_OK):
            raise PermissionError(base)
    except OSError:
        base = Path(tempfile.gettempdir())
    return base / "mmgpt" / "triton-backends" / f"py{_python_version()}-{key}"


def prepare_backend_dir(dest: Path | str | None = None, dist: TritonDist | None = None) -> Path:
    """Assemble ``dest/python/`` = the Python backend files + the stub for this Python; return ``dest``.

    Reuses an existing assembly made from the same installed files, so calling it on every start is
    cheap. Safe against concurrent callers: each builds in a private temporary directory and renames
    it into place; the loser of the race keeps the winner's copy.
    """
    dist = dist or find_triton_dist()
    dest = Path(dest) if dest is not None else default_backend_dir(dist)
    dest = dest.resolve()
    target = dest / "python"
    sources = [dist.python_backend_dir / n for n in _PYTHON_BACKEND_FILES] + [dist.stub]
    stamp = _fingerprint(sources)
    marker = target / ".mmgpt-source"

    def is_current() -> bool:
        return (
            marker.is_file()
            and marker.read_text() == stamp
            and all((target / p.name).is_file() for p in sources)
        )

    if is_current():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".python-", dir=dest))
    try:
        for src in sources:
            shutil.copy2(src, tmp / src.name)
        (tmp / _STUB_NAME).chmod(0o755)
        (tmp / ".mmgpt-source").write_text(stamp)
        if target.exists() and not is_current():
            # A stale assembly (the wheel was upgraded): move it aside, then replace it.
            stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=dest))
            with contextlib.suppress(OSError):
                target.rename(stale / "python")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            if not is_current():  # somebody else's rename won but their copy is not what we need
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def execution_env_path() -> Path:
    """The virtual environment to pass as the Python backend's ``EXECUTION_ENV_PATH`` parameter.

    The backend stub runs its own embedded interpreter in isolated mode and does not see this venv;
    with EXECUTION_ENV_PATH set to a venv directory the backend sources its ``bin/activate`` first.
    """
    prefix = Path(sys.prefix)
    if sys.prefix == sys.base_prefix or not (prefix / "bin" / "activate").is_file():
        raise RuntimeError(
            f"{prefix} is not a virtual environment with bin/activate; the Python backend needs one as "
            "EXECUTION_ENV_PATH (run from the project's .venv, e.g. `make install`)"
        )
    return prefix


_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Characters that would end or corrupt a double-quoted pbtxt string or split a line.
_UNSAFE_VALUE = re.compile(r'["\\\n\r]')


def fill_template(text: str, values: Mapping[str, Any]) -> str:
    """Substitute ``${name}`` placeholders in a config.pbtxt template.

    Fails loudly, like Triton's own fill_template.py, on a placeholder without a value, on a value
    whose key does not occur in the template (a typo would otherwise silently keep a default), on a
    malformed ``${...}``, and on a value that would break a quoted pbtxt string. Booleans become
    ``true``/``false``.
    """
    used = set(_PLACEHOLDER.findall(text))
    missing = sorted(used - set(values))
    if missing:
        raise ValueError(f"template placeholder(s) with no value: {', '.join(missing)}")
    unknown = sorted(set(values) - used)
    if unknown:
        raise ValueError(f"value(s) given for key(s) not in the template: {', '.join(unknown)}")
    leftover = _PLACEHOLDER.sub("", text)
    if "${" in leftover:
        bad = leftover[leftover.index("${") :].split("\n", 1)[0][:40]
        raise ValueError(f"malformed placeholder in template: {bad!r}")

    def render(key: str) -> str:
        value = values[key]
        s = ("true" if value else "false") if isinstance(value, bool) else str(value)
        if _UNSAFE_VALUE.search(s):
            raise ValueError(f"value for {key!r} contains a quote, backslash or newline: {s!r}")
        return s

    return _PLACEHOLDER.sub(lambda m: render(m.group(1)), text)


def _tail(path: Path | None, max_lines: int = 60) -> str:
    if path is None or not path.exists():
        return "(no server log)"
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 64 * 1024))
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    return "\n".join(lines[-max_lines:])


def _missing_libs(binary: Path, env: Mapping[str, str]) -> list[str]:
    """Shared libraries ``binary`` needs that the loader cannot find (empty if ldd is unavailable)."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return []
    try:
        out = subprocess.run(
            [ldd, str(binary)], env=dict(env), capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split("=>")[0].strip() for line in out.splitlines() if "not found" in line]


def _make_pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn that makes the child receive SIGTERM when the launching thread dies.

    Without it, a test run or `make serve` killed with SIGKILL leaves tritonserver running and holding
    its ports. Linux-only; the libc lookup happens here, in the parent, so the child only makes a call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


# --------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------


class TritonServer:
    """One tritonserver process on a model repository; a context manager that always stops it.

    Ports left as None are picked free at construction, so ``command()`` and the URLs are known before
    ``start()``. ``grpc_url`` and ``http_url`` are ``host:port`` strings as tritonclient.grpc and
    tritonclient.http take them; ``health_url`` and ``metrics_url`` are full http:// URLs.
    """

    def __init__(
        self,
        model_repository: Path | str,
        *,
        host: str = "127.0.0.1",
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        log_file: Path | str | None = None,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
        backend_dir: Path | str | None = None,
        dist: TritonDist | None = None,
        env: Mapping[str, str] | None = None,
        # Triton unloads the instances of a Python model one after another, ~1 s each (measured on 2.51);
        # the served repository's entry point has 8, so a clean stop needs more than Triton's default 10 s.
        exit_timeout_s: int = 30,
        die_with_parent: bool = True,
        # Restart a model whose Python process died (see `_supervise`). Needs the model-control API,
        # which is then locked behind a header only this object knows.
        supervise: bool = True,
        out: TextIO | None = None,  # where the supervisor says what it did (default: the server log)
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"model repository {self.model_repository} does not exist")
        self.host = host
        ports = [p for p in (grpc_port, http_port, metrics_port) if p is not None]
        picked: list[int] = []
        while len(picked) < 3 - len(ports):
            # Distinct from each other and from the fixed ones; free_port alone could repeat itself.
            p = free_port("127.0.0.1")
            if p not in picked and p not in ports:
                picked.append(p)
        it = iter(picked)
        self.grpc_port = grpc_port if grpc_port is not None else next(it)
        self.http_port = http_port if http_port is not None else next(it)
        self.metrics_port = metrics_port if metrics_port is not None else next(it)
        if log_file is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            log_file = name
        self.log_file = Path(log_file).resolve()
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)
        self.dist = dist or find_triton_dist()
        self._backend_dir_arg = Path(backend_dir) if backend_dir is not None else None
        self._env_overrides = dict(env or {})
        self.exit_timeout_s = exit_timeout_s
        self.die_with_parent = die_with_parent
        # Python-backend shared-memory regions in /dev/shm are named <prefix><uuid>. A server that is
        # killed leaves them behind; a prefix of our own lets stop() remove exactly those.
        self.shm_prefix = f"mmgpt_{os.getpid()}_{secrets.token_hex(4)}_"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_handle: Any = None
        self._backend_dir: Path | None = None
        self.supervise = supervise
        self._admin_key = secrets.token_hex(16)
        self._out = out
        self._stopping = threading.Event()
        self._proc_lock = threading.Lock()  # the supervisor replaces _proc when it restarts the server
        self._supervisor: threading.Thread | None = None
        self.restarts: list[tuple[str, int]] = []  # (model, pid of the process that died), oldest first
        self.recovering = threading.Event()  # set while the supervisor reloads a model or restarts the server

    # -- addresses -------------------------------------------------------------------------------

    @property
    def client_host(self) -> str:
        """The address clients use: loopback when the server listens on all interfaces."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "", "localhost") else self.host

    @property
    def grpc_url(self) -> str:
        return f"{self.client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.client_host}:{self.http_port}"

    @property
    def health_url(self) -> str:
        return f"http://{self.client_host}:{self.http_port}/v2/health/ready"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.client_host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._proc

    # -- command line ----------------------------------------------------------------------------

    @property
    def backend_dir(self) -> Path:
        if self._backend_dir is None:
            self._backend_dir = prepare_backend_dir(self._backend_dir_arg, self.dist)
        return self._backend_dir

    def command(self) -> list[str]:
        """The full command line (assembles the backend directory if needed)."""
        cmd = [
            str(self.dist.server_bin),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.backend_dir}",
            # Every model in the repository loads at startup. A client must not be able to change what is
            # served: the repository API is off, or (supervised) restricted to requests that carry a
            # header only this launcher knows, which it uses to reload a model whose process died.
            *(
                ["--model-control-mode=explicit", "--load-model=*",
                 f"--http-restricted-api=model-repository:{ADMIN_HEADER}={self._admin_key}",
                 f"--grpc-restricted-protocol=model-repository:{ADMIN_HEADER}={self._admin_key}"]
                if self.supervise else ["--model-control-mode=none"]
            ),
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
            "--log-info=true",
            "--log-warning=true",
            "--log-error=true",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        if self.dist.caches_dir is not None:
            cmd.append(f"--cache-directory={self.dist.caches_dir}")
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self._env_overrides)
        if self.dist.libs_dir is not None:
            old = env.get("LD_LIBRARY_PATH")
            env["LD_LIBRARY_PATH"] = str(self.dist.libs_dir) + (f":{old}" if old else "")
        return env

    # -- lifecycle -------------------------------------------------------------------------------

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> TritonServer:
        """Launch the server in its own process group (session); does not wait for readiness."""
        if self.is_running():
            raise RuntimeError("server already running")
        self._stopping.clear()
        self._supervisor = None
        with contextlib.suppress(OSError):
            (self.model_repository / DRAIN_FILE).unlink()  # left by a launcher that was killed mid-drain
        # Truncated: the tail shown on failure and the echoed log must be this run's, not an earlier one's.
        return self._launch("wb")

    def _launch(self, log_mode: str) -> TritonServer:
        cmd = self.command()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = open(self.log_file, log_mode)
        # The death signal is tied to the launching *thread*; only the main thread lives as long as the
        # process, so from any other thread it would kill the server early.
        preexec = (
            _make_pdeathsig_preexec()
            if self.die_with_parent and threading.current_thread() is threading.main_thread()
            else None
        )
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                # The server's and the stubs' output go to one file: a pipe nobody reads would stall
                # the server once full, and stub crashes print only to stderr.
                stdout=self._log_handle,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,  # its own process group: signals reach the stubs too
                preexec_fn=preexec,
            )
        except BaseException:
            self._close_log()
            raise
        return self

    def _probe_ready(self, timeout: float = 2.0) -> bool:
        # An explicit empty ProxyHandler: an http_proxy in the environment must not intercept loopback.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.health_url, timeout=timeout) as resp:
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def is_ready(self) -> bool:
        return self.is_running() and self._probe_ready()

    def wait_ready(self, timeout: float = 120.0, poll_s: float = 0.2) -> TritonServer:
        """Poll /v2/health/ready until 200; raise ServerStartError with the log's tail on death or timeout."""
        if self._proc is None:
            raise RuntimeError("server not started")
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ServerStartError(
                    self._failure_report(f"tritonserver exited with code {code} before it was ready")
                )
            if self._probe_ready(timeout=min(2.0, max(0.1, deadline - time.monotonic()))):
                return self
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    self._failure_report(f"tritonserver was not ready within {timeout:.0f} s")
                )
            time.sleep(poll_s)

    def _failure_report(self, headline: str) -> str:
        parts = [headline, f"command: {' '.join(self.command())}"]
        env = self.environment()
        stub = self.backend_dir / "python" / _STUB_NAME
        for binary in (self.dist.server_bin, stub):
            libs = _missing_libs(binary, env)
            if libs:
                parts.append(f"{binary.name} cannot find shared libraries: {', '.join(libs)}")
        if any(lib.startswith("libpython") for lib in _missing_libs(stub, env)):
            parts.append(
                f"the Python backend stub links against the system libpython{_python_version()}; "
                f"install it (e.g. apt-get install libpython{_python_version()})"
            )
        parts.append(f"--- last lines of {self.log_file} ---\n{_tail(self.log_file)}")
        return "\n".join(parts)

    def stop(self, timeout: float | None = None, drain: bool = True) -> int | None:
        """Drain, then stop: SIGTERM the server (not its model processes), SIGKILL the whole process group
        after ``timeout`` s (default: twice the exit timeout + 15 s); always reap. Returns the exit code.

        The drain (`_drain`) lets the running requests finish while every model still serves. On SIGTERM
        Triton then refuses new requests, reports not ready, waits for what still runs (up to
        --exit-timeout-secs), unloads the models and exits 0. A signal sent to the group instead would
        reach every model process at once and end their streams half-way.
        """
        self._stopping.set()
        with self._proc_lock:
            proc = self._proc
        if proc is None:
            return None
        if timeout is None:
            timeout = 2 * self.exit_timeout_s + 15.0
        try:
            if proc.poll() is None:
                if drain:
                    self._drain(proc)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            # Stubs of a server that crashed or was killed outlive it for up to a second; the group
            # id cannot be reused while any of them is alive, so this reaches only ours.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            else:
                # They were orphaned, so init reaps them; until it does they still count as members.
                deadline = time.monotonic() + 5.0
                while time.monotonic() < deadline:
                    try:
                        os.killpg(proc.pid, 0)
                    except (ProcessLookupError, PermissionError):
                        break
                    time.sleep(0.05)
        finally:
            if self._supervisor is not None and self._supervisor is not threading.current_thread():
                self._supervisor.join(timeout=5)
            with contextlib.suppress(OSError):
                (self.model_repository / DRAIN_FILE).unlink()
            self._close_log()
            self._remove_shm()
        return proc.returncode

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        """Before SIGTERM: new requests are refused, running ones finish, for up to the exit timeout.

        Triton's own drain (on SIGTERM) refuses every new inference request, the ones a running request
        makes to other models included: an entry point that has yet to call whisper or the vision encoder
        would fail half-way. So the launcher first writes a marker the entry point checks for each new
        request (it then refuses it: "the server is shutting down"), and waits until no entry-point
        instance is answering (their files in ENTRY_BUSY_DIR, whose process is alive) and nothing waits in
        Triton's queues (its metrics), every model serving.
        """
        marker = self.model_repository / DRAIN_FILE
        try:
            marker.write_text(f"stopping since {time.time():.0f}\n")
        except OSError:
            return
        deadline = time.monotonic() + self.exit_timeout_s
        idle = 0
        while time.monotonic() < deadline and proc.poll() is None:
            pending = metric_total(self.metrics_url, "nv_inference_pending_request_count")
            if pending is None:  # no metrics to go by: Triton's own drain is all there is
                return
            idle = idle + 1 if pending == 0 and not self.answering() else 0
            if idle >= 2:  # twice in a row: a request passed between two instances is not missed
                return
            time.sleep(0.2)

    def answering(self) -> list[int]:
        """Pids of the entry-point processes answering a request now (a dead one's file does not count)."""
        pids = []
        for f in self.model_repository.glob(f"*/{ENTRY_BUSY_DIR}/*"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(f.read_text())
                if process_alive(pid):
                    pids.append(pid)
        return pids

    # -- supervision -------------------------------------------------------------------------------

    def model_processes(self) -> dict[int, str]:
        """pid -> model name of the Python-backend processes of this server (its process group)."""
        found: dict[int, str] = {}
        if self._proc is None:
            return found
        for pid, fields in group_processes(self._proc.pid).items():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if fields[0] == "Z" or len(argv) < 2 or not argv[0].endswith(_STUB_NAME.encode()):
                continue
            model_py = Path(argv[1].decode(errors="replace"))  # <repository>/<model>/<version>/model.py
            if model_py.parent.parent.parent == self.model_repository:
                found[pid] = model_py.parent.parent.name
        return found

    def reload(self, model: str, timeout: float = 300.0) -> None:
        """Load `model` again through the restricted repository API (a supervised server only)."""
        if not self.supervise:
            raise RuntimeError("reload needs a supervised server (supervise=True)")
        # "load" loads a model again only if its directory changed since it was loaded; otherwise it is a
        # no-op that leaves the dead process in place (seen on 2.51; Triton compares the modification times
        # of the model's directories, which editing a file's contents does not change): mark them changed.
        model_dir = self.model_repository / model
        for d in [model_dir, *(p for p in model_dir.iterdir() if p.is_dir())]:
            os.utime(d)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(
            f"http://{self.http_url}/v2/repository/models/{model}/load", data=b"{}", method="POST",
            headers={ADMIN_HEADER: self._admin_key, "Content-Type": "application/json"},
        )
        with opener.open(request, timeout=timeout) as resp:
            resp.read()

    def _reload_while_alive(self, model: str, timeout: float = 300.0) -> str | None:
        """`reload` in a helper thread, given up as soon as the server itself is gone (a process that died
        can take the server down with it; a load request to a dying server may never be answered).
        None when loaded, else what went wrong."""
        outcome: list[BaseException | None] = []

        def load() -> None:
            try:
                self.reload(model, timeout)
                outcome.append(None)
            except BaseException as e:  # handed to the supervisor
                outcome.append(e)

        worker = threading.Thread(target=load, daemon=True, name=f"reload-{model}")
        worker.start()
        deadline = time.monotonic() + timeout
        while worker.is_alive():
            worker.join(0.5)
            if not self.is_running() or self._stopping.is_set() or time.monotonic() > deadline:
                return "the server stopped" if not self.is_running() else "given up"
        error = outcome[0] if outcome else RuntimeError("no outcome")
        return None if error is None else f"{type(error).__name__}: {error}"

    def start_supervisor(self, poll_s: float = 0.5) -> None:
        """Watch the model processes from now on; see `_supervise`. Idempotent."""
        if self.supervise and self._supervisor is None:
            # The processes to watch are read here, not in the thread: one killed before the thread's first
            # look would otherwise never be missed.
            self._supervisor = threading.Thread(target=self._supervise, args=(poll_s, self.model_processes()),
                                                daemon=True, name="triton-supervisor")
            self._supervisor.start()

    def _say(self, message: str) -> None:
        line = f"mmgpt supervisor: {message}\n"
        if self._out is not None:
            self._out.write(line)
            self._out.flush()
        elif self._log_handle is not None:
            with contextlib.suppress(ValueError, OSError):
                self._log_handle.write(line.encode())
                self._log_handle.flush()

    def _restart_server(self, attempts: int = 3) -> bool:
        """The server process itself died without being asked to stop: start it again on the same ports.

        Seen with Triton 2.51: a model process killed while it holds a lock in the shared memory it uses
        with the server makes the server abort (boost::interprocess::lock_exception). Every request in
        flight then ends with an error (the connection closes); the next ones are answered once the new
        server is ready. False when it is not restarted (stopping, or `attempts` restarts in a row failed).
        """
        assert self._proc is not None
        for _ in range(attempts):
            with self._proc_lock:
                if self._stopping.is_set():
                    return False
                code, pid = self._proc.returncode, self._proc.pid
                self._close_log()
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)  # its model processes, orphaned
                self._launch("ab")
            self._say(f"tritonserver (pid {pid}) exited by itself with code {code}; started it again (pid {self.pid})")
            self.restarts.append(("tritonserver", pid))
            try:
                self.wait_ready()
            except ServerStartError as e:
                self._say(f"the restarted tritonserver did not become ready: {str(e).splitlines()[0]}")
                continue
            self._say("tritonserver is ready again")
            return True
        return False

    def _supervise(self, poll_s: float, known: dict[int, str]) -> None:
        """Reload a model whose Python process died.

        Triton 2.51 does not restart a Python-backend stub that was killed (OOM killer, a crash in a native
        library): every later request to that model fails with "Stub process ... is not healthy" while the
        server still reports ready. Loading the model again starts new processes; the requests the dead one
        was serving end with an error (the entry point watches the LLM's process for that). The processes
        of the old version that exit during a reload are not deaths. A reload that fails leaves the model
        not ready, so the server reports not ready (--strict-readiness) for an orchestrator to restart it.
        A server that dies by itself is started again (`_restart_server`).
        """
        while not self._stopping.wait(poll_s):
            if not self.is_running():
                self.recovering.set()
                if not self._restart_server():
                    return
                known = self.model_processes()
                self.recovering.clear()
                continue
            now = self.model_processes()
            died = sorted({(model, pid) for pid, model in known.items() if pid not in now})
            for model in sorted({m for m, _ in died}):
                if self._stopping.is_set():
                    return
                self.recovering.set()
                pids = [pid for m, pid in died if m == model]
                self._say(f"the {model} process (pid {', '.join(map(str, pids))}) died; loading {model} again")
                self.restarts.extend((model, pid) for pid in pids)
                retiring = {pid for pid, m in now.items() if m == model}
                error = self._reload_while_alive(model)
                if error is not None:
                    if not self._stopping.is_set() and self.is_running():
                        self._say(f"reloading {model} failed ({error}); the server reports not ready")
                    break  # a server that died with its model is started again at the top of the loop
                self._say(f"{model} is loaded again")
                now = {pid: m for pid, m in self.model_processes().items() if pid not in retiring}
            known = now
            if self.is_running():  # else the next turn restarts the server: still recovering
                self.recovering.clear()

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def _remove_shm(self) -> None:
        # A killed server leaves its Python-backend regions behind in /dev/shm; they carry our prefix.
        shm = Path("/dev/shm")
        if shm.is_dir():
            for p in shm.glob(f"{self.shm_prefix}*"):
                with contextlib.suppress(OSError):
                    p.unlink()

    def __enter__(self) -> TritonServer:
        try:
            self.start()
            self.wait_ready()
            self.start_supervisor()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- foreground ------------------------------------------------------------------------------

    def run_foreground(
        self, ready_timeout: float = 300.0, echo_log: bool = True, out: TextIO | None = None
    ) -> int:
        """Serve until SIGINT/SIGTERM or until the server dies (for `make serve`); returns an exit code.

        A signal stops the server cleanly and returns 0 (or the server's code if its shutdown failed);
        a server that dies on its own returns its exit code; a failed start returns 1. Must run in the
        main thread (signal handlers).
        """
        out = out or sys.stdout
        stop_requested = threading.Event()

        class _Stop(BaseException):
            pass

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if not stop_requested.is_set():
                stop_requested.set()
                raise _Stop  # interrupts wait_ready / the idle wait in the main thread

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        follower_done = threading.Event()
        follower: threading.Thread | None = None
        code = 0
        try:
            try:
                self.start()
                if echo_log:
                    follower = threading.Thread(
                        target=self._follow_log, args=(out, follower_done), daemon=True
                    )
                    follower.start()
                self.wait_ready(ready_timeout)
                self.start_supervisor()
                print(
                    f"tritonserver ready (pid {self.pid})\n  gRPC    {self.grpc_url}\n  HTTP    http://{self.http_url}\n"
                    f"  metrics {self.metrics_url}\n  log     {self.log_file}\nCtrl-C to stop.",
                    file=out,
                    flush=True,
                )
                assert self._proc is not None
                # A server that dies by itself is started again by the supervisor; wait while it does.
                while self._proc.poll() is None or (self._supervisor is not None and self._supervisor.is_alive()):
                    stop_requested.wait(0.5)
                code = self._proc.returncode or 0
                print(f"tritonserver exited by itself with code {code}", file=out, flush=True)
                code = code or 1  # a server that stops without being asked is a failure
            except _Stop:
                pass
            except ServerStartError as e:
                print(str(e), file=sys.stderr, flush=True)
                code = 1
            # Ignore further signals while shutting down: a second Ctrl-C must not skip the reaping.
            for s in previous:
                signal.signal(s, signal.SIG_IGN)
            if stop_requested.is_set():
                print("stopping tritonserver ...", file=out, flush=True)
                rc = self.stop()
                code = 0 if rc in (0, None) else rc
        finally:
            self.stop()
            follower_done.set()
            if follower is not None:
                follower.join(timeout=2)
            for s, h in previous.items():
                signal.signal(s, h)
        return code

    def _follow_log(self, out: TextIO, done: threading.Event) -> None:
        with open(self.log_file, encoding="utf-8", errors="replace") as f:
            while True:
                line = f.readline()
                if line:
                    out.write(line)
                    out.flush()
                elif done.is_set():
                    return
                else:
                    time.sleep(0.1)
