"""The client library without a server: request building per the `multimodal` contract, error mapping,
and cancellation against a fake tritonclient stream."""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmgpt.client import (
    ClientError,
    InvalidInput,
    MMGPTClient,
    Piece,
    RequestFailed,
    ResponseTimeout,
    Result,
    ServerUnavailable,
)
from mmgpt.client.api import asked_question, build_inputs, history_json, triton_dtype
from mmgpt.template import Message, parse_history

# The entry point's declared inputs: name -> (Triton dtype, dims). max_batch_size 0, so the shapes are the dims.
CONTRACT = {
    "text_input": ("BYTES", [1]),
    "image_input": ("BYTES", [1]),
    "audio_input": ("BYTES", [1]),
    "history": ("BYTES", [1]),
    "max_tokens": ("INT32", [1]),
    "temperature": ("FP32", [1]),
    "top_p": ("FP32", [1]),
    "top_k": ("INT32", [1]),
    "seed": ("UINT64", [1]),
    "stop_words": ("BYTES", [-1]),
    "stream": ("BOOL", [1]),
}


def test_literal_contract_is_the_servers_declaration() -> None:
    """The contract above (as the issue states it) is what the server's single source of names declares."""
    from mmgpt.serving import contract

    declared = {name: (t.removeprefix("TYPE_").replace("STRING", "BYTES"), dims)
                for name, (t, dims, _optional) in contract.ENTRY_INPUTS.items()}
    assert declared == CONTRACT
    assert [n for n, (_t, _d, optional) in contract.ENTRY_INPUTS.items() if not optional] == ["text_input"]


def assert_matches_contract(inputs: dict[str, np.ndarray]) -> None:
    for name, array in inputs.items():
        assert name in CONTRACT, f"{name} is not an input of the model"
        dtype, dims = CONTRACT[name]
        assert triton_dtype(array) == dtype, name
        assert array.ndim == len(dims), name
        for got, want in zip(array.shape, dims):
            assert want == -1 or got == want, (name, array.shape)
        if dtype == "BYTES":
            assert array.dtype == np.object_ and all(isinstance(v, bytes) for v in array.reshape(-1)), name


# --------------------------------------------------------------------------------------------------
# Request building
# --------------------------------------------------------------------------------------------------


def test_minimal_request_sends_only_text_and_stream() -> None:
    inputs = build_inputs("What is this?")
    assert set(inputs) == {"text_input", "stream"}
    assert_matches_contract(inputs)
    assert inputs["text_input"].shape == (1,) and inputs["text_input"][0] == b"What is this?"
    assert inputs["stream"].dtype == np.bool_ and inputs["stream"].tolist() == [True]
    assert build_inputs("x", stream=False)["stream"].tolist() == [False]


def test_full_request_names_dtypes_and_values(tmp_path: Path) -> None:
    image = tmp_path / "cat.png"
    image.write_bytes(b"\x89PNG fake image bytes")
    history = [Message("user", "Hi"), {"role": "assistant", "content": "Hello, ünïcode"}]
    inputs = build_inputs(
        "and now?", image=image, audio=b"RIFF....WAVE", history=history, max_tokens=7, temperature=0.5,
        top_p=0.9, top_k=40, seed=2**64 - 1, stop_words=["\n", "User:"], stream=True,
    )
    assert set(inputs) == set(CONTRACT)
    assert_matches_contract(inputs)
    assert inputs["image_input"][0] == image.read_bytes()  # the path was read on the client
    assert inputs["audio_input"][0] == b"RIFF....WAVE"
    assert inputs["max_tokens"].tolist() == [7] and inputs["top_k"].tolist() == [40]
    assert inputs["temperature"][0] == np.float32(0.5) and inputs["top_p"][0] == np.float32(0.9)
    assert inputs["seed"].dtype == np.uint64 and int(inputs["seed"][0]) == 2**64 - 1
    assert inputs["stop_words"].shape == (2,) and inputs["stop_words"].tolist() == [b"\n", b"User:"]
    # The history is exactly what the server's parser accepts, oldest first.
    raw = inputs["history"][0]
    assert json.loads(raw.decode("utf-8")) == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, ünïcode"}]
    assert parse_history(raw) == [Message("user", "Hi"), Message("assistant", "Hello, ünïcode")]


def test_each_optional_input_is_sent_only_when_given() -> None:
    given = {
        "image": ("image_input", b"img"), "audio": ("audio_input", b"wav"),
        "history": ("history", [Message("user", "a"), Message("assistant", "b")]),
        "max_tokens": ("max_tokens", 3), "temperature": ("temperature", 0.0), "top_p": ("top_p", 1.0),
        "top_k": ("top_k", 0), "seed": ("seed", 0), "stop_words": ("stop_words", ["x"]),
    }
    for arg, (name, value) in given.items():
        inputs = build_inputs("q", **{arg: value})
        # Zero values (temperature 0, seed 0, top_k 0) are values, not "absent".
        assert set(inputs) == {"text_input", "stream", name}, arg
    assert set(build_inputs("q", history=(), stop_words=())) == {"text_input", "stream"}


def test_audio_alone_is_a_question_with_empty_text() -> None:
    inputs = build_inputs(audio=b"wav")
    assert inputs["text_input"].tolist() == [b""]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "no question"),
        ({"text": "   "}, "no question"),
        ({"text": "q", "image": "/nonexistent/cat.png"}, "image file not found"),
        ({"text": "q", "audio": b""}, "audio is empty"),
        ({"text": "q", "image": 3}, "image must be bytes or a file path"),
        ({"text": "q", "seed": -1}, "seed must be between 0 and"),
        ({"text": "q", "seed": 2**64}, "seed must be between 0 and"),
        ({"text": "q", "max_tokens": 2**31}, "max_tokens must be between"),
        ({"text": "q", "top_k": 1.5}, "top_k must be an integer"),
        ({"text": "q", "temperature": "hot"}, "temperature must be a number"),
        ({"text": "q", "stop_words": "User:"}, "not one string"),
        ({"text": "q", "stop_words": ["ok", ""]}, "non-empty strings"),
        ({"text": "q", "history": [Message("user", "look", image=True), Message("assistant", "ok")]}, "carries an image"),
        ({"text": "q", "history": [("user", "hi")]}, "must be a Message"),
    ],
)
def test_unsendable_arguments_are_refused_before_sending(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        build_inputs(**kwargs)


def test_history_json_keeps_order_and_unicode() -> None:
    turns = [Message("user", "1"), Message("assistant", "2"), Message("user", "3"), Message("assistant", "é")]
    assert [m["content"] for m in json.loads(history_json(turns))] == ["1", "2", "3", "é"]
    assert "é".encode() in history_json(turns)  # not \\u-escaped: the server reads UTF-8 JSON


def test_asked_question_is_the_servers_join() -> None:
    assert asked_question("What is it?", "") == "What is it?"
    assert asked_question("", " what was said ") == "what was said"
    assert asked_question("Typed", "spoken") == "Typed\nspoken"


# --------------------------------------------------------------------------------------------------
# Streaming, errors and cancellation with a fake tritonclient InferenceServerClient
# --------------------------------------------------------------------------------------------------


class FakeResult:
    def __init__(self, outputs: dict[str, str], final: bool):
        self._outputs = outputs
        self._final = final

    def as_numpy(self, name: str) -> np.ndarray | None:
        if name not in self._outputs:
            return None
        return np.array([self._outputs[name].encode()], dtype=np.object_)

    def get_response(self) -> Any:
        class Param:
            bool_param = self._final

        class Response:
            parameters = {"triton_final_response": Param()}

        return Response()


class FakeError(Exception):
    def __init__(self, msg: str, status: str | None = None):
        super().__init__(msg)
        self._msg, self._status = msg, status

    def message(self) -> str:
        return self._msg

    def status(self) -> str | None:
        return self._status


class FakeGrpc:
    """Plays a scripted list of (result, error) events into the stream callback from another thread.

    An event "WAIT" blocks the script until the stream is stopped (a server still generating).
    """

    def __init__(self, script: list[Any], refuse_enqueue: bool = False):
        self.script = script
        self.refuse_enqueue = refuse_enqueue
        self.sent: list[dict[str, Any]] = []
        self.stop_calls: list[bool] = []
        self.closed = False
        self._stopped = threading.Event()
        self._callback: Any = None

    def start_stream(self, callback: Any) -> None:
        self._callback = callback

    def async_stream_infer(self, model_name: str, inputs: list[Any], **kwargs: Any) -> None:
        self.sent.append({"model": model_name, "inputs": {i.name(): i for i in inputs}, **kwargs})
        if self.refuse_enqueue:
            self._callback(result=None, error=FakeError("failed to connect to all addresses", "StatusCode.UNAVAILABLE"))
            from tritonclient.utils import InferenceServerException

            raise InferenceServerException("The stream is no longer in valid state")
        threading.Thread(target=self._play, daemon=True).start()

    def _play(self) -> None:
        for event in self.script:
            if event == "WAIT":
                self._stopped.wait(10)
                return
            if self._stopped.is_set():
                return
            result, error = event
            self._callback(result=result, error=error)

    def stop_stream(self, cancel_requests: bool = False) -> None:
        self.stop_calls.append(cancel_requests)
        self._stopped.set()

    def close(self) -> None:
        self.closed = True


def piece(text: str = "", transcript: str | None = None, final: bool = False) -> tuple[FakeResult, None]:
    outputs = {"text_output": text}
    if transcript is not None:
        outputs["transcript"] = transcript
    return FakeResult(outputs, final), None


FINAL = (FakeResult({}, True), None)


def fake_client(fake: FakeGrpc, timeout: float | None = 5.0) -> MMGPTClient:
    client = MMGPTClient("127.0.0.1:1", timeout=timeout)
    client._connect = lambda: fake  # type: ignore[method-assign]
    return client


def test_stream_yields_pieces_until_the_final_response() -> None:
    fake = FakeGrpc([piece("Hel", ""), piece("lo"), piece(" there"), FINAL])
    pieces = list(fake_client(fake).stream("hi", max_tokens=5))
    assert [p.text for p in pieces] == ["Hel", "lo", " there"]
    [request] = fake.sent
    assert request["model"] == "multimodal"
    assert request["enable_empty_final_response"] is True  # how the end of a decoupled answer shows
    assert set(request["inputs"]) == {"text_input", "max_tokens", "stream"}
    assert request["inputs"]["max_tokens"].datatype() == "INT32"
    assert fake.stop_calls == [False] and fake.closed  # finished: nothing to cancel, stream closed


def test_ask_joins_pieces_and_keeps_the_transcript() -> None:
    fake = FakeGrpc([piece("", "what is red"), piece("A ", "what is red"), piece("colour.", "what is red"), FINAL])
    assert fake_client(fake).ask(audio=b"wav") == Result("A colour.", "what is red")


def test_transcript_is_passed_on_even_without_answer_text() -> None:
    fake = FakeGrpc([piece("", "heard this"), FINAL])
    answer = fake_client(fake).stream(audio=b"wav")
    assert list(answer) == [Piece("", "heard this")]
    assert answer.transcript == "heard this"


def test_final_response_may_carry_the_whole_answer() -> None:
    fake = FakeGrpc([piece("all at once", final=True)])
    assert fake_client(fake).ask("q", stream=False).text == "all at once"
    assert fake.sent[0]["inputs"]["stream"].datatype() == "BOOL"


def test_server_error_message_is_passed_through() -> None:
    fake = FakeGrpc([(None, FakeError("temperature must be >= 0 (0 = greedy), got -1.0"))])
    with pytest.raises(RequestFailed, match=r"temperature must be >= 0 \(0 = greedy\), got -1.0"):
        fake_client(fake).ask("q", temperature=-1)
    assert fake.stop_calls == [False]  # the server ended that request itself


def test_unreachable_server_says_how_to_start_it() -> None:
    fake = FakeGrpc([], refuse_enqueue=True)
    with pytest.raises(ServerUnavailable, match=r"is the server running\? Start it with `make serve`") as info:
        fake_client(fake).ask("q")
    assert "127.0.0.1:1" in str(info.value) and isinstance(info.value, ConnectionError)


def test_real_connection_refused_is_server_unavailable() -> None:
    from mmgpt.serving.tritonserver import free_port

    client = MMGPTClient(f"127.0.0.1:{free_port()}", timeout=10)
    start = time.monotonic()
    with pytest.raises(ServerUnavailable, match="make serve"):
        client.ask("q")
    assert time.monotonic() - start < 5
    health = client.health(timeout=2)
    assert not health.ok and "make serve" in health.detail


def test_silent_server_times_out_and_cancels() -> None:
    fake = FakeGrpc([piece("first"), "WAIT"])
    answer = fake_client(fake, timeout=0.3).stream("q")
    assert next(answer).text == "first"
    start = time.monotonic()
    with pytest.raises(ResponseTimeout, match="no response .* within 0.3 s"):
        next(answer)
    assert time.monotonic() - start < 2
    assert fake.stop_calls == [True] and fake.closed


def test_closing_the_answer_early_cancels_on_the_server() -> None:
    fake = FakeGrpc([piece("a"), piece("b"), "WAIT"])
    with fake_client(fake).stream("q") as answer:
        assert next(answer).text == "a"
    assert fake.stop_calls == [True] and fake.closed


def test_breaking_out_of_a_for_loop_with_the_context_manager_cancels() -> None:
    fake = FakeGrpc([piece("a"), piece("b"), "WAIT"])
    with fake_client(fake).stream("q") as answer:
        for p in answer:
            if p.text == "b":
                break
    assert fake.stop_calls == [True]


def test_ctrl_c_while_waiting_cancels_and_propagates() -> None:
    """A KeyboardInterrupt raised inside the wait (as SIGINT does) cancels the request, then propagates."""
    fake = FakeGrpc([piece("a"), "WAIT"])
    client = fake_client(fake, timeout=None)
    real_get = queue.Queue.get
    calls = {"n": 0}

    def interrupted_get(self: queue.Queue, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:  # the wait for the second piece
            raise KeyboardInterrupt
        return real_get(self, *args, **kwargs)

    queue.Queue.get = interrupted_get  # type: ignore[method-assign]
    try:
        answer = client.stream("q")
        assert next(answer).text == "a"
        with pytest.raises(KeyboardInterrupt):
            next(answer)
    finally:
        queue.Queue.get = real_get  # type: ignore[method-assign]
    assert fake.stop_calls == [True] and fake.closed


def test_nothing_is_sent_before_the_first_piece_is_asked_for() -> None:
    fake = FakeGrpc([piece("a"), FINAL])
    answer = fake_client(fake).stream("q")
    assert fake.sent == []
    answer.close()  # never started: nothing to cancel
    assert fake.sent == [] and fake.stop_calls == []


def test_invalid_input_is_raised_at_call_time_not_at_iteration() -> None:
    fake = FakeGrpc([])
    with pytest.raises(InvalidInput):
        fake_client(fake).stream("")
    assert issubclass(InvalidInput, ClientError) and issubclass(InvalidInput, ValueError)


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout"):
        MMGPTClient(timeout=0)
