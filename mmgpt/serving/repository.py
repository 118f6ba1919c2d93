"""Assemble the served Triton model repository from the templates in `model_repository/` and an export.

    repo = assemble_repository("artifacts/export", "artifacts/triton_repo", max_image_pixels=10_000_000)

Each `config.pbtxt` template is filled (unknown or missing keys fail) with the export directory, the
venv the Python backend runs in (EXECUTION_ENV_PATH), the limits and the batching settings; `1/model.py`
is copied; warm-up samples are written where a model's `model_warmup` reads them. The result replaces
`repo_dir` whole, so nothing stale survives a re-assembly.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmgpt import names
from mmgpt.config import MMGPTConfig
from mmgpt.preprocess import Limits
from mmgpt.serving import contract as c
from mmgpt.serving.tritonserver import execution_env_path, fill_template

TEMPLATES = Path(__file__).resolve().parents[2] / "model_repository"
MARKER = ".mmgpt-repository"  # only a directory carrying it is ever replaced
WARMUP_PROMPT = "Hello"


class ExportMissingError(FileNotFoundError):
    """The export directory lacks what the models load."""


@dataclass(frozen=True)
class ServeSettings:
    """What the served repository is filled with. Every field becomes a config.pbtxt value."""

    llm_model_name: str = c.LLM
    # False: leave the LLM out and serve TensorRT-LLM's `tensorrt_llm` (or another model with its
    # interface) under llm_model_name next to this repository's models.
    include_llm: bool = True
    prompt_embedding_table_data_type: str = "TYPE_FP32"
    max_image_bytes: int = Limits.max_image_bytes
    max_image_pixels: int = Limits.max_image_pixels
    max_audio_bytes: int = Limits.max_audio_bytes
    max_audio_seconds: float = Limits.max_audio_seconds
    max_audio_sample_rate: int = Limits.max_audio_sample_rate  # read from the header, before decoding
    max_audio_channels: int = Limits.max_audio_channels
    max_audio_decoded_bytes: int = Limits.max_audio_decoded_bytes
    max_tokens_limit: int | None = None  # None: mmgpt ask's limit (mmgpt.inference.MAX_TOKENS_LIMIT)
    llm_max_batch_size: int = 8  # sequences decoded together (in-flight batching)
    # keys/values of finished sequences kept for later requests that start the same way (a conversation's
    # next turn, a shared system prompt); 0 = off. A Phi-2 token costs 640 KiB in fp32.
    llm_prefix_cache_mb: int = 1024
    # a shared-KV decoder reads new prompts at most this many tokens an iteration, so running answers wait
    # for one chunk, not for a whole long prompt (the traced decoder prefills whole prompts)
    llm_prefill_chunk_tokens: int = 256
    # keys/values the running sequences may grow to (rows x the longest prompt + max_tokens); requests past it
    # wait, at most llm_queue_timeout_s and llm_max_queue of them, then get a "busy" error. 0 = no budget.
    # 4 GiB holds ~6,500 Phi-2 tokens in fp32 (e.g. 8 conversations of ~800 tokens).
    llm_kv_budget_mb: int = 4096
    llm_queue_timeout_s: float = 60.0
    llm_max_queue: int = 256
    entry_instances: int = 8  # requests the entry point answers at once (one per instance)
    entry_max_queue: int = 64  # requests waiting for an instance; more are refused at once (busy)
    entry_queue_timeout_s: float = 60.0  # the longest a request waits for an instance before it is refused (busy)
    vision_max_batch_size: int = 8
    vision_max_queue_delay_us: int = 2000
    vision_cache_mb: int = 256  # image embeddings kept by content (a repeated image is not encoded again); 0 = off
    ort_threads: int = 0  # intra-op threads per ONNX Runtime session; 0 = all cores
    response_timeout_s: float = 300.0
    request_deadline_s: float = 600.0  # a whole request; past it the LLM stops and the client gets an error
    min_answer_tokens: int = 64  # an over-long conversation loses its oldest turns until this much room is left
    max_history_bytes: int = 1 << 20
    max_history_messages: int = 256
    execution_env: str | None = None  # the venv the Python backend runs in; None: this one

    def __post_init__(self) -> None:
        if self.prompt_embedding_table_data_type not in c.TABLE_DTYPES:
            raise ValueError(f"prompt_embedding_table_data_type must be one of {sorted(c.TABLE_DTYPES)}")
        if self.include_llm and self.prompt_embedding_table_data_type != "TYPE_FP32":
            raise ValueError("the ONNX Runtime llm model takes an FP32 prompt table")
        for name in ("max_image_bytes", "max_image_pixels", "max_audio_bytes", "llm_max_batch_size", "vision_max_batch_size",
                     "entry_instances", "llm_prefill_chunk_tokens", "max_audio_sample_rate", "max_audio_channels",
                     "max_audio_decoded_bytes", "min_answer_tokens", "max_history_bytes", "max_history_messages",
                     "llm_max_queue", "entry_max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.vision_cache_mb < 0 or self.llm_prefix_cache_mb < 0 or self.llm_kv_budget_mb < 0:
            raise ValueError("vision_cache_mb, llm_prefix_cache_mb and llm_kv_budget_mb must be >= 0 (0 = off)")
        if self.llm_queue_timeout_s <= 0 or self.entry_queue_timeout_s <= 0:
            raise ValueError("llm_queue_timeout_s and entry_queue_timeout_s must be > 0")
        if self.max_audio_seconds <= 0 or self.response_timeout_s <= 0 or self.request_deadline_s <= 0:
            raise ValueError("max_audio_seconds, response_timeout_s and request_deadline_s must be > 0")


def check_export(export_dir: str | Path) -> Path:
    """The export directory, resolved; raises ExportMissingError saying to run `make export`."""
    d = Path(export_dir).resolve()
    needed = [
        d / "mmgpt_config.json",
        d / names.TOKENIZER_DIR,
        d / names.VISION_DIR / names.VISION_ONNX,
        d / names.VISION_DIR / names.EXPORT_CONFIG,
        d / names.LLM_DIR / names.EXPORT_CONFIG,
        d / names.LLM_DIR / names.LLM_EMBED,
        d / names.WHISPER_DIR / names.WHISPER_ENCODER_ONNX,
        d / names.WHISPER_DIR / names.WHISPER_DECODER_ONNX,
        d / names.WHISPER_DIR / names.WHISPER_DECODER_PAST_ONNX,
    ]
    missing = [str(p.relative_to(d)) for p in needed if not p.exists()]
    if missing:
        raise ExportMissingError(
            f"no complete export in {d} (missing: {', '.join(missing)}): run `make export` first "
            f"(or `python -m mmgpt.export --out {export_dir}`)"
        )
    return d


def assemble_repository(export_dir: str | Path, repo_dir: str | Path, **settings) -> Path:
    """Write the served repository for `export_dir` into `repo_dir` (replaced whole); returns it resolved.

    `settings` are the fields of ServeSettings (an unknown one is a TypeError).
    """
    s = ServeSettings(**settings)
    export = check_export(export_dir)
    repo = Path(repo_dir).resolve()
    if repo.exists() and any(repo.iterdir()) and not (repo / MARKER).exists():
        raise FileExistsError(f"{repo} exists and was not made by assemble_repository: refusing to replace it")
    if not TEMPLATES.is_dir():
        raise FileNotFoundError(f"model repository templates not found at {TEMPLATES}")
    if s.max_tokens_limit is None:
        from mmgpt.inference import MAX_TOKENS_LIMIT

        s = dataclasses.replace(s, max_tokens_limit=MAX_TOKENS_LIMIT)
    config = MMGPTConfig.load(export)
    env = str(Path(s.execution_env).resolve() if s.execution_env else execution_env_path())
    common = {"execution_env": env, "export_dir": str(export)}
    values = {
        c.MULTIMODAL: {
            **common,
            "llm_model_name": s.llm_model_name,
            "prompt_embedding_table_data_type": s.prompt_embedding_table_data_type,
            "max_image_bytes": s.max_image_bytes,
            "max_image_pixels": s.max_image_pixels,
            "max_tokens_limit": s.max_tokens_limit,
            "response_timeout_s": s.response_timeout_s,
            "request_deadline_s": s.request_deadline_s,
            "min_answer_tokens": s.min_answer_tokens,
            "max_history_bytes": s.max_history_bytes,
            "max_history_messages": s.max_history_messages,
            "entry_instances": s.entry_instances,
            "entry_max_queue": s.entry_max_queue,
            "entry_queue_timeout_us": int(s.entry_queue_timeout_s * 1e6),
        },
        c.VISION: {
            **common,
            "vision_max_batch_size": s.vision_max_batch_size,
            "vision_max_queue_delay_us": s.vision_max_queue_delay_us,
            "vision_cache_mb": s.vision_cache_mb,
            "image_size": config.image_size,
            "num_image_tokens": config.num_image_tokens,
            "llm_hidden_size": config.llm_hidden_size,
            "ort_threads": s.ort_threads,
        },
        c.WHISPER: {
            **common,
            "max_audio_bytes": s.max_audio_bytes,
            "max_audio_seconds": s.max_audio_seconds,
            "max_audio_sample_rate": s.max_audio_sample_rate,
            "max_audio_channels": s.max_audio_channels,
            "max_audio_decoded_bytes": s.max_audio_decoded_bytes,
            "ort_threads": s.ort_threads,
        },
    }
    warmup_ids = _warmup_prompt(export)
    if s.include_llm:
        values[c.LLM] = {
            **common,
            "llm_model_name": s.llm_model_name,
            "llm_max_batch_size": s.llm_max_batch_size,
            "llm_prefix_cache_mb": s.llm_prefix_cache_mb,
            "llm_prefill_chunk_tokens": s.llm_prefill_chunk_tokens,
            "llm_kv_budget_mb": s.llm_kv_budget_mb,
            "llm_queue_timeout_s": s.llm_queue_timeout_s,
            "llm_max_queue": s.llm_max_queue,
            "prompt_embedding_table_data_type": s.prompt_embedding_table_data_type,
            "ort_threads": s.ort_threads,
            "warmup_prompt_tokens": len(warmup_ids),
        }

    repo.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{repo.name}-", dir=repo.parent))
    try:
        for template, vals in values.items():
            served = s.llm_model_name if template == c.LLM else template
            src = TEMPLATES / template
            dst = staging / served
            (dst / "1").mkdir(parents=True)
            (dst / "config.pbtxt").write_text(fill_template((src / "config.pbtxt").read_text(), vals))
            shutil.copy2(src / "1" / "model.py", dst / "1" / "model.py")
        _write_warmup(staging, s, warmup_ids)
        (staging / MARKER).write_text(f"assembled from {export}\n")
        if repo.exists():
            old = repo.with_name(f".{repo.name}-old-{staging.name[-8:]}")
            repo.rename(old)
            staging.rename(repo)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(repo)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return repo


# ------------------------------------------------------------------------------------------------
# Warm-up samples (Triton's model_warmup reads raw little-endian tensors from <model>/warmup/)
# ------------------------------------------------------------------------------------------------


def _warmup_prompt(export: Path) -> list[int]:
    from transformers import AutoTokenizer

    from mmgpt.template import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(export / names.TOKENIZER_DIR)
    return prompt_ids(MMGPTConfig.load(export), tokenizer, [], WARMUP_PROMPT, has_image=False)


def _bytes_element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data  # Triton's serialisation of one BYTES element


def silent_wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * rate), np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _write_warmup(repo: Path, s: ServeSettings, prompt: list[int]) -> None:
    whisper = repo / c.WHISPER / "warmup"
    whisper.mkdir()
    (whisper / c.AUDIO_INPUT).write_bytes(_bytes_element(silent_wav()))
    if s.include_llm:
        llm = repo / s.llm_model_name / "warmup"
        llm.mkdir()
        (llm / c.INPUT_IDS).write_bytes(np.asarray(prompt, "<i4").tobytes())
        (llm / c.INPUT_LENGTHS).write_bytes(np.asarray([len(prompt)], "<i4").tobytes())
        (llm / c.REQUEST_OUTPUT_LEN).write_bytes(np.asarray([4], "<i4").tobytes())
