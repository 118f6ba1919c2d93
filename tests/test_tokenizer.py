"""The tiny preset's offline tokenizers."""

from mmgpt.presets import tiny_tokenizer, tiny_whisper_tokenizer


def test_round_trip_any_text(tiny_components):
    tok = tiny_components.tokenizer
    for text in ["Hello, world!", "a red circle", "ünïcödé 🙂 日本語", "  spaces\n\ttabs  ", "<image> <|pad|>x"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text


def test_pad_is_distinct_from_eos(tiny_components):
    tok = tiny_components.tokenizer
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert tiny_components.config.pad_token_id == tok.pad_token_id
    assert tiny_components.config.eos_token_id == tok.eos_token_id
    assert tok.model_input_names == ["input_ids", "attention_mask"]


def test_training_is_deterministic():
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    w = tiny_whisper_tokenizer()
    assert w.convert_tokens_to_ids("<|startoftranscript|>") != w.unk_token_id
