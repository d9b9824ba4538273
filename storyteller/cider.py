"""Per-caption CIDEr-D (and sentence BLEU-4) with fixed document frequencies: SCST's reward (``train.scst``) and
the consensus signal of a caption's confidence (``storyteller.confidence``).

    reward = CaptionReward(train_references)            # document frequencies: the training split's references
    refs = reward.encode_references(train_references)   # once: word ids per reference
    cider, bleu4 = reward.score(hyps, hyp_image, refs)  # (S,) each: sample s against refs[hyp_image[s]]

The definitions are ``storyteller.metrics``'s (pycocoevalcap's CIDEr-D: tf-idf of 1..4-grams, clipped
cosine, Gaussian length penalty with sigma 6 on the bigram counts, mean over orders and references,
x10; BLEU-4 per sentence as coco's ``Bleu`` scores each sentence: clipped counts, "closest"
reference length, smoothing 1e-15 / 1e-9) after the same tokenizer, with one difference that SCST
needs: the document frequencies come once from a fixed corpus (the training split's references,
as Rennie et al. and ruotianluo/self-critical.pytorch's "corpus" mode do), not from the references
being scored, so a sample's reward does not depend on which other images share its batch.

Vectorised like ``storyteller.metrics``: every word is an integer id (< ``BASE``), every n-gram one
int64 key (``((w1 * BASE + w2) * BASE + w3) * BASE + w4``; ids start at 1, so keys of different
orders never collide), and a batch is scored with a few ``np.unique`` / ``searchsorted`` /
``bincount`` calls per n-gram order instead of a dict per sentence.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .metrics import sorted_lookup
from .vocab import tokenize

# An n-gram is one int64 key: its word ids are the digits of a base-BASE number. 55,000 leaves room for
# 54,999 distinct words (more than a captioning corpus has) while a 4-gram's key stays below
# BASE**4 = 9.15e18 < 2**63 = 9.22e18, so keys never overflow.
BASE = 55_000
UNKNOWN_ID = BASE - 1  # encode_known's id for a word outside the corpus
CIDER_SCALE = 10.0  # coco-caption reports CIDEr-D x10 (the scale of every CIDEr-D figure in this project)
_BLEU_TINY, _BLEU_SMALL = 1e-15, 1e-9  # coco-caption's BLEU smoothing (as storyteller.metrics)


def _segments(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For segments of sizes ``counts``: (segment of each element, position inside its segment)."""
    total = int(counts.sum())
    seg = np.repeat(np.arange(counts.size), counts)
    return seg, np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)


def _ngrams(sentences: Sequence[np.ndarray], n: int):
    """Yield, for k = 1..n, (sentence index, key) of every k-gram of ``sentences`` (word-id arrays)."""
    lengths = np.array([len(s) for s in sentences], dtype=np.int64)
    flat = np.concatenate(sentences).astype(np.int64) if len(sentences) else np.zeros(0, np.int64)
    sent, pos = _segments(lengths)
    room = lengths[sent] - pos  # tokens from this position to the end of its sentence
    key = np.zeros(flat.size, dtype=np.int64)
    for k in range(1, n + 1):
        valid = np.flatnonzero(room >= k)
        key[valid] = key[valid] * BASE + flat[valid + k - 1]  # extend the (k-1)-gram starting here
        yield sent[valid], key[valid]


class CaptionReward:
    """CIDEr-D and sentence BLEU-4 of sampled captions, with fixed document frequencies.

    Args:
        df_references: for each image of the document-frequency corpus (the training split), its raw
            reference captions.
        n: highest n-gram order (4, as coco-caption).
        sigma: width of CIDEr-D's Gaussian length penalty.
    """

    def __init__(self, df_references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        self.word_ids: dict[str, int] = {}
        refs = self.encode_references(df_references)
        sentences = [r for rs in refs for r in rs]
        image = np.repeat(np.arange(len(refs)), [len(rs) for rs in refs])
        keys, dfs = [], []
        for sent, key in _ngrams(sentences, n):
            # document frequency: in how many images' reference sets each n-gram occurs
            img_key = np.unique(np.stack([image[sent], key], 1), axis=0)
            k, df = np.unique(img_key[:, 1], return_counts=True)
            keys.append(k)
            dfs.append(df)
        order = np.argsort(np.concatenate(keys))  # orders never share keys: one sorted table
        self.df_keys = np.concatenate(keys)[order]
        self.df_counts = np.concatenate(dfs)[order].astype(np.float64)
        self.log_images = float(np.log(float(len(refs))))  # coco's ref_len

    @classmethod
    def from_tables(cls, words: Sequence[str], df_keys: np.ndarray, df_counts: np.ndarray, images: int,
                    n: int = 4, sigma: float = 6.0) -> "CaptionReward":
        """The reward :meth:`tables` describes, without its corpus (a model folder's confidence calibration).

        Args:
            words: the corpus's words, word id i + 1 each.
            df_keys, df_counts: the n-gram keys with a document frequency of 2 or more, ascending, and those
                frequencies (a frequency of 1 gives the same idf as 0: ``idf`` floors it at 1).
            images: the number of images of the corpus.
        """
        self = cls.__new__(cls)
        self.n, self.sigma = n, sigma
        self.word_ids = {w: i + 1 for i, w in enumerate(words)}
        self.df_keys = np.asarray(df_keys, dtype=np.int64)
        self.df_counts = np.asarray(df_counts, dtype=np.float64)
        self.log_images = float(np.log(float(images)))
        return self

    def tables(self) -> tuple[list[str], np.ndarray, np.ndarray, int]:
        """``(words, df_keys, df_counts, images)`` for :meth:`from_tables`: the same idf of every n-gram."""
        words = sorted(self.word_ids, key=self.word_ids.get)
        keep = self.df_counts >= 2
        return words, self.df_keys[keep], self.df_counts[keep], int(round(np.exp(self.log_images)))

    def encode_known(self, caption: str) -> np.ndarray:
        """:meth:`encode` that adds no word (safe from concurrent threads): a word the corpus lacks gets
        ``UNKNOWN_ID``, which no reference has, so it matches nothing (two such words share it, which only
        matters for the hypothesis's own norm)."""
        return np.array([self.word_ids.get(w, UNKNOWN_ID) for w in tokenize(caption)], dtype=np.int64)

    # -- words -> ids --------------------------------------------------------------------------
    def word_id(self, word: str) -> int:
        """The id of a token (new tokens get the next id)."""
        i = self.word_ids.setdefault(word, len(self.word_ids) + 1)
        if i >= UNKNOWN_ID:
            raise ValueError(f"more than {UNKNOWN_ID - 1} distinct words: n-gram keys would overflow int64")
        return i

    def encode(self, caption: str) -> np.ndarray:
        """A raw caption -> word-id array (the project tokenizer first)."""
        return np.array([self.word_id(w) for w in tokenize(caption)], dtype=np.int64)

    def encode_references(self, references: Sequence[Sequence[str]]) -> list[list[np.ndarray]]:
        """Raw references per image -> word-id arrays per image (do it once per split)."""
        return [[self.encode(r) for r in refs] for refs in references]

    def vocab_map(self, itos: Sequence[str]) -> np.ndarray:
        """(V,) reward word id of each model token id (special tokens map to 0: strip them first)."""
        return np.array([0 if w.startswith("<") and w.endswith(">") else self.word_id(w) for w in itos], dtype=np.int64)

    def idf(self, keys: np.ndarray) -> np.ndarray:
        """log(#images) - log(max(1, df)) of each n-gram key (df 0 for n-grams no reference has)."""
        row = sorted_lookup(self.df_keys, keys)
        df = np.where(row >= 0, self.df_counts[np.maximum(row, 0)], 0.0)
        return self.log_images - np.log(np.maximum(df, 1.0))

    # -- scoring -------------------------------------------------------------------------------
    def score(self, hyps: Sequence[np.ndarray], hyp_image: np.ndarray,
              refs: Sequence[Sequence[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """CIDEr-D and sentence BLEU-4 of each hypothesis against the references of its image.

        Args:
            hyps: S word-id arrays (from :meth:`encode` or :meth:`vocab_map`); may be empty.
            hyp_image: (S,) index into ``refs`` of each hypothesis's image.
            refs: word-id arrays of the references, per image (each image at least one).

        Returns:
            ``(cider, bleu4)``, each (S,) float64: CIDEr-D on coco's x10 scale, BLEU-4 on 0..1.
        """
        S, hyp_image = len(hyps), np.asarray(hyp_image, dtype=np.int64)
        refs_per_img = np.array([len(r) for r in refs], dtype=np.int64)
        ref_start = np.cumsum(refs_per_img) - refs_per_img
        ref_img = np.repeat(np.arange(len(refs)), refs_per_img)  # (R,) image of each flattened reference
        R = int(refs_per_img.sum())
        hyp_len = np.array([len(h) for h in hyps], dtype=np.int64)  # (S,)
        ref_len = np.array([len(r) for rs in refs for r in rs], dtype=np.int64)  # (R,)
        # Pairs (sample s, reference r of its image): P = sum of refs_per_img[hyp_image]
        pair_count = refs_per_img[hyp_image]  # (S,)
        pair_start = np.cumsum(pair_count) - pair_count
        pair_s, pair_j = _segments(pair_count)  # (P,) each
        pair_r = ref_start[hyp_image[pair_s]] + pair_j  # (P,)
        P = pair_s.size

        # coco's Gaussian length penalty measures lengths in bigrams (max(0, tokens - 1))
        delta = (np.maximum(hyp_len - 1, 0)[pair_s] - np.maximum(ref_len - 1, 0)[pair_r]).astype(np.float64)
        penalty = np.exp(-(delta ** 2) / (2 * self.sigma ** 2))  # (P,)
        cider_pairs = np.zeros(P)
        log_bleu = np.zeros(S)

        sentences = list(hyps) + [r for rs in refs for r in rs]  # hypotheses are sentences 0..S-1
        for k, (sent, key) in enumerate(_ngrams(sentences, self.n)):
            grams, g = np.unique(key, return_inverse=True)  # dense ids of this batch's k-grams
            G = max(grams.size, 1)
            pair, count = np.unique(sent * G + g.reshape(-1), return_counts=True)  # distinct (sentence, gram)
            s, g = pair // G, pair % G
            w = count * self.idf(grams)[g]  # tf-idf weight of each (sentence, gram)
            is_h = s < S
            h_s, h_g, h_c, h_w = s[is_h], g[is_h], count[is_h], w[is_h]
            r_r, r_g, r_c, r_w = s[~is_h] - S, g[~is_h], count[~is_h], w[~is_h]  # r_r*G+r_g ascending
            norm_h = np.sqrt(np.bincount(h_s, h_w ** 2, minlength=S))  # (S,)
            norm_r = np.sqrt(np.bincount(r_r, r_w ** 2, minlength=R))  # (R,)

            # CIDEr-D: every hypothesis row meets the same gram in each reference of its image
            reps = pair_count[h_s]
            e_row, e_j = _segments(reps)  # expanded rows: (hyp row, j-th reference of its image)
            e_pair = pair_start[h_s][e_row] + e_j
            hit = sorted_lookup(r_r * G + r_g, pair_r[e_pair] * G + h_g[e_row])
            e_w_r = np.where(hit >= 0, r_w[np.maximum(hit, 0)] if r_w.size else 0.0, 0.0)
            dot = np.bincount(e_pair, np.minimum(h_w[e_row], e_w_r) * e_w_r, minlength=P)  # clipped dot product
            denom = norm_h[pair_s] * norm_r[pair_r]
            cider_pairs += np.divide(dot, denom, out=np.zeros(P), where=denom > 0) * penalty

            # BLEU: hypothesis counts clipped by the gram's highest count in any one reference of the image
            img_gram, inv = np.unique(ref_img[r_r] * G + r_g, return_inverse=True)
            max_ref = np.zeros(img_gram.size, dtype=np.int64)
            np.maximum.at(max_ref, inv.reshape(-1), r_c)
            row = sorted_lookup(img_gram, hyp_image[h_s] * G + h_g)
            clipped = np.minimum(h_c, np.where(row >= 0, max_ref[np.maximum(row, 0)] if max_ref.size else 0, 0))
            correct = np.bincount(h_s, clipped, minlength=S)
            guess = np.maximum(hyp_len - k, 0)
            log_bleu += np.log((correct + _BLEU_TINY) / (guess + _BLEU_SMALL))

        cider = np.bincount(pair_s, cider_pairs, minlength=S) / self.n / np.maximum(pair_count, 1) * CIDER_SCALE
        # closest reference length (ties to the shorter), per sample, for the brevity penalty
        order = np.lexsort((ref_len[pair_r], np.abs(ref_len[pair_r] - hyp_len[pair_s]), pair_s))
        first = np.r_[True, pair_s[order][1:] != pair_s[order][:-1]] if P else np.zeros(0, bool)
        closest = np.zeros(S, dtype=np.int64)
        closest[pair_s[order][first]] = ref_len[pair_r][order][first]
        bleu4 = np.exp(log_bleu / self.n)
        ratio = (hyp_len + _BLEU_TINY) / (closest + _BLEU_SMALL)
        bleu4 = np.where(ratio < 1, bleu4 * np.exp(1 - 1 / ratio), bleu4)
        return cider, bleu4

    def score_text(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`score` of raw captions, one hypothesis per reference list."""
        return self.score([self.encode(h) for h in hypotheses], np.arange(len(hypotheses)),
                          self.encode_references(references))
