"""Batched greedy and beam search for any decoder with ``init_state`` and ``step``: the pooled
Show-and-Tell decoder and the Show-Attend-Tell decoder alike (``storyteller.model`` describes the
protocol; a decoder with ``has_attention`` also returns where it looked for every word).

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
- ``<pad>`` and ``<start>`` are never emitted; ``<unk>`` is suppressed unless ``suppress_unk=False``.
- ``<end>`` is allowed only after ``min_len`` words (default 1), so an empty caption never comes back.
- ``no_repeat_ngram_size=n`` forbids any n-gram from appearing twice in one caption (3 = the usual
  trigram blocking; 0 disables).
- ``bad_endings``: words a caption may not end on (``<end>`` is forbidden right after them), e.g. the
  function words that CIDEr-trained models like to stop on ("... with a").
- a caption always comes back: where the rules above leave a hypothesis no token at all (a tiny
  vocabulary with n-gram blocking, say), it may end there with ``<end>``.
- ``log_prob`` is the sum of the emitted tokens' log-probabilities (``<end>`` included when emitted);
  ``score`` is ``log_prob / ((5 + length) / 6) ** alpha`` (GNMT length normalisation; alpha=0 gives
  the raw log-probability). Greedy search has no alpha: its score is its log_prob.

Call the decoder in ``eval()`` mode or not: decoding switches dropout off and restores the mode.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .vocab import Vocabulary


@dataclass
class Caption:
    """One decoded caption."""

    text: str  # words joined by spaces, no special tokens
    tokens: list[int]  # the word ids of ``text`` (no special tokens)
    log_prob: float  # sum of log-probabilities of the emitted tokens
    score: float  # log_prob after length normalisation (equal to log_prob when alpha = 0)
    finished: bool  # True when the decoder emitted <end>; False when cut at max_len
    # attention decoders: (words, h, w) weights (or (words, R) for region inputs) that chose each word's
    # context, one map per word of ``tokens``; None for pooled decoders
    attention: torch.Tensor | None = None


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check(model, features: torch.Tensor, max_len: int, min_len: int) -> None:
    if not getattr(model, "has_attention", False) and features.dim() != 2:
        raise ValueError(f"features must be (batch, feature_dim), got shape {tuple(features.shape)}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if not 0 <= min_len <= max_len:
        raise ValueError(f"min_len must be in 0..max_len, got min_len={min_len}, max_len={max_len}")


def _select(model, state, rows: torch.Tensor):
    if hasattr(model, "select_state"):
        return model.select_state(state, rows)
    return tuple(s[:, rows] for s in state)  # a bare decoder with (layers, batch, hidden) state tensors


def _scatter(model, state, rows: torch.Tensor, sub):
    if hasattr(model, "scatter_state"):
        return model.scatter_state(state, rows, sub)
    out = tuple(s.clone() for s in state)
    for s, new in zip(out, sub):
        s[:, rows] = new
    return out


def _step(model, tokens: torch.Tensor, state, attention: bool):
    if attention:
        return model.step(tokens, state, return_attention=True)
    logp, state = model.step(tokens, state)
    return logp, state, None


def _mask_dead(logp: torch.Tensor, alpha: torch.Tensor | None, live: torch.Tensor):
    """Rows not live: log-probabilities -inf (in place: callers pass fresh tensors), attention weights 0."""
    dead = ~live[:, None]
    return logp.masked_fill_(dead, float("-inf")), None if alpha is None else alpha.masked_fill(dead, 0.0)


def _live_step(model, tokens: torch.Tensor, state, live: torch.Tensor, attention: bool = False):
    """Run ``model.step`` for the rows where ``live`` is True.

    tokens (N,), state of N rows, live (N,) bool -> log_probs (N, V) (rows not live are -inf), the
    new state and, with ``attention``, the weights (N, R) (zeros where not live). While more than half
    the rows are live, all rows run and the others are masked (a row's numbers do not depend on its
    batch, and picking rows out and back costs more than the step saves); after that only the live rows
    run and the others keep their state. A row that is not live never uses its state again.
    """
    N, n = tokens.shape[0], int(live.sum())
    if 2 * n > N:
        logp, state, alpha = _step(model, tokens, state, attention)
        if n < N:
            logp, alpha = _mask_dead(logp, alpha, live)
        return logp, state, alpha
    idx = live.nonzero().squeeze(1)
    logp_live, sub, alpha_live = _step(model, tokens[idx], _select(model, state, idx), attention)
    logp = logp_live.new_full((N, logp_live.shape[1]), float("-inf"))
    logp[idx] = logp_live
    alpha = None
    if alpha_live is not None:
        alpha = alpha_live.new_zeros((N, alpha_live.shape[1]))
        alpha[idx] = alpha_live
    return logp, _scatter(model, state, idx, sub), alpha


def _bad_ending_ids(vocab: Vocabulary, bad_endings, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """(len(vocab),) bool table: True for the ids a caption may not end on; None when there are none."""
    if not bad_endings:
        return None
    if isinstance(bad_endings, str):
        raise TypeError("bad_endings must be a sequence of words, not one string")
    ids = sorted({vocab.stoi[w] for w in bad_endings if w in vocab.stoi and vocab.stoi[w] > Vocabulary.unk_id})
    if not ids:
        return None
    table = torch.zeros(len(vocab), dtype=torch.bool, device=device)
    table[ids] = True
    return table


class _Rules:
    """The token rules of one search, prepared once: the (V,) rows added to every step's log-probabilities
    (``-inf`` at ``<pad>``, ``<start>``, maybe ``<unk>``, and ``<end>`` before ``min_len``), the bad-ending
    table, and the n-gram size."""

    def __init__(self, V: int, suppress_unk: bool, no_repeat_ngram_size: int, min_len: int,
                 bad_ids: torch.Tensor | None, device: torch.device):
        self.V, self.n, self.min_len, self.bad_ids = V, no_repeat_ngram_size, min_len, bad_ids
        self.banned = [Vocabulary.pad_id, Vocabulary.start_id] + ([Vocabulary.unk_id] if suppress_unk else [])
        self.base = torch.zeros(V, device=device)
        self.base[self.banned] = float("-inf")
        self.base_no_end = self.base.clone()
        self.base_no_end[Vocabulary.end_id] = float("-inf")

    def apply(self, logp: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """Forbid special tokens, too-early <end>, <end> after a bad ending, and repeated n-grams.

        logp (N, V), changed in place (callers pass the step's fresh output), history (N, t) emitted ids.
        A row left with no allowed token may take ``<end>``.
        """
        n, t = self.n, history.shape[1]
        blockable = len(self.banned) + (t - n + 1 if 0 < n <= t else 0)  # most non-<end> tokens a row can lose
        may_stick = self.V - 1 <= blockable  # only with tiny vocabularies; then keep the model's own <end>
        raw_end = logp[:, Vocabulary.end_id].clone() if may_stick else None
        logp.add_(self.base_no_end if t < self.min_len else self.base)  # live sequences have emitted t words
        if self.bad_ids is not None and t > 0:
            logp[:, Vocabulary.end_id].masked_fill_(self.bad_ids.take(history[:, t - 1]), float("-inf"))
        if 0 < n <= t:
            windows = history.unfold(1, n, 1)  # (N, t-n+1, n): every n-gram emitted so far
            prefix = history[:, t - n + 1:]  # (N, n-1): the tokens a new n-gram would start with
            match = (windows[:, :, : n - 1] == prefix[:, None, :]).all(-1)  # (N, t-n+1)
            rows, at = match.nonzero(as_tuple=True)  # each earlier n-gram the new one would repeat
            logp[rows, windows[rows, at, n - 1]] = float("-inf")
        # Rules that leave a (live) row nothing to emit must not lose its caption: let it end here.
        if may_stick:
            stuck = (logp.amax(-1) == float("-inf")) & (raw_end > float("-inf"))
            if bool(stuck.any()):
                logp[stuck, Vocabulary.end_id] = raw_end[stuck]
        return logp


def _length_penalty(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    if alpha == 0:
        return torch.ones_like(lengths, dtype=torch.float32)
    return ((5.0 + lengths.float()) / 6.0) ** alpha


def _to_caption(vocab: Vocabulary, ids: list[int], log_prob: float, score: float,
                attention: torch.Tensor | None = None, grid: tuple[int, int] | None = None) -> Caption:
    """Emitted ids (maybe ending in <end> then <pad>s) -> Caption with special tokens removed.

    ``attention`` (steps, R): the weights of every step; the rows of the kept words are returned,
    shaped (words, h, w) when ``grid`` is known.
    """
    finished = Vocabulary.end_id in ids
    if finished:
        ids = ids[: ids.index(Vocabulary.end_id)]
    keep = [j for j, i in enumerate(ids) if i > Vocabulary.unk_id]
    words = [ids[j] for j in keep]
    att = None
    if attention is not None:
        att = attention[keep].float().cpu()  # (words, R)
        if grid is not None:
            att = att.view(len(keep), *grid)
    return Caption(text=vocab.decode(words), tokens=words, log_prob=log_prob, score=score, finished=finished,
                   attention=att)


def _grid_of(features: torch.Tensor) -> tuple[int, int] | None:
    return (int(features.shape[1]), int(features.shape[2])) if features.dim() == 4 else None


class _Beams:
    """The hypotheses of one search over B images: K per image, as (B, K) tensors.

    A greedy search is the width-1 case that takes the argmax of each step (``greedy=True``), exactly
    what greedy decoding does; a beam search ranks all K x V extensions of each image by their
    length-normalised score. Finished hypotheses stay in their slot, continuing with ``<pad>`` at zero cost.
    ``history`` (B*K, max_len) is this search's part of the preallocated token history of ``_search``;
    ``open`` marks the hypotheses still growing (not finished, finite score, image not done).

    An image is done early once none of its open hypotheses can still reach its ``n_best``-th best finished
    one: log-probabilities only fall, so a hypothesis's best final score is its score now over the largest
    length penalty it can still get. Its top ``n_best`` can no longer change, so the search stops there
    with exactly the captions a search to the end would return (up to float32 rounding: the rows that
    remain run in smaller batches, and a float32 product may round its last bit differently there).
    """

    def __init__(self, B: int, K: int, greedy: bool, alpha: float, max_len: int, device: torch.device,
                 n_best: int = 1):
        self.B, self.K, self.greedy, self.alpha, self.n_best = B, K, greedy, alpha, n_best
        self.scores = torch.full((B, K), float("-inf"), device=device)  # raw log-prob sums
        self.scores[:, 0] = 0.0  # all beams start identical: expand one, or the top-K would be K copies
        self.lengths = torch.zeros((B, K), dtype=torch.long, device=device)
        self.finished = torch.zeros((B, K), dtype=torch.bool, device=device)
        self.open = torch.isfinite(self.scores)
        self.history = torch.empty((B * K, 0), dtype=torch.long, device=device)  # set by _search
        self.steps = 0  # tokens emitted so far (columns of ``history`` in use)
        self.att = None  # (B, K, t, R) attention weights of each hypothesis's steps
        self.offsets = torch.arange(B, device=device)[:, None] * K  # (B, 1) row of each image's first beam
        self.penalty = _length_penalty(torch.arange(max_len + 1, device=device), alpha)  # length -> GNMT penalty
        self.most_penalty = float(self.penalty.max())  # the bounds of the divisor a score can still get
        self.least_penalty = float(self.penalty.min())
        self.done = torch.full((K,), float("-inf"), device=device)  # a finished hypothesis's continuations:
        self.done[0] = 0.0  # <pad> at zero cost, nothing else
        self.checks_scores = True  # until a step hands out a positive log-probability (then no early stop)

    @property
    def rows(self) -> int:
        return self.B * self.K

    def advance(self, logp: torch.Tensor, alpha_t: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Extend every hypothesis by one token. logp (B*K, V) masked log-probabilities (rows not live:
        -inf), alpha_t (B*K, R) or None -> (the rows, within this search, the new hypotheses continue
        (B*K,), or None where every row continues itself (greedy); their tokens (B*K,)). The caller
        writes the tokens into ``history`` at column ``steps - 1``."""
        B, K, t = self.B, self.K, self.steps
        self.steps += 1
        if self.greedy:  # width 1: the argmax, as greedy decoding always did
            fin = self.finished.view(-1)  # (B,)
            best, tok = logp.max(-1)  # (B,) each: the argmax and its log-probability
            self.scores.view(-1).add_(best.masked_fill_(fin, 0.0))  # a finished caption continues with <pad> at 0
            self.lengths.view(-1).add_(~fin)
            tok.masked_fill_(fin, Vocabulary.pad_id)
            self.finished = (fin | (tok == Vocabulary.end_id)).view(B, 1)
            self.open = ~self.finished & (self.scores > float("-inf"))
            if alpha_t is not None:
                step = alpha_t.view(B, 1, 1, -1)
                self.att = step if self.att is None else torch.cat([self.att, step], 2)
            return None, tok
        # Each hypothesis's k best tokens first: within one hypothesis, log-probability, raw score and
        # normalised score rank its extensions alike, so the image's K best are among these K x k.
        k = min(K, logp.shape[-1])
        lp, ids = logp.topk(k, dim=1)  # (B*K, k)
        lp, ids = lp.view(B, K, k), ids.view(B, K, k)
        # a finished hypothesis has one continuation, <pad>, at zero cost: it keeps its slot
        if bool(self.finished.any()):
            lp = torch.where(self.finished[..., None], self.done[:k], lp)
            ids = ids.masked_fill(self.finished[..., None], Vocabulary.pad_id)
        cand = self.scores[..., None] + lp  # (B, K, k) raw scores of the extensions
        cand_len = self.lengths + ~self.finished  # (B, K) lengths after this token (finished ones stay)
        ranked = cand / self.penalty.take(cand_len).unsqueeze(-1) if self.alpha else cand
        _, top = ranked.view(B, K * k).topk(K, dim=1)  # (B, K) best extensions per image
        beam, tok = torch.div(top, k, rounding_mode="floor"), ids.view(B, K * k).gather(1, top)
        self.scores = cand.view(B, K * k).gather(1, top)
        self.lengths = cand_len.gather(1, beam)
        self.finished = self.finished.gather(1, beam) | (tok == Vocabulary.end_id)
        self.open = ~self.finished & (self.scores > float("-inf"))
        if self.n_best < K and self.checks_scores and bool(self.finished.any()):
            self._stop_done_images(lp)
        rows = (beam + self.offsets).view(-1)  # (B*K,) the row each new hypothesis continues
        self.history.copy_(self.history.index_select(0, rows))  # in place: a view of _search's buffer
        if alpha_t is not None:
            R = alpha_t.shape[-1]
            step_att = alpha_t.view(B, K, 1, R)
            if self.att is not None:
                step_att = torch.cat([self.att, step_att], 2)  # (B, K, t+1, R) before reordering
            self.att = step_att.gather(1, beam[:, :, None, None].expand(-1, -1, t + 1, R))
        return rows, tok.view(-1)

    def _stop_done_images(self, lp: torch.Tensor) -> None:
        """Close the images whose top ``n_best`` can no longer change (see the class docstring).

        lp (B, K, k): this step's best log-probabilities per hypothesis. The bound needs every step from
        here on to return log-probabilities (never above 0), as ``step`` must; scores above 0 so far
        only change which penalty bounds them. A decoder whose step hands out a positive value when an
        image would stop is taken to return raw scores and is searched to the end."""
        final = torch.where(self.finished, self.scores / self.penalty.take(self.lengths), float("-inf"))  # (B, K)
        nth = final.amax(1) if self.n_best == 1 else final.topk(self.n_best, dim=1).values[:, -1]  # (B,) or -inf
        best = torch.where(self.open, self.scores, float("-inf")).amax(1)  # (B,) the best open score now
        # its final score is at most best / penalty: the largest penalty bounds a score <= 0, the smallest one above 0
        reach = torch.where(best > 0, best / self.least_penalty, best / self.most_penalty)  # (B,)
        done = reach < nth
        if bool(done.any()):
            if bool((lp[..., 0] > 0).any()):  # not log-probabilities: the bound does not hold
                self.checks_scores = False
                return
            self.open &= ~done[:, None]

    def captions(self, vocab: Vocabulary, grid: tuple[int, int] | None) -> list[list[Caption]]:
        """Per image, up to ``n_best`` captions best first (greedy: its one caption, score = log_prob)."""
        final = self.scores if self.greedy else self.scores / self.penalty.take(self.lengths)
        order = final.argsort(dim=1, descending=True, stable=True).tolist()
        history = self.history[:, :self.steps].view(self.B, self.K, self.steps).tolist()
        scores, final = self.scores.tolist(), final.tolist()  # one conversion each, not a few per caption
        results = []
        for b in range(self.B):
            caps = []
            for k in order[b]:
                if len(caps) == self.n_best:
                    break
                if math.isfinite(scores[b][k]):
                    caps.append(_to_caption(vocab, history[b][k], scores[b][k], final[b][k],
                                            None if self.att is None else self.att[b, k], grid))
            results.append(caps)
        return results


def _search(model, features: torch.Tensor, searches: list[tuple[int, bool, float, int]], vocab: Vocabulary,
            max_len: int, suppress_unk: bool, no_repeat_ngram_size: int, min_len: int,
            bad_endings: Sequence[str]) -> list[_Beams]:
    """Run several searches (``(width, greedy, alpha, n_best)`` each) over the same images in one decoder call
    per step: their rows are stacked, [search 0: B*K0 rows | search 1: B*K1 rows | ...], so the
    weights are read once per step for all of them; once most captions have ended, the rows that ended
    drop out of the call (``_live_step``)."""
    _check(model, features, max_len, min_len)
    want_att = bool(getattr(model, "has_attention", False))
    with _eval_mode(model):
        B, dev = features.shape[0], features.device
        groups = [_Beams(B, K, greedy, alpha, max_len, dev, n_best) for K, greedy, alpha, n_best in searches]
        starts = [0]
        for g in groups:
            starts.append(starts[-1] + g.rows)
        history = torch.zeros((starts[-1], max_len), dtype=torch.long, device=dev)  # (N, max_len) emitted ids
        for g, s0 in zip(groups, starts):
            g.history = history[s0:s0 + g.rows]  # a view: each search reorders its own rows in place
        live = torch.cat([g.open.view(-1) for g in groups])
        # the first step is the same for every row of an image (one state, <start>): run it once per image
        state = model.init_state(features)  # B rows, one per image
        logp, state, alpha_t = _step(model, torch.full((B,), Vocabulary.start_id, dtype=torch.long, device=dev),
                                     state, want_att)
        if starts[-1] != B:  # image-major rows of every search; rows not live yet (beams 2..K) are masked
            rows = torch.cat([torch.arange(B, device=dev).repeat_interleave(g.K) for g in groups])
            state = _select(model, state, rows)
            logp, alpha_t = _mask_dead(logp[rows], None if alpha_t is None else alpha_t[rows], live)
        rules = _Rules(logp.shape[1], suppress_unk, no_repeat_ngram_size, min_len,
                       _bad_ending_ids(vocab, bad_endings, dev), dev)
        unmoved = [torch.arange(s0, s0 + g.rows, device=dev) for g, s0 in zip(groups, starts)]  # greedy rows stay
        for t in range(max_len):
            if t > 0:
                logp, state, alpha_t = _live_step(model, tokens, state, live, want_att)
            logp = rules.apply(logp, history[:, :t])
            rows, toks = [], []
            for g, s0, same in zip(groups, starts, unmoved):
                r, tok = g.advance(logp[s0:s0 + g.rows], None if alpha_t is None else alpha_t[s0:s0 + g.rows])
                rows.append(same if r is None else r + s0)
                toks.append(tok)
            tokens = torch.cat(toks) if len(toks) > 1 else toks[0]
            history[:, t] = tokens
            live = torch.cat([g.open.view(-1) for g in groups]) if len(groups) > 1 else groups[0].open.view(-1)
            if not bool(live.any()):
                break
            if not all(g.greedy for g in groups):  # greedy rows never move; beams reorder
                state = _select(model, state, torch.cat(rows))
    return groups


@torch.inference_mode()
def greedy_search(model, features: torch.Tensor, vocab: Vocabulary | None = None, max_len: int = 20,
                  suppress_unk: bool = True, no_repeat_ngram_size: int = 0, min_len: int = 1,
                  bad_endings: Sequence[str] = ()) -> list[Caption]:
    """Caption a batch by taking the most likely token at every step.

    Args:
        model: a decoder with ``init_state(features)`` and ``step(tokens, state)``.
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


def _check_beam(beam_size: int, n_best: int) -> None:
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be in 1..beam_size={beam_size}, got {n_best}")


@torch.inference_mode()
def beam_search(model, features: torch.Tensor, vocab: Vocabulary | None = None, beam_size: int = 5,
                max_len: int = 20, alpha: float = 0.0, n_best: int = 1, suppress_unk: bool = True,
                no_repeat_ngram_size: int = 0, min_len: int = 1, bad_endings: Sequence[str] = ()) -> list[list[Caption]]:
    """Caption a batch with beam search over images x beams in one decoder call per step.

    Finished hypotheses stay in their beam slot (continuing with ``<pad>`` at zero cost) and compete
    with live ones on their length-normalised score, so a beam as wide as the search space is an
    exhaustive search.

    Args:
        model: a decoder with ``init_state(features)`` and ``step(tokens, state)``.
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
    _check_beam(beam_size, n_best)
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
    _check_beam(beam_size, n_best)
    g, b = _search(model, features, [(1, True, 0.0, 1), (beam_size, False, alpha, n_best)], vocab, max_len, suppress_unk,
                   no_repeat_ngram_size, min_len, bad_endings)
    grid = _grid_of(features)
    return [caps[0] for caps in g.captions(vocab, grid)], b.captions(vocab, grid)
