"""The encoders side by side: CLIP vision towers (+ the projector) in ONNX Runtime fp32/int8 against
PyTorch, and Whisper base (one 30 s window, then decoding with the cache) in ONNX Runtime against
transformers `generate()` and CTranslate2 (faster-whisper's engine) fp32 and int8, on the same weights, ours at fp32
and int8 (`make export INT8=1`)."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch

from .llm import interleaved_seconds, median_seconds

WHISPER_TOKENS = 64  # decoded per window: every engine is made to produce exactly this many (end token suppressed)
WINDOW_S = 30.0


def vision(name: str, work: Path, threads: int, batches: tuple[int, ...], repeats: int) -> dict:
    """Images/s of CLIP `name` + projector (to Phi-2's width) at each batch: PyTorch, ORT fp32, ORT int8."""
    from mmgpt import names
    from mmgpt.checkpoint import Components
    from mmgpt.config import MMGPTConfig
    from mmgpt.export.vision import VisionForExport, export_vision
    from mmgpt.model import MultimodalPhi
    from mmgpt.runtime import OrtVision

    from .models import CLIP, PHI2, clip_vision

    v = CLIP[name]
    config = MMGPTConfig(preset="bench", vision_source="vision", llm_source="llm", whisper_source="whisper",
                         vision_hidden_size=v["hidden_size"], llm_hidden_size=PHI2["hidden_size"],
                         num_image_tokens=(v["image_size"] // v["patch_size"]) ** 2, image_size=v["image_size"])
    model = MultimodalPhi(config, clip_vision(name), None).eval()
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": v["image_size"]},
                                   crop_size={"height": v["image_size"], "width": v["image_size"]})
    out = work / f"vision-{name}"
    export_vision(Components(config, model, None, processor, None, None, None), out, "bench", int8=True)  # INT8=1's files
    torch.set_num_threads(threads)
    wrapper = VisionForExport(model).eval()
    fp32 = OrtVision(out, threads, names.VISION_ONNX)
    int8 = OrtVision(out, threads, names.VISION_INT8_ONNX)
    s = v["image_size"]
    result = {"image_tokens": config.num_image_tokens, "image_size": s}
    for b in batches:
        pixels = np.random.default_rng(b).standard_normal((b, 3, s, s)).astype(np.float32)
        tp = torch.from_numpy(pixels)

        def pt(tp=tp):
            with torch.no_grad():
                wrapper(tp)

        result[f"torch_b{b}_images_per_s"] = b / median_seconds(pt, repeats)
        result[f"ort_fp32_b{b}_images_per_s"] = b / median_seconds(lambda p=pixels: fp32(p), repeats)
        result[f"ort_int8_b{b}_images_per_s"] = b / median_seconds(lambda p=pixels: int8(p), repeats)
    return result


def whisper(work: Path, threads: int, repeats: int) -> dict:
    """Real-time factor of one 30 s window + WHISPER_TOKENS decoded tokens, Whisper base at random weights."""
    import ctranslate2
    from transformers import AutoTokenizer, WhisperFeatureExtractor

    from mmgpt.checkpoint import Components
    from mmgpt.config import MMGPTConfig
    from mmgpt.export.whisper import export_whisper, quantize_whisper, test_audio
    from mmgpt.preprocess import audio_features
    from mmgpt.runtime import OrtWhisper
    from mmgpt.speech import speech_config_for, transcribe_ids
    from mmgpt.whisper_ct2 import tiny_en_dir

    from .models import whisper_base

    # tiny.en and base.en share their tokenizer and feature extractor; only the weights differ in size
    english = tiny_en_dir()
    tokenizer = AutoTokenizer.from_pretrained(english)
    extractor = WhisperFeatureExtractor.from_pretrained(english)
    speech = speech_config_for(str(english), max_tokens=WHISPER_TOKENS)
    # random weights may end at once or never: suppressing the end token makes every engine decode exactly
    # WHISPER_TOKENS tokens, the same work for each
    speech = type(speech)(**{**speech.__dict__, "suppress_ids": (*speech.suppress_ids, speech.eot_id)})
    model = whisper_base()
    config = MMGPTConfig(preset="bench", vision_source="vision", llm_source="llm", whisper_source="whisper", speech=speech)
    hf_dir = work / "whisper-base-hf"
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    extractor.save_pretrained(hf_dir)
    ort_dir = work / "whisper-base-onnx"
    export_whisper(Components(config, None, None, None, model, extractor, tokenizer), ort_dir, "bench")
    feats = audio_features(test_audio(WINDOW_S), extractor)
    torch.set_num_threads(threads)
    result = {"tokens": WHISPER_TOKENS, "window_s": WINDOW_S}

    ort = OrtWhisper(ort_dir, threads)
    # `make export INT8=1`'s Whisper: the same export's int8 twins (what faster-whisper's int8 is compared with)
    ort8 = OrtWhisper(ort_dir, threads, files=quantize_whisper(ort_dir))
    prompt = torch.tensor([list(speech.prompt_ids)])
    tf = torch.from_numpy(feats)

    def run_ort(engine):
        assert len(transcribe_ids(engine, feats, speech)) == WHISPER_TOKENS

    def run_hf():
        with torch.no_grad():
            out = model.generate(tf, decoder_input_ids=prompt, max_new_tokens=WHISPER_TOKENS, min_new_tokens=WHISPER_TOKENS,
                                 do_sample=False, suppress_tokens=list(speech.suppress_ids))
        assert out.shape[1] == WHISPER_TOKENS, out.shape  # Whisper's generate() returns the new tokens only

    def run_ct2(ct2, sv):
        # CTranslate2 decodes at most min(max_length / 2, max_length - prompt) tokens (OpenAI's sample length
        # rule, CTranslate2 issue 1856): twice the tokens wanted gives exactly them
        r = ct2.generate(sv, [list(speech.prompt_ids)], max_length=2 * WHISPER_TOKENS,
                         suppress_tokens=list(speech.suppress_ids), suppress_blank=False, beam_size=1,
                         return_no_speech_prob=False)
        assert len(r[0].sequences_ids[0]) == WHISPER_TOKENS, len(r[0].sequences_ids[0])

    # Timed in turns, every engine once a round (the ratios are taken within a round), in two groups: ONNX Runtime
    # with transformers, then, once CTranslate2 is loaded, ours at int8 again with it. Once CTranslate2 had run in
    # the process, transformers' calls took ~1.2x as long (and ours ~1.1x), even 0.5 s after it.
    ours = {"ort_fp32": lambda: run_ort(ort), "ort_int8": lambda: run_ort(ort8)}
    rounds = [interleaved_seconds({**ours, "transformers_fp32": run_hf}, repeats)]
    sv = ctranslate2.StorageView.from_array(feats)
    ct2_runs = {"ort_int8": ours["ort_int8"]}
    for compute in ("float32", "int8"):
        ct2_dir = work / f"whisper-base-ct2-{compute}"
        if not (ct2_dir / "model.bin").is_file():
            ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(
                str(ct2_dir), quantization=None if compute == "float32" else "int8", force=True)
        ct2 = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type=compute, intra_threads=threads)
        ct2_runs[f"ctranslate2_{compute}"] = lambda ct2=ct2: run_ct2(ct2, sv)
    rounds.append(interleaved_seconds(ct2_runs, repeats))
    result["rtf_rounds"] = [{name: [t / WINDOW_S for t in ts] for name, ts in group.items()} for group in rounds]
    for group in result["rtf_rounds"]:
        for name, rtfs in group.items():
            result.setdefault(f"{name}_rtf", statistics.median(rtfs))  # ours at int8: beside transformers
    return result
