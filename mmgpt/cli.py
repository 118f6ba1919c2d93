"""`mmgpt`: the in-process reference from the command line.

    mmgpt ask --text "What is in the picture?" --image cat.jpg
    mmgpt ask --audio question.wav --checkpoint runs/stage2
    mmgpt init --preset toy OUT_DIR
    mmgpt speech OUT_DIR --whisper openai/whisper-base.en --prompt "Questions about shapes."
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: {what} file not found: {path}")
    return p.read_bytes()


def cmd_ask(args: argparse.Namespace) -> int:
    from mmgpt.generation import SamplingParams
    from mmgpt.inference import Assistant
    from mmgpt.preprocess import InputError

    image, audio = _read(args.image, "image"), _read(args.audio, "audio")
    if not args.text and audio is None:
        raise SystemExit("error: give --text, --audio, or both")
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )
    bot = Assistant.load(args.checkpoint, load_whisper=audio is not None)
    try:
        transcript, pieces = bot.stream(args.text or "", image=image, audio=audio, params=params)
        if audio is not None:
            print(f"[heard] {transcript}", file=sys.stderr)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except (InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    return 0


def cmd_speech(args: argparse.Namespace) -> int:
    from mmgpt.checkpoint import point_whisper

    if args.whisper is None and args.prompt is None:
        raise SystemExit("error: give --whisper, --prompt, or both")
    try:
        config = point_whisper(args.checkpoint, args.whisper, args.prompt)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"whisper: {config.whisper_source}")
    print(f"prompt:  {config.speech.initial_prompt!r} ({len(config.speech.prompt_ids)} prompt ids)")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from mmgpt.presets import create

    out = create(args.preset, args.out, projector_type=args.projector, seed=args.seed)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mmgpt.presets import PRESET_NAMES

    parser = argparse.ArgumentParser(prog="mmgpt", description="Multimodal GPT on Phi-2: the in-process (PyTorch) reference.")
    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="answer one question about an image and/or speech", description=(
        "Answer in PyTorch and print the answer on stdout (the transcript of --audio goes to stderr). "
        "Greedy unless --temperature > 0."))
    ask.add_argument("--checkpoint", help="checkpoint directory (default: the embedded default, the trained toy world)")
    ask.add_argument("--image", help="an image file (JPEG/PNG/WebP/BMP/...)")
    ask.add_argument("--audio", help="a WAV/FLAC/OGG file with a spoken question (any rate, any channels)")
    ask.add_argument("--text", default="", help="the written question")
    ask.add_argument("--max-tokens", type=int, default=128, help="most new tokens (default 128)")
    ask.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    ask.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    ask.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = off")
    ask.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    ask.set_defaults(func=cmd_ask)
    speech = sub.add_parser("speech", help="point a checkpoint at another Whisper or previous-text prompt", description=(
        "Rewrite CHECKPOINT's speech settings: which Whisper transcribes --audio, and the previous-text prompt "
        "that biases its spelling towards a domain. The prompt ids are rebuilt for that Whisper's tokenizer."))
    speech.add_argument("checkpoint", help="checkpoint directory (make one with `mmgpt init OUT_DIR`)")
    speech.add_argument("--whisper", help="a Whisper folder, a hub id (e.g. openai/whisper-base.en), or tiny.en")
    speech.add_argument("--prompt", help="Whisper's previous-text prompt ('' for none; default: keep it)")
    speech.set_defaults(func=cmd_speech)
    init = sub.add_parser("init", help="create a fresh checkpoint from a preset")
    init.add_argument("out", help="directory to write")
    init.add_argument("--preset", default="toy", choices=PRESET_NAMES,
                      help="toy: a copy of the trained default; tiny: random weights; phi-2*: from the hub")
    init.add_argument("--projector", default="mlp2x_gelu", choices=("linear", "mlp2x_gelu"))
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=cmd_init)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
