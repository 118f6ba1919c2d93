"""What a stage does to a loaded checkpoint around training; nothing here knows which stage calls it.

Before: the start checkpoint (`--init`, or a fresh one of `--preset`), which weights train (`freeze_except`;
trainable weights in fp32 as the optimizer's master copy, frozen ones in the compute dtype) and where the
images come from (live pixels, or the CLIP-feature cache, fingerprinted by the tower that made it). After:
`components_to_save`, what is written as the checkpoint, so frozen weights are written exactly as read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from .cli import UsageError
from .runtime import Runtime

logger = logging.getLogger("mmgpt.training")


def freeze_except(model: torch.nn.Module, trainable: Sequence[torch.nn.Module]) -> None:
    model.requires_grad_(False)
    for m in trainable:
        m.requires_grad_(True)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def prepare_precision(model: torch.nn.Module) -> None:
    """Trainable weights in fp32 (the optimizer's master copy); frozen ones keep the compute dtype."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def enable_gradient_checkpointing(llm) -> None:
    # Non-reentrant: the reentrant variant gives no gradients to LoRA weights when the checkpointed
    # block's inputs (frozen embeddings) do not require grad, and it conflicts with data parallelism.
    llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def components_to_save(c, start: Path, prepare: Callable[[torch.nn.Module], None] | None = None):
    """What a stage writes as its checkpoint. Trained in fp32, the run's own components. Otherwise (bf16 or
    4-bit frozen weights on a GPU) the start checkpoint re-read in fp32 on the CPU, shaped by `prepare`
    (e.g. LoRA wrapping), with the trained fp32 weights put in by name: frozen weights are written exactly
    as they were read, never as rounded copies."""
    from mmgpt.checkpoint import load_checkpoint

    if all(p.dtype == torch.float32 for p in c.model.parameters()):
        return c
    fresh = load_checkpoint(start, load_whisper=False)
    if prepare is not None:
        prepare(fresh.model)
    target = dict(fresh.model.named_parameters())
    trained = trainable_parameters(c.model)
    missing = sorted(set(trained) - set(target))
    if missing:
        raise RuntimeError(f"trained weights {missing[:5]} have no place in the fp32 copy")
    with torch.no_grad():
        for name, p in trained.items():
            target[name].copy_(p.detach().float().cpu())
    fresh.model.eval()
    return fresh


def vision_fingerprint(model, image_processor) -> str:
    """What decides the cached CLIP features: tower config and weights, preprocessing, feature layer."""
    def settings(d: dict) -> str:  # without paths and versions ("_name_or_path", "transformers_version")
        kept = {k: v for k, v in d.items() if not k.startswith("_") and k != "transformers_version"}
        return json.dumps(kept, sort_keys=True, default=str)

    h = hashlib.sha256()
    h.update(settings(model.vision.config.to_dict()).encode())
    h.update(settings(image_processor.to_dict()).encode())
    h.update(str(model.config.vision_feature_layer).encode())
    with torch.no_grad():
        for name, p in model.vision.state_dict().items():
            x = p.detach().double()
            h.update(f"{name}{tuple(p.shape)}{float(x.sum()):.10e}{float(x.abs().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def image_source(components, examples, feature_cache: Path | None, rt: Runtime, batch_size: int = 64, progress: bool = True):
    """Live pixels, or cached CLIP features (rank 0 encodes the images not cached yet, the others wait)."""
    from .collate import CachedFeatures, LivePixels, load_pixels
    from .feature_cache import FeatureCache

    config, model = components.config, components.model
    if feature_cache is None:
        return LivePixels(components.image_processor, config.image_size)
    source = vision_fingerprint(model, components.image_processor)

    def open_cache() -> FeatureCache:
        return FeatureCache(feature_cache, config.num_image_tokens, config.vision_hidden_size, source=source)

    if rt.is_main:
        cache = open_cache()
        todo = {e.image_key: e.image_path for e in examples if e.image_key is not None}

        def encode(pixels: list[np.ndarray]) -> torch.Tensor:
            batch = torch.from_numpy(np.concatenate(pixels)).to(rt.device)
            with rt.autocast():
                return model.image_features(batch).float()

        added = cache.build(todo.items(), encode, lambda p: load_pixels(p, components.image_processor), batch_size, progress)
        logger.info("feature cache %s: %d images, %d encoded now", feature_cache, len(cache), added)
    rt.barrier()
    if not rt.is_main:
        cache = open_cache()
    return CachedFeatures(cache)


@contextlib.contextmanager
def start_checkpoint(preset: str | None, init: Path | None, seed: int, **create_kwargs) -> Iterator[Path]:
    """The checkpoint a run starts from: `init` as it is, or a fresh one made from `preset` in a temporary
    folder (deterministic for a seed, so a resumed run rebuilds the same start)."""
    from mmgpt.config import MMGPTConfig
    from mmgpt.presets import PRESET_NAMES, create

    if init is not None:
        config = MMGPTConfig.load(init)
        if preset is not None and preset != config.preset:
            raise UsageError(f"--preset {preset} but {init} holds a {config.preset!r} checkpoint")
        yield Path(init)
        return
    if preset is None:
        raise UsageError(f"give --preset ({', '.join(PRESET_NAMES)}) or --init CHECKPOINT_DIR")
    with tempfile.TemporaryDirectory(prefix="mmgpt-start-") as tmp:
        yield create(preset, Path(tmp) / "start", seed=seed, **create_kwargs)
