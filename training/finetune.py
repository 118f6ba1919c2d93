"""Stage 2: instruction tuning on LLaVA-Instruct conversations with LoRA on Phi-2; CLIP and (by default)
the projector frozen.

    python -m mmgpt.training.finetune --instruct llava_instruct_150k.json --images train2017/ --init runs/stage1 --out runs/stage2
    python -m mmgpt.training.finetune --config training/recipes/finetune_phi2.yaml --instruct ... --images ... --init ... --out ...

Every turn of a conversation is kept; the loss covers every assistant answer and the end token closing
each, nothing else. OUT is a checkpoint directory: the LoRA adapter in `llm_adapter/` (recorded in the
config, applied and merged at load time), and with `--merge` also the merged LLM in `llm/` (the config
then loads that and no adapter; `llm_adapter/` stays for reference).
QLoRA (`--qlora`): the frozen LLM in 4-bit NF4 via bitsandbytes; needs a CUDA GPU.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from mmgpt.checkpoint import load_checkpoint, resolve_source, save_checkpoint

from .cli import UsageError, cli
from .collate import Collator, build_examples
from .data import load_llava_instruct
from .loop import settings_from, train
from .prepare import (
    components_to_save,
    enable_gradient_checkpointing,
    image_source,
    prepare_precision,
    start_checkpoint,
)
from .runtime import Runtime, seed_everything, setup_runtime, teardown
from .train_state import prepare_out

logger = logging.getLogger("mmgpt.training.finetune")

# Every linear layer of Phi-2's blocks (LLaVA's LoRA recipe targets all linear layers but the LM head).
PHI_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")


def lora_config(r: int, alpha: int, dropout: float, targets: tuple[str, ...]):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none", task_type="CAUSAL_LM")


def apply_lora(model, config) -> None:
    """Wrap the model's LLM with LoRA adapters (the only trainable LLM weights)."""
    from peft import get_peft_model

    model.llm = get_peft_model(model.llm, config)


def check_qlora(rt: Runtime) -> None:
    if rt.device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        have = "a CUDA GPU" if rt.device.type == "cuda" else "no CUDA GPU"
        raise UsageError(
            f"--qlora needs a CUDA GPU and bitsandbytes (pip install -e '.[gpu]'); this machine has {have}"
            f"{'' if importlib.util.find_spec('bitsandbytes') else ' and no bitsandbytes'}. "
            "Train without --qlora: LoRA on the full-precision model (bf16 on a GPU, fp32 on CPU)."
        )


def load_llm_4bit(start: Path, source: str, rt: Runtime):
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, PhiForCausalLM

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=rt.dtype
    )
    llm = PhiForCausalLM.from_pretrained(
        resolve_source(start, source), quantization_config=quant, dtype=rt.dtype, device_map={"": rt.device},
        use_safetensors=True, attn_implementation="eager",
    )
    # Norms and the head in fp32, input grads on; checkpointing is switched on by the caller's flag.
    return prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)


def main(
    instruct: Path,
    images: Path,
    init: Path,
    out: Path,
    preset: str | None = None,
    feature_cache: Path | None = None,
    lora_r: int = 128,
    lora_alpha: int = 256,
    lora_dropout: float = 0.05,
    lora_targets: tuple[str, ...] = PHI_LORA_TARGETS,
    qlora: bool = False,
    train_projector: bool = False,
    projector_lr: float = 2e-5,
    merge: bool = False,
    learning_rate: float = 2e-4,
    global_batch_size: int = 128,
    micro_batch_size: int = 16,
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
    """Stage 2 (instruction tuning on LLaVA-Instruct with LoRA; CLIP and the projector frozen by default).

    Args:
        instruct: LLaVA-Instruct JSON (e.g. llava_instruct_150k.json).
        images: folder of the COCO images (2014 or 2017 file names, also in direct subfolders).
        init: the stage-1 checkpoint directory to start from.
        out: output checkpoint directory; a run interrupted there resumes from its last saved state.
        preset: if given, check that init was made from this preset.
        feature_cache: folder of a CLIP-feature cache (built on first use, resumable); omit to encode
            images live at every step. Stage 1's cache can be reused: it is keyed by image id.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (the update is scaled by alpha / r).
        lora_dropout: dropout on the LoRA input.
        lora_targets: names of the LLM's linear layers that get adapters.
        qlora: hold the frozen LLM in 4-bit NF4 (bitsandbytes; CUDA only).
        train_projector: train the projector too, with its own learning rate.
        projector_lr: the projector's peak learning rate with --train-projector.
        merge: also write the LLM with the adapter merged into it (llm/), and load that.
        learning_rate: peak learning rate of the LoRA weights (AdamW; cosine decay after warm-up).
        global_batch_size: samples per optimizer step, over all ranks and accumulation steps.
        micro_batch_size: samples per forward pass on one rank (gradient accumulation makes up the rest).
        epochs: passes over the data (ignored when max_steps is given).
        max_steps: optimizer steps to run (cycling the data); the schedule spans exactly these steps.
        warmup_ratio: fraction of the steps spent warming the learning rate up from 0.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradients are clipped to this global norm.
        max_length: longest conversation in tokens (default: the model's context); longer ones are cut.
        gradient_checkpointing: recompute LLM activations in the backward pass (less memory, ~30% slower).
        save_every: save the training state every N steps (and at the end).
        log_every: write metrics.jsonl every N steps.
        seed: seeds the data order, the LoRA initialisation and every RNG.
        num_workers: DataLoader worker processes (image decoding when training live).
        strict: stop at the first missing image or malformed entry instead of skipping and counting it.
        progress: show progress bars.
    """
    args = dict(locals())
    settings = settings_from(args)
    rt = setup_runtime()
    if qlora:
        check_qlora(rt)
    seed_everything(seed)
    samples, _ = load_llava_instruct(instruct, images, strict=strict)
    prepare_out(out, rt.is_main)
    lcfg = lora_config(lora_r, lora_alpha, lora_dropout, lora_targets)
    try:
        with start_checkpoint(preset, init, seed) as start:
            c = load_checkpoint(start, dtype=rt.dtype, device=rt.device, load_whisper=False)
            if qlora:
                if c.config.llm_adapter:
                    raise UsageError(f"--qlora: {start} carries a LoRA adapter; merge it first (finetune --merge)")
                c.model.llm = load_llm_4bit(start, c.config.llm_source, rt)
                if rt.device.type == "cuda":
                    torch.cuda.empty_cache()
            model = c.model
            model.requires_grad_(False)
            if gradient_checkpointing:
                enable_gradient_checkpointing(model.llm)
            apply_lora(model, lcfg)
            model.projector.requires_grad_(train_projector)
            prepare_precision(model)
            examples = build_examples(samples, c.tokenizer, c.config, max_length or c.config.max_context)
            source = image_source(c, examples, feature_cache, rt, progress=progress)
            collator = Collator(c.tokenizer.pad_token_id, c.tokenizer.eos_token_id, source)
            lora_params = [p for n, p in model.llm.named_parameters() if p.requires_grad]
            groups = [{"params": lora_params, "lr": learning_rate}]
            if train_projector:
                groups.append({"params": list(model.projector.parameters()), "lr": projector_lr})
            train(model, groups, examples, collator, settings, rt, args, title="stage 2: LoRA")
            if rt.is_main:
                model.eval()
                final = components_to_save(c, start, lambda m: apply_lora(m, lcfg))
                save_checkpoint(final, out)
                if merge:
                    final.model.llm = final.model.llm.merge_and_unload()
                    save_checkpoint(final, out, save_llm=True)
                logger.info("stage 2 checkpoint written to %s%s", out, " (LLM merged)" if merge else "")
            rt.barrier()
    finally:
        teardown(rt)
    return Path(out)


if __name__ == "__main__":
    cli(main)
