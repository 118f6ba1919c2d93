"""GPU builds: the vision ONNX -> TensorRT engine (fp16, batch profile; ONNX Runtime's TensorRT provider,
which the served vision encoder then loads) and Phi-2 -> TensorRT-LLM engine. They run only where a CUDA
GPU and NVIDIA's tools exist; elsewhere they stop with a message."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from mmgpt import names


class GPUUnavailable(RuntimeError):
    pass


def require_gpu(what: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise GPUUnavailable(f"{what} needs a CUDA GPU and none is visible on this machine; the ONNX files run on CPU as they are")


def build_vision_trt(export_dir: Path, max_batch: int = 8) -> Path:
    """Build the vision encoder's TensorRT engine (fp16, batch 1..max_batch) into the engine cache that the
    served `vision_encoder` loads (mmgpt.runtime.vision_providers), and check it against the CPU."""
    require_gpu("the TensorRT vision engine")
    import numpy as np
    import onnxruntime as ort

    from mmgpt.runtime import OrtVision, read_export_config, vision_providers

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        raise GPUUnavailable("ONNX Runtime's TensorRT provider is missing: install onnxruntime-gpu with TensorRT "
                             "(NVIDIA's containers have it)")
    vision_dir = export_dir / names.VISION_DIR
    gpu = OrtVision(vision_dir)  # building the session builds and caches the engine
    if gpu.session.get_providers()[0] != "TensorrtExecutionProvider":
        raise RuntimeError(f"the vision session did not take TensorRT: {gpu.session.get_providers()}")
    size = read_export_config(vision_dir).get("image_size", 224)
    pixels = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    cpu = ort.InferenceSession(str(vision_dir / names.VISION_ONNX), providers=["CPUExecutionProvider"])
    diff = float(np.abs(gpu(pixels) - cpu.run(None, {names.PIXEL_VALUES: pixels})[0]).max())
    print(f"[gpu] vision TensorRT fp16 vs CPU fp32: max|diff| = {diff:.3e}", flush=True)
    assert vision_providers(vision_dir, ort.get_available_providers(), max_batch)
    return vision_dir / names.VISION_TRT_CACHE


# TensorRT-LLM's documented conversion (its Phi example's convert_checkpoint.py is a command line over these
# two calls): the model class reads a Hugging Face folder and writes a TensorRT-LLM checkpoint. Run with the
# container's Python, so it works whether or not the examples folder is there.
CONVERT_PHI = (
    "import sys\n"
    "from tensorrt_llm.mapping import Mapping\n"
    "from tensorrt_llm.models import PhiForCausalLM\n"
    "model_dir, out_dir, dtype = sys.argv[1:4]\n"
    "PhiForCausalLM.from_hugging_face(model_dir, dtype, mapping=Mapping(world_size=1, rank=0, tp_size=1, pp_size=1))"
    ".save_checkpoint(out_dir, save_config=True)\n"
)


def trtllm_commands(checkpoint_llm_dir: Path, out: Path, *, max_batch: int = 8, max_input_len: int = 1024,
                    max_output_len: int = 512, max_prompt_embedding_table_size: int = 8 * 576,
                    python: str = "python3") -> list[list[str]]:
    """The two commands of a TensorRT-LLM build: HF Phi -> TensorRT-LLM checkpoint (fp16), then trtllm-build
    with a prompt table (our image rows) enabled."""
    ckpt = out / "checkpoint"
    return [
        [python, "-c", CONVERT_PHI, str(checkpoint_llm_dir), str(ckpt), "float16"],
        ["trtllm-build", "--checkpoint_dir", str(ckpt), "--output_dir", str(out / "engine"),
         "--gemm_plugin", "float16", "--max_batch_size", str(max_batch), "--max_input_len", str(max_input_len),
         "--max_seq_len", str(max_input_len + max_output_len),
         "--max_prompt_embedding_table_size", str(max_prompt_embedding_table_size)],
    ]


def build_trtllm(checkpoint_llm_dir: Path, export_dir: Path, **limits) -> Path:
    """Run `trtllm_commands` inside NVIDIA's TensorRT-LLM container -> the engine folder."""
    require_gpu("the TensorRT-LLM engine")
    if shutil.which("trtllm-build") is None:
        raise GPUUnavailable("trtllm-build not found: run inside NVIDIA's TensorRT-LLM container (see README)")
    out = export_dir / names.TRTLLM_DIR
    for command in trtllm_commands(checkpoint_llm_dir, out, **limits):
        subprocess.run(command, check=True)
    return out / "engine"
