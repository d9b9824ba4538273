"""The token rules of a caption, defined once: the searches (``storyteller.decoding``), SCST's sampler
and its re-scored policy (``train.scst``) all take them from here.

    forbidden_tokens(step=0, min_len=1)      # (1, 2, 3, 0... ): ids no caption may emit at that step
    step_mask(vocab_size, step=0)            # (V,) 0 / -inf, added to a step's log-probabilities
    parse_bad_endings("standard")            # the command lines' --bad-endings -> a word list

- ``<pad>`` and ``<start>`` are never emitted; ``<unk>`` neither unless ``suppress_unk=False``.
- ``<end>`` comes only after ``min_len`` words (1: never an empty caption).
- bad endings (decoding only): ``<end>`` is forbidden right after these words. SCST learns to stop on
  function words ("... with a") because CIDEr-D barely punishes it.

History-dependent rules (bad endings, n-gram blocking) live in the searches, which hold the history.
"""
from __future__ import annotations

import torch

from .vocab import Vocabulary

# Words a caption should not end on (``--bad-endings standard``).
BAD_ENDINGS = ("a", "an", "the", "of", "with", "in", "on", "at", "to", "and", "his", "her", "their", "its", "is",
               "are", "while", "for", "from", "by", "near")
STANDARD = "standard"  # the name of BAD_ENDINGS on every command line
NONE = "none"  # no bad-ending rule
BAD_ENDINGS_HELP = (f"words after which <end> is forbidden: '{STANDARD}' ({' '.join(BAD_ENDINGS)}), "
                    f"'{NONE}', or a comma-separated list")


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


def parse_bad_endings(spec: str | None) -> list[str] | None:
    """``--bad-endings`` -> the words after which ``<end>`` is forbidden: ``standard`` (:data:`BAD_ENDINGS`),
    ``none`` (no rule: ``[]``), or comma-separated words; None stays None (the caller's default, e.g. the
    model's own recommendation).

    Args:
        spec: the option's value.

    Raises:
        ValueError: a list with no word in it.
    """
    if spec is None:
        return None
    spec = spec.strip()
    if spec.lower() == STANDARD:
        return list(BAD_ENDINGS)
    if spec.lower() == NONE:
        return []
    words = [w.strip().lower() for w in spec.split(",") if w.strip()]
    if not words:
        raise ValueError(f"--bad-endings: expected '{STANDARD}', '{NONE}' or comma-separated words, got {spec!r}")
    return words
