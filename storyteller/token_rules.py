"""The per-step token masks of a caption, defined once: the searches (``storyteller.decoding``), scoring,
SCST's sampler and its re-scored policy (``train.scst``) all take them from here.

    forbidden_tokens(step=0, min_len=1)      # (1, 2, 3, 0... ): ids no caption may emit at that step
    step_mask(vocab_size, step=0)            # (V,) 0 / -inf, added to a step's log-probabilities

- ``<pad>`` and ``<start>`` are never emitted; ``<unk>`` neither unless ``suppress_unk=False``.
- ``<end>`` comes only after ``min_len`` words (1: never an empty caption).

History-dependent rules (bad endings, n-gram blocking) live in the searches, which hold the history; the
settings themselves (``min_len``, the bad-ending words) are ``storyteller.decoding_settings``.
"""
from __future__ import annotations

import torch

from .vocab import Vocabulary


def forbidden_tokens(step: int, min_len: int = 1, suppress_unk: bool = True) -> tuple[int, ...]:
    """The token ids no caption may emit at decoding step ``step`` (0-based: ``step`` words so far),
    whatever it emitted before.

    Args:
        step: words emitted so far.
        min_len: fewest words before ``<end>``.
        suppress_unk: forbid ``<unk>`` too.
    """
    ids = (Vocabulary.pad_id, Vocabulary.start_id) + ((Vocabulary.unk_id,) if suppress_unk else ())
    return ids + ((Vocabulary.end_id,) if step < min_len else ())


def step_mask(vocab_size: int, step: int, min_len: int = 1, suppress_unk: bool = True,
              device: torch.device | str | None = None) -> torch.Tensor:
    """(vocab_size,) float32: 0, or -inf at :func:`forbidden_tokens`; added to the log-probabilities
    (or logits) of step ``step`` it gives the distribution the searches and SCST's sampler draw from.

    Args:
        vocab_size: V.
        step: words emitted so far.
        min_len: fewest words before ``<end>``.
        suppress_unk: forbid ``<unk>`` too.
        device: where the mask lives.
    """
    mask = torch.zeros(vocab_size, device=device)
    mask[list(forbidden_tokens(step, min_len, suppress_unk))] = float("-inf")
    return mask
