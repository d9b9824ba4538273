"""Score captions word by word with the decoder in teacher-forcing mode: the probability the model gave each
word, the probability of stopping after the last one, and the words it offered instead at every step.

    scored = score_captions(captioner.model, features, [greedy.tokens, beam.tokens], [greedy.finished, beam.finished])
    scored[1].word_log_probs      # one log-probability per word of the beam caption
    scored[1].log_prob            # sum(word_log_probs) + (end_log_prob or 0): the search's log_prob
    parting_step(scored[0], scored[1])   # the first step where the two captions differ (None: the same)

Scoring feeds each caption's own words back into the decoder (teacher forcing) and reads the
log-probability of the next word at every step. It runs on the model object the searches ran on (the
same weights and precision), so a caption's parts add up to the ``log_prob`` its search reported (to
float rounding: the rows share a batch differently). It uses only the decoding protocol every decoder
follows (through ``storyteller.decoding.DecoderCalls``, as the searches call it: ``init_state``,
``select_state``, ``step`` with the products made once), and never looks inside a state. The searches record
each word's log-probability themselves (``Caption.word_log_probs``): scoring gives the ``top`` alternatives,
and scores captions that did not come from a search.
All captions are scored in one batch, one decoder call per step (the first step once per photo, as the
searches run it).

The ``top`` words of a step are the model's likeliest next words there, without the tokens no caption may
emit at that step (``storyteller.token_rules.forbidden_tokens``); the searches' history rules (n-gram blocking,
bad endings) are not applied to them.

Example::

    python -c "from storyteller.captioner import load; from storyteller.scoring import score_result; c = load(); \\
        print(score_result(c, c.features(['examples/1130369873_d80a1aa59c.jpg']), c.caption(['examples/1130369873_d80a1aa59c.jpg'])[0])[0])"
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .decoding import DecoderCalls, eval_mode
from .decoding_settings import end_allowed_from
from .token_rules import step_mask
from .vocab import Vocabulary

__all__ = ["ScoredCaption", "score_captions", "score_result", "parting_step", "DEFAULT_TOP_K"]

DEFAULT_TOP_K = 5  # alternatives kept per step: enough to see what else the model considered, small on a phone


@dataclass
class ScoredCaption:
    """One caption, scored word by word.

    ``top[t]`` holds the step-``t`` alternatives (``t`` words written so far), best first, as
    ``(token id, log-probability)``; there are ``len(tokens) + 1`` steps (the last one offers ``<end>``
    or what would have come after the last word).
    """

    tokens: list[int]  # the caption's word ids (no special tokens)
    word_log_probs: list[float]  # log P(word t | photo, words before t), one per word
    end_log_prob: float | None  # log P(<end> | photo, all words); None when the caption was cut at max_len
    top: list[list[tuple[int, float]]]  # per step, the likeliest allowed next tokens

    @property
    def log_prob(self) -> float:
        """The caption's log-probability: its words' and, if it ended, ``<end>``'s."""
        return sum(self.word_log_probs) + (self.end_log_prob or 0.0)

    def token_at(self, step: int) -> int | None:
        """The token this caption emitted at ``step``: a word, ``<end>``, or None past a cut caption's end."""
        if step < len(self.tokens):
            return self.tokens[step]
        return Vocabulary.end_id if step == len(self.tokens) and self.end_log_prob is not None else None


@torch.inference_mode()
def score_captions(model, features: torch.Tensor, captions: Sequence[Sequence[int]], finished: Sequence[bool],
                   images: Sequence[int] | None = None, top_k: int = DEFAULT_TOP_K, min_len: int = 1
                   ) -> list[ScoredCaption]:
    """Teacher-force every caption through the decoder in one batch and read each word's log-probability.

    Args:
        model: a decoder with ``init_state``, ``select_state`` and ``step`` (the captioner's own ``model``).
        features: (B, F) pooled features or (B, h, w, D) grids, as the searches were given.
        captions: N captions as word ids (``Caption.tokens``: no special tokens).
        finished: per caption, whether it ended with ``<end>`` (``Caption.finished``); a caption cut at
            ``max_len`` has no end log-probability.
        images: per caption, the row of ``features`` it describes (default: all of photo 0).
        top_k: alternatives kept per step (0: none).
        min_len: the searches' ``min_len``: ``<end>`` is not offered before it.

    Returns:
        one :class:`ScoredCaption` per caption, in order.

    Raises:
        ValueError: a caption and ``finished`` or ``images`` of different lengths, or a photo index out of range.
    """
    N, B = len(captions), int(features.shape[0])
    images = [0] * N if images is None else list(images)
    if len(finished) != N or len(images) != N:
        raise ValueError(f"{N} captions need {N} finished flags and photo indices, got {len(finished)} and {len(images)}")
    if N == 0:
        return []
    if not all(0 <= i < B for i in images):
        raise ValueError(f"photo indices must be in 0..{B - 1}, got {images}")
    dev = features.device
    steps = max(len(c) for c in captions) + 1  # step t reads the distribution after t words
    # inputs[:, t] is the token fed at step t + 1: the caption's word t, <pad> past its end (that row's
    # numbers are not read there)
    inputs = torch.full((N, steps), Vocabulary.pad_id, dtype=torch.long)
    for i, c in enumerate(captions):
        inputs[i, :len(c)] = torch.as_tensor(list(c), dtype=torch.long)
    # targets[:, t]: the token whose log-probability step t gives: the word, then <end> (read only if finished)
    targets = torch.cat([inputs, torch.full((N, 1), Vocabulary.pad_id, dtype=torch.long)], 1)
    for i, c in enumerate(captions):
        targets[i, len(c)] = Vocabulary.end_id
    inputs, targets = inputs.to(dev), targets.to(dev)
    picked, tops = [], []
    with eval_mode(model):
        calls = DecoderCalls(model, attention=False)  # the step's products made once, as in the searches
        state = calls.init(features)  # B rows, one per photo: the first step runs once per photo
        logp, state, _ = calls.step(torch.full((B,), Vocabulary.start_id, dtype=torch.long, device=dev), state)
        rows = torch.as_tensor(images, dtype=torch.long, device=dev)
        state, logp = calls.select(state, rows), logp[rows]  # (N, V): one row per caption
        V = logp.shape[1]
        # the forbidden tokens differ only before min_len and from it on: two masks, made once
        masks = {early: step_mask(V, 0 if early else min_len, min_len, device=dev) for early in (True, False)}
        for t in range(steps):
            if t > 0:
                logp, state, _ = calls.step(inputs[:, t - 1], state)
            logp = logp.float()
            picked.append(logp.gather(1, targets[:, t:t + 1]))  # (N, 1)
            if top_k > 0:
                tops.append((logp + masks[t < min_len]).topk(min(top_k, V), dim=1))
    return _collect(captions, finished, torch.cat(picked, 1), tops)


def _collect(captions: Sequence[Sequence[int]], finished: Sequence[bool], picked: torch.Tensor,
             tops: list) -> list[ScoredCaption]:
    """Per-step tensors -> one ScoredCaption per caption (one copy to the CPU per tensor)."""
    picked = picked.cpu().tolist()  # (N, steps)
    top_vals = torch.stack([v for v, _ in tops], 1).cpu().tolist() if tops else None  # (N, steps, k)
    top_ids = torch.stack([i for _, i in tops], 1).cpu().tolist() if tops else None
    out = []
    for i, c in enumerate(captions):
        n = len(c)
        top = [] if top_vals is None else [
            [(tok, lp) for tok, lp in zip(top_ids[i][t], top_vals[i][t]) if lp > float("-inf")] for t in range(n + 1)]
        out.append(ScoredCaption(tokens=list(c), word_log_probs=picked[i][:n],
                                 end_log_prob=picked[i][n] if finished[i] else None, top=top))
    return out


def score_result(captioner, features: torch.Tensor, result, max_len: int | None = None,
                 top_k: int = DEFAULT_TOP_K) -> list[ScoredCaption]:
    """Score one photo's greedy caption and beam captions (a ``CaptionResult``) in one batch.

    Args:
        captioner: the ``Captioner`` whose searches made ``result`` (its model and decoding are used).
        features: that photo's features, (1, F) or (1, h, w, D).
        result: its ``CaptionResult``.
        max_len: the searches' ``max_len`` (default: the captioner's); ``<end>`` is offered from
            ``min(min_len, max_len)`` words on, as in the searches.
        top_k: alternatives kept per step.

    Returns:
        ``[greedy, beam 1, beam 2, ...]`` (no greedy entry when greedy search was off).
    """
    caps = ([result.greedy] if result.greedy is not None else []) + list(result.beam)
    min_len = end_allowed_from(captioner.decoding["min_len"], captioner.decoding["max_len"] if max_len is None else max_len)
    return score_captions(captioner.model, features, [c.tokens for c in caps], [c.finished for c in caps],
                          top_k=top_k, min_len=min_len)


def parting_step(a: ScoredCaption, b: ScoredCaption) -> int | None:
    """The first step at which two captions of the same photo emit different tokens (``<end>`` counts);
    None when they are the same caption.

    Args:
        a: one scored caption (e.g. greedy's).
        b: the other (e.g. beam search's best).
    """
    for t in range(max(len(a.tokens), len(b.tokens)) + 1):
        if a.token_at(t) != b.token_at(t):
            return t
    return None
