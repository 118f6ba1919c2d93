"""`mmgpt-client`: talk to the served assistant (start it with `make serve`).

    mmgpt-client ask --text "What is in the picture?" --image cat.jpg
    mmgpt-client ask --audio question.wav                 # the transcript goes to stderr
    mmgpt-client chat --image cat.jpg                     # multi-turn; /help lists the commands
    printf 'Hi\\nAnd then?\\n' | mmgpt-client chat         # one answer per input line
    mmgpt-client health
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from mmgpt.client.api import (
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    ClientError,
    InvalidInput,
    MMGPTClient,
    Piece,
    ResponseTimeout,
    ServerUnavailable,
    asked_question,
    read_media,
)
from mmgpt.template import Message

# Exit codes, also listed in --help.
EXIT_OK = 0
EXIT_FAILED = 1  # the server rejected or failed a request, or it timed out
EXIT_USAGE = 2  # bad arguments or input files (argparse uses 2 as well)
EXIT_UNAVAILABLE = 3  # no server at the URL
EXIT_INTERRUPTED = 130  # Ctrl-C

URL_ENV = "MMGPT_URL"


class Client(Protocol):
    """What the commands need of a client (MMGPTClient, or a fake in tests)."""

    def stream(self, text: str = "", **kwargs: Any) -> Iterator[Piece]: ...

    def health(self, timeout: float = 5.0) -> Any: ...


ClientFactory = Callable[[argparse.Namespace], Client]


def default_client(args: argparse.Namespace) -> Client:
    return MMGPTClient(args.url, timeout=args.timeout if args.timeout > 0 else None)


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The request options shared by `ask` and every chat turn; None leaves the server's default."""
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop_words": tuple(args.stop),
        "stream": not args.no_stream,
    }


def _exit_code(error: ClientError) -> int:
    if isinstance(error, ServerUnavailable):
        return EXIT_UNAVAILABLE
    if isinstance(error, InvalidInput):
        return EXIT_USAGE
    return EXIT_FAILED


def _error(message: object, err: TextIO) -> None:
    print(f"error: {message}", file=err, flush=True)


def _closing(pieces: Iterator[Piece]) -> contextlib.AbstractContextManager[Iterator[Piece]]:
    """Close the answer on the way out (cancels the request if it has not finished)."""
    return contextlib.closing(pieces) if hasattr(pieces, "close") else contextlib.nullcontext(pieces)


def write_answer(pieces: Iterator[Piece], out: TextIO, err: TextIO, *, show_transcript: bool) -> str:
    """Print pieces to `out` as they arrive (the transcript once, to `err`); return the whole answer."""
    parts: list[str] = []
    heard = dropped = False
    with _closing(pieces):
        for piece in pieces:
            if show_transcript and not heard and piece.transcript:
                heard = True
                print(f"[heard] {piece.transcript}", file=err, flush=True)
            if piece.history_dropped and not dropped:
                dropped = True
                print(f"[the oldest {piece.history_dropped} messages of the conversation were left out to fit the "
                      "model's context]", file=err, flush=True)
            if piece.text:
                parts.append(piece.text)
                out.write(piece.text)
                out.flush()
    out.write("\n")
    out.flush()
    return "".join(parts)


# ------------------------------------------------------------------------------------------------------
# ask
# ------------------------------------------------------------------------------------------------------


def cmd_ask(args: argparse.Namespace, client: Client, inp: TextIO, out: TextIO, err: TextIO) -> int:
    if not (args.text or "").strip() and args.audio is None:
        _error("give --text, --audio, or both", err)
        return EXIT_USAGE
    try:
        pieces = client.stream(args.text or "", image=args.image, audio=args.audio, **sampling_options(args))
        write_answer(pieces, out, err, show_transcript=args.audio is not None)
    except ClientError as e:
        out.flush()
        _error(e, err)
        return _exit_code(e)
    return EXIT_OK


# ------------------------------------------------------------------------------------------------------
# chat
# ------------------------------------------------------------------------------------------------------

CHAT_HELP = """\
Type a question and press Enter; the answer streams back and the conversation is kept.
  /image PATH        send this image with every question from now on (/image off: stop; /image: show)
  /audio PATH [TEXT] ask now with a spoken question (plus optional typed TEXT); prints what was heard
  /history           show the conversation so far
  /reset             forget the conversation and the image
  /help              this text
  /quit              leave (also /exit, Ctrl-D)
Ctrl-C while an answer streams stops it (the server stops too) and leaves it out of the conversation.
Start a line with // to send text that begins with /."""


@dataclass
class ChatSession:
    """The conversation state of `mmgpt-client chat`: history, the current image, and the request options.

    Only answers that finished join the history; each user turn is the question as the model saw it
    (typed text, then the transcript), so the next prompt is exactly what the server would have built.
    The image is not part of the history (the server takes it only with the current question), so it is
    sent again with every question while set.
    """

    client: Client
    options: dict[str, Any] = field(default_factory=dict)
    history: list[Message] = field(default_factory=list)
    image: bytes | None = None
    image_name: str | None = None

    def set_image(self, path: str) -> None:
        self.image = read_media(path, "image")
        self.image_name = path

    def clear_image(self) -> None:
        self.image, self.image_name = None, None

    def reset(self) -> None:
        self.history.clear()
        self.clear_image()

    def turn(self, text: str, audio: bytes | None = None) -> Iterator[Piece]:
        """Ask with the history so far; the turn is recorded only once the answer is complete."""
        pieces = self.client.stream(text, image=self.image, audio=audio, history=tuple(self.history), **self.options)
        parts: list[str] = []
        transcript, dropped = "", 0
        with _closing(pieces):
            for piece in pieces:
                parts.append(piece.text)
                transcript = transcript or piece.transcript
                dropped = dropped or piece.history_dropped
                yield piece
        # What the server left out to fit its context is gone from the conversation for good.
        self.history = self.history[dropped:]
        self.history += [Message("user", asked_question(text, transcript)), Message("assistant", "".join(parts))]


def _chat_command(session: ChatSession, line: str, out: TextIO, err: TextIO) -> tuple[str, Any]:
    """Run a /command. Returns ("quit", None), ("ask", (text, audio_bytes)) or ("done", None)."""
    name, _, rest = line[1:].partition(" ")
    rest = rest.strip()
    try:
        words = shlex.split(rest)
    except ValueError as e:
        raise InvalidInput(f"cannot parse {line!r}: {e}") from None
    if name in ("quit", "exit", "q"):
        return "quit", None
    if name == "help":
        print(CHAT_HELP, file=err)
    elif name == "reset":
        session.reset()
        print("[conversation and image cleared]", file=err)
    elif name == "history":
        for m in session.history:
            print(f"{m.role}: {m.content}", file=err)
        if not session.history:
            print("[no history yet]", file=err)
    elif name == "image":
        if not words:
            print(f"[image: {session.image_name or 'none'}]", file=err)
        elif len(words) == 1 and words[0].lower() in ("off", "none"):
            session.clear_image()
            print("[image cleared]", file=err)
        elif len(words) == 1:
            session.set_image(words[0])
            print(f"[image: {words[0]}, sent with every question]", file=err)
        else:
            raise InvalidInput("usage: /image PATH (quote a path with spaces), /image off")
    elif name == "audio":
        if not words:
            raise InvalidInput("usage: /audio PATH [TEXT]")
        return "ask", (" ".join(words[1:]), read_media(words[0], "audio"))
    else:
        raise InvalidInput(f"unknown command /{name}; /help lists the commands")
    err.flush()
    return "done", None


def _read_line(inp: TextIO, out: TextIO, interactive: bool) -> str | None:
    if interactive:
        try:
            return input("you> ")  # readline editing when imported; Ctrl-D -> EOFError
        except EOFError:
            return None
    line = inp.readline()
    return None if line == "" else line.rstrip("\n")


def cmd_chat(args: argparse.Namespace, client: Client, inp: TextIO, out: TextIO, err: TextIO) -> int:
    interactive = inp is sys.stdin and sys.stdin.isatty() and out is sys.stdout
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        print(f"mmgpt chat with {args.url}. /help for commands, Ctrl-D to leave.", file=err)
    session = ChatSession(client, sampling_options(args))
    failed = False
    try:
        if args.image is not None:
            session.set_image(args.image)
    except ClientError as e:
        _error(e, err)
        return _exit_code(e)
    while True:
        try:
            line = _read_line(inp, out, interactive)
        except KeyboardInterrupt:
            print(file=err)
            return EXIT_INTERRUPTED
        if line is None:
            break
        text, audio = line, None
        stripped = line.strip()
        if not stripped:
            continue
        try:
            if stripped.startswith("//"):
                text = stripped[1:]
            elif stripped.startswith("/"):
                action, payload = _chat_command(session, stripped, out, err)
                if action == "quit":
                    break
                if action == "done":
                    continue
                text, audio = payload
            write_answer(session.turn(text, audio), out, err, show_transcript=audio is not None)
        except KeyboardInterrupt:
            out.write("\n")
            out.flush()
            print("[stopped; this turn is not kept]", file=err, flush=True)
        except ClientError as e:
            out.flush()
            _error(e, err)
            failed = True
            if isinstance(e, ResponseTimeout | ServerUnavailable) and not interactive:
                return _exit_code(e)  # a script gains nothing from sending more lines into the void
    return EXIT_FAILED if failed else EXIT_OK


# ------------------------------------------------------------------------------------------------------
# health
# ------------------------------------------------------------------------------------------------------


def cmd_health(args: argparse.Namespace, client: Client, inp: TextIO, out: TextIO, err: TextIO) -> int:
    h = client.health(timeout=min(args.timeout, 10.0) if args.timeout > 0 else 10.0)
    if h.ok:
        print(f"ready: {h.url}", file=out)
        return EXIT_OK
    _error(h.detail or "not ready", err)
    return EXIT_FAILED if h.live else EXIT_UNAVAILABLE


# ------------------------------------------------------------------------------------------------------
# parser
# ------------------------------------------------------------------------------------------------------

EPILOG = f"""\
The server address defaults to ${URL_ENV} or {DEFAULT_URL}. Exit codes: {EXIT_OK} ok, {EXIT_FAILED} the request
failed or timed out, {EXIT_USAGE} bad arguments or files, {EXIT_UNAVAILABLE} no server at the address,
{EXIT_INTERRUPTED} interrupted."""


def _connection_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("server")
    g.add_argument("--url", default=os.environ.get(URL_ENV, DEFAULT_URL),
                   help=f"gRPC address host:port of the server (default: ${URL_ENV} or {DEFAULT_URL})")
    g.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds to wait for each response before cancelling; 0 = forever (default {DEFAULT_TIMEOUT_S:g})")
    return p


def _sampling_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("answer (left out: the server's defaults, greedy with 128 tokens)")
    g.add_argument("--max-tokens", type=int, help="most new tokens")
    g.add_argument("--temperature", type=float, help="0 = greedy; > 0 samples")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]")
    g.add_argument("--top-k", type=int, help="sample among the k likeliest tokens; 0 = off")
    g.add_argument("--seed", type=int, help="makes sampling reproducible")
    g.add_argument("--stop", action="append", default=[], metavar="WORD",
                   help="stop before this text (repeat for several)")
    g.add_argument("--no-stream", action="store_true", help="receive the answer in one piece instead of streamed")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmgpt-client",
        description="Ask the mmgpt assistant served by Triton (start the server with `make serve`).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{ask,chat,health}")
    common = [_connection_parser(), _sampling_parser()]
    ask = sub.add_parser(
        "ask", parents=common, help="answer one question about an image and/or speech",
        description="Stream the answer to stdout; with --audio the transcript (what was heard) goes to stderr.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ask.add_argument("--text", default="", help="the written question (may be left out with --audio)")
    ask.add_argument("--image", help="an image file (JPEG/PNG/WebP/BMP/...), read here and sent as bytes")
    ask.add_argument("--audio", help="a WAV/FLAC/OGG file with a spoken question, read here and sent as bytes")
    ask.set_defaults(func=cmd_ask)
    chat = sub.add_parser(
        "chat", parents=common, help="multi-turn conversation (reads stdin; works piped)",
        description="Each line of input is a question; answers go to stdout, one per line. The conversation "
        "is kept and sent with each question.\n\n" + CHAT_HELP,
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument("--image", help="an image to talk about (same as /image PATH)")
    chat.set_defaults(func=cmd_chat)
    health = sub.add_parser("health", parents=[_connection_parser()], help="is the server up and the model ready?",
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    health.set_defaults(func=cmd_health)
    return parser


def main(argv: Sequence[str] | None = None, *, client_factory: ClientFactory = default_client,
         inp: TextIO | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The `mmgpt-client` entry point; the keyword arguments replace the client and the standard streams."""
    args = build_parser().parse_args(argv)
    inp, out, err = inp or sys.stdin, out or sys.stdout, err or sys.stderr
    for name in ("image", "audio"):
        path = getattr(args, name, None)
        if path is not None and not Path(path).is_file():
            _error(f"{name} file not found: {path}", err)
            return EXIT_USAGE
    try:
        return args.func(args, client_factory(args), inp, out, err)
    except KeyboardInterrupt:
        out.flush()
        print("\n[interrupted; the request was cancelled]", file=err, flush=True)
        return EXIT_INTERRUPTED
    except ClientError as e:
        _error(e, err)
        return _exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
