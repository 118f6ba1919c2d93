"""The logic of the `vision_encoder`, `whisper` and `llm` models over an export directory.

Each model.py builds one of these in `initialize` and calls it from `execute`; tests build them
directly. Preprocessing, Whisper's decoding loop and the sampler are the ones `mmgpt ask` uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmgpt import names
from mmgpt.config import MMGPTConfig
from mmgpt.preprocess import Limits, audio_features, load_audio


def _threads(threads: int) -> int | None:
    return threads or None  # 0 = ONNX Runtime's default (all cores)


class VisionStage:
    """Pixel values -> projected image embeddings, several requests per ONNX Runtime call."""

    def __init__(self, export_dir: str | Path, threads: int = 0):
        from mmgpt.runtime import OrtVision

        self.encoder = OrtVision(Path(export_dir) / names.VISION_DIR, _threads(threads))

    def encode_batches(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """One (b_i, 3, S, S) array per request -> one (b_i, N, D) array per request, in one run."""
        sizes = [b.shape[0] for b in batches]
        out = self.encoder(np.concatenate(batches).astype(np.float32, copy=False))  # (sum b_i, N, D)
        return np.split(out, np.cumsum(sizes)[:-1])


class WhisperStage:
    """Encoded audio bytes -> transcript, with the limits in force (InputError names a bad input)."""

    def __init__(self, export_dir: str | Path, limits: Limits, threads: int = 0):
        from transformers import AutoTokenizer, WhisperFeatureExtractor

        from mmgpt.runtime import OrtWhisper

        export_dir = Path(export_dir)
        wdir = export_dir / names.WHISPER_DIR
        self.config = MMGPTConfig.load(export_dir)
        self.limits = limits
        self.decoder = OrtWhisper(wdir, _threads(threads))
        self.feature_extractor = WhisperFeatureExtractor.from_pretrained(wdir)
        self.tokenizer = AutoTokenizer.from_pretrained(wdir)

    def transcribe(self, audio: bytes) -> str:
        from mmgpt.speech import transcribe

        features = audio_features(load_audio(audio, self.limits), self.feature_extractor)
        return transcribe(self.decoder, features, self.config.speech, self.tokenizer)


class LLMStage:
    """The exported decoder and what its requests are checked against."""

    def __init__(self, export_dir: str | Path, threads: int = 0):
        from transformers import AutoTokenizer

        from mmgpt.runtime import OrtLLMModel

        export_dir = Path(export_dir)
        self.config = MMGPTConfig.load(export_dir)
        self.model = OrtLLMModel(export_dir / names.LLM_DIR, _threads(threads))
        # Ids past the tokenizer (padding rows of the embedding table) are never sampled, as in `mmgpt ask`.
        self.vocab_limit = len(AutoTokenizer.from_pretrained(export_dir / names.TOKENIZER_DIR))

    def parse(self, inputs, request_id: str):
        from mmgpt.serving.llm import parse_request

        return parse_request(
            inputs, request_id, vocab_size=self.model.vocab_size, hidden_size=self.model.embed_table.shape[1],
            max_context=self.config.max_context, default_end_id=self.config.eos_token_id,
            default_pad_id=self.config.pad_token_id,
        )

    def batcher(self, max_batch: int, on_iteration=None):
        from mmgpt.serving.llm import InflightBatcher

        return InflightBatcher(
            self.model, max_batch=max_batch, vocab_limit=self.vocab_limit, max_context=self.config.max_context,
            on_iteration=on_iteration,
        )
