"""CLIP vision tower + projector -> one ONNX graph with a dynamic batch: pixels in, prompt-table rows out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mmgpt import names
from mmgpt.checkpoint import Components
from mmgpt.export.common import Parity, check, max_diff, quantize_matmuls_int8, write_export_config

TOLERANCE = 1e-4


class VisionForExport(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, N, D)
        return self.model.encode_images(pixel_values)


def quantize_vision(out_dir: Path) -> str:
    """Write the int8 twin of the encoder (dynamic quantization of its MatMul/Gemm weights, activations per call;
    the patch convolution stays fp32) -> its name. A CPU runs the ViT's GEMMs compute-bound, so int8 kernels
    speed up the image's part of the time to first token (CLIP ViT-B/32, batch 1: 1.5x on a 2-core AVX2 CPU)."""
    quantize_matmuls_int8(out_dir / names.VISION_ONNX, out_dir / names.VISION_INT8_ONNX)
    return names.VISION_INT8_ONNX


def export_vision(c: Components, out_dir: Path, source: str, opset: int = 17, *, int8: bool = False) -> list[Parity]:
    """Export and check against PyTorch; with `int8`, also write the int8 twin and name it in the config (served
    on a CPU; a GPU host builds its TensorRT engine from the fp32 file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = c.config
    wrapper = VisionForExport(c.model).eval()
    s = cfg.image_size
    path = out_dir / names.VISION_ONNX
    with torch.no_grad():
        torch.onnx.export(
            wrapper, (torch.randn(2, 3, s, s),), str(path), input_names=[names.PIXEL_VALUES],
            output_names=[names.IMAGE_EMBEDS], dynamic_axes={names.PIXEL_VALUES: {0: "batch"}, names.IMAGE_EMBEDS: {0: "batch"}},
            opset_version=opset, dynamo=False,
        )
    c.image_processor.save_pretrained(out_dir)

    from mmgpt.runtime import OrtVision

    session = OrtVision(out_dir)
    results = []
    for batch in (1, 3):  # not the export batch of 2
        pixels = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = wrapper(pixels).numpy()
        got = session(pixels.numpy())
        results.append(Parity(f"vision batch={batch}", max_diff(ref, got), TOLERANCE))
    check(results)
    onnx_file, precision = names.VISION_ONNX, "fp32"
    if int8:
        # Judged and reported, not enforced (int8 is not meant to match fp32 bit for bit): how far the image's
        # prompt-table rows move. `make bench` measures the effect on the trained default's answers.
        onnx_file, precision = quantize_vision(out_dir), "int8 (dynamic quantization: int8 MatMul/Gemm weights)"
        quant = OrtVision(out_dir, onnx_file=onnx_file)
        for batch in (1, 3):
            pixels = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(batch)).numpy()
            want, got = session(pixels), quant(pixels)
            cos = float((want * got).sum() / (np.linalg.norm(want) * np.linalg.norm(got)))
            judged = Parity(f"vision int8 batch={batch}", max_diff(want, got), float("inf"),
                            f"cosine similarity to fp32 {cos:.5f} (judged, not enforced)")
            print(judged.line(), flush=True)
            results.append(judged)
    write_export_config(
        out_dir, kind="vision_encoder", precision=precision, source=source,
        inputs={names.PIXEL_VALUES: {"dtype": "FP32", "shape": ["batch", 3, s, s]}},
        outputs={names.IMAGE_EMBEDS: {"dtype": "FP32", "shape": ["batch", cfg.num_image_tokens, cfg.llm_hidden_size]}},
        parity=results, onnx_file=onnx_file, num_image_tokens=cfg.num_image_tokens,
        hidden_size=cfg.llm_hidden_size, image_size=s,
    )
    return results

