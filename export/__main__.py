"""`python -m mmgpt.export [--checkpoint DIR] [--out DIR] [--int8 | --int4] [--kv concat|shared] [--gpu]` (what `make export` runs)."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from mmgpt import names


def main(checkpoint: str | None = None, out: str = "artifacts/export", int8: bool = False, gpu: bool = False,
         only: tuple[str, ...] = ("vision", "llm", "whisper"), int4: bool = False, kv: str = "shared") -> Path:
    """Export a checkpoint (default: the embedded default, the trained toy world) to ONNX, each part checked against PyTorch.

    Writes only into `out`, which is replaced whole so no stale file survives a re-export.
    """
    import warnings

    import torch
    import transformers

    from mmgpt.checkpoint import load_checkpoint
    from mmgpt.export.llm import export_llm
    from mmgpt.export.vision import export_vision
    from mmgpt.export.whisper import export_whisper
    from mmgpt.presets import default_checkpoint

    # The tracer's notes on Python-side branches are expected here; the parity checks are the real test.
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    transformers.logging.set_verbosity_error()
    source = Path(checkpoint) if checkpoint else default_checkpoint()
    c = load_checkpoint(source, load_whisper="whisper" in only)
    out_dir = Path(out)
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    start = time.time()
    src = str(source.resolve())
    print(f"exporting {src} -> {out_dir}", flush=True)
    if "vision" in only:
        export_vision(c, staging / names.VISION_DIR, src, int8=int8)
    if "llm" in only:
        export_llm(c, staging / names.LLM_DIR, src, int8=int8, int4=int4, kv=kv)
    if "whisper" in only:
        export_whisper(c, staging / names.WHISPER_DIR, src, int8=int8)
    c.tokenizer.save_pretrained(staging / names.TOKENIZER_DIR)
    c.config.save(staging)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    if gpu:
        from mmgpt.export.gpu import GPUUnavailable, build_vision_trt

        try:
            print("[gpu] TensorRT vision engine:", build_vision_trt(out_dir))
        except GPUUnavailable as e:
            print(f"[gpu] skipped: {e}", flush=True)
    print(f"export done in {time.time() - start:.1f}s -> {out_dir}", flush=True)
    return out_dir


def cli(argv: list[str] | None = None) -> int:
    from mmgpt.export.common import ParityError

    p = argparse.ArgumentParser(prog="python -m mmgpt.export", description=main.__doc__)
    p.add_argument("--checkpoint", help="checkpoint directory (default: the embedded default, the trained toy world)")
    p.add_argument("--out", default="artifacts/export", help="export directory (default artifacts/export)")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--int8", action="store_true", help="also write int8 dynamically quantized vision encoder, LLM decoder and Whisper files and serve them")
    q.add_argument("--int4", action="store_true", help="also write a 4-bit weight-only LLM decoder and serve it")
    p.add_argument("--kv", choices=("shared", "concat"), default="shared",
                   help="LLM decoder: 'shared' (GroupQueryAttention: the KV cache is written in place, rows keep their "
                        "own lengths) or 'concat' (traced from transformers; each step returns a new cache)")
    p.add_argument("--gpu", action="store_true", help="also build TensorRT engines (needs a CUDA GPU)")
    p.add_argument("--only", nargs="+", choices=("vision", "llm", "whisper"), default=("vision", "llm", "whisper"))
    a = p.parse_args(argv)
    try:
        main(a.checkpoint, a.out, a.int8, a.gpu, tuple(a.only), int4=a.int4, kv=a.kv)
    except ParityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
