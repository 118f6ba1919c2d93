"""Fixtures and helpers shared by the serving tests (a pytest plugin: `pytest_plugins = ("serving_fixtures",)`).

Loaded as a plugin, its session fixtures exist once per run however many modules use them: one
served repository and one tritonserver (on free loopback ports, always stopped) for all end-to-end
tests. The export is the session's `tiny_export` from conftest.py.

Test modules also import helpers from it before pytest registers it as a plugin, too late for assert
rewriting, hence: PYTEST_DONT_REWRITE (its few asserts are plain checks).
"""

from __future__ import annotations

import io
import os
import queue
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from mmgpt.serving import contract as c

# Small limits so that the limit tests need no large files.
TEST_LIMITS = dict(
    max_image_bytes=300_000,
    max_image_pixels=250_000,  # 500 x 500
    max_audio_bytes=400_000,
    max_audio_seconds=5.0,
)


# ------------------------------------------------------------------------------------------------
# Media
# ------------------------------------------------------------------------------------------------


def png_bytes(width: int = 64, height: int = 48, seed: int = 0, fmt: str = "PNG") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def flat_png(width: int, height: int) -> bytes:
    """A one-colour image: big in pixels, tiny in bytes (the shape of a decompression bomb)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(seconds: float = 1.5, rate: int = 16000, channels: int = 1, freq: float = 440.0, fmt: str = "WAV") -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * freq * t) * np.linspace(0.2, 1, t.size)).astype(np.float32)
    data = np.stack([tone] * channels, axis=1) if channels > 1 else tone
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=fmt)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def served_repo(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmgpt.serving.repository import assemble_repository

    return assemble_repository(tiny_export, tmp_path_factory.mktemp("served") / "triton_repo", **TEST_LIMITS)


@pytest.fixture(scope="session")
def triton(served_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """The real tritonserver on the served repository; stopped (process group and all) even on failure."""
    from mmgpt.serving.tritonserver import TritonServer

    server = TritonServer(served_repo, log_file=tmp_path_factory.mktemp("logs") / "tritonserver.log")
    try:
        server.start()
        server.wait_ready(timeout=180)
        yield server
    finally:
        server.stop()


def greedy(n: int = 16):
    """Greedy sampling for n new tokens: what served answers are compared with `mmgpt ask`'s under (the end-to-end
    modules ask for MAX_TOKENS = 16)."""
    from mmgpt.generation import SamplingParams

    return SamplingParams(max_tokens=n)


@pytest.fixture(scope="session")
def reference(tiny_checkpoint: Path):
    """`mmgpt ask`'s PyTorch pipeline on the checkpoint the export came from."""
    from mmgpt.inference import Assistant

    return Assistant.load(tiny_checkpoint)


# ------------------------------------------------------------------------------------------------
# A raw tritonclient gRPC stream to the entry point
# ------------------------------------------------------------------------------------------------

_TRITON_TYPES = {
    np.dtype(np.object_): "BYTES",
    np.dtype(np.int32): "INT32",
    np.dtype(np.float32): "FP32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.bool_): "BOOL",
}


def entry_inputs(text: str | bytes | None = "", **kw) -> dict[str, np.ndarray]:
    """Inputs of the `multimodal` contract from Python values (None = not sent)."""
    unknown = set(kw) - set(c.ENTRY_INPUTS)
    if unknown:
        raise TypeError(f"unknown inputs {sorted(unknown)}")
    dtypes = {c.MAX_TOKENS: np.int32, c.TEMPERATURE: np.float32, c.TOP_P: np.float32, c.TOP_K: np.int32,
              c.SEED: np.uint64, c.STREAM: np.bool_}
    out: dict[str, np.ndarray] = {}
    if text is not None:
        out[c.TEXT_INPUT] = c.one_bytes(text)
    for name, value in kw.items():
        if value is None:
            continue
        if name == c.STOP_WORDS:
            out[name] = np.array([w.encode() for w in value], dtype=np.object_)
        elif name in dtypes:
            out[name] = np.array([value], dtype=dtypes[name])
        else:
            out[name] = c.one_bytes(value)
    return out


@dataclass
class Answer:
    texts: list[str] = field(default_factory=list)  # text_output of each response that had one
    transcripts: list[str] = field(default_factory=list)
    responses: int = 0  # every response, the empty final one included

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def transcript(self) -> str:
        return "".join(self.transcripts)


class EntryStream:
    """One gRPC bidirectional stream to `multimodal`; `ask` sends a request and collects it to the end."""

    def __init__(self, url: str, model: str = c.MULTIMODAL):
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.model = model
        self.client = grpcclient.InferenceServerClient(url)
        self.events: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.events.put((result, error)))

    def send(self, inputs: dict[str, np.ndarray]) -> str:
        tensors = []
        for name, array in inputs.items():
            t = self._grpc.InferInput(name, list(array.shape), _TRITON_TYPES[array.dtype])
            t.set_data_from_numpy(array)
            tensors.append(t)
        request_id = uuid.uuid4().hex[:12]
        self.client.async_stream_infer(self.model, tensors, request_id=request_id, enable_empty_final_response=True)
        return request_id

    def collect(self, request_id: str, timeout: float = 60.0) -> Answer:
        """The responses of one request; raises InferenceServerException for an error response."""
        answer = Answer()
        deadline = time.monotonic() + timeout
        while True:
            result, error = self.events.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:
                raise error
            response = result.get_response()
            assert response.id == request_id
            answer.responses += 1
            text = result.as_numpy(c.TEXT_OUTPUT)
            if text is not None:
                answer.texts.append(text.reshape(-1)[0].decode("utf-8"))
                answer.transcripts.append(result.as_numpy(c.TRANSCRIPT).reshape(-1)[0].decode("utf-8"))
            if response.parameters["triton_final_response"].bool_param:
                return answer

    def ask(self, text: str | bytes | None = "", timeout: float = 60.0, **kw) -> Answer:
        return self.collect(self.send(entry_inputs(text, **kw)), timeout)

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


@pytest.fixture
def entry(triton) -> Iterator[EntryStream]:
    stream = EntryStream(triton.grpc_url)
    try:
        yield stream
    finally:
        stream.close()


# ------------------------------------------------------------------------------------------------
# The OpenAI-compatible API server (`make api`) in its own process
# ------------------------------------------------------------------------------------------------

KEY = "test-key-0123"  # the API key the tests' API servers are started with (where they need one)


@dataclass
class API:
    url: str  # http://127.0.0.1:port
    proc: subprocess.Popen
    log: str

    def client(self, key: str | None = KEY):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=120)

    def post(self, path: str, **kw):
        import httpx2 as httpx

        headers = {"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", headers=headers, timeout=120, **kw)


def start_api(tmp_path: Path, *args: str) -> API:
    """`python -m mmgpt.client.openai_server` on a free loopback port, as `make api` runs it; ready when it
    answers HTTP. Stop it with stop_api (in a `finally`)."""
    import httpx2 as httpx

    from mmgpt.serving.tritonserver import free_port

    port = free_port()
    log = tmp_path / f"api-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mmgpt.client.openai_server", "--port", str(port), *args],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "MMGPT_API_KEY": ""})
    api = API(f"http://127.0.0.1:{port}", proc, str(log))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API server exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{api.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=2).status_code:
                return api
        except httpx.TransportError:
            time.sleep(0.2)
    stop_api(api)
    raise RuntimeError(f"the API server did not answer within 60 s: {log.read_text()[-3000:]}")


def stop_api(api: API) -> None:
    api.proc.terminate()
    try:
        api.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        api.proc.kill()
        api.proc.wait()
