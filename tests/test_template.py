"""The chat template: what is supervised, where the image goes, and how bad conversations are refused."""

import pytest

from mmgpt.template import (
    IGNORE_INDEX,
    Message,
    encode_conversation,
    join_question,
    parse_history,
    prompt_ids,
)


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def tok(tiny_components):
    return tiny_components.tokenizer


@pytest.fixture(scope="module")
def cfg(tiny_components):
    return tiny_components.config


def test_multi_turn_labels_token_by_token(tok, cfg):
    msgs = [
        Message("user", "What is it?", image=True),
        Message("assistant", "A red circle."),
        Message("user", "And the background?"),
        Message("assistant", "White."),
    ]
    e = encode_conversation(tok, msgs, system_prompt="SYS", num_image_tokens=4, vocab_size=1000, add_generation_prompt=False)
    eos = tok.eos_token_id
    M = lambda ids: [IGNORE_INDEX] * len(ids)  # noqa: E731
    parts = [
        (enc(tok, "SYS\n\n"), False),
        (enc(tok, "User: "), False),
        ([1000, 1001, 1002, 1003], False),
        (enc(tok, "\n"), False),
        (enc(tok, "What is it?"), False),
        (enc(tok, "\nAssistant:"), False),
        (enc(tok, " A red circle.") + [eos], True),
        (enc(tok, "\n"), False),
        (enc(tok, "User: ") + enc(tok, "And the background?") + enc(tok, "\nAssistant:"), False),
        (enc(tok, " White.") + [eos], True),
        (enc(tok, "\n"), False),
    ]
    want_ids = [i for ids, _ in parts for i in ids]
    want_labels = [lab for ids, sup in parts for lab in (ids if sup else M(ids))]
    assert e.input_ids == want_ids
    assert e.labels == want_labels
    # every answer's end token is supervised: the model learns to stop after each turn
    assert [i for i, lab in enumerate(e.labels) if lab == eos] == [i for i, t in enumerate(e.input_ids) if t == eos]
    assert sum(1 for lab in e.labels if lab == eos) == 2


def test_generation_prompt_ends_at_assistant(tok, cfg):
    history = [Message("user", "Hi"), Message("assistant", "Hello.")]
    ids = prompt_ids(cfg, tok, history, "Describe it.", has_image=True)
    assert ids[-len(enc(tok, "\nAssistant:")):] == enc(tok, "\nAssistant:")
    image_positions = [i for i, t in enumerate(ids) if t >= cfg.llm_vocab_size]
    assert len(image_positions) == cfg.num_image_tokens
    # the image sits at the start of the first user turn, as in training
    first_turn = len(enc(tok, cfg.system_prompt + "\n\n")) + len(enc(tok, "User: "))
    assert image_positions[0] == first_turn < ids.index(tok.eos_token_id)
    assert [ids[i] - cfg.llm_vocab_size for i in image_positions] == list(range(cfg.num_image_tokens))


def test_user_text_cannot_forge_image_positions(tok, cfg):
    ids = prompt_ids(cfg, tok, [], "<image> <image>", has_image=False)
    assert max(ids) < cfg.llm_vocab_size


@pytest.mark.parametrize(
    "msgs, match",
    [
        ([], "empty"),
        ([Message("assistant", "x")], "expected role 'user'"),
        ([Message("user", "a"), Message("user", "b")], "expected role 'assistant'"),
        ([Message("system", "a")], "role must be"),
        ([Message("user", "a", image=True), Message("assistant", "b"), Message("user", "c", image=True)], "at most one image"),
    ],
)
def test_bad_conversations_are_named(tok, msgs, match):
    with pytest.raises(ValueError, match=match):
        encode_conversation(tok, msgs, system_prompt="", num_image_tokens=1, vocab_size=10, add_generation_prompt=True)


def test_parse_history():
    raw = '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]'
    assert parse_history(raw) == [Message("user", "hi"), Message("assistant", "hello")]
    assert parse_history(b"") == []
    for bad, match in [
        ("{", "not valid JSON"),
        ('{"role": "user"}', "must be a JSON list"),
        ('[{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]', "role must be"),
        ('[{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]', "content must be a string"),
        ('[{"role": "user", "content": "x"}]', "even number"),
        ('[{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]', "expected role 'user'"),
        (b"\xff\xfe", "UTF-8"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_history(bad)


def test_join_question():
    assert join_question("Answer briefly.", "what is this") == "Answer briefly.\nwhat is this"
    assert join_question("", " what is this ") == "what is this"
    with pytest.raises(ValueError, match="no question"):
        join_question("  ", "")


def test_fit_prompt_drops_the_oldest_whole_turns_and_keeps_the_image(tok, cfg):
    from mmgpt.template import fit_prompt, image_token_ids

    history = []
    for i in range(40):
        history += [Message("user", f"question number {i} about the shapes in the picture"),
                    Message("assistant", f"answer number {i}: a red circle left of a blue square")]
    question = "and the last one?"
    full = prompt_ids(cfg, tok, history, question, has_image=True)
    assert len(full) > cfg.max_context  # too long as it is
    ids, dropped = fit_prompt(cfg, tok, history, question, has_image=True, room=64)
    assert dropped > 0 and dropped % 2 == 0  # whole turns: a question with its answer
    assert len(ids) <= cfg.max_context - 64
    assert ids == prompt_ids(cfg, tok, history[dropped:], question, has_image=True)  # exactly the newest turns
    # the fewest turns: keeping one more would not fit
    assert len(prompt_ids(cfg, tok, history[dropped - 2 :], question, has_image=True)) > cfg.max_context - 64
    image = image_token_ids(cfg.llm_vocab_size, cfg.num_image_tokens)
    assert ids.count(image[0]) == 1 and ids[ids.index(image[0]) : ids.index(image[0]) + len(image)] == image
    # a conversation that fits is left alone
    assert fit_prompt(cfg, tok, history[:2], question, has_image=True, room=64) == (
        prompt_ids(cfg, tok, history[:2], question, has_image=True), 0)
    # a question that alone leaves less room than asked: every earlier turn goes, the question stays
    long_question = "why " * (cfg.max_context - 40)
    ids, dropped = fit_prompt(cfg, tok, history[:4], long_question, has_image=False, room=64)
    assert dropped == 4 and ids == prompt_ids(cfg, tok, [], long_question, has_image=False)
