"""BLEU-4 and CIDEr-D (mmgpt.training.metrics) against hand-computed coco-caption values."""

from __future__ import annotations

import math

import pytest

from mmgpt.training.metrics import bleu_scores, cider_d_scores, compute_caption_metrics, tokenize_caption


def tok(*captions: str) -> list[list[str]]:
    return [c.split() for c in captions]


# ------------------------------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize(
    "text,expected",
    [
        ("A red circle on a white background.", "a red circle on a white background"),
        ("A man's dog, running!", "a man 's dog running"),
        ('It doesn\'t fit; (really) "quoted" - ok...', "it does n't fit really quoted ok"),
        ("A black-and-white photo of 3.5 cats?", "a black-and-white photo of 3.5 cats"),
        ("It\u2019s a \u201cnice\u201d day", "it 's a nice day"),
        ("  ", ""),
    ],
)
def test_tokenizer(text, expected):
    assert tokenize_caption(text) == expected.split()


# ------------------------------------------------------------------------------------------ BLEU


def test_bleu_identical_is_one():
    caption = "a red circle on a white background"
    assert compute_caption_metrics({1: caption}, {1: [caption]})["bleu4"] == pytest.approx(1.0, abs=1e-8)


def test_bleu_hand_computed():
    # hyp vs ref differ in one word (white/blue): clipped precisions 6/7, 4/6, 3/5, 2/4, equal lengths.
    hyp = tok("a red circle on a white background")
    refs = [tok("a red circle on a blue background")]
    bleu = bleu_scores(hyp, refs)
    assert bleu[0] == pytest.approx(6 / 7)
    assert bleu[3] == pytest.approx((6 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25)
    assert bleu[3] == pytest.approx(0.643459, abs=1e-6)


def test_bleu_clips_repeated_ngrams():
    # "the" x4 against a reference with one "the": unigram precision 1/4, not 4/4.
    assert bleu_scores(tok("the the the the"), [tok("the cat sat down")])[0] == pytest.approx(0.25)


def test_bleu_brevity_penalty():
    # All n-grams match, but 5 words against a 7-word reference: BP = exp(1 - 7/5).
    bleu4 = bleu_scores(tok("a red circle on a"), [tok("a red circle on a white background")])[3]
    assert bleu4 == pytest.approx(math.exp(1 - 7 / 5))


def test_bleu_closest_reference_length_ties_go_shorter():
    # 5-word hypothesis, references of 4 and 6 words: both 1 away, coco-caption takes 4 -> no penalty.
    # (Taking 6 would give exp(1 - 6/5) = 0.82; taking the longest or the average would penalise too.)
    refs = [tok("a red circle on", "a red circle on a big")]
    assert bleu_scores(tok("a red circle on a"), refs)[3] == pytest.approx(1.0)
    # Closest, not shortest: references of 3 and 6 words -> 6 is closest to 5 -> penalty exp(1 - 6/5).
    refs = [tok("a red circle", "a red circle on a big")]
    assert bleu_scores(tok("a red circle on a"), refs)[3] == pytest.approx(math.exp(1 - 6 / 5))


def test_bleu_is_corpus_level():
    # Totals are pooled before dividing: all n-grams match (10/10, 8/8, 6/6, 4/4), lengths 10 vs 14.
    # An average of per-sentence scores would be about 0.5 (the 3-word caption has no 4-grams).
    hyps = tok("a red circle on a white background", "a blue square")
    refs = [tok("a red circle on a white background"), tok("a blue square on a gray background")]
    assert bleu_scores(hyps, refs)[3] == pytest.approx(math.exp(1 - 14 / 10))


# ------------------------------------------------------------------------------------------ CIDEr-D


def test_cider_hand_computed():
    # Two images, every n-gram in exactly one reference set: idf weights are all log(2).
    # Image 1: unigram cosine 1/2 ("red" matches, "square" doesn't), no bigram match -> 10 * 0.5 / 4.
    # Image 2: identical unigrams and bigram, no 3-/4-grams -> 10 * 2 / 4.
    mean, per_image = cider_d_scores(
        tok("red square", "blue square"), [tok("red circle"), tok("blue square")]
    )
    assert per_image == pytest.approx([1.25, 5.0])
    assert mean == pytest.approx(3.125)


def test_cider_clipping():
    # "red red": tf-idf 2w for "red" against w in the reference; the clipped dot is w*w, norms 2w and sqrt(2)w.
    _, per_image = cider_d_scores(tok("red red", "blue square"), [tok("red circle"), tok("blue square")])
    assert per_image[0] == pytest.approx(10 * (1 / (2 * math.sqrt(2))) / 4)


def test_cider_length_penalty():
    # One bigram too many: unigram cosine 2/sqrt(10), bigram cosine 1/sqrt(2), times exp(-1 / (2 * 6^2)).
    _, per_image = cider_d_scores(
        tok("red circle circle", "blue square"), [tok("red circle"), tok("blue square")]
    )
    expected = 10 / 4 * (2 / math.sqrt(10) + 1 / math.sqrt(2)) * math.exp(-1 / 72)
    assert per_image[0] == pytest.approx(expected)


def test_cider_identical_distinct_captions_score_ten():
    refs = {1: ["red circle on white paper"], 2: ["blue square near gray wall"]}
    preds = {1: "Red circle on white paper.", 2: "blue square near gray wall"}
    assert compute_caption_metrics(preds, refs)["cider"] == pytest.approx(10.0)


def test_cider_averages_over_references():
    # The same hypothesis against [itself, an unrelated caption] scores half of against [itself].
    hyps = tok("red circle on white paper", "blue square near gray wall")
    one = cider_d_scores(hyps, [tok("red circle on white paper"), tok("blue square near gray wall")])[1]
    two = cider_d_scores(
        hyps,
        [tok("red circle on white paper", "green star"), tok("blue square near gray wall", "green star")],
    )[1]
    assert one[0] == pytest.approx(10.0)
    # "green star" occurs in both reference sets: idf 0, so it adds nothing but halves the average.
    assert two[0] == pytest.approx(5.0)


def test_better_caption_scores_higher():
    refs = {
        1: ["a red circle on a white background", "a large red circle in the center"],
        2: ["a blue square on a black background", "a small blue square on the left"],
        3: ["a green triangle on a gray background", "a green triangle at the top"],
    }
    good = {1: "a red circle on a white background", 2: "a blue square on the left", 3: "a green triangle"}
    bad = {1: "a blue triangle", 2: "a red circle on a white background", 3: "a square"}
    g, b = compute_caption_metrics(good, refs), compute_caption_metrics(bad, refs)
    assert g["cider"] > 2 * b["cider"]
    assert g["bleu4"] > b["bleu4"]


def test_single_image_cider_is_zero():
    # coco-caption's CIDEr-D with one image: every n-gram occurs in all (one) reference sets, idf = 0.
    assert compute_caption_metrics({1: "a red circle"}, {1: ["a red circle"]})["cider"] == 0.0


def test_empty_prediction():
    refs = {1: ["a red circle on a white background"], 2: ["a blue square on a black background"]}
    scores = compute_caption_metrics({1: "", 2: "a blue square on a black background"}, refs)
    assert math.isfinite(scores["bleu4"]) and math.isfinite(scores["cider"])
    _, per_image = cider_d_scores([[], tokenize_caption(refs[2][0])], [tok(refs[1][0]), tok(refs[2][0])])
    assert per_image[0] == 0.0 and per_image[1] == pytest.approx(10.0)
    # The empty caption still counts toward the reference length: 7 of 14 words -> BP exp(1 - 2).
    assert scores["bleu4"] == pytest.approx(math.exp(1 - 14 / 7))
    everything_empty = compute_caption_metrics({1: "", 2: "..."}, refs)
    assert everything_empty == {"bleu4": 0.0, "cider": 0.0}


def test_compute_caption_metrics_errors_and_extra_references():
    with pytest.raises(ValueError, match="no predictions"):
        compute_caption_metrics({}, {1: ["a"]})
    with pytest.raises(ValueError, match=r"no references for prediction ids \[2\]"):
        compute_caption_metrics({1: "a cat", 2: "a dog"}, {1: ["a cat"], 2: []})
    # Reference ids without a prediction are ignored: not scored, and not in the idf corpus (were image 2's
    # references counted, image 1 alone would score 10 instead of coco-caption's single-image 0).
    refs = {1: ["red circle on white paper"], 2: ["blue square near gray wall"]}
    assert compute_caption_metrics({1: "red circle on white paper"}, refs) == {
        "bleu4": pytest.approx(1.0),
        "cider": 0.0,
    }
