"""Choosing tokens and turning them into streamed text: the same code for PyTorch, ORT and Triton."""

import numpy as np
import pytest

from mmgpt.generation import Sampler, SamplingParams, TextStream, generate_ids
from mmgpt.preprocess import InputError


def test_greedy_is_argmax_within_vocab_limit():
    logits = np.array([0.1, 0.5, 0.2, 9.0])
    assert Sampler(SamplingParams(), vocab_limit=4)(logits) == 3
    assert Sampler(SamplingParams(), vocab_limit=3)(logits) == 1  # rows past the tokenizer never come out


def test_seeded_sampling_is_reproducible_and_filters():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))

    def draw(p: SamplingParams) -> list[int]:
        sample = Sampler(p, 4)  # one sampler, 200 draws from its own RNG
        return [sample(logits) for _ in range(200)]

    p = SamplingParams(temperature=1.0, seed=7)
    assert draw(p) == draw(p)
    assert draw(p) != draw(SamplingParams(temperature=1.0, seed=8))
    assert set(draw(SamplingParams(temperature=1.0, top_k=2, seed=1))) == {0, 1}
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.6, seed=1))) == {0, 1}  # 0.5 < 0.6 -> {0, 1}
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.5, seed=1))) == {0}
    counts = np.bincount(draw(SamplingParams(temperature=1.0, seed=3)), minlength=4)
    assert counts[0] > counts[2] > 0


@pytest.mark.parametrize(
    "params, match",
    [
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(max_tokens=10_000), "max_tokens"),
        (SamplingParams(temperature=-0.1), "temperature"),
        (SamplingParams(temperature=float("nan")), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(top_k=-1), "top_k"),
        (SamplingParams(seed=-1), "seed"),
        (SamplingParams(stop_words=("",)), "stop_words"),
    ],
)
def test_validate_names_the_setting(params, match):
    with pytest.raises(InputError, match=match):
        params.validate(1024)


class ScriptedDecoder:
    """Emits a fixed token sequence: logits peak at the next scripted id."""

    def __init__(self, script, vocab=50):
        self.script, self.vocab, self.i = list(script), vocab, 0
        self.prefills = 0

    def _next(self):
        logits = np.zeros(self.vocab)
        logits[self.script[min(self.i, len(self.script) - 1)]] = 1.0
        self.i += 1
        return logits

    def prefill(self, ids, table):
        self.prefills += 1
        return self._next()

    def step(self, token):
        return self._next()


def test_generate_stops_at_eos_max_tokens_and_context():
    kw = dict(eos_id=0, vocab_limit=50, max_context=100)
    assert list(generate_ids(ScriptedDecoder([5, 6, 0, 7]), [1, 2], None, SamplingParams(), **kw)) == [5, 6]
    assert list(generate_ids(ScriptedDecoder([5, 6, 7, 8]), [1, 2], None, SamplingParams(max_tokens=3), **kw)) == [5, 6, 7]
    kw["max_context"] = 4
    assert list(generate_ids(ScriptedDecoder([5, 6, 7, 8]), [1, 2], None, SamplingParams(max_tokens=10), **kw)) == [5, 6]
    with pytest.raises(InputError, match="over the context"):
        list(generate_ids(ScriptedDecoder([5]), [1, 2, 3, 4], None, SamplingParams(), **kw))


def test_text_stream_holds_split_utf8_and_stop_words(tiny_components):
    tok = tiny_components.tokenizer
    text = " Hello wörld 🙂 STOP after"
    ids = tok.encode(text, add_special_tokens=False)
    stream = TextStream(tok, stop_words=["STOP"])
    pieces = []
    for t in ids:
        piece = stream.push(t)
        assert "\ufffd" not in piece
        pieces.append(piece)
        if stream.stopped:
            break
    pieces.append(stream.finish())
    assert "".join(pieces) == "Hello wörld 🙂 "
    assert not any("S" in p for p in pieces)  # no partial stop word ever streamed
    # without stop words, the pieces join to the decoded text
    s = TextStream(tok)
    assert "".join([s.push(t) for t in ids] + [s.finish()]) == text[1:]
