"""Whisper -> ONNX encoder, decoder and decoder-with-past, via optimum's exporter (it does this job
well), plus its feature-extractor and tokenizer files. Checked by transcribing the same audio in
PyTorch and in ONNX Runtime with the shared greedy loop: the transcripts must be identical."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from mmgpt import names
from mmgpt.checkpoint import Components
from mmgpt.export.common import Parity, check, max_diff, quantize_matmuls_int8, write_export_config

TOLERANCE = 1e-3


def test_audio(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A deterministic chirp plus noise: not speech, but it drives every part of the model."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def quantize_whisper(out_dir: Path) -> tuple[str, str, str]:
    """Write int8 twins of the three ONNX files (dynamic quantization of MatMul/Gemm weights, activations per
    call; the convolutions stay fp32) -> their names. On a CPU the encoder's GEMMs are compute-bound, so int8
    kernels (VNNI) halve its time; it is what faster-whisper runs on CPUs by default (CTranslate2 int8)."""
    for fp32, int8 in names.WHISPER_INT8_ONNX.items():
        quantize_matmuls_int8(out_dir / fp32, out_dir / int8)
    return tuple(names.WHISPER_INT8_ONNX.values())


def _same_transcript(name: str, want: list[int], got: list[int], tolerance: float, note: str = "") -> Parity:
    """0 when the token ids are identical, else 1; the detail says how far they agree."""
    same = next((i for i, (x, y) in enumerate(zip(want, got)) if x != y), min(len(want), len(got)))
    return Parity(name, 0.0 if want == got else 1.0, tolerance, f"{len(want)} tokens, identical prefix {same}{note}")


def export_whisper(c: Components, out_dir: Path, source: str, *, int8: bool = False) -> list[Parity]:
    from optimum.exporters.onnx import main_export

    from mmgpt.preprocess import audio_features
    from mmgpt.runtime import OrtWhisper
    from mmgpt.speech import TorchWhisper, transcribe_ids

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # optimum exports from a folder; write the (possibly hub-loaded) model there first
        c.whisper.save_pretrained(tmp, safe_serialization=True)
        c.feature_extractor.save_pretrained(tmp)
        c.whisper_tokenizer.save_pretrained(tmp)
        main_export(tmp, output=out_dir, task="automatic-speech-recognition-with-past", no_post_process=True,
                    do_validation=False)
    ort = OrtWhisper(out_dir)
    ref = TorchWhisper(c.whisper)
    results = []
    for seconds in (1.5, 4.0):
        feats = audio_features(test_audio(seconds), c.feature_extractor)
        ref.encode(feats)
        ort.encode(feats)
        results.append(Parity(f"whisper encoder {seconds:g}s", max_diff(ref.encoder_out.numpy(), ort.encoder_hidden), TOLERANCE))
        a = ref.step(list(c.config.speech.prompt_ids))
        b = ort.step(list(c.config.speech.prompt_ids))
        results.append(Parity(f"whisper decoder logits {seconds:g}s", max_diff(a, b), TOLERANCE))
        want = transcribe_ids(ref, feats, c.config.speech)
        got = transcribe_ids(ort, feats, c.config.speech)
        results.append(_same_transcript(f"whisper transcript {seconds:g}s", want, got, 0.0))
    check(results)
    files, precision = names.WHISPER_FP32_ONNX, "fp32"
    if int8:
        # Judged and reported, not enforced (a quantized model is not meant to match fp32 bit for bit): do the
        # transcripts of real speech (the shipped question) and of the test signal stay the same?
        files, precision = quantize_whisper(out_dir), "int8 (dynamic quantization: int8 MatMul/Gemm weights)"
        quant = OrtWhisper(out_dir, files=files)
        fp32 = OrtWhisper(out_dir, files=names.WHISPER_FP32_ONNX)
        for name, feats in _judged_audio(c):
            want, got = transcribe_ids(fp32, feats, c.config.speech), transcribe_ids(quant, feats, c.config.speech)
            judged = _same_transcript(f"whisper int8 transcript {name}", want, got, float("inf"),
                                      f" ({'identical' if want == got else 'DIFFERS'}; judged, not enforced)")
            print(judged.line(), flush=True)
            results.append(judged)
    write_export_config(
        out_dir, kind="whisper", precision=precision, source=source,
        inputs={"input_features": {"dtype": "FP32", "shape": ["batch", c.whisper.config.num_mel_bins, 3000]}},
        outputs={"last_hidden_state": {"dtype": "FP32", "shape": ["batch", 1500, c.whisper.config.d_model]}},
        parity=results, encoder=files[0], decoder=files[1], decoder_with_past=files[2],
    )
    return results


def _judged_audio(c: Components) -> list[tuple[str, np.ndarray]]:
    """The int8 judge's inputs: the spoken question shipped for the demo, and the 4 s test signal."""
    from mmgpt.preprocess import audio_features, load_audio
    from mmgpt.serving.demo import asset

    return [("demo.wav", audio_features(load_audio(asset("demo.wav").read_bytes()), c.feature_extractor)),
            ("4s signal", audio_features(test_audio(4.0), c.feature_extractor))]
