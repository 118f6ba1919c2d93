"""The OpenAI-compatible API (`make api`) as users reach it: `python -m mmgpt.client.openai_server` in its own
process on a free loopback port, in front of the session's real tritonserver, driven by the official `openai`
Python client (and raw HTTP where the client would hide what is checked). Greedy answers equal `mmgpt ask`'s
PyTorch pipeline on the checkpoint the served export came from."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import httpx2 as httpx
import pytest
from serving_fixtures import API, KEY, greedy, start_api, stop_api

from mmgpt.serving.demo import asset
from mmgpt.serving.tritonserver import TritonServer, free_port, metric_total
from mmgpt.template import Message

pytest_plugins = ("serving_fixtures",)
pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")

QUESTION = "What is in this picture?"
FOLLOW_UP = "What colour is the circle?"
MAX_TOKENS = 16
LONG = 480  # tokens a cancelled answer asks for; random weights never stop early


@pytest.fixture(scope="module")
def api(triton: TritonServer, tmp_path_factory) -> Iterator[API]:
    """The API with a key, fronting a dead address and the live server: round-robin must skip the dead one."""
    dead = f"127.0.0.1:{free_port()}"
    api = start_api(tmp_path_factory.mktemp("api"), "--api-key", KEY, "--triton", dead, "--triton", triton.grpc_url)
    try:
        yield api
    finally:
        stop_api(api)


@pytest.fixture(scope="module")
def client(api: API) -> openai.OpenAI:
    return api.client()


def data_uri(name: str = "demo.png") -> str:
    return "data:image/png;base64," + base64.b64encode(asset(name).read_bytes()).decode()


def audio_part(data: bytes | None = None) -> dict:
    data = asset("demo.wav").read_bytes() if data is None else data
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}}


def user(text: str = "", image: bool = False, audio: bool = False) -> dict:
    parts: list[dict] = [{"type": "text", "text": text}] if text else []
    if image:
        parts.append({"type": "image_url", "image_url": {"url": data_uri()}})
    if audio:
        parts.append(audio_part())
    return {"role": "user", "content": parts}


def joined(stream) -> tuple[str, list]:
    chunks = list(stream)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


# ------------------------------------------------------------------------------------------------
# Answers
# ------------------------------------------------------------------------------------------------


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["mmgpt"]


def test_image_question_equals_mmgpt_ask_streamed_and_not(client: openai.OpenAI, reference) -> None:
    image = asset("demo.png").read_bytes()
    expected = reference.ask(QUESTION, image=image, params=greedy()).text
    assert expected
    whole = client.chat.completions.create(model="mmgpt", messages=[user(QUESTION, image=True)], max_tokens=MAX_TOKENS)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected
    # Random weights never end by themselves: max_tokens ends the answer, and usage counts it.
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == MAX_TOKENS and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + MAX_TOKENS

    text, chunks = joined(client.chat.completions.create(
        model="mmgpt", messages=[user(QUESTION, image=True)], max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True}))
    assert text == expected and len(chunks) > 3
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_the_stream_ends_with_done_and_text_only_works(api: API, reference) -> None:
    body = {"model": "mmgpt", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8,
            "stream": True}
    with httpx.stream("POST", f"{api.url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert "usage" not in chunks[-1]  # not asked for
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == reference.ask("Hello there", params=greedy(8)).text


def test_audio_and_image_plus_audio_carry_the_transcript(client: openai.OpenAI, reference) -> None:
    image, audio = asset("demo.png").read_bytes(), asset("demo.wav").read_bytes()
    spoken = reference.ask("", audio=audio, params=greedy())
    assert spoken.transcript
    alone = client.chat.completions.create(model="mmgpt", messages=[user(audio=True)], max_tokens=MAX_TOKENS)
    assert alone.choices[0].message.content == spoken.text
    assert alone.transcript == spoken.transcript  # the extra field, as the openai client exposes it

    both = reference.ask("", image=image, audio=audio, params=greedy())
    text, chunks = joined(client.chat.completions.create(
        model="mmgpt", messages=[user(image=True, audio=True)], max_tokens=MAX_TOKENS, stream=True))
    assert text == both.text
    told = [c.transcript for c in chunks if getattr(c, "transcript", None)]
    assert told == [both.transcript]  # once, in the first chunk that knows it


def test_multi_turn_messages_become_the_history(client: openai.OpenAI, reference) -> None:
    """The image sent in the first user message stays the conversation's image in later turns."""
    image = asset("demo.png").read_bytes()
    a1 = client.chat.completions.create(model="mmgpt", messages=[user(QUESTION, image=True)], max_tokens=MAX_TOKENS)
    first = a1.choices[0].message.content
    messages = [{"role": "system", "content": "You are terse."}, user(QUESTION, image=True),
                {"role": "assistant", "content": first}, {"role": "user", "content": FOLLOW_UP}]
    a2 = client.chat.completions.create(model="mmgpt", messages=messages, max_tokens=MAX_TOKENS)
    history = [Message("user", QUESTION), Message("assistant", first)]
    expected = reference.ask(FOLLOW_UP, image=image, history=history, params=greedy()).text
    assert a2.choices[0].message.content == expected
    assert expected != reference.ask(FOLLOW_UP, image=image, params=greedy()).text  # the history mattered
    assert a2.history_dropped == 0


def test_stop_and_seed(client: openai.OpenAI) -> None:
    def ask(**kw):
        return client.chat.completions.create(model="mmgpt", messages=[user(QUESTION, image=True)],
                                              max_tokens=MAX_TOKENS, **kw)

    full = ask().choices[0].message.content
    word = full[len(full) // 2:][:3]  # random weights: any piece of the answer will do
    assert len(word) == 3
    cut = ask(stop=[word, "zzzz"]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[: full.index(word)]
    one = [ask(temperature=1.0, seed=s).choices[0].message.content for s in (7, 7, 8)]
    assert one[0] == one[1] and one[0] != full


# ------------------------------------------------------------------------------------------------
# Bad input, errors, auth
# ------------------------------------------------------------------------------------------------

BAD_BODIES = [
    ({"model": "mmgpt"}, "messages"),
    ({"model": "mmgpt", "messages": []}, "messages"),
    ({"model": "mmgpt", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"model": "mmgpt", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, {"type": "text", "text": "hi"}]}]},
     "messages[0].content[0]"),
    ({"model": "mmgpt", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, {"type": "text", "text": "hi"}]}]},
     "messages[0].content[0]"),
    ({"model": "mmgpt", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}]}]},
     "messages[0].content[0].input_audio.data"),
    ({"model": "mmgpt", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"model": "mmgpt", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
    ({"model": "mmgpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "mmgpt", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "mmgpt", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ({"model": "mmgpt", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "messages"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES, ids=[p for _, p in BAD_BODIES])
def test_bad_requests_get_400_naming_the_parameter(api: API, body: dict, param: str) -> None:
    r = api.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_inputs_only_the_server_can_judge_get_400_too(client: openai.OpenAI, api: API, triton) -> None:
    """A corrupt image, undecodable audio, a negative max: Triton refuses them, the API says 400 with its message,
    in both modes (the first piece is awaited before the stream's 200), and the server stays ready."""
    corrupt = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"\x89PNG no").decode()}}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="image could not be decoded"):
            client.chat.completions.create(model="mmgpt", stream=stream, max_tokens=4, messages=[
                {"role": "user", "content": [corrupt, {"type": "text", "text": "hi"}]}])
        with pytest.raises(openai.BadRequestError, match="audio"):
            client.chat.completions.create(model="mmgpt", stream=stream, max_tokens=4, messages=[
                {"role": "user", "content": [audio_part(b"RIFF....WAVEnot really")]}])
    assert triton.is_ready()
    assert client.chat.completions.create(model="mmgpt", messages=[user("hi")], max_tokens=2).choices[0].message.content


def test_malformed_json_unknown_model_and_paths(api: API, client: openai.OpenAI) -> None:
    r = api.post("/v1/chat/completions", content=b'{"model": "mmgpt", "messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[user("hi")])
    r = api.post("/v1/nothing-here", json={})
    assert r.status_code == 404 and "error" in r.json()


def test_bodies_over_the_limit_are_refused_before_they_are_read(api: API) -> None:
    import socket

    huge = 49 << 20  # over the default 48 MiB body limit; only the header is sent
    with socket.create_connection(("127.0.0.1", int(api.url.rsplit(":", 1)[1])), timeout=30) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {huge}\r\n\r\n{{".encode())
        reply = b""
        while b"over the limit" not in reply and b"}}" not in reply:
            more = sock.recv(65536)
            if not more:
                break
            reply += more
    assert reply.startswith(b"HTTP/1.1 413") and b"over the limit" in reply, reply

    def chunks():  # no length header: counted as it arrives
        for _ in range(50):
            yield b"x" * (1 << 20)

    r = api.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_the_api_key_is_required_when_set(api: API) -> None:
    for key in ("wrong-key", "test-key-012", KEY + "x"):
        with pytest.raises(openai.AuthenticationError):
            api.client(key).models.list()
    r = httpx.get(f"{api.url}/v1/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["message"]
    assert httpx.get(f"{api.url}/health", timeout=10).status_code == 200  # the probe needs no key


def test_round_robin_skips_the_dead_server_and_health_says_so(api: API, client: openai.OpenAI) -> None:
    for _ in range(4):  # every other request starts at the dead address
        assert client.chat.completions.create(model="mmgpt", messages=[user("hi")], max_tokens=2).choices
    servers = httpx.get(f"{api.url}/health", timeout=10).json()["triton"]
    assert [s["ready"] for s in servers] == [False, True] and servers[0]["detail"]


def test_no_triton_is_503_not_a_traceback(tmp_path) -> None:
    api = start_api(tmp_path, "--triton", f"127.0.0.1:{free_port()}")
    try:
        with pytest.raises(openai.InternalServerError) as info:
            api.client().chat.completions.create(model="mmgpt", messages=[user("hi")])
        assert info.value.status_code == 503 and "no Triton server could be reached" in str(info.value)
        assert "Traceback" not in info.value.response.text
        assert httpx.get(f"{api.url}/health", timeout=10).status_code == 503
    finally:
        stop_api(api)


# ------------------------------------------------------------------------------------------------
# Transcriptions, disconnects
# ------------------------------------------------------------------------------------------------


def test_transcriptions_json_and_text(client: openai.OpenAI, reference) -> None:
    heard = reference.ask("", audio=asset("demo.wav").read_bytes(), params=greedy(2)).transcript
    with open(asset("demo.wav"), "rb") as f:
        assert client.audio.transcriptions.create(model="whisper-1", file=f).text == heard
    with open(asset("demo.wav"), "rb") as f:
        assert client.audio.transcriptions.create(model="mmgpt", file=f, response_format="text").strip() == heard
    with pytest.raises(openai.BadRequestError, match="audio"):
        client.audio.transcriptions.create(model="whisper-1", file=("x.wav", b"RIFF garbage"))
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.audio.transcriptions.create(model="whisper-1", file=("x.wav", b"RIFF"), response_format="srt")


def test_a_client_that_disconnects_stops_the_llm(client: openai.OpenAI, triton: TritonServer) -> None:
    """Streamed: the connection is dropped after the first chunk; not streamed: the client gives up after 0.1 s.
    Either way the LLM's cancellation counter rises. The whole answer takes well under a second here, so an
    attempt where it was all generated before the drop proves nothing and is made again (at most 3 times)."""
    story = [user("Tell me a long story")]
    full = client.chat.completions.create(model="mmgpt", messages=story, max_tokens=LONG).usage.completion_tokens
    assert full > 300  # uncancelled, it runs to max_tokens or the end of the context
    for stream in (True, False):
        for _ in range(3):
            before = metric_total(triton.metrics_url, "mmgpt_llm_cancelled_total")
            tokens = metric_total(triton.metrics_url, "mmgpt_llm_tokens_total")
            if stream:
                answer = client.chat.completions.create(model="mmgpt", messages=story, max_tokens=LONG, stream=True)
                next(iter(answer))
                answer.close()  # drops the connection
            else:
                with pytest.raises(openai.APITimeoutError):
                    client.with_options(timeout=0.1).chat.completions.create(model="mmgpt", messages=story,
                                                                             max_tokens=LONG)
            deadline = time.monotonic() + 15
            while metric_total(triton.metrics_url, "mmgpt_llm_cancelled_total") == before and time.monotonic() < deadline:
                if metric_total(triton.metrics_url, "mmgpt_llm_tokens_total") - tokens >= full:
                    break  # all generated before the drop: nothing to judge by
                time.sleep(0.05)
            generated = metric_total(triton.metrics_url, "mmgpt_llm_tokens_total") - tokens
            if metric_total(triton.metrics_url, "mmgpt_llm_cancelled_total") == before + 1:
                assert generated < full
                break
            assert generated >= full, f"not cancelled, and only {generated} of {full} tokens made (stream={stream})"
        else:
            pytest.fail(f"the answer was all generated before the client went away, 3 times (stream={stream})")
