"""`mmgpt-client` without a server: argument parsing, output streams, exit codes and chat bookkeeping
with a fake client that records what each turn sent."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mmgpt.client import Health, Piece, RequestFailed, ServerUnavailable
from mmgpt.client.cli import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    ChatSession,
    build_parser,
    main,
)
from mmgpt.template import Message


class FakeClient:
    """Answers "answer N to <question>" in two pieces; records every call's arguments.

    `transcript` is reported for requests with audio; `fail_on` raises for a question containing it;
    `interrupt_on` raises KeyboardInterrupt after the first piece (Ctrl-C mid-answer).
    """

    def __init__(self, transcript: str = "spoken words", fail_on: str | None = None, interrupt_on: str | None = None,
                 error: Exception | None = None):
        self.calls: list[dict[str, Any]] = []
        self.transcript = transcript
        self.fail_on = fail_on
        self.interrupt_on = interrupt_on
        self.error = error or RequestFailed("the server said no")
        self.closed: list[bool] = []  # one entry per stream closed before its end
        self.ready = True

    def stream(self, text: str = "", **kwargs: Any) -> Iterator[Piece]:
        self.calls.append({"text": text, **kwargs})
        n = len(self.calls)
        transcript = self.transcript if kwargs.get("audio") is not None else ""
        question = "\n".join(p for p in (text, transcript) if p)

        def gen() -> Iterator[Piece]:
            finished = False
            try:
                if self.fail_on and self.fail_on in question:
                    raise self.error
                yield Piece(f"answer {n} ", transcript)
                if self.interrupt_on and self.interrupt_on in question:
                    raise KeyboardInterrupt
                yield Piece(f"to {question}", transcript)
                finished = True
            finally:
                if not finished:
                    self.closed.append(True)

        return gen()

    def health(self, timeout: float = 5.0) -> Health:
        return Health("fake:1", True, self.ready, self.ready, "" if self.ready else "model 'multimodal' is not ready")


def run(argv: list[str], client: FakeClient, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, client_factory=lambda args: client, inp=io.StringIO(stdin), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    image, audio = tmp_path / "cat.png", tmp_path / "q.wav"
    image.write_bytes(b"PNG")
    audio.write_bytes(b"WAV")
    return {"image": image, "audio": audio}


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


def test_ask_flags_mirror_mmgpt_ask() -> None:
    args = build_parser().parse_args([
        "ask", "--text", "q", "--image", "i.png", "--audio", "a.wav", "--max-tokens", "9", "--temperature", "0.7",
        "--top-p", "0.8", "--top-k", "5", "--seed", "3", "--stop", "User:", "--stop", "\n", "--no-stream",
        "--url", "host:9", "--timeout", "4",
    ])
    assert (args.text, args.image, args.audio, args.url, args.timeout) == ("q", "i.png", "a.wav", "host:9", 4.0)
    assert (args.max_tokens, args.temperature, args.top_p, args.top_k, args.seed) == (9, 0.7, 0.8, 5, 3)
    assert args.stop == ["User:", "\n"] and args.no_stream


def test_defaults_leave_sampling_to_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMGPT_URL", raising=False)
    args = build_parser().parse_args(["ask", "--text", "q"])
    assert args.url == "localhost:8001"
    assert (args.max_tokens, args.temperature, args.top_p, args.top_k, args.seed) == (None,) * 5
    assert args.stop == [] and not args.no_stream


def test_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMGPT_URL", "10.0.0.2:18001")
    assert build_parser().parse_args(["chat"]).url == "10.0.0.2:18001"


def test_help_lists_commands_and_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "ask" in text and "chat" in text and "health" in text and "make serve" in text
    with pytest.raises(SystemExit):
        main(["ask", "--help"])
    text = capsys.readouterr().out
    for flag in ("--url", "--image", "--audio", "--text", "--max-tokens", "--temperature", "--top-p", "--top-k",
                 "--seed", "--no-stream", "--timeout"):
        assert flag in text
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    assert "/image PATH" in capsys.readouterr().out


def test_bad_flag_value_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["ask", "--max-tokens", "many"])
    assert info.value.code == EXIT_USAGE


# --------------------------------------------------------------------------------------------------
# ask
# --------------------------------------------------------------------------------------------------


def test_ask_streams_the_answer_and_sends_every_flag(files: dict[str, Path]) -> None:
    client = FakeClient()
    code, out, err = run([
        "ask", "--text", "What is it?", "--image", str(files["image"]), "--max-tokens", "9", "--temperature", "0.5",
        "--top-p", "0.9", "--top-k", "4", "--seed", "11", "--stop", "User:", "--no-stream",
    ], client)
    assert code == EXIT_OK
    assert out == "answer 1 to What is it?\n"
    assert err == ""  # no audio: no transcript line
    [call] = client.calls
    assert call == {
        "text": "What is it?", "image": str(files["image"]), "audio": None, "max_tokens": 9, "temperature": 0.5,
        "top_p": 0.9, "top_k": 4, "seed": 11, "stop_words": ("User:",), "stream": False,
    }


def test_ask_prints_the_transcript_to_stderr(files: dict[str, Path]) -> None:
    code, out, err = run(["ask", "--audio", str(files["audio"])], FakeClient(transcript="what colour"))
    assert code == EXIT_OK
    assert out == "answer 1 to what colour\n"
    assert err == "[heard] what colour\n"


def test_ask_without_a_question_is_a_usage_error() -> None:
    client = FakeClient()
    code, out, err = run(["ask"], client)
    assert code == EXIT_USAGE and "give --text, --audio, or both" in err and client.calls == []


def test_ask_with_a_missing_file_is_a_usage_error() -> None:
    client = FakeClient()
    code, _, err = run(["ask", "--text", "q", "--image", "/nonexistent.png"], client)
    assert code == EXIT_USAGE and "image file not found: /nonexistent.png" in err and client.calls == []


def test_ask_server_error_is_shown_and_exits_non_zero() -> None:
    code, out, err = run(["ask", "--text", "bad q"], FakeClient(fail_on="bad"))
    assert code == EXIT_FAILED
    assert err.strip() == "error: the server said no"


def test_ask_without_server_exits_with_its_own_code() -> None:
    client = FakeClient(fail_on="q", error=ServerUnavailable("cannot reach ...: is the server running? `make serve`"))
    code, _, err = run(["ask", "--text", "q"], client)
    assert code == EXIT_UNAVAILABLE and "make serve" in err


def test_ask_ctrl_c_cancels_the_stream_and_exits_130() -> None:
    client = FakeClient(interrupt_on="long")
    code, out, err = run(["ask", "--text", "long story"], client)
    assert code == EXIT_INTERRUPTED
    assert out.startswith("answer 1 ") and "interrupted" in err
    assert client.closed == [True]  # the stream was closed (-> cancelled) on the way out


def test_health_command() -> None:
    client = FakeClient()
    assert run(["health"], client)[:2] == (EXIT_OK, "ready: fake:1\n")
    client.ready = False
    code, _, err = run(["health"], client)
    assert code == EXIT_FAILED and "not ready" in err


# --------------------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------------------


def test_chat_session_records_finished_turns_in_order() -> None:
    client = FakeClient()
    session = ChatSession(client, {"max_tokens": 5})
    assert "".join(p.text for p in session.turn("first")) == "answer 1 to first"
    assert "".join(p.text for p in session.turn("second")) == "answer 2 to second"
    assert client.calls[0]["history"] == ()
    assert client.calls[1]["history"] == (Message("user", "first"), Message("assistant", "answer 1 to first"))
    assert client.calls[1]["max_tokens"] == 5
    assert session.history[-2:] == [Message("user", "second"), Message("assistant", "answer 2 to second")]


def test_chat_session_keeps_the_question_as_the_model_saw_it() -> None:
    session = ChatSession(FakeClient(transcript="spoken part"))
    list(session.turn("typed part", audio=b"wav"))
    assert session.history[0] == Message("user", "typed part\nspoken part")
    list(session.turn("", audio=b"wav"))
    assert session.history[2] == Message("user", "spoken part")


def test_chat_session_drops_interrupted_and_failed_turns() -> None:
    client = FakeClient(fail_on="bad", interrupt_on="long")
    session = ChatSession(client)
    list(session.turn("ok"))
    turn = session.turn("long one")
    assert next(turn).text == "answer 2 "
    turn.close()  # the user stopped it
    with pytest.raises(RequestFailed):
        list(session.turn("bad one"))
    assert session.history == [Message("user", "ok"), Message("assistant", "answer 1 to ok")]
    assert client.closed == [True, True]  # the stopped and the failed stream were closed (cancelled)


def test_chat_session_image_is_sent_with_every_question_until_cleared(files: dict[str, Path]) -> None:
    client = FakeClient()
    session = ChatSession(client)
    session.set_image(str(files["image"]))
    list(session.turn("a"))
    list(session.turn("b"))
    session.clear_image()
    list(session.turn("c"))
    assert [c["image"] for c in client.calls] == [b"PNG", b"PNG", None]


def test_chat_piped_answers_one_line_each_and_keeps_history(files: dict[str, Path]) -> None:
    client = FakeClient(transcript="heard it")
    stdin = (
        "first question\n"
        "\n"
        f"/image {files['image']}\n"
        "about the image\n"
        f"/audio {files['audio']} and typed\n"
        "/history\n"
        "/reset\n"
        "after reset\n"
        "//starts with a slash\n"
        "/quit\n"
        "never asked\n"
    )
    code, out, err = run(["chat", "--max-tokens", "3"], client, stdin=stdin)
    assert code == EXIT_OK
    assert out.splitlines() == [
        "answer 1 to first question",
        "answer 2 to about the image",
        "answer 3 to and typed",
        "heard it",  # the question as the model saw it: typed text, then the transcript
        "answer 4 to after reset",
        "answer 5 to /starts with a slash",
    ]
    assert [c["text"] for c in client.calls] == ["first question", "about the image", "and typed", "after reset",
                                                  "/starts with a slash"]
    assert [c["image"] for c in client.calls] == [None, b"PNG", b"PNG", None, None]
    assert [c["audio"] for c in client.calls] == [None, None, b"WAV", None, None]
    assert client.calls[2]["history"] == (
        Message("user", "first question"), Message("assistant", "answer 1 to first question"),
        Message("user", "about the image"), Message("assistant", "answer 2 to about the image"),
    )
    assert client.calls[3]["history"] == ()  # /reset
    assert all(c["max_tokens"] == 3 for c in client.calls)
    assert "[heard] heard it" in err
    assert "user: and typed\nheard it" in err  # /history shows the question as the model saw it


def test_chat_reports_errors_and_carries_on() -> None:
    client = FakeClient(fail_on="bad")
    code, out, err = run(["chat"], client, stdin="bad one\n/nonsense\n/image /nonexistent.png\ngood one\n")
    assert code == EXIT_FAILED  # a turn failed
    assert out == "answer 2 to good one\n"
    assert "error: the server said no" in err
    assert "unknown command /nonsense" in err and "image file not found" in err
    assert client.calls[1]["history"] == ()  # the failed turn was not kept


def test_chat_stops_a_piped_session_when_the_server_is_gone() -> None:
    client = FakeClient(fail_on="q", error=ServerUnavailable("no server: `make serve`"))
    code, out, err = run(["chat"], client, stdin="q1\nq2\n")
    assert code == EXIT_UNAVAILABLE and len(client.calls) == 1 and "make serve" in err


def test_chat_ctrl_c_mid_answer_drops_the_turn_and_continues() -> None:
    client = FakeClient(interrupt_on="long")
    code, out, err = run(["chat"], client, stdin="long story\nnext\n")
    assert code == EXIT_OK
    assert "stopped" in err
    assert out.splitlines() == ["answer 1 ", "answer 2 to next"]
    assert client.calls[1]["history"] == ()
    assert client.closed == [True]


def test_chat_help_and_eof() -> None:
    code, out, err = run(["chat"], FakeClient(), stdin="/help\n")
    assert code == EXIT_OK and out == "" and "/audio PATH [TEXT]" in err


def test_chat_forgets_what_the_server_left_out_and_says_so() -> None:
    """The server cut the two oldest messages to fit its context: the chat drops them from its own history
    (else every later turn is cut the same way) and tells the user."""
    import io

    from mmgpt.client.cli import write_answer

    class Cutting(FakeClient):
        def stream(self, text: str = "", **kwargs: Any) -> Iterator[Piece]:
            pieces = list(super().stream(text, **kwargs))
            dropped = 2 if len(self.calls) == 3 else 0
            return iter([Piece(p.text, p.transcript, dropped) for p in pieces])

    session = ChatSession(Cutting())
    for q in ("one", "two"):
        list(session.turn(q))
    out, err = io.StringIO(), io.StringIO()
    write_answer(session.turn("three"), out, err, show_transcript=False)
    assert [m.content for m in session.history] == ["two", "answer 2 to two", "three", "answer 3 to three"]
    assert "the oldest 2 messages of the conversation were left out" in err.getvalue()
    assert out.getvalue() == "answer 3 to three\n"
