"""The `llm` model's logic: TensorRT-LLM-style requests in, tokens out, with in-flight batching.

`InflightBatcher` keeps every running sequence in one batch. Each iteration it
  1. drops rows whose client cancelled or asked to stop,
  2. prefills the sequences that arrived since the last iteration (one batched, left-padded ORT call),
  3. runs ONE batched decode step for all running rows.
Rows have different lengths: the shared KV cache is left-padded, the attention mask zeroes the padding
and every row gets its own position ids, so a row computes what it would compute alone. Each row has
its own `Sampler` (and RNG); choosing tokens, the token budget and stopping follow
`mmgpt.generation.generate_ids` exactly, which is what makes served greedy answers equal `mmgpt ask`.

Nothing here imports Triton: `model_repository/llm/1/model.py` parses tensors with `parse_request`,
hands each request to the batcher with a `TokenSink` that sends responses, and that is all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from mmgpt.generation import MAX_SEED, Sampler, SamplingParams, check_prompt
from mmgpt.preprocess import InputError
from mmgpt.serving import contract as c

log = logging.getLogger(__name__)

INT32_MAX = 2**31 - 1


# ------------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    input_ids: np.ndarray  # (T,) int64; ids >= vocab_size address prompt_table rows
    prompt_table: np.ndarray | None  # (N, D) float32
    params: SamplingParams  # max_tokens = request_output_len
    end_id: int
    streaming: bool


@dataclass(frozen=True)
class StopRequest:
    request_id: str


def _scalar(inputs: Mapping[str, np.ndarray | None], name: str, cast: Callable, default):
    value = c.first(inputs.get(name))
    return default if value is None else cast(value)


def parse_request(
    inputs: Mapping[str, np.ndarray | None],
    request_id: str,
    *,
    vocab_size: int,
    hidden_size: int,
    max_context: int,
    default_end_id: int,
    default_pad_id: int,
) -> GenerationRequest | StopRequest:
    """Validate one request's tensors (batched layout: [1, ...]); raises InputError naming the problem."""
    if _scalar(inputs, c.STOP, bool, False):
        if not request_id:
            raise InputError("a stop request needs the request id of the request to stop")
        return StopRequest(request_id)
    ids = inputs.get(c.INPUT_IDS)
    if ids is None:
        raise InputError(f"{c.INPUT_IDS} is required")
    ids = np.asarray(ids)
    if ids.ndim == 2:
        if ids.shape[0] != 1:
            raise InputError(f"one sequence per request: {c.INPUT_IDS} has batch size {ids.shape[0]}")
        ids = ids[0]
    if ids.ndim != 1:
        raise InputError(f"{c.INPUT_IDS} must be [batch, tokens], got shape {list(np.shape(inputs[c.INPUT_IDS]))}")
    length = _scalar(inputs, c.INPUT_LENGTHS, int, None)
    if length is None:
        raise InputError(f"{c.INPUT_LENGTHS} is required")
    if not 1 <= length <= ids.shape[0]:
        raise InputError(f"{c.INPUT_LENGTHS} is {length}, but {c.INPUT_IDS} holds {ids.shape[0]} tokens")
    ids = ids[:length].astype(np.int64)
    check_prompt(length, max_context)
    max_new = _scalar(inputs, c.REQUEST_OUTPUT_LEN, int, None)
    if max_new is None:
        raise InputError(f"{c.REQUEST_OUTPUT_LEN} is required")

    table = inputs.get(c.PROMPT_EMBEDDING_TABLE)
    if table is not None:
        table = np.asarray(table)
        if table.ndim == 3:
            if table.shape[0] != 1:
                raise InputError(f"{c.PROMPT_EMBEDDING_TABLE} has batch size {table.shape[0]}")
            table = table[0]
        if table.ndim != 2 or table.shape[1] != hidden_size:
            raise InputError(f"{c.PROMPT_EMBEDDING_TABLE} must be [rows, {hidden_size}], got {list(table.shape)}")
        rows = _scalar(inputs, c.PROMPT_VOCAB_SIZE, int, table.shape[0])
        if not 0 <= rows <= table.shape[0]:
            raise InputError(f"{c.PROMPT_VOCAB_SIZE} is {rows}, but the table has {table.shape[0]} rows")
        table = table[:rows].astype(np.float32)
    rows = 0 if table is None else table.shape[0]
    if ids.min() < 0 or ids.max() >= vocab_size + rows:
        bad = int(ids[(ids < 0) | (ids >= vocab_size + rows)][0])
        where = f"below {vocab_size}" if rows == 0 else f"below {vocab_size} + {c.PROMPT_VOCAB_SIZE} ({rows})"
        raise InputError(f"token id {bad} out of range: ids must be >= 0 and {where}")
    if table is not None and rows == 0:
        table = None

    params = SamplingParams(
        max_tokens=max_new,
        temperature=_scalar(inputs, c.LLM_TEMPERATURE, float, 0.0),
        top_p=_scalar(inputs, c.RUNTIME_TOP_P, float, 1.0),
        top_k=_scalar(inputs, c.RUNTIME_TOP_K, int, 0),
        seed=_scalar(inputs, c.RANDOM_SEED, int, None),
    )
    params.validate(INT32_MAX)  # messages name the entry point's knobs (max_tokens, top_p, ...)
    end_id = _scalar(inputs, c.END_ID, int, default_end_id)
    _scalar(inputs, c.PAD_ID, int, default_pad_id)  # accepted for compatibility; padding is internal
    return GenerationRequest(
        request_id=request_id, input_ids=ids, prompt_table=table, params=params, end_id=end_id,
        streaming=_scalar(inputs, c.STREAMING, bool, False),
    )


def request_tensors(
    input_ids: list[int],
    prompt_table: np.ndarray | None,
    params: SamplingParams,
    *,
    end_id: int,
    pad_id: int,
    table_dtype=np.float32,
    streaming: bool = True,
) -> dict[str, np.ndarray]:
    """The inputs of a generation request in the batched [1, ...] layout (what the entry point sends).

    Greedy is sent as top_k 1 and no temperature, which TensorRT-LLM reads as greedy too; sampling sends
    every knob explicitly so neither side's defaults matter.
    """
    one = lambda v, dt: np.array([[v]], dtype=dt)  # noqa: E731 - (batch 1, 1)
    t = {
        c.INPUT_IDS: np.asarray(input_ids, dtype=np.int32)[None],
        c.INPUT_LENGTHS: one(len(input_ids), np.int32),
        c.REQUEST_OUTPUT_LEN: one(params.max_tokens, np.int32),
        c.END_ID: one(end_id, np.int32),
        c.PAD_ID: one(pad_id, np.int32),
        c.STREAMING: one(streaming, np.bool_),
    }
    if params.greedy:
        t[c.RUNTIME_TOP_K] = one(1, np.int32)
    else:
        t[c.LLM_TEMPERATURE] = one(params.temperature, np.float32)
        t[c.RUNTIME_TOP_K] = one(params.top_k, np.int32)
        t[c.RUNTIME_TOP_P] = one(params.top_p, np.float32)
        if params.seed is not None:
            t[c.RANDOM_SEED] = one(params.seed, np.uint64)
    if prompt_table is not None:
        t[c.PROMPT_EMBEDDING_TABLE] = prompt_table.astype(table_dtype)[None]
        t[c.PROMPT_VOCAB_SIZE] = one(prompt_table.shape[0], np.int32)
    return t


def stop_tensors() -> dict[str, np.ndarray]:
    """A stop request (sent with the request id of the generation to stop)."""
    return {
        c.INPUT_IDS: np.zeros((1, 1), np.int32),
        c.INPUT_LENGTHS: np.ones((1, 1), np.int32),
        c.REQUEST_OUTPUT_LEN: np.ones((1, 1), np.int32),
        c.STOP: np.ones((1, 1), np.bool_),
    }


assert MAX_SEED == 2**64 - 1  # random_seed is UINT64: every valid seed fits


class LLMError(RuntimeError):
    """The LLM model reported a failure for a request."""


def response_tokens(output: Callable[[str], np.ndarray | None]) -> list[int]:
    """The new token ids of one (streamed) response; `output(name)` gives an output or None.

    A response without output_ids (the bare final flag) has none. Raises LLMError when the response
    carries our `error` output (TensorRT-LLM never sends one).
    """
    error = c.first(output(c.LLM_ERROR))
    if error:
        raise LLMError(error.decode("utf-8", "replace") if isinstance(error, bytes) else str(error))
    ids = output(c.OUTPUT_IDS)
    if ids is None:
        return []
    ids = np.asarray(ids)
    row = ids.reshape(ids.shape[-1]) if ids.size else np.zeros(0, np.int32)  # (1, beam 1, n) -> (n,)
    n = c.first(output(c.SEQUENCE_LENGTH))
    if n is not None and 0 <= int(n) <= row.size:
        row = row[: int(n)]
    return [int(t) for t in row]


# ------------------------------------------------------------------------------------------------
# In-flight batching
# ------------------------------------------------------------------------------------------------


class BatchedLM(Protocol):
    """What the batcher needs from a decoder (`mmgpt.runtime.OrtLLMModel` provides it)."""

    vocab_size: int  # ids from here up are image positions

    def embed(self, input_ids: np.ndarray, prompt_table: np.ndarray | None) -> np.ndarray: ...

    def run(self, inputs_embeds, attention_mask, position_ids, past): ...

    def empty_past(self, batch: int) -> list[np.ndarray]: ...


class TokenSink(Protocol):
    """Where a sequence's output goes (responses to a Triton request, or a list in tests)."""

    def tokens(self, ids: list[int]) -> None:
        """New tokens, in order (never the end id)."""

    def finish(self, reason: str, error: str | None = None) -> None:
        """Called exactly once: reason is "end" (end id), "length", "cancelled" or "error"."""

    def cancelled(self) -> bool:
        """The client went away."""


class RequesterQueues:
    """Calls (a response sender's sends) run in order per requesting process, each on a thread of its own.

    Why: when the process that asked for a stream over BLS dies (an entry-point instance killed mid-answer),
    Triton 2.51's server blocks forever delivering the next response to it (python_backend's
    SendBLSDecoupledResponse waits for the dead process's acknowledgement), and so does the `send` that
    produced it. Made on the batcher's thread, that send would stop every sequence of the server for good;
    here it stops only the dead requester's queue, and the sink's liveness check drops its sequences.
    Requests without a requester (a client of the llm model itself, over gRPC) are sent inline.

    A requester is kept at most `ahead` responses behind (the caller waits, at most `wait_s`): a client that
    closes its stream must not find the batcher far ahead of what it was sent (tokens generated past a close
    are bounded). Sending off the decode thread also spares the next step a response's round trip.
    """

    def __init__(self, *, ahead: int = 4, wait_s: float = 1.0, idle_s: float = 30.0):
        self._ahead, self._wait_s, self._idle_s = ahead, wait_s, idle_s
        self._cond = threading.Condition()
        self._queues: dict[int, deque[Callable[[], None]]] = {}

    def __call__(self, requester: int | None, call: Callable[[], None]) -> None:
        if requester is None:
            call()
            return
        with self._cond:
            q = self._queues.get(requester)
            if q is None:
                q = self._queues[requester] = deque()
                threading.Thread(target=self._run, args=(requester, q), daemon=True,
                                 name=f"send-to-{requester}").start()
            self._cond.wait_for(lambda: len(q) < self._ahead, timeout=self._wait_s)
            q.append(call)
            self._cond.notify_all()

    def _run(self, requester: int, q: deque[Callable[[], None]]) -> None:
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: q, timeout=self._idle_s):
                    del self._queues[requester]  # idle: the next call for it starts a new thread
                    return
                call = q[0]  # left in the queue while it runs: `ahead` counts it
            try:
                call()
            except Exception as e:  # e.g. the client went away: the batcher learns it from cancelled()
                log.warning("sending a response to process %d failed: %s", requester, e)
            with self._cond:
                q.popleft()
                self._cond.notify_all()

    def threads(self) -> int:
        with self._cond:
            return len(self._queues)


@dataclass
class _Row:
    request: GenerationRequest
    sink: TokenSink
    sampler: Sampler
    budget: int  # tokens this row may still produce, as generate_ids computes it
    queued_at: float = 0.0  # time.monotonic() when it was submitted
    produced: int = 0
    pending: int | None = None  # the last sampled token, to be fed by the next decode step
    length: int = 0  # real tokens in the KV cache (prompt + fed tokens) = the next position id
    stop: bool = False
    finished: bool = False
    emitted: list[int] = field(default_factory=list)  # non-streaming rows: everything, sent at the end
    fed: list[int] = field(default_factory=list)  # tokens fed after the prompt (in the KV cache)
    table_key: bytes | None = None  # content hash of the prompt table (prefix cache)
    reason: str | None = None  # how it finished


def content_key(array: np.ndarray) -> bytes:
    """A hash of an array's float32 contents and shape: the key of the image and prefix caches."""
    import hashlib

    a = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.blake2b(a.tobytes(), digest_size=20, person=str(a.shape).encode()[:16]).digest()


class PrefixCache:
    """The KV cache of finished sequences, reused by later requests that start with the same tokens.

    A conversation's next turn re-sends everything said so far (the image, the question, the answer), and
    many requests share a system prompt: prefilled again, each turn would cost as much as the whole
    conversation. Here a request starts from the longest cached prefix of its prompt and prefills only
    the rest. Keys and values at a position depend only on the tokens up to it (causal attention), so any
    prefix of a cached sequence is exact. Image positions are ids that address the request's own prompt
    table: a prefix may run through them only when the tables are the same (compared by a content hash).
    Bounded in bytes, least recently used out first; `max_bytes` 0 turns it off.
    """

    def __init__(self, max_bytes: int, min_tokens: int = 4):
        from collections import OrderedDict

        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self.entries: OrderedDict[int, tuple[np.ndarray, bytes | None, list[np.ndarray]]] = OrderedDict()
        self.bytes = 0
        self._next = 0

    def lookup(self, ids: np.ndarray, table_key: bytes | None, vocab_size: int) -> tuple[int, list[np.ndarray]] | None:
        """(length, keys/values of ids[:length]) of the longest usable cached prefix, leaving at least one
        token of `ids` to prefill (its logits start the answer); None below `min_tokens`."""
        best, best_key = 0, None
        limit = len(ids) - 1
        image_at = np.nonzero(ids >= vocab_size)[0]
        for key, (cached, cached_table, _) in self.entries.items():
            n = min(len(cached), limit)
            differ = np.nonzero(cached[:n] != ids[:n])[0]
            p = int(differ[0]) if differ.size else n
            if cached_table != table_key and image_at.size:
                p = min(p, int(image_at[0]))  # the same ids, another image: not the same keys and values
            if p > best:
                best, best_key = p, key
        if best_key is None or best < self.min_tokens:
            return None
        self.entries.move_to_end(best_key)
        return best, [a[:, :, :best] for a in self.entries[best_key][2]]

    def put(self, ids: np.ndarray, table_key: bytes | None, past: list[np.ndarray]) -> None:
        size = sum(a.nbytes for a in past)
        if size > self.max_bytes:
            return
        self.entries[self._next] = (ids, table_key, past)
        self._next += 1
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, _, old) = self.entries.popitem(last=False)
            self.bytes -= sum(a.nbytes for a in old)


@dataclass
class BatcherStats:
    iterations: int = 0
    decode_steps: int = 0  # batched decode calls
    decode_rows: int = 0  # rows summed over decode calls (/ decode_steps = mean batch)
    prefills: int = 0  # batched prefill calls
    prefill_rows: int = 0
    tokens: int = 0  # tokens emitted
    prefix_hits: int = 0  # requests that started from a cached prefix
    prefix_tokens: int = 0  # prompt tokens not prefilled thanks to it
    cancelled: int = 0
    max_batch: int = 0
    busy: int = 0  # requests refused for want of room (queue full, or waited past queue_timeout_s)
    queued: int = 0  # requests waiting to join the batch (now)
    kv_reserved_bytes: int = 0  # keys/values the running rows may grow to (now; see InflightBatcher.kv_budget_bytes)


class InflightBatcher:
    """Sequences join a running batch at any iteration and leave it when done, stopped or cancelled."""

    def __init__(
        self,
        model: BatchedLM,
        *,
        max_batch: int,
        vocab_limit: int,
        max_context: int,
        on_iteration: Callable[[BatcherStats], None] | None = None,
        prefix_cache_bytes: int = 0,
        prefill_chunk: int = 256,
        kv_budget_bytes: int = 0,
        queue_timeout_s: float = 60.0,
        max_queue: int = 256,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if kv_budget_bytes < 0 or queue_timeout_s <= 0 or max_queue < 1:
            raise ValueError("kv_budget_bytes must be >= 0 (0 = no budget), queue_timeout_s > 0 and max_queue >= 1")
        # Memory: a row joins the batch only when the keys/values of every running row, each grown to its
        # prompt + token budget, fit `kv_budget_bytes` (0: no budget). Both cache layouts hold
        # rows x the longest row, so that is what is counted. Others wait, at most `queue_timeout_s` and at
        # most `max_queue` of them; past either they get a "busy" error instead of a queue without end.
        self.kv_budget_bytes = kv_budget_bytes
        self.kv_token_bytes = 2 * model.num_layers * model.num_kv_heads * model.head_dim * 4  # fp32 K and V
        self.queue_timeout_s = queue_timeout_s
        self.max_queue = max_queue
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.model = model
        self.max_batch = max_batch
        self.vocab_limit = vocab_limit
        self.max_context = max_context
        self.on_iteration = on_iteration
        self.stats = BatcherStats()
        self._cond = threading.Condition()
        self._waiting: list[_Row] = []
        self._rows: list[_Row] = []  # aligned with the batch dimension of _past / _mask
        self._past: list[np.ndarray] | None = None  # 2L x (B, H, P, hd)
        self._mask: np.ndarray | None = None  # (B, P) int64, 0 = left padding
        self._stopped_ids: dict[str, float] = {}  # stop requests that came before their request
        self._thread: threading.Thread | None = None
        self._shutdown = False
        # A shared-KV decoder (`OrtSharedKVModel`): row i of self._rows is row i of one cache written in place;
        # a new prompt is read into its own cache, at most `prefill_chunk` tokens an iteration, then joins.
        self.shared_kv = bool(getattr(model, "shared_kv", False))
        self.prefill_chunk = prefill_chunk
        if self.shared_kv:
            self._cache = model.new_cache()
            self._reading = model.new_cache()  # the prompt being read
        self._prefilling: _Row | None = None

    # -- the public, thread-safe side --------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: TokenSink) -> None:
        """Queue a sequence; it joins the batch at the next iteration."""
        budget = min(request.params.max_tokens, self.max_context - len(request.input_ids))
        row = _Row(request, sink, Sampler(request.params, self.vocab_limit), budget, queued_at=time.monotonic())
        alone = self._reserve_bytes(1, self._span(row))
        if self.kv_budget_bytes and alone > self.kv_budget_bytes:
            self._finish(row, "error", f"this request needs {alone / 2**20:,.1f} MiB of keys/values (prompt + max_tokens), "
                         f"more than the LLM's whole budget of {self.kv_budget_bytes / 2**20:,.1f} MiB (kv_budget_mb): "
                         "ask for fewer tokens or send a shorter prompt")
            return
        if self.prefix_cache is not None:
            row.table_key = None if request.prompt_table is None else content_key(request.prompt_table)
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                self.stats.busy += 1
                full = True
            else:
                full = False
                if self._stopped_ids.pop(request.request_id, None) is not None:
                    row.stop = True
                self._waiting.append(row)
                self.stats.queued = len(self._waiting)
                self._cond.notify_all()
        if full:
            self._finish(row, "error", f"busy: {self.max_queue} requests are already waiting for the LLM (max_queue); "
                         "try again shortly")

    def stop(self, request_id: str) -> None:
        """Stop every sequence with this request id at the next iteration (TensorRT-LLM's `stop`)."""
        with self._cond:
            found = False
            for row in self._waiting + self._rows + ([self._prefilling] if self._prefilling else []):
                if row.request.request_id == request_id:
                    row.stop = found = True
            if not found:  # it may still be on its way: remember briefly
                now = time.monotonic()
                self._stopped_ids = {k: t for k, t in self._stopped_ids.items() if now - t < 60}
                self._stopped_ids[request_id] = now
            self._cond.notify_all()

    def active(self) -> int:
        with self._cond:
            return len(self._rows) + len(self._waiting) + (self._prefilling is not None)

    def start(self) -> InflightBatcher:
        """Run iterations in a background thread until `shutdown`."""
        self._thread = threading.Thread(target=self._loop, name="inflight-batcher", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for row in self._take_all():
            # An error, not a quiet end: the client must not take what it got so far for the whole answer.
            self._finish(row, "error", "the server stopped before this answer was finished: ask again")

    def run_until_idle(self, max_iterations: int = 1_000_000) -> None:
        """Iterate in the calling thread until nothing is left (tests, warm-up)."""
        for _ in range(max_iterations):
            if not self.step():
                return
        raise RuntimeError("batcher did not become idle")

    # -- the scheduler -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._shutdown or self._waiting or self._rows or self._prefilling)
                if self._shutdown:
                    return
            try:
                self.step()
            except Exception:  # step() already failed the rows involved; keep serving the rest
                log.exception("in-flight batcher iteration failed")

    def _take_all(self) -> list[_Row]:
        with self._cond:
            reading = [self._prefilling] if self._prefilling is not None else []
            rows, self._rows, self._waiting = reading + self._rows + self._waiting, [], []
            self._past = self._mask = self._prefilling = None
        return rows

    # -- admission: rows, memory and the queue ---------------------------------------------------------

    @staticmethod
    def _span(row: _Row) -> int:
        """The most tokens the row's keys/values can reach: its prompt and every token it may produce."""
        return len(row.request.input_ids) + row.budget

    def _reserve_bytes(self, rows: int, longest: int) -> int:
        return rows * longest * self.kv_token_bytes

    def _running(self) -> list[_Row]:
        return self._rows + ([self._prefilling] if self._prefilling is not None else [])

    def _fits(self, row: _Row, running: list[_Row]) -> bool:
        """May `row` join `running` rows: a free row in the batch, and the budget (rows x longest span)?"""
        if len(running) >= self.max_batch:
            return False
        if not self.kv_budget_bytes:
            return True
        longest = max([self._span(r) for r in running] + [self._span(row)])
        return self._reserve_bytes(len(running) + 1, longest) <= self.kv_budget_bytes

    def _admit(self, running: list[_Row], limit: int | None = None) -> list[_Row]:
        """Take the waiting rows that fit, oldest first (a row that does not fit holds the ones behind it:
        first come, first served, so a large request is not starved by small ones). Scheduler thread only."""
        taken: list[_Row] = []
        with self._cond:
            while self._waiting and (limit is None or len(taken) < limit) and self._fits(self._waiting[0], running + taken):
                taken.append(self._waiting.pop(0))
            self.stats.queued = len(self._waiting)
        self.stats.kv_reserved_bytes = self._reserve_bytes(
            len(running) + len(taken), max([self._span(r) for r in running + taken], default=0))
        return taken

    def _expire(self) -> None:
        """Refuse the waiting rows that waited longer than queue_timeout_s, with a "busy" error."""
        now = time.monotonic()
        with self._cond:
            expired = [r for r in self._waiting if now - r.queued_at > self.queue_timeout_s]
            if not expired:
                return
            self._waiting = [r for r in self._waiting if now - r.queued_at <= self.queue_timeout_s]
            self.stats.busy += len(expired)
            self.stats.queued = len(self._waiting)
        for row in expired:
            self._finish(row, "error", f"busy: the LLM had no room for this request for {self.queue_timeout_s:g} s "
                         f"({len(self._rows)} sequences running; queue_timeout_s, kv_budget_mb): try again shortly")

    def step(self) -> bool:
        """One iteration: drop stopped rows, prefill arrivals, one decode step. False when idle."""
        if self.shared_kv:
            return self._step_shared()
        with self._cond:
            if not self._waiting and not self._rows:
                return False
        self._expire()
        arrivals = self._admit(self._rows)
        if not arrivals and not self._rows:
            return self.active() > 0  # all waiting (a budget nobody running can free is refused at submit)
        self.stats.iterations += 1
        self._drop(lambda r: r.stop or r.sink.cancelled(), "cancelled")
        arrivals = [r for r in arrivals if not self._cancel_if_stopped(r)]
        try:
            if arrivals:
                self._prefill(arrivals)
            if self._rows:
                self._decode()
        except Exception as e:
            failed, self._rows, self._past, self._mask = arrivals + self._rows, [], None, None
            for row in failed:
                self._finish(row, "error", f"generation failed: {e}")
            raise
        self._iteration_done()
        return True

    def _iteration_done(self) -> None:
        self.stats.max_batch = max(self.stats.max_batch, len(self._rows))
        if self.on_iteration is not None:
            try:
                self.on_iteration(self.stats)
            except Exception:  # metrics must never stop generation
                log.exception("on_iteration callback failed")

    def _cancel_if_stopped(self, row: _Row) -> bool:
        if row.stop or row.sink.cancelled():
            self._finish(row, "cancelled")
            return True
        return False

    def _prefill(self, rows: list[_Row]) -> None:
        """Rows with a cached prefix prefill the rest of their prompt on top of it, one by one; the others
        together (below)."""
        if self.prefix_cache is not None:
            fresh = []
            for row in rows:
                found = self.prefix_cache.lookup(row.request.input_ids, row.table_key, self.model.vocab_size)
                if found is None:
                    fresh.append(row)
                else:
                    self._prefill_after(row, *found)
            rows = fresh
        if rows:
            self._prefill_batch(rows)

    def _prefill_after(self, row: _Row, cached: int, past: list[np.ndarray]) -> None:
        ids = row.request.input_ids
        rest = ids[cached:]
        mask = np.ones((1, len(ids)), np.int64)
        positions = np.arange(cached, len(ids), dtype=np.int64)[None]
        logits, present = self.model.run(self.model.embed(rest[None], _table(row)), mask, positions, past)
        self.stats.prefills += 1
        self.stats.prefill_rows += 1
        self.stats.prefix_hits += 1
        self.stats.prefix_tokens += cached
        row.length = len(ids)
        if self._advance(row, logits[0, -1]):
            self._join([row], present, mask)

    def _prefill_batch(self, rows: list[_Row]) -> None:
        """Batched prefill of new rows: left-padded to the longest prompt; the survivors join the batch."""
        lengths = [len(r.request.input_ids) for r in rows]
        t = max(lengths)
        embeds = np.concatenate(
            [self._left_pad(self.model.embed(r.request.input_ids[None], _table(r)), t, axis=1) for r in rows]
        )  # (k, t, D)
        mask = np.zeros((len(rows), t), np.int64)
        for i, n in enumerate(lengths):
            mask[i, t - n :] = 1
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)
        logits, present = self.model.run(embeds, mask, positions, self.model.empty_past(len(rows)))
        self.stats.prefills += 1
        self.stats.prefill_rows += len(rows)
        keep = []
        for i, row in enumerate(rows):
            row.length = lengths[i]
            if self._advance(row, logits[i, -1]):
                keep.append(i)
        if keep:
            self._join([rows[i] for i in keep], [p[keep] for p in present], mask[keep])

    def _decode(self) -> None:
        """One decode step for every row: feed each row's pending token, sample the next."""
        rows = self._rows
        ids = np.array([[r.pending] for r in rows], np.int64)  # (B, 1)
        for r in rows:
            r.fed.append(r.pending)
        embeds = self.model.embed(ids, None)
        mask = np.concatenate([self._mask, np.ones((len(rows), 1), np.int64)], axis=1)
        positions = np.array([[r.length] for r in rows], np.int64)
        logits, self._past = self.model.run(embeds, mask, positions, self._past)
        self._mask = mask
        done = self._sample_step(logits)
        if done:
            if self.prefix_cache is not None:
                for i in done:
                    self._remember(i)
            self._remove(done)

    def _sample_step(self, logits: np.ndarray) -> list[int]:
        """After a decode step: each row's token fed, its next one sampled -> indices of finished rows."""
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(self._rows)
        done = []
        for i, row in enumerate(self._rows):
            row.length += 1
            if not self._advance(row, logits[i, -1]):
                done.append(i)
        return done

    def _remember(self, i: int) -> None:
        """Keep the keys and values of finished row i for a later request's prefix: its real columns, the
        rightmost ones of the left-padded cache, or the first ones of its slot in the shared cache."""
        row = self._rows[i]
        if row.reason not in ("end", "length"):
            return
        ids = np.concatenate([row.request.input_ids, np.asarray(row.fed, np.int64)])
        if self.shared_kv:
            past = self._cache.read(i, row.length)
        else:
            past = [np.ascontiguousarray(p[i : i + 1, :, -row.length :]) for p in self._past]
        self.prefix_cache.put(ids, row.table_key, past)

    def _advance(self, row: _Row, logits: np.ndarray) -> bool:
        """Sample the row's next token and emit it; False when the row is finished (generate_ids' rules)."""
        if not np.isfinite(logits[: self.vocab_limit]).all():
            self._finish(row, "error", "generation failed: the model produced non-finite logits for this request")
            return False
        token = row.sampler(logits)
        if token == row.request.end_id:
            self._finish(row, "end")
            return False
        row.produced += 1
        self.stats.tokens += 1
        if row.request.streaming:
            row.sink.tokens([token])
        else:
            row.emitted.append(token)
        if row.produced >= row.budget:
            self._finish(row, "length")
            return False
        row.pending = token
        return True

    def _finish(self, row: _Row, reason: str, error: str | None = None) -> None:
        if row.finished:
            return
        row.finished = True
        row.reason = reason
        if reason == "cancelled":
            self.stats.cancelled += 1
        try:
            if row.emitted and reason != "error":
                row.sink.tokens(row.emitted)
                row.emitted = []
            row.sink.finish(reason, error)
        except Exception:  # a sink that cannot send (client gone) must not stop the batch
            log.exception("sending the end of request %s failed", row.request.request_id)

    # -- a shared-KV decoder: keys/values written in place, prompts read in chunks ------------------

    def _step_shared(self) -> bool:
        """One iteration: drop stopped rows; read up to `prefill_chunk` prompt tokens (finishing prompts
        join the batch), a prompt split only where it is longer than a chunk; one decode step for the batch.
        Decoding rows wait for at most one chunk, however long a new prompt is."""
        with self._cond:
            if not self._waiting and not self._rows and self._prefilling is None:
                return False
        self.stats.iterations += 1
        self._expire()
        self._drop_shared(lambda r: r.stop or r.sink.cancelled())
        budget = self.prefill_chunk
        while budget > 0 and len(self._rows) < self.max_batch:
            row = self._prefilling or self._next_arrival()
            if row is None:
                break
            if budget < min(self.prefill_chunk, len(row.request.input_ids) - row.length):
                # Not the head of a prompt that this iteration's leftover cannot finish: every read streams all
                # the weights (a 2-token tail cost ~70 ms of a Phi-2-width step), so the row is read whole
                # (or a full chunk of it) first thing next iteration, which is when its last part came anyway.
                break
            try:
                budget -= self._read_chunk(row, budget)
            except Exception as e:  # this prompt's failure is this request's alone
                log.exception("reading the prompt of request %s failed", row.request.request_id)
                self._prefilling = None
                self._finish(row, "error", f"generation failed: {type(e).__name__}: {e}")
        if self._rows:
            self._decode_shared()
        self._iteration_done()
        return True

    def _next_arrival(self) -> _Row | None:
        """The next waiting row to read, its cached prefix (if any) already in the reading cache."""
        while True:
            taken = self._admit(self._running(), limit=1)
            if not taken:
                return None
            row = taken[0]
            if self._cancel_if_stopped(row):
                continue
            row.length = 0
            if self.prefix_cache is not None:
                found = self.prefix_cache.lookup(row.request.input_ids, row.table_key, self.model.vocab_size)
                if found is not None:
                    row.length, past = found
                    self._reading.write(0, past)
                    self.stats.prefix_hits += 1
                    self.stats.prefix_tokens += row.length
            self._prefilling = row
            return row

    def _read_chunk(self, row: _Row, budget: int) -> int:
        """Read up to `budget` more prompt tokens of the row being prefilled -> tokens read. At the end of
        the prompt its first token is sampled and the row joins the batch (or finishes)."""
        if self._cancel_if_stopped(row):
            self._prefilling = None
            return 0
        ids = row.request.input_ids
        chunk = ids[row.length : row.length + budget]
        logits = self.model.run(self.model.embed(chunk[None], _table(row)), self._reading, 0, np.array([row.length]))
        row.length += len(chunk)
        if row.length < len(ids):
            return len(chunk)
        self._prefilling = None
        self.stats.prefills += 1
        self.stats.prefill_rows += 1
        if self._advance(row, logits[0, -1]):
            slot = len(self._rows)
            self._cache.reserve(slot + 1, row.length + 1)
            for a, b in zip(self._cache.arrays, self._reading.arrays):
                a[slot, :, : row.length] = b[0, :, : row.length]
            self._rows.append(row)
        return len(chunk)

    def _decode_shared(self) -> None:
        """One batched step. If it fails, each row is run alone (each writes only its own slot, so a step that
        failed half-way is simply redone): the rows that fail alone get an error, the others go on."""
        rows = self._rows
        ids = np.array([[r.pending] for r in rows], np.int64)
        lengths = np.array([r.length for r in rows])
        try:
            logits = self.model.run(self.model.embed(ids, None), self._cache, 0, lengths)
        except Exception as e:
            log.warning("a batched decode step of %d rows failed (%s); running the rows one by one", len(rows), e)
            logits = np.full((len(rows), 1, self.model.vocab_size), np.nan, np.float32)  # NaN: finished below
            for i, row in enumerate(rows):
                try:
                    logits[i] = self.model.run(self.model.embed(ids[i : i + 1], None), self._cache, i, lengths[i : i + 1])[0]
                except Exception as alone:
                    self._finish(row, "error", f"generation failed: {type(alone).__name__}: {alone}")
        for r in rows:
            r.fed.append(r.pending)
        done = self._sample_step(logits)  # rows finished above leave with the done ones
        if self.prefix_cache is not None:
            for i in done:
                self._remember(i)
        self._remove_shared(done)

    def _drop_shared(self, predicate: Callable[[_Row], bool]) -> None:
        gone = [i for i, r in enumerate(self._rows) if predicate(r)]
        rows = [self._rows[i] for i in gone]
        self._remove_shared(gone)
        for row in rows:
            self._finish(row, "cancelled")

    def _remove_shared(self, indices: list[int]) -> None:
        """Take rows out and keep the batch compact: the last row moves into each hole (its keys/values too)."""
        for i in sorted(indices, reverse=True):
            last = len(self._rows) - 1
            if i != last:
                self._cache.move(last, i, self._rows[last].length)
                self._rows[i] = self._rows[last]
            self._rows.pop()

    # -- the shared KV cache -----------------------------------------------------------------------

    def _join(self, rows: list[_Row], past: list[np.ndarray], mask: np.ndarray) -> None:
        if self._past is None:
            self._rows, self._past, self._mask = list(rows), past, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        self._past = [
            np.concatenate([self._left_pad(a, width, axis=2), self._left_pad(b, width, axis=2)])
            for a, b in zip(self._past, past)
        ]
        self._mask = np.concatenate([self._left_pad(self._mask, width, axis=1), self._left_pad(mask, width, axis=1)])
        self._rows = self._rows + list(rows)

    def _drop(self, predicate: Callable[[_Row], bool], reason: str) -> None:
        gone = [i for i, r in enumerate(self._rows) if predicate(r)]
        if gone:
            rows = [self._rows[i] for i in gone]
            self._remove(gone)
            for row in rows:
                self._finish(row, reason)

    def _remove(self, indices: list[int]) -> None:
        """Take rows out of the batch and trim the left padding no remaining row needs."""
        keep = [i for i in range(len(self._rows)) if i not in set(indices)]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._past = self._mask = None
            return
        mask = self._mask[keep]
        start = int(np.argmax(mask.any(axis=0)))  # first column some row still uses
        self._mask = mask[:, start:]
        self._past = [p[keep][:, :, start:] for p in self._past]

    @staticmethod
    def _left_pad(a: np.ndarray, width: int, axis: int) -> np.ndarray:
        missing = width - a.shape[axis]
        if missing == 0:
            return a
        pad = [(0, 0)] * a.ndim
        pad[axis] = (missing, 0)
        return np.pad(a, pad)


def _table(row: _Row) -> np.ndarray | None:
    table = row.request.prompt_table
    return None if table is None else table[None]


class ListSink:
    """A TokenSink that collects into lists (tests, warm-up)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.chunks: list[list[int]] = []
        self.reason: str | None = None
        self.error: str | None = None
        self.cancel = False
        self.done = threading.Event()

    def tokens(self, ids: list[int]) -> None:
        self.chunks.append(list(ids))
        self.ids.extend(ids)

    def finish(self, reason: str, error: str | None = None) -> None:
        assert self.reason is None, "finish called twice"
        self.reason, self.error = reason, error
        self.done.set()

    def cancelled(self) -> bool:
        return self.cancel
