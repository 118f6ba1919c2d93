"""Tensor and file names, defined once: the export code, the ONNX Runtime wrappers and the Triton
model configs all read them from here."""

from __future__ import annotations

# --- export directory layout (`make export` -> artifacts/export) ---------------------------------
EXPORT_CONFIG = "export_config.json"  # in every engine dir: precision, tensor names/shapes, source, versions
VISION_DIR = "vision"
VISION_ONNX = "encoder.onnx"
VISION_INT8_ONNX = "encoder.int8.onnx"  # `make export INT8=1`: int8 MatMul/Gemm weights, served instead on a CPU
VISION_TRT_CACHE = "tensorrt"  # in the vision dir: ONNX Runtime's TensorRT engine cache (`export --gpu`)
LLM_DIR = "llm"
LLM_ONNX = "decoder.onnx"
LLM_INT8_ONNX = "decoder.int8.onnx"  # `make export INT8=1`: dynamic int8 quantization
LLM_INT4_ONNX = "decoder.int4.onnx"  # `make export INT4=1`: weight-only 4-bit (MatMulNBits)
LLM_SHARED_ONNX = "decoder.shared_kv.onnx"  # `make export KV=shared`: KV cache written in place (GQA)
LLM_EMBED = "embed_tokens.safetensors"  # (V, D) token embedding table, key EMBED_KEY
EMBED_KEY = "embed_tokens"
WHISPER_DIR = "whisper"
WHISPER_ENCODER_ONNX = "encoder_model.onnx"
WHISPER_DECODER_ONNX = "decoder_model.onnx"
WHISPER_DECODER_PAST_ONNX = "decoder_with_past_model.onnx"
WHISPER_FP32_ONNX = (WHISPER_ENCODER_ONNX, WHISPER_DECODER_ONNX, WHISPER_DECODER_PAST_ONNX)
# `make export INT8=1`: the same three with int8 weights (dynamic quantization), served instead
WHISPER_INT8_ONNX = {f: f.replace(".onnx", ".int8.onnx") for f in WHISPER_FP32_ONNX}
TOKENIZER_DIR = "tokenizer"
TRTLLM_DIR = "trtllm"

# --- vision encoder: CLIP + projector ------------------------------------------------------------
PIXEL_VALUES = "pixel_values"  # (B, 3, S, S) float32
IMAGE_EMBEDS = "image_embeds"  # (B, N, D) float32: the prompt table rows

# --- LLM decoder with KV cache (optimum's naming) -------------------------------------------------
INPUTS_EMBEDS = "inputs_embeds"  # (B, T, D)
ATTENTION_MASK = "attention_mask"  # (B, P + T) int64, 1 = real token
POSITION_IDS = "position_ids"  # (B, T) int64
LOGITS = "logits"  # (B, 1, V): the last position's
# the shared-KV decoder (`make export KV=shared`): per-row lengths instead of a mask
SEQLENS_K = "seqlens_k"  # (B,) int32: tokens in each row after the call, minus one
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # () int32: max(seqlens_k) + 1


def past_key(i: int) -> str:
    return f"past_key_values.{i}.key"


def past_value(i: int) -> str:
    return f"past_key_values.{i}.value"


def present_key(i: int) -> str:
    return f"present.{i}.key"


def present_value(i: int) -> str:
    return f"present.{i}.value"
