"""Whisper's previous-text prompt and word error rate, on the tiny random checkpoint (no real weights):
the config round trip, the long decoder prefix in PyTorch and in the exported ONNX decoder, and WER."""

import numpy as np
import pytest

from mmgpt.config import MMGPTConfig, SpeechConfig
from mmgpt.speech import check_prompt, make_speech_config, normalize_words, word_error_rate


# ----------------------------------------------------------------------------------------- word error rate
def test_wer_normalises_case_punctuation_and_whitespace():
    assert normalize_words("  What's LEFT of the\tstar?! ") == ["whats", "left", "of", "the", "star"]
    assert normalize_words("top-left, bottom—right.") == ["top", "left", "bottom", "right"]
    assert word_error_rate(["What color is the heart?"], ["what   color is the HEART"]) == 0.0
    assert word_error_rate(["Is it top-left?"], ["is it top left"]) == 0.0


def test_wer_counts_word_edits_over_reference_words():
    assert word_error_rate(["what color is the heart"], ["what color is the hard"]) == pytest.approx(1 / 5)  # sub
    assert word_error_rate(["what color is the heart"], ["what color the heart"]) == pytest.approx(1 / 5)  # del
    assert word_error_rate(["is there a star"], ["is there a a star now"]) == pytest.approx(2 / 4)  # 2 ins
    assert word_error_rate(["triangle"], ["try and go"]) == pytest.approx(3.0)  # can exceed 1
    # corpus level: edits and reference words summed over pairs, not an average of per-pair rates
    assert word_error_rate(["a b c d", "e"], ["a b c d", "f"]) == pytest.approx(1 / 5)
    assert word_error_rate(["a b"], [""]) == 1.0


def test_wer_rejects_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="2 references but 1"):
        word_error_rate(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no words"):
        word_error_rate(["?!", ""], ["a", "b"])


# -------------------------------------------------------------------------------------------- the config
def test_speech_config_round_trips_and_old_configs_still_load(tiny_checkpoint):
    import json

    from mmgpt.config import CONFIG_NAME

    d = json.loads((tiny_checkpoint / CONFIG_NAME).read_text())
    d["speech"].pop("initial_prompt", None)  # a config written before the field existed
    old = MMGPTConfig.from_dict(d)
    assert old.speech.initial_prompt == ""
    speech = SpeechConfig(prompt_ids=(7, 8, 9, 1, 2), eot_id=0, max_tokens=40, initial_prompt="the words")
    new = old.replace(speech=speech)
    assert MMGPTConfig.from_dict(json.loads(json.dumps(new.to_dict()))) == new


def test_make_speech_config_needs_startofprev_only_for_a_prompt(tiny_components):
    tok = tiny_components.whisper_tokenizer  # the tiny preset's: no <|startofprev|>
    plain = make_speech_config(tok, language="en", max_tokens=48, max_positions=128)
    assert plain.prompt_ids == tiny_components.config.speech.prompt_ids
    check_prompt(plain, tok, max_positions=128)
    with pytest.raises(ValueError, match=r"no <\|startofprev\|> token"):
        make_speech_config(tok, initial_prompt="a red circle", language="en")


# ----------------------------------------------------------------------------------- a long decoder prefix
def _long_prefix_speech(c) -> SpeechConfig:
    """A 30-token previous text before the start sequence (the tiny tokenizer has no <|startofprev|>, so any
    token stands in: what matters is a long prefix fed at once, then cached steps)."""
    speech = c.config.speech
    previous = c.whisper_tokenizer.encode(" a red circle and a blue square on a white background" * 3, add_special_tokens=False)
    assert len(previous) >= 30
    return SpeechConfig(prompt_ids=(*previous[:30], *speech.prompt_ids), eot_id=speech.eot_id, max_tokens=40)


def test_long_prefix_is_prefilled_then_stepped(tiny_components):
    """Feeding the prefix at once then one token at a time gives the logits of one full forward pass."""
    import torch

    from mmgpt.export.whisper import test_audio
    from mmgpt.preprocess import audio_features
    from mmgpt.speech import TorchWhisper, transcribe_ids

    c = tiny_components
    speech = _long_prefix_speech(c)
    feats = audio_features(test_audio(2.0), c.feature_extractor)
    ids = transcribe_ids(TorchWhisper(c.whisper), feats, speech)
    assert len(ids) > 3
    with torch.no_grad():
        full = c.whisper(input_features=torch.from_numpy(feats), decoder_input_ids=torch.tensor([[*speech.prompt_ids, *ids]])).logits[0]
    want = [int(full[len(speech.prompt_ids) - 1 + i].argmax()) for i in range(len(ids))]
    # the loop suppresses nothing here (no suppress ids), so its choices are the full pass's argmaxes
    assert ids == want[: len(ids)]


def test_exported_decoder_handles_a_long_prefix(tiny_components, tiny_export):
    from mmgpt import names
    from mmgpt.export.common import max_diff
    from mmgpt.export.whisper import test_audio
    from mmgpt.preprocess import audio_features
    from mmgpt.runtime import OrtWhisper
    from mmgpt.speech import TorchWhisper, transcribe_ids

    c = tiny_components
    speech = _long_prefix_speech(c)
    ort, ref = OrtWhisper(tiny_export / names.WHISPER_DIR), TorchWhisper(c.whisper)
    for seconds in (1.0, 3.0):
        feats = audio_features(test_audio(seconds, seed=3), c.feature_extractor)
        ref.encode(feats)
        ort.encode(feats)
        assert max_diff(ref.step(list(speech.prompt_ids)), ort.step(list(speech.prompt_ids))) < 1e-3
        assert max_diff(ref.step([5]), ort.step([5])) < 1e-3  # the first cached step after the prefix
        want = transcribe_ids(ref, feats, speech)
        assert len(want) > 3 and transcribe_ids(ort, feats, speech) == want
    assert np.isfinite(ort.step([6])).all()
