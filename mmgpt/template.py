"""The chat template: the single source of truth for how a conversation becomes tokens.

Training (labels) and serving (prompts) both call `encode_conversation`, so what the model learns is
exactly what it is later asked. A conversation renders as

    {system}\\n\\n
    User: [image]{question}\\nAssistant: {answer}<eos>\\n
    User: {question}\\nAssistant: {answer}<eos>\\n
    ...
    User: {question}\\nAssistant:            <- generation prompt; the model writes " answer<eos>"

Segments are tokenized one by one (never the joined string), so a boundary never merges differently in
training and serving. The image is not a text token: it becomes `num_image_tokens` positions whose ids
run from the LLM's vocab size upward (TensorRT-LLM's prompt-table convention), so user text that
contains "<image>" can never forge image positions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

IGNORE_INDEX = -100  # label of every position the loss must skip
ROLES = ("user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str  # "user" | "assistant"
    content: str
    image: bool = False  # this user turn carries the conversation's image (at its start)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except on assistant answers and their end token


def image_token_ids(vocab_size: int, num_image_tokens: int) -> list[int]:
    """Ids of the image positions: row k of the prompt table is addressed by id vocab_size + k."""
    return list(range(vocab_size, vocab_size + num_image_tokens))


def validate_messages(messages: Sequence[Message], *, for_generation: bool) -> None:
    """Raise ValueError naming the problem when a conversation is not a well-formed alternation."""
    if not messages:
        raise ValueError("conversation is empty: give at least one user message")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise ValueError(f"message {i}: role must be 'user' or 'assistant', got {m.role!r}")
        if not isinstance(m.content, str):
            raise ValueError(f"message {i}: content must be a string")
        expected = ROLES[i % 2]
        if m.role != expected:
            raise ValueError(f"message {i}: expected role {expected!r} (turns alternate, starting with 'user')")
        if m.image and m.role != "user":
            raise ValueError(f"message {i}: only a user turn can carry the image")
    if sum(m.image for m in messages) > 1:
        raise ValueError("a conversation carries at most one image")
    last = messages[-1].role
    if for_generation and last != "user":
        raise ValueError("the last message must be the user's question")
    if not for_generation and last != "assistant":
        raise ValueError("a training conversation must end with the assistant's answer")


def encode_conversation(
    tokenizer,
    messages: Sequence[Message],
    *,
    system_prompt: str,
    num_image_tokens: int,
    vocab_size: int,
    add_generation_prompt: bool,
) -> Encoded:
    """Token ids and loss labels for a conversation (see the module docstring for the layout)."""
    validate_messages(messages, for_generation=add_generation_prompt)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []

    def add(token_ids: list[int], supervised: bool) -> None:
        ids.extend(token_ids)
        labels.extend(token_ids if supervised else [IGNORE_INDEX] * len(token_ids))

    def text(s: str) -> list[int]:
        return tokenizer.encode(s, add_special_tokens=False) if s else []

    add(text(system_prompt + "\n\n"), False)
    for m in messages:
        if m.role == "user":
            add(text("User: "), False)
            if m.image:
                add(image_token_ids(vocab_size, num_image_tokens), False)
                add(text("\n"), False)
            add(text(m.content.strip()), False)
            add(text("\nAssistant:"), False)
        else:
            # The answer and its end token are the only supervised positions: the model learns to stop.
            add(text(" " + m.content.strip()), True)
            add([eos], True)
            add(text("\n"), False)
    return Encoded(ids, labels)


def parse_history(raw: str | bytes) -> list[Message]:
    """Parse the served `history` JSON: a list of {"role": "user"|"assistant", "content": str}, oldest first."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"history is not valid UTF-8: {e}") from None
    if not raw.strip():
        return []
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"history is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise ValueError("history must be a JSON list of {\"role\", \"content\"} objects")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or set(item) - {"role", "content"} or "role" not in item or "content" not in item:
            raise ValueError(f"history[{i}] must be an object with exactly 'role' and 'content'")
        if item["role"] not in ROLES:
            raise ValueError(f"history[{i}].role must be 'user' or 'assistant', got {item['role']!r}")
        if not isinstance(item["content"], str):
            raise ValueError(f"history[{i}].content must be a string")
        out.append(Message(item["role"], item["content"]))
    if len(out) % 2:
        raise ValueError("history must hold complete user/assistant pairs (an even number of messages)")
    if out:
        validate_messages(out, for_generation=False)
    return out


def join_question(text: str, transcript: str) -> str:
    """The question the model sees: typed text, then what was heard. Either may be empty, not both."""
    parts = [p.strip() for p in (text, transcript) if p and p.strip()]
    if not parts:
        raise ValueError("no question: give text_input, or audio with speech in it")
    return "\n".join(parts)


def encode_for(config, tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool) -> Encoded:
    """`encode_conversation` with the system prompt and image geometry of a model's MMGPTConfig."""
    return encode_conversation(
        tokenizer,
        messages,
        system_prompt=config.system_prompt,
        num_image_tokens=config.num_image_tokens,
        vocab_size=config.llm_vocab_size,
        add_generation_prompt=add_generation_prompt,
    )


def prompt_ids(config, tokenizer, history: Sequence[Message], question: str, *, has_image: bool) -> list[int]:
    """The generation prompt for one request: earlier turns, then the question.

    The image goes at the start of the conversation's first user turn, wherever the client attached
    it: that is where training (like LLaVA) puts it, so a follow-up question that re-sends the image
    sees the layout the model learned.
    """
    messages = [*history, Message("user", question)]
    if has_image:
        messages[0] = Message("user", messages[0].content, image=True)
    return encode_for(config, tokenizer, messages, add_generation_prompt=True).input_ids


def fit_prompt(
    config, tokenizer, history: Sequence[Message], question: str, *, has_image: bool, room: int
) -> tuple[list[int], int]:
    """`prompt_ids`, cut to fit the context -> (ids, number of history messages dropped).

    When the whole conversation leaves fewer than `room` tokens of the context for the answer, its
    oldest turns go first, a question with its answer at a time (never half a turn), until it fits. The
    image stays: it is the conversation's, and goes at the start of the first turn kept, where training
    puts it. The question itself is never cut: when it alone is too long, `check_prompt` says so.
    """
    limit = config.max_context - room

    def ids_for(pairs: int) -> list[int]:
        return prompt_ids(config, tokenizer, history[2 * pairs :], question, has_image=has_image)

    ids = ids_for(0)
    total = len(history) // 2
    if len(ids) <= limit or total == 0:
        return ids, 0
    lo, hi = 1, total  # the fewest pairs to drop lies in [lo, hi]; dropping all of them is the last resort
    while lo < hi:
        mid = (lo + hi) // 2
        if len(ids_for(mid)) <= limit:
            hi = mid
        else:
            lo = mid + 1
    return ids_for(lo), 2 * lo
