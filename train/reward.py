"""What SCST needs besides the reward itself (``storyteller.cider.CaptionReward``): the share of captions ending on
a function word, and the ``--reward`` weights."""
from __future__ import annotations

from collections.abc import Sequence

from storyteller.decoding_settings import BAD_ENDINGS
from storyteller.vocab import tokenize


def bad_ending_share(captions: Sequence[str], words: Sequence[str] = BAD_ENDINGS) -> float:
    """Share of captions whose last token is one of ``words`` (0 for no captions)."""
    bad = set(words)
    ends = [toks[-1] in bad for toks in map(tokenize, captions) if toks]
    return sum(ends) / len(captions) if len(captions) else 0.0


def parse_reward_weights(spec: str) -> dict[str, float]:
    """``"cider:1,bleu4:0.5"`` -> ``{"cider": 1.0, "bleu4": 0.5}`` (known names: cider, bleu4).

    Raises:
        ValueError: an unknown name, a bad number, or all weights zero.
    """
    weights = {}
    for part in spec.split(","):
        name, sep, value = part.strip().partition(":")
        if name not in ("cider", "bleu4") or not sep:
            raise ValueError(f"--reward: expected NAME:WEIGHT items with NAME cider or bleu4, got {part.strip()!r}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"--reward: {value!r} is not a number (in {part.strip()!r})") from None
    if not any(weights.values()):
        raise ValueError(f"--reward {spec!r}: every weight is zero")
    return weights
