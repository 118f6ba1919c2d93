"""The entry point's logic without Triton: the contract's checks, the replies, and the whole answer over
in-process stages (the same stage classes the Triton models wrap), compared with `Assistant.from_export`."""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import uuid

import numpy as np
import pytest
from serving_fixtures import entry_inputs, flat_png, png_bytes, wav_bytes

from mmgpt.generation import SamplingParams
from mmgpt.preprocess import InputError, Limits
from mmgpt.serving import contract as c
from mmgpt.serving.llm import GenerationRequest
from mmgpt.serving.multimodal import (
    EntrySettings,
    FinishedStreams,
    LLMGone,
    Pipeline,
    Replies,
    ResponsePump,
    is_restarting,
    parse_question,
    process_alive,
    read_pid,
    through_restarts,
    write_pid,
)
from mmgpt.serving.stages import LLMStage, VisionStage, WhisperStage
from mmgpt.template import Message

SETTINGS = EntrySettings(max_tokens_limit=1024, max_image_bytes=300_000, max_image_pixels=250_000, response_timeout_s=30)


# ------------------------------------------------------------------------------------------------
# parse_question: the contract's checks
# ------------------------------------------------------------------------------------------------


def test_defaults_are_mmgpt_asks():
    q = parse_question(entry_inputs("hello"), SETTINGS)
    assert q.text == "hello" and q.image is None and q.audio is None and q.history == ()
    assert q.params == SamplingParams() and q.stream is True


def test_every_input_is_read():
    history = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    q = parse_question(
        entry_inputs("q", image_input=b"img", audio_input=b"wav", history=history, max_tokens=7, temperature=0.5,
                     top_p=0.75, top_k=3, seed=2**64 - 1, stop_words=["a", "bc"], stream=False),
        SETTINGS,
    )
    assert (q.image, q.audio, q.stream) == (b"img", b"wav", False)
    assert q.history == (Message("user", "hi"), Message("assistant", "hello"))
    assert q.params == SamplingParams(max_tokens=7, temperature=0.5, top_p=0.75, top_k=3, seed=2**64 - 1, stop_words=("a", "bc"))


def test_empty_text_with_audio_is_a_question():
    assert parse_question(entry_inputs("", audio_input=b"x"), SETTINGS).text == ""


@pytest.mark.parametrize(
    "inputs, match",
    [
        (entry_inputs(None), "text_input is required"),
        (entry_inputs("  "), "no question"),
        (entry_inputs(b"\xff\xfe bad"), "text_input is not valid UTF-8"),
        (entry_inputs("q", max_tokens=0), "max_tokens must be between 1 and 1024"),
        (entry_inputs("q", max_tokens=1025), "max_tokens must be between 1 and 1024"),
        (entry_inputs("q", temperature=-0.1), "temperature must be >= 0"),
        (entry_inputs("q", temperature=float("nan")), "temperature"),
        (entry_inputs("q", top_p=0.0), r"top_p must be in \(0, 1\]"),
        (entry_inputs("q", top_p=1.01), r"top_p must be in \(0, 1\]"),
        (entry_inputs("q", top_k=-1), "top_k must be >= 0"),
        (entry_inputs("q", history="[{"), "history is not valid JSON"),
        (entry_inputs("q", history='{"role": "user"}'), "history must be a JSON list"),
        (entry_inputs("q", history='[{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]'),
         "role must be 'user' or 'assistant'"),
        (entry_inputs("q", history='[{"role": "user", "content": "x"}]'), "complete user/assistant pairs"),
        (entry_inputs("q", history='[{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]'),
         "expected role 'user'"),
        (entry_inputs("q", history='[{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]'),
         "content must be a string"),
        ({**entry_inputs("q"), c.HISTORY: np.array([b"\xff"], object)}, "history is not valid UTF-8"),
        ({**entry_inputs("q"), c.STOP_WORDS: np.array([b"\xff"], object)}, "stop_words is not valid UTF-8"),
        (entry_inputs("q", stop_words=["ok", ""]), "stop_words must be non-empty"),
    ],
)
def test_bad_inputs_are_named(inputs, match):
    with pytest.raises(InputError, match=match):
        parse_question(inputs, SETTINGS)


# ------------------------------------------------------------------------------------------------
# Replies: what the client receives
# ------------------------------------------------------------------------------------------------


sent_dropped: list[int] = []  # history_dropped of every response sent, in order
sent_end: list[tuple[str, int, int]] = []  # (finish_reason, prompt_tokens, completion_tokens) of each last response


def _recorder():
    """send() that records (text, transcript, final) per response, history_dropped in sent_dropped and the
    last response's counts in sent_end."""
    sent = []

    def send(outputs, final):
        if outputs is None:
            sent.append((None, None, final))
            return
        sent.append((outputs[c.TEXT_OUTPUT], outputs[c.TRANSCRIPT], final))
        sent_dropped.append(outputs[c.HISTORY_DROPPED])
        if final:
            sent_end.append((outputs[c.FINISH_REASON], outputs[c.PROMPT_TOKENS], outputs[c.COMPLETION_TOKENS]))

    return sent, send


def test_stream_sends_new_text_with_the_transcript_first():
    sent, send = _recorder()
    r = Replies(send, stream=True)
    r.heard("what was said")
    r.piece("Hel")
    r.piece("")
    r.piece("lo")
    r.close()
    assert sent == [("", "what was said", False), ("Hel", "", False), ("lo", "", False), ("", "", True)]


def test_the_count_of_dropped_history_messages_rides_on_the_first_response_the_counts_on_the_last():
    sent = []
    r = Replies(lambda outputs, final: sent.append((outputs, final)), stream=True)
    r.heard("", dropped=4)
    r.piece("Hi")
    r.close("length", 17, 3)
    assert [(o[c.TEXT_OUTPUT], o[c.HISTORY_DROPPED], final) for o, final in sent] == [("", 4, False), ("Hi", 0, False), ("", 0, True)]
    assert [(o[c.FINISH_REASON], o[c.PROMPT_TOKENS], o[c.COMPLETION_TOKENS]) for o, _ in sent] == [
        ("", 0, 0), ("", 0, 0), ("length", 17, 3)]


def test_no_stream_sends_exactly_one_response():
    sent, send = _recorder()
    r = Replies(send, stream=False)
    r.heard("said")
    r.piece("Hel")
    r.piece("lo")
    r.close()
    assert sent == [("Hello", "said", True)]


def test_an_empty_stream_still_sends_one_response():
    sent, send = _recorder()
    r = Replies(send, stream=True)
    r.heard("")
    r.close()
    assert sent == [("", "", True)]


# ------------------------------------------------------------------------------------------------
# The whole answer over in-process stages
# ------------------------------------------------------------------------------------------------


class QueueSink:
    """A TokenSink feeding an iterator, like the llm model's responses feed the BLS iterator."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self.cancel = False

    def tokens(self, ids):
        self.q.put(list(ids))

    def finish(self, reason, error=None):
        self.q.put(None)

    def cancelled(self):
        return self.cancel

    def __iter__(self):
        while (item := self.q.get()) is not None:
            yield item


class LocalStages:
    def __init__(self, export):
        self.vision = VisionStage(export)
        self.whisper = WhisperStage(export, Limits(max_audio_seconds=5.0))
        self.llm = LLMStage(export)
        self.batcher = self.llm.batcher(4).start()
        self.stopped: list[str] = []
        self.transcript_override: str | None = None

    def transcribe(self, audio):
        return self.whisper.transcribe(audio) if self.transcript_override is None else self.transcript_override

    def encode_image(self, pixels):
        return self.vision.encode_batches([pixels])[0][0]

    def generate(self, request_id, input_ids, prompt_table, params, end_id):
        sink = QueueSink()
        self.batcher.submit(GenerationRequest(request_id, np.array(input_ids), prompt_table, params, end_id, True), sink)
        return ResponsePump(lambda: iter(sink), lambda chunk: chunk, timeout_s=30)

    def stop(self, request_id):
        self.stopped.append(request_id)
        self.batcher.stop(request_id)


@pytest.fixture(scope="module")
def stages(tiny_export):
    s = LocalStages(tiny_export)
    yield s
    s.batcher.shutdown()


@pytest.fixture(scope="module")
def pipeline(tiny_export):
    p = Pipeline.load(tiny_export, SETTINGS)
    p.warm_up()
    return p


@pytest.fixture(scope="module")
def exported(tiny_export):
    from mmgpt.inference import Assistant

    return Assistant.from_export(tiny_export)


def run(pipeline, stages, inputs, cancel_after: int | None = None):
    sent, send = _recorder()
    question = parse_question(inputs, SETTINGS)
    pieces = []

    def is_cancelled():
        return cancel_after is not None and len(pieces) >= cancel_after

    def record(outputs, final):
        if outputs is not None and outputs[c.TEXT_OUTPUT]:
            pieces.append(outputs[c.TEXT_OUTPUT])
        send(outputs, final)

    outcome = pipeline.answer(question, stages, Replies(record, stream=question.stream),
                              request_id=uuid.uuid4().hex, is_cancelled=is_cancelled)
    return outcome, sent


CASES = {
    "text": dict(text="What is the weather like?"),
    "image+text": dict(text="What is in the picture?", image_input=png_bytes(64, 48, seed=1)),
    "audio+text": dict(text="Answer this:", audio_input=wav_bytes(1.5, 22050, channels=2)),
    "audio only": dict(text="", audio_input=wav_bytes(2.0, 16000)),
    "multi-turn": dict(text="And then?", history=json.dumps([
        {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"}])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_answers_equal_the_in_process_pipeline(pipeline, stages, exported, case):
    kw = dict(CASES[case])
    text = kw.pop("text")
    outcome, sent = run(pipeline, stages, entry_inputs(text, **kw))
    history = [Message(m["role"], m["content"]) for m in json.loads(kw.get("history", "[]"))]
    want = exported.ask(text, image=kw.get("image_input"), audio=kw.get("audio_input"), history=history)
    assert outcome == "done"
    assert "".join(t for t, _, _ in sent if t) == want.text and want.text
    assert "".join(tr for _, tr, _ in sent if tr) == want.transcript
    assert bool(want.transcript) == ("audio_input" in kw)
    # usage: the prompt as the template builds it, the tokens generated, why it stopped
    question = parse_question(entry_inputs(text, **kw), SETTINGS)
    from mmgpt.template import join_question

    ids = pipeline_prompt(pipeline, question, join_question(text, want.transcript), "image_input" in kw)
    reason, prompt_tokens, completion_tokens = sent_end[-1]
    assert prompt_tokens == len(ids) and 1 <= completion_tokens <= question.params.max_tokens
    assert reason == ("length" if completion_tokens == question.params.max_tokens else "stop")


def pipeline_prompt(pipeline, question, asked, has_image):
    from mmgpt.template import prompt_ids

    return prompt_ids(pipeline.config, pipeline.tokenizer, question.history, asked, has_image=has_image)


def test_stop_words_cut_like_the_reference_and_stop_the_llm(pipeline, stages, exported):
    stages.stopped.clear()
    full = exported.ask("Tell me about it").text
    word = full[len(full) // 2 : len(full) // 2 + 3]
    params = SamplingParams(stop_words=(word,))
    want = exported.ask("Tell me about it", params=params).text
    outcome, sent = run(pipeline, stages, entry_inputs("Tell me about it", stop_words=[word]))
    assert outcome == "stopped" and "".join(t for t, _, _ in sent if t) == want
    assert word not in want and len(stages.stopped) == 1
    assert sent_end[-1][0] == "stop" and sent_end[-1][2] < params.max_tokens


def _wait_idle(batcher, timeout=5.0):
    deadline = time.monotonic() + timeout
    while batcher.active() and time.monotonic() < deadline:
        time.sleep(0.01)
    return batcher.active() == 0


def test_cancellation_stops_the_llm_row(pipeline, stages):
    assert _wait_idle(stages.batcher)  # rows of earlier tests have left
    before = stages.batcher.stats.cancelled
    outcome, sent = run(pipeline, stages, entry_inputs("Tell me a long story", max_tokens=1000), cancel_after=1)
    assert outcome == "cancelled"
    assert _wait_idle(stages.batcher)
    assert stages.batcher.stats.cancelled == before + 1  # the row was removed, not finished


def test_an_empty_transcript_and_no_text_is_no_question(pipeline, stages):
    stages.transcript_override = ""
    try:
        with pytest.raises(InputError, match="no question"):
            run(pipeline, stages, entry_inputs("", audio_input=b"any"))
    finally:
        stages.transcript_override = None


@pytest.mark.parametrize(
    "inputs, match",
    [
        (entry_inputs("q", image_input=b"not an image"), "image could not be decoded"),
        (entry_inputs("q", image_input=wav_bytes(0.5)), "image could not be decoded"),
        (entry_inputs("q", image_input=png_bytes(8, 8)[:40]), "image could not be decoded"),
        (entry_inputs("q", image_input=b""), "image is empty"),
        (entry_inputs("q", image_input=flat_png(600, 600)), "over the limit of 250000"),
        (entry_inputs("q", image_input=b"\x89PNG" + bytes(300_000)), "over the limit of 300000"),
        (entry_inputs("q", audio_input=b"not audio"), "audio could not be decoded"),
        (entry_inputs("q", audio_input=b""), "audio is empty"),
        (entry_inputs("q", audio_input=wav_bytes(6.0)), "over the limit of 5 s"),
        (entry_inputs("word " * 400), "over the context"),
    ],
)
def test_bad_media_and_long_prompts_are_named(pipeline, stages, inputs, match):
    with pytest.raises(InputError, match=match):
        run(pipeline, stages, inputs)


# ------------------------------------------------------------------------------------------------
# ResponsePump
# ------------------------------------------------------------------------------------------------


def _long_history(turns: int) -> list[dict]:
    out = []
    for i in range(turns):
        out += [{"role": "user", "content": f"question number {i} about the shapes in the picture"},
                {"role": "assistant", "content": f"answer number {i}: a red circle left of a blue square"}]
    return out


def test_a_conversation_longer_than_the_context_loses_its_oldest_turns(pipeline, stages, exported):
    """Instead of an error the user cannot act on: the oldest whole turns go, the answer is the reference
    answer for the turns kept, and the first response says how many messages were left out."""
    history = _long_history(40)
    image = png_bytes(64, 48, seed=3)
    start = len(sent_dropped)
    outcome, sent = run(pipeline, stages, entry_inputs("and the last one?", image_input=image,
                                                       history=json.dumps(history), max_tokens=12))
    assert outcome == "done"
    dropped = sent_dropped[start]  # the first response's
    assert dropped > 0 and dropped % 2 == 0
    kept = [Message(m["role"], m["content"]) for m in history[dropped:]]
    want = exported.ask("and the last one?", image=image, history=kept, params=SamplingParams(max_tokens=12))
    assert "".join(t for t, _, _ in sent if t) == want.text


@pytest.mark.parametrize("settings, match", [
    (dict(max_history_bytes=100), "over the limit of 100 \\(max_history_bytes\\)"),
    (dict(max_history_messages=10), "holds 12 messages, over the limit of 10 \\(max_history_messages\\)"),
])
def test_absurd_histories_are_refused(settings, match):
    from dataclasses import replace

    with pytest.raises(InputError, match=match):
        parse_question(entry_inputs("q", history=json.dumps(_long_history(6))), replace(SETTINGS, **settings))


def test_pump_polls_while_waiting_and_times_out():
    release = threading.Event()

    def slow():
        yield [1]
        release.wait(5)
        yield [2]

    pump = ResponsePump(slow, lambda x: x, timeout_s=0.3, poll_s=0.02)
    assert next(pump) == [1]
    assert next(pump) == []  # nothing yet: the caller gets to look for cancellation
    with pytest.raises(TimeoutError, match="no response"):
        while True:
            next(pump)
    release.set()


def test_pump_passes_on_the_readers_error():
    def broken():
        yield [1]
        raise RuntimeError("inner failure")

    pump = ResponsePump(broken, lambda x: x, timeout_s=5)
    got = []
    with pytest.raises(RuntimeError, match="inner failure"):
        for chunk in pump:
            got += chunk
    assert got == [1]


def test_pump_gives_up_at_once_when_the_llm_process_is_gone():
    """A killed LLM process never sends another response: the wait ends when its pid is gone, not at the
    timeout, with an error that says what happened (not an empty answer)."""
    never = threading.Event()

    def hung():
        yield [1]
        never.wait(30)
        yield [2]

    alive = {"now": True}
    pump = ResponsePump(hung, lambda x: x, timeout_s=60, poll_s=0.02, alive=lambda: alive["now"], alive_every_s=0.05)
    assert next(pump) == [1]
    assert next(pump) == []
    alive["now"] = False
    started = time.monotonic()
    with pytest.raises(LLMGone, match="process stopped"):
        while True:
            next(pump)
    pump.close()  # does not wait for the reader stuck on a response that never comes
    assert time.monotonic() - started < 5
    never.set()


def test_pid_file_and_process_liveness(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "process.pid"
    assert read_pid(path) is None  # no file (TensorRT-LLM's model writes none): nothing to watch
    write_pid(path)
    assert read_pid(path) == os.getpid() and process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not process_alive(child.pid)
    path.write_text("garbage")
    assert read_pid(path) is None
    assert is_restarting("Stub process 'whisper_0_0' is not healthy.") and not is_restarting("bad audio")


def test_embedding_cache_is_bounded_least_recently_used_first(tiny_export):
    from mmgpt.serving.llm import content_key
    from mmgpt.serving.stages import EmbeddingCache

    rows = np.zeros((4, 8), np.float32)  # 128 bytes an entry
    cache = EmbeddingCache(max_bytes=3 * rows.nbytes)
    keys = [content_key(np.full((3, 2, 2), v, np.float32)) for v in range(4)]
    for k in keys[:3]:
        cache.put(k, rows)
    assert cache.get(keys[0]) is not None  # 0 is now the most recently used
    cache.put(keys[3], rows)  # over the bound: 1, the least recently used, goes
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and cache.bytes == 3 * rows.nbytes
    with pytest.raises(ValueError):
        cache.get(keys[0])[0, 0] = 1.0  # shared with every request that hits it: read-only
    assert content_key(np.zeros((3, 2, 2), np.float32)) != content_key(np.zeros((3, 4, 1), np.float32))


def test_vision_stage_without_a_cache_encodes_every_time(tiny_export):
    from mmgpt.serving.stages import VisionStage

    stage = VisionStage(tiny_export, threads=1, cache_bytes=0)
    pixels = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    first, second = stage.encode_batches([pixels]), stage.encode_batches([pixels])
    np.testing.assert_array_equal(first[0], second[0])
    assert stage.encoded == 2 and stage.cache.hits == 0


class _Rendezvous(LocalStages):
    """Stages whose Whisper waits until the vision encoder has started: only a pipeline that runs the two
    at the same time gets past it."""

    def __init__(self, export):
        super().__init__(export)
        self.vision_started = threading.Event()
        self.fail_audio = False

    def transcribe(self, audio):
        if not self.vision_started.wait(timeout=10):
            raise AssertionError("Whisper ran alone: the vision encoder had not started")
        if self.fail_audio:
            raise InputError("audio could not be decoded (test)")
        return super().transcribe(audio)

    def encode_image(self, pixels):
        self.vision_started.set()
        time.sleep(0.2)  # still encoding while Whisper runs
        return super().encode_image(pixels)


def test_whisper_and_the_vision_encoder_run_at_the_same_time(pipeline, tiny_export, exported):
    s = _Rendezvous(tiny_export)
    try:
        image, audio = png_bytes(64, 48, seed=4), wav_bytes(1.5, 16000)
        outcome, sent = run(pipeline, s, entry_inputs("What is this?", image_input=image, audio_input=audio))
        assert outcome == "done"
        assert "".join(t for t, _, _ in sent if t) == exported.ask("What is this?", image=image, audio=audio).text
        s.vision_started.clear()
        s.fail_audio = True  # the audio's error is the one reported, after the encoder has finished
        with pytest.raises(InputError, match="audio could not be decoded"):
            run(pipeline, s, entry_inputs("What is this?", image_input=image, audio_input=audio))
    finally:
        s.batcher.shutdown()


def test_past_the_request_deadline_the_llm_stops_and_the_client_is_told(tiny_export, stages):
    from dataclasses import replace as dc_replace

    assert _wait_idle(stages.batcher)
    hurried = Pipeline.load(tiny_export, dc_replace(SETTINGS, request_deadline_s=0.05))
    stages.stopped.clear()
    before = stages.batcher.stats.cancelled
    question = parse_question(entry_inputs("Tell me a long story", max_tokens=1000), SETTINGS)
    sent, send = _recorder()
    with pytest.raises(TimeoutError, match="request deadline of 0.05 s"):
        hurried.answer(question, stages, Replies(send, stream=True), request_id="late", is_cancelled=lambda: False)
    assert stages.stopped == ["late"]
    assert _wait_idle(stages.batcher) and stages.batcher.stats.cancelled == before + 1  # removed, not finished




def test_a_stage_that_fails_mid_answer_stops_the_llm(pipeline, stages):
    assert _wait_idle(stages.batcher)
    stages.stopped.clear()
    before = stages.batcher.stats.cancelled
    real = stages.generate

    def breaking(*args):
        def chunks():
            for i, chunk in enumerate(real(*args)):
                if i == 3:
                    raise ConnectionError("the LLM's stream broke")
                yield chunk

        gen = chunks()
        return gen

    stages.generate = breaking
    try:
        with pytest.raises(ConnectionError):
            run(pipeline, stages, entry_inputs("Tell me a long story", max_tokens=1000))
    finally:
        del stages.generate
    assert len(stages.stopped) == 1
    assert _wait_idle(stages.batcher) and stages.batcher.stats.cancelled == before + 1


def test_calls_wait_for_a_model_being_loaded_again_and_no_longer():
    answers = iter(["Stub process 'whisper_0_0' is not healthy."] * 3 + [None])
    calls = []

    def call():
        calls.append(1)
        return next(answers)

    assert through_restarts(call, lambda r: r, every_s=0.01) is None and len(calls) == 4  # the fourth answered
    assert through_restarts(lambda: "bad audio", lambda r: r, every_s=0.01) == "bad audio"  # other errors: at once
    stuck = through_restarts(lambda: "Stub process 'x' is not healthy.", lambda r: r, wait_s=0.1, every_s=0.01)
    assert stuck == "Stub process 'x' is not healthy."  # given up after wait_s, the error passed on


def test_a_draining_server_refuses_new_requests_and_each_answer_marks_its_instance_busy(tmp_path):
    from mmgpt.serving.multimodal import ShuttingDown, busy, failure, refuse_if_draining

    marker = tmp_path / ".draining"
    refuse_if_draining(marker)  # no marker: served
    marker.write_text("stopping")
    with pytest.raises(ShuttingDown, match="shutting down"):
        refuse_if_draining(marker)
    assert failure(ShuttingDown("x"))[0] == "unavailable"
    assert failure(InputError("bad")) == ("invalid", "invalid input: bad")  # the client's cue for a 400
    assert failure(ValueError("boom")) == ("internal", "internal error: ValueError: boom")
    flag = tmp_path / "multimodal" / "busy" / "multimodal_0_1"
    with pytest.raises(RuntimeError), busy(flag):
        assert int(flag.read_text()) == os.getpid()  # the launcher's drain waits while this file names a live pid
        raise RuntimeError("a failed answer still clears it")
    assert not flag.exists()


class _Stream:
    """Stands in for Triton's response iterator: what matters here is who holds the last reference."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


def test_pump_hands_the_ended_stream_over_instead_of_dropping_it():
    """Triton 2.51's stub frees a stream without the GIL if Python lets go of it first (FinishedStreams): the
    reader must keep it alive and hand it to `keep` before the consumer sees the end."""
    import weakref

    kept = []
    box = [_Stream([[1], [2]])]
    ref = weakref.ref(box[0])
    pump = ResponsePump(box.pop, lambda x: x, timeout_s=5, keep=kept.append)  # the reader's is the only reference
    assert [t for chunk in pump for t in chunk] == [1, 2]
    pump.close()
    assert kept == [ref()] and ref() is not None


def test_finished_streams_are_freed_only_after_a_round_trip_that_started_after_they_ended():
    import gc
    import weakref

    finished = FinishedStreams()
    streams = [_Stream([]), _Stream([])]
    refs = [weakref.ref(s) for s in streams]
    finished.hold(streams.pop(0))

    # A cached cancel (True) made no round trip: nothing may be freed.
    assert finished.barrier(lambda: True) is True
    gc.collect()
    assert refs[0]() is not None and len(finished) == 1

    def round_trip():  # a stream that ends while the round trip is under way is not covered by it
        finished.hold(streams.pop())
        return False

    assert finished.barrier(round_trip) is False
    gc.collect()
    assert refs[0]() is None  # freed, and by this thread: its last reference was ours
    assert refs[1]() is not None and len(finished) == 1
    assert finished.barrier(lambda: False) is False
    gc.collect()
    assert refs[1]() is None and len(finished) == 0
