"""ONNX Runtime custom operators of this project, compiled on first use (a C compiler is all they need).

The LLM decoder's matrix products (matmul.c), weights packed in the order their vector kernels stream them:
`mmgpt.MatMulPacked` (fp32, `pack_f32`) and `mmgpt.MatMulInt8` (int8 weights per output column, activations
quantized per row, `pack_int8`). `register` adds them to an ONNX Runtime `SessionOptions`. Each has three
kernels: AVX512 (AVX512F for fp32, AVX512-VNNI for int8), AVX2 + FMA, and plain C loops. The export uses an
operator only where its AVX512 kernel runs (`fast`): the AVX2 ones did not beat ONNX Runtime's own kernels
(matmul.c says by how much); they keep a graph exported on an AVX512 machine usable on an AVX2 one, where the
C loops were several times slower. `MMGPT_ORTOPS_ISA=avx2` or `=portable` caps the kernels a process runs
(the tests run each on any CPU).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

DOMAIN = "mmgpt"
SOURCE = Path(__file__).with_name("matmul.c")
CFLAGS = ("-O3", "-shared", "-fPIC", "-fvisibility=hidden", "-std=gnu11")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmgpt" / "ortops"


@lru_cache(maxsize=1)
def library() -> Path:
    """The compiled operators' shared library, built once per source version (atomically, so Triton's
    processes can race to it)."""
    text = SOURCE.read_bytes()
    tag = hashlib.sha1(text + " ".join(CFLAGS).encode()).hexdigest()[:12]
    out = cache_dir() / f"libmmgpt_ortops-{tag}.so"
    if out.is_file():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("mmgpt's decoder operators need a C compiler to build them once: install gcc "
                           "(apt install gcc), then export again")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        r = subprocess.run([cc, *CFLAGS, str(SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"building {SOURCE.name} with {cc} failed:\n{r.stderr.strip()}")
        os.replace(built, out)
    return out


def available() -> bool:
    try:
        library()
        return True
    except RuntimeError:
        return False


KERNELS = {"fp32": 1, "int8": 2}  # mmgpt_ortops_kernels()'s bits


@lru_cache(maxsize=4)
def fast(kind: str) -> bool:
    """Should an export use the `kind` ("fp32" or "int8") operator here: it can be built and this CPU runs its
    vector kernel. `MMGPT_ORTOPS=1` uses the operators regardless (tests of the export on any CPU), `=0` never.
    An export is meant for the machine that serves it: one written where this is true and served on a CPU
    without the kernel runs the AVX2 kernel or the plain C loops (the library then writes a warning to stderr)."""
    force = os.environ.get("MMGPT_ORTOPS", "")
    if force in ("0", "1"):
        return force == "1" and available()
    return available() and bool(kernels() & KERNELS[kind])


def _ask(function: str) -> int | None:
    """An int the library's `function` returns (it reads this CPU and MMGPT_ORTOPS_ISA); None where the
    library cannot be built or loaded."""
    import ctypes

    try:
        return int(getattr(ctypes.CDLL(str(library())), function)())
    except (RuntimeError, OSError, AttributeError):
        return None


def kernels() -> int:
    """The operators whose fast kernel this CPU runs (KERNELS bits); 0 where the library cannot be built."""
    return _ask("mmgpt_ortops_kernels") or 0


ISAS = ("portable", "avx2", "avx512", "avx512-vnni")  # mmgpt_ortops_isa()'s levels


def isa() -> str:
    """The kernels the operators run on this CPU (an ISAS name), for logs and the bench's settings."""
    level = _ask("mmgpt_ortops_isa")
    return ISAS[level] if level is not None and 0 <= level < len(ISAS) else "unavailable"


def register(opts) -> None:
    """Add this project's operators to an onnxruntime.SessionOptions."""
    opts.register_custom_ops_library(str(library()))


def pack_f32(w: np.ndarray) -> np.ndarray:
    """(K, N) float weights, N a multiple of 16 -> (N/16, K, 16) for MatMulPacked: W[k, n] at [n // 16, k, n % 16],
    so one block of 16 columns is one sequential stream."""
    k, n = w.shape
    if n % 16:
        raise ValueError(f"MatMulPacked needs a multiple of 16 columns, got {n}")
    return np.ascontiguousarray(np.asarray(w, np.float32).reshape(k, n // 16, 16).transpose(1, 0, 2))


def unpack_f32(packed: np.ndarray) -> np.ndarray:
    """pack_f32's inverse: (N/16, K, 16) -> (K, N)."""
    nb, k, _ = packed.shape
    return np.ascontiguousarray(packed.transpose(1, 0, 2).reshape(k, nb * 16))


def pack_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K, N) float weights -> (packed int8 (N16/16, K4/4, 16, 4), scale (N,), colsum (N,)) for MatMulInt8.

    Symmetric per output column (W ~ scale * Wq, |Wq| <= 127); packed so that one block of 16 columns is
    one sequential stream: W[k, n] sits at [n // 16, k // 4, n % 16, k % 4], zero padded."""
    w = np.asarray(w, np.float32)
    k, n = w.shape
    scale = np.abs(w).max(axis=0) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    k4, n16 = -(-k // 4) * 4, -(-n // 16) * 16
    padded = np.zeros((k4, n16), np.int8)
    padded[:k, :n] = q
    packed = np.ascontiguousarray(padded.reshape(k4 // 4, 4, n16 // 16, 16).transpose(2, 0, 3, 1))
    return packed, scale.astype(np.float32), q.sum(axis=0, dtype=np.int32)
