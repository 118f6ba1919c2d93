"""Decoding shared by every runtime: PyTorch (`mmgpt ask`), ONNX Runtime (export checks) and Triton.

A runtime only implements `LLMDecoder` (prefill a prompt, then step one token); the choice of the next
token, stopping and detokenization live here once, which is what makes served answers equal the
in-process reference token for token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from mmgpt.preprocess import InputError

MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """Greedy unless temperature > 0; a seed makes sampling reproducible."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None
    stop_words: tuple[str, ...] = field(default=())

    def validate(self, max_tokens_limit: int) -> None:
        if not 1 <= self.max_tokens <= max_tokens_limit:
            raise InputError(f"max_tokens must be between 1 and {max_tokens_limit}, got {self.max_tokens}")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not np.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"seed must be in [0, 2**64), got {self.seed}")
        if any(not isinstance(w, str) or not w for w in self.stop_words):
            raise InputError("stop_words must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class Sampler:
    """Picks the next token from logits. Holds the request's own RNG: no global random state."""

    def __init__(self, params: SamplingParams, vocab_limit: int):
        self.params = params
        self.vocab_limit = vocab_limit  # ids past the tokenizer (padding rows of the embedding) never come out
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float64)[: self.vocab_limit]
        if self.params.greedy:
            return int(np.argmax(logits))
        logits = logits / self.params.temperature
        if 0 < self.params.top_k < logits.size:
            kth = np.partition(logits, -self.params.top_k)[-self.params.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if self.params.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = cumulative - probs[order] < self.params.top_p  # the smallest set reaching top_p
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))


class LLMDecoder(Protocol):
    def prefill(self, input_ids: np.ndarray, prompt_table: np.ndarray | None) -> np.ndarray:
        """input_ids (T,) with image ids >= vocab size; prompt_table (N, D) or None -> last logits (V,)."""

    def step(self, token_id: int) -> np.ndarray:
        """Append one token (KV cache kept inside) -> its logits (V,)."""


def check_prompt(num_prompt_tokens: int, max_context: int) -> None:
    if num_prompt_tokens >= max_context:
        raise InputError(
            f"prompt is {num_prompt_tokens} tokens, over the context of {max_context}: shorten the question or the history"
        )


def generate_ids(
    decoder: LLMDecoder,
    input_ids: Sequence[int],
    prompt_table: np.ndarray | None,
    params: SamplingParams,
    *,
    eos_id: int,
    vocab_limit: int,
    max_context: int,
) -> Iterator[int]:
    """Yield new token ids until eos (not yielded), max_tokens, or the end of the context."""
    check_prompt(len(input_ids), max_context)
    sample = Sampler(params, vocab_limit)
    budget = min(params.max_tokens, max_context - len(input_ids))
    logits = decoder.prefill(np.asarray(input_ids, dtype=np.int64), prompt_table)
    for i in range(budget):
        token = sample(logits)
        if token == eos_id:
            return
        yield token
        if i + 1 < budget:
            logits = decoder.step(token)


class TextStream:
    """Token ids in, text pieces out: holds back incomplete UTF-8 and any tail that may begin a stop word.

    `push` returns the text that is now certain; `stopped` turns true when a stop word appeared (the stop
    word itself is never emitted); `finish` returns what was held back at the end.
    """

    def __init__(self, tokenizer, stop_words: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_words = tuple(stop_words)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned
        self.stopped = False
        self._first = True

    def _text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return text[1:] if text.startswith(" ") else text  # the template puts one space after "Assistant:"

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self._text()
        if text.endswith("\ufffd"):  # a multi-byte character is split across tokens: wait
            return ""
        for word in self.stop_words:
            at = text.find(word)
            if at != -1:
                self.stopped = True
                return self._take(text[:at])
        hold = max((self._partial_stop(text, w) for w in self.stop_words), default=0)
        return self._take(text[: len(text) - hold])

    def finish(self) -> str:
        return "" if self.stopped else self._take(self._text().rstrip("\ufffd"))

    def _take(self, upto: str) -> str:
        piece = upto[self.emitted :]
        self.emitted = max(self.emitted, len(upto))
        return piece

    @staticmethod
    def _partial_stop(text: str, word: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of `word`."""
        for n in range(min(len(word) - 1, len(text)), 0, -1):
            if word.startswith(text[-n:]):
                return n
        return 0


def generate_text(
    decoder: LLMDecoder,
    input_ids: Sequence[int],
    prompt_table: np.ndarray | None,
    params: SamplingParams,
    tokenizer,
    *,
    eos_id: int,
    vocab_limit: int,
    max_context: int,
) -> Iterator[str]:
    """Stream the answer as text pieces (never empty)."""
    stream = TextStream(tokenizer, params.stop_words)
    for token in generate_ids(
        decoder, input_ids, prompt_table, params, eos_id=eos_id, vocab_limit=vocab_limit, max_context=max_context
    ):
        piece = stream.push(token)
        if piece:
            yield piece
        if stream.stopped:
            return
    tail = stream.finish()
    if tail:
        yield tail
