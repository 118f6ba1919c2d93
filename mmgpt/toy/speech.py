"""Spoken questions in the toy world: which espeak-ng voices do what, and Whisper's domain prompt.

Voices are split before anything is measured: the prompt wording was chosen on `DESIGN_VOICES` only, and
`HELDOUT_VOICES` (other espeak-ng voice files, not variants of the design ones) are used for nothing but
the evaluation (`asr_wer`, `spoken_vqa_accuracy`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

# Whisper's previous-text prompt: example questions of the world, so "heart" is not heard as "hard" and
# "triangle" not as "try and go". Of three wordings tried (a word list, example questions, a descriptive
# sentence) example questions won on every design voice: they also keep the question form ("Is there ...?"
# rather than "There is ..."). It biases the transcript; it never appears in it.
# Tried since, on the design voices only (scripts/whisper_wer.py, 60 questions a voice, seeds 0 and 1): adding
# the phrasings they were misheard in ("Count the shapes.", "What's the color of the circle?", "Which shape is at
# the top?", "Is the white heart left or right of the triangle?", "And what size is it?") took mean WER from
# 0.077 to 0.027 (seed 0) and 0.055 to 0.024 (seed 1), and on the held-out voices (300 eval questions) from
# 0.158 to 0.136 -- but it hears the demo's held-out-voice "What is left of the star?" as "left on", and
# every variant tried did too. Not adopted: neither reaches the 0.10 gate; adapting Whisper is the way on.
INITIAL_PROMPT = (
    "What color is the heart? Is there a yellow star? How many shapes are there? Where is the purple "
    "diamond? What is left of the star? Is the circle above or below the square? Describe the picture."
)
DESIGN_VOICES = ("en-us", "en-gb", "en-us+m3")
HELDOUT_VOICES = ("en-gb-x-rp", "en-029")
RATES = (150, 165, 180)  # words per minute, varied per question
# Voices that teach Whisper the world (`mmgpt.toy.whisper_adapt`): every English espeak-ng voice but the
# held-out ones, with male variants (the female ones add breath noise that espeak-ng does not seed the same
# in every process) and a wider spread of rates.
ADAPT_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc")
ADAPT_VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7")
ADAPT_RATES = (140, 150, 165, 180, 195)


# English that is not the world's, to check that adapting Whisper to the world did not cost general English:
# IEEE "Harvard" sentences (public domain), heard in the held-out voices.
GENERAL_SENTENCES = (
    "The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.", "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.", "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.", "The boy was there when the sun rose.",
    "Kick the ball straight and follow through.", "Help the woman get back to her feet.",
)


def spoken_rows(rows: Sequence[dict]) -> list[dict]:
    """The questions to speak: one per image (its first), so every held-out image is heard once."""
    seen: set[int] = set()
    out = []
    for r in rows:
        if r["image_id"] not in seen:
            seen.add(r["image_id"])
            out.append(r)
    return out


def synthesize_rows(rows: Sequence[dict], voices: Sequence[str], seed: int = 0) -> tuple[list[dict], list[bytes]]:
    """Each row's question as WAV bytes, voices taken in turn; rows gain "voice" and "rate"."""
    from mmgpt.tts import synthesize_wav

    rng = random.Random(seed)
    out_rows, audio = [], []
    for k, r in enumerate(rows):
        voice, rate = voices[k % len(voices)], rng.choice(RATES)
        audio.append(synthesize_wav(r["question"], voice, rate=rate))
        out_rows.append({**r, "voice": voice, "rate": rate})
    return out_rows, audio
