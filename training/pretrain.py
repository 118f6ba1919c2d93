"""Stage 1: train the projector on COCO captions; CLIP and Phi-2 stay frozen.

    python -m mmgpt.training.pretrain --preset tiny --captions captions_train2014.json --images train2014/ --out runs/stage1
    python -m mmgpt.training.pretrain --config training/recipes/pretrain_phi2.yaml --captions ... --images ... --out ...

Each caption becomes the conversation [user (image): "Describe the image briefly."] [assistant: caption],
rendered by the serving chat template; only the caption and its end token are supervised. OUT is a
checkpoint directory (`load_checkpoint(OUT)`, `mmgpt ask --checkpoint OUT`), plus `metrics.jsonl`,
`loss.png`, `training_args.json` and `train_state/` (for resuming; delete it when done).
"""

from __future__ import annotations

import logging
from pathlib import Path

from mmgpt.checkpoint import load_checkpoint, save_checkpoint

from .cli import cli
from .collate import Collator, build_examples
from .data import load_coco_captions
from .loop import settings_from, train
from .prepare import (
    components_to_save,
    enable_gradient_checkpointing,
    freeze_except,
    image_source,
    prepare_precision,
    start_checkpoint,
)
from .runtime import seed_everything, setup_runtime, teardown
from .train_state import prepare_out

logger = logging.getLogger("mmgpt.training.pretrain")


def main(
    captions: Path,
    images: Path,
    out: Path,
    preset: str | None = None,
    init: Path | None = None,
    projector_type: str = "mlp2x_gelu",
    feature_cache: Path | None = None,
    learning_rate: float = 1e-3,
    global_batch_size: int = 256,
    micro_batch_size: int = 32,
    epochs: int = 1,
    max_steps: int | None = None,
    warmup_ratio: float = 0.03,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    max_length: int | None = None,
    gradient_checkpointing: bool = False,
    save_every: int = 500,
    log_every: int = 1,
    seed: int = 0,
    num_workers: int = 0,
    strict: bool = False,
    progress: bool = True,
) -> Path:
    """Stage 1 (projector pretraining on COCO captions; CLIP and the LLM frozen).

    Args:
        captions: COCO captions JSON (e.g. captions_train2014.json).
        images: folder of the COCO images (2014 or 2017 file names, also in direct subfolders).
        out: output checkpoint directory; a run interrupted there resumes from its last saved state.
        preset: start from a fresh checkpoint of this preset (tiny, phi-2, phi-2-hd).
        init: start from this checkpoint directory instead of a preset.
        projector_type: projector of a fresh preset checkpoint: mlp2x_gelu (LLaVA-1.5) or linear.
        feature_cache: folder of a CLIP-feature cache (built on first use, resumable); omit to encode
            images live at every step.
        learning_rate: peak learning rate (AdamW; cosine decay after warm-up).
        global_batch_size: samples per optimizer step, over all ranks and accumulation steps.
        micro_batch_size: samples per forward pass on one rank (gradient accumulation makes up the rest).
        epochs: passes over the data (ignored when max_steps is given).
        max_steps: optimizer steps to run (cycling the data); the schedule spans exactly these steps.
        warmup_ratio: fraction of the steps spent warming the learning rate up from 0.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradients are clipped to this global norm.
        max_length: longest sample in tokens (default: the model's context); longer ones are cut.
        gradient_checkpointing: recompute LLM activations in the backward pass (less memory, ~30% slower).
        save_every: save the training state every N steps (and at the end).
        log_every: write metrics.jsonl every N steps.
        seed: seeds the data order, the fresh checkpoint and every RNG.
        num_workers: DataLoader worker processes (image decoding when training live).
        strict: stop at the first missing image or malformed entry instead of skipping and counting it.
        progress: show progress bars.
    """
    args = dict(locals())
    settings = settings_from(args)
    rt = setup_runtime()
    seed_everything(seed)
    samples, _ = load_coco_captions(captions, images, strict=strict)
    prepare_out(out, rt.is_main)
    try:
        with start_checkpoint(preset, init, seed, projector_type=projector_type) as start:
            c = load_checkpoint(start, dtype=rt.dtype, device=rt.device, load_whisper=False)
            model = c.model
            freeze_except(model, [model.projector])
            prepare_precision(model)
            if gradient_checkpointing:
                enable_gradient_checkpointing(model.llm)
            examples = build_examples(samples, c.tokenizer, c.config, max_length or c.config.max_context)
            source = image_source(c, examples, feature_cache, rt, progress=progress)
            collator = Collator(c.tokenizer.pad_token_id, c.tokenizer.eos_token_id, source)
            groups = [{"params": list(model.projector.parameters()), "lr": learning_rate}]
            train(model, groups, examples, collator, settings, rt, args, title="stage 1: projector")
            if rt.is_main:
                model.eval()
                save_checkpoint(components_to_save(c, start), out)
                logger.info("stage 1 checkpoint written to %s", out)
            rt.barrier()
    finally:
        teardown(rt)
    return Path(out)


if __name__ == "__main__":
    cli(main)
