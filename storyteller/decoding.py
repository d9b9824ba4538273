"""Batched greedy and beam search for any decoder that speaks the decoding protocol: the pooled
Show-and-Tell decoder, the Show-Attend-Tell decoder and their ensembles alike (``storyteller.decoders.base``
describes the protocol; a decoder with ``has_attention`` also returns where it looked for every word). A decoder's step
products (``model.products()``, in its precision) are made once per search.

Both searches run one decoder call per time step for all sequences of all images at once (beam
search: images x beams flattened into one batch); the first step runs once per image, and once most
sequences have finished, the finished ones are dropped from the call, so a batch where most captions
have ended costs little. Beam search stops an image as soon as its ``n_best`` captions can no longer
change (no open hypothesis can still reach them), with exactly the captions a search to the end returns
(up to float32 rounding in near-ties: fewer rows then share a decoder call).

Conventions shared by both:
- a caption has at most ``max_len`` decoder steps; ``<end>`` counts as a step. A sequence that
  reaches ``max_len`` without ``<end>`` is cut there and still returned (``finished=False``), so a
  caption always comes back, also from a model that never emits ``<end>``.
- the token rules of ``storyteller.token_rules``: ``<pad>`` and ``<start>`` are never emitted; ``<unk>`` is
  suppressed unless ``suppress_unk=False`` (then it is kept, shown as "<unk>" in the text); ``<end>`` is
  allowed only after ``min_len`` words (default 1), so an empty caption never comes back.
- ``no_repeat_ngram_size=n`` forbids any n-gram from appearing twice in one caption (3 = the usual
  trigram blocking; 0 disables).
- ``bad_endings``: words a caption may not end on (``<end>`` is forbidden right after them), e.g. the
  function words that CIDEr-trained models like to stop on ("... with a").
- a caption always comes back: where the rules above leave a hypothesis no token at all (a tiny
  vocabulary with n-gram blocking, say), it may end there with ``<end>``.
- ``log_prob`` is the sum of the emitted tokens' log-probabilities (``<end>`` included when emitted);
  ``score`` is ``log_prob / ((5 + length) / 6) ** alpha`` (GNMT length normalisation; alpha=0 gives
  the raw log-probability). Greedy search has no alpha: its score is its log_prob. Each caption also carries
  the log-probability of each of its words (``word_log_probs``) and of ``<end>`` (``end_log_prob``), recorded
  as the search chose them: the parts of that sum, no second pass needed (``storyteller.scoring`` finds the same
  by teacher forcing, with the alternatives at every step).

Call the decoder in ``eval()`` mode or not: decoding switches dropout off and restores the mode.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .decoding_settings import check_beam, check_setting
from .token_rules import forbidden_tokens
from .vocab import Vocabulary

# While more than this share of a step's rows is live, every row runs and the others are masked: picking
# rows out and writing them back costs more than the step saves on a few finished rows.
LIVE_SHARE = 0.5


@dataclass
class Caption:
    """One decoded caption."""

    text: str  # words joined by spaces; no special tokens but an emitted "<unk>" (only with suppress_unk=False)
    tokens: list[int]  # the word ids of ``text`` (no <start>, <end> or <pad>)
    log_prob: float  # sum of log-probabilities of the emitted tokens
    score: float  # log_prob after length normalisation (equal to log_prob when alpha = 0)
    finished: bool  # True when the decoder emitted <end>; False when cut at max_len
    # attention decoders: (words, h, w) weights (or (words, R) for region inputs) that chose each word's
    # context, one map per word of ``tokens``; None for pooled decoders
    attention: torch.Tensor | None = None
    # the estimated probability that the caption is good (storyteller.confidence: the model's calibrator applied
    # to what the search saw); None when the model has no calibrator: never a made-up number
    confidence: float | None = None
    # the log-probability the search gave each word of ``tokens`` as it chose it (what ``storyteller.scoring``
    # finds by teacher forcing, without another pass): sum(word_log_probs) + (end_log_prob or 0) == log_prob
    word_log_probs: list[float] | None = None
    end_log_prob: float | None = None  # <end>'s log-probability; None when the caption was cut at max_len


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off for the block, every module's own mode restored after it; a model in eval mode already (the
    app, serving concurrent requests) is left untouched."""
    modes = [(m, m.training) for m in model.modules()]
    if not any(training for _, training in modes):  # all in eval mode already (the app, evaluation)
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _check(model, features: torch.Tensor, max_len: int, min_len: int, no_repeat_ngram_size: int) -> None:
    if not getattr(model, "has_attention", False) and features.dim() != 2:
        raise ValueError(f"features must be (batch, feature_dim), got shape {tuple(features.shape)}")
    check_setting("max_len", max_len)
    check_setting("no_repeat_ngram_size", no_repeat_ngram_size)
    check_setting("min_len", min_len)
    if min_len > max_len:
        raise ValueError(f"min_len must be in 0..max_len, got min_len={min_len}, max_len={max_len}")
    if features.is_floating_point() and not bool(torch.isfinite(features).all()):
        # NaN or inf would make every log-probability NaN: no caption could be ranked
        raise ValueError("features hold NaN or infinite values: the image encoder (or the feature cache) is broken")


class DecoderCalls:
    """How a search (or any loop of decoder steps: ``storyteller.scoring``) calls its decoder, through the
    decoding protocol of ``storyteller.decoders.base``: ``model.products()`` made once for the whole loop,
    ``initial_state``, ``step(tokens, state, products=...)``, ``select_state`` and ``scatter_state``.

    Args:
        model: the decoder.
        attention: also return the attention weights of every step (decoders with ``has_attention``).
    """

    def __init__(self, model, attention: bool):
        self.model, self.attention = model, attention
        self.products = model.products()

    def init(self, features: torch.Tensor):
        return self.model.initial_state(features, self.products)

    def step(self, tokens: torch.Tensor, state):
        """tokens (N,) -> (log_probs (N, V), state, attention weights (N, R) or None)."""
        if self.attention:
            return self.model.step(tokens, state, products=self.products, return_attention=True)
        logp, state = self.model.step(tokens, state, products=self.products)
        return logp, state, None

    def select(self, state, rows: torch.Tensor):
        return self.model.select_state(state, rows)

    def scatter(self, state, rows: torch.Tensor, sub):
        return self.model.scatter_state(state, rows, sub)


def _mask_dead(logp: torch.Tensor, alpha: torch.Tensor | None, live: torch.Tensor):
    """Rows not live: log-probabilities -inf (in place: callers pass fresh tensors), attention weights 0."""
    dead = ~live[:, None]
    return logp.masked_fill_(dead, float("-inf")), None if alpha is None else alpha.masked_fill(dead, 0.0)


def _live_step(calls: DecoderCalls, tokens: torch.Tensor, state, live: np.ndarray):
    """Run the decoder's step for the rows where ``live`` is True.

    tokens (N,), state of N rows, live (N,) bool array -> log_probs (N, V) (rows not live are -inf), the
    new state and the attention weights (N, R) (zeros where not live) or None. While more than LIVE_SHARE
    of the rows are live, all rows run and the others are masked (a row's numbers do not depend on its
    batch); after that only the live rows run and the others keep their state. A row that is not live
    never uses its state again.
    """
    N, n = tokens.shape[0], np.count_nonzero(live)
    if n > LIVE_SHARE * N:
        logp, state, alpha = calls.step(tokens, state)
        if n < N:
            logp, alpha = _mask_dead(logp, alpha, torch.from_numpy(live).to(logp.device))
        return logp, state, alpha
    idx = torch.from_numpy(np.flatnonzero(live)).to(tokens.device)
    logp_live, sub, alpha_live = calls.step(tokens[idx], calls.select(state, idx))
    logp = logp_live.new_full((N, logp_live.shape[1]), float("-inf"))
    logp[idx] = logp_live
    alpha = None
    if alpha_live is not None:
        alpha = alpha_live.new_zeros((N, alpha_live.shape[1]))
        alpha[idx] = alpha_live
    return logp, calls.scatter(state, idx, sub), alpha


def _bad_ending_ids(vocab: Vocabulary, bad_endings) -> np.ndarray | None:
    """(len(vocab),) bool table: True for the ids a caption may not end on; None when there are none."""
    if not bad_endings:
        return None
    if isinstance(bad_endings, str):
        raise TypeError("bad_endings must be a sequence of words, not one string")
    words = {w.strip().lower() for w in bad_endings}  # the vocabulary is lower case
    ids = sorted({vocab.stoi[w] for w in words if w in vocab.stoi and vocab.stoi[w] > Vocabulary.unk_id})
    if not ids:
        return None
    table = np.zeros(len(vocab), dtype=bool)
    table[ids] = True
    return table


class _Rules:
    """The token rules of one search (``storyteller.token_rules``' per-step rules, plus the history-dependent ones:
    bad endings and n-gram blocking), prepared once."""

    def __init__(self, V: int, suppress_unk: bool, no_repeat_ngram_size: int, min_len: int,
                 bad_ids: np.ndarray | None, device: torch.device):
        self.V, self.n, self.min_len, self.bad_ids, self.device = V, no_repeat_ngram_size, min_len, bad_ids, device
        self.suppress_unk = suppress_unk
        self._flat: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}
        self._numpy_fill: bool | None = None  # set by the first step: float32 log-probabilities on the CPU

    def banned_cells(self, N: int, step: int) -> np.ndarray:
        """Flat indices row * V + token of ``storyteller.token_rules.forbidden_tokens`` at ``step`` for N rows."""
        cols = forbidden_tokens(step, self.min_len, self.suppress_unk)
        if (N, cols) not in self._flat:
            self._flat[N, cols] = (np.arange(N, dtype=np.int64)[:, None] * self.V + np.array(cols, dtype=np.int64)).ravel()
        return self._flat[N, cols]

    def apply(self, logp: torch.Tensor, history: np.ndarray) -> torch.Tensor:
        """Forbid special tokens, too-early <end>, <end> after a bad ending, and repeated n-grams.

        logp (N, V), changed in place (callers pass the step's fresh output) and returned, history (N, t)
        emitted ids. The (row, token) cells to forbid are found on the (small) history in NumPy and set to
        -inf in one store (through NumPy for float32 on the CPU, else ``index_fill_``). A row left with no
        allowed token may take ``<end>``.
        """
        n, t = self.n, history.shape[1]
        if not logp.is_contiguous():  # a decoder may return a strided view; the cells are set through a flat view
            logp = logp.contiguous()
        banned = self.banned_cells(logp.shape[0], t)
        never = len(forbidden_tokens(t, 0, self.suppress_unk))  # the banned tokens other than <end>
        blockable = never + (t - n + 1 if 0 < n <= t else 0)  # most non-<end> tokens a row can lose
        may_stick = self.V - 1 <= blockable  # only with tiny vocabularies; then keep the model's own <end>
        raw_end = logp[:, Vocabulary.end_id].clone() if may_stick else None
        # flat indices row * V + token of the cells to forbid; live sequences have emitted t words
        forbid = [banned]
        if self.bad_ids is not None and t > 0:
            bad = self.bad_ids[history[:, t - 1]].nonzero()[0]  # rows whose last word may not end a caption
            forbid.append(bad * self.V + Vocabulary.end_id)
        if 0 < n <= t:
            # match[r, j]: row r's n-gram starting at j begins with the n-1 tokens a new n-gram would start with
            w = t - n + 1  # n-grams emitted so far
            match = history[:, :w] == history[:, w, None] if n > 1 else np.ones((history.shape[0], w), dtype=bool)
            for j in range(1, n - 1):
                match &= history[:, j:j + w] == history[:, w + j, None]
            r, at = match.nonzero()  # each earlier n-gram the new one would repeat: forbid its last token
            forbid.append(r * self.V + history[r, at + n - 1])
        cells = (np.concatenate(forbid) if len(forbid) > 1 else forbid[0]).astype(np.int64, copy=False)
        if self._numpy_fill is None:  # the same for every step of a search
            self._numpy_fill = logp.device.type == "cpu" and logp.dtype == torch.float32 and not logp.requires_grad
        if self._numpy_fill and logp._base is None:  # not a view of some other tensor (that one's version must move)
            logp.numpy().reshape(-1)[cells] = -np.inf  # the same memory; a NumPy store costs a fraction of a torch call
        else:
            logp.view(-1).index_fill_(0, torch.from_numpy(cells).to(self.device), float("-inf"))
        # Rules that leave a (live) row nothing to emit must not lose its caption: let it end here.
        if may_stick:
            stuck = (logp.amax(-1) == float("-inf")) & (raw_end > float("-inf"))
            if bool(stuck.any()):
                logp[stuck, Vocabulary.end_id] = raw_end[stuck]
        return logp


@functools.lru_cache(maxsize=64)
def _length_penalty(max_len: int, alpha: float) -> np.ndarray:
    """(max_len + 1,) float32: length -> GNMT penalty ((5 + length) / 6) ** alpha (read-only, shared)."""
    lengths = torch.arange(max_len + 1)
    penalty = torch.ones(max_len + 1) if alpha == 0 else ((5.0 + lengths.float()) / 6.0) ** alpha
    out = penalty.numpy()
    out.flags.writeable = False
    return out


def _to_caption(vocab: Vocabulary, ids: list[int], log_prob: float, score: float,
                attention: torch.Tensor | None = None, grid: tuple[int, int] | None = None,
                step_log_probs: list[float] | None = None) -> Caption:
    """Emitted ids (maybe ending in <end> then <pad>s) -> Caption without <end> and <pad>.

    An emitted ``<unk>`` (only with ``suppress_unk=False``) stays, in ``tokens`` and as the visible word
    "<unk>" in ``text``: dropping it would make "a man is eating a <unk>" read "a man is eating a", and its
    tokens would no longer score to its ``log_prob``. ``attention`` (steps, R): the weights of every step;
    the rows of the kept words are returned, shaped (words, h, w) when ``grid`` is known. ``step_log_probs``
    (steps,): each emitted token's log-probability; those of the kept words and of <end> are returned.
    """
    finished = Vocabulary.end_id in ids
    end_lp = None
    if finished:
        end = ids.index(Vocabulary.end_id)
        ids, end_lp = ids[:end], None if step_log_probs is None else step_log_probs[end]
    keep = [j for j, i in enumerate(ids) if i >= Vocabulary.unk_id]  # <pad>, <start> never before <end>
    words = [ids[j] for j in keep]
    att = None
    if attention is not None:
        att = attention[keep].float().cpu()  # (words, R)
        if grid is not None:
            att = att.view(len(keep), *grid)
    word_lps = None if step_log_probs is None else [step_log_probs[j] for j in keep]
    return Caption(text=" ".join(vocab.itos[i] for i in words), tokens=words, log_prob=log_prob, score=score,
                   finished=finished, attention=att, word_log_probs=word_lps, end_log_prob=end_lp)


def _grid_of(features: torch.Tensor) -> tuple[int, int] | None:
    return (int(features.shape[1]), int(features.shape[2])) if features.dim() == 4 else None


class _Beams:
    """The hypotheses of one search over B images: K per image, as (B, K) NumPy arrays.

    A greedy search is the width-1 case that takes the argmax of each step (``greedy=True``), exactly
    what greedy decoding does; a beam search ranks all K x V extensions of each image by their
    length-normalised score. Finished hypotheses stay in their slot, continuing with ``<pad>`` at zero cost.
    ``history`` (B*K, max_len) is this search's part of the preallocated token history of ``_search``, and
    ``step_lp`` beside it each emitted token's log-probability (reordered with it), so a caption's per-word
    log-probabilities come with it (they add up to its score: the same float32 sums);
    ``open`` marks the hypotheses still growing (not finished, finite score, image not done).

    The bookkeeping is small ((B, K) numbers per step) and lives in NumPy: a NumPy operation on a few
    numbers costs a fraction of a PyTorch call, and a one-photo search makes dozens of them per step. The
    (rows, V) log-probabilities stay in PyTorch on the model's device; each step hands this class only
    every row's best few tokens (``_search``). Float32 arithmetic is the same in both.

    An image is done early once none of its open hypotheses can still reach its ``n_best``-th best finished
    one: log-probabilities only fall, so a hypothesis's best final score is its score now over the largest
    length penalty it can still get. Its top ``n_best`` can no longer change, so the search stops there
    with exactly the captions a search to the end would return (up to float32 rounding: the rows that
    remain run in smaller batches, and a float32 product may round its last bit differently there).
    """

    def __init__(self, B: int, K: int, greedy: bool, alpha: float, max_len: int, n_best: int = 1):
        self.B, self.K, self.greedy, self.alpha, self.n_best = B, K, greedy, alpha, n_best
        self.scores = np.full((B, K), -np.inf, dtype=np.float32)  # raw log-prob sums
        self.scores[:, 0] = 0.0  # all beams start identical: expand one, or the top-K would be K copies
        self.lengths = np.zeros((B, K), dtype=np.int64)
        self.finished = np.zeros((B, K), dtype=bool)
        self.open = np.isfinite(self.scores)
        self.history = np.empty((B * K, 0), dtype=np.int64)  # set by _search
        self.step_lp = np.empty((B * K, 0), dtype=np.float32)  # set by _search
        self.steps = 0  # tokens emitted so far (columns of ``history`` in use)
        self.att = None  # (B, K, t, R) attention weights of each hypothesis's steps (a tensor on the model's device)
        self.image = np.arange(B, dtype=np.int64)[:, None]  # (B, 1) each image's index, to pick entries of (B, .) arrays
        self.offsets = self.image * K  # (B, 1) row of each image's first beam
        self.penalty = _length_penalty(max_len, float(alpha))  # length -> GNMT penalty
        self.most_penalty, self.least_penalty = self.penalty.max(), self.penalty.min()  # the divisors a score can still get
        self.done = np.full(K, -np.inf, dtype=np.float32)  # a finished hypothesis's continuations:
        self.done[0] = 0.0  # <pad> at zero cost, nothing else
        self.checks_scores = True  # until a step hands out a positive log-probability (then no early stop)

    @property
    def rows(self) -> int:
        return self.B * self.K

    def advance(self, lp: np.ndarray, ids: np.ndarray, alpha_t: torch.Tensor | None) -> tuple[np.ndarray | None, np.ndarray]:
        """Extend every hypothesis by one token.

        lp, ids (B*K, k): each row's k best masked log-probabilities (rows not live: -inf) and their
        tokens, best first (k = ``_width``: 1 for greedy, else min(K, V)); alpha_t (B*K, R) or None -> (the
        rows, within this search, the new hypotheses continue (B*K,), or None where every row continues itself
        (greedy); their tokens (B*K,)). The caller writes the tokens into ``history`` at column ``steps - 1``;
        their log-probabilities go into ``step_lp`` here."""
        B, K, t = self.B, self.K, self.steps
        self.steps += 1
        if self.greedy:  # width 1: the argmax, as greedy decoding always did
            fin = self.finished[:, 0]  # (B,)
            # (B,) each: the argmax's log-probability and token; a finished caption continues with <pad> at 0
            best, tok = np.where(fin, np.float32(0.0), lp[:, 0]), np.where(fin, Vocabulary.pad_id, ids[:, 0])
            self.lengths += ~self.finished
            self.finished = self.finished | (tok == Vocabulary.end_id)[:, None]
            self.scores += best[:, None]
            self.step_lp[:, t] = best
            self.open = ~self.finished & (self.scores > -np.inf)
            if alpha_t is not None:
                step = alpha_t.view(B, 1, 1, alpha_t.shape[-1])
                self.att = step if self.att is None else torch.cat([self.att, step], 2)
            return None, tok
        # Each hypothesis's k best tokens first: within one hypothesis, log-probability, raw score and
        # normalised score rank its extensions alike, so the image's K best are among these K x k.
        k = lp.shape[1]
        lp, ids = lp.reshape(B, K, k), ids.reshape(B, K, k)
        # a finished hypothesis has one continuation, <pad>, at zero cost: it keeps its slot
        if self.finished.any():
            lp = np.where(self.finished[..., None], self.done[:k], lp)
            ids = np.where(self.finished[..., None], Vocabulary.pad_id, ids)
        cand = (self.scores[..., None] + lp).reshape(B, K * k)  # raw scores of the extensions
        cand_len = self.lengths + ~self.finished  # (B, K) lengths after this token (finished ones stay)
        ranked = cand / np.repeat(self.penalty[cand_len], k, axis=1) if self.alpha else cand
        # (B, K) best extensions per image, best first (a stable sort: of equal scores, the lower candidate
        # index; which of a row's equal tokens are its candidates, and their order, is topk's)
        top = np.argsort(-ranked, axis=1, kind="stable")[:, :K]
        image = self.image
        beam, tok = top // k, ids.reshape(B, K * k)[image, top]
        chosen = lp.reshape(B, K * k)[image, top]  # (B, K) each new hypothesis's token's log-probability
        self.scores = cand[image, top]
        self.lengths = cand_len[image, beam]
        self.finished = self.finished[image, beam] | (tok == Vocabulary.end_id)
        self.open = ~self.finished & (self.scores > -np.inf)
        if self.n_best < K and self.checks_scores and self.finished.any():
            self._stop_done_images(lp)
        rows = (beam + self.offsets).reshape(-1)  # (B*K,) the row each new hypothesis continues
        self.history[:, :t] = self.history[rows, :t]  # in place: a view of _search's buffer
        self.step_lp[:, :t] = self.step_lp[rows, :t]
        self.step_lp[:, t] = chosen.reshape(-1)
        if alpha_t is not None:
            R = alpha_t.shape[-1]
            step_att = alpha_t.view(B, K, 1, R)
            if self.att is not None:
                step_att = torch.cat([self.att, step_att], 2)  # (B, K, t+1, R) before reordering
            index = torch.from_numpy(beam).to(alpha_t.device)[:, :, None, None].expand(-1, -1, t + 1, R)
            self.att = step_att.gather(1, index)
        return rows, tok.reshape(-1)

    def _stop_done_images(self, lp: np.ndarray) -> None:
        """Close the images whose top ``n_best`` can no longer change (see the class docstring).

        lp (B, K, k): this step's best log-probabilities per hypothesis. The bound needs every step from
        here on to return log-probabilities (never above 0), as ``step`` must; scores above 0 so far
        only change which penalty bounds them. A decoder whose step hands out a positive value when an
        image would stop is taken to return raw scores and is searched to the end."""
        final = np.where(self.finished, self.scores / self.penalty[self.lengths], -np.inf)  # (B, K)
        nth = final.max(1) if self.n_best == 1 else np.sort(final, axis=1)[:, -self.n_best]  # (B,) or -inf
        best = np.where(self.open, self.scores, -np.inf).max(1)  # (B,) the best open score now
        # its final score is at most best / penalty: the largest penalty bounds a score <= 0, the smallest one above 0
        reach = np.where(best > 0, best / self.least_penalty, best / self.most_penalty)  # (B,)
        done = reach < nth
        if done.any():
            if (lp[..., 0] > 0).any():  # not log-probabilities: the bound does not hold
                self.checks_scores = False
                return
            self.open &= ~done[:, None]

    def captions(self, vocab: Vocabulary, grid: tuple[int, int] | None) -> list[list[Caption]]:
        """Per image, up to ``n_best`` captions best first (greedy: its one caption, score = log_prob)."""
        final = self.scores if self.greedy else self.scores / self.penalty[self.lengths]
        order = np.argsort(-final, axis=1, kind="stable").tolist()  # best first; equal scores keep their order
        history = self.history[:, :self.steps].reshape(self.B, self.K, self.steps).tolist()
        step_lp = self.step_lp[:, :self.steps].reshape(self.B, self.K, self.steps).tolist()
        scores, final = self.scores.tolist(), final.tolist()  # one conversion each, not a few per caption
        results = []
        for b in range(self.B):
            caps = []
            for k in order[b]:
                if len(caps) == self.n_best:
                    break
                if math.isfinite(scores[b][k]):
                    caps.append(_to_caption(vocab, history[b][k], scores[b][k], final[b][k],
                                            None if self.att is None else self.att[b, k], grid, step_lp[b][k]))
            results.append(caps)
        return results


def _numpy(best: torch.Tensor, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    if best.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds every bfloat16 value exactly
        best = best.float()
    return best.cpu().numpy(), ids.cpu().numpy()


def _width(g: _Beams, V: int) -> int:
    """How many best tokens per row a search takes: 1 for greedy, else min(K, V)."""
    return 1 if g.greedy else min(g.K, V)


def _best_tokens(logp: torch.Tensor, g: _Beams) -> tuple[np.ndarray, np.ndarray]:
    """One search's rows of a step (rows, V) -> each row's best tokens as NumPy arrays (log-probabilities,
    ids), best first: a beam's ``min(K, V)`` best (``topk``); greedy rows, and a beam of 1, their argmax
    (``max``: the first of equal values, so a beam of 1 is greedy search even where log-probabilities tie).
    One call per search: a ``topk`` shared by the greedy and beam rows of a step saved 7% of a one-photo search
    (measured 2026-11-27), under the 10% that would pay for the code it needs to give greedy rows ``max``'s ties."""
    k = _width(g, logp.shape[1])
    return _numpy(*(logp.max(1, keepdim=True) if k == 1 else logp.topk(k, dim=1)))


def _search(model, features: torch.Tensor, searches: list[tuple[int, bool, float, int]], vocab: Vocabulary,
            max_len: int, suppress_unk: bool, no_repeat_ngram_size: int, min_len: int,
            bad_endings: Sequence[str]) -> list[_Beams]:
    """Run several searches (``(width, greedy, alpha, n_best)`` each) over the same images in one decoder call
    per step: their rows are stacked, [search 0: B*K0 rows | search 1: B*K1 rows | ...], so the weights are
    read once per step for all of them; once most captions have ended, the rows that ended drop out of the
    call (``_live_step``). Per step, PyTorch applies the token rules to the (N, V) log-probabilities and takes
    each search's best tokens per row (one ``max`` or ``topk`` per search); the searches' bookkeeping runs on
    those in NumPy (``_Beams``)."""
    _check(model, features, max_len, min_len, no_repeat_ngram_size)
    with eval_mode(model):
        calls = DecoderCalls(model, attention=bool(getattr(model, "has_attention", False)))
        B, dev = features.shape[0], features.device
        groups = [_Beams(B, K, greedy, alpha, max_len, n_best) for K, greedy, alpha, n_best in searches]
        starts = np.cumsum([0] + [g.rows for g in groups]).tolist()  # each search's first row; the last: N
        history = np.zeros((starts[-1], max_len), dtype=np.int64)  # (N, max_len) emitted ids
        step_lp = np.zeros((starts[-1], max_len), dtype=np.float32)  # (N, max_len) their log-probabilities
        for g, s0 in zip(groups, starts):
            g.history = history[s0:s0 + g.rows]  # a view: each search reorders its own rows in place
            g.step_lp = step_lp[s0:s0 + g.rows]
        live = np.concatenate([g.open.reshape(-1) for g in groups])  # (N,) rows still growing

        # the first step is the same for every row of an image (one state, <start>): run it once per image,
        # then copy it to the image's rows of every search (image-major); rows not live yet (beams 2..K) masked
        state = calls.init(features)  # B rows
        logp, state, alpha = calls.step(torch.full((B,), Vocabulary.start_id, dtype=torch.long, device=dev), state)
        if starts[-1] != B:
            rows = torch.from_numpy(np.concatenate([np.repeat(np.arange(B, dtype=np.int64), g.K) for g in groups])).to(dev)
            state = calls.select(state, rows)
            logp, alpha = _mask_dead(logp[rows], None if alpha is None else alpha[rows], torch.from_numpy(live).to(dev))
        rules = _Rules(logp.shape[1], suppress_unk, no_repeat_ngram_size, min_len, _bad_ending_ids(vocab, bad_endings), dev)

        for t in range(max_len):
            if t > 0:
                logp, state, alpha = _live_step(calls, tokens, state, live)
            if bool(torch.isnan(logp).any()):  # extreme (finite) features can overflow inside the decoder
                raise ValueError("the decoder returned NaN log-probabilities for these features (out of its range?)")
            logp = rules.apply(logp, history[:, :t])  # (N, V), forbidden cells -inf
            rows, toks = [], []
            for g, s0 in zip(groups, starts):
                r, tok = g.advance(*_best_tokens(logp[s0:s0 + g.rows], g), None if alpha is None else alpha[s0:s0 + g.rows])
                rows.append(np.arange(s0, s0 + g.rows) if r is None else r + s0)  # the row each hypothesis continues
                toks.append(tok)
            tokens_np = np.concatenate(toks)
            history[:, t] = tokens_np
            live = np.concatenate([g.open.reshape(-1) for g in groups])
            if not live.any():
                break
            tokens = torch.from_numpy(tokens_np).to(dev)
            if not all(g.greedy for g in groups):  # greedy rows never move; beams reorder
                state = calls.select(state, torch.from_numpy(np.concatenate(rows)).to(dev))
    return groups


@torch.inference_mode()
def greedy_search(model, features: torch.Tensor, vocab: Vocabulary | None = None, max_len: int = 20,
                  suppress_unk: bool = True, no_repeat_ngram_size: int = 0, min_len: int = 1,
                  bad_endings: Sequence[str] = ()) -> list[Caption]:
    """Caption a batch by taking the most likely token at every step.

    Args:
        model: a decoder (the protocol of ``storyteller.decoders.base``).
        features: (B, F) pooled features, or (B, h, w, D) grids for an attention decoder.
        vocab: maps ids to words; defaults to ``model.vocab``.
        max_len: most decoder steps per caption (``<end>`` included).
        suppress_unk: never emit ``<unk>``.
        no_repeat_ngram_size: forbid repeating any n-gram of this size (0: off).
        min_len: fewest words before ``<end>`` is allowed.
        bad_endings: words a caption may not end on.

    Returns:
        one :class:`Caption` per image, in input order (with ``attention`` maps for attention decoders).
    """
    vocab = vocab or model.vocab
    (g,) = _search(model, features, [(1, True, 0.0, 1)], vocab, max_len, suppress_unk, no_repeat_ngram_size,
                   min_len, bad_endings)
    return [caps[0] for caps in g.captions(vocab, _grid_of(features))]


@torch.inference_mode()
def beam_search(model, features: torch.Tensor, vocab: Vocabulary | None = None, beam_size: int = 5,
                max_len: int = 20, alpha: float = 0.0, n_best: int = 1, suppress_unk: bool = True,
                no_repeat_ngram_size: int = 0, min_len: int = 1, bad_endings: Sequence[str] = ()) -> list[list[Caption]]:
    """Caption a batch with beam search over images x beams in one decoder call per step.

    Finished hypotheses stay in their beam slot (continuing with ``<pad>`` at zero cost) and compete
    with live ones on their length-normalised score, so a beam as wide as the search space is an
    exhaustive search.

    Args:
        model: a decoder (the protocol of ``storyteller.decoders.base``).
        features: (B, F) pooled features, or (B, h, w, D) grids for an attention decoder.
        vocab: maps ids to words; defaults to ``model.vocab``.
        beam_size: hypotheses kept per image (1 gives exactly greedy search).
        max_len: most decoder steps per caption (``<end>`` included).
        alpha: GNMT length-normalisation exponent; 0 ranks by raw log-probability.
        n_best: captions returned per image (at most ``beam_size``), best first.
        suppress_unk: never emit ``<unk>``.
        no_repeat_ngram_size: forbid repeating any n-gram of this size (0: off; 3: trigram blocking).
        min_len: fewest words before ``<end>`` is allowed.
        bad_endings: words a caption may not end on.

    Returns:
        for each image, a list of up to ``n_best`` :class:`Caption`, sorted by score (descending), never
        empty (with ``attention`` maps for attention decoders).
    """
    vocab = vocab or model.vocab
    check_beam(beam_size, n_best)
    (g,) = _search(model, features, [(beam_size, False, alpha, n_best)], vocab, max_len, suppress_unk,
                   no_repeat_ngram_size, min_len, bad_endings)
    return g.captions(vocab, _grid_of(features))


@torch.inference_mode()
def greedy_and_beam_search(model, features: torch.Tensor, vocab: Vocabulary | None = None, beam_size: int = 5,
                           max_len: int = 20, alpha: float = 0.0, n_best: int = 1, suppress_unk: bool = True,
                           no_repeat_ngram_size: int = 0, min_len: int = 1, bad_endings: Sequence[str] = ()
                           ) -> tuple[list[Caption], list[list[Caption]]]:
    """Greedy search and beam search of the same images in one pass: one decoder call per step for
    the rows of both (B greedy rows, then B x beam_size beam rows), so the weights are read once per
    step instead of twice. Same arguments and results as :func:`greedy_search` and :func:`beam_search`
    run separately (``alpha`` and ``n_best`` are the beam search's).

    Returns:
        ``(greedy captions, beam caption lists)``, each in input order.
    """
    vocab = vocab or model.vocab
    check_beam(beam_size, n_best)
    g, b = _search(model, features, [(1, True, 0.0, 1), (beam_size, False, alpha, n_best)], vocab, max_len, suppress_unk,
                   no_repeat_ngram_size, min_len, bad_endings)
    grid = _grid_of(features)
    return [caps[0] for caps in g.captions(vocab, grid)], b.captions(vocab, grid)
