"""`make demo`: the whole served path on one machine, right after `make install`.

    python -m mmgpt.serving.demo --export-dir artifacts/export --repo-dir artifacts/triton_repo

1. exports the embedded default checkpoint to ONNX if `--export-dir` is missing or empty (an export
   already there is served as it is, so `make export FROM=...` then `make demo` serves that checkpoint);
2. assembles the Triton model repository from the export;
3. starts the real tritonserver on free loopback ports;
4. asks, over gRPC with `mmgpt.client`, a question about an image and a spoken question (plus a follow-up
   that carries the conversation), printing the transcript and the answers as they stream in;
5. stops the server, always: also on errors and Ctrl-C.

The image and the audio ship in `mmgpt/assets/`, made by `mmgpt.toy.generate.write_demo_assets`: a
picture of the toy world the embedded default was trained on (a big red circle in the top left corner, a
small blue star in the center, a big yellow heart in the bottom right corner; no training image) and the
question "What is left of the star?" spoken by espeak-ng in a voice held out of training. The default
answers "The circle is red.", "It is in the top left corner." and "The red circle is left of the star.".
Pass --image/--audio to ask about your own files (WAV/FLAC/OGG; any English recording is transcribed by
the real Whisper tiny.en, though the toy model only knows its world of shapes).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import TextIO

from mmgpt import names
from mmgpt.client import ClientError, MMGPTClient
from mmgpt.template import Message

IMAGE_QUESTION = "What color is the circle?"
FOLLOW_UP = "Where is it?"
RANDOM_WEIGHTS_NOTE = (
    "NOTE: this export is of a `tiny` preset checkpoint, which has RANDOM weights: its transcripts and\n"
    "      answers are gibberish. That only shows the served path works; `make export` (the trained\n"
    "      default) and `make demo` again give real answers."
)


def asset(name: str) -> Path:
    """A file shipped in mmgpt/assets."""
    return Path(str(resources.files("mmgpt") / "assets" / name))


def export_source(export_dir: Path) -> str | None:
    """The checkpoint an export was made from, as its LLM export recorded it (None if not recorded)."""
    path = export_dir / names.LLM_DIR / names.EXPORT_CONFIG
    try:
        return json.loads(path.read_text())["source_checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def has_random_weights(export_dir: Path) -> bool:
    """Whether the export is of a `tiny` preset checkpoint (random weights, gibberish by design)."""
    try:
        return json.loads((export_dir / "mmgpt_config.json").read_text())["preset"] == "tiny"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def printable(text: str) -> str:
    """Control characters shown as U+FFFD: random weights emit them, and a terminal must not act on them."""
    return "".join(ch if ch.isprintable() or ch in "\n\t" else "\ufffd" for ch in text)


class _Terminated(Exception):
    """SIGTERM, turned into an exception so the server is stopped on the way out."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def _ask(client: MMGPTClient, out: TextIO, label: str, **kwargs: object) -> tuple[str, str]:
    """Stream one answer to `out`; return (answer, transcript) and print how long it took."""
    start = time.monotonic()
    first: float | None = None
    parts: list[str] = []
    heard = False
    with client.stream(**kwargs) as answer:  # type: ignore[arg-type]
        for piece in answer:
            if piece.transcript and not heard:
                heard = True
                print(f"  heard:    {printable(piece.transcript)}", file=out, flush=True)
            if piece.text:
                if first is None:
                    first = time.monotonic() - start
                    print(f"  {label}  ", end="", file=out, flush=True)
                parts.append(piece.text)
                out.write(printable(piece.text))
                out.flush()
    total = time.monotonic() - start
    if first is None:
        print(f"  {label}  (empty answer)", end="", file=out)
        first = total
    print(f"\n            [{len(parts)} pieces; first after {first:.2f} s, all after {total:.2f} s]", file=out, flush=True)
    return "".join(parts), answer.transcript


def run(export_dir: Path, repo_dir: Path, *, image: Path, audio: Path, max_tokens: int, out: TextIO) -> None:
    from mmgpt.serving.tritonserver import TritonServer

    wall = time.monotonic()
    print("mmgpt demo: export -> Triton repository -> tritonserver -> gRPC client\n", file=out, flush=True)

    # 1. Export (the slow part on a first run: builds the embedded default, then ONNX with parity checks).
    from mmgpt.serving.repository import assemble_repository, check_export

    if export_dir.exists() and any(export_dir.iterdir()):
        check_export(export_dir)  # a folder with something else in it is the user's: never exported over
        print(f"[1/4] export: using {export_dir} (already exported; `make export` to redo it)", file=out, flush=True)
    else:
        from mmgpt.export.__main__ import main as export

        print(f"[1/4] export: {export_dir} is empty; exporting the embedded default (about a minute) ...",
              file=out, flush=True)
        start = time.monotonic()
        export(None, str(export_dir))
        print(f"      exported in {time.monotonic() - start:.1f} s", file=out, flush=True)
    source = export_source(export_dir)
    print(f"      serving the export of {source or 'an unrecorded checkpoint'}", file=out, flush=True)
    if has_random_weights(export_dir):
        print(f"\n{RANDOM_WEIGHTS_NOTE}\n", file=out, flush=True)

    # 2. Repository.
    assemble_repository(export_dir, repo_dir)
    print(f"[2/4] repository: {repo_dir}", file=out, flush=True)

    # 3. Server. The log sits beside the repository so a failure can be read afterwards.
    log_file = repo_dir.resolve().parent / "tritonserver-demo.log"
    server = TritonServer(repo_dir, log_file=log_file)
    start = time.monotonic()
    print(f"[3/4] server: starting tritonserver (log {log_file}) ...", file=out, flush=True)
    try:
        server.start()
        server.wait_ready(timeout=300)
        print(f"      ready in {time.monotonic() - start:.1f} s, gRPC on {server.grpc_url}", file=out, flush=True)

        # 4. Questions, through the same client library as `mmgpt-client`.
        client = MMGPTClient(server.grpc_url, timeout=300)
        print("[4/4] questions (answers stream in as they are generated)\n", file=out, flush=True)
        print(f"  image:    {image}\n  question: {IMAGE_QUESTION}", file=out, flush=True)
        answer, _ = _ask(client, out, "answer: ", text=IMAGE_QUESTION, image=image.read_bytes(), max_tokens=max_tokens)

        print(f"\n  follow-up with the conversation so far\n  question: {FOLLOW_UP}", file=out, flush=True)
        history = [Message("user", IMAGE_QUESTION), Message("assistant", answer)]
        _ask(client, out, "answer: ", text=FOLLOW_UP, image=image.read_bytes(), history=history, max_tokens=max_tokens)

        print(f"\n  audio:    {audio} (a spoken question about the same image: the server hears it)", file=out, flush=True)
        _ask(client, out, "answer: ", audio=audio.read_bytes(), image=image.read_bytes(), max_tokens=max_tokens)
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave a server behind.
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
        try:
            print("\nstopping tritonserver ...", file=out, flush=True)
            server.stop()
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, previous)
    print(f"demo finished in {time.monotonic() - wall:.1f} s. Next: `make serve`, then "
          f"`mmgpt-client ask --text \"...\" --image {asset('demo.png')}` or `mmgpt-client chat`; or, beside "
          "`make serve`, `make api` for the OpenAI-compatible API (/v1/chat/completions with images and audio) "
          "and `make chat` for the web chat at http://127.0.0.1:8080/.", file=out, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmgpt.serving.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export-dir", type=Path, default=Path("artifacts/export"),
                   help="export to serve; made from the embedded default if it holds none (default artifacts/export)")
    p.add_argument("--repo-dir", type=Path, default=Path("artifacts/triton_repo"),
                   help="where the Triton model repository is assembled (default artifacts/triton_repo)")
    p.add_argument("--image", type=Path, default=asset("demo.png"), help="image to ask about (default: the shipped drawing)")
    p.add_argument("--audio", type=Path, default=asset("demo.wav"),
                   help="WAV/FLAC/OGG with a spoken question about the image (default: the shipped one, "
                        "\"What is left of the star?\")")
    p.add_argument("--max-tokens", type=int, default=32, help="most new tokens per answer (default 32)")
    args = p.parse_args(argv)
    for what, path in (("image", args.image), ("audio", args.audio)):
        if not path.is_file():
            print(f"error: {what} file not found: {path}", file=sys.stderr)
            return 2
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        run(args.export_dir, args.repo_dir, image=args.image, audio=args.audio, max_tokens=args.max_tokens,
            out=sys.stdout)
    except (KeyboardInterrupt, _Terminated):
        print("\ndemo interrupted; the server was stopped", file=sys.stderr)
        return 130
    except ClientError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # export, repository or server start: show what failed, not a bare traceback
        from mmgpt.serving.tritonserver import ServerStartError, TritonNotFoundError

        if isinstance(e, (ServerStartError, TritonNotFoundError, FileNotFoundError)):
            print(f"\nerror: {e}", file=sys.stderr)
            return 1
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
