"""Whisper tiny.en adapted to the toy world's voices: a LoRA adapter on its decoder (`make toy`'s last stage).

    python -m mmgpt.toy.whisper_adapt --world runs/toy/world --out runs/toy/whisper_adapter

tiny.en hears espeak-ng's synthetic voices badly ("left of" as "left on", "Count the" as "Come to", "at the
top" as "that the top"): held-out WER 0.158 with the domain prompt alone. Here the world's *training*
questions are spoken in voices that are never used to evaluate (`ADAPT_VOICES`), encoded once by the frozen
encoder, and a LoRA adapter on the decoder's attention learns to transcribe them, with the same
previous-text prompt the checkpoint decodes with. The adapter (under 1 MB) is published beside the default
and merged into tiny.en's weights when the checkpoint loads (`MMGPTConfig.whisper_adapter`).
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mmgpt.config import SpeechConfig
from mmgpt.template import IGNORE_INDEX

logger = logging.getLogger("mmgpt.toy.whisper_adapt")

ADAPTER_DIR = "whisper_adapter"
RECORD = "whisper_adapt.json"


def written_as_whisper_writes(text: str) -> bool:
    """A capital first letter and a final "?" or ".": half the world's typed questions are lower-cased or lose
    their final mark (users type that way), and an adapter taught those transcripts drops the "?" of spoken
    questions (seen: P(end) 0.50 vs P("?") 0.49 after "What is left of the star")."""
    return text[:1].isupper() and text.endswith(("?", "."))


def training_questions(world: Path, n: int, seed: int) -> list[str]:
    """`n` distinct questions of the world's training conversations (seen wordings only, as Whisper writes
    them), shuffled."""
    convs = json.loads((Path(world) / "llava_instruct_train.json").read_text())
    questions = sorted({q for c in convs for turn in c["conversations"] if turn["from"] == "human"
                        if written_as_whisper_writes(q := turn["value"].replace("<image>", "").strip())})
    random.Random(seed).shuffle(questions)
    if n > len(questions):
        raise ValueError(f"asked for {n} questions, the world's training conversations hold {len(questions)}")
    return questions[:n]


def spoken_states(questions: list[str], whisper, feature_extractor, seed: int, progress: bool) -> torch.Tensor:
    """Each question spoken in a voice of ADAPT_VOICES (a variant and a rate drawn per question), as the
    frozen encoder's states, (n, 1500, d) in float16 (~1.1 MB each for tiny.en)."""
    from mmgpt import tts
    from mmgpt.preprocess import audio_features, resample

    from .speech import ADAPT_RATES, ADAPT_VARIANTS, ADAPT_VOICES

    rng = random.Random(seed)
    states = []
    for q in tqdm(questions, desc="speaking + encoding", unit="question", disable=not progress):
        voice = rng.choice(ADAPT_VOICES) + rng.choice(ADAPT_VARIANTS)
        samples, rate = tts.synthesize(q, voice, rate=rng.choice(ADAPT_RATES))
        feats = torch.from_numpy(audio_features(resample(samples, rate), feature_extractor))
        with torch.no_grad():
            states.append(whisper.model.encoder(input_features=feats).last_hidden_state[0].half())
    return torch.stack(states)


def decoder_example(text: str, tokenizer, speech: SpeechConfig) -> tuple[list[int], list[int]]:
    """(decoder input ids, labels): the checkpoint's decoder prefix, then the transcript as Whisper writes
    it (a leading space) and its end; the loss is on the transcript and the end only."""
    prefix = list(speech.prompt_ids)
    target = tokenizer(" " + text.strip(), add_special_tokens=False).input_ids + [speech.eot_id]
    ids = prefix + target
    return ids[:-1], [IGNORE_INDEX] * (len(prefix) - 1) + target


def main(
    world: Path,
    out: Path,
    whisper: Path | None = None,
    initial_prompt: str | None = None,
    questions: int = 400,
    steps: int = 200,
    batch_size: int = 16,
    rank: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Train the adapter and write it (peft format, safetensors) into `out`, with `whisper_adapt.json`.

    Args:
        world: the toy world's folder (its training conversations are what is spoken).
        out: where the adapter goes; an existing finished one is kept (rerunning resumes nothing else).
        whisper: the Whisper folder to adapt (default: tiny.en, converted from its wheel).
        initial_prompt: the previous-text prompt it decodes with (default: the toy world's).
        questions: distinct training questions spoken (one voice each).
        steps: optimizer steps.
        batch_size: questions per step.
        rank: LoRA rank (alpha = rank) on the decoder's self- and cross-attention query and value projections.
        lr: peak learning rate (20 warm-up steps, cosine decay).
        seed: seeds the questions, voices, rates and training.
        progress: show progress bars.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from mmgpt.speech import speech_config_for

    from .speech import INITIAL_PROMPT

    out = Path(out)
    if (out / RECORD).is_file():
        logger.info("%s already holds an adapter: kept", out)
        return out
    if whisper is None:
        from mmgpt.whisper_ct2 import tiny_en_dir

        whisper = tiny_en_dir()
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration.from_pretrained(whisper, use_safetensors=True,
                                                            attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(whisper)
    speech = speech_config_for(str(whisper), INITIAL_PROMPT if initial_prompt is None else initial_prompt)
    texts = training_questions(world, questions, seed)
    states = spoken_states(texts, model, WhisperFeatureExtractor.from_pretrained(whisper), seed, progress)
    examples = [decoder_example(t, tokenizer, speech) for t in texts]
    encoded_s = time.perf_counter() - t0

    layers = range(model.config.decoder_layers)
    targets = [f"model.decoder.layers.{i}.{attn}.{proj}" for i in layers for attn in ("self_attn", "encoder_attn")
               for proj in ("q_proj", "v_proj")]
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = min(20, max(1, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + np.cos(np.pi * (s - warmup) / max(1, steps - warmup))))
    rng = np.random.default_rng(seed)
    losses = []
    peft_model.train()
    bar = tqdm(range(steps), desc="whisper adapter", unit="step", disable=not progress)
    for _ in bar:
        picked = rng.choice(len(examples), min(batch_size, len(examples)), replace=False)
        length = max(len(examples[k][0]) for k in picked)
        ids = torch.full((len(picked), length), speech.eot_id)
        labels = torch.full((len(picked), length), IGNORE_INDEX)
        for row, k in enumerate(picked):
            x, y = examples[k]
            ids[row, : len(x)], labels[row, : len(y)] = torch.tensor(x), torch.tensor(y)
        logits = peft_model(encoder_outputs=(states[picked].float(),), decoder_input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    peft_model.eval()

    staging = out.with_name(out.name + ".tmp")
    staging.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(staging, safe_serialization=True)
    (staging / "README.md").unlink(missing_ok=True)  # peft's model card template, with a path of this machine
    adapter_config = json.loads((staging / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = Path(whisper).name  # not a path of this machine
    (staging / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    record = {
        "whisper": Path(whisper).name, "initial_prompt": speech.initial_prompt, "questions": questions, "steps": steps,
        "batch_size": batch_size, "rank": rank, "lr": lr, "seed": seed, "losses": [round(x, 4) for x in losses],
        "seconds": {"speak_and_encode": round(encoded_s, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    (staging / RECORD).write_text(json.dumps(record) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    staging.rename(out)
    logger.info("whisper adapter: loss %.3f -> %.3f in %.0f s", np.mean(losses[:10]), np.mean(losses[-10:]),
                record["seconds"]["total"])
    return out


if __name__ == "__main__":
    from mmgpt.training.cli import cli

    cli(main)
