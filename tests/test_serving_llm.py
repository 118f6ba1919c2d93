"""The `llm` model's logic without Triton: TensorRT-LLM-style request parsing and in-flight batching.

The batcher runs the tiny export's real ONNX decoder, both kinds (the traced one whose steps return a new
cache, and the shared-KV one written in place); the reference is the one-sequence loop every runtime shares
(`generate_ids` over the export's single-sequence decoder), so "batched == alone" is checked token for token.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from mmgpt.generation import SamplingParams, generate_ids
from mmgpt.preprocess import InputError
from mmgpt.serving import contract as c
from mmgpt.serving.llm import (
    GenerationRequest,
    InflightBatcher,
    ListSink,
    LLMError,
    StopRequest,
    request_tensors,
    response_tokens,
    stop_tensors,
)
from mmgpt.serving.stages import LLMStage
from mmgpt.template import prompt_ids

QUESTIONS = [
    "hi",
    "What is in the picture? Tell me everything.",
    "a",
    "Describe it in detail please, with colours and shapes",
    "x y z",
    "tell",
    "a longer question about many many things here and there",
    "q",
]


@pytest.fixture(scope="module", params=["shared", "concat"], ids=["kv-shared", "kv-concat"])
def stage(request, tiny_export) -> LLMStage:
    if request.param == "concat":
        return LLMStage(request.getfixturevalue("tiny_export_concat_kv"))
    return LLMStage(tiny_export)


@pytest.fixture(scope="module")
def tokenizer(tiny_export):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_export / "tokenizer")


def make_requests(stage: LLMStage, tokenizer, n: int = 8, *, sampling: bool = False) -> list[GenerationRequest]:
    cfg = stage.config
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = i % 2 == 0
        ids = prompt_ids(cfg, tokenizer, [], QUESTIONS[i % len(QUESTIONS)], has_image=image)
        table = rng.standard_normal((cfg.num_image_tokens, cfg.llm_hidden_size)).astype(np.float32) if image else None
        params = SamplingParams(max_tokens=40 + 7 * i, temperature=0.9 if sampling and i % 2 else 0.0, top_k=40, seed=i)
        out.append(GenerationRequest(f"r{i}", np.array(ids), table, params, cfg.eos_token_id, streaming=True))
    return out


def alone(stage: LLMStage, request: GenerationRequest) -> list[int]:
    """The reference: this request decoded by itself with the shared one-sequence loop."""
    return list(generate_ids(
        stage.model.decoder(), request.input_ids, request.prompt_table, request.params,
        eos_id=request.end_id, vocab_limit=stage.vocab_limit, max_context=stage.config.max_context,
    ))


def batcher(stage: LLMStage, max_batch: int = 8) -> InflightBatcher:
    return stage.batcher(max_batch)


# ------------------------------------------------------------------------------------------------
# In-flight batching
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "seeded-sampling"])
def test_batched_equals_one_by_one(stage, tokenizer, sampling):
    requests = make_requests(stage, tokenizer, sampling=sampling)
    b = batcher(stage)
    sinks = []
    for r in requests:
        sinks.append(ListSink())
        b.submit(r, sinks[-1])
    b.run_until_idle()
    for r, sink in zip(requests, sinks):
        assert sink.ids == alone(stage, r), r.request_id
        assert sink.reason in ("end", "length")
    assert b.stats.max_batch == len(requests)  # they really shared the steps
    assert b.stats.decode_rows > b.stats.decode_steps
    # the traced decoder prefills arrivals in one left-padded call; the shared-KV one reads each prompt alone
    assert b.stats.prefills == (len(requests) if b.shared_kv else 1) and b.stats.prefill_rows == len(requests)


def test_rows_join_and_leave_mid_flight(stage, tokenizer):
    """Arrivals every few steps, different budgets (so rows leave at different times), cache trimmed."""
    requests = make_requests(stage, tokenizer)
    b = batcher(stage)
    sinks = []
    widths = []
    active = []
    for i, r in enumerate(requests):
        sinks.append(ListSink())
        b.submit(r, sinks[-1])
        for _ in range(i * 5):
            b.step()
            active.append(len(b._rows))
            if b._mask is not None:
                widths.append(b._mask.shape[1])
    while b.step():
        active.append(len(b._rows))
        if b._mask is not None:
            widths.append(b._mask.shape[1])
    for r, sink in zip(requests, sinks):
        assert sink.ids == alone(stage, r), r.request_id
    assert b.stats.prefill_rows == len(requests)
    assert b._past is None and b._rows == []  # everything left; nothing held
    assert b.stats.max_batch > 1
    if b.shared_kv:  # a leaving row's slot is taken by another: the cache holds no more rows than ran at once
        assert b._cache.rows == max(active) < len(requests)
    else:  # the left padding no remaining row needs is cut when the longest row leaves
        assert any(later < earlier for earlier, later in zip(widths, widths[1:]))


def test_a_long_prompt_is_read_in_chunks_while_running_rows_keep_decoding(stage, tokenizer):
    """Shared-KV: each iteration reads at most `prefill_chunk` prompt tokens, then every running row decodes."""
    if not getattr(stage.model, "shared_kv", False):
        pytest.skip("the traced decoder prefills whole prompts")
    short, long = make_requests(stage, tokenizer, 2)  # 60 prompt tokens with the image
    short = GenerationRequest(**{**short.__dict__, "input_ids": short.input_ids[-5:], "prompt_table": None,
                                 "params": SamplingParams(max_tokens=60), "end_id": -1})
    chunk = 8
    b = stage.batcher(4, prefill_chunk=chunk)
    s1, s2 = ListSink(), ListSink()
    b.submit(short, s1)
    b.step()
    b.submit(long, s2)
    iterations = 0
    while not s2.ids:  # the long prompt is being read
        before = len(s1.ids)
        b.step()
        iterations += 1
        assert len(s1.ids) == before + 1  # the running row got its token every iteration
    assert iterations == -(-len(long.input_ids) // chunk)
    b.run_until_idle()
    assert s1.ids == alone(stage, short) and s2.ids == alone(stage, long)


def test_prompts_shorter_than_a_chunk_are_read_whole(stage, tokenizer, monkeypatch):
    """Shared-KV: an iteration's leftover budget does not start a prompt it cannot finish (each read streams every
    weight, so a split prompt pays for a second pass); it is read whole next iteration."""
    if not getattr(stage.model, "shared_kv", False):
        pytest.skip("the traced decoder prefills whole prompts")
    requests = make_requests(stage, tokenizer, 3)
    reads, run = [], stage.model.run
    monkeypatch.setattr(stage.model, "run", lambda embeds, *a: reads.append(embeds.shape[1]) or run(embeds, *a))
    longest = max(len(r.input_ids) for r in requests)
    b = stage.batcher(4, prefill_chunk=longest + longest // 2)  # room for one prompt and half of the next
    sinks = [ListSink() for _ in requests]
    for r, sink in zip(requests, sinks):
        b.submit(r, sink)
    b.run_until_idle()
    assert sorted(n for n in reads if n > 1) == sorted(len(r.input_ids) for r in requests)  # one read each
    for r, sink in zip(requests, sinks):
        assert sink.ids == alone(stage, r), r.request_id


def test_streaming_sends_each_token_and_non_streaming_one_chunk(stage, tokenizer):
    streamed, whole = make_requests(stage, tokenizer, 2)
    whole = GenerationRequest(**{**whole.__dict__, "streaming": False})
    b = batcher(stage)
    s1, s2 = ListSink(), ListSink()
    b.submit(streamed, s1)
    b.submit(whole, s2)
    b.run_until_idle()
    assert all(len(chunk) == 1 for chunk in s1.chunks) and len(s1.chunks) == len(s1.ids) > 1
    assert len(s2.chunks) == 1 and s2.ids == alone(stage, whole)


def test_stop_and_cancellation_remove_only_that_row(stage, tokenizer):
    requests = make_requests(stage, tokenizer, 3)
    requests = [GenerationRequest(**{**r.__dict__, "params": SamplingParams(max_tokens=200)}) for r in requests]
    b = batcher(stage)
    sinks = [ListSink() for _ in requests]
    for r, s in zip(requests, sinks):
        b.submit(r, s)
    for _ in range(5):
        b.step()
    before = [len(s.ids) for s in sinks]
    b.stop("r0")  # TensorRT-LLM's stop request
    sinks[1].cancel = True  # the client went away
    b.step()
    assert sinks[0].reason == "cancelled" and sinks[1].reason == "cancelled"
    assert [len(s.ids) for s in sinks[:2]] == before[:2]  # nothing after the stop
    assert len(b._rows) == 1 and b.stats.cancelled == 2
    b.run_until_idle()
    assert sinks[2].ids == alone(stage, requests[2])  # the survivor is unaffected


def test_stop_before_the_request_arrives_is_remembered(stage, tokenizer):
    [r] = make_requests(stage, tokenizer, 1)
    b = batcher(stage)
    b.stop(r.request_id)
    sink = ListSink()
    b.submit(r, sink)
    b.run_until_idle()
    assert sink.reason == "cancelled" and sink.ids == []


def test_more_requests_than_rows_wait_their_turn(stage, tokenizer):
    requests = make_requests(stage, tokenizer, 5)
    b = batcher(stage, max_batch=2)
    sinks = [ListSink() for _ in requests]
    for r, s in zip(requests, sinks):
        b.submit(r, s)
    b.run_until_idle()
    assert b.stats.max_batch == 2
    for r, s in zip(requests, sinks):
        assert s.ids == alone(stage, r)


def test_budget_is_capped_by_the_context(stage, tokenizer):
    cfg = stage.config
    words = 1
    while len(prompt_ids(cfg, tokenizer, [], "word " * (words + 1), has_image=False)) < cfg.max_context - 50:
        words += 1
    ids = np.array(prompt_ids(cfg, tokenizer, [], "word " * words, has_image=False))
    room = cfg.max_context - len(ids)
    assert 0 < room < 100
    r = GenerationRequest("long", ids, None, SamplingParams(max_tokens=1000), end_id=-1, streaming=True)  # never ends
    sink = ListSink()
    b = batcher(stage)
    b.submit(r, sink)
    b.run_until_idle()
    assert len(sink.ids) == room and sink.reason == "length"


class _Broken:
    """A model whose decode step fails once."""

    def __init__(self, model):
        self.model = model
        self.fail = False

    def __getattr__(self, name):  # everything else as the real model has it
        return getattr(self.model, name)

    def run(self, *args):
        if self.fail:
            self.fail = False
            raise RuntimeError("device lost")
        return self.model.run(*args)


def test_a_failed_step_fails_its_rows_and_the_batcher_keeps_serving(stage, tokenizer):
    broken = _Broken(stage.model)
    b = InflightBatcher(broken, max_batch=4, vocab_limit=stage.vocab_limit, max_context=stage.config.max_context)
    first, second = make_requests(stage, tokenizer, 2)
    s1 = ListSink()
    b.submit(first, s1)
    b.step()
    broken.fail = True
    if b.shared_kv:  # the failed step is redone row by row: the request carries on as if nothing happened
        b.step()
        b.run_until_idle()
        assert s1.ids == alone(stage, first) and s1.reason in ("end", "length")
    else:
        with pytest.raises(RuntimeError):
            b.step()
        assert s1.reason == "error" and "device lost" in s1.error
    s2 = ListSink()
    b.submit(second, s2)
    b.run_until_idle()
    assert s2.ids == alone(stage, second)


class _FailsAtLength:
    """A shared-KV model whose decode step raises whenever a row holding `length` tokens is in it."""

    def __init__(self, model, length: int):
        self.model, self.length = model, length

    def __getattr__(self, name):
        return getattr(self.model, name)

    def run(self, embeds, cache, first_row, lengths):
        if embeds.shape[1] == 1 and self.length in lengths:
            raise RuntimeError(f"kernel failure at {self.length} tokens")
        return self.model.run(embeds, cache, first_row, lengths)


def test_one_requests_failure_fails_it_alone_and_the_others_stream_on(stage, tokenizer):
    if not getattr(stage.model, "shared_kv", False):
        pytest.skip("the traced decoder fails the whole batch (one left-padded step)")
    requests = make_requests(stage, tokenizer, 4)
    doomed = requests[1]
    model = _FailsAtLength(stage.model, len(doomed.input_ids) + 3)  # its 4th decode step
    b = InflightBatcher(model, max_batch=4, vocab_limit=stage.vocab_limit, max_context=stage.config.max_context)
    sinks = [ListSink() for _ in requests]
    for r, s in zip(requests, sinks):
        b.submit(r, s)
    b.run_until_idle()
    assert sinks[1].reason == "error" and "kernel failure" in sinks[1].error
    assert len(sinks[1].ids) == 4  # what it had streamed before its failing step
    survivors = 0
    for i in (0, 2, 3):
        want, p = alone(stage, requests[i]), len(requests[i].input_ids)
        if p <= model.length <= p + len(want) - 2:  # this row too decodes a step at that length: it fails there
            assert sinks[i].reason == "error" and sinks[i].ids == want[: model.length - p + 1], i
        else:  # token for token what it produces alone, though a neighbour failed in its steps
            assert sinks[i].ids == want and sinks[i].reason in ("end", "length"), i
            survivors += 1
    assert survivors >= 1


def test_non_finite_logits_fail_that_request_alone(stage, tokenizer):
    if not getattr(stage.model, "shared_kv", False):
        pytest.skip("shown on the shared-KV decoder, whose rows never mix")
    requests = make_requests(stage, tokenizer, 3)
    poisoned = requests[0]  # with an image: a NaN in its image rows reaches only its own logits
    table = poisoned.prompt_table.copy()
    table[0, 0] = np.nan
    requests[0] = GenerationRequest(**{**poisoned.__dict__, "prompt_table": table})
    b = batcher(stage)
    sinks = [ListSink() for _ in requests]
    for r, s in zip(requests, sinks):
        b.submit(r, s)
    b.run_until_idle()
    assert sinks[0].reason == "error" and "non-finite logits" in sinks[0].error and sinks[0].ids == []
    for r, s in zip(requests[1:], sinks[1:]):
        assert s.ids == alone(stage, r)


def test_background_thread_serves_concurrent_submitters(stage, tokenizer):
    requests = make_requests(stage, tokenizer)
    b = batcher(stage).start()
    try:
        sinks = [ListSink() for _ in requests]
        threads = [threading.Thread(target=b.submit, args=(r, s)) for r, s in zip(requests, sinks)]
        for t in threads:
            t.start()
        for s in sinks:
            assert s.done.wait(30)
        for r, s in zip(requests, sinks):
            assert s.ids == alone(stage, r)
    finally:
        b.shutdown()


# ------------------------------------------------------------------------------------------------
# Request tensors (TensorRT-LLM's layout)
# ------------------------------------------------------------------------------------------------


def parse(stage, tensors, request_id="7"):
    return stage.parse(tensors, request_id)


def test_request_tensors_round_trip(stage):
    cfg = stage.config
    table = np.ones((cfg.num_image_tokens, cfg.llm_hidden_size), np.float32)
    ids = [5, 6, cfg.llm_vocab_size, cfg.llm_vocab_size + cfg.num_image_tokens - 1, 7]
    params = SamplingParams(max_tokens=9, temperature=0.5, top_p=0.75, top_k=3, seed=2**64 - 1)
    tensors = request_tensors(ids, table, params, end_id=cfg.eos_token_id, pad_id=cfg.pad_token_id)
    for name, array in tensors.items():  # batch dimension first, dtypes of the interface
        assert array.shape[0] == 1, name
        want = c.LLM_INPUTS[name][0]
        assert want.startswith("${") or np.dtype(array.dtype) == np.dtype(
            {"TYPE_INT32": np.int32, "TYPE_FP32": np.float32, "TYPE_UINT64": np.uint64, "TYPE_BOOL": np.bool_}[want]
        ), name
    r = parse(stage, tensors)
    assert r.input_ids.tolist() == ids and r.params == params and r.streaming
    np.testing.assert_array_equal(r.prompt_table, table)
    greedy = parse(stage, request_tensors(ids[:2], None, SamplingParams(max_tokens=3), end_id=0, pad_id=1))
    assert greedy.params.greedy and greedy.prompt_table is None


def test_stop_request(stage):
    assert parse(stage, stop_tensors(), "42") == StopRequest("42")
    with pytest.raises(InputError, match="request id"):
        parse(stage, stop_tensors(), "")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: t.pop(c.INPUT_IDS), "input_ids is required"),
        (lambda t: t.update({c.INPUT_LENGTHS: np.array([[99]], np.int32)}), "input_lengths"),
        (lambda t: t.update({c.INPUT_IDS: np.array([[1, 2], [3, 4]], np.int32)}), "one sequence per request"),
        (lambda t: t.update({c.INPUT_IDS: np.array([[1, 2, 10_000]], np.int32)}), "token id 10000 out of range"),
        (lambda t: t.update({c.REQUEST_OUTPUT_LEN: np.array([[0]], np.int32)}), "max_tokens"),
        (lambda t: t.update({c.LLM_TEMPERATURE: np.array([[-1]], np.float32)}), "temperature"),
        (lambda t: t.update({c.RUNTIME_TOP_P: np.array([[0]], np.float32)}), "top_p"),
        (lambda t: t.update({c.RUNTIME_TOP_K: np.array([[-2]], np.int32)}), "top_k"),
        (lambda t: t.update({c.INPUT_IDS: np.zeros((1, 600), np.int32), c.INPUT_LENGTHS: np.array([[600]], np.int32)}),
         "over the context"),
        (lambda t: t.update({c.PROMPT_EMBEDDING_TABLE: np.zeros((1, 4, 3), np.float32)}), "prompt_embedding_table"),
    ],
)
def test_bad_requests_are_named(stage, change, match):
    tensors = request_tensors([1, 2, 3], None, SamplingParams(max_tokens=4), end_id=0, pad_id=1)
    change(tensors)
    with pytest.raises(InputError, match=match):
        parse(stage, tensors)


def test_image_ids_need_a_table(stage):
    cfg = stage.config
    tensors = request_tensors([1, cfg.llm_vocab_size], None, SamplingParams(max_tokens=4), end_id=0, pad_id=1)
    with pytest.raises(InputError, match="out of range"):
        parse(stage, tensors)


def test_response_tokens_reads_streamed_and_error_responses():
    outputs = {c.OUTPUT_IDS: np.array([[[4, 5, 6]]], np.int32), c.SEQUENCE_LENGTH: np.array([[2]], np.int32)}
    assert response_tokens(outputs.get) == [4, 5]
    assert response_tokens({}.get) == []  # the bare final flag
    with pytest.raises(LLMError, match="boom"):
        response_tokens({c.LLM_ERROR: np.array([[b"boom"]], object)}.get)


# ------------------------------------------------------------------------------------------------
# Prefix cache
# ------------------------------------------------------------------------------------------------


def _follow_up(first: GenerationRequest, answer: list[int], extra: list[int], table=None, max_tokens: int = 30):
    ids = np.concatenate([first.input_ids, np.array(answer + extra, np.int64)])
    table = first.prompt_table if table is None else table
    return GenerationRequest("r-next", ids, table, SamplingParams(max_tokens=max_tokens), first.end_id, streaming=True)


def test_a_next_turn_starts_from_the_cached_conversation_and_answers_the_same(stage, tokenizer):
    first = make_requests(stage, tokenizer, 2)[0]  # with an image
    b = stage.batcher(4, prefix_cache_bytes=2**30)
    s1 = ListSink()
    b.submit(first, s1)
    b.run_until_idle()
    extra = tokenizer.encode("\nUser: and then?\nAssistant:", add_special_tokens=False)
    second = _follow_up(first, s1.ids, extra)
    s2 = ListSink()
    b.submit(second, s2)
    b.run_until_idle()
    assert s2.ids == alone(stage, second)  # the same tokens as a full prefill
    fed = s1.ids if s1.reason == "end" else s1.ids[:-1]  # the last token of a length-cut answer was never fed
    assert (b.stats.prefix_hits, b.stats.prefix_tokens) == (1, len(first.input_ids) + len(fed))


def test_another_image_reuses_the_prefix_only_up_to_the_image(stage, tokenizer):
    first = make_requests(stage, tokenizer, 1)[0]
    b = stage.batcher(4, prefix_cache_bytes=2**30)
    s1 = ListSink()
    b.submit(first, s1)
    b.run_until_idle()
    other = np.random.default_rng(9).standard_normal(first.prompt_table.shape).astype(np.float32)
    second = _follow_up(first, s1.ids, [], table=other)
    s2 = ListSink()
    b.submit(second, s2)
    b.run_until_idle()
    assert s2.ids == alone(stage, second)
    image_at = int(np.nonzero(first.input_ids >= stage.model.vocab_size)[0][0])
    assert b.stats.prefix_tokens == image_at  # the system prompt and "User: ", not the image's rows


def test_prefix_cache_stays_within_its_bytes(stage, tokenizer):
    requests = make_requests(stage, tokenizer, 6)
    one_token = 2 * stage.model.num_layers * stage.model.num_kv_heads * stage.model.head_dim * 4
    bound = 150 * one_token
    b = stage.batcher(8, prefix_cache_bytes=bound)
    for r in requests:
        b.submit(r, ListSink())
    b.run_until_idle()
    assert 0 < b.prefix_cache.bytes <= bound and len(b.prefix_cache.entries) < len(requests)


# ------------------------------------------------------------------------------------------------
# Admission: a keys/values budget, a bounded queue, "busy" instead of a queue without end
# ------------------------------------------------------------------------------------------------


def _reservation(b: InflightBatcher, rows: list[GenerationRequest]) -> int:
    spans = [len(r.input_ids) + min(r.params.max_tokens, b.max_context - len(r.input_ids)) for r in rows]
    return len(rows) * max(spans) * b.kv_token_bytes


def test_rows_join_only_within_the_kv_budget_and_every_answer_is_whole(stage, tokenizer):
    requests = make_requests(stage, tokenizer, 6)
    probe = stage.batcher(8)
    budget = _reservation(probe, requests[:2])  # room for two of them at a time (the longest two: the last)
    b = stage.batcher(8, kv_budget_bytes=_reservation(probe, requests[-2:]), queue_timeout_s=60)
    sinks = [ListSink() for _ in requests]
    for r, s in zip(requests, sinks):
        b.submit(r, s)
    reserved, running = [], []
    while b.step():
        reserved.append(b.stats.kv_reserved_bytes)
        running.append(len(b._rows) + (b._prefilling is not None))
    assert max(reserved) <= b.kv_budget_bytes and budget <= b.kv_budget_bytes
    assert max(running) == 2  # the budget, not max_batch (8), bounded the batch
    for r, s in zip(requests, sinks):
        assert s.ids == alone(stage, r) and s.reason in ("end", "length"), r.request_id
    assert b.stats.busy == 0 and b.stats.queued == 0


def test_a_request_that_waits_too_long_gets_a_busy_error(stage, tokenizer):
    first, second = make_requests(stage, tokenizer, 2)
    b = stage.batcher(1, queue_timeout_s=0.2)  # one row: the second waits for the first
    s1, s2 = ListSink(), ListSink()
    b.submit(first, s1)
    b.submit(second, s2)
    b.step()
    time.sleep(0.3)
    while b.step():
        pass
    assert s1.reason in ("end", "length") and s1.ids == alone(stage, first)
    assert s2.reason == "error" and "busy" in s2.error and "queue_timeout_s" in s2.error and s2.ids == []
    assert b.stats.busy == 1


def test_a_full_queue_and_an_oversized_request_are_refused_at_once(stage, tokenizer):
    a, b_, c_ = make_requests(stage, tokenizer, 3)
    b = stage.batcher(1, max_queue=2)
    sinks = [ListSink() for _ in range(3)]
    for r, s in zip((a, b_, c_), sinks):
        b.submit(r, s)
    assert sinks[2].reason == "error" and "max_queue" in sinks[2].error  # before any step ran
    assert sinks[0].reason is None and sinks[1].reason is None  # the two queued ones are served
    b.run_until_idle()
    assert sinks[0].ids == alone(stage, a) and sinks[1].ids == alone(stage, b_)
    tiny = stage.batcher(8, kv_budget_bytes=1000)
    s = ListSink()
    tiny.submit(a, s)
    assert s.reason == "error" and "kv_budget_mb" in s.error and tiny.active() == 0


def test_requester_queues_keep_order_and_a_stuck_requester_holds_up_no_one_else():
    """A send to a dead entry-point process never returns (Triton 2.51): it may only stall that process's
    own queue, never the caller (the batcher) for long, nor another requester's responses."""
    from mmgpt.serving.llm import RequesterQueues

    queues = RequesterQueues(ahead=2, wait_s=0.3, idle_s=0.2)
    stuck, got, done = threading.Event(), [], threading.Event()
    caller = threading.get_ident()
    queues(1, stuck.wait)  # requester 1's process is gone: this send never returns (until the test ends)
    t = time.monotonic()
    queues(1, lambda: got.append("after the stuck one"))
    assert time.monotonic() - t < 0.2  # within `ahead`: queued at once
    queues(1, lambda: got.append("after the stuck one"))
    assert 0.25 < time.monotonic() - t < 2  # 2 behind: held back, but only for wait_s
    for i in range(5):
        queues(2, lambda i=i: got.append((i, threading.get_ident() != caller)))
    queues(2, lambda: 1 / 0)  # a failed send is logged; the next ones still go
    queues(2, done.set)
    assert done.wait(5)
    assert got == [(i, True) for i in range(5)]
    inline = []
    queues(None, lambda: inline.append(threading.get_ident()))  # a gRPC client of the llm model: sent at once
    assert inline == [caller]
    deadline = time.monotonic() + 5
    while queues.threads() > 1 and time.monotonic() < deadline:  # an idle queue's thread ends
        time.sleep(0.05)
    assert queues.threads() == 1  # only the stuck one is left
    stuck.set()
    while len(got) < 7 and time.monotonic() < deadline + 5:
        time.sleep(0.02)
    assert got[5:] == ["after the stuck one"] * 2
