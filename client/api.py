"""A typed client for the served assistant: one question in, the answer streamed back over gRPC.

    from mmgpt.client import MMGPTClient

    client = MMGPTClient("localhost:8001")
    for piece in client.stream("What is in the picture?", image="cat.jpg"):
        print(piece.text, end="", flush=True)
    result = client.ask(audio="question.wav")      # Result(text=..., transcript=...)

It speaks the `multimodal` model's contract (tensor names, dtypes and shapes live in `build_inputs`), one
gRPC bidirectional stream per question. Images and audio are sent as encoded file bytes; a path is read
here, on the client, because the server never opens paths. Closing the iterator early, or Ctrl-C while
it waits, cancels the request on the server (`stop_stream(cancel_requests=True)`), so generation stops
there too.
"""

from __future__ import annotations

import json
import os
import queue
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmgpt.serving import contract
from mmgpt.template import Message, join_question

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_URL",
    "ClientError",
    "AnswerStream",
    "Health",
    "InvalidInput",
    "MMGPTClient",
    "Piece",
    "RequestFailed",
    "RequestRejected",
    "ResponseTimeout",
    "Result",
    "ServerUnavailable",
    "asked_question",
    "build_inputs",
]

DEFAULT_URL = "localhost:8001"
DEFAULT_MODEL = contract.MULTIMODAL
# The wait for any one response. The first one includes transcription and the image prefill, which on a
# CPU with full-size Phi-2 takes seconds, not minutes; a server that says nothing for this long is stuck.
DEFAULT_TIMEOUT_S = 120.0

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1

# Bytes, or a path to a file whose bytes are sent.
Media = bytes | bytearray | memoryview | str | os.PathLike
# A history entry: a Message, or a {"role", "content"} mapping as in the served JSON.
Turn = Message | Mapping[str, str]


# ------------------------------------------------------------------------------------------------------
# Errors: every one a ClientError whose message is meant to be shown to the user as is.
# ------------------------------------------------------------------------------------------------------


class ClientError(Exception):
    """Base of the client's errors."""


class InvalidInput(ClientError, ValueError):
    """An argument the client cannot send (a missing file, a number out of the tensor's range, ...)."""


class ServerUnavailable(ClientError, ConnectionError):
    """No server answered at the URL."""


class RequestFailed(ClientError):
    """The server rejected or failed the request; the message is the server's."""


class RequestRejected(RequestFailed):
    """The server refused the request's input (a corrupt image, audio over its limits, ...); the message says
    why. Sending the same request again fails the same way."""


class ServerBusy(RequestFailed):
    """The server had no room for the request (its queue was full, or it waited past the server's limit):
    nothing was generated; ask again shortly."""


BUSY_MESSAGES = ("Exceeds maximum queue size", "Request timeout expired", "busy: ")  # Triton's queue policy, our LLM


class ResponseTimeout(ClientError, TimeoutError):
    """The server sent nothing for `timeout` seconds; the request was cancelled."""


# ------------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """One streamed response: the new answer text, and what was heard in the audio ("" without audio).

    A piece may carry only the transcript (text ""): it is passed on as soon as the server sends it.
    """

    text: str
    transcript: str = ""
    # How many of the oldest history messages the server left out to fit its context (0: none). A chat
    # drops them from its own history too, or every later turn is cut the same way.
    history_dropped: int = 0
    # On the last piece: "stop" (the model ended, or a stop word) or "length" (max_tokens or the context),
    # and the token counts (the prompt as the model read it, image positions included; the answer).
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Result:
    text: str
    transcript: str = ""
    history_dropped: int = 0
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Health:
    url: str
    live: bool
    ready: bool
    model_ready: bool
    detail: str = ""  # why not ok, in words

    @property
    def ok(self) -> bool:
        return self.live and self.ready and self.model_ready


class AnswerStream(Iterator[Piece]):
    """The pieces of one answer; a context manager that cancels the request if left before the end.

        with client.stream("Describe it", image="cat.jpg") as answer:
            for piece in answer:
                ...
        answer.transcript                  # what was heard ("" without audio)
    """

    def __init__(self, pieces: Iterator[Piece]):
        self._pieces = pieces
        self.transcript = ""
        self.history_dropped = 0
        self.finish_reason = ""
        self.prompt_tokens = self.completion_tokens = 0

    def __iter__(self) -> AnswerStream:
        return self

    def __next__(self) -> Piece:
        piece = next(self._pieces)
        self.transcript = self.transcript or piece.transcript
        self.history_dropped = self.history_dropped or piece.history_dropped
        if piece.finish_reason:
            self.finish_reason = piece.finish_reason
            self.prompt_tokens, self.completion_tokens = piece.prompt_tokens, piece.completion_tokens
        return piece

    def close(self) -> None:
        """Stop waiting; cancels the request on the server unless it already finished."""
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> AnswerStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------------
# Request building (pure: unit-tested without a server)
# ------------------------------------------------------------------------------------------------------


def read_media(value: Media | None, what: str) -> bytes | None:
    """Bytes as they are; a str/PathLike is a file on this machine, read here."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise InvalidInput(f"{what} file not found: {path}")
        data = path.read_bytes()
    else:
        raise InvalidInput(f"{what} must be bytes or a file path, got {type(value).__name__}")
    if not data:
        raise InvalidInput(f"{what} is empty (0 bytes)")
    return data


def history_json(history: Sequence[Turn]) -> bytes:
    """The served `history` input: a JSON list of {"role", "content"}, oldest first, UTF-8."""
    items = []
    for i, turn in enumerate(history):
        if isinstance(turn, Message):
            if turn.image:
                raise InvalidInput(
                    f"history[{i}] carries an image; the server takes an image only with the current question "
                    "(pass image=...)"
                )
            role, content = turn.role, turn.content
        elif isinstance(turn, Mapping):
            role, content = turn.get("role"), turn.get("content")
        else:
            raise InvalidInput(f"history[{i}] must be a Message or a {{'role', 'content'}} mapping")
        if not isinstance(role, str) or not isinstance(content, str):
            raise InvalidInput(f"history[{i}] needs a string 'role' and a string 'content'")
        items.append({"role": role, "content": content})
    return json.dumps(items, ensure_ascii=False).encode("utf-8")


def _check_int(name: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInput(f"{name} must be an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise InvalidInput(f"{name} must be between {low} and {high}, got {value}")
    return int(value)


def _check_float(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InvalidInput(f"{name} must be a number, got {value!r}")
    return float(value)


def build_inputs(
    text: str = "",
    *,
    image: Media | None = None,
    audio: Media | None = None,
    history: Sequence[Turn] = (),
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop_words: Sequence[str] = (),
    stream: bool = True,
) -> dict[str, np.ndarray]:
    """Input name -> array, exactly as the `multimodal` model declares them (`contract.ENTRY_INPUTS`).

    Inputs left at None/empty are omitted so the server applies its own defaults; `text_input` and
    `stream` are always sent. Only what cannot be encoded is checked here (ranges of the integer
    dtypes, files); the meaning of the values (temperature >= 0, ...) is the server's to judge.
    """
    if not isinstance(text, str):
        raise InvalidInput(f"text must be a string, got {type(text).__name__}")
    image_bytes = read_media(image, "image")
    audio_bytes = read_media(audio, "audio")
    if not text.strip() and audio_bytes is None:
        raise InvalidInput("no question: give text, audio with a spoken question, or both")

    def one_bytes(b: bytes) -> np.ndarray:
        return np.array([b], dtype=np.object_)  # BYTES [1]

    inputs: dict[str, np.ndarray] = {contract.TEXT_INPUT: one_bytes(text.encode("utf-8"))}
    if image_bytes is not None:
        inputs[contract.IMAGE_INPUT] = one_bytes(image_bytes)
    if audio_bytes is not None:
        inputs[contract.AUDIO_INPUT] = one_bytes(audio_bytes)
    if history:
        inputs[contract.HISTORY] = one_bytes(history_json(history))
    if max_tokens is not None:
        inputs[contract.MAX_TOKENS] = np.array([_check_int("max_tokens", max_tokens, 0, INT32_MAX)], dtype=np.int32)
    if temperature is not None:
        inputs[contract.TEMPERATURE] = np.array([_check_float("temperature", temperature)], dtype=np.float32)
    if top_p is not None:
        inputs[contract.TOP_P] = np.array([_check_float("top_p", top_p)], dtype=np.float32)
    if top_k is not None:
        inputs[contract.TOP_K] = np.array([_check_int("top_k", top_k, 0, INT32_MAX)], dtype=np.int32)
    if seed is not None:
        inputs[contract.SEED] = np.array([_check_int("seed", seed, 0, UINT64_MAX)], dtype=np.uint64)
    if isinstance(stop_words, str):  # a lone string would otherwise become one stop word per character
        raise InvalidInput("stop_words must be a sequence of strings, not one string")
    if stop_words:
        words = list(stop_words)
        if any(not isinstance(w, str) or not w for w in words):
            raise InvalidInput("stop_words must be non-empty strings")
        inputs[contract.STOP_WORDS] = np.array([w.encode("utf-8") for w in words], dtype=np.object_)  # BYTES [-1]
    inputs[contract.STREAM] = np.array([bool(stream)], dtype=np.bool_)
    return inputs


_TRITON_DTYPES = {
    np.dtype(np.object_): "BYTES",
    np.dtype(np.int32): "INT32",
    np.dtype(np.float32): "FP32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.bool_): "BOOL",
}


def triton_dtype(array: np.ndarray) -> str:
    return _TRITON_DTYPES[array.dtype]


def asked_question(text: str, transcript: str) -> str:
    """The question as the model saw it (typed text, then what was heard): what a chat keeps as the user turn."""
    return join_question(text, transcript)


# ------------------------------------------------------------------------------------------------------
# The client
# ------------------------------------------------------------------------------------------------------


def _decode(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _first(result: Any, name: str) -> str | None:
    array = result.as_numpy(name)
    if array is None or array.size == 0:
        return None
    return _decode(array.reshape(-1)[0])


class MMGPTClient:
    """The served assistant over gRPC.

    `timeout` bounds the wait for each response (not the whole answer); None waits forever. Thread-safe:
    every question opens its own gRPC stream, so one client can serve several threads at once.
    """

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float | None = DEFAULT_TIMEOUT_S, model: str = DEFAULT_MODEL):
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
        self.url = url
        self.timeout = timeout
        self.model = model

    def __repr__(self) -> str:
        return f"MMGPTClient(url={self.url!r}, model={self.model!r}, timeout={self.timeout})"

    # -- plumbing (overridden by tests with a fake) ---------------------------------------------

    def _connect(self) -> Any:
        """A tritonclient.grpc.InferenceServerClient for one stream."""
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.url)

    def _unavailable(self, detail: str) -> ServerUnavailable:
        return ServerUnavailable(
            f"cannot reach the mmgpt server at {self.url} ({detail}): is the server running? Start it with "
            "`make serve`, or pass the right address with --url / MMGPTClient(url=...)"
        )

    def _error(self, error: Exception) -> ClientError:
        status = getattr(error, "status", lambda: None)()
        message = error.message() if hasattr(error, "message") else str(error)
        if "shutting down" in message:  # the server answered: it is stopping (a drain)
            return RequestFailed(message)
        if status is not None and "UNAVAILABLE" in str(status):
            return self._unavailable(message)
        if status is not None and "CANCELLED" in str(status):
            return RequestFailed(f"the request was cancelled: {message}")
        if any(m in message for m in BUSY_MESSAGES):
            return ServerBusy(f"the server is busy: {message}")
        if (status is not None and "INVALID_ARGUMENT" in str(status)) or contract.INVALID_INPUT_PREFIX in message:
            return RequestRejected(message)
        if "has no available versions" in message:  # what Triton says while it drains before exiting
            return RequestFailed(f"{message}: the server is not serving {self.model!r} now (it is shutting down, "
                                 "or the model is being loaded); ask again when `health()` says it is ready")
        return RequestFailed(message)

    # -- asking -----------------------------------------------------------------------------------

    def stream(
        self,
        text: str = "",
        *,
        image: Media | None = None,
        audio: Media | None = None,
        history: Sequence[Turn] = (),
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop_words: Sequence[str] = (),
        stream: bool = True,
    ) -> AnswerStream:
        """Ask one question; iterate the answer as it arrives (with `stream=False`, in one piece).

        `image`/`audio`: encoded file bytes, or a path read here. `history`: earlier turns, oldest first,
        as Messages or {"role", "content"} mappings in user/assistant pairs. Sampling arguments left at
        None take the server's defaults (greedy). Raises InvalidInput before anything is sent, then
        ServerUnavailable, RequestFailed (the server's message) or ResponseTimeout while iterating.
        Leaving the `with` block or calling close() before the end, or a KeyboardInterrupt while it waits,
        cancels the request on the server. Nothing is sent until the first piece is asked for.
        """
        inputs = build_inputs(
            text, image=image, audio=audio, history=history, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, stop_words=stop_words, stream=stream,
        )
        return AnswerStream(self._stream_inputs(inputs))

    def ask(self, text: str = "", **kwargs: Any) -> Result:
        """`stream(...)` joined: the whole answer and the transcript."""
        with self.stream(text, **kwargs) as answer:
            joined = "".join(piece.text for piece in answer)
        return Result(joined, answer.transcript, answer.history_dropped, answer.finish_reason, answer.prompt_tokens,
                      answer.completion_tokens)

    def transcribe(self, audio: Media, *, model: str = contract.WHISPER) -> str:
        """What the server's Whisper hears in `audio` (encoded file bytes or a path): the `whisper` model alone,
        no answer. Raises like `stream`."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        data = read_media(audio, "audio")
        if data is None:
            raise InvalidInput("audio is required")
        tensor = grpcclient.InferInput(contract.AUDIO_INPUT, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
        client = self._connect()
        try:
            result = client.infer(model, [tensor], client_timeout=self.timeout)
        except InferenceServerException as e:
            if "Deadline Exceeded" in (e.message() or ""):
                raise ResponseTimeout(f"no transcript from {self.url} within {self.timeout:g} s") from None
            raise self._error(e) from None
        finally:
            client.close()
        return _first(result, contract.TRANSCRIPT) or ""

    def _stream_inputs(self, inputs: Mapping[str, np.ndarray]) -> Iterator[Piece]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        tensors = []
        for name, array in inputs.items():
            tensor = grpcclient.InferInput(name, list(array.shape), triton_dtype(array))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)

        events: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client = self._connect()
        finished = False
        try:
            client.start_stream(callback=lambda result, error: events.put((result, error)))
            try:
                client.async_stream_infer(
                    self.model, tensors, request_id=uuid.uuid4().hex, enable_empty_final_response=True
                )
            except InferenceServerException as e:
                # A stream that failed at once (no server) refuses the request; the reason is in the callback.
                try:
                    _, error = events.get(timeout=5.0)
                except queue.Empty:
                    error = None
                raise self._error(error if error is not None else e) from None

            transcript, dropped = "", 0
            while True:
                try:
                    result, error = events.get(timeout=self.timeout)
                except queue.Empty:
                    raise ResponseTimeout(
                        f"no response from {self.url} within {self.timeout:g} s; the request was cancelled "
                        "(raise the timeout for slow models)"
                    ) from None
                if error is not None:
                    finished = True  # the server ended this request itself; nothing to cancel
                    raise self._error(error)
                heard = "" if transcript else (_first(result, contract.TRANSCRIPT) or "")
                transcript = transcript or heard
                cut = 0 if dropped else int(_first(result, contract.HISTORY_DROPPED) or 0)
                dropped = dropped or cut
                text = _first(result, contract.TEXT_OUTPUT) or ""
                final = bool(result.get_response().parameters["triton_final_response"].bool_param)
                reason = (_first(result, contract.FINISH_REASON) or "") if final else ""
                if text or heard or cut or reason:  # the transcript is passed on as soon as it is known
                    counts = [int(_first(result, n) or 0) for n in (contract.PROMPT_TOKENS, contract.COMPLETION_TOKENS)]
                    yield Piece(text, transcript, dropped, reason, *(counts if reason else (0, 0)))
                if final:
                    finished = True
                    return
        finally:
            # Reached on normal end, on errors, on close() of this generator (GeneratorExit) and on
            # KeyboardInterrupt while waiting. Unless the server already sent the final response, cancel:
            # the server sees is_cancelled() and stops generating instead of talking to nobody.
            try:
                client.stop_stream(cancel_requests=not finished)
            finally:
                client.close()

    # -- health -----------------------------------------------------------------------------------

    def health(self, timeout: float = 5.0) -> Health:
        """Is the server live and ready, and is the model loaded? Never raises for an unreachable server."""
        from tritonclient.utils import InferenceServerException

        client = self._connect()
        try:
            live = bool(client.is_server_live(client_timeout=timeout))
            ready = bool(client.is_server_ready(client_timeout=timeout))
            model_ready = bool(client.is_model_ready(self.model, client_timeout=timeout))
        except InferenceServerException as e:
            return Health(self.url, False, False, False, str(self._error(e)))
        finally:
            client.close()
        detail = "" if model_ready else f"model {self.model!r} is not ready" if ready else "server is not ready"
        return Health(self.url, live, ready, model_ready, detail)
