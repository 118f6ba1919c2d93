"""`mmgpt-client` and the library against the real served pipeline (the tiny default exported to ONNX,
the assembled Triton repository, tritonserver), compared with the in-process PyTorch reference."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import interruptible
from serving_fixtures import greedy

from mmgpt.client import MMGPTClient, RequestFailed
from mmgpt.serving.demo import asset
from mmgpt.serving.tritonserver import TritonServer
from mmgpt.template import Message

# One tritonserver for every end-to-end module of the session, and the PyTorch reference (`reference`).
pytest_plugins = ("serving_fixtures",)
pytestmark = pytest.mark.slow

QUESTION = "What is in this picture?"
FOLLOW_UP = "What colour is the circle?"
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def server(triton: TritonServer) -> TritonServer:
    """The session's tritonserver on the tiny default's export (serving_fixtures.triton)."""
    return triton


@pytest.fixture
def client(server: TritonServer) -> MMGPTClient:
    return MMGPTClient(server.grpc_url, timeout=120)


def run_cli(args: list[str], stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout, env=CLI_ENV)


CLI_ENV = {**os.environ, "PYTHONIOENCODING": "utf-8"}


def client_cmd(server: TritonServer, *args: str) -> list[str]:
    return [sys.executable, "-m", "mmgpt.client.cli", *args[:1], "--url", server.grpc_url, *args[1:]]


def test_client_ask_prints_what_mmgpt_ask_prints(server: TritonServer, tiny_checkpoint) -> None:
    """Same question through Triton (`mmgpt-client ask`) and in PyTorch (`mmgpt ask` on the checkpoint the
    served export came from), greedy: same output."""
    # The first leaves every sampling flag out: both sides then use the same defaults (greedy, 128 tokens).
    cases = [["--text", QUESTION, "--image", str(asset("demo.png"))],
             ["--audio", str(asset("demo.wav")), "--max-tokens", str(MAX_TOKENS)]]
    # The references load PyTorch for seconds each: run them side by side.
    local = [subprocess.Popen([sys.executable, "-m", "mmgpt.cli", "ask", "--checkpoint", str(tiny_checkpoint), *flags],
                              stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=CLI_ENV) for flags in cases]
    for flags, ref in zip(cases, local):
        served = run_cli(client_cmd(server, "ask", *flags))
        ref_out, ref_err = ref.communicate(timeout=120)
        assert served.returncode == 0 and ref.returncode == 0, served.stderr + ref_err
        assert served.stdout.strip(), "empty answer"
        assert served.stdout == ref_out, flags
        if "--audio" in flags:
            heard = [line for line in served.stderr.splitlines() if line.startswith("[heard] ")]
            assert len(heard) == 1 and heard == [line for line in ref_err.splitlines() if line.startswith("[heard] ")]


def test_no_stream_equals_stream(client: MMGPTClient, reference) -> None:
    image = asset("demo.png").read_bytes()
    streamed = list(client.stream(QUESTION, image=image, max_tokens=MAX_TOKENS))
    whole = list(client.stream(QUESTION, image=image, max_tokens=MAX_TOKENS, stream=False))
    assert len(streamed) > 1 and len(whole) == 1
    assert "".join(p.text for p in streamed) == whole[0].text
    assert whole[0].text == reference.ask(QUESTION, image=image, params=greedy()).text


def test_the_last_piece_carries_usage_and_why_the_answer_ended(client: MMGPTClient, tiny_export) -> None:
    from mmgpt.template import prompt_ids

    image = asset("demo.png").read_bytes()
    short = client.ask(QUESTION, image=image, max_tokens=3)  # random weights never end by themselves
    assert short.finish_reason == "length" and short.completion_tokens == 3
    pieces = list(client.stream(QUESTION, image=image, max_tokens=MAX_TOKENS, stop_words=[short.text[-2:]]))
    assert pieces[-1].finish_reason == "stop" and pieces[-1].completion_tokens < MAX_TOKENS
    assert not any(p.finish_reason for p in pieces[:-1])
    served = client.ask(QUESTION, image=image, max_tokens=3, stream=False)
    assert (served.finish_reason, served.completion_tokens, served.prompt_tokens) == ("length", 3, short.prompt_tokens)
    from transformers import AutoTokenizer

    from mmgpt.config import MMGPTConfig

    config, tokenizer = MMGPTConfig.load(tiny_export), AutoTokenizer.from_pretrained(tiny_export / "tokenizer")
    assert short.prompt_tokens == len(prompt_ids(config, tokenizer, [], QUESTION, has_image=True))


def test_chat_keeps_history_across_turns(server: TritonServer, reference) -> None:
    """Four piped turns (image, follow-up, typed + spoken, follow-up); each answer equals the reference given the
    history, whose user turns are the questions as the model saw them."""
    image, audio = asset("demo.png").read_bytes(), asset("demo.wav").read_bytes()
    stdin = f"{QUESTION}\n{FOLLOW_UP}\n/audio {asset('demo.wav')} And this?\nWhy?\n"
    proc = run_cli(client_cmd(server, "chat", "--image", str(asset("demo.png")), "--max-tokens", str(MAX_TOKENS)),
                   stdin=stdin)
    assert proc.returncode == 0, proc.stderr

    a1 = reference.ask(QUESTION, image=image, params=greedy())
    history = [Message("user", QUESTION), Message("assistant", a1.text)]
    a2 = reference.ask(FOLLOW_UP, image=image, history=history, params=greedy())
    history += [Message("user", FOLLOW_UP), Message("assistant", a2.text)]
    a3 = reference.ask("And this?", image=image, audio=audio, history=history, params=greedy())
    history += [Message("user", f"And this?\n{a3.transcript}"), Message("assistant", a3.text)]
    a4 = reference.ask("Why?", image=image, history=history, params=greedy())
    assert proc.stdout == f"{a1.text}\n{a2.text}\n{a3.text}\n{a4.text}\n"
    # The history changed the second answer: without it the model says something else.
    assert reference.ask(FOLLOW_UP, image=image, params=greedy()).text != a2.text
    assert f"[heard] {a3.transcript}" in proc.stderr


def test_server_error_message_reaches_the_user(server: TritonServer, client: MMGPTClient) -> None:
    with pytest.raises(RequestFailed, match="temperature must be >= 0"):
        client.ask("hi", temperature=-1.0)
    proc = run_cli(client_cmd(server, "ask", "--text", "hi", "--top-p", "1.5"))
    assert proc.returncode == 1 and "top_p must be in (0, 1]" in proc.stderr
    assert client.health().ok


def llm_counters(server: TritonServer) -> dict[str, float]:
    """The served LLM's custom counters (mmgpt_llm_*_total) from the server's /metrics."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(server.metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    counters = {}
    for line in text.splitlines():
        if line.startswith("mmgpt_llm_") and "_total" in line:
            name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
            counters[name] = value
    assert "mmgpt_llm_cancelled_total" in counters and "mmgpt_llm_tokens_total" in counters, text[-2000:]
    return counters


def wait_for_cancel(server: TritonServer, before: dict[str, float], timeout: float = 5.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        after = llm_counters(server)
        if after["mmgpt_llm_cancelled_total"] > before["mmgpt_llm_cancelled_total"] or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


LONG = 480  # tokens the cancelled requests ask for; the model's random weights never stop early
# Tokens the server may still generate after the client has closed its stream: the entry point looks for
# the cancellation before it forwards each token, and the LLM drops a stopped row at its next iteration,
# so it is a step or two; the rest is room for a machine that is busy with something else.
CANCEL_BOUND = 32


def test_closing_the_stream_stops_generation_on_the_server(server: TritonServer, client: MMGPTClient,
                                                           reference) -> None:
    """Generation stops within CANCEL_BOUND tokens of the client closing its stream, whatever the load.

    What is bounded is generation *after* the close. A server streams as fast as it generates, so on a busy
    machine it is already far ahead when a slow client reads its first piece (seen: 201 of 480 tokens
    generated before the client's first read, then 5 more after its close): counting from the request's
    start measured the client's delay, not the cancellation."""
    image = asset("demo.png").read_bytes()
    for _ in range(3):
        before = llm_counters(server)
        with client.stream(QUESTION, image=image, max_tokens=LONG) as answer:
            next(answer)
            start = time.monotonic()
        assert time.monotonic() - start < 1.0
        at_close = llm_counters(server)
        ahead = at_close["mmgpt_llm_tokens_total"] - before["mmgpt_llm_tokens_total"]
        if ahead + CANCEL_BOUND >= LONG:  # it had (nearly) finished before the close: nothing to judge by
            wait_for_cancel(server, before, timeout=2.0)
            continue
        after = wait_for_cancel(server, before)
        assert after["mmgpt_llm_cancelled_total"] == before["mmgpt_llm_cancelled_total"] + 1
        later = after["mmgpt_llm_tokens_total"] - at_close["mmgpt_llm_tokens_total"]
        print(f"tokens generated for the cancelled stream: {ahead:.0f} before the close, {later:.0f} after")
        assert later <= CANCEL_BOUND
        break
    else:
        pytest.fail(f"the server finished all {LONG} tokens before the client could close its stream, 3 times")
    assert server.is_ready()
    assert client.ask(QUESTION, image=image, max_tokens=MAX_TOKENS).text == \
        reference.ask(QUESTION, image=image, params=greedy()).text


def test_ctrl_c_on_the_command_line_returns_promptly_and_the_server_keeps_serving(
    server: TritonServer, client: MMGPTClient, reference
) -> None:
    """SIGINT mid-answer: exit 130 at once. (That the cancel reaches the model is shown with a slow stand-in
    model in test_client_triton.py: here the tiny model may finish its answer before the signal lands.)"""
    for _ in range(3):
        proc = subprocess.Popen(client_cmd(server, "ask", "--text", QUESTION, "--max-tokens", str(LONG)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
        try:
            assert proc.stdout is not None
            proc.stdout.read(1)  # an answer is streaming
            proc.send_signal(signal.SIGINT)
            start = time.monotonic()
            proc.wait(timeout=10)
            if proc.returncode == 0:  # the whole answer had arrived before the signal: nothing to judge by
                continue
            assert time.monotonic() - start < 2 and proc.returncode == 130
            break
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    else:
        pytest.fail("the answer finished before SIGINT could land, 3 times")
    assert server.is_ready() and client.health().ok
    assert client.ask(QUESTION, max_tokens=MAX_TOKENS).text == reference.ask(QUESTION, params=greedy()).text
