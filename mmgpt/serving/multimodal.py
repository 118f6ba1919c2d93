"""The entry point's logic: one `multimodal` request in, text pieces out.

    question = parse_question(inputs, settings)          # every input checked; InputError names the problem
    pipeline.answer(question, stages, replies, ...)      # image/audio branches, template, generation, text

`Stages` is what the entry point calls for the heavy parts: in Triton they are BLS requests to the
`whisper`, `vision_encoder` and LLM models (model_repository/multimodal/1/model.py); in tests they can
be in-process. Image decoding, the chat template, stop words and detokenization happen here, with the
very functions `mmgpt ask` uses (`load_image`, `prompt_ids`, `TextStream`), so a served greedy answer is
the reference answer token for token.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mmgpt import names
from mmgpt.config import MMGPTConfig
from mmgpt.generation import SamplingParams, TextStream, check_prompt
from mmgpt.preprocess import InputError, Limits, image_pixels, pixel_values
from mmgpt.serving import contract as c
from mmgpt.serving.tritonserver import process_alive  # noqa: F401 (re-exported: the entry point watches the LLM's pid)
from mmgpt.template import Message, fit_prompt, join_question, parse_history, prompt_ids

# ------------------------------------------------------------------------------------------------
# Settings (config.pbtxt parameters) and request parsing
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntrySettings:
    max_tokens_limit: int
    max_image_bytes: int = Limits.max_image_bytes
    max_image_pixels: int = Limits.max_image_pixels
    # Longest wait for the next piece from a stage before the request fails (a stage that hangs must
    # not hold a client forever; Triton 2.51's BLS has no per-response timeout of its own).
    response_timeout_s: float = 300.0
    # The longest a whole request may take; past it the LLM is told to stop and the client gets an error
    # saying so (a client that waits forever is a worker lost).
    request_deadline_s: float = 600.0
    # A conversation longer than the context loses its oldest turns (see `fit_prompt`) until the prompt
    # leaves this many tokens for the answer (or max_tokens, if smaller). Absurd histories are refused.
    min_answer_tokens: int = 64
    max_history_bytes: int = 1 << 20
    max_history_messages: int = 256

    @property
    def limits(self) -> Limits:
        return Limits(max_image_bytes=self.max_image_bytes, max_image_pixels=self.max_image_pixels)

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> EntrySettings:
        return cls(
            max_image_bytes=int(params["max_image_bytes"]),
            max_image_pixels=int(params["max_image_pixels"]),
            max_tokens_limit=int(params["max_tokens_limit"]),
            response_timeout_s=float(params["response_timeout_s"]),
            request_deadline_s=float(params["request_deadline_s"]),
            min_answer_tokens=int(params["min_answer_tokens"]),
            max_history_bytes=int(params["max_history_bytes"]),
            max_history_messages=int(params["max_history_messages"]),
        )


@dataclass(frozen=True)
class Question:
    text: str
    image: bytes | None
    audio: bytes | None
    history: tuple[Message, ...]
    params: SamplingParams
    stream: bool


def _utf8(raw: Any, what: str) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} is not valid UTF-8 (byte {e.start}): send text encoded as UTF-8") from None


def _bytes(inputs: Mapping[str, np.ndarray | None], name: str) -> bytes | None:
    value = c.first(inputs.get(name))
    if value is None:
        return None
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def parse_question(inputs: Mapping[str, np.ndarray | None], settings: EntrySettings) -> Question:
    """Check every input of the contract; raise InputError with a message meant for the user."""
    raw_text = c.first(inputs.get(c.TEXT_INPUT))
    if raw_text is None:
        raise InputError(f"{c.TEXT_INPUT} is required (it may be empty when {c.AUDIO_INPUT} holds the question)")
    text = _utf8(raw_text, c.TEXT_INPUT)
    image = _bytes(inputs, c.IMAGE_INPUT)
    audio = _bytes(inputs, c.AUDIO_INPUT)
    if not text.strip() and audio is None:
        raise InputError(f"no question: {c.TEXT_INPUT} is empty and there is no {c.AUDIO_INPUT}")
    raw_history = _bytes(inputs, c.HISTORY)
    if raw_history is not None and len(raw_history) > settings.max_history_bytes:
        raise InputError(f"{c.HISTORY} is {len(raw_history):,} bytes, over the limit of {settings.max_history_bytes:,} "
                         "(max_history_bytes): send fewer or shorter earlier turns")
    try:
        history = tuple(parse_history(raw_history)) if raw_history is not None else ()
    except InputError:
        raise
    except ValueError as e:
        raise InputError(str(e)) from None
    if len(history) > settings.max_history_messages:
        raise InputError(f"{c.HISTORY} holds {len(history)} messages, over the limit of {settings.max_history_messages} "
                         "(max_history_messages): send fewer earlier turns")

    def scalar(name: str, cast: Callable, default):
        value = c.first(inputs.get(name))
        return default if value is None else cast(value)

    words = inputs.get(c.STOP_WORDS)
    stop_words = tuple(_utf8(w, c.STOP_WORDS) for w in np.asarray(words).reshape(-1)) if words is not None else ()
    defaults = SamplingParams()
    params = SamplingParams(
        max_tokens=scalar(c.MAX_TOKENS, int, defaults.max_tokens),
        temperature=scalar(c.TEMPERATURE, float, defaults.temperature),
        top_p=scalar(c.TOP_P, float, defaults.top_p),
        top_k=scalar(c.TOP_K, int, defaults.top_k),
        seed=scalar(c.SEED, int, defaults.seed),
        stop_words=stop_words,
    )
    params.validate(settings.max_tokens_limit)
    return Question(text, image, audio, history, params, stream=scalar(c.STREAM, bool, True))


# ------------------------------------------------------------------------------------------------
# Stages and the answer
# ------------------------------------------------------------------------------------------------


class Stages(Protocol):
    def transcribe(self, audio: bytes) -> str:
        """Encoded audio -> transcript; InputError for audio that cannot be used."""

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """(1, 3, S, S) pixel values -> (N, D) prompt table."""

    def generate(
        self, request_id: str, input_ids: list[int], prompt_table: np.ndarray | None, params: SamplingParams, end_id: int
    ) -> Generator[list[int], None, None] | ResponsePump:
        """New token ids in chunks as the LLM produces them; an empty chunk now and then while waiting,
        so the caller can look for cancellation. `close()` ends the reading early."""

    def stop(self, request_id: str) -> None:
        """Tell the LLM to stop generating for request_id (cancellation is not passed on through BLS)."""


# (outputs by contract name, final); (None, True) = a bare end. Every response carries every output: the
# transcript and history_dropped are filled on the first, the counts and finish_reason on the last.
Send = Callable[[dict[str, Any] | None, bool], None]


class Replies:
    """What the client receives: with stream, each response carries the new text only, and the transcript
    rides on the first response (sent as soon as it is known); without stream, exactly one response
    carries the whole answer and the transcript. Concatenating each output over the responses gives the
    whole text and the whole transcript either way."""

    def __init__(self, send: Send, *, stream: bool):
        self.send = send
        self.stream = stream
        self.transcript = ""
        self.dropped = 0
        self.parts: list[str] = []
        self.sent = False
        self.closed = False

    def heard(self, transcript: str, dropped: int = 0) -> None:
        """What the audio said and how many earlier messages were cut to fit the context; streamed at once."""
        self.transcript = transcript
        self.dropped = dropped
        if self.stream and (transcript or dropped):
            self._send("", final=False)

    def piece(self, text: str) -> None:
        if not text:
            return
        if self.stream:
            self._send(text, final=False)
        else:
            self.parts.append(text)

    def close(self, finish_reason: str = "stop", prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """The last response: the rest of the text (all of it without stream), the counts and why it ended."""
        end = {c.FINISH_REASON: finish_reason, c.PROMPT_TOKENS: prompt_tokens, c.COMPLETION_TOKENS: completion_tokens}
        self._send("" if self.stream else "".join(self.parts), final=True, end=end)
        self.closed = True

    def _send(self, text: str, *, final: bool, end: dict[str, Any] | None = None) -> None:
        first = not self.sent
        self.send({
            c.TEXT_OUTPUT: text, c.TRANSCRIPT: self.transcript if first else "",
            c.HISTORY_DROPPED: self.dropped if first else 0,
            **(end or {c.FINISH_REASON: "", c.PROMPT_TOKENS: 0, c.COMPLETION_TOKENS: 0}),
        }, final)
        self.sent = True


class Pipeline:
    """The entry point's state: config, tokenizer and image processor of one export."""

    def __init__(self, config: MMGPTConfig, tokenizer, image_processor, settings: EntrySettings):
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.settings = settings

    @classmethod
    def load(cls, export_dir: str | Path, settings: EntrySettings) -> Pipeline:
        from transformers import AutoTokenizer, CLIPImageProcessor

        d = Path(export_dir)
        return cls(
            MMGPTConfig.load(d), AutoTokenizer.from_pretrained(d / names.TOKENIZER_DIR),
            CLIPImageProcessor.from_pretrained(d / names.VISION_DIR), settings,
        )

    def warm_up(self) -> None:
        """Exercise the tokenizer, template and image preprocessing once (first calls are slow)."""
        from PIL import Image

        pixel_values([Image.new("RGB", (8, 8))], self.image_processor)
        ids = prompt_ids(self.config, self.tokenizer, [], "warm-up", has_image=True)
        stream = TextStream(self.tokenizer)
        for t in ids[:4]:
            stream.push(t)

    def answer(
        self,
        question: Question,
        stages: Stages,
        replies: Replies,
        *,
        request_id: str,
        is_cancelled: Callable[[], bool],
    ) -> str:
        """Run one request to its end; returns "done", "stopped" (a stop word) or "cancelled". Raises InputError
        for a bad input, TimeoutError past the request deadline; either way the LLM has been told to stop."""
        started = time.monotonic()
        # Cheap local checks first: a bad image fails before any model runs.
        pixels = None
        if question.image is not None:
            pixels = image_pixels(question.image, self.image_processor, self.settings.limits)
        # Whisper and the vision encoder are separate models: with both inputs, run them at the same time.
        # Leaving the `with` waits for the encoder, so it never runs on behind an error (the audio's is raised).
        with ThreadPoolExecutor(1) as pool:
            image_job = pool.submit(stages.encode_image, pixels) if pixels is not None and question.audio is not None else None
            transcript = stages.transcribe(question.audio) if question.audio is not None else ""
            table = image_job.result() if image_job is not None else None
        try:
            asked = join_question(question.text, transcript)
        except ValueError as e:
            raise InputError(f"{e} (the audio was transcribed as {transcript!r})") from None
        if pixels is not None and table is None:
            table = stages.encode_image(pixels)
        room = min(question.params.max_tokens, self.settings.min_answer_tokens)
        ids, dropped = fit_prompt(self.config, self.tokenizer, question.history, asked,
                                  has_image=table is not None, room=room)
        check_prompt(len(ids), self.config.max_context)
        # The same budget as generate_ids: the LLM gets no more than the context leaves.
        params = replace(question.params, max_tokens=min(question.params.max_tokens, self.config.max_context - len(ids)))
        replies.heard(transcript, dropped)
        if is_cancelled():
            return "cancelled"

        text = TextStream(self.tokenizer, params.stop_words)
        eos = self.config.eos_token_id
        deadline = started + self.settings.request_deadline_s
        chunks = stages.generate(request_id, ids, table, params, eos)
        stopped = False
        produced = 0
        try:
            for chunk in chunks:
                if is_cancelled():
                    stages.stop(request_id)
                    stopped = True
                    return "cancelled"
                if time.monotonic() > deadline:
                    stages.stop(request_id)
                    stopped = True
                    raise TimeoutError(f"the answer was not finished within the request deadline of "
                                       f"{self.settings.request_deadline_s:g} s (request_deadline_s)")
                ended = eos in chunk  # an LLM that returns its end id (ours never does)
                for token in chunk[: chunk.index(eos)] if ended else chunk:
                    produced += 1
                    replies.piece(text.push(token))
                    if text.stopped:
                        stages.stop(request_id)
                        stopped = True
                        replies.close("stop", len(ids), produced)
                        return "stopped"
                if ended:
                    break
        except BaseException:
            if not stopped:  # a stage that failed or timed out: the LLM must not go on generating for nobody
                try:
                    stages.stop(request_id)
                except Exception:
                    pass  # the original failure is what the client needs to hear about
            raise
        finally:
            chunks.close()
        replies.piece(text.finish())
        # The LLM ends a sequence at its end token or at its token budget; only the budget stops at max_tokens.
        replies.close("length" if produced >= params.max_tokens else "stop", len(ids), produced)
        return "done"


# ------------------------------------------------------------------------------------------------
# Reading a streamed BLS response with a timeout
# ------------------------------------------------------------------------------------------------


class ResponsePump:
    """Iterate a blocking response iterator from a helper thread, with a poll interval and a timeout.

    Triton 2.51's decoupled BLS iterator blocks until the next response; read directly, a cancelled
    client would go unnoticed until then and a stage that hangs would hold the request forever. Each
    `__next__` returns the next decoded chunk, or [] after `poll_s` without one; raises TimeoutError
    after `timeout_s` without any response and re-raises what the reader raised.

    The reader thread alone touches the responses (it decodes them into plain lists): Triton's response
    objects are not safe to use from two threads. `close()` waits for it to reach the end of the stream,
    so nothing of a request outlives it but the ended stream itself, handed to `keep` (FinishedStreams.hold).
    """

    def __init__(
        self,
        start: Callable[[], Iterable[Any]],
        decode: Callable[[Any], list[int]],
        *,
        timeout_s: float,
        poll_s: float = 0.05,
        alive: Callable[[], bool] | None = None,
        alive_every_s: float = 1.0,
        keep: Callable[[Any], None] | None = None,
    ):
        self._queue: queue.Queue = queue.Queue()
        self._timeout_s = timeout_s
        self._poll_s = poll_s
        self._last = time.monotonic()
        self._done = False
        # Is the process answering still there? Asked while waiting: a model process that died never sends
        # another response, and waiting for the timeout would hold the client (and this instance) for minutes.
        self._alive = alive
        self._alive_every_s = alive_every_s
        self._checked = self._last
        self._abandoned = False
        self._keep = keep  # given the stream once it has ended (FinishedStreams.hold): it must not be freed here
        self._thread = threading.Thread(target=self._read, args=(start, decode), daemon=True, name="bls-reader")
        self._thread.start()

    def _read(self, start: Callable[[], Iterable[Any]], decode: Callable[[Any], list[int]]) -> None:
        error = None
        stream = None
        try:
            stream = start()
            for item in stream:
                if error is None:
                    try:
                        self._queue.put(("item", decode(item)))
                    except BaseException as e:  # handed to the consumer; the stream is still drained
                        error = e
                        self._queue.put(("error", e))
        except BaseException as e:
            if error is None:
                self._queue.put(("error", e))
        if stream is not None and self._keep is not None:
            self._keep(stream)
        del stream
        self._queue.put(("end", None))

    def __iter__(self) -> ResponsePump:
        return self

    def __next__(self) -> list[int]:
        if self._done:
            raise StopIteration
        try:
            kind, value = self._queue.get(timeout=self._poll_s)
        except queue.Empty:
            now = time.monotonic()
            if now - self._last > self._timeout_s:
                self._done = True
                raise TimeoutError(f"no response from the LLM within {self._timeout_s:g} s") from None
            if self._alive is not None and now - self._checked >= self._alive_every_s:
                self._checked = now
                if not self._alive():
                    self._done = self._abandoned = True  # its reader waits for a response that never comes
                    raise LLMGone("the LLM's process stopped before this answer was finished (the server is "
                                  "restarting it): ask again") from None
            return []
        self._last = time.monotonic()
        if kind == "end":
            self._done = True
            raise StopIteration
        if kind == "error":
            self._done = True
            raise value
        return value

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop yielding and wait (at most timeout_s) for the reader to reach the end of the stream."""
        self._done = True
        if not self._abandoned:
            self._thread.join(timeout_s)


class FinishedStreams:
    """Ended BLS response streams, held until Triton's stub has let go of them, then freed here, under the GIL.

    Why: Triton 2.51's stub (python_backend before #390, "Hold GIL when deleting numpy array") also keeps each
    decoupled BLS stream in a map, which its helper thread erases after the stream's last response, without the
    GIL. When that erase drops the last reference, every response's numpy arrays are freed without the GIL while
    Python threads run: heap corruption, and under load a dead entry-point process ("Stub process ... is not
    healthy", requests lost; seen in the soak, more often as tokens came faster). Held in Python until then, the
    last reference is always Python's.

    When is "then"? The erase is queued on the same helper thread, first in first out, as the round trip of
    `is_cancelled()`. So a round trip that started after a stream ended and came back False (a cancel, once
    seen, is cached and makes no round trip) proves the stream's erase has run: `barrier` frees those streams.
    The entry point polls is_cancelled while it streams, so a stream is held until its own request's or the
    next request's first poll.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[Any] = []

    def hold(self, stream: Any) -> None:
        with self._lock:
            self._held.append(stream)

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def barrier(self, round_trip: Callable[[], bool]) -> bool:
        """round_trip() (the sender's is_cancelled); when it says False, free the streams held before it started.
        One thread calls this (the instance's; hold may be called from any)."""
        with self._lock:
            before = len(self._held)
        answer = round_trip()
        if not answer and before:
            with self._lock:
                done, self._held = self._held[:before], self._held[before:]
            del done  # the last references: freed here, by a Python thread
        return answer


class LLMGone(RuntimeError):
    """The process of the LLM model died while it was generating for this request."""


class ShuttingDown(RuntimeError):
    """The launcher is stopping the server: no new requests."""


@contextmanager
def busy(path: Path) -> Iterator[None]:
    """A file holding this process's pid while the block runs: what a drain waits for (TritonServer._drain)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")
    try:
        yield
    finally:
        with suppress(OSError):
            path.unlink()


def refuse_if_draining(marker: Path) -> None:
    """Raise ShuttingDown while the launcher's drain marker exists (`TritonServer.stop`)."""
    if marker.exists():
        raise ShuttingDown("the server is shutting down and takes no new requests (the running answers are "
                           "finishing): ask again once it is back")


def failure(error: BaseException) -> tuple[str, str]:
    """(kind, message) for a failed request: "invalid" (bad input: the message is for the user),
    "unavailable" (the server is stopping, or a model process died: asking again later can work) or
    "internal"."""
    if isinstance(error, InputError):
        return "invalid", c.INVALID_INPUT_PREFIX + str(error)
    if isinstance(error, (ShuttingDown, LLMGone)):
        return "unavailable", str(error)
    return "internal", f"internal error: {type(error).__name__}: {error}"



def is_restarting(message: str) -> bool:
    """Is this Triton error the one a model gives while its dead Python process waits to be replaced?"""
    return "Stub process" in message and "is not healthy" in message


def through_restarts(call: Callable[[], Any], error_of: Callable[[Any], str | None], *,
                     wait_s: float = 20.0, every_s: float = 0.25) -> Any:
    """call() -> its response, called again while the response is the error of a model whose process died
    and is being loaded again by the launcher (seconds; see TritonServer._supervise), for up to wait_s.
    Only for calls without side effects (whisper, the vision encoder): a retry must not do anything twice."""
    deadline = time.monotonic() + wait_s
    while True:
        response = call()
        error = error_of(response)
        if error is None or not is_restarting(error) or time.monotonic() >= deadline:
            return response
        time.sleep(every_s)


def read_pid(path: Path) -> int | None:
    """The pid a model process wrote at startup (`write_pid`), or None (no file: e.g. TensorRT-LLM's model)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def write_pid(path: Path) -> None:
    """Write this process's pid to `path` atomically (a reader never sees a half-written file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)
