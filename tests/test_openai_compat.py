"""OpenAI chat-completions bodies -> the multimodal contract: what is taken, and how each bad input is refused."""

from __future__ import annotations

import base64

import pytest

from mmgpt.client.openai_compat import APIError, parse_chat_request

PNG = b"\x89PNG\r\n\x1a\nfake"
WAV = b"RIFF....WAVEfmt "


def data_uri(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def test_text_image_audio_history_and_settings_are_translated():
    body = {
        "model": "mmgpt",
        "messages": [
            {"role": "system", "content": "be brief"},
            user({"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": data_uri(PNG)}}),
            {"role": "assistant", "content": "A circle."},
            user({"type": "text", "text": "And this?"},
                 {"type": "input_audio", "input_audio": {"data": base64.b64encode(WAV).decode(), "format": "wav"}}),
        ],
        "max_completion_tokens": 12, "temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": "\n",
        "stream": True, "stream_options": {"include_usage": True},
    }
    r = parse_chat_request(body)
    assert (r.text, r.image, r.audio) == ("And this?", PNG, WAV)  # the earlier image is the conversation's
    assert r.history == ({"role": "user", "content": "What is this?"}, {"role": "assistant", "content": "A circle."})
    assert r.sampling == {"max_tokens": 12, "temperature": 0.5, "top_p": 0.9, "seed": 7, "stop_words": ("\n",)}
    assert r.stream and r.include_usage and r.model == "mmgpt"
    plain = parse_chat_request({"messages": [{"role": "user", "content": "hi"}]})
    assert (plain.text, plain.image, plain.audio, plain.history, plain.sampling, plain.stream) == ("hi", None, None, (), {}, False)


def test_neutral_values_of_unsupported_settings_pass():
    """What clients send by default (logprobs false, penalties 0, a text response format, a user id) is fine."""
    r = parse_chat_request({"messages": [{"role": "user", "content": "x"}], "logprobs": False, "presence_penalty": 0,
                            "frequency_penalty": 0.0, "response_format": {"type": "text"}, "tool_choice": "none",
                            "user": "u-1", "metadata": {"a": "b"}})
    assert r.text == "x"


@pytest.mark.parametrize("body, param, words", [
    ([], None, "JSON object"),
    ({"messages": []}, "messages", "non-empty"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n", "n must be 1"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "role"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", "last message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages", "alternate"),
    ({"messages": [user({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}})]},
     "messages[0].content[0]", "never fetched"),
    ({"messages": [user({"type": "image_url", "image_url": {"url": "/etc/passwd"}})]}, "messages[0].content[0]", "data: URIs"),
    ({"messages": [user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}})]},
     "messages[0].content[0].image_url.url", "not valid base64"),
    ({"messages": [user({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aiff"}})]},
     "messages[0].content[0]", "format must be one of"),
    ({"messages": [user({"type": "video", "video": "x"})]}, "messages[0].content[0]", "text, image_url or input_audio"),
    ({"messages": [user({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}),
                   {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and?"}]},
     "messages[0].content", "transcript"),
    ({"messages": [{"role": "user", "content": " "}]}, "messages", "neither text nor audio"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature", "between 0 and 2"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": "high"}, "top_p", "a number"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens", "between 1"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": 1.5}, "seed", "an integer"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", ""]}, "stop", "stop must be"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream", "true or false"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs", "not supported"),
    ({"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, "response_format",
     "not supported"),
])
def test_bad_requests_are_refused_with_400_naming_the_parameter(body, param, words):
    with pytest.raises(APIError) as info:
        parse_chat_request(body)
    e = info.value
    assert e.status == 400 and e.param == param and words in e.message, e.message
    assert e.body()["error"]["message"] == e.message and e.body()["error"]["type"] == "invalid_request_error"


def test_oversized_media_is_refused_before_decoding():
    big = base64.b64encode(b"x" * 2000).decode()
    with pytest.raises(APIError, match="over the limit of 1,000 bytes"):
        parse_chat_request({"messages": [user({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{big}"}})]},
                           max_image_bytes=1000)
