"""Real pretrained weights (microsoft/phi-2, CLIP, Whisper): skipped by default.

Run with `pytest -m real_weights` on a machine with the hub (or HF_HOME holding the models) and
~16 GB of free memory. Set MMGPT_REAL_PRESET to choose the preset (default phi-2).
"""

import io
import os

import numpy as np
import pytest

pytestmark = pytest.mark.real_weights


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    os.environ.pop("HF_HUB_OFFLINE", None)  # these tests may download
    from mmgpt.presets import create

    return create(os.environ.get("MMGPT_REAL_PRESET", "phi-2"), tmp_path_factory.mktemp("real"))


def test_real_text_answer_is_english(real_checkpoint):
    from mmgpt.generation import SamplingParams
    from mmgpt.inference import Assistant

    bot = Assistant.load(real_checkpoint)
    answer = bot.ask("What is the capital of France?", params=SamplingParams(max_tokens=32)).text
    assert "Paris" in answer


def test_real_whisper_hears_silence_as_little(real_checkpoint):
    import soundfile as sf

    from mmgpt.inference import Assistant

    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000, np.float32), 16000, format="WAV")
    assert len(Assistant.load(real_checkpoint).transcribe(buf.getvalue())) < 40
