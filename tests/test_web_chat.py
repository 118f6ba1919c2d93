"""The web chat (`make chat`) in a real headless browser: Debian's chromium driven by Playwright, the page served by
the OpenAI-compatible API in its own process, in front of the session's real tritonserver. Answers are compared
with `mmgpt ask`'s PyTorch pipeline (greedy). Screenshots go to artifacts/test-artifacts/web_chat/."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_fixtures import API, greedy, start_api, stop_api

from mmgpt.serving.demo import asset
from mmgpt.serving.tritonserver import TritonServer, metric_total
from mmgpt.template import Message

pytest_plugins = ("serving_fixtures",)
pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (`make install` installs it where apt-get can)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

SHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "test-artifacts" / "web_chat"
QUESTION = "What is in this picture?"
FOLLOW_UP = "What colour is the circle?"
MAX_TOKENS = 16
# No network, no GPU, no first-run work; a fake microphone that plays a tone, allowed without asking.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream"]


@pytest.fixture(scope="module")
def api(triton: TritonServer, tmp_path_factory) -> Iterator[API]:
    api = start_api(tmp_path_factory.mktemp("chat-api"), "--triton", triton.grpc_url)
    try:
        yield api
    finally:
        stop_api(api)


@pytest.fixture
def page(api: API):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(api.url + "/")
            yield page
            assert not errors, errors  # no script error on the page
        finally:
            browser.close()


def setting(page, name: str, value: str) -> None:
    page.fill(f"#{name}", value)
    page.dispatch_event(f"#{name}", "change")


def send_and_wait(page, n: int, timeout_s: float = 60) -> tuple[str, str]:
    """Click Send; wait for the n-th answer (1-based) to finish; (its text, how it ended)."""
    page.click("#send")
    answer = page.locator(".msg.assistant").nth(n - 1)
    answer.and_(page.locator("[data-done]")).wait_for(timeout=timeout_s * 1000)
    return answer.locator(".text").inner_text(), answer.get_attribute("data-done")


def test_image_follow_up_and_a_wav_stream_the_reference_answers(page, reference) -> None:
    image, audio = asset("demo.png").read_bytes(), asset("demo.wav").read_bytes()
    setting(page, "max-tokens", str(MAX_TOKENS))
    page.set_input_files("#image", str(asset("demo.png")))
    page.wait_for_function("document.getElementById('attached').textContent.includes('image')")
    page.fill("#text", QUESTION)
    text, done = send_and_wait(page, 1)
    a1 = reference.ask(QUESTION, image=image, params=greedy())
    assert text == a1.text and done == "length"
    assert page.locator(".msg.user img").count() == 1  # the picture is shown with the question
    page.screenshot(path=SHOTS / "1-image.png")

    page.fill("#text", FOLLOW_UP)
    text, _ = send_and_wait(page, 2)
    history = [Message("user", QUESTION), Message("assistant", a1.text)]
    a2 = reference.ask(FOLLOW_UP, image=image, history=history, params=greedy())
    assert text == a2.text  # the image and the first turn were kept for the conversation
    page.screenshot(path=SHOTS / "2-follow-up.png")

    page.set_input_files("#audio", str(asset("demo.wav")))
    page.wait_for_function("document.getElementById('attached').textContent.includes('demo.wav')")
    text, _ = send_and_wait(page, 3)
    history += [Message("user", FOLLOW_UP), Message("assistant", a2.text)]
    a3 = reference.ask("", image=image, audio=audio, history=history, params=greedy())
    assert a3.transcript and text == a3.text
    assert page.locator(".msg.user .transcript").last.inner_text() == f"heard: {a3.transcript}"
    page.screenshot(path=SHOTS / "3-spoken.png", full_page=True)

    page.click("#new")
    assert page.locator(".msg").count() == 0


STOP_AT_FIRST_WORDS = """() => {
    const watch = new MutationObserver(() => {
        const text = document.querySelector('.msg.assistant:last-of-type .text');
        if (text && text.textContent.length) { watch.disconnect(); document.getElementById('stop').click(); }
    });
    watch.observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
}"""


def test_the_stop_button_stops_generation_on_the_server(page, api: API, triton: TritonServer) -> None:
    """Stop is clicked as soon as the first words show (by the page's own click: people are slower), and the
    server counts the cancellation. The whole answer takes well under a second here, so an attempt where it
    was all generated before the click proves nothing and is made again (at most 3 times)."""
    story = [{"role": "user", "content": "Tell me a long story"}]
    full = api.client().chat.completions.create(model="mmgpt", messages=story, max_tokens=480).usage.completion_tokens
    setting(page, "max-tokens", "480")  # random weights never stop early
    for attempt in range(1, 4):
        before = metric_total(triton.metrics_url, "mmgpt_llm_cancelled_total")
        tokens = metric_total(triton.metrics_url, "mmgpt_llm_tokens_total")
        page.evaluate(STOP_AT_FIRST_WORDS)
        page.fill("#text", "Tell me a long story")
        _, done = send_and_wait(page, attempt)
        answer = page.locator(".msg.assistant").nth(attempt - 1)
        assert done == "stopped" and "stopped" in answer.inner_text()
        deadline = time.monotonic() + 15
        while metric_total(triton.metrics_url, "mmgpt_llm_cancelled_total") == before and time.monotonic() < deadline:
            if metric_total(triton.metrics_url, "mmgpt_llm_tokens_total") - tokens >= full:
                break  # all generated before the click: nothing to judge by
            time.sleep(0.05)
        if metric_total(triton.metrics_url, "mmgpt_llm_cancelled_total") == before + 1:
            break
        generated = metric_total(triton.metrics_url, "mmgpt_llm_tokens_total") - tokens
        assert generated >= full, f"stopped in the page, not on the server ({generated} of {full} tokens made)"
    else:
        pytest.fail("the answer was all generated before Stop was clicked, 3 times")
    page.screenshot(path=SHOTS / "4-stopped.png")


def test_a_recording_from_the_microphone_is_heard(page) -> None:
    """Chromium's fake microphone (a tone): the page records it, makes a WAV, and the server takes it."""
    setting(page, "max-tokens", "4")
    page.click("#record")
    time.sleep(1.2)
    page.click("#record")
    page.wait_for_function("document.getElementById('attached').textContent.includes('recording')")
    _, done = send_and_wait(page, 1)
    assert done in ("stop", "length"), page.inner_text("#log")  # not "error": the WAV was read
    page.screenshot(path=SHOTS / "5-recorded.png")


def test_errors_are_shown_not_swallowed(page) -> None:
    page.set_input_files("#image", files=[{"name": "bad.png", "mimeType": "image/png", "buffer": b"\x89PNG broken"}])
    page.fill("#text", QUESTION)
    _, done = send_and_wait(page, 1)
    assert done == "error"
    assert "image could not be decoded" in page.locator(".msg.assistant.error").inner_text()
