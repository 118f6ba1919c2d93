"""Names of the served models, their tensors and config parameters, defined once.

The config.pbtxt templates in `model_repository/` spell these names out (a pbtxt file cannot import),
and `tests/test_serving_repository.py` checks every template against this module, so a rename here
that is not made there fails a test instead of a request.

The `llm` model's tensors follow TensorRT-LLM's `tensorrt_llm` model (tensorrtllm_backend,
all_models/inflight_batcher_llm), so a GPU host can point the entry point at the real one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mmgpt import names

# --- models --------------------------------------------------------------------------------------
MULTIMODAL = "multimodal"  # the entry point clients call
LLM = "llm"  # default name of the LLM model the entry point calls (a config parameter)
VISION = "vision_encoder"
WHISPER = "whisper"
MODELS = (MULTIMODAL, LLM, VISION, WHISPER)

# --- entry point `multimodal` (decoupled, max_batch_size 0, every dim [1] unless noted) -----------
TEXT_INPUT = "text_input"  # BYTES, required (may be empty when audio carries the question)
IMAGE_INPUT = "image_input"  # BYTES: an encoded JPEG/PNG/WebP/BMP file
AUDIO_INPUT = "audio_input"  # BYTES: an encoded WAV/FLAC/OGG file
HISTORY = "history"  # BYTES: JSON list of {"role", "content"}, oldest first
MAX_TOKENS = "max_tokens"  # INT32
TEMPERATURE = "temperature"  # FP32
TOP_P = "top_p"  # FP32
TOP_K = "top_k"  # INT32
SEED = "seed"  # UINT64
STOP_WORDS = "stop_words"  # BYTES [-1]
STREAM = "stream"  # BOOL
TEXT_OUTPUT = "text_output"  # BYTES
TRANSCRIPT = "transcript"  # BYTES (also the whisper model's output)
# INT32: how many of the oldest history messages were left out to fit the context (first response; else 0)
HISTORY_DROPPED = "history_dropped"
# On the last response (0 / "" before): tokens in the prompt the model read (image positions included),
# tokens it generated, and why it stopped: "stop" (its end token or a stop word) or "length" (max_tokens or
# the context). What an OpenAI-style `usage` and `finish_reason` are made of.
PROMPT_TOKENS = "prompt_tokens"  # INT32
COMPLETION_TOKENS = "completion_tokens"  # INT32
FINISH_REASON = "finish_reason"  # BYTES
# The entry point's error for bad input begins with this. Triton's gRPC stream carries an error's message but
# not its status code, so this is how a client tells "your input" (HTTP 400) from a server failure.
INVALID_INPUT_PREFIX = "invalid input: "

ENTRY_INPUTS: dict[str, tuple[str, list[int], bool]] = {  # name -> (Triton type, dims, optional)
    TEXT_INPUT: ("TYPE_STRING", [1], False),
    IMAGE_INPUT: ("TYPE_STRING", [1], True),
    AUDIO_INPUT: ("TYPE_STRING", [1], True),
    HISTORY: ("TYPE_STRING", [1], True),
    MAX_TOKENS: ("TYPE_INT32", [1], True),
    TEMPERATURE: ("TYPE_FP32", [1], True),
    TOP_P: ("TYPE_FP32", [1], True),
    TOP_K: ("TYPE_INT32", [1], True),
    SEED: ("TYPE_UINT64", [1], True),
    STOP_WORDS: ("TYPE_STRING", [-1], True),
    STREAM: ("TYPE_BOOL", [1], True),
}
ENTRY_OUTPUTS: dict[str, tuple[str, list[int]]] = {
    TEXT_OUTPUT: ("TYPE_STRING", [1]),
    TRANSCRIPT: ("TYPE_STRING", [1]),
    HISTORY_DROPPED: ("TYPE_INT32", [1]),
    PROMPT_TOKENS: ("TYPE_INT32", [1]),
    COMPLETION_TOKENS: ("TYPE_INT32", [1]),
    FINISH_REASON: ("TYPE_STRING", [1]),
}

# --- vision_encoder (max_batch_size > 0, dynamic batching) ----------------------------------------
PIXEL_VALUES = names.PIXEL_VALUES  # FP32 [3, S, S] per item
IMAGE_EMBEDS = names.IMAGE_EMBEDS  # FP32 [N, D] per item

# --- whisper (max_batch_size 0) -------------------------------------------------------------------
# input AUDIO_INPUT BYTES [1], output TRANSCRIPT BYTES [1]

# --- llm: TensorRT-LLM's `tensorrt_llm` interface (max_batch_size > 0: every tensor has a batch dim) -
INPUT_IDS = "input_ids"  # INT32 [-1]; ids >= vocab size address rows of prompt_embedding_table
INPUT_LENGTHS = "input_lengths"  # INT32 [1]
REQUEST_OUTPUT_LEN = "request_output_len"  # INT32 [1]: most new tokens
END_ID = "end_id"  # INT32 [1]
PAD_ID = "pad_id"  # INT32 [1]
STREAMING = "streaming"  # BOOL [1]
LLM_TEMPERATURE = "temperature"  # FP32 [1]
RUNTIME_TOP_K = "runtime_top_k"  # INT32 [1]
RUNTIME_TOP_P = "runtime_top_p"  # FP32 [1]
RANDOM_SEED = "random_seed"  # UINT64 [1]
STOP = "stop"  # BOOL [1]: true = stop the running request with the same request id
PROMPT_EMBEDDING_TABLE = "prompt_embedding_table"  # [-1, -1] = (N, D); dtype is a config setting
PROMPT_VOCAB_SIZE = "prompt_vocab_size"  # INT32 [1] = N
OUTPUT_IDS = "output_ids"  # INT32 [-1, -1] = (beam 1, new tokens)
SEQUENCE_LENGTH = "sequence_length"  # INT32 [-1] = (beam 1,): tokens in output_ids
# Not in TensorRT-LLM: a request's failure as text. Triton 2.51's BLS iterator drops an inner model's
# error responses, so an error sent the usual way would reach the entry point as a silent, empty answer.
LLM_ERROR = "error"  # BYTES [1]
# Written by our llm model into its model directory at startup: the entry point checks that this process is
# still alive while it waits for tokens (a killed process never answers; see multimodal.ResponsePump).
LLM_PID_FILE = "process.pid"
# A request parameter (not a tensor: TensorRT-LLM's backend ignores parameters it does not know) with which
# our entry point tells our llm model which process waits for the tokens (see llm.RequesterQueues).
REQUESTER_PID = "mmgpt_requester_pid"
# Written by the launcher at the repository's root when it stops the server: the entry point then refuses
# new requests while the running ones finish with every model still serving (see TritonServer.stop).
from mmgpt.serving.tritonserver import DRAIN_FILE, ENTRY_BUSY_DIR  # noqa: E402,F401 (defined with the drain)

LLM_INPUTS: dict[str, tuple[str, list[int], bool]] = {
    INPUT_IDS: ("TYPE_INT32", [-1], False),
    INPUT_LENGTHS: ("TYPE_INT32", [1], False),
    REQUEST_OUTPUT_LEN: ("TYPE_INT32", [1], False),
    END_ID: ("TYPE_INT32", [1], True),
    PAD_ID: ("TYPE_INT32", [1], True),
    STREAMING: ("TYPE_BOOL", [1], True),
    LLM_TEMPERATURE: ("TYPE_FP32", [1], True),
    RUNTIME_TOP_K: ("TYPE_INT32", [1], True),
    RUNTIME_TOP_P: ("TYPE_FP32", [1], True),
    RANDOM_SEED: ("TYPE_UINT64", [1], True),
    STOP: ("TYPE_BOOL", [1], True),
    PROMPT_EMBEDDING_TABLE: ("${prompt_embedding_table_data_type}", [-1, -1], True),
    PROMPT_VOCAB_SIZE: ("TYPE_INT32", [1], True),
}
LLM_OUTPUTS: dict[str, tuple[str, list[int]]] = {
    OUTPUT_IDS: ("TYPE_INT32", [-1, -1]),
    SEQUENCE_LENGTH: ("TYPE_INT32", [-1]),
    LLM_ERROR: ("TYPE_STRING", [1]),
}

# Triton type names <-> numpy, for the prompt table whose dtype is a setting (FP32 here, FP16/BF16 for
# a TensorRT-LLM engine).
TABLE_DTYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16}


def parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """The `parameters` of a model config (as Triton hands it to `initialize`) as plain strings."""
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


def first(array: np.ndarray | None) -> Any:
    """The single element of a [1] (or batched [1, 1]) tensor, or None for an omitted input."""
    if array is None:
        return None
    flat = np.asarray(array).reshape(-1)
    return flat[0] if flat.size else None


def one_bytes(value: str | bytes) -> np.ndarray:
    """A BYTES [1] tensor."""
    return np.array([value.encode("utf-8") if isinstance(value, str) else value], dtype=np.object_)
