"""`mmgpt ask` as a user runs it: a separate process, the embedded default, files from disk."""

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
    r = run("ask", "--text", "Hello", "--max-tokens", "16")
    assert r.returncode == 0, r.stderr
    want = Assistant.load(tiny_checkpoint, load_whisper=False).ask("Hello", params=SamplingParams(max_tokens=16)).text
    assert r.stdout == want + "\n" and want


def test_ask_with_image_and_audio(files, tiny_checkpoint):
    r = run("ask", "--text", "What is this?", "--image", str(files / "img.png"), "--audio", str(files / "q.wav"), "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    ref = Assistant.load(tiny_checkpoint).ask(
        "What is this?", image=(files / "img.png").read_bytes(), audio=(files / "q.wav").read_bytes(),
        params=SamplingParams(max_tokens=12),
    )
    assert r.stdout == ref.text + "\n"
    assert f"[heard] {ref.transcript}" in r.stderr


def test_sampling_flags_are_reproducible():
    args = ("ask", "--text", "Hi", "--max-tokens", "12", "--temperature", "1.0", "--top-p", "0.9", "--top-k", "40", "--seed", "5")
    a, b = run(*args), run(*args)
    assert a.returncode == 0 and a.stdout == b.stdout


def test_bad_inputs_exit_with_a_message(files):
    r = run("ask", "--text", "x", "--image", str(files / "bad.png"))
    assert r.returncode == 2 and "image could not be decoded" in r.stderr
    r = run("ask", "--text", "x", "--temperature", "-1")
    assert r.returncode == 2 and "temperature" in r.stderr
    r = run("ask", "--text", "x", "--image", str(files / "missing.png"))
    assert r.returncode != 0 and "not found" in r.stderr
    r = run("ask")
    assert r.returncode != 0 and "--text" in r.stderr
