"""Server-launch infrastructure: the real pip-shipped tritonserver on a tiny decoupled Python model.

The end-to-end tests start tritonserver on free loopback ports (a few seconds each) and always stop it
in a fixture finaliser, even when a test fails.
"""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mmgpt.serving.tritonserver import (
    ServerStartError,
    TritonNotFoundError,
    TritonServer,
    execution_env_path,
    fill_template,
    find_triton_dist,
    free_port,
    prepare_backend_dir,
)

try:  # the tests folder is on sys.path (rootdir-relative "tests" package or prepend import mode)
    from tests import fake_pb_utils
except ImportError:  # pragma: no cover - depends on how pytest was started
    import fake_pb_utils  # type: ignore[no-redef]

MODEL = "echo_stream"

CONFIG_TEMPLATE = textwrap.dedent(
    """\
    name: "${name}"
    backend: "python"
    max_batch_size: 0
    model_transaction_policy { decoupled: true }
    input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
    output [ { name: "PIECE" data_type: TYPE_STRING dims: [ 1 ] } ]
    instance_group [ { kind: KIND_CPU count: 1 } ]
    parameters { key: "EXECUTION_ENV_PATH" value: { string_value: "${execution_env}" } }
    """
)

# Streams the whitespace-separated words of TEXT back one response each, from a thread per request
# (handling requests inline in execute would serialise them). Empty TEXT is rejected with a
# per-request INVALID_ARG error. numpy is not installed in the system Python the stub embeds, so a
# model that loads at all proves EXECUTION_ENV_PATH put the venv on its path.
MODEL_PY = textwrap.dedent(
    """\
    import json
    import threading

    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def initialize(self, args):
            self.config = json.loads(args["model_config"])
            assert pb_utils.using_decoupled_model_transaction_policy(self.config)
            out = pb_utils.get_output_config_by_name(self.config, "PIECE")
            self.out_dtype = pb_utils.triton_string_to_numpy(out["data_type"])
            self._threads = []

        def execute(self, requests):
            for request in requests:
                thread = threading.Thread(target=self._serve, args=(request,), daemon=True)
                thread.start()
                self._threads.append(thread)
            self._threads = [t for t in self._threads if t.is_alive()]
            return None

        def _serve(self, request):
            sender = request.get_response_sender()
            final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            try:
                tensor = pb_utils.get_input_tensor_by_name(request, "TEXT")
                raw = b"" if tensor is None else tensor.as_numpy().reshape(-1)[0]
                text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
                words = text.split()
                if not words:
                    error = pb_utils.TritonError("echo_stream: TEXT is empty", pb_utils.TritonError.INVALID_ARG)
                    sender.send(pb_utils.InferenceResponse(error=error), flags=final)
                    return
                for word in words:
                    if sender.is_cancelled():
                        break
                    piece = pb_utils.Tensor("PIECE", np.array([word.encode("utf-8")], dtype=self.out_dtype))
                    sender.send(pb_utils.InferenceResponse(output_tensors=[piece]))
                sender.send(flags=final)
            except Exception as exc:  # a thread's exception would otherwise leave the stream open
                error = pb_utils.TritonError(f"echo_stream: {exc}")
                sender.send(pb_utils.InferenceResponse(error=error), flags=final)

        def finalize(self):
            for thread in self._threads:
                thread.join(timeout=5)
    """
)

BROKEN_MODEL_PY = textwrap.dedent(
    """\
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def initialize(self, args):
            raise RuntimeError("boom-in-initialize-7f3a")

        def execute(self, requests):
            return None
    """
)


def write_model(repo: Path, name: str, model_py: str) -> Path:
    version_dir = repo / name / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "model.py").write_text(model_py)
    config = fill_template(CONFIG_TEMPLATE, {"name": name, "execution_env": execution_env_path()})
    (repo / name / "config.pbtxt").write_text(config)
    return repo / name


# ------------------------------------------------------------------------------------------------
# gRPC streaming helper
# ------------------------------------------------------------------------------------------------


class Stream:
    """One gRPC bidirectional stream; ``ask`` sends a request and collects its pieces until final."""

    def __init__(self, url: str) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self._events: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self._events.put((result, error)))

    def ask(self, text: str, timeout: float = 30.0) -> list[str]:
        """The pieces, in order; raises the client's InferenceServerException for an error response."""
        inp = self._grpc.InferInput("TEXT", [1], "BYTES")
        inp.set_data_from_numpy(np.array([text.encode("utf-8")], dtype=object))
        request_id = uuid.uuid4().hex[:8]
        self.client.async_stream_infer(MODEL, [inp], request_id=request_id, enable_empty_final_response=True)
        pieces: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            result, error = self._events.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:
                raise error
            response = result.get_response()
            assert response.id == request_id
            out = result.as_numpy("PIECE")
            if out is not None:
                pieces.append(out.reshape(-1)[0].decode("utf-8"))
            if response.parameters["triton_final_response"].bool_param:
                return pieces

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def echo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    write_model(repo, MODEL, MODEL_PY)
    return repo


@pytest.fixture(scope="module")
def server(echo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    with TritonServer(echo_repo, log_file=tmp_path_factory.mktemp("logs") / "tritonserver.log") as srv:
        yield srv


@pytest.fixture
def stream(server: TritonServer) -> Iterator[Stream]:
    s = Stream(server.grpc_url)
    try:
        yield s
    finally:
        s.close()


# ------------------------------------------------------------------------------------------------
# Unit tests (no server)
# ------------------------------------------------------------------------------------------------


def test_fill_template_substitutes_every_placeholder() -> None:
    out = fill_template(CONFIG_TEMPLATE, {"name": "m", "execution_env": "/venv"})
    assert 'name: "m"' in out
    assert 'string_value: "/venv"' in out
    assert "${" not in out


def test_fill_template_rejects_placeholder_without_value() -> None:
    with pytest.raises(ValueError, match="execution_env"):
        fill_template(CONFIG_TEMPLATE, {"name": "m"})


def test_fill_template_rejects_value_for_unknown_key() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        fill_template(CONFIG_TEMPLATE, {"name": "m", "execution_env": "/venv", "max_tokens": 5})


def test_fill_template_rejects_malformed_placeholder_and_unsafe_value() -> None:
    with pytest.raises(ValueError, match="malformed"):
        fill_template('a: "${ name }"', {})
    with pytest.raises(ValueError, match="quote"):
        fill_template('a: "${name}"', {"name": 'x" } evil { "'})


def test_fill_template_renders_booleans_for_pbtxt() -> None:
    assert fill_template("decoupled: ${d}", {"d": True}) == "decoupled: true"


def test_command_binds_loopback_and_disables_model_control(tmp_path: Path) -> None:
    srv = TritonServer(tmp_path, backend_dir=tmp_path / "backends")
    cmd = srv.command()
    for flag in ("--http-address", "--grpc-address", "--metrics-address"):
        assert f"{flag}=127.0.0.1" in cmd
    assert "--model-control-mode=none" not in cmd and "--model-control-mode=explicit" in cmd  # supervised
    # ... with the repository API locked behind a key only this object has (no client can load or unload)
    key = f"model-repository:mmgpt-admin-key={srv._admin_key}"
    assert f"--http-restricted-api={key}" in cmd and f"--grpc-restricted-protocol={key}" in cmd
    assert len(srv._admin_key) >= 32 and srv._admin_key != TritonServer(tmp_path)._admin_key
    plain = TritonServer(tmp_path, backend_dir=tmp_path / "backends", supervise=False).command()
    assert "--model-control-mode=none" in plain and not any("restricted" in a for a in plain)
    assert "--strict-readiness=true" in cmd and "--exit-on-error=true" in cmd
    assert f"--model-repository={tmp_path.resolve()}" in cmd
    assert f"--backend-directory={(tmp_path / 'backends').resolve()}" in cmd
    assert not any("0.0.0.0" in arg for arg in cmd)
    assert len({srv.grpc_port, srv.http_port, srv.metrics_port}) == 3
    assert srv.grpc_url == f"127.0.0.1:{srv.grpc_port}"
    libs = srv.dist.libs_dir
    assert libs is not None and srv.environment()["LD_LIBRARY_PATH"].split(":")[0] == str(libs)


def test_prepare_backend_dir_assembles_once(tmp_path: Path) -> None:
    dest = prepare_backend_dir(tmp_path / "b")
    python_dir = dest / "python"
    stub = python_dir / "triton_python_backend_stub"
    assert (python_dir / "libtriton_python.so").is_file()
    assert (python_dir / "triton_python_backend_utils.py").is_file()
    assert stub.is_file() and os.access(stub, os.X_OK)
    # The stub must be the one built for the running Python.
    assert stub.stat().st_size == find_triton_dist().stub.stat().st_size
    before = stub.stat().st_mtime_ns
    inode = python_dir.stat().st_ino
    assert prepare_backend_dir(tmp_path / "b") == dest
    assert stub.stat().st_mtime_ns == before and python_dir.stat().st_ino == inode  # reused, not rebuilt


def test_missing_installation_is_named(tmp_path: Path) -> None:
    (tmp_path / "pytriton" / "tritonserver" / "bin").mkdir(parents=True)
    with pytest.raises(TritonNotFoundError) as info:
        find_triton_dist(tmp_path / "pytriton")
    message = str(info.value)
    assert "tritonserver binary" in message
    assert f"stub for Python {sys.version_info[0]}.{sys.version_info[1]}" in message
    assert "pip install nvidia-pytriton" in message


def test_free_port_is_bindable_on_loopback() -> None:
    port = free_port()
    assert 1024 <= port <= 65535  # an ephemeral port, never a privileged one
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # raises if it were taken
        s.listen()
        assert s.getsockname() == ("127.0.0.1", port)
        taken = free_port()
        assert taken != port  # a listening port is not handed out again
        with socket.socket() as client:
            client.connect(("127.0.0.1", port))  # reachable on loopback


# ------------------------------------------------------------------------------------------------
# The same model under the fake pb_utils (checks the fake against real model code)
# ------------------------------------------------------------------------------------------------


def test_echo_model_runs_under_fake_pb_utils(echo_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pb_utils = fake_pb_utils.install(monkeypatch)
    module = fake_pb_utils.load_model_module(echo_repo / MODEL / "1" / "model.py")
    model = module.TritonPythonModel()
    model.initialize(fake_pb_utils.make_initialize_args((echo_repo / MODEL / "config.pbtxt").read_text()))

    ok = fake_pb_utils.make_request({"TEXT": np.array([b"one two three"], dtype=object)})
    bad = fake_pb_utils.make_request({"TEXT": np.array([b"   "], dtype=object)})
    assert model.execute([ok, bad]) is None
    assert [a[0] for a in ok.response_sender.outputs("PIECE")] == [b"one", b"two", b"three"]
    ok.response_sender.wait_final(5)
    bad.response_sender.wait_final(5)
    assert ok.response_sender.sent[-1] == (None, pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    [error] = bad.response_sender.errors
    assert error.code() == pb_utils.TritonError.INVALID_ARG and "TEXT is empty" in error.message()
    with pytest.raises(pb_utils.TritonModelException):
        ok.response_sender.send(pb_utils.InferenceResponse())  # the stream is closed after FINAL
    model.finalize()


# ------------------------------------------------------------------------------------------------
# End to end with the real server
# ------------------------------------------------------------------------------------------------


def test_server_is_ready(server: TritonServer) -> None:
    assert server.is_running()
    assert server.is_ready()
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        assert client.is_server_ready()
        assert client.is_model_ready(MODEL)
    finally:
        client.close()


def test_stream_returns_pieces_in_order(stream: Stream) -> None:
    words = [f"w{i}" for i in range(12)]
    assert stream.ask(" ".join(words)) == words
    assert stream.ask("again") == ["again"]  # the stream stays usable for a second request


def test_rejected_request_reaches_client_and_server_keeps_serving(
    server: TritonServer, stream: Stream
) -> None:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="TEXT is empty"):
        stream.ask("")
    assert server.is_ready()
    assert stream.ask("still here") == ["still", "here"]  # same stream
    other = Stream(server.grpc_url)
    try:
        assert other.ask("new stream") == ["new", "stream"]
    finally:
        other.close()


def test_fake_model_config_matches_the_servers(server: TritonServer, echo_repo: Path) -> None:
    """What fake_pb_utils hands initialize() must look like what the real server hands it."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{server.http_url}/v2/models/{MODEL}/config", timeout=10) as resp:
        real = json.loads(resp.read())
    fake = fake_pb_utils.model_config_from_pbtxt((echo_repo / MODEL / "config.pbtxt").read_text())
    for key in (
        "name",
        "backend",
        "max_batch_size",
        "input",
        "output",
        "parameters",
        "model_transaction_policy",
    ):
        assert fake[key] == real[key], key


def _listening_addresses(pid: int) -> dict[int, str]:
    """port -> address of the sockets in LISTEN state in the process's network namespace.

    gRPC listens on an IPv6 socket bound to the IPv4-mapped ::ffff:127.0.0.1, so tcp6 counts too;
    mapped addresses are reported in their IPv4 form.
    """
    found: dict[int, str] = {}
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state != "0A":  # TCP_LISTEN
                continue
            hex_ip, hex_port = local.split(":")
            # The kernel prints the address as 32-bit words in host (little-endian) byte order.
            raw = b"".join(bytes.fromhex(hex_ip[i : i + 8])[::-1] for i in range(0, len(hex_ip), 8))
            addr = ipaddress.ip_address(raw)
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            found[int(hex_port, 16)] = str(addr)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_launched_server_listens_on_loopback_only(server: TritonServer) -> None:
    assert server.pid is not None
    cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    assert cmdline == server.command()
    listening = _listening_addresses(server.pid)
    for port in (server.grpc_port, server.http_port, server.metrics_port):
        assert listening.get(port) == "127.0.0.1", f"port {port}: {listening.get(port)}"


def test_models_cannot_be_loaded_or_unloaded_by_request(server: TritonServer) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException):
            client.unload_model(MODEL)
        with pytest.raises(InferenceServerException):
            client.load_model(MODEL)
        assert client.is_model_ready(MODEL)
    finally:
        client.close()


def test_stop_leaves_no_process_behind(echo_repo: Path, tmp_path: Path) -> None:
    with TritonServer(echo_repo, log_file=tmp_path / "server.log") as srv:
        assert srv.is_ready()
        pid = srv.pid
        assert pid is not None
        s = Stream(srv.grpc_url)
        try:
            assert s.ask("x y") == ["x", "y"]
        finally:
            s.close()
        shm_prefix = srv.shm_prefix
        assert list(Path("/dev/shm").glob(f"{shm_prefix}*")), "python backend shm regions should exist"
    assert srv.process is not None and srv.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the stubs went with it
    with socket.socket() as sock, pytest.raises(OSError):
        sock.settimeout(2)
        sock.connect(("127.0.0.1", srv.http_port))
    assert not list(Path("/dev/shm").glob(f"{shm_prefix}*"))


def test_supervisor_reloads_a_dead_model_and_restarts_a_dead_server(echo_repo: Path, tmp_path: Path) -> None:
    """Triton 2.51 leaves a model whose process was killed failing every request ("Stub process ... is not
    healthy") while it reports ready; the launcher loads it again. A server that dies by itself is started
    again on the same ports. A client without the launcher's key cannot use the repository API."""
    import urllib.error
    import urllib.request

    with TritonServer(echo_repo, log_file=tmp_path / "server.log") as srv:
        (pid, model), = srv.model_processes().items()
        assert model == MODEL
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 90
        answer = None
        while time.monotonic() < deadline:
            s = Stream(srv.grpc_url)
            try:
                answer = s.ask("x y", timeout=5)  # a request that reached the dead process never returns
                break
            except Exception:
                time.sleep(0.5)
            finally:
                s.close()
        assert answer == ["x", "y"] and srv.restarts == [(MODEL, pid)]
        assert pid not in srv.model_processes() and len(srv.model_processes()) == 1
        assert f"(pid {pid}) died" in (tmp_path / "server.log").read_text()

        request = urllib.request.Request(f"http://{srv.http_url}/v2/repository/models/{MODEL}/unload", data=b"{}",
                                         method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10)
        assert refused.value.code == 403

        server_pid = srv.pid
        os.kill(server_pid, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (srv.pid != server_pid and srv.is_ready()):
            time.sleep(0.5)
        assert srv.pid != server_pid and srv.is_ready() and srv.restarts[-1] == ("tritonserver", server_pid)
        s = Stream(srv.grpc_url)
        try:
            assert s.ask("a b") == ["a", "b"]
        finally:
            s.close()
    assert not srv.is_running()


def test_failed_model_load_reports_log_tail(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "broken", BROKEN_MODEL_PY)
    srv = TritonServer(repo, log_file=tmp_path / "server.log")
    try:
        srv.start()
        with pytest.raises(ServerStartError) as info:
            srv.wait_ready(timeout=60)
    finally:
        srv.stop()
    message = str(info.value)
    assert "exited with code" in message
    assert "boom-in-initialize-7f3a" in message
    assert not srv.is_running()


def test_stop_escalates_to_sigkill(echo_repo: Path, tmp_path: Path) -> None:
    srv = TritonServer(echo_repo, log_file=tmp_path / "server.log")
    try:
        srv.start()
        srv.wait_ready(timeout=120)
        pid = srv.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # a server that cannot act on SIGTERM
        result: dict[str, int | None] = {}
        # In a thread, so that a stop() that never escalates fails this test instead of hanging it.
        stopper = threading.Thread(target=lambda: result.update(code=srv.stop(timeout=1.0)), daemon=True)
        stopper.start()
        stopper.join(timeout=20)
        if stopper.is_alive():
            os.killpg(pid, signal.SIGKILL)
            pytest.fail("stop() did not kill a server that ignored SIGTERM within 20 s")
    finally:
        srv.stop()
    assert result["code"] == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # stubs included
    assert not list(Path("/dev/shm").glob(f"{srv.shm_prefix}*"))  # the killed server's regions removed


@pytest.mark.parametrize(
    ("signum", "echo_log"),
    [(signal.SIGINT, False), (signal.SIGTERM, True)],
    ids=["SIGINT", "SIGTERM-echo-log"],
)
def test_run_foreground_stops_cleanly_on_signal(
    echo_repo: Path, tmp_path: Path, signum: int, echo_log: bool
) -> None:
    script = textwrap.dedent(
        f"""\
        import sys
        from mmgpt.serving.tritonserver import TritonServer
        server = TritonServer({str(echo_repo)!r}, log_file={str(tmp_path / "fg.log")!r})
        sys.exit(server.run_foreground(echo_log={echo_log!r}))
        """
    )
    repo_root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo_root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        server_pid = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("tritonserver ready (pid "):
                server_pid = int(line.split("pid ")[1].rstrip(")\n"))
                break
        assert server_pid is not None, "".join(lines)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=60)
        lines.append(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines)
    assert proc.returncode == 0, output
    assert "stopping tritonserver" in output
    assert ("Started GRPCInferenceService" in output) == echo_log  # the server log echoed or not
    with pytest.raises(ProcessLookupError):
        os.killpg(server_pid, 0)


def _alive(pid: int) -> bool:
    """Running or stopped; a zombie waiting for init to reap it counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc")
def test_server_dies_with_a_killed_launcher(echo_repo: Path, tmp_path: Path) -> None:
    """A launcher killed with SIGKILL (no chance to stop()) must not leave tritonserver running."""
    script = textwrap.dedent(
        f"""\
        import time
        from mmgpt.serving.tritonserver import TritonServer
        server = TritonServer({str(echo_repo)!r}, log_file={str(tmp_path / "orphan.log")!r})
        server.start()
        server.wait_ready(120)
        print("READY", server.pid, flush=True)
        time.sleep(600)
        """
    )
    repo_root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo_root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    server_pid = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
        server_pid = int(line.split()[1])
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        while _alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(server_pid), "tritonserver outlived its killed launcher"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if server_pid is not None and _alive(server_pid):
            os.killpg(server_pid, signal.SIGKILL)
