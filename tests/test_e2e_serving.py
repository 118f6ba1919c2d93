"""End to end: the real tritonserver on the assembled repository of the tiny default, called with
tritonclient over gRPC streaming (and Triton's HTTP generate endpoints), compared with `mmgpt ask`'s
PyTorch pipeline. One server for the session (serving_fixtures), on free loopback ports."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import numpy as np
import pytest
from serving_fixtures import EntryStream, flat_png, png_bytes, wav_bytes

from mmgpt.generation import SamplingParams
from mmgpt.serving import contract as c
from mmgpt.template import Message

pytest_plugins = ("serving_fixtures",)

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy

IMAGE = png_bytes(64, 48, seed=11)
AUDIO = wav_bytes(1.5, 22050, channels=2)
HISTORY = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"}]


def reference_answer(reference, text="", *, image=None, audio=None, history=(), **params):
    return reference.ask(
        text, image=image, audio=audio, history=[Message(m["role"], m["content"]) for m in history],
        params=SamplingParams(**params),
    )


def metric(server, name: str) -> float:
    with _OPENER.open(server.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    found = re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found[0])


# ------------------------------------------------------------------------------------------------
# The server
# ------------------------------------------------------------------------------------------------


def test_all_models_ready_and_model_control_is_off(triton):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        assert client.is_server_ready()
        for name in c.MODELS:
            assert client.is_model_ready(name), name
        with pytest.raises(InferenceServerException):
            client.unload_model(c.MULTIMODAL)
        assert client.is_model_ready(c.MULTIMODAL)
    finally:
        client.close()


# ------------------------------------------------------------------------------------------------
# The contract, answer for answer against `mmgpt ask`
# ------------------------------------------------------------------------------------------------

CASES = {
    "text only": dict(text="What is the weather like?"),
    "image+text": dict(text="What is in the picture?", image=IMAGE),
    "audio+text": dict(text="Answer this:", audio=AUDIO),
    "empty text + audio": dict(text="", audio=wav_bytes(2.0, 16000, freq=300.0)),
    "multi-turn": dict(text="And what else?", history=HISTORY),
    "everything": dict(text="Compare them.", image=png_bytes(80, 60, seed=5, fmt="JPEG"), audio=AUDIO, history=HISTORY),
}


@pytest.mark.parametrize("case", list(CASES))
def test_served_greedy_equals_mmgpt_ask(entry, reference, case):
    kw = CASES[case]
    want = reference_answer(reference, kw["text"], image=kw.get("image"), audio=kw.get("audio"),
                            history=kw.get("history", ()))
    got = entry.ask(kw["text"], image_input=kw.get("image"), audio_input=kw.get("audio"),
                    history=json.dumps(kw["history"]) if "history" in kw else None)
    assert want.text  # something to compare
    assert got.text == want.text
    assert got.transcript == want.transcript
    assert bool(got.transcript) == ("audio" in kw)
    if got.transcript:
        assert got.texts[0] == "" and got.transcripts[0] == want.transcript  # the transcript arrives first


def test_streamed_pieces_join_to_the_single_non_streamed_response(entry):
    kw = dict(image_input=IMAGE, audio_input=AUDIO, max_tokens=60)
    streamed = entry.ask("Describe it", **kw)
    whole = entry.ask("Describe it", stream=False, **kw)
    assert whole.responses == 1 and len(whole.texts) == 1  # exactly one response, and it is the final one
    assert len([t for t in streamed.texts if t]) > 3  # really streamed
    assert streamed.text == whole.text and streamed.transcript == whole.transcript


def test_sampling_with_a_seed_is_reproducible_and_equals_mmgpt_ask(entry, reference):
    # Values exact in float32, so the server samples from the very same distribution as the reference.
    params = dict(max_tokens=40, temperature=0.5, top_p=0.75, top_k=20)
    first = entry.ask("Tell me a story", seed=1234, **params).text
    assert entry.ask("Tell me a story", seed=1234, **params).text == first
    assert first == reference_answer(reference, "Tell me a story", seed=1234, **params).text
    others = {entry.ask("Tell me a story", seed=s, **params).text for s in (1, 2, 3)}
    assert len(others | {first}) > 1  # the seed matters


def test_stop_words_end_the_answer_like_mmgpt_ask(entry, reference):
    full = reference_answer(reference, "Tell me about it").text
    word = full[len(full) // 2 : len(full) // 2 + 3]
    want = reference_answer(reference, "Tell me about it", stop_words=(word,)).text
    got = entry.ask("Tell me about it", stop_words=[word]).text
    assert got == want and word not in got and len(got) < len(full)


# ------------------------------------------------------------------------------------------------
# Concurrency: in-flight batching
# ------------------------------------------------------------------------------------------------


def test_eight_concurrent_streams_are_all_correct_and_share_decode_steps(triton, reference):
    questions = [
        dict(text=f"Question number {i}: what do you think?", image=png_bytes(40 + i, 30, seed=i) if i % 3 == 0 else None,
             audio=wav_bytes(1.0 + 0.1 * i, 16000, freq=200.0 + 40 * i) if i % 4 == 1 else None, max_tokens=100 + 10 * i)
        for i in range(8)
    ]
    wants = [reference_answer(reference, q["text"], image=q["image"], audio=q["audio"], max_tokens=q["max_tokens"])
             for q in questions]
    steps, rows = metric(triton, "mmgpt_llm_decode_steps_total"), metric(triton, "mmgpt_llm_decode_rows_total")
    streams = [EntryStream(triton.grpc_url) for _ in questions]
    results: list = [None] * len(questions)
    start = threading.Barrier(len(questions))

    def run(i):
        q = questions[i]
        start.wait()
        try:
            results[i] = streams[i].ask(q["text"], image_input=q["image"], audio_input=q["audio"], max_tokens=q["max_tokens"])
        except Exception as e:  # reported below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        for s in streams:
            s.close()
    for i, (got, want) in enumerate(zip(results, wants)):
        assert not isinstance(got, Exception), f"stream {i}: {got!r}"
        assert got.text == want.text, f"stream {i}"
        assert got.transcript == want.transcript, f"stream {i}"
    mean_batch = (metric(triton, "mmgpt_llm_decode_rows_total") - rows) / (metric(triton, "mmgpt_llm_decode_steps_total") - steps)
    assert mean_batch > 1.5, f"decode steps were not shared (mean batch {mean_batch:.2f})"


# ------------------------------------------------------------------------------------------------
# Bad input: a clear per-request error, then the next request succeeds
# ------------------------------------------------------------------------------------------------

def lying_wav(rate: int | None = None, channels: int | None = None) -> bytes:
    """A short WAV whose header declares another sample rate or channel count (a sender we must not trust)."""
    import struct

    data = bytearray(wav_bytes(0.1))
    if channels is not None:
        data[22:24] = struct.pack("<H", channels)
        data[32:34] = struct.pack("<H", 2 * channels)
    if rate is not None:
        data[24:28] = struct.pack("<I", rate)
    return bytes(data)


BAD_INPUTS = [
    (dict(text="What is it?", image_input=b"\x00\x01 definitely not an image"), "image could not be decoded"),
    (dict(text="What is it?", image_input=wav_bytes(0.5)), "image could not be decoded"),  # bytes, but not an image
    (dict(text="What is it?", image_input=b"/etc/passwd"), "image could not be decoded"),  # a path is not read
    (dict(text="What is it?", image_input=b"https://example.com/cat.jpg"), "image could not be decoded"),  # nor a URL fetched
    (dict(text="What is it?", image_input=flat_png(2000, 2000)), "4000000 pixels, over the limit of 250000"),
    (dict(text="What is it?", image_input=png_bytes(8, 8) + bytes(300_000)), "over the limit of 300000"),
    (dict(text="What did I say?", audio_input=b"RIFF\x00\x00 nonsense"), "audio could not be decoded"),
    (dict(text="What did I say?", audio_input=b""), "audio is empty"),
    (dict(text="What did I say?", audio_input=wav_bytes(6.0)), "6.0 s long, over the limit of 5 s"),
    (dict(text="What did I say?", audio_input=lying_wav(rate=2_147_483_647)), "sample rate of 2147483647 Hz"),
    (dict(text="What did I say?", audio_input=lying_wav(channels=1024)), "1024 channels"),
    (dict(text=""), "no question"),
    (dict(text="   "), "no question"),
    (dict(text=b"caf\xe9 \xff"), "text_input is not valid UTF-8"),
    (dict(text="word " * 400), "over the context"),
    (dict(text="q", max_tokens=0), "max_tokens must be between 1 and 1024"),
    (dict(text="q", max_tokens=100_000), "max_tokens must be between 1 and 1024"),
    (dict(text="q", temperature=-0.5), "temperature must be >= 0"),
    (dict(text="q", top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(text="q", top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(text="q", top_k=-3), "top_k must be >= 0"),
    (dict(text="q", history="[{'role': 'user'"), "history is not valid JSON"),
    (dict(text="q", history=json.dumps([{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}])),
     "role must be 'user' or 'assistant'"),
    (dict(text="q", history=json.dumps([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}])),
     "expected role 'user'"),
    (dict(text="q", history=json.dumps([{"role": "user", "content": "x"}])), "complete user/assistant pairs"),
    (dict(text=None), r"missing required input\(s\) \[.text_input.\]"),
]


@pytest.mark.parametrize("inputs, message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_named_and_the_next_request_succeeds(triton, entry, inputs, message):
    from tritonclient.utils import InferenceServerException

    kw = dict(inputs)
    with pytest.raises(InferenceServerException, match=message):
        entry.ask(kw.pop("text"), **kw)
    assert triton.is_ready()
    assert entry.ask("Still there?", max_tokens=8, stream=False).text  # same stream, next request


# ------------------------------------------------------------------------------------------------
# Cancellation
# ------------------------------------------------------------------------------------------------


def test_a_cancelled_stream_stops_the_llm(triton):
    question = {c.TEXT_INPUT: c.one_bytes("Tell me a very long story"), c.MAX_TOKENS: np.array([1024], np.int32)}
    tokens = metric(triton, "mmgpt_llm_tokens_total")
    stream = EntryStream(triton.grpc_url)
    stream.collect(stream.send(question))
    stream.close()
    full = metric(triton, "mmgpt_llm_tokens_total") - tokens
    assert full > 300  # uncancelled, it runs to the end of the context

    tokens, cancelled = metric(triton, "mmgpt_llm_tokens_total"), metric(triton, "mmgpt_llm_cancelled_total")
    stream = EntryStream(triton.grpc_url)
    request_id = stream.send(question)
    result, error = stream.events.get(timeout=30)  # the first piece
    assert error is None and result.get_response().id == request_id
    stream.close(cancel=True)  # what a client that gives up or disconnects does
    # Counted from the close: before it the server streams ahead as fast as it generates, however slowly
    # a busy machine lets this client read its first piece (seen: 147 of 446 tokens by then).
    at_close = metric(triton, "mmgpt_llm_tokens_total") - tokens
    deadline = time.monotonic() + 10
    while metric(triton, "mmgpt_llm_cancelled_total") == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(triton, "mmgpt_llm_cancelled_total") == cancelled + 1  # removed by the stop, not finished
    generated = metric(triton, "mmgpt_llm_tokens_total") - tokens
    time.sleep(0.5)
    assert metric(triton, "mmgpt_llm_tokens_total") - tokens == generated  # and nothing since
    assert generated < full and generated - at_close <= 32, f"{generated - at_close} tokens generated after the cancel"
    again = EntryStream(triton.grpc_url)
    try:
        assert again.ask("Hello?", max_tokens=4, stream=False).responses == 1  # the server carries on
    finally:
        again.close()


# ------------------------------------------------------------------------------------------------
# Triton's HTTP generate endpoints
# ------------------------------------------------------------------------------------------------


def _post(url: str, body: dict) -> bytes:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with _OPENER.open(request, timeout=60) as resp:
        assert resp.status == 200
        return resp.read()


def test_http_generate_and_generate_stream(triton, entry):
    base = f"http://{triton.http_url}/v2/models/{c.MULTIMODAL}"
    whole = json.loads(_post(f"{base}/generate", {"text_input": "Hello over HTTP", "max_tokens": 30, "stream": False}))
    assert whole["text_output"] == entry.ask("Hello over HTTP", max_tokens=30).text and whole["text_output"]
    assert whole["transcript"] == ""
    events = _post(f"{base}/generate_stream", {"text_input": "Hello over HTTP", "max_tokens": 30}).decode()
    pieces = [json.loads(line[len("data: "):]) for line in events.splitlines() if line.startswith("data: ")]
    assert len(pieces) > 1
    assert "".join(p.get("text_output", "") for p in pieces) == whole["text_output"]
