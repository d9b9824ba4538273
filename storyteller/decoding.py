"""Batched greedy and beam search for any decoder with ``init_state`` and ``step``: the pooled
Show-and-Tell decoder and the Show-Attend-Tell decoder alike (``storyteller.model`` describes the
protocol; a decoder with ``has_attention`` also returns where it looked for every word).

Both searches run one decoder call per time step for all live sequences of all images at once
(beam search: images x beams flattened into one batch); finished sequences are dropped from the
call, so a batch where most captions have ended costs little.

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


def _live_step(model, tokens: torch.Tensor, state, live: torch.Tensor, attention: bool = False):
    """Run ``model.step`` on the rows where ``live`` is True only.

    tokens (N,), state of N rows, live (N,) bool -> log_probs (N, V) (rows not live are -inf), the
    new state (rows not live unchanged) and, with ``attention``, the weights (N, R) (zeros where not live).
    """
    if bool(live.all()):
        return _step(model, tokens, state, attention)
    idx = live.nonzero().squeeze(1)
    logp_live, sub, alpha_live = _step(model, tokens[idx], _select(model, state, idx), attention)
    logp = logp_live.new_full((tokens.shape[0], logp_live.shape[1]), float("-inf"))
    logp[idx] = logp_live
    alpha = None
    if alpha_live is not None:
        alpha = alpha_live.new_zeros((tokens.shape[0], alpha_live.shape[1]))
        alpha[idx] = alpha_live
    return logp, _scatter(model, state, idx, sub), alpha


def _bad_ending_ids(vocab: Vocabulary, bad_endings) -> torch.Tensor | None:
    if not bad_endings:
        return None
    if isinstance(bad_endings, str):
        raise TypeError("bad_endings must be a sequence of words, not one string")
    ids = sorted({vocab.stoi[w] for w in bad_endings if w in vocab.stoi and vocab.stoi[w] > Vocabulary.unk_id})
    return torch.tensor(ids, dtype=torch.long) if ids else None


def _mask(logp: torch.Tensor, history: torch.Tensor, suppress_unk: bool, no_repeat_ngram_size: int,
          min_len: int, bad_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Forbid special tokens, too-early <end>, <end> after a bad ending, and repeated n-grams.

    logp (N, V), history (N, t) emitted ids. A row left with no allowed token may take ``<end>``.
    """
    raw_end = logp[:, Vocabulary.end_id].clone()
    logp = logp.clone()
    logp[:, Vocabulary.pad_id] = float("-inf")
    logp[:, Vocabulary.start_id] = float("-inf")
    if suppress_unk:
        logp[:, Vocabulary.unk_id] = float("-inf")
    n, t = no_repeat_ngram_size, history.shape[1]
    if t < min_len:  # live sequences have emitted t words so far
        logp[:, Vocabulary.end_id] = float("-inf")
    if bad_ids is not None and t > 0:
        ends_badly = torch.isin(history[:, -1], bad_ids.to(history.device))  # (N,)
        logp[:, Vocabulary.end_id] = logp[:, Vocabulary.end_id].masked_fill(ends_badly, float("-inf"))
    if n > 0 and t >= n:
        windows = history.unfold(1, n, 1)  # (N, t-n+1, n): every n-gram emitted so far
        prefix = history[:, t - n + 1:]  # (N, n-1): the tokens a new n-gram would start with
        match = (windows[:, :, : n - 1] == prefix[:, None, :]).all(-1)  # (N, t-n+1)
        banned = torch.zeros_like(logp).scatter_add_(1, windows[:, :, n - 1], match.to(logp.dtype))
        logp = logp.masked_fill(banned > 0, float("-inf"))
    # Rules that leave a (live) row nothing to emit must not lose its caption: let it end here.
    stuck = torch.isinf(logp).all(-1) & torch.isfinite(raw_end)
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
    _check(model, features, max_len, min_len)
    want_att = bool(getattr(model, "has_attention", False))
    bad_ids = _bad_ending_ids(vocab, bad_endings)
    with _eval_mode(model):
        B, dev = features.shape[0], features.device
        state = model.init_state(features)
        tokens = torch.full((B,), Vocabulary.start_id, dtype=torch.long, device=dev)
        history = torch.empty((B, 0), dtype=torch.long, device=dev)
        att_history = []  # per step: (B, R) attention weights
        log_prob = torch.zeros(B, device=dev)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        for _ in range(max_len):
            logp, state, alpha = _live_step(model, tokens, state, ~finished, want_att)
            logp = _mask(logp, history, suppress_unk, no_repeat_ngram_size, min_len, bad_ids)
            nxt = logp.argmax(-1)  # (B,)
            nxt = torch.where(finished, Vocabulary.pad_id, nxt)
            log_prob += torch.where(finished, 0.0, logp.gather(1, nxt[:, None]).squeeze(1))
            history = torch.cat([history, nxt[:, None]], 1)
            if alpha is not None:
                att_history.append(alpha)
            finished |= nxt == Vocabulary.end_id
            tokens = nxt
            if bool(finished.all()):
                break
        att = torch.stack(att_history, 1) if att_history else None  # (B, steps, R)
    grid = _grid_of(features)
    return [_to_caption(vocab, history[b].tolist(), float(log_prob[b]), float(log_prob[b]),
                        None if att is None else att[b], grid) for b in range(B)]


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
    _check(model, features, max_len, min_len)
    want_att = bool(getattr(model, "has_attention", False))
    bad_ids = _bad_ending_ids(vocab, bad_endings)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be in 1..beam_size={beam_size}, got {n_best}")
    with _eval_mode(model):
        B, K, dev = features.shape[0], beam_size, features.device
        state = model.init_state(features)  # B rows
        state = _select(model, state, torch.arange(B, device=dev).repeat_interleave(K))  # B*K rows, image-major
        tokens = torch.full((B * K,), Vocabulary.start_id, dtype=torch.long, device=dev)
        history = torch.empty((B, K, 0), dtype=torch.long, device=dev)
        att_history = None  # (B, K, t, R) attention weights of each hypothesis's steps
        scores = torch.full((B, K), float("-inf"), device=dev)  # raw log-prob sums
        scores[:, 0] = 0.0  # all beams start identical: expand one, or the top-K would be K copies
        lengths = torch.zeros((B, K), dtype=torch.long, device=dev)
        finished = torch.zeros((B, K), dtype=torch.bool, device=dev)
        offsets = torch.arange(B, device=dev)[:, None] * K  # (B, 1) row of each image's first beam
        for t in range(max_len):
            live = ~finished & torch.isfinite(scores)
            logp, state, alpha_t = _live_step(model, tokens, state, live.view(-1), want_att)
            logp = _mask(logp, history.view(B * K, t), suppress_unk, no_repeat_ngram_size, min_len, bad_ids)
            V = logp.shape[-1]
            logp = logp.view(B, K, V)
            # a finished hypothesis has one continuation, <pad>, at zero cost: it keeps its slot
            done_row = torch.full((V,), float("-inf"), device=dev)
            done_row[Vocabulary.pad_id] = 0.0
            logp = torch.where(finished[..., None], done_row, logp)
            cand = scores[..., None] + logp  # (B, K, V) raw scores of every extension
            cand_len = lengths + (~finished).long()  # (B, K)
            ranked = cand / _length_penalty(cand_len, alpha)[..., None]
            _, top = ranked.view(B, K * V).topk(K, dim=1)  # (B, K) best extensions per image
            beam, tok = top // V, top % V
            scores = cand.view(B, K * V).gather(1, top)
            lengths = cand_len.gather(1, beam)
            finished = finished.gather(1, beam) | (tok == Vocabulary.end_id)
            history = torch.cat([history.gather(1, beam[..., None].expand(-1, -1, t)), tok[..., None]], 2)
            if alpha_t is not None:
                R = alpha_t.shape[-1]
                step_att = alpha_t.view(B, K, 1, R)
                if att_history is not None:
                    step_att = torch.cat([att_history, step_att], 2)  # (B, K, t+1, R) before reordering
                att_history = step_att.gather(1, beam[:, :, None, None].expand(-1, -1, t + 1, R))
            rows = (beam + offsets).view(-1)
            state = _select(model, state, rows)
            tokens = tok.view(-1)
            if bool((finished | ~torch.isfinite(scores)).all()):
                break
        final = scores / _length_penalty(lengths, alpha)
        order = final.argsort(dim=1, descending=True, stable=True)
    grid = _grid_of(features)
    results = []
    for b in range(B):
        caps = []
        for k in order[b].tolist():
            if not torch.isfinite(scores[b, k]) or len(caps) == n_best:
                continue
            caps.append(_to_caption(vocab, history[b, k].tolist(), float(scores[b, k]), float(final[b, k]),
                                    None if att_history is None else att_history[b, k], grid))
        results.append(caps)
    return results
