"""Labels and batches, token by token: loss only on answers and their end tokens; system text, user turns,
image positions and padding masked; multi-turn kept whole; "<image>" before or after the question."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmgpt.config import MMGPTConfig
from mmgpt.template import IGNORE_INDEX, Encoded, Message
from mmgpt.training.collate import (
    CAPTION_INSTRUCTION,
    CachedFeatures,
    Collator,
    Example,
    LivePixels,
    build_examples,
    encode,
    truncate,
)
from mmgpt.training.data import CaptionSample, load_llava_instruct
from mmgpt.training.feature_cache import FeatureCache
from mmgpt.training.loop import loss_sum
from mmgpt.training.runtime import Runtime
from mmgpt.training.sample_data import Scene, draw_scene

M = IGNORE_INDEX


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint / "tokenizer")


@pytest.fixture(scope="module")
def cfg(tiny_checkpoint) -> MMGPTConfig:
    return MMGPTConfig.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    draw_scene(Scene(391895, "circle", "red", "white", "center", "large")).save(d / "COCO_train2014_000000391895.jpg")
    draw_scene(Scene(522418, "square", "blue", "black", "left", "small")).save(d / "000000522418.jpg")
    return d


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def layout(tok, cfg, turns: list[tuple[str, str]], image: bool) -> tuple[list[int], list[int]]:
    """The expected ids and labels, built segment by segment from the documented layout."""
    image_ids = list(range(cfg.llm_vocab_size, cfg.llm_vocab_size + cfg.num_image_tokens))
    ids: list[int] = []
    labels: list[int] = []

    def put(seg: list[int], supervised: bool) -> None:
        ids.extend(seg)
        labels.extend(seg if supervised else [M] * len(seg))

    put(enc(tok, cfg.system_prompt + "\n\n"), False)
    for k, (question, answer) in enumerate(turns):
        put(enc(tok, "User: "), False)
        if image and k == 0:
            put(image_ids, False)
            put(enc(tok, "\n"), False)
        put(enc(tok, question) + enc(tok, "\nAssistant:"), False)
        put(enc(tok, " " + answer) + [tok.eos_token_id], True)
        put(enc(tok, "\n"), False)
    return ids, labels


def test_caption_sample_supervises_only_the_caption_and_its_end(tok, cfg, image_dir):
    sample = CaptionSample(391895, image_dir / "COCO_train2014_000000391895.jpg", "A red circle on a white background.")
    (ex,) = build_examples([sample], tok, cfg, max_length=512)
    want_ids, want_labels = layout(tok, cfg, [(CAPTION_INSTRUCTION, sample.caption)], image=True)
    assert list(ex.input_ids) == want_ids
    assert list(ex.labels) == want_labels
    answer = enc(tok, " " + sample.caption) + [tok.eos_token_id]
    supervised = [t for t in ex.labels if t != M]
    assert supervised == answer  # the caption and exactly one end token, nothing else
    assert ex.labels.count(tok.eos_token_id) == 1
    image_pos = [i for i, t in enumerate(ex.input_ids) if t >= cfg.llm_vocab_size]
    assert len(image_pos) == cfg.num_image_tokens and all(ex.labels[i] == M for i in image_pos)
    assert ex.image_key == 391895


def _llava_file(path: Path, image_first: bool) -> Path:
    q1 = "<image>\nWhat shape is shown?" if image_first else "What shape is shown?\n<image>"
    entry = {
        "id": "000000391895",
        "image": "000000391895.jpg",  # 2017 naming; the file on disk has the 2014 name
        "conversations": [
            {"from": "human", "value": q1},
            {"from": "gpt", "value": "A circle."},
            {"from": "human", "value": "What color is it?"},
            {"from": "gpt", "value": "It is red."},
            {"from": "human", "value": "And the background?"},
            {"from": "gpt", "value": "White."},
        ],
    }
    path.write_text(json.dumps([entry]))
    return path


@pytest.mark.parametrize("image_first", [True, False])
def test_multi_turn_conversation_labels_token_by_token(tok, cfg, image_dir, tmp_path, image_first):
    samples, stats = load_llava_instruct(_llava_file(tmp_path / "llava.json", image_first), image_dir)
    assert stats.kept == 1
    (ex,) = build_examples(samples, tok, cfg, max_length=512)
    turns = [("What shape is shown?", "A circle."), ("What color is it?", "It is red."), ("And the background?", "White.")]
    want_ids, want_labels = layout(tok, cfg, turns, image=True)
    assert list(ex.input_ids) == want_ids
    for i, (got, want) in enumerate(zip(ex.labels, want_labels)):
        assert got == want, f"label {i}: {got} != {want}"
    assert len(ex.labels) == len(want_labels)
    # Every answer of every turn is supervised and closed by its own end token; no human text is.
    assert ex.labels.count(tok.eos_token_id) == 3
    supervised = [t for t in ex.labels if t != M]
    assert supervised == sum((enc(tok, " " + a) + [tok.eos_token_id] for _, a in turns), [])
    for question, _ in turns:
        q = enc(tok, question)
        starts = [i for i in range(len(ex.input_ids)) if list(ex.input_ids[i : i + len(q)]) == q]
        assert starts and all(ex.labels[s + j] == M for s in starts for j in range(len(q)))


def test_image_before_or_after_the_question_encode_identically(tok, cfg, image_dir, tmp_path):
    a, _ = load_llava_instruct(_llava_file(tmp_path / "a.json", True), image_dir)
    b, _ = load_llava_instruct(_llava_file(tmp_path / "b.json", False), image_dir)
    (ea,) = build_examples(a, tok, cfg, 512)
    (eb,) = build_examples(b, tok, cfg, 512)
    assert ea == eb


def _ex(tok, cfg, answer: str, image_key: int | None, image_path: Path | None) -> Example:
    messages = [Message("user", "Hi?", image=image_key is not None), Message("assistant", answer)]
    e = encode(tok, cfg, messages)
    return Example(tuple(e.input_ids), tuple(e.labels), image_key, image_path)


def test_collator_pads_with_pad_not_eos_and_keeps_every_end_label(tok, cfg, image_dir):
    assert tok.pad_token_id != tok.eos_token_id
    short = _ex(tok, cfg, "Red.", 391895, image_dir / "COCO_train2014_000000391895.jpg")
    long = _ex(tok, cfg, "A small blue square on the left of a black background.", 522418, image_dir / "000000522418.jpg")
    collate = Collator(tok.pad_token_id, tok.eos_token_id, LivePixels(_processor(cfg), cfg.image_size))
    batch = collate([short, long])
    T = len(long.input_ids)
    assert batch["input_ids"].shape == (2, T) and batch["pixel_values"].shape == (2, 3, cfg.image_size, cfg.image_size)
    n = len(short.input_ids)
    assert batch["input_ids"][0, :n].tolist() == list(short.input_ids)
    assert batch["input_ids"][0, n:].tolist() == [tok.pad_token_id] * (T - n)
    assert batch["labels"][0, :n].tolist() == list(short.labels)
    assert batch["labels"][0, n:].tolist() == [M] * (T - n)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (T - n)
    assert batch["labels"][1].tolist() == list(long.labels) and batch["attention_mask"][1].all()
    assert (batch["labels"] == tok.eos_token_id).sum() == 2  # one supervised end token per answer survives
    assert not (batch["labels"] == tok.pad_token_id).any()


def test_collator_refuses_pad_equal_to_eos(tok):
    with pytest.raises(ValueError, match="pad_token_id == eos_token_id"):
        Collator(tok.eos_token_id, tok.eos_token_id, None)


def _processor(cfg):
    from transformers import CLIPImageProcessor

    s = cfg.image_size
    return CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})


def test_padding_and_masked_positions_do_not_change_the_loss(tiny_components, image_dir):
    """The summed loss of a sample alone equals its share of a padded batch: padding adds nothing."""
    c = tiny_components
    tok, cfg = c.tokenizer, c.config
    short = _ex(tok, cfg, "Red.", 391895, image_dir / "COCO_train2014_000000391895.jpg")
    long = _ex(tok, cfg, "A small blue square on the left of a black background.", 522418, image_dir / "000000522418.jpg")
    collate = Collator(tok.pad_token_id, tok.eos_token_id, LivePixels(c.image_processor, cfg.image_size))
    rt = Runtime(0, 1, 0, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        alone_s, n_s = loss_sum(c.model, collate([short]), rt)
        alone_l, n_l = loss_sum(c.model, collate([long]), rt)
        both, n = loss_sum(c.model, collate([short, long]), rt)
    assert n == n_s + n_l == short.num_targets + long.num_targets
    assert torch.allclose(both, alone_s + alone_l, rtol=1e-5)
    assert n_s == len(enc(tok, " Red.")) + 1  # the answer and its end token are the only targets


def test_text_only_conversation_batches_with_image_ones(tiny_components, image_dir):
    c = tiny_components
    tok, cfg = c.tokenizer, c.config
    with_image = _ex(tok, cfg, "Red.", 391895, image_dir / "COCO_train2014_000000391895.jpg")
    text_only = _ex(tok, cfg, "Hello.", None, None)
    assert not any(t >= cfg.llm_vocab_size for t in text_only.input_ids)
    batch = Collator(tok.pad_token_id, tok.eos_token_id, LivePixels(c.image_processor, cfg.image_size))([with_image, text_only])
    rt = Runtime(0, 1, 0, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        summed, n = loss_sum(c.model, batch, rt)
    assert torch.isfinite(summed) and n == with_image.num_targets + text_only.num_targets


def test_patch_features_without_cls_and_cache_matches_live(tiny_components, image_dir, tmp_path):
    c = tiny_components
    tok, cfg = c.tokenizer, c.config
    ex = _ex(tok, cfg, "Red.", 391895, image_dir / "COCO_train2014_000000391895.jpg")
    live = LivePixels(c.image_processor, cfg.image_size)
    pixels = live(ex.image_key, ex.image_path)[None]
    feats = c.model.image_features(pixels)
    assert feats.shape == (1, cfg.num_image_tokens, cfg.vision_hidden_size)  # CLS dropped: one token per patch
    cache = FeatureCache(tmp_path / "cache", cfg.num_image_tokens, cfg.vision_hidden_size, source="t")
    cache.add_batch([ex.image_key], feats)
    rt = Runtime(0, 1, 0, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        a, _ = loss_sum(c.model, Collator(tok.pad_token_id, tok.eos_token_id, live)([ex]), rt)
        b, _ = loss_sum(c.model, Collator(tok.pad_token_id, tok.eos_token_id, CachedFeatures(cache))([ex]), rt)
    assert torch.allclose(a, b, rtol=2e-3)  # fp16 cache


def test_truncation_never_cuts_the_image_and_drops_targetless_samples(tok, cfg, image_dir):
    sample = CaptionSample(391895, image_dir / "COCO_train2014_000000391895.jpg", "A red circle on a white background.")
    (full,) = build_examples([sample], tok, cfg, 512)
    e = Encoded(list(full.input_ids), list(full.labels))
    first_target = next(i for i, t in enumerate(full.labels) if t != M)
    cut = truncate(e, first_target + 3, cfg.llm_vocab_size)
    assert cut is not None and len(cut.input_ids) == first_target + 3 and cut.labels[-3:] == list(full.labels[first_target : first_target + 3])
    assert truncate(e, first_target, cfg.llm_vocab_size) is None  # no target left
    first_image = full.input_ids.index(cfg.llm_vocab_size)
    assert truncate(e, first_image + 2, cfg.llm_vocab_size) is None  # would cut the image
    with pytest.raises(ValueError, match="no training samples"):
        build_examples([sample], tok, cfg, max_length=first_image + 2)


def test_image_key_is_the_coco_id_or_a_stable_negative_hash():
    from mmgpt.training.collate import image_key

    assert image_key(391895, Path("x/COCO_train2014_000000391895.jpg")) == 391895
    assert image_key(None, None) is None
    k = image_key(None, Path("a/cat.jpg"))
    assert k < 0 and k == image_key(None, Path("b/cat.jpg")) != image_key(None, Path("dog.jpg"))
