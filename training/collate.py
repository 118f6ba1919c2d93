"""Samples -> token ids with loss labels -> padded batches.

Both stages render their samples through the one chat template (`mmgpt.template.encode_conversation`),
so what the model is trained on is exactly what it is later asked:

- stage 1, a caption:       [user (image): CAPTION_INSTRUCTION] [assistant: caption]
- stage 2, a conversation:  every turn of it, the image at the start of the first user turn

Labels are IGNORE_INDEX (-100) on the system text, user turns, image positions and padding; the tokens of
every assistant answer and the eos that ends it are their own labels (HF shifts them inside the loss).

A batch is padded on the right with the tokenizer's own pad id (never eos: a pad == eos tokenizer would
let a "mask the padding" rule also mask the real end token, and the model would never learn to stop).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmgpt.config import MMGPTConfig
from mmgpt.template import IGNORE_INDEX, Encoded, Message, encode_for

from .data import CaptionSample, InstructSample

logger = logging.getLogger(__name__)

# The stage-1 question. Fixed, so stage 1 only has to align the image with the caption, and the same
# words ask for a caption at evaluation (`make eval CAPTIONS=...`).
CAPTION_INSTRUCTION = "Describe the image briefly."


@dataclass(frozen=True)
class Example:
    """One encoded training sample: what the collator batches."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE_INDEX where no loss
    image_key: int | None  # key of the image in an ImageSource (None: a text-only conversation)
    image_path: Path | None

    @property
    def num_targets(self) -> int:
        """Supervised positions the loss sees (the first label is shifted away)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def caption_messages(caption: str) -> list[Message]:
    return [Message("user", CAPTION_INSTRUCTION, image=True), Message("assistant", caption)]


def instruct_messages(sample: InstructSample) -> list[Message]:
    """LLaVA turns (already without "<image>" text) -> template messages; the image opens the first turn."""
    return [
        Message(m["role"], m["content"], image=(i == 0 and sample.has_image))
        for i, m in enumerate(sample.messages)
    ]


def encode(tokenizer, config: MMGPTConfig, messages: Sequence[Message]) -> Encoded:
    return encode_for(config, tokenizer, messages, add_generation_prompt=False)


def image_key(image_id: int | None, path: Path | None) -> int | None:
    """The feature-cache key of an image: its COCO id, or (no digits in the name) a stable hash of the name."""
    if path is None:
        return None
    if image_id is not None:
        return int(image_id)
    # Negative, so a hashed key never collides with a real (positive) COCO id.
    return -int.from_bytes(hashlib.sha1(path.name.encode()).digest()[:7], "big") - 1


def truncate(enc: Encoded, max_length: int, vocab_size: int) -> Encoded | None:
    """Cut a too-long sample at `max_length` tokens; None if that would cut the image or leave no target."""
    if len(enc.input_ids) <= max_length:
        return enc
    if any(t >= vocab_size for t in enc.input_ids[max_length:]):
        return None
    labels = enc.labels[:max_length]
    if all(t == IGNORE_INDEX for t in labels[1:]):
        return None
    return Encoded(enc.input_ids[:max_length], labels)


def build_examples(
    samples: Sequence[CaptionSample] | Sequence[InstructSample],
    tokenizer,
    config: MMGPTConfig,
    max_length: int,
) -> list[Example]:
    """Encode every sample (captions or conversations); samples that cannot fit are dropped and counted."""
    examples: list[Example] = []
    dropped = 0
    for s in samples:
        messages = caption_messages(s.caption) if isinstance(s, CaptionSample) else instruct_messages(s)
        enc = truncate(encode(tokenizer, config, messages), max_length, config.llm_vocab_size)
        if enc is None:
            dropped += 1
            continue
        examples.append(Example(tuple(enc.input_ids), tuple(enc.labels), image_key(s.image_id, s.image_path), s.image_path))
    if dropped:
        logger.warning("%d of %d samples dropped: longer than max_length=%d with no target or image left", dropped, len(samples), max_length)
    if not examples:
        raise ValueError("no training samples left after encoding (all empty or too long for max_length)")
    return examples


# ---------------------------------------------------------------------------------------- image sources


class CachedFeatures:
    """Images as cached CLIP patch features (a `FeatureCache`), returned as float32 (N, Dv)."""

    kind = "image_features"

    def __init__(self, cache):
        self.cache = cache

    def __call__(self, key: int, path: Path) -> torch.Tensor:
        return torch.from_numpy(self.cache.get(key).astype(np.float32))

    def blank(self) -> torch.Tensor:
        return torch.zeros(self.cache.num_tokens, self.cache.dim)


class LivePixels:
    """Images read from disk and preprocessed for CLIP each time: (3, S, S) float32."""

    kind = "pixel_values"

    def __init__(self, image_processor, image_size: int):
        self.image_processor = image_processor
        self.image_size = image_size

    def __call__(self, key: int, path: Path) -> torch.Tensor:
        return torch.from_numpy(load_pixels(path, self.image_processor)[0])

    def blank(self) -> torch.Tensor:
        return torch.zeros(3, self.image_size, self.image_size)


def load_pixels(path: Path, image_processor) -> np.ndarray:
    """One image file -> (1, 3, S, S) float32, with the same decoding and preprocessing as serving."""
    from mmgpt.preprocess import image_pixels

    return image_pixels(Path(path).read_bytes(), image_processor)


# -------------------------------------------------------------------------------------------- collator


class Collator:
    """Examples -> a right-padded batch: input_ids/attention_mask/labels (B, T) and the images.

    The batch holds `image_features` (B, N, Dv) or `pixel_values` (B, 3, S, S), whichever the source
    gives; a text-only example gets a zero row, never looked up (its ids have no image positions).
    """

    def __init__(self, pad_token_id: int, eos_token_id: int, images):
        if pad_token_id == eos_token_id:
            raise ValueError(
                f"pad_token_id == eos_token_id ({pad_token_id}): padding must be a token of its own, or the "
                "end token is masked with the padding and the model never learns to stop"
            )
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.images = images

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("empty batch")
        length = max(len(e.input_ids) for e in examples)
        n = len(examples)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        for i, e in enumerate(examples):
            t = len(e.input_ids)
            input_ids[i, :t] = torch.tensor(e.input_ids)
            labels[i, :t] = torch.tensor(e.labels)
            attention_mask[i, :t] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.images is not None:
            rows = [self.images(e.image_key, e.image_path) if e.image_key is not None else self.images.blank() for e in examples]
            batch[self.images.kind] = torch.stack(rows)
        return batch
