"""Batched greedy and beam search for any decoder with ``init_state`` and ``step``.

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
- ``log_prob`` is the sum of the emitted tokens' log-probabilities (``<end>`` included when emitted);
  ``score`` is ``log_prob / ((5 + length) / 6) ** alpha`` (GNMT length normalisation; alpha=0 gives
  the raw log-probability). Greedy search has no alpha: its score is its log_prob.

Call the decoder in ``eval()`` mode or not: decoding switches dropout off and restores the mode.
"""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check(features: torch.Tensor, max_len: int, min_len: int) -> None:
    if features.dim() != 2:
        raise ValueError(f"features must be (batch, feature_dim), got shape {tuple(features.shape)}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if not 0 <= min_len <= max_len:
        raise ValueError(f"min_len must be in 0..max_len, got min_len={min_len}, max_len={max_len}")


def _live_step(model, tokens: torch.Tensor, state, live: torch.Tensor):
    """Run ``model.step`` on the rows where ``live`` is True only.

    tokens (N,), state (h, c) each (L, N, H), live (N,) bool -> log_probs (N, V) (rows not live
    are -inf) and the new state (rows not live unchanged).
    """
    if bool(live.all()):
        return model.step(tokens, state)
    idx = live.nonzero().squeeze(1)
    logp_live, (h_live, c_live) = model.step(tokens[idx], (state[0][:, idx], state[1][:, idx]))
    logp = logp_live.new_full((tokens.shape[0], logp_live.shape[1]), float("-inf"))
    logp[idx] = logp_live
    h, c = state[0].clone(), state[1].clone()
    h[:, idx], c[:, idx] = h_live, c_live
    return logp, (h, c)


def _mask(logp: torch.Tensor, history: torch.Tensor, suppress_unk: bool, no_repeat_ngram_size: int,
          min_len: int) -> torch.Tensor:
    """Forbid special tokens, too-early <end> and repeated n-grams. logp (N, V), history (N, t) emitted ids."""
    logp = logp.clone()
    logp[:, Vocabulary.pad_id] = float("-inf")
    logp[:, Vocabulary.start_id] = float("-inf")
    if suppress_unk:
        logp[:, Vocabulary.unk_id] = float("-inf")
    n, t = no_repeat_ngram_size, history.shape[1]
    if t < min_len:  # live sequences have emitted t words so far
        logp[:, Vocabulary.end_id] = float("-inf")
    if n > 0 and t >= n:
        windows = history.unfold(1, n, 1)  # (N, t-n+1, n): every n-gram emitted so far
        prefix = history[:, t - n + 1:]  # (N, n-1): the tokens a new n-gram would start with
        match = (windows[:, :, : n - 1] == prefix[:, None, :]).all(-1)  # (N, t-n+1)
        banned = torch.zeros_like(logp).scatter_add_(1, windows[:, :, n - 1], match.to(logp.dtype))
        logp = logp.masked_fill(banned > 0, float("-inf"))
    return logp


def _length_penalty(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    if alpha == 0:
        return torch.ones_like(lengths, dtype=torch.float32)
    return ((5.0 + lengths.float()) / 6.0) ** alpha


def _to_caption(vocab: Vocabulary, ids: list[int], log_prob: float, score: float) -> Caption:
    """Emitted ids (maybe ending in <end> then <pad>s) -> Caption with special tokens removed."""
    finished = Vocabulary.end_id in ids
    if finished:
        ids = ids[: ids.index(Vocabulary.end_id)]
    words = [i for i in ids if i > Vocabulary.unk_id]
    return Caption(text=vocab.decode(words), tokens=words, log_prob=log_prob, score=score, finished=finished)


@torch.inference_mode()
def greedy_search(model, features: torch.Tensor, vocab: Vocabulary | None = None, max_len: int = 20,
                  suppress_unk: bool = True, no_repeat_ngram_size: int = 0, min_len: int = 1) -> list[Caption]:
    """Caption a batch by taking the most likely token at every step.

    Args:
        model: a decoder with ``init_state(features)`` and ``step(tokens, state)``.
        features: (B, F) image features.
        vocab: maps ids to words; defaults to ``model.vocab``.
        max_len: most decoder steps per caption (``<end>`` included).
        suppress_unk: never emit ``<unk>``.
        no_repeat_ngram_size: forbid repeating any n-gram of this size (0: off).
        min_len: fewest words before ``<end>`` is allowed.

    Returns:
        one :class:`Caption` per image, in input order.
    """
    vocab = vocab or model.vocab
    _check(features, max_len, min_len)
    with _eval_mode(model):
        B, dev = features.shape[0], features.device
        state = model.init_state(features)
        tokens = torch.full((B,), Vocabulary.start_id, dtype=torch.long, device=dev)
        history = torch.empty((B, 0), dtype=torch.long, device=dev)
        log_prob = torch.zeros(B, device=dev)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        for _ in range(max_len):
            logp, state = _live_step(model, tokens, state, ~finished)
            logp = _mask(logp, history, suppress_unk, no_repeat_ngram_size, min_len)
            nxt = logp.argmax(-1)  # (B,)
            nxt = torch.where(finished, Vocabulary.pad_id, nxt)
            log_prob += torch.where(finished, 0.0, logp.gather(1, nxt[:, None]).squeeze(1))
            history = torch.cat([history, nxt[:, None]], 1)
            finished |= nxt == Vocabulary.end_id
            tokens = nxt
            if bool(finished.all()):
                break
    return [_to_caption(vocab, history[b].tolist(), float(log_prob[b]), float(log_prob[b])) for b in range(B)]


@torch.inference_mode()
def beam_search(model, features: torch.Tensor, vocab: Vocabulary | None = None, beam_size: int = 5,
                max_len: int = 20, alpha: float = 0.0, n_best: int = 1, suppress_unk: bool = True,
                no_repeat_ngram_size: int = 0, min_len: int = 1) -> list[list[Caption]]:
    """Caption a batch with beam search over images x beams in one decoder call per step.

    Finished hypotheses stay in their beam slot (continuing with ``<pad>`` at zero cost) and compete
    with live ones on their length-normalised score, so a beam as wide as the search space is an
    exhaustive search.

    Args:
        model: a decoder with ``init_state(features)`` and ``step(tokens, state)``.
        features: (B, F) image features.
        vocab: maps ids to words; defaults to ``model.vocab``.
        beam_size: hypotheses kept per image (1 gives exactly greedy search).
        max_len: most decoder steps per caption (``<end>`` included).
        alpha: GNMT length-normalisation exponent; 0 ranks by raw log-probability.
        n_best: captions returned per image (at most ``beam_size``), best first.
        suppress_unk: never emit ``<unk>``.
        no_repeat_ngram_size: forbid repeating any n-gram of this size (0: off; 3: trigram blocking).
        min_len: fewest words before ``<end>`` is allowed.

    Returns:
        for each image, a list of up to ``n_best`` :class:`Caption`, sorted by score (descending).
    """
    vocab = vocab or model.vocab
    _check(features, max_len, min_len)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be in 1..beam_size={beam_size}, got {n_best}")
    with _eval_mode(model):
        B, K, dev = features.shape[0], beam_size, features.device
        h, c = model.init_state(features)  # (L, B, H) each
        state = (h.repeat_interleave(K, dim=1), c.repeat_interleave(K, dim=1))  # (L, B*K, H), image-major
        tokens = torch.full((B * K,), Vocabulary.start_id, dtype=torch.long, device=dev)
        history = torch.empty((B, K, 0), dtype=torch.long, device=dev)
        scores = torch.full((B, K), float("-inf"), device=dev)  # raw log-prob sums
        scores[:, 0] = 0.0  # all beams start identical: expand one, or the top-K would be K copies
        lengths = torch.zeros((B, K), dtype=torch.long, device=dev)
        finished = torch.zeros((B, K), dtype=torch.bool, device=dev)
        offsets = torch.arange(B, device=dev)[:, None] * K  # (B, 1) row of each image's first beam
        for t in range(max_len):
            live = ~finished & torch.isfinite(scores)
            logp, state = _live_step(model, tokens, state, live.view(-1))
            logp = _mask(logp, history.view(B * K, t), suppress_unk, no_repeat_ngram_size, min_len)
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
            rows = (beam + offsets).view(-1)
            state = (state[0][:, rows], state[1][:, rows])
            tokens = tok.view(-1)
            if bool((finished | ~torch.isfinite(scores)).all()):
                break
        final = scores / _length_penalty(lengths, alpha)
        order = final.argsort(dim=1, descending=True, stable=True)
    results = []
    for b in range(B):
        caps = []
        for k in order[b].tolist():
            if not torch.isfinite(scores[b, k]) or len(caps) == n_best:
                continue
            caps.append(_to_caption(vocab, history[b, k].tolist(), float(scores[b, k]), float(final[b, k])))
        results.append(caps)
    return results
