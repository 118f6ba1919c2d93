"""Whisper speech-to-text with one greedy decoding loop for every runtime (PyTorch, ONNX Runtime).

The transcript joins the user's question (see `join_question`), so it must be the same wherever the
model runs: runtimes implement `WhisperDecoder`, the loop and its suppress rules live here.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from mmgpt.config import SpeechConfig


class WhisperDecoder(Protocol):
    def encode(self, input_features: np.ndarray) -> None:
        """(1, n_mels, 3000) log-mel features; resets the decoder state."""

    def step(self, new_ids: list[int]) -> np.ndarray:
        """Feed new decoder tokens (the whole prompt first, then one at a time) -> last logits (V,)."""


def transcribe_ids(decoder: WhisperDecoder, input_features: np.ndarray, speech: SpeechConfig) -> list[int]:
    decoder.encode(input_features)
    logits = decoder.step(list(speech.prompt_ids))
    out: list[int] = []
    for i in range(speech.max_tokens):
        logits = np.asarray(logits, dtype=np.float64).copy()
        if speech.suppress_ids:
            logits[list(speech.suppress_ids)] = -np.inf
        if i == 0 and speech.begin_suppress_ids:
            logits[list(speech.begin_suppress_ids)] = -np.inf
        token = int(np.argmax(logits))
        if token == speech.eot_id:
            break
        out.append(token)
        if i + 1 < speech.max_tokens:
            logits = decoder.step([token])
    return out


def transcribe(decoder: WhisperDecoder, input_features: np.ndarray, speech: SpeechConfig, tokenizer) -> str:
    return tokenizer.decode(transcribe_ids(decoder, input_features, speech), skip_special_tokens=True).strip()


class TorchWhisper:
    """The PyTorch reference runtime for `WhisperDecoder`."""

    def __init__(self, model):
        self.model = model
        self.encoder_out = None
        self.cache = None

    @torch.no_grad()
    def encode(self, input_features: np.ndarray) -> None:
        from transformers import DynamicCache, EncoderDecoderCache

        feats = torch.from_numpy(input_features).to(self.model.device, self.model.dtype)
        self.encoder_out = self.model.model.encoder(input_features=feats).last_hidden_state
        self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())

    @torch.no_grad()
    def step(self, new_ids: list[int]) -> np.ndarray:
        ids = torch.tensor([new_ids], device=self.model.device)
        out = self.model(
            encoder_outputs=(self.encoder_out,), decoder_input_ids=ids, past_key_values=self.cache, use_cache=True
        )
        self.cache = out.past_key_values
        return out.logits[0, -1].float().cpu().numpy()
