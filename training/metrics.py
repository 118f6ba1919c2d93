"""Caption metrics as coco-caption computes them, in pure Python (no Java tokenizer, no pycocoevalcap).

- BLEU-4: coco-caption's `Bleu(4)` (bleu_scorer.py): corpus-level n-gram precisions with clipping against the
  max count over an image's references, the "closest" reference length (ties -> the shorter), the brevity
  penalty on the corpus totals, and its 1e-15 / 1e-9 smoothing constants.
- CIDEr-D: coco-caption's `CiderD` (ciderD_scorer.py, df_mode="corpus"): tf-idf n-gram vectors (n=1..4) with
  document frequencies taken over the evaluated images' reference sets, clipped dot products, a Gaussian
  length penalty with sigma=6, averaged over n and references, times 10. As in the original, the "length"
  in the penalty counts bigrams, and with a single image every idf is 0, so CIDEr is 0: score a set.

Both scorers see text through `tokenize_caption`, a regex stand-in for the Stanford PTB tokenizer
coco-caption runs first: lowercase, split off punctuation and English contractions, drop punctuation.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping, Sequence

BLEU_N = 4
CIDER_N = 4
CIDER_SIGMA = 6.0

# Tokens coco-caption's PTBTokenizer deletes after tokenizing (its PUNCTUATIONS list), plus the bracket
# tokens the Java tokenizer would have turned into -LSB-/-RSB- and the raw quote characters.
_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
    + ['"', "(", ")", "[", "]", "{", "}", "-lsb-", "-rsb-"]
)
# PTB splits "don't" -> "do n't" and "dog's" -> "dog 's".
_NEG_CONTRACTION = re.compile(r"(\w)n't\b")
_CONTRACTION = re.compile(r"(\w)'(s|re|ve|ll|d|m)\b")
_TOKEN = re.compile(
    r"n't|'(?:s|re|ve|ll|d|m)\b"  # split-off contractions
    r"|\d+(?:[.,:]\d+)+"  # numbers like 3.5, 1,000, 10:30 stay whole
    r"|\w+(?:[-/&']\w+)*"  # words, keeping internal hyphens ("black-and-white") and slashes
    r"|\.\.\.|--"
    r"|[^\w\s]"  # any other symbol on its own
)
_QUOTES = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "--"}
)


def tokenize_caption(text: str) -> list[str]:
    """Lowercased tokens without punctuation: "A man's dog, running." -> ["a", "man", "'s", "dog", "running"]."""
    text = text.translate(_QUOTES).lower()
    text = _NEG_CONTRACTION.sub(r"\1 n't", text)
    text = _CONTRACTION.sub(r"\1 '\2", text)
    return [t for t in _TOKEN.findall(text) if t not in _PUNCTUATION]


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


# -------------------------------------------------------------------------------------------- BLEU


def bleu_scores(
    hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]], n: int = BLEU_N
) -> list[float]:
    """Corpus BLEU-1..n over tokenized hypotheses (one per image) and their tokenized reference lists."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    tiny, small = 1e-15, 1e-9  # coco-caption's smoothing: keeps log/ratio finite on zero counts
    correct = [0] * n
    guess = [0] * n
    test_len = 0
    ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        if not refs:
            raise ValueError("every hypothesis needs at least one reference")
        max_ref_counts: Counter[tuple[str, ...]] = Counter()
        for ref in refs:
            for gram, c in _ngrams(ref, n).items():
                max_ref_counts[gram] = max(max_ref_counts[gram], c)
        hl = len(hyp)
        test_len += hl
        # "closest" reference length; min over (distance, length) breaks ties toward the shorter one.
        ref_len += min((abs(len(r) - hl), len(r)) for r in refs)[1]
        for k in range(1, n + 1):
            guess[k - 1] += max(0, hl - k + 1)
        for gram, c in _ngrams(hyp, n).items():
            correct[len(gram) - 1] += min(max_ref_counts.get(gram, 0), c)
    bleus: list[float] = []
    product = 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        bleus.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        penalty = math.exp(1 - 1 / ratio)
        bleus = [b * penalty for b in bleus]
    return bleus


# ------------------------------------------------------------------------------------------- CIDEr-D


def cider_d_scores(
    hypotheses: Sequence[Sequence[str]],
    references: Sequence[Sequence[Sequence[str]]],
    n: int = CIDER_N,
    sigma: float = CIDER_SIGMA,
) -> tuple[float, list[float]]:
    """CIDEr-D over tokenized hypotheses and reference lists: (corpus mean, per-image scores)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    if not hypotheses:
        raise ValueError("nothing to score")
    ref_counts = [[_ngrams(r, n) for r in refs] for refs in references]
    # Document frequency: in how many images' reference sets each n-gram occurs.
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for refs in ref_counts:
        doc_freq.update({g for counts in refs for g in counts})
    log_num_docs = math.log(float(len(ref_counts)))

    def to_vec(
        counts: Counter[tuple[str, ...]],
    ) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            df = math.log(max(1.0, doc_freq.get(gram, 0.0)))
            vec[k][gram] = float(tf) * (log_num_docs - df)
            norm[k] += vec[k][gram] ** 2
            if k == 1:  # coco-caption counts bigrams; the difference equals the word-count one anyway
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def sim(hyp: tuple, ref: tuple) -> list[float]:
        vec_h, norm_h, len_h = hyp
        vec_r, norm_r, len_r = ref
        delta = float(len_h - len_r)
        val = [0.0] * n
        for k in range(n):
            for gram, w in vec_h[k].items():
                r = vec_r[k].get(gram, 0.0)
                val[k] += min(w, r) * r  # clipping: repeating an n-gram cannot buy score
            if norm_h[k] != 0 and norm_r[k] != 0:
                val[k] /= norm_h[k] * norm_r[k]
            val[k] *= math.exp(-(delta**2) / (2 * sigma**2))
        return val

    scores: list[float] = []
    for hyp, refs in zip(hypotheses, ref_counts):
        if not refs:
            raise ValueError("every hypothesis needs at least one reference")
        h = to_vec(_ngrams(hyp, n))
        total = [0.0] * n
        for ref in refs:
            total = [a + b for a, b in zip(total, sim(h, to_vec(ref)))]
        scores.append(sum(total) / n / len(refs) * 10.0)
    return sum(scores) / len(scores), scores


# ------------------------------------------------------------------------------------------- entry point


def compute_caption_metrics(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> dict[str, float]:
    """{"bleu4", "cider"} for predictions (id -> caption) against references (id -> captions).

    Scores the ids in `predictions`, each of which must have at least one reference; extra reference ids
    are ignored (coco-caption likewise restricts the ground truth to the evaluated images, which also
    makes CIDEr's document frequencies come from those images only). An empty prediction scores 0 for
    its image but still counts toward BLEU's total reference length.
    """
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [k for k in predictions if not references.get(k)]
    if missing:
        raise ValueError(
            f"no references for prediction ids {missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    ids = list(predictions)
    hyps = [tokenize_caption(predictions[k]) for k in ids]
    refs = [[tokenize_caption(r) for r in references[k]] for k in ids]
    bleu4 = bleu_scores(hyps, refs)[3]
    cider, _ = cider_d_scores(hyps, refs)
    return {"bleu4": float(bleu4), "cider": float(cider)}
