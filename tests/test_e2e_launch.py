"""`make serve`'s command: `python -m mmgpt.serving.launch` assembles the repository, runs tritonserver in
the foreground with warmed-up models, answers over gRPC, and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from serving_fixtures import EntryStream

from mmgpt.serving import contract as c
from mmgpt.serving.tritonserver import free_port

ROOT = Path(__file__).resolve().parents[1]


def launch(export_dir: Path, repo_dir: Path, ports: dict[str, int]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mmgpt.serving.launch", "--export-dir", str(export_dir), "--repo-dir", str(repo_dir),
           "--host", "127.0.0.1", "--grpc-port", str(ports["grpc"]), "--http-port", str(ports["http"]),
           "--metrics-port", str(ports["metrics"])]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def distinct_ports() -> dict[str, int]:
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    return dict(zip(("grpc", "http", "metrics"), sorted(ports)))


def test_missing_export_says_to_run_make_export(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mmgpt.serving.launch", "--export-dir", str(tmp_path / "none"), "--repo-dir",
         str(tmp_path / "repo")], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "run `make export` first" in proc.stderr
    assert not (tmp_path / "repo").exists()


def test_a_negative_cache_size_is_refused_before_serving(tiny_export, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mmgpt.serving.launch", "--export-dir", str(tiny_export), "--repo-dir",
         str(tmp_path / "repo"), "--vision-cache-mb", "-1"], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "vision_cache_mb, llm_prefix_cache_mb and llm_kv_budget_mb must be >= 0" in proc.stderr


def test_serve_answers_then_stops_cleanly_on_sigterm(tiny_export, tmp_path):
    ports = distinct_ports()
    repo = tmp_path / "triton_repo"
    proc = launch(tiny_export, repo, ports)
    lines: list[str] = []
    server_pid = None
    try:
        assert proc.stdout is not None
        start = time.monotonic()
        while time.monotonic() - start < 180:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("tritonserver ready (pid "):
                server_pid = int(line.split("pid ")[1].rstrip(")\n"))
                break
        assert server_pid is not None, "".join(lines[-40:])
        assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == sorted(c.MODELS)

        # Warm-up ran at load: the LLM has generated before any request.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=10) as resp:
            tokens = re.findall(r"^mmgpt_llm_tokens_total{[^}]*} (\S+)$", resp.read().decode(), re.M)
        assert tokens and float(tokens[0]) > 0

        stream = EntryStream(f"127.0.0.1:{ports['grpc']}")
        try:
            answer = stream.ask("Hello from the launch test", max_tokens=12)
        finally:
            stream.close()
        assert answer.text and answer.responses > 1

        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
        lines.append(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if server_pid is not None:
            try:
                os.killpg(server_pid, signal.SIGKILL)  # only if the launcher failed to stop it
            except ProcessLookupError:
                pass
    output = "".join(lines)
    assert proc.returncode == 0, output[-3000:]
    assert "stopping tritonserver" in output
    assert "Exit timeout expired" not in output  # every model unloaded in time
    with pytest.raises(ProcessLookupError):
        os.killpg(server_pid, 0)  # server and stubs are gone
    for port in ports.values():
        with socket.socket() as sock:
            sock.settimeout(1)
            assert sock.connect_ex(("127.0.0.1", port)) != 0
