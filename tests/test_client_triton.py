"""The client against the real tritonserver serving a stand-in `multimodal` model.

The stand-in declares exactly the entry point's contract (names, dtypes, dims, decoupled, optional inputs),
so Triton itself checks what the client sends; it answers with a description of what it received, and
records cancellations in a directory, which shows that a client-side cancel reaches the server. It needs
no exported models and starts in a few seconds, so these tests do not wait for the real pipeline.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import interruptible

from mmgpt.client import MMGPTClient, Piece, RequestFailed, ResponseTimeout
from mmgpt.serving.tritonserver import TritonServer, execution_env_path, fill_template

CONFIG = textwrap.dedent(
    """\
    name: "multimodal"
    backend: "python"
    max_batch_size: 0
    model_transaction_policy { decoupled: true }
    input [
      { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] },
      { name: "image_input" data_type: TYPE_STRING dims: [ 1 ] optional: true },
      { name: "audio_input" data_type: TYPE_STRING dims: [ 1 ] optional: true },
      { name: "history" data_type: TYPE_STRING dims: [ 1 ] optional: true },
      { name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
      { name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
      { name: "top_p" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
      { name: "top_k" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
      { name: "seed" data_type: TYPE_UINT64 dims: [ 1 ] optional: true },
      { name: "stop_words" data_type: TYPE_STRING dims: [ -1 ] optional: true },
      { name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true }
    ]
    output [
      { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] },
      { name: "transcript" data_type: TYPE_STRING dims: [ 1 ] }
    ]
    instance_group [ { kind: KIND_CPU count: 1 } ]
    parameters { key: "EXECUTION_ENV_PATH" value: { string_value: "${execution_env}" } }
    parameters { key: "CANCEL_DIR" value: { string_value: "${cancel_dir}" } }
    """
)

# text_input "describe": one response with a JSON description of every input received (name -> dtype,
# shape, value). "count N": N pieces "<i> ", 50 ms apart, or one piece when stream is false.
# "fail": a per-request INVALID_ARG error. With audio_input, transcript = "heard <n> bytes".
# On cancellation the request id is written into CANCEL_DIR.
MODEL_PY = textwrap.dedent(
    '''\
    import json
    import os
    import threading
    import time

    import numpy as np
    import triton_python_backend_utils as pb_utils

    NAMES = ["text_input", "image_input", "audio_input", "history", "max_tokens", "temperature", "top_p",
             "top_k", "seed", "stop_words", "stream"]


    def plain(value):
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        return value.item() if hasattr(value, "item") else value


    class TritonPythonModel:
        def initialize(self, args):
            config = json.loads(args["model_config"])
            self.cancel_dir = config["parameters"]["CANCEL_DIR"]["string_value"]

        def execute(self, requests):
            for request in requests:
                threading.Thread(target=self._serve, args=(request,), daemon=True).start()
            return None

        def _serve(self, request):
            sender = request.get_response_sender()
            final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            try:
                got = {}
                for name in NAMES:
                    t = pb_utils.get_input_tensor_by_name(request, name)
                    if t is not None:
                        a = t.as_numpy()
                        got[name] = {"dtype": str(a.dtype), "shape": list(a.shape),
                                     "value": [plain(v) for v in a.reshape(-1)]}
                text = got["text_input"]["value"][0]
                stream = got.get("stream", {"value": [True]})["value"][0]
                audio = got.get("audio_input")
                transcript = f"heard {len(audio['value'][0])} bytes" if audio else ""

                def send(piece, flags=0):
                    out = [pb_utils.Tensor("text_output", np.array([piece.encode()], dtype=np.object_)),
                           pb_utils.Tensor("transcript", np.array([transcript.encode()], dtype=np.object_))]
                    sender.send(pb_utils.InferenceResponse(output_tensors=out), flags=flags)

                if text == "fail":
                    error = pb_utils.TritonError("stand-in: rejected on purpose", pb_utils.TritonError.INVALID_ARG)
                    sender.send(pb_utils.InferenceResponse(error=error), flags=final)
                    return
                if text == "describe":
                    send(json.dumps(got))
                elif text.startswith("count "):
                    n = int(text.split()[1])
                    pieces = [f"{i} " for i in range(n)]
                    if not stream:
                        send("".join(pieces))
                    for piece in pieces if stream else []:
                        if sender.is_cancelled():
                            with open(os.path.join(self.cancel_dir, request.request_id() or "anon"), "w") as f:
                                f.write("cancelled")
                            break
                        send(piece)
                        time.sleep(0.05)
                else:
                    send(text)
                sender.send(flags=final)
            except Exception as exc:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"stand-in: {exc!r}")), flags=final)
    '''
)


@pytest.fixture(scope="module")
def cancel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cancelled")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cancel_dir: Path) -> Iterator[TritonServer]:
    repo = tmp_path_factory.mktemp("repo")
    (repo / "multimodal" / "1").mkdir(parents=True)
    (repo / "multimodal" / "1" / "model.py").write_text(MODEL_PY)
    config = fill_template(CONFIG, {"execution_env": execution_env_path(), "cancel_dir": str(cancel_dir)})
    (repo / "multimodal" / "config.pbtxt").write_text(config)
    with TritonServer(repo, log_file=tmp_path_factory.mktemp("logs") / "tritonserver.log") as srv:
        yield srv


@pytest.fixture
def client(server: TritonServer) -> MMGPTClient:
    return MMGPTClient(server.grpc_url, timeout=30)


def test_triton_accepts_every_input_with_the_declared_types(client: MMGPTClient, tmp_path: Path) -> None:
    image = tmp_path / "img.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n-not-really")
    result = client.ask(
        "describe", image=image, audio=b"RIFF-wav", history=[{"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "Hé"}],
        max_tokens=5, temperature=0.25, top_p=0.5, top_k=3, seed=2**64 - 1, stop_words=["\n", "User:"], stream=False,
    )
    got = json.loads(result.text)
    assert {k: (v["dtype"], v["shape"]) for k, v in got.items()} == {
        "text_input": ("object", [1]), "image_input": ("object", [1]), "audio_input": ("object", [1]),
        "history": ("object", [1]), "max_tokens": ("int32", [1]), "temperature": ("float32", [1]),
        "top_p": ("float32", [1]), "top_k": ("int32", [1]), "seed": ("uint64", [1]),
        "stop_words": ("object", [2]), "stream": ("bool", [1]),
    }
    assert got["history"]["value"] == ['[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hé"}]']
    assert got["seed"]["value"] == [2**64 - 1] and got["stop_words"]["value"] == ["\n", "User:"]
    assert got["image_input"]["value"][0] == image.read_bytes().decode("utf-8", errors="replace")
    assert result.transcript == "heard 8 bytes"


def test_optional_inputs_are_absent_at_the_server(client: MMGPTClient) -> None:
    got = json.loads(client.ask("describe").text)
    assert set(got) == {"text_input", "stream"}


def test_streamed_pieces_arrive_in_order_and_no_stream_gives_one(client: MMGPTClient) -> None:
    pieces = list(client.stream("count 5"))
    assert [p.text for p in pieces] == ["0 ", "1 ", "2 ", "3 ", "4 "]
    assert list(client.stream("count 5", stream=False)) == [Piece("0 1 2 3 4 ")]


def test_server_error_passes_through_and_the_server_keeps_serving(client: MMGPTClient, server: TritonServer) -> None:
    with pytest.raises(RequestFailed, match="stand-in: rejected on purpose"):
        client.ask("fail")
    assert client.ask("still here").text == "still here"
    assert client.health().ok


def test_leaving_early_cancels_on_the_server(client: MMGPTClient, server: TritonServer, cancel_dir: Path) -> None:
    before = set(cancel_dir.iterdir())
    start = time.monotonic()
    with client.stream("count 200") as answer:  # 10 s if nobody stops it
        assert next(answer).text == "0 "
    assert time.monotonic() - start < 3
    deadline = time.monotonic() + 5
    while set(cancel_dir.iterdir()) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(cancel_dir.iterdir()) != before, "the server never saw the cancellation"
    assert client.ask("count 2").text == "0 1 "


def test_timeout_cancels_a_silent_request(server: TritonServer) -> None:
    client = MMGPTClient(server.grpc_url, timeout=0.02)  # shorter than the 50 ms between pieces
    with pytest.raises(ResponseTimeout):
        list(client.stream("count 50"))


def test_unknown_model_error_names_it(server: TritonServer) -> None:
    with pytest.raises(RequestFailed, match="nosuchmodel"):
        MMGPTClient(server.grpc_url, model="nosuchmodel").ask("hi")
    health = MMGPTClient(server.grpc_url, model="nosuchmodel").health()
    assert not health.ok and health.ready


def test_cli_ctrl_c_returns_promptly_and_cancels(server: TritonServer, cancel_dir: Path) -> None:
    """SIGINT to `mmgpt-client ask` mid-answer: exit 130 within a second, and the server sees the cancel."""
    import signal

    before = set(cancel_dir.iterdir())
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmgpt.client.cli", "ask", "--url", server.grpc_url, "--text", "count 400"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.read(2)  # the first piece arrived: generation is under way
        assert first == "0 "
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        proc.wait(timeout=10)
        assert time.monotonic() - start < 2
        assert proc.returncode == 130
        assert "interrupted" in proc.stderr.read() if proc.stderr else False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 5
    while set(cancel_dir.iterdir()) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(cancel_dir.iterdir()) != before, "the server never saw the cancellation"
    assert server.is_ready()
