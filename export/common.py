"""What every export shares: the engine config written beside each artifact, and the parity verdict."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmgpt import names


class ParityError(RuntimeError):
    """An exported graph disagrees with PyTorch past tolerance."""


@dataclass
class Parity:
    name: str
    max_abs_diff: float
    tolerance: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.tolerance

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        extra = f"  {self.detail}" if self.detail else ""
        return f"[parity] {self.name:<34} max|diff| = {self.max_abs_diff:.3e}  (tol {self.tolerance:.0e})  {verdict}{extra}"


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ParityError(f"shape mismatch: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def check(results: list[Parity]) -> None:
    for r in results:
        print(r.line(), flush=True)
    failed = [r for r in results if not r.ok]
    if failed:
        raise ParityError("export parity failed: " + "; ".join(f"{r.name} {r.max_abs_diff:.3e} > {r.tolerance:.0e}" for r in failed))


def quantize_matmuls_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime's dynamic quantization of a graph's MatMul/Gemm weights to int8 (activations quantized per
    call; convolutions stay fp32), without the quantizer's advice to pre-process (meant for static quantization)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        root.setLevel(level)


def versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def write_export_config(engine_dir: Path, *, kind: str, precision: str, source: str, inputs: dict, outputs: dict,
                        parity: list[Parity], **extra) -> Path:
    """The record beside every engine: what it is, its tensors and shapes, where it came from, with what."""
    record = {
        "kind": kind,
        "precision": precision,
        "source_checkpoint": source,
        "inputs": inputs,  # name -> {"dtype", "shape"} with symbolic dims as strings
        "outputs": outputs,
        "parity": [{"check": p.name, "max_abs_diff": p.max_abs_diff, "tolerance": p.tolerance} for p in parity],
        "versions": versions(),
        **extra,
    }
    path = engine_dir / names.EXPORT_CONFIG
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
