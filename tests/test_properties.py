"""Property tests of every parser a request goes through: whatever a client sends (within the tensor types
and shapes Triton enforces from the model configs), the result is a valid request or an `InputError` with a
message, never another exception. Inputs are generated from the contract's own tables (`ENTRY_INPUTS`,
`LLM_INPUTS`), so a new input is covered as soon as it is declared."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmgpt.preprocess import InputError, Limits, load_audio, load_image
from mmgpt.serving import contract as c
from mmgpt.serving.llm import GenerationRequest, StopRequest, parse_request
from mmgpt.serving.multimodal import EntrySettings, Question, parse_question
from mmgpt.template import Message, parse_history

# Derandomized (the same examples every run, no database written) so that CI is repeatable; FUZZ_EXAMPLES=N
# runs N fresh random examples per property instead, to hunt.
_HUNT = os.environ.get("FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_HUNT or 300), deadline=None, suppress_health_check=[HealthCheck.too_slow],
                database=None, derandomize=_HUNT is None)

# Values at the edges of each Triton type, and ordinary ones.
INT32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31)]))
UINT64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 1]))
FP32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
TEXTISH = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda s: s.encode("utf-8")),
    st.sampled_from([b"", b"\xff\xfe", b"[]", b"{}", b"null", b"caf\xe9"]),
)
HISTORY_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20),
              st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", ""]),
                                     "content": st.one_of(st.text(max_size=30), st.integers())})),
    lambda children: st.one_of(st.lists(children, max_size=5), st.dictionaries(st.text(max_size=8), children, max_size=3)),
    max_leaves=12,
).map(lambda v: json.dumps(v).encode())

ELEMENT = {
    "TYPE_STRING": st.one_of(TEXTISH, HISTORY_JSON),
    "TYPE_INT32": INT32,
    "TYPE_UINT64": UINT64,
    "TYPE_FP32": FP32,
    "TYPE_BOOL": st.booleans(),
}
NUMPY = {"TYPE_STRING": np.object_, "TYPE_INT32": np.int32, "TYPE_UINT64": np.uint64, "TYPE_FP32": np.float32,
         "TYPE_BOOL": np.bool_}


def tensor(triton_type: str, dims: list[int], batch: bool):
    """A tensor Triton would accept for this input: its type, its dims (-1: any length, 0 to 6 here)."""
    n = st.integers(0, 6) if -1 in dims else st.just(1)
    dtype = NUMPY[triton_type]

    def build(values: list) -> np.ndarray:
        a = np.array(values, dtype=dtype) if dtype is not np.object_ else np.array(values + [b""], dtype=object)[:-1]
        shape = [len(values)] if -1 in dims else [1]
        return a.reshape([1, *shape] if batch else shape)

    return n.flatmap(lambda k: st.lists(ELEMENT[triton_type], min_size=k, max_size=k)).map(build)


def request(table: dict[str, tuple[str, list[int], bool]], batch: bool, overrides: dict | None = None):
    """Any subset of the optional inputs (the required ones always: Triton refuses a request without them)."""
    fields = {}
    for name, (triton_type, dims, optional) in table.items():
        if name in (overrides or {}):
            strategy = overrides[name]
        elif triton_type.startswith("TYPE_"):
            strategy = tensor(triton_type, dims, batch)
        else:
            continue
        fields[name] = st.one_of(st.none(), strategy) if optional else strategy
    return st.fixed_dictionaries(fields)


ENTRY = EntrySettings(max_tokens_limit=1024, max_image_bytes=10_000, max_image_pixels=10_000)


@FUZZ
@given(request(c.ENTRY_INPUTS, batch=False))
def test_entry_point_request_is_parsed_or_refused_by_name(inputs):
    try:
        q = parse_question(inputs, ENTRY)
    except InputError as e:
        assert str(e)
        return
    assert isinstance(q, Question)
    assert 1 <= q.params.max_tokens <= ENTRY.max_tokens_limit
    assert q.text.strip() or q.audio is not None


PROMPT_TABLE = st.one_of(
    st.integers(0, 4).flatmap(lambda rows: st.sampled_from([8, 7, 0]).map(
        lambda d: np.full((1, rows, d), 0.5, np.float32))),
    st.just(np.zeros((1, 0, 0), np.float32)),
)


@FUZZ
@given(request(c.LLM_INPUTS, batch=True, overrides={c.PROMPT_EMBEDDING_TABLE: PROMPT_TABLE}),
       st.sampled_from(["", "r1"]))
def test_llm_request_is_parsed_or_refused_by_name(inputs, request_id):
    try:
        r = parse_request(inputs, request_id, vocab_size=64, hidden_size=8, max_context=32,
                          default_end_id=0, default_pad_id=1)
    except InputError as e:
        assert str(e)
        return
    if isinstance(r, StopRequest):
        assert r.request_id
        return
    assert isinstance(r, GenerationRequest)
    rows = 0 if r.prompt_table is None else r.prompt_table.shape[0]
    assert 1 <= len(r.input_ids) <= 32 and r.input_ids.min() >= 0 and r.input_ids.max() < 64 + rows


@FUZZ
@given(st.one_of(HISTORY_JSON, TEXTISH))
def test_history_is_parsed_or_refused_with_a_message(raw):
    try:
        messages = parse_history(raw)
    except ValueError as e:  # parse_question turns these into InputError
        assert str(e)
        return
    assert all(isinstance(m, Message) and m.role in ("user", "assistant") for m in messages)
    assert len(messages) % 2 == 0


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (12, 9), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _wav() -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(800, np.float32), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def mutated(valid: bytes):
    """A valid file with bytes flipped, cut or appended: the headers and lengths a broken sender makes."""
    edits = st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), max_size=8)
    return st.tuples(edits, st.integers(1, len(valid)), st.binary(max_size=64)).map(
        lambda t: bytes(_apply(valid, t[0]))[: t[1]] + t[2])


def _apply(data: bytes, edits) -> bytearray:
    out = bytearray(data)
    for at, value in edits:
        out[at] = value
    return out


@FUZZ
@given(st.one_of(st.binary(max_size=300), mutated(_png())))
def test_image_bytes_decode_or_are_refused_by_name(data):
    try:
        img = load_image(data, Limits(max_image_pixels=100_000))
    except InputError as e:
        assert str(e)
        return
    assert img.mode == "RGB" and img.size[0] * img.size[1] <= 100_000


@FUZZ
@given(st.one_of(st.binary(max_size=300), mutated(_wav())))
def test_audio_bytes_decode_or_are_refused_by_name(data):
    try:
        samples = load_audio(data, Limits(max_audio_seconds=5.0))
    except InputError as e:
        assert str(e)
        return
    assert samples.dtype == np.float32 and samples.ndim == 1 and samples.size <= 5 * 16000 + 1


def test_the_generators_reach_valid_requests_too():
    """The properties above would hold vacuously if every generated request were refused: check that valid
    ones come out of the same generators."""
    from hypothesis import find

    quick = settings(max_examples=2000, deadline=None, database=None, derandomize=True)
    find(request(c.ENTRY_INPUTS, batch=False), lambda i: _parses(lambda: parse_question(i, ENTRY)), settings=quick)
    find(mutated(_wav()), lambda d: _parses(lambda: load_audio(d)), settings=quick)


def _parses(fn) -> bool:
    try:
        fn()
        return True
    except InputError:
        return False


@pytest.mark.parametrize("raw", [b'[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]'])
def test_a_well_formed_history_parses(raw):
    assert [m.role for m in parse_history(raw)] == ["user", "assistant"]
