"""CLIP vision tower + projector -> one ONNX graph with a dynamic batch: pixels in, prompt-table rows out."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from mmgpt import names
from mmgpt.checkpoint import Components
from mmgpt.export.common import Parity, check, max_diff, write_export_config

TOLERANCE = 1e-4


class VisionForExport(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, N, D)
        return self.model.encode_images(pixel_values)


def export_vision(c: Components, out_dir: Path, source: str, opset: int = 17) -> list[Parity]:
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
    write_export_config(
        out_dir, kind="vision_encoder", precision="fp32", source=source,
        inputs={names.PIXEL_VALUES: {"dtype": "FP32", "shape": ["batch", 3, s, s]}},
        outputs={names.IMAGE_EMBEDS: {"dtype": "FP32", "shape": ["batch", cfg.num_image_tokens, cfg.llm_hidden_size]}},
        parity=results, onnx_file=names.VISION_ONNX, num_image_tokens=cfg.num_image_tokens,
        hidden_size=cfg.llm_hidden_size, image_size=s,
    )
    return results

