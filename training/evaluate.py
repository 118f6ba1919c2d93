"""Evaluate a checkpoint on held-out data: answer-token loss and perplexity, generated samples, and
caption metrics (BLEU-4, CIDEr-D) for a COCO-format split.

    python -m mmgpt.training.evaluate --checkpoint runs/stage2 --instruct llava_val.json --images val2014/ --out runs/eval
    python -m mmgpt.training.evaluate --checkpoint runs/stage1 --captions captions_val2014.json --images val2014/ --out runs/eval

The loss is measured exactly as training measures it (same template, same masks): the mean cross-entropy
of every assistant answer token and end token. Samples are generated greedily: for a conversation, the
last answer given every earlier turn (the image in the first); for captions, one caption per image asked
with stage 1's instruction, scored against all that image's reference captions.

Writes OUT/eval.json (all numbers) and OUT/samples_instruct.jsonl / OUT/samples_captions.jsonl.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmgpt.checkpoint import Components, load_checkpoint
from mmgpt.generation import SamplingParams, generate_text
from mmgpt.inference import TorchLLM
from mmgpt.template import Message, encode_conversation

from .cli import UsageError, cli
from .collate import Collator, LivePixels, build_examples, caption_messages, instruct_messages, load_pixels
from .data import group_captions, load_coco_captions, load_llava_instruct
from .loop import loss_sum
from .metrics import compute_caption_metrics
from .runtime import Runtime, seed_everything, setup_runtime, teardown

logger = logging.getLogger("mmgpt.training.evaluate")


@torch.no_grad()
def answer_loss(c: Components, examples, rt: Runtime, batch_size: int, progress: bool) -> dict[str, float]:
    """Mean cross-entropy over supervised tokens, and its exp (perplexity)."""
    collator = Collator(c.tokenizer.pad_token_id, c.tokenizer.eos_token_id, LivePixels(c.image_processor, c.config.image_size))
    total, count = 0.0, 0
    for start in tqdm(range(0, len(examples), batch_size), desc="held-out loss", disable=not progress):
        summed, n = loss_sum(c.model, collator(examples[start : start + batch_size]), rt)
        total += float(summed)
        count += n
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "targets": count}


@torch.no_grad()
def generate(c: Components, messages: list[Message], image: Path | None, max_new_tokens: int) -> str:
    """Greedy answer to the conversation's last user turn, with the serving decoder and template."""
    table = None
    if image is not None:
        pixels = torch.from_numpy(load_pixels(image, c.image_processor)).to(c.model.llm.device)
        table = c.model.encode_images(pixels)[0].float().cpu().numpy()
    ids = encode_conversation(
        c.tokenizer, messages, system_prompt=c.config.system_prompt, num_image_tokens=c.config.num_image_tokens,
        vocab_size=c.config.llm_vocab_size, add_generation_prompt=True,
    ).input_ids
    pieces = generate_text(
        TorchLLM(c.model), ids, table, SamplingParams(max_tokens=max_new_tokens), c.tokenizer,
        eos_id=c.config.eos_token_id, vocab_limit=len(c.tokenizer), max_context=c.config.max_context,
    )
    return "".join(pieces).strip()


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main(
    checkpoint: Path,
    images: Path,
    out: Path,
    instruct: Path | None = None,
    captions: Path | None = None,
    max_samples: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_length: int | None = None,
    strict: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Held-out answer-token loss and perplexity, generated samples, and BLEU-4 / CIDEr-D on captions.

    Args:
        checkpoint: checkpoint directory to evaluate (a LoRA adapter is merged at load).
        images: folder of the split's images.
        out: folder for eval.json and the samples files.
        instruct: a held-out LLaVA-Instruct JSON: loss, perplexity and generated answers.
        captions: a held-out COCO captions JSON: loss, perplexity, generated captions, BLEU-4 and CIDEr-D.
        max_samples: evaluate only the first N conversations / images (all by default).
        max_new_tokens: longest generated answer.
        batch_size: samples per forward pass for the loss.
        max_length: longest sample in tokens (default: the model's context).
        strict: stop at the first missing image or malformed entry instead of skipping it.
        progress: show progress bars.
    """
    if instruct is None and captions is None:
        raise UsageError("give --instruct (LLaVA format) and/or --captions (COCO format) to evaluate on")
    rt = setup_runtime()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(0)
    c = load_checkpoint(checkpoint, dtype=rt.dtype, device=rt.device, load_whisper=False)
    c.model.eval()
    length = max_length or c.config.max_context
    report: dict[str, Any] = {"checkpoint": str(checkpoint)}

    if instruct is not None:
        convs, stats = load_llava_instruct(instruct, images, strict=strict)
        convs = convs[:max_samples]
        result = answer_loss(c, build_examples(convs, c.tokenizer, c.config, length), rt, batch_size, progress)
        rows = []
        for s in tqdm(convs, desc="answers", disable=not progress):
            messages = instruct_messages(s)
            rows.append({
                "id": s.id, "image": s.image_path.name if s.image_path else None, "question": messages[-2].content,
                "reference": messages[-1].content, "prediction": generate(c, messages[:-1], s.image_path, max_new_tokens),
            })
        _write_jsonl(out / "samples_instruct.jsonl", rows)
        report["instruct"] = {**result, "conversations": len(convs), "skipped": stats.skipped}

    if captions is not None:
        caps, stats = load_coco_captions(captions, images, strict=strict)
        refs = group_captions(caps)
        image_ids = list(refs)[:max_samples]
        keep = set(image_ids)
        caps = [s for s in caps if s.image_id in keep]
        result = answer_loss(c, build_examples(caps, c.tokenizer, c.config, length), rt, batch_size, progress)
        paths = {s.image_id: s.image_path for s in caps}
        predictions = {}
        for i in tqdm(image_ids, desc="captions", disable=not progress):
            predictions[i] = generate(c, caption_messages("")[:1], paths[i], max_new_tokens)
        scores = compute_caption_metrics(predictions, {i: refs[i] for i in image_ids})
        _write_jsonl(out / "samples_captions.jsonl", [
            {"image_id": i, "image": paths[i].name, "prediction": predictions[i], "references": refs[i]} for i in image_ids
        ])
        report["captions"] = {**result, **scores, "images": len(image_ids), "skipped": stats.skipped}

    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    for split in ("instruct", "captions"):
        if split in report:
            r = report[split]
            extra = f", BLEU-4 {r['bleu4']:.4f}, CIDEr {r['cider']:.4f}" if "bleu4" in r else ""
            logger.info("%s: loss %.4f, perplexity %.2f%s", split, r["loss"], r["perplexity"], extra)
    print(json.dumps({k: v for k, v in report.items() if k != "checkpoint"}, indent=1, default=float))
    teardown(rt)
    return report


if __name__ == "__main__":
    cli(main)
