"""The in-process reference: answers in PyTorch. The served path must match it token for token.

    from mmgpt.inference import Assistant
    bot = Assistant.load()                       # embedded default; or Assistant.load("ckpt/")
    print(bot.ask("What is this?", image=open("cat.jpg", "rb").read()).text)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmgpt.checkpoint import load_checkpoint
from mmgpt.generation import LLMDecoder, SamplingParams, generate_text
from mmgpt.model import MultimodalPhi
from mmgpt.preprocess import Limits, audio_features, image_pixels, load_audio
from mmgpt.speech import TorchWhisper, WhisperDecoder, transcribe
from mmgpt.template import Message, join_question, prompt_ids

MAX_TOKENS_LIMIT = 1024


class TorchLLM:
    """`LLMDecoder` over the PyTorch model with a KV cache (batch of one)."""

    def __init__(self, model: MultimodalPhi):
        self.model = model
        self.cache = None
        self.length = 0

    @torch.no_grad()
    def prefill(self, input_ids: np.ndarray, prompt_table: np.ndarray | None) -> np.ndarray:
        from transformers import DynamicCache

        device = self.model.llm.device
        ids = torch.from_numpy(input_ids).to(device)[None]  # (1, T)
        table = None if prompt_table is None else torch.from_numpy(prompt_table).to(device)[None]
        self.cache = DynamicCache()
        out = self.model(input_ids=ids, prompt_table=table, past_key_values=self.cache, use_cache=True)
        self.length = ids.shape[1]
        return out.logits[0, -1].float().cpu().numpy()

    @torch.no_grad()
    def step(self, token_id: int) -> np.ndarray:
        device = self.model.llm.device
        ids = torch.tensor([[token_id]], device=device)
        mask = torch.ones(1, self.length + 1, dtype=torch.long, device=device)
        pos = torch.tensor([[self.length]], device=device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.cache, use_cache=True)
        self.length += 1
        return out.logits[0, -1].float().cpu().numpy()


@dataclass
class Answer:
    text: str
    transcript: str


class Assistant:
    """One question in, one answer out, over interchangeable runtimes: PyTorch (`load`, the reference)
    or the exported ONNX files (`from_export`). Preprocessing, the template and decoding are shared."""

    def __init__(
        self,
        config,
        tokenizer,
        image_processor,
        *,
        encode_image: Callable[[np.ndarray], np.ndarray],
        new_decoder: Callable[[], LLMDecoder],
        whisper: WhisperDecoder | None = None,
        feature_extractor=None,
        whisper_tokenizer=None,
        limits: Limits = Limits(),
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.encode_image = encode_image  # (B, 3, S, S) float32 -> (B, N, D) float32
        self.new_decoder = new_decoder
        self.whisper = whisper
        self.feature_extractor = feature_extractor
        self.whisper_tokenizer = whisper_tokenizer
        self.limits = limits

    @classmethod
    def load(cls, checkpoint: str | Path | None = None, **kwargs) -> Assistant:
        """The PyTorch reference from a checkpoint dir (default: the embedded default, the trained toy world)."""
        from mmgpt.presets import default_checkpoint

        c = load_checkpoint(checkpoint or default_checkpoint(), **kwargs)
        device = c.model.llm.device

        @torch.no_grad()
        def encode_image(pixels: np.ndarray) -> np.ndarray:
            return c.model.encode_images(torch.from_numpy(pixels).to(device)).float().cpu().numpy()

        return cls(
            c.config, c.tokenizer, c.image_processor, encode_image=encode_image, new_decoder=lambda: TorchLLM(c.model),
            whisper=TorchWhisper(c.whisper) if c.whisper is not None else None,
            feature_extractor=c.feature_extractor, whisper_tokenizer=c.whisper_tokenizer,
        )

    @classmethod
    def from_export(cls, export_dir: str | Path, *, threads: int | None = None, llm_onnx: str | None = None) -> Assistant:
        """The same answers from the exported ONNX files, in ONNX Runtime."""
        from transformers import AutoTokenizer, CLIPImageProcessor, WhisperFeatureExtractor

        from mmgpt import names
        from mmgpt.config import MMGPTConfig
        from mmgpt.runtime import OrtVision, OrtWhisper, llm_model

        d = Path(export_dir)
        llm = llm_model(d / names.LLM_DIR, threads, llm_onnx)
        wdir = d / names.WHISPER_DIR
        return cls(
            MMGPTConfig.load(d), AutoTokenizer.from_pretrained(d / names.TOKENIZER_DIR),
            CLIPImageProcessor.from_pretrained(d / names.VISION_DIR),
            encode_image=OrtVision(d / names.VISION_DIR, threads), new_decoder=llm.decoder,
            whisper=OrtWhisper(wdir, threads), feature_extractor=WhisperFeatureExtractor.from_pretrained(wdir),
            whisper_tokenizer=AutoTokenizer.from_pretrained(wdir),
        )

    def image_embeddings(self, image: bytes) -> np.ndarray:
        """Encoded image -> prompt table (N, D) float32."""
        return self.encode_image(image_pixels(image, self.image_processor, self.limits))[0]

    def transcribe(self, audio: bytes) -> str:
        if self.whisper is None:
            raise RuntimeError("this Assistant was loaded without Whisper")
        feats = audio_features(load_audio(audio, self.limits), self.feature_extractor)
        return transcribe(self.whisper, feats, self.config.speech, self.whisper_tokenizer)

    def prompt(self, question: str, *, has_image: bool, history: Sequence[Message] = ()) -> list[int]:
        return prompt_ids(self.config, self.tokenizer, history, question, has_image=has_image)

    def stream(
        self,
        text: str = "",
        *,
        image: bytes | None = None,
        audio: bytes | None = None,
        history: Sequence[Message] = (),
        params: SamplingParams = SamplingParams(),
    ) -> tuple[str, Iterator[str]]:
        """(transcript, iterator over answer pieces)."""
        params.validate(MAX_TOKENS_LIMIT)
        transcript = self.transcribe(audio) if audio is not None else ""
        question = join_question(text, transcript)
        table = self.image_embeddings(image) if image is not None else None
        ids = self.prompt(question, has_image=table is not None, history=history)
        pieces = generate_text(
            self.new_decoder(), ids, table, params, self.tokenizer,
            eos_id=self.config.eos_token_id, vocab_limit=len(self.tokenizer), max_context=self.config.max_context,
        )
        return transcript, pieces

    def ask(self, text: str = "", **kwargs) -> Answer:
        transcript, pieces = self.stream(text, **kwargs)
        return Answer("".join(pieces), transcript)
