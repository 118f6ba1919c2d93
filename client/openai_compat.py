"""OpenAI's chat-completions request -> the `multimodal` contract (the API server's translation, without I/O).

    request = parse_chat_request(json_body)          # APIError(400, message, param) for anything it cannot take
    client.stream(request.text, image=request.image, audio=request.audio, history=request.history,
                  **request.sampling, stream=True)

What OpenAI's format allows and the contract does not, decided here once:
- `system` messages are accepted and not passed on: the model's chat template has its own system prompt, and
  the model was trained with it only.
- The contract takes one image per request (the conversation's; the template puts it at the start of the
  first user turn). An image in any user message is the conversation's image; with several, the latest wins.
- Audio in an earlier turn cannot be heard again: such a turn must also carry its text (the response's
  `transcript` gives it), else the request is refused.
- Images are accepted only as base64 `data:` URIs; a URL or a path is refused and never fetched.
- Settings the contract has no way to honour (tools, logprobs, penalties, logit_bias, a JSON response format)
  are refused with a 400 naming them, not silently ignored: an answer that ignored them would look like one
  that obeyed. Fields that change nothing about the answer (`user`, `metadata`, `store`, ...) pass.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

AUDIO_FORMATS = ("wav", "flac", "ogg", "mp3")
# parameter -> the values that mean "not asked for" (a default that clients often send explicitly)
UNSUPPORTED = {
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "logprobs": (None, False), "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,), "web_search_options": (None,),
}


class APIError(Exception):
    """A request the API refuses: HTTP status, a message for the user, and the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict[str, Any]:
        """OpenAI's error object."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


@dataclass(frozen=True)
class ChatRequest:
    text: str
    image: bytes | None
    audio: bytes | None
    history: tuple[dict[str, str], ...]
    sampling: dict[str, Any] = field(default_factory=dict)  # MMGPTClient.stream's keyword arguments
    stream: bool = False
    include_usage: bool = False
    model: str = ""


def _b64(data: Any, param: str, limit: int) -> bytes:
    if not isinstance(data, str) or not data:
        raise bad(f"{param} must be a non-empty base64 string", param)
    if len(data) > 4 * (limit // 3 + 1):  # checked before decoding: the decoded size follows from it
        raise bad(f"{param} is over the limit of {limit:,} bytes", param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{param} is not valid base64", param) from None


def _image(part: dict, param: str, limit: int) -> bytes:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise bad(f"{param}.image_url.url must be a string", param)
    head, sep, data = url.partition(",")
    if not (url.startswith("data:") and sep and head.endswith(";base64")):
        raise bad(f"{param}: images are accepted only as base64 data: URIs (data:image/png;base64,...); URLs and "
                  "paths are never fetched", param)
    return _b64(data, f"{param}.image_url.url", limit)


def _audio(part: dict, param: str, limit: int) -> bytes:
    spec = part.get("input_audio")
    if not isinstance(spec, dict):
        raise bad(f"{param}.input_audio must be an object with 'data' and 'format'", param)
    if spec.get("format") not in AUDIO_FORMATS:
        raise bad(f"{param}.input_audio.format must be one of {', '.join(AUDIO_FORMATS)}", param)
    return _b64(spec.get("data"), f"{param}.input_audio.data", limit)


def _content(message: dict, i: int, max_image_bytes: int, max_audio_bytes: int) -> tuple[str, bytes | None, bytes | None]:
    """(text, image, audio) of one message's content: a string, or a list of text/image_url/input_audio parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content, None, None
    if not isinstance(content, list):
        raise bad(f"messages[{i}].content must be a string or a list of parts", f"messages[{i}].content")
    texts, image, audio = [], None, None
    for j, part in enumerate(content):
        param = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image = _image(part, param, max_image_bytes)
        elif kind == "input_audio":
            audio = _audio(part, param, max_audio_bytes)
        else:
            raise bad(f"{param} must be a text, image_url or input_audio part", param)
    return "\n".join(texts), image, audio


def _number(body: dict, name: str, kind: type, low: float, high: float) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise bad(f"{name} must be {'a number' if kind is float else 'an integer'}", name)
    if not low <= value <= high:
        raise bad(f"{name} must be between {low:g} and {high:g}, got {value}", name)
    return kind(value)


def parse_chat_request(body: Any, *, max_image_bytes: int = 20 << 20, max_audio_bytes: int = 25 << 20,
                       max_messages: int = 256) -> ChatRequest:
    """Check an OpenAI chat-completions body and turn it into the contract's request; APIError otherwise."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    if len(messages) > max_messages:
        raise bad(f"messages holds {len(messages)} messages, over the limit of {max_messages}", "messages")
    if body.get("n", 1) != 1:
        raise bad("n must be 1: one answer per request", "n")
    for name, neutral in UNSUPPORTED.items():
        if body.get(name) not in neutral:
            raise bad(f"{name} is not supported by this server (the model answers in plain text, with no tools, "
                      "log-probabilities or penalties): leave it out", name)

    turns: list[tuple[str, str, bool]] = []  # (role, text, had audio)
    image = audio = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise bad(f"messages[{i}].role must be system, user or assistant", f"messages[{i}].role")
        text, img, aud = _content(m, i, max_image_bytes, max_audio_bytes)
        if m["role"] in ("system", "developer"):
            continue  # the model's template has its own system prompt (see the module docstring)
        if m["role"] == "assistant" and (img is not None or aud is not None):
            raise bad(f"messages[{i}]: an assistant message carries text only", f"messages[{i}].content")
        image = img if img is not None else image
        if i == len(messages) - 1:
            audio = aud
        elif aud is not None and not text.strip():
            raise bad(f"messages[{i}]: audio in an earlier turn cannot be heard again; send its transcript as text "
                      "(the response's `transcript` field)", f"messages[{i}].content")
        turns.append((m["role"], text, aud is not None))
    if not turns or turns[-1][0] != "user":
        raise bad("the last message must be the user's", "messages")
    *earlier, (_, text, _) = turns
    roles = [r for r, _, _ in earlier]
    if roles != ["user", "assistant"] * (len(roles) // 2):
        raise bad("earlier messages must alternate user, assistant (starting with user)", "messages")
    if not text.strip() and audio is None:
        raise bad("the last user message has neither text nor audio", "messages")

    sampling: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        sampling["max_tokens"] = _number({"max_tokens": max_tokens}, "max_tokens", int, 1, 2**31 - 1)
    for name, key, low, high in (("temperature", "temperature", 0, 2), ("top_p", "top_p", 0, 1)):
        value = _number(body, name, float, low, high)
        if value is not None:
            sampling[key] = value
    seed = _number(body, "seed", int, 0, 2**64 - 1)
    if seed is not None:
        sampling["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        words = [stop] if isinstance(stop, str) else stop
        if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words) or len(words) > 4:
            raise bad("stop must be a non-empty string or a list of up to 4 of them", "stop")
        sampling["stop_words"] = tuple(words)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    return ChatRequest(
        text=text, image=image, audio=audio,
        history=tuple({"role": r, "content": t} for r, t, _ in earlier),
        sampling=sampling, stream=stream, include_usage=bool(options.get("include_usage")),
        model=str(body.get("model", "")),
    )
