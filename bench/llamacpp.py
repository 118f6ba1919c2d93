"""llama.cpp side by side, on the same weights: `llama-cpp-python` (built from source by `make bench`'s
install step) runs GGUF files that llama.cpp's own converter writes from the bench's Phi-2 folder.

The converter ships in the package's source distribution, not its wheel: the bench downloads that sdist
(the same pinned version) once and uses its `convert_hf_to_gguf.py` and `gguf-py`. The converter refuses
tokenizers whose pre-tokenizer it does not know by hash; the bench's tokenizer is a byte-level BPE with
GPT-2's pre-tokenizer trained here, so it is declared as "gpt-2". The bench passes token ids, so the
tokenizer has no part in any timing.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from .llm import BandwidthProbe, DecodeTiming, StepClock

VERSION = "0.3.36"  # pinned in pyproject's `bench` extra
# llama.cpp's file types for the three precisions compared with ours (fp32, int8, 4-bit): the converter writes
# f32; llama.cpp's quantizer (C, every thread) makes Q8_0 and Q4_0 from it, where the converter's own Q8_0 (numpy)
# took ~1 of the bench's minutes
KINDS = {"f32": "f32", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}

_CONVERT = """
import runpy, sys
vendor = sys.argv[1]
sys.path[:0] = [vendor, vendor + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(vendor + "/convert_hf_to_gguf.py", run_name="__main__")
"""


class Unavailable(RuntimeError):
    """llama.cpp cannot run here; the message says why (the bench reports it instead of a figure)."""


def check_available() -> str:
    try:
        import llama_cpp
    except ImportError as e:
        raise Unavailable(f"llama-cpp-python is not installed ({e}); `make bench` installs it (the `bench` extra)") from e
    return llama_cpp.__version__


def converter(cache: Path) -> Path:
    """llama.cpp's converter from the pinned sdist: downloaded once into `cache`, extracted."""
    vendor = cache / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if (vendor / "convert_hf_to_gguf.py").is_file():
        return vendor
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file():
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={VERSION}", "-d", str(cache)], capture_output=True, text=True)
        if r.returncode or not sdist.is_file():
            raise Unavailable(f"could not download llama.cpp's converter (llama-cpp-python {VERSION} sdist): {r.stderr.strip()[-300:]}")
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    wanted = (prefix + "convert_hf_to_gguf.py", prefix + "gguf-py/", prefix + "conversion/")
    with tarfile.open(sdist) as tar:
        tar.extractall(cache, members=[m for m in tar.getmembers() if m.name.startswith(wanted)], filter="data")
    return vendor


def convert(hf_dir: Path, out_dir: Path, cache: Path) -> dict[str, Path]:
    """GGUF files f32, q8_0 (the converter) and q4_0 (llama.cpp's quantizer) of an HF Phi folder."""
    import llama_cpp

    vendor = converter(cache)
    files = {}
    for kind, outtype in KINDS.items():
        path = out_dir / f"phi2.{kind}.gguf"
        files[kind] = path
        if path.is_file():
            continue
        if kind == "f32":
            r = subprocess.run([sys.executable, "-c", _CONVERT, str(vendor), str(hf_dir), "--outtype", outtype,
                                "--outfile", str(path)], capture_output=True, text=True)
            if r.returncode:
                raise Unavailable(f"llama.cpp's converter failed: {r.stderr.strip()[-400:]}")
        else:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{outtype}")
            params.nthread = 2
            if llama_cpp.llama_model_quantize(str(files["f32"]).encode(), str(path).encode(), ctypes.byref(params)):
                raise Unavailable(f"llama.cpp could not quantize the f32 file to {kind.upper()}")
    return files


def weight_bytes(path: Path) -> int:
    """Bytes a decode step streams from a GGUF file: every tensor but the token embedding table (read a row
    at a time, as ours is)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if t.name != "token_embd.weight")


class LlamaCpp:
    """One GGUF file loaded in llama.cpp (kept loaded across the bench's rounds)."""

    def __init__(self, path: Path, threads: int, max_context: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=max_context, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, verbose=False)
        self.prefilled: dict = {}  # (context, seed) -> (llama.cpp's state after the prefill, its seconds)

    def decode(self, context: int, steps: int, seed: int = 0, probe: BandwidthProbe | None = None) -> DecodeTiming:
        """Prefill `context` ids, then time `steps` single-token evaluations (llama.cpp keeps its KV cache);
        `ttft_s` holds the prefill's seconds; with `probe`, the bandwidth around each step.

        The first call for a context prefills and keeps llama.cpp's state; later ones (the bench's next rounds)
        load it instead of prefilling again (a 1,024-token prefill is ~10 s on 2 cores, nine of them were ~1.5
        of the bench's minutes), and report the first prefill's seconds."""
        ids = [int(i) for i in np.random.default_rng(seed).integers(2, 500, context + steps + 2)]
        if (context, seed) in self.prefilled:
            state, prefill = self.prefilled[(context, seed)]
            self.llm.load_state(state)
        else:
            self.llm.reset()  # the next eval starts at position 0 and drops the old cache entries
            t = time.perf_counter()
            self.llm.eval(ids[:context])
            prefill = time.perf_counter() - t
            self.prefilled[(context, seed)] = (self.llm.save_state(), prefill)
        clock = StepClock(probe)
        for tok in ids[context:]:
            clock.start()
            self.llm.eval([tok])
            clock.stop()
        return clock.timing(prefill)
