"""Whisper speech-to-text with one greedy decoding loop for every runtime (PyTorch, ONNX Runtime).

The transcript joins the user's question (see `join_question`), so it must be the same wherever the
model runs: runtimes implement `WhisperDecoder`, the loop and its suppress rules live here, and so does
the one function that builds the decoder prompt (`make_speech_config`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import torch

from mmgpt.config import SpeechConfig

# Whisper's special tokens, spelled as in every Whisper tokenizer.
SOT = "<|startoftranscript|>"
SOT_PREV = "<|startofprev|>"
NO_TIMESTAMPS = "<|notimestamps|>"
TRANSCRIBE = "<|transcribe|>"
EOT = "<|endoftext|>"


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"the Whisper tokenizer has no {token} token")
    return token_id


def previous_text_ids(tokenizer, initial_prompt: str, max_positions: int = 448) -> list[int]:
    """<|startofprev|> + the prompt's tokens, as OpenAI's and faster-whisper's `initial_prompt`: a leading
    space, and only the last max_positions // 2 - 1 tokens (Whisper keeps half its positions for the
    transcript). Empty for an empty prompt."""
    text = initial_prompt.strip()
    if not text:
        return []
    tokens = tokenizer.encode(" " + text, add_special_tokens=False)
    return [_token_id(tokenizer, SOT_PREV), *tokens[-(max_positions // 2 - 1):]]


def start_ids(tokenizer, language: str | None) -> list[int]:
    """<|startoftranscript|> [<|language|> <|transcribe|>] <|notimestamps|>. language=None is for an
    English-only model (*.en), which has no language or task tokens in its start sequence."""
    ids = [_token_id(tokenizer, SOT)]
    if language is not None:
        ids += [_token_id(tokenizer, f"<|{language}|>"), _token_id(tokenizer, TRANSCRIBE)]
    return [*ids, _token_id(tokenizer, NO_TIMESTAMPS)]


def make_speech_config(
    tokenizer,
    *,
    initial_prompt: str = "",
    language: str | None = None,
    max_tokens: int = 224,
    max_positions: int = 448,
    suppress_ids: Iterable[int] = (),
    begin_suppress_ids: Iterable[int] = (),
) -> SpeechConfig:
    """The one way to build a SpeechConfig: the decoder prefix is computed from `initial_prompt` here.

    `max_positions` is the decoder's (config.max_target_positions); `max_tokens` is cut so the prefix
    plus the transcript fit in it."""
    prompt = previous_text_ids(tokenizer, initial_prompt, max_positions) + start_ids(tokenizer, language)
    room = max_positions - len(prompt)
    if room < 1:
        raise ValueError(f"a {len(prompt)}-token prompt leaves no room in {max_positions} decoder positions")
    return SpeechConfig(
        prompt_ids=tuple(prompt), eot_id=_token_id(tokenizer, EOT), max_tokens=min(max_tokens, room),
        suppress_ids=tuple(suppress_ids), begin_suppress_ids=tuple(begin_suppress_ids),
        initial_prompt=initial_prompt.strip(),
    )


def speech_config_for(source: str, initial_prompt: str = "", max_tokens: int = 224) -> SpeechConfig:
    """How the Whisper at `source` (a local folder or a hub id) is prompted and stopped, read from its own
    tokenizer, config.json and generation_config.json: English models start <|startoftranscript|>
    <|notimestamps|>, multilingual ones add <|en|><|transcribe|>. 224 = OpenAI's default sample length."""
    from transformers import AutoTokenizer, GenerationConfig, WhisperConfig

    try:
        config = WhisperConfig.from_pretrained(source)
        generation = GenerationConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ValueError(f"{source!r} is not a Whisper model (a folder with config.json, generation_config.json "
                         f"and a tokenizer, or a hub id): {e}") from None
    if config.model_type != "whisper":
        raise ValueError(f"{source!r} is a {config.model_type!r} model, not a Whisper")
    return make_speech_config(
        tokenizer, initial_prompt=initial_prompt, language="en" if getattr(generation, "is_multilingual", False) else None,
        max_tokens=max_tokens, max_positions=config.max_target_positions,
        suppress_ids=generation.suppress_tokens or (), begin_suppress_ids=generation.begin_suppress_tokens or (),
    )


def check_prompt(speech: SpeechConfig, tokenizer, max_positions: int = 448) -> None:
    """Raise ValueError unless `speech.prompt_ids` is `speech.initial_prompt` as previous text followed by a
    start sequence (<|startoftranscript|> ...): a config edited by hand must not say one prompt and feed another."""
    prev = previous_text_ids(tokenizer, speech.initial_prompt, max_positions)
    ids = list(speech.prompt_ids)
    if ids[: len(prev)] != prev or ids[len(prev): len(prev) + 1] != [_token_id(tokenizer, SOT)]:
        raise ValueError(
            f"speech.prompt_ids {ids} do not start with initial_prompt {speech.initial_prompt!r} as previous text "
            f"({prev}) and then {SOT}: rebuild the speech config with mmgpt.speech.make_speech_config"
        )
    if len(ids) + speech.max_tokens > max_positions:
        raise ValueError(f"{len(ids)} prompt + {speech.max_tokens} max_tokens exceed {max_positions} decoder positions")


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
    """Only generated tokens are decoded: the prompt (previous text included) never reaches the transcript."""
    return tokenizer.decode(transcribe_ids(decoder, input_features, speech), skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------------------- word error rate
_APOSTROPHES = re.compile(r"['\u2019]")
_PUNCTUATION = re.compile(r"[^\w\s]")


def normalize_words(text: str) -> list[str]:
    """The normalisation `word_error_rate` scores after: lowercase; apostrophes dropped ("what's" ->
    "whats"); every other character that is not a letter, digit, underscore or space becomes a space
    ("top-left." -> "top left"); whitespace collapsed. Numbers are not spelled out ("3" != "three")."""
    return _PUNCTUATION.sub(" ", _APOSTROPHES.sub("", text.lower())).split()


def _edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    row = list(range(len(hyp) + 1))  # Levenshtein over words, one row at a time
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def word_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus word error rate: (substitutions + deletions + insertions) summed over all pairs, divided by
    the number of reference words, after `normalize_words`. Can exceed 1 when hypotheses add words."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    ref_words = [normalize_words(r) for r in refs]
    total = sum(len(r) for r in ref_words)
    if total == 0:
        raise ValueError("the references hold no words")
    return sum(_edit_distance(r, normalize_words(h)) for r, h in zip(ref_words, hyps)) / total


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
