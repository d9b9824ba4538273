"""Caption metrics: coco-caption BLEU-1..4 and CIDEr-D, plus token precision / recall / F1.

BLEU and CIDEr-D replicate pycocoevalcap 1.2 (`Bleu(4)`, `Cider()`) exactly, quirks included, in
numpy so the runtime never needs that package (its wheel is ~100 MB of Java jars; the tests compare
against it). Every caption is first tokenized with `storyteller.vocab.tokenize`, the one tokenizer
of the project, so scores agree with what the model is trained on.

The n-gram bookkeeping is vectorised over the whole corpus (one sort per n-gram order instead of a
dict per sentence) because the scores are computed after every training epoch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .vocab import tokenize

__all__ = ["evaluate_captions", "corpus_bleu", "cider_d", "token_prf"]

Tokens = Sequence[str]

# coco-caption's BLEU smoothing: `tiny` keeps a zero match count at ~0 instead of log(0),
# `small` keeps a zero guess count from dividing by zero.
_BLEU_TINY = 1e-15
_BLEU_SMALL = 1e-9


@dataclass
class _Order:
    """Distinct (sentence, n-gram) pairs of one n-gram order, with counts.

    Hypothesis rows are keyed by image, reference rows by reference index; `h_match` is, for each
    reference row, the hypothesis count of the same n-gram for the same image (0 if absent).
    """

    n_grams: int  # number of distinct n-grams of this order in the corpus
    h_img: np.ndarray
    h_gram: np.ndarray
    h_count: np.ndarray
    r_ref: np.ndarray
    r_gram: np.ndarray
    r_count: np.ndarray
    h_match: np.ndarray
    h_row_of_r: np.ndarray  # index into the hypothesis rows for each reference row, -1 if absent


@dataclass
class _Corpus:
    n_images: int
    hyp_len: np.ndarray  # tokens per hypothesis
    ref_len: np.ndarray  # tokens per reference (all references, flattened)
    ref_img: np.ndarray  # image index of each flattened reference
    refs_per_img: np.ndarray
    orders: list[_Order]


def sorted_lookup(sorted_keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Index of each query in `sorted_keys` (unique, ascending), or -1 where it is absent."""
    if sorted_keys.size == 0:
        return np.full(queries.shape, -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(sorted_keys, queries), sorted_keys.size - 1)
    return np.where(sorted_keys[pos] == queries, pos, -1)


def _sum_by(idx: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    """Float sums of `weights` grouped by `idx` (np.bincount returns ints when idx is empty)."""
    return np.bincount(idx, weights, minlength=size).astype(np.float64, copy=False)


def _gather(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """values[idx], with 0 where idx is -1 (also when `values` is empty)."""
    if values.size == 0:
        return np.zeros(idx.shape, dtype=values.dtype)
    return np.where(idx >= 0, values[np.maximum(idx, 0)], 0)


def _build(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]], n: int) -> _Corpus:
    n_images = len(hypotheses)
    ref_img = np.array([i for i, refs in enumerate(references) for _ in refs], dtype=np.int64)
    sentences = list(hypotheses) + [r for refs in references for r in refs]  # hyps are sentences 0..N-1
    lengths = np.array([len(s) for s in sentences], dtype=np.int64)
    vocab: dict[str, int] = {}
    flat = np.fromiter(
        (vocab.setdefault(w, len(vocab)) for s in sentences for w in s), dtype=np.int64, count=int(lengths.sum())
    )
    vocab_size = max(len(vocab), 1)
    sent = np.repeat(np.arange(len(sentences), dtype=np.int64), lengths)
    room = np.repeat(lengths, lengths) - (np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths))

    orders = []
    gram = flat  # dense id of the k-gram starting at each position (-1 where room < k)
    for k in range(1, n + 1):
        valid = np.flatnonzero(room >= k)
        if k > 1:
            # Extend the (k-1)-gram ids by one token, then renumber densely so keys never overflow.
            prev = gram[valid] * vocab_size + flat[valid + k - 1]
            uniq, dense = np.unique(prev, return_inverse=True)
            gram = np.full(flat.size, -1, dtype=np.int64)
            gram[valid] = dense
            n_grams = uniq.size
        else:
            n_grams = vocab_size
        pair, count = np.unique(sent[valid] * n_grams + gram[valid], return_counts=True)
        s, g = pair // n_grams, pair % n_grams
        is_hyp = s < n_images
        h_img, h_gram, h_count = s[is_hyp], g[is_hyp], count[is_hyp]
        r_ref, r_gram, r_count = s[~is_hyp] - n_images, g[~is_hyp], count[~is_hyp]
        # Hypothesis keys (image, gram) come out of np.unique already sorted.
        h_row = sorted_lookup(h_img * n_grams + h_gram, ref_img[r_ref] * n_grams + r_gram)
        h_match = _gather(h_count, h_row)
        orders.append(_Order(n_grams, h_img, h_gram, h_count, r_ref, r_gram, r_count, h_match, h_row))
    return _Corpus(
        n_images=n_images,
        hyp_len=lengths[:n_images],
        ref_len=lengths[n_images:],
        ref_img=ref_img,
        refs_per_img=np.array([len(refs) for refs in references], dtype=np.int64),
        orders=orders,
    )


def _bleu(c: _Corpus) -> list[float]:
    # "closest" reference length per image; ties go to the shorter one (coco's min over (distance, length)).
    dist = np.abs(c.ref_len - c.hyp_len[c.ref_img])
    order = np.lexsort((c.ref_len, dist, c.ref_img))
    first = np.r_[True, c.ref_img[order][1:] != c.ref_img[order][:-1]]
    testlen, reflen = int(c.hyp_len.sum()), int(c.ref_len[order][first].sum())

    bleus, prod = [], 1.0
    for k, o in enumerate(c.orders):
        # Clip each hypothesis n-gram count by its maximum count in any single reference of its image.
        key = c.ref_img[o.r_ref] * o.n_grams + o.r_gram
        uniq, inv = np.unique(key, return_inverse=True)
        max_ref = np.zeros(uniq.size, dtype=np.int64)
        np.maximum.at(max_ref, inv, o.r_count)
        row = sorted_lookup(uniq, o.h_img * o.n_grams + o.h_gram)
        correct = int(np.minimum(o.h_count, _gather(max_ref, row)).sum())
        guess = int(np.maximum(0, c.hyp_len - k).sum())
        prod *= (correct + _BLEU_TINY) / (guess + _BLEU_SMALL)
        bleus.append(prod ** (1.0 / (k + 1)))
    ratio = (testlen + _BLEU_TINY) / (reflen + _BLEU_SMALL)
    if ratio < 1:  # brevity penalty, on corpus totals
        bleus = [b * float(np.exp(1 - 1 / ratio)) for b in bleus]
    return bleus


def _cider(c: _Corpus, sigma: float) -> np.ndarray:
    n_refs = c.ref_len.size
    log_n_images = np.log(float(c.n_images))  # with one image this is 0, so every weight is 0
    # coco-caption's length for the Gaussian penalty counts the *bigrams* (its `if n == 1` on a 0-based
    # order), i.e. max(0, tokens - 1). Kept for fidelity; it differs from the token count only when a
    # caption is empty, and such a pair scores 0 whatever the penalty.
    bigrams_h, bigrams_r = np.maximum(c.hyp_len - 1, 0), np.maximum(c.ref_len - 1, 0)
    if len(c.orders) < 2:
        bigrams_h, bigrams_r = bigrams_h * 0, bigrams_r * 0
    delta = (bigrams_h[c.ref_img] - bigrams_r).astype(np.float64)
    penalty = np.exp(-(delta**2) / (2 * sigma**2))

    per_ref = np.zeros(n_refs)  # summed over orders
    for o in c.orders:
        # Document frequency: in how many images' reference sets each n-gram occurs (evaluated refs only).
        img_gram = np.unique(c.ref_img[o.r_ref] * o.n_grams + o.r_gram)
        df = np.bincount(img_gram % o.n_grams, minlength=o.n_grams)
        idf = log_n_images - np.log(np.maximum(df, 1.0))  # n-grams absent from all refs get log_n_images
        w_h = o.h_count * idf[o.h_gram]
        w_r = o.r_count * idf[o.r_gram]
        norm_h = np.sqrt(_sum_by(o.h_img, w_h**2, c.n_images))[c.ref_img]
        norm_r = np.sqrt(_sum_by(o.r_ref, w_r**2, n_refs))
        # Clipped dot product min(hyp, ref) * ref over the n-grams both contain.
        w_h_match = _gather(w_h, o.h_row_of_r)
        dot = _sum_by(o.r_ref, np.minimum(w_h_match, w_r) * w_r, n_refs)
        both = (norm_h != 0) & (norm_r != 0)
        val = np.divide(dot, norm_h * norm_r, out=dot.copy(), where=both)
        per_ref += val * penalty
    per_img = _sum_by(c.ref_img, per_ref, c.n_images)
    return per_img / len(c.orders) / c.refs_per_img * 10.0


def _prf(c: _Corpus) -> tuple[float, float, float]:
    uni = c.orders[0]
    matches = _sum_by(uni.r_ref, np.minimum(uni.h_match, uni.r_count), c.ref_len.size)
    h_len = c.hyp_len[c.ref_img]
    denom = h_len + c.ref_len
    dice = np.divide(2 * matches, denom, out=np.zeros(matches.size), where=denom > 0)
    # Best reference per image: highest Dice, the first one on ties (stable sort keeps input order).
    order = np.lexsort((-dice, c.ref_img))
    first = np.r_[True, c.ref_img[order][1:] != c.ref_img[order][:-1]]
    best = order[first]
    matched, hyp_total, ref_total = matches[best].sum(), int(c.hyp_len.sum()), int(c.ref_len[best].sum())
    p = float(matched / hyp_total) if hyp_total else 0.0
    r = float(matched / ref_total) if ref_total else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def corpus_bleu(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n exactly as coco-caption's `Bleu(n)` (option "closest", its smoothing).

    Args:
        hypotheses: one token list per image.
        references: for each image, a non-empty list of reference token lists.
        n: the highest n-gram order.

    Returns:
        ``[BLEU-1, ..., BLEU-n]`` on a 0..1 scale.
    """
    return _bleu(_build(hypotheses, references, n))


def cider_d(
    hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]], n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """CIDEr-D exactly as coco-caption's `Cider()`; idf comes from the references given here.

    Args:
        hypotheses: one token list per image.
        references: for each image, a non-empty list of reference token lists.
        n: the highest n-gram order (coco-caption itself only works with 4).
        sigma: width of the Gaussian length penalty.

    Returns:
        ``(corpus score, per-image scores)`` on the usual x10 scale.
    """
    scores = _cider(_build(hypotheses, references, n), sigma)
    return float(scores.mean()), scores.tolist()


def token_prf(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]]) -> tuple[float, float, float]:
    """Micro-averaged token precision, recall and F1 against each image's best-matching reference.

    See `evaluate_captions` for the exact definition.

    Args:
        hypotheses: one token list per image.
        references: for each image, a non-empty list of reference token lists.

    Returns:
        ``(precision, recall, f1)`` on a 0..1 scale.
    """
    return _prf(_build(hypotheses, references, 1))


def _validate(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise TypeError("hypotheses and references must be lists, not a single string")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"got {len(hypotheses)} hypotheses but {len(references)} reference lists; need one list per hypothesis"
        )
    if len(hypotheses) == 0:
        raise ValueError("no captions to evaluate (empty hypotheses)")
    for i, (h, refs) in enumerate(zip(hypotheses, references)):
        if not isinstance(h, str):
            raise TypeError(f"hypotheses[{i}] must be a str, got {type(h).__name__}")
        if isinstance(refs, str):
            # A bare string would otherwise be iterated as one-character references.
            raise TypeError(f"references[{i}] must be a list of str, got a single str")
        if len(refs) == 0:
            raise ValueError(f"references[{i}] is empty; every image needs at least one reference caption")
        for j, r in enumerate(refs):
            if not isinstance(r, str):
                raise TypeError(f"references[{i}][{j}] must be a str, got {type(r).__name__}")


def evaluate_captions(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """Score generated captions against human references (one hypothesis per image).

    All captions are tokenized with `storyteller.vocab.tokenize` first.

    - ``bleu1``..``bleu4``: corpus BLEU as coco-caption (pycocoevalcap ``Bleu(4)``): n-gram counts
      clipped by their maximum count in any one reference, "closest" reference length (ties to the
      shorter) summed over the corpus for the brevity penalty, smoothing constants 1e-15 / 1e-9.
    - ``cider``: CIDEr-D as coco-caption (pycocoevalcap ``Cider()``): tf-idf of 1..4-grams with
      idf = log(#images) - log(max(1, df)) and df counted over the references passed here, clipped
      cosine similarity, Gaussian length penalty (sigma 6, lengths measured in bigrams as coco-caption
      does), averaged over orders and references, x10, then over images. Because idf uses only the
      given set, a single image always scores 0.
    - ``precision``, ``recall``, ``f1``: unigram overlap, micro-averaged over the corpus. For each
      image, m(r) = sum over words w of min(count of w in hypothesis, count of w in r) (clipped
      matches); the best-matching reference r* maximises the Dice score 2 m(r) / (|hyp| + |r|)
      (first one on ties). precision = sum m(r*) / sum |hyp|, recall = sum m(r*) / sum |r*|,
      f1 = their harmonic mean; each is 0 when its denominator is 0.

    Args:
        hypotheses: one generated caption (raw string) per image; may be empty.
        references: for each image, a non-empty list of raw reference captions.

    Returns:
        ``{"bleu1", "bleu2", "bleu3", "bleu4", "cider", "precision", "recall", "f1"}`` as floats;
        all on a 0..1 scale except CIDEr (typically 0..10).

    Raises:
        ValueError: lengths differ, no images, or an image without references.
        TypeError: a caption is not a str or a reference list is a bare str.
    """
    _validate(hypotheses, references)
    corpus = _build([tokenize(h) for h in hypotheses], [[tokenize(r) for r in refs] for refs in references], 4)
    out = {f"bleu{k + 1}": float(b) for k, b in enumerate(_bleu(corpus))}
    out["cider"] = float(_cider(corpus, 6.0).mean())
    p, r, f = _prf(corpus)
    out.update(precision=p, recall=r, f1=f)
    return out
