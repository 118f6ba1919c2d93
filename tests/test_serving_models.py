"""The four model.py files under the fake pb_utils, on the assembled repository of the tiny export.

The entry point's BLS calls are wired to the other three models running in this process, so the whole
served pipeline runs here without a server and is compared with `Assistant.from_export`.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from fake_pb_utils import load_model_module, make_initialize_args, make_request
from serving_fixtures import entry_inputs, png_bytes, wav_bytes

from mmgpt.generation import SamplingParams, generate_ids
from mmgpt.serving import contract as c
from mmgpt.serving.llm import request_tensors, stop_tensors
from mmgpt.template import Message, prompt_ids

pytest_plugins = ("serving_fixtures",)


@pytest.fixture
def pb(monkeypatch):
    import fake_pb_utils

    # model.py files set these for their own process; here they must not outlive the test (set, then
    # deleted: monkeypatch restores the state before the set, absent keys included).
    for key in ("USE_TORCH", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    return fake_pb_utils.install(monkeypatch)


def load(repo, name, pb):
    module = load_model_module(repo / name / "1" / "model.py")
    model = module.TritonPythonModel()
    model.initialize(make_initialize_args((repo / name / "config.pbtxt").read_text(), model_repository=str(repo / name)))
    return model


@pytest.fixture
def models(served_repo, pb):
    loaded = {name: load(served_repo, name, pb) for name in c.MODELS}

    def plain(name):
        return lambda request: loaded[name].execute([request])

    def decoupled(request):
        loaded[c.LLM].execute([request])
        return request.response_sender.wait_final(30)

    pb.register_bls(c.WHISPER, plain(c.WHISPER))
    pb.register_bls(c.VISION, plain(c.VISION))
    pb.register_bls(c.LLM, decoupled)
    yield loaded
    for model in loaded.values():
        if hasattr(model, "finalize"):
            model.finalize()


@pytest.fixture(scope="module")
def exported(tiny_export):
    from mmgpt.inference import Assistant

    return Assistant.from_export(tiny_export)


# ------------------------------------------------------------------------------------------------
# llm
# ------------------------------------------------------------------------------------------------


def test_llm_streams_tensorrt_llm_style_responses(models, pb, exported):
    cfg = exported.config
    ids = exported.prompt("hello there", has_image=False)
    params = SamplingParams(max_tokens=12)
    want = list(generate_ids(exported.new_decoder(), ids, None, params, eos_id=cfg.eos_token_id,
                             vocab_limit=len(exported.tokenizer), max_context=cfg.max_context))
    request = make_request(request_tensors(ids, None, params, end_id=cfg.eos_token_id, pad_id=cfg.pad_token_id),
                           request_id="11")
    assert models[c.LLM].execute([request]) is None  # decoupled: answered from the batcher's thread
    responses = request.response_sender.wait_final(30)
    got = []
    for r in responses:
        out_ids, length = r.output(c.OUTPUT_IDS), r.output(c.SEQUENCE_LENGTH)
        assert out_ids.shape == (1, 1, 1) and out_ids.dtype == np.int32 and length.tolist() == [[1]]
        got.append(int(out_ids[0, 0, 0]))
    assert got == want
    assert request.response_sender.sent[-1] == (None, pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    metrics = models[c.LLM].metrics
    deadline = time.monotonic() + 5  # the counters are updated when the iteration that sent the end is over
    while not (metrics.tokens.value() >= len(want) and metrics.steps.value() > 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert metrics.tokens.value() >= len(want) and metrics.steps.value() > 0


def test_llm_errors_travel_in_the_error_output(models, pb):
    bad = make_request(request_tensors([1, 2], None, SamplingParams(max_tokens=4), end_id=0, pad_id=1)
                       | {c.LLM_TEMPERATURE: np.array([[-1.0]], np.float32)})
    models[c.LLM].execute([bad])
    [response] = bad.response_sender.wait_final(5)
    assert not response.has_error()  # a BLS caller would never see an error response
    assert b"temperature" in response.output(c.LLM_ERROR)[0, 0]


def test_llm_stop_request_ends_the_running_request(models, pb):
    long = make_request(request_tensors([1, 2, 3], None, SamplingParams(max_tokens=400), end_id=-1, pad_id=1),
                        request_id="99")
    stop = make_request(stop_tensors(), request_id="99")
    llm = models[c.LLM]
    llm.batcher.shutdown()  # drive it by hand: the stop lands mid-generation
    batcher = llm.stage.batcher(4)
    llm.batcher = batcher
    llm.execute([long])
    for _ in range(3):
        batcher.step()
    llm.execute([stop])
    assert stop.response_sender.wait_final(1) == []
    batcher.run_until_idle()
    assert long.response_sender.final and 0 < len(long.response_sender.responses) < 10
    assert batcher.stats.cancelled == 1


# ------------------------------------------------------------------------------------------------
# whisper and vision_encoder
# ------------------------------------------------------------------------------------------------


def test_whisper_transcribes_and_names_bad_audio(models, pb, exported):
    wav = wav_bytes(1.5, 44100, channels=2)
    good = make_request({c.AUDIO_INPUT: c.one_bytes(wav)})
    bad = make_request({c.AUDIO_INPUT: c.one_bytes(b"RIFF....nonsense")})
    too_long = make_request({c.AUDIO_INPUT: c.one_bytes(wav_bytes(6.0))})
    r_good, r_bad, r_long = models[c.WHISPER].execute([good, bad, too_long])
    assert r_good.output(c.TRANSCRIPT)[0].decode() == exported.transcribe(wav)
    assert r_bad.error().code() == pb.TritonError.INVALID_ARG and "audio could not be decoded" in r_bad.error().message()
    assert "over the limit of 5 s" in r_long.error().message()


def test_vision_encodes_a_dynamic_batch_in_one_call(models, exported):
    images = [png_bytes(40, 30, seed=s) for s in range(3)]
    from mmgpt.preprocess import load_image, pixel_values

    pixels = [pixel_values([load_image(b)], exported.image_processor) for b in images]
    requests = [make_request({c.PIXEL_VALUES: p}) for p in pixels]
    stage = models[c.VISION].stage
    calls, encoder = [], stage.encoder
    stage.encoder = lambda batch: calls.append(batch.shape[0]) or encoder(batch)
    try:
        responses = models[c.VISION].execute(requests)
    finally:
        stage.encoder = encoder
    assert calls == [3]  # the three requests of the dynamic batch went through the encoder in one run
    for image, response in zip(images, responses):
        np.testing.assert_allclose(response.output(c.IMAGE_EMBEDS)[0], exported.image_embeddings(image), atol=1e-5)


def test_vision_encodes_a_repeated_image_once_and_counts_it(models, exported):
    from mmgpt.preprocess import load_image, pixel_values

    model = models[c.VISION]
    a, b = (pixel_values([load_image(png_bytes(40, 30, seed=s))], exported.image_processor) for s in (7, 8))
    first = model.execute([make_request({c.PIXEL_VALUES: a})])[0].output(c.IMAGE_EMBEDS)[0]
    # the same image again, alone and beside a new one in a dynamic batch
    again, other = model.execute([make_request({c.PIXEL_VALUES: a}), make_request({c.PIXEL_VALUES: b})])
    np.testing.assert_array_equal(again.output(c.IMAGE_EMBEDS)[0], first)
    np.testing.assert_allclose(other.output(c.IMAGE_EMBEDS)[0], exported.encode_image(b)[0], atol=1e-5)
    assert (model.encoded.value(), model.hits.value()) == (2, 1)  # /metrics: a and b encoded, a's repeat a hit


# ------------------------------------------------------------------------------------------------
# multimodal, over the other three
# ------------------------------------------------------------------------------------------------


def ask(models, inputs):
    request = make_request(inputs)
    assert models[c.MULTIMODAL].execute([request]) is None
    responses = request.response_sender.wait_final(60)
    return request.response_sender, responses


def joined(responses, name):
    return "".join(r.output(name)[0].decode() for r in responses if r.output(name) is not None)


@pytest.mark.parametrize("stream", [True, False])
def test_entry_point_answers_like_the_in_process_pipeline(models, exported, stream):
    image, audio = png_bytes(50, 40, seed=3), wav_bytes(1.2, 16000)
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    sender, responses = ask(models, entry_inputs("What do you see?", image_input=image, audio_input=audio,
                                                 history=json.dumps(history), stream=stream))
    want = exported.ask("What do you see?", image=image, audio=audio,
                        history=[Message(m["role"], m["content"]) for m in history])
    assert not sender.errors
    assert joined(responses, c.TEXT_OUTPUT) == want.text
    assert joined(responses, c.TRANSCRIPT) == want.transcript and want.transcript
    if stream:
        assert len(responses) > 2 and responses[0].output(c.TEXT_OUTPUT)[0] == b""  # the transcript comes first
    else:
        assert len(responses) == 1


def test_entry_point_rejects_bad_input_per_request(models, pb):
    sender, _ = ask(models, entry_inputs("q", image_input=b"garbage"))
    [error] = sender.errors
    assert error.code() == pb.TritonError.INVALID_ARG and "image could not be decoded" in error.message()
    sender, _ = ask(models, entry_inputs("", audio_input=b"garbage"))
    assert "audio could not be decoded" in sender.errors[0].message()
    sender, responses = ask(models, entry_inputs("still fine?", max_tokens=5, stream=False))
    assert not sender.errors and len(responses) == 1


def test_entry_point_sends_llm_failures_as_errors(models, pb):
    pb.register_bls(c.LLM, lambda request: [pb.InferenceResponse([pb.Tensor(c.LLM_ERROR, np.array([[b"kaput"]], object))])])
    sender, _ = ask(models, entry_inputs("q"))
    [error] = sender.errors
    assert error.code() == pb.TritonError.INTERNAL and "kaput" in error.message()


def test_prompt_ids_of_the_entry_point_are_the_templates(models, exported, pb):
    """What the entry point sends the llm model is exactly prompt_ids(...): the template's tokens, image
    positions as ids from the vocab size up, and the image's rows as the prompt table."""
    sent = []

    def llm(request):
        sent.append({t.name(): t.as_numpy() for t in request.inputs()})
        models[c.LLM].execute([request])
        return request.response_sender.wait_final(30)

    pb.register_bls(c.LLM, llm)
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    image = png_bytes(50, 40, seed=4)
    sender, _ = ask(models, entry_inputs("What is it?", image_input=image, history=json.dumps(history)))
    assert not sender.errors and len(sent) == 1
    want = prompt_ids(exported.config, exported.tokenizer, [Message(m["role"], m["content"]) for m in history],
                      "What is it?", has_image=True)
    got = sent[0][c.INPUT_IDS].reshape(-1)[: int(sent[0][c.INPUT_LENGTHS].reshape(-1)[0])]
    assert got.tolist() == want
    vocab, n = exported.config.llm_vocab_size, exported.config.num_image_tokens
    assert [i for i in want if i >= vocab] == list(range(vocab, vocab + n))
    table = sent[0][c.PROMPT_EMBEDDING_TABLE].reshape(n, -1)
    np.testing.assert_allclose(table, exported.image_embeddings(image), atol=1e-5)
