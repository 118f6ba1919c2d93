"""`mmgpt ask` as a user runs it: a separate process, files from disk; the tiny preset for the mechanics, the
embedded (trained toy) default for right answers and the real Whisper's transcripts."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmgpt.generation import SamplingParams
from mmgpt.inference import Assistant


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mmgpt.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    Image.new("RGBA", (120, 80), (0, 128, 0, 200)).save(d / "img.png")
    t = np.arange(int(1.2 * 48000)) / 48000
    sf.write(d / "q.wav", np.stack([np.sin(2 * np.pi * 330 * t)] * 2, 1) * 0.3, 48000)
    (d / "bad.png").write_bytes(b"definitely not a png")
    return d


def test_ask_text_prints_the_reference_answer(tiny_checkpoint):
    r = run("ask", "--checkpoint", str(tiny_checkpoint), "--text", "Hello", "--max-tokens", "16")
    assert r.returncode == 0, r.stderr
    want = Assistant.load(tiny_checkpoint, load_whisper=False).ask("Hello", params=SamplingParams(max_tokens=16)).text
    assert r.stdout == want + "\n" and want


def test_ask_with_image_and_audio(files, tiny_checkpoint):
    r = run("ask", "--checkpoint", str(tiny_checkpoint), "--text", "What is this?", "--image", str(files / "img.png"),
            "--audio", str(files / "q.wav"), "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    ref = Assistant.load(tiny_checkpoint).ask(
        "What is this?", image=(files / "img.png").read_bytes(), audio=(files / "q.wav").read_bytes(),
        params=SamplingParams(max_tokens=12),
    )
    assert r.stdout == ref.text + "\n"
    assert f"[heard] {ref.transcript}" in r.stderr


def test_ask_audio_hears_the_demo_question_and_answers_about_the_image():
    from mmgpt.serving.demo import asset
    from mmgpt.toy.generate import DEMO_SPOKEN

    r = run("ask", "--image", str(asset("demo.png")), "--audio", str(asset("demo.wav")))
    assert r.returncode == 0, r.stderr
    assert f"[heard] {DEMO_SPOKEN[0]}" in r.stderr
    assert r.stdout.strip().endswith(".") and len(r.stdout.split()) < 30  # a sentence about the picture


def test_the_default_answers_the_demo_questions_right():
    from mmgpt.serving.demo import asset
    from mmgpt.toy.generate import DEMO_QA, DEMO_SPOKEN
    from mmgpt.toy.world import normalize

    question, answer = DEMO_QA[0]
    r = run("ask", "--image", str(asset("demo.png")), "--text", question)
    assert r.returncode == 0, r.stderr
    assert normalize(r.stdout) == normalize(answer)
    r = run("ask", "--image", str(asset("demo.png")), "--audio", str(asset("demo.wav")))
    assert r.returncode == 0, r.stderr
    assert normalize(r.stdout) == normalize(DEMO_SPOKEN[1])


def test_ask_audio_prints_the_real_whispers_transcript_of_any_english(tmp_path):
    from mmgpt.speech import word_error_rate
    from mmgpt.tts import synthesize_wav

    said = "The weather will be cold and windy tomorrow, so bring a warm coat."
    (tmp_path / "q.wav").write_bytes(synthesize_wav(said, "en-us"))
    r = run("ask", "--audio", str(tmp_path / "q.wav"), "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    heard = next(line.removeprefix("[heard] ") for line in r.stderr.splitlines() if line.startswith("[heard] "))
    assert word_error_rate([said], [heard]) <= 0.2, heard


def test_sampling_flags_are_reproducible(tiny_checkpoint):
    args = ("ask", "--checkpoint", str(tiny_checkpoint), "--text", "Hi", "--max-tokens", "12", "--temperature", "1.0", "--top-p", "0.9", "--top-k", "40", "--seed", "5")
    a, b = run(*args), run(*args)
    assert a.returncode == 0 and a.stdout == b.stdout  # the same seed, the same answer
    other_seed = run(*args[:-1], "6")
    greedy = run(*args[:7])  # no sampling flags: greedy
    assert other_seed.returncode == 0 and greedy.returncode == 0
    assert other_seed.stdout != a.stdout  # another seed samples another answer
    assert greedy.stdout != a.stdout  # and sampling is not greedy


def test_bad_inputs_exit_with_a_message(files):
    r = run("ask", "--text", "x", "--image", str(files / "bad.png"))
    assert r.returncode == 2 and "image could not be decoded" in r.stderr
    r = run("ask", "--text", "x", "--temperature", "-1")
    assert r.returncode == 2 and "temperature" in r.stderr
    r = run("ask", "--text", "x", "--image", str(files / "missing.png"))
    assert r.returncode != 0 and "not found" in r.stderr
    r = run("ask")
    assert r.returncode != 0 and "--text" in r.stderr


def test_speech_points_a_checkpoint_at_another_whisper_and_prompt(tmp_path, tiny_checkpoint):
    import shutil

    from mmgpt.config import MMGPTConfig
    from mmgpt.speech import word_error_rate
    from mmgpt.tts import synthesize_wav
    from mmgpt.whisper_ct2 import tiny_en_dir, tiny_en_speech_config

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    before = (ckpt / "mmgpt_config.json").read_text()
    length = MMGPTConfig.load(ckpt).speech.max_tokens  # the transcript's length limit is the checkpoint's
    # Not a Whisper: refused with a message, and the checkpoint is left as it was.
    r = run("speech", str(ckpt), "--whisper", str(ckpt / "vision"))
    assert r.returncode == 2 and "not a Whisper" in r.stderr, r.stderr
    assert (ckpt / "mmgpt_config.json").read_text() == before

    prompt = "Is the heart red? Count the squares."
    r = run("speech", str(ckpt), "--whisper", "tiny.en", "--prompt", prompt)
    assert r.returncode == 0, r.stderr
    config = MMGPTConfig.load(ckpt)
    assert config.whisper_source == str(tiny_en_dir())
    assert config.speech == tiny_en_speech_config(initial_prompt=prompt, max_tokens=length)
    # The random tiny Whisper would babble; the checkpoint now hears English with the real tiny.en.
    said = "Please bring the blue umbrella tomorrow."
    (tmp_path / "q.wav").write_bytes(synthesize_wav(said, "en-us"))
    r = run("ask", "--checkpoint", str(ckpt), "--audio", str(tmp_path / "q.wav"), "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    heard = next(line.removeprefix("[heard] ") for line in r.stderr.splitlines() if line.startswith("[heard] "))
    assert word_error_rate([said], [heard]) <= 0.2, heard

    r = run("speech", str(ckpt), "--prompt", "")  # the prompt goes, the Whisper stays
    assert r.returncode == 0, r.stderr
    assert MMGPTConfig.load(ckpt).speech == tiny_en_speech_config(max_tokens=length)
    assert run("speech", str(ckpt)).returncode != 0
