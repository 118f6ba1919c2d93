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


class EmbeddingCache:
    """Image embeddings by a hash of the image's pixel values, least recently used out first, bounded in bytes.

    A conversation sends its image with every turn, and a popular image comes back from many users: each
    repeat would cost a whole vision-encoder run (ViT-L/14-336: ~1 s on 2 cores) for the same rows. The key is
    the preprocessed pixels (the same file always preprocesses to the same pixels), so the cache sits beside
    the one encoder every entry-point instance calls. `max_bytes` 0 turns it off.
    """

    def __init__(self, max_bytes: int):
        from collections import OrderedDict

        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> np.ndarray | None:
        found = self.entries.get(key)
        if found is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return found

    def put(self, key: bytes, embeds: np.ndarray) -> None:
        if embeds.nbytes > self.max_bytes or key in self.entries:
            return
        embeds = embeds.copy()  # a row of a batch's output would keep the whole batch alive
        embeds.setflags(write=False)  # shared by every request that hits it
        self.entries[key] = embeds
        self.bytes += embeds.nbytes
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes


class VisionStage:
    """Pixel values -> projected image embeddings, several requests per ONNX Runtime call; images seen
    recently come from the cache without an encoder run."""

    def __init__(self, export_dir: str | Path, threads: int = 0, cache_bytes: int = 0):
        from mmgpt.runtime import OrtVision

        self.encoder = OrtVision(Path(export_dir) / names.VISION_DIR, _threads(threads))
        self.cache = EmbeddingCache(cache_bytes)
        self.encoded = 0  # images run through the encoder

    def encode_batches(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """One (b_i, 3, S, S) array per request -> one (b_i, N, D) array per request; the images not in
        the cache are encoded together in one run."""
        images = [img for b in batches for img in b]
        from mmgpt.serving.llm import content_key

        keys = [content_key(img) for img in images]
        found = [self.cache.get(k) for k in keys]
        todo: dict[bytes, list[int]] = {}  # the same new image twice in one batch is encoded once
        for i, f in enumerate(found):
            if f is None:
                todo.setdefault(keys[i], []).append(i)
        if todo:
            first = [positions[0] for positions in todo.values()]
            fresh = self.encoder(np.stack([images[i] for i in first]).astype(np.float32, copy=False))  # (n, N, D)
            self.encoded += len(first)
            for (key, positions), embeds in zip(todo.items(), fresh):
                self.cache.put(key, embeds)
                for i in positions:
                    found[i] = embeds
        out, start = [], 0
        for b in batches:
            out.append(np.stack(found[start:start + b.shape[0]]))
            start += b.shape[0]
        return out


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

        from mmgpt.runtime import llm_model

        export_dir = Path(export_dir)
        self.config = MMGPTConfig.load(export_dir)
        self.model = llm_model(export_dir / names.LLM_DIR, _threads(threads))
        # Ids past the tokenizer (padding rows of the embedding table) are never sampled, as in `mmgpt ask`.
        self.vocab_limit = len(AutoTokenizer.from_pretrained(export_dir / names.TOKENIZER_DIR))

    def parse(self, inputs, request_id: str):
        from mmgpt.serving.llm import parse_request

        return parse_request(
            inputs, request_id, vocab_size=self.model.vocab_size, hidden_size=self.model.embed_table.shape[1],
            max_context=self.config.max_context, default_end_id=self.config.eos_token_id,
            default_pad_id=self.config.pad_token_id,
        )

    def batcher(self, max_batch: int, on_iteration=None, prefix_cache_bytes: int = 0, prefill_chunk: int = 256,
                **admission):
        """An InflightBatcher over this model; `admission`: kv_budget_bytes, queue_timeout_s, max_queue."""
        from mmgpt.serving.llm import InflightBatcher

        return InflightBatcher(
            self.model, max_batch=max_batch, vocab_limit=self.vocab_limit, max_context=self.config.max_context,
            on_iteration=on_iteration, prefix_cache_bytes=prefix_cache_bytes, prefill_chunk=prefill_chunk, **admission,
        )
