"""`make api`: an OpenAI-compatible HTTP API (and the web chat at /) in front of the served `multimodal` model.

    make serve                                   # tritonserver, gRPC on 127.0.0.1:8001
    make api                                     # http://127.0.0.1:8080/v1 (and the chat page at /)

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="-")
    client.chat.completions.create(model="mmgpt", messages=[{"role": "user", "content": "Hello"}])

A thin translation and nothing else: `openai_compat.parse_chat_request` turns a body into the contract's
request and `MMGPTClient` sends it over gRPC to one of the Triton servers given (round-robin over those whose
health check passes). Every answer the model gives comes from Triton; nothing here knows about models.

Where this API goes past OpenAI's, and what it decides:
- `transcript`: a response (and the first stream chunk that knows it) carries, as an extra top-level field,
  what Whisper heard in the last message's audio; `history_dropped` says how many of the oldest messages the
  server left out to fit its context. The OpenAI Python client exposes both as attributes (extra fields).
- One image per conversation (the contract's): the latest image in any user message; see openai_compat.
- Generation always streams from Triton, also for `stream: false`, so a client that goes away cancels the
  generation in either mode (the LLM's `mmgpt_llm_cancelled_total` counts it).
- Errors are OpenAI error objects: 400 bad input (the message names the parameter), 401 a wrong key,
  404 an unknown model or path, 413 a body over the limit, 503 no Triton server ready or busy, 504 Triton
  silent past the timeout, 502 a failure inside Triton. After a stream has started, an error arrives as a
  last `data: {"error": ...}` event instead of `[DONE]`, so an answer is never cut short silently.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from mmgpt.client.api import (
    DEFAULT_TIMEOUT_S,
    AnswerStream,
    ClientError,
    InvalidInput,
    MMGPTClient,
    Piece,
    RequestFailed,
    RequestRejected,
    ResponseTimeout,
    ServerBusy,
    ServerUnavailable,
)
from mmgpt.client.openai_compat import APIError, ChatRequest, bad, parse_chat_request

log = logging.getLogger("mmgpt.api")
WEB_DIR = Path(__file__).parent / "web"


@dataclass
class APIConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    triton: tuple[str, ...] = ("127.0.0.1:8001",)  # gRPC addresses of the Triton servers, round-robin
    model_name: str = "mmgpt"  # what /v1/models lists and `model` must name ("" is accepted too)
    api_key: str | None = field(default=None, repr=False)  # when set, `Authorization: Bearer <key>` is required
    max_body_bytes: int = 48 << 20  # the whole HTTP body (base64 makes media ~4/3 larger)
    max_image_bytes: int = 20 << 20
    max_audio_bytes: int = 25 << 20
    max_messages: int = 256
    timeout_s: float = DEFAULT_TIMEOUT_S  # the longest wait for any one piece from Triton
    health_interval_s: float = 2.0
    max_concurrent: int = 256  # gRPC waits in flight (worker threads); more wait for one


# ------------------------------------------------------------------------------------------------------
# Triton servers: round-robin over the healthy ones
# ------------------------------------------------------------------------------------------------------


class Backends:
    """The Triton servers behind the API. `order()` gives every server for one request, the next in turn first
    and those whose last health check failed last (they are still tried: a check can be stale)."""

    def __init__(self, urls: Sequence[str], timeout: float | None):
        if not urls:
            raise ValueError("at least one Triton URL is needed")
        self.clients = [MMGPTClient(url, timeout=timeout) for url in urls]
        self.healthy = [True] * len(urls)  # optimistic until the first check
        self.detail = [""] * len(urls)
        self._next = 0
        self._lock = threading.Lock()

    def refresh(self) -> None:
        for i, client in enumerate(self.clients):
            health = client.health(timeout=2.0)
            self.healthy[i], self.detail[i] = health.ok, health.detail

    def mark_down(self, client: MMGPTClient, detail: str) -> None:
        i = self.clients.index(client)
        self.healthy[i], self.detail[i] = False, detail

    def order(self) -> list[MMGPTClient]:
        with self._lock:
            start, self._next = self._next, (self._next + 1) % len(self.clients)
        turn = [(start + k) % len(self.clients) for k in range(len(self.clients))]
        return [self.clients[i] for i in sorted(turn, key=lambda i: not self.healthy[i])]

    def status(self) -> list[dict[str, Any]]:
        return [{"url": c.url, "ready": ok, "detail": d} for c, ok, d in zip(self.clients, self.healthy, self.detail)]


# ------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------


def api_error(error: ClientError) -> APIError:
    """The HTTP answer to a client library error."""
    message = str(error)
    if isinstance(error, (InvalidInput, RequestRejected)):
        return APIError(400, message)
    if isinstance(error, ServerBusy):
        return APIError(503, message, kind="server_busy")
    if isinstance(error, ServerUnavailable) or "shutting down" in message or "not serving" in message:
        return APIError(503, message, kind="service_unavailable")
    if isinstance(error, ResponseTimeout):
        return APIError(504, message, kind="timeout")
    if isinstance(error, RequestFailed) and message.startswith("the request was cancelled"):
        return APIError(499, message, kind="cancelled")
    return APIError(502, f"the model server failed the request: {message}", kind="upstream_error")


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused (413) past `limit` bytes: the declared length is checked first, then what
    actually arrives (a length header can lie, or be absent with chunked encoding)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise APIError(413, f"the request body ({int(declared):,} bytes) is over the limit of {limit:,} bytes "
                                "(--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over the limit of {limit:,} bytes (--max-body-bytes)")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # so that request.form() parses what was read here
    return body


# ------------------------------------------------------------------------------------------------------
# Answers
# ------------------------------------------------------------------------------------------------------


def _next(answer: AnswerStream) -> Piece | None:
    return next(answer, None)


def sse_event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


@dataclass
class Opened:
    """An answer Triton has started: its stream and the first piece (None: it ended with no text at all)."""

    answer: AnswerStream
    first: Piece | None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


class Server:
    """The routes' logic, separate from FastAPI's wiring so that it reads top to bottom."""

    def __init__(self, config: APIConfig, backends: Backends | None = None):
        self.config = config
        self.backends = backends or Backends(config.triton, config.timeout_s)
        self.limiter: anyio.CapacityLimiter | None = None  # made in the server's event loop (lifespan)

    async def to_thread(self, fn: Any, *args: Any) -> Any:
        """fn(*args) in a worker thread (the gRPC client blocks). A cancellation (the HTTP client went away) is
        delivered when fn returns: a piece arrives within a token's time, and only then can the stream be
        closed, from this task (a generator cannot be closed while another thread runs it)."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def close(self, answer: AnswerStream) -> None:
        """Close a stream whatever happens around it; unfinished, that cancels the request on Triton."""
        with anyio.CancelScope(shield=True):
            await self.to_thread(answer.close)

    def check_model(self, model: str) -> None:
        if model and model != self.config.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.config.model_name!r} "
                                "(GET /v1/models)", "model", "invalid_request_error")

    async def on_a_backend(self, attempt: Callable[[MMGPTClient], Awaitable[Any]]) -> Any:
        """attempt(client) on the Triton servers in turn, going on to the next while the one asked cannot be
        reached (it has done nothing then, so asking another is safe); other failures are the answer."""
        unreachable: list[str] = []
        for client in self.backends.order():
            try:
                return await attempt(client)
            except ServerUnavailable as e:
                self.backends.mark_down(client, str(e))
                unreachable.append(str(e))
            except ClientError as e:
                raise api_error(e) from None
        raise APIError(503, "no Triton server could be reached: " + " | ".join(unreachable),
                       kind="service_unavailable")

    async def open(self, request: ChatRequest) -> Opened:
        """Send the request to a Triton server and wait for its first piece."""

        async def attempt(client: MMGPTClient) -> Opened:
            answer = client.stream(request.text, image=request.image, audio=request.audio, history=request.history,
                                   stream=True, **request.sampling)
            try:
                return Opened(answer, await self.to_thread(_next, answer))
            except BaseException:  # failed, or cancelled while waiting (the HTTP client went away): cancel on Triton
                await self.close(answer)
                raise

        return await self.on_a_backend(attempt)

    def chunk(self, cid: str, created: int, delta: dict[str, Any], finish: str | None = None,
              **extra: Any) -> str:
        return sse_event({"id": cid, "object": "chat.completion.chunk", "created": created,
                          "model": self.config.model_name, "system_fingerprint": None,
                          "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra})

    async def sse(self, request: ChatRequest, opened: Opened) -> AsyncIterator[str]:
        """OpenAI's chunk stream: the role, content deltas, the finish reason, usage if asked, `[DONE]`."""
        cid, created, answer = completion_id(), int(time.time()), opened.answer
        try:
            piece, told = opened.first, False
            extra: dict[str, Any] = {}
            if piece is not None and (piece.transcript or piece.history_dropped):
                extra = {"transcript": piece.transcript, "history_dropped": piece.history_dropped}
                told = bool(piece.transcript)
            yield self.chunk(cid, created, {"role": "assistant", "content": ""}, **extra)
            while piece is not None:
                if piece.transcript and not told:
                    told = True
                    yield self.chunk(cid, created, {"content": ""}, transcript=piece.transcript)
                if piece.text:
                    yield self.chunk(cid, created, {"content": piece.text})
                piece = await self.to_thread(_next, answer)
            yield self.chunk(cid, created, {}, answer.finish_reason or "stop")
            if request.include_usage:
                yield sse_event({"id": cid, "object": "chat.completion.chunk", "created": created,
                                 "model": self.config.model_name, "choices": [], "usage": usage_of(answer)})
            yield "data: [DONE]\n\n"
        except ClientError as e:  # after the 200: the error is the stream's last event, never a silent end
            yield sse_event(api_error(e).body())
        finally:
            # Normal end, an error, or the HTTP client gone (the task is cancelled): closing a stream that has
            # not finished cancels the request on Triton.
            await self.close(answer)

    async def complete(self, request: ChatRequest, opened: Opened, disconnected: Any) -> dict[str, Any]:
        """The whole answer as one chat.completion object; a client gone meanwhile cancels it."""
        answer, texts = opened.answer, []
        try:
            piece = opened.first
            while piece is not None:
                texts.append(piece.text)
                if await disconnected():
                    raise APIError(499, "the client disconnected", kind="cancelled")
                piece = await self.to_thread(_next, answer)
        except ClientError as e:
            raise api_error(e) from None
        finally:
            await self.close(answer)
        return {
            "id": completion_id(), "object": "chat.completion", "created": int(time.time()),
            "model": self.config.model_name, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(texts), "refusal": None},
                         "logprobs": None, "finish_reason": answer.finish_reason or "stop"}],
            "usage": usage_of(answer),
            "transcript": answer.transcript, "history_dropped": answer.history_dropped,
        }

    async def transcribe(self, form: Any) -> tuple[str, str]:
        """(transcript, response_format) of an audio/transcriptions form."""
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise bad("file is required: the audio file, as a multipart upload", "file")
        model = str(form.get("model") or "")
        if model != "whisper-1":  # OpenAI's name for its Whisper: code written for OpenAI works unchanged
            self.check_model(model)
        response_format = str(form.get("response_format") or "json")
        if response_format not in ("json", "text"):
            raise bad(f"response_format must be json or text, got {response_format!r}", "response_format")
        language = str(form.get("language") or "en")
        if language != "en":
            raise bad(f"language must be en: the served Whisper is English-only, got {language!r}", "language")
        data = await upload.read()
        if not data:
            raise bad("file is empty (0 bytes)", "file")
        if len(data) > self.config.max_audio_bytes:
            raise bad(f"file is {len(data):,} bytes, over the limit of {self.config.max_audio_bytes:,}", "file")
        return await self.on_a_backend(lambda client: self.to_thread(client.transcribe, data)), response_format


class BearerAuth:
    """`Authorization: Bearer <key>` on /v1/ (the page at / and /health stay open), compared in constant time.
    A plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide a client's disconnect from the routes."""

    def __init__(self, app: Any, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                error = APIError(401, "a valid API key is required: `Authorization: Bearer <key>` (the server's "
                                      "--api-key)")
                await JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


class EventStream(StreamingResponse):
    """A StreamingResponse that always closes its generator. When the HTTP client goes away, Starlette cancels
    the response while it may be sending, outside the generator, and leaves the generator suspended; its
    `finally` (which cancels the request on Triton) would then run only when the garbage collector finds it,
    and the whole answer would be generated for nobody."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def usage_of(answer: AnswerStream) -> dict[str, int]:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens}


# ------------------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------------------


def create_app(config: APIConfig, backends: Backends | None = None) -> FastAPI:
    """The FastAPI application (uvicorn runs it; tests may too)."""
    server = Server(config, backends)

    async def watch_health() -> None:
        while True:
            try:
                await anyio.to_thread.run_sync(server.backends.refresh)  # not the answers' limiter
            except Exception as e:  # a check must never end the loop
                log.warning("health check failed: %s", e)
            await anyio.sleep(config.health_interval_s)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        server.limiter = anyio.CapacityLimiter(config.max_concurrent)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watch_health)
            yield
            tasks.cancel_scope.cancel()

    app = FastAPI(title="mmgpt OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)  # the traceback stays here
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", kind="server_error").body(),
                            status_code=500)

    if config.api_key:
        app.add_middleware(BearerAuth, key=config.api_key)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(WEB_DIR / "chat.html", media_type="text/html")

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = any(server.backends.healthy)
        return JSONResponse({"ready": ok, "triton": server.backends.status()}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": config.model_name, "object": "model", "created": 0, "owned_by": "mmgpt"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await read_body(request, config.max_body_bytes)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}") from None
        chat = parse_chat_request(data, max_image_bytes=config.max_image_bytes,
                                  max_audio_bytes=config.max_audio_bytes, max_messages=config.max_messages)
        server.check_model(chat.model)
        # The first piece is awaited before answering, so that an error Triton finds at once (a corrupt
        # image, a busy server) gets its own HTTP status even when streaming.
        opened = await server.open(chat)
        if chat.stream:
            return EventStream(server.sse(chat, opened), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await server.complete(chat, opened, request.is_disconnected)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Any:
        await read_body(request, config.max_body_bytes)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise bad("the body must be multipart/form-data with the audio in `file`")
        try:
            form = await request.form(max_files=1, max_fields=16)
        except HTTPException as e:
            raise bad(f"the multipart body cannot be read: {e.detail}") from None
        try:
            text, response_format = await server.transcribe(form)
        finally:
            await form.close()
        if response_format == "text":
            return PlainTextResponse(text)
        return {"text": text}

    return app


# ------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    import os

    p = argparse.ArgumentParser(
        prog="mmgpt-api",
        description="OpenAI-compatible API (/v1/chat/completions with images and audio, /v1/audio/transcriptions, "
                    "/v1/models) and a web chat at /, in front of one or more Triton servers (`make serve`).",
    )
    defaults = APIConfig()
    p.add_argument("--host", default=defaults.host, help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=defaults.port)
    p.add_argument("--triton", action="append", metavar="HOST:PORT",
                   help="gRPC address of a Triton server; repeat for several (round-robin with health checks). "
                        f"Default: {defaults.triton[0]}")
    p.add_argument("--model-name", default=defaults.model_name, help="the id /v1/models lists and requests name")
    p.add_argument("--api-key", default=os.environ.get("MMGPT_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/ (default: $MMGPT_API_KEY; unset = no auth)")
    p.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    p.add_argument("--max-image-bytes", type=int, default=defaults.max_image_bytes)
    p.add_argument("--max-audio-bytes", type=int, default=defaults.max_audio_bytes)
    p.add_argument("--timeout", type=float, default=defaults.timeout_s,
                   help="seconds to wait for any one piece of an answer from Triton")
    p.add_argument("--max-concurrent", type=int, default=defaults.max_concurrent)
    args = p.parse_args(argv)
    config = APIConfig(host=args.host, port=args.port, triton=tuple(args.triton or defaults.triton),
                       model_name=args.model_name, api_key=args.api_key or None, max_body_bytes=args.max_body_bytes,
                       max_image_bytes=args.max_image_bytes, max_audio_bytes=args.max_audio_bytes,
                       timeout_s=args.timeout, max_concurrent=args.max_concurrent)
    serve(config)


def serve(config: APIConfig) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    shown = {k: v for k, v in asdict(config).items() if k != "api_key"}
    log.info("config: %s (api key: %s)", shown, "required" if config.api_key else "none")
    base = f"http://{config.host}:{config.port}"
    log.info("OpenAI API at %s/v1 (model %r); web chat at %s/", base, config.model_name, base)
    # Ctrl-C / SIGTERM: uvicorn stops accepting, lets running answers finish (up to 60 s), then exits.
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="info",
                timeout_graceful_shutdown=60)


if __name__ == "__main__":
    main()
