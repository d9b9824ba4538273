"""Decoding settings: the defaults, their allowed ranges, and what a model recommends in its ``config.json``.

    decoding_hints(model.extra)      # {"beam_size": 3, "alpha": 0.5, ...}: checked, or ValueError

A model recommends its decoding in ``config["extra"]["decoding"]`` (written by ``python -m train bundle``); the
captioner, the app, the CLI and ``train evaluate`` start from it. A recommendation out of range is an error at
load, not at the first caption.
"""
from __future__ import annotations

import math
from typing import Any

# Decoding when a model recommends nothing: the one source for the captioner, the app, the CLI and
# `train evaluate`. Beam 3 was the best width on Flickr8k (docs/results.md).
DECODING_DEFAULTS: dict[str, Any] = {"beam_size": 3, "max_len": 20, "alpha": 0.0, "no_repeat_ngram_size": 0,
                                     "min_len": 1, "bad_endings": ()}
MAX_LEN_HELP = ("most decoder steps per caption: a caption cut at N steps has N words (no <end>); "
                "one that ends itself has at most N-1 words")  # --max-len, on every command line
MAX_LEN_LIMIT = 100  # most decoder steps a model may recommend: captions are sentences, and time grows with it
# (lowest, highest) allowed value of each numeric setting, None = unbounded.
DECODING_LIMITS: dict[str, tuple[float, float | None]] = {
    "beam_size": (1, None), "alpha": (0.0, None), "no_repeat_ngram_size": (0, None), "max_len": (1, MAX_LEN_LIMIT),
    "min_len": (0, None)}
WHOLE = ("beam_size", "no_repeat_ngram_size", "max_len", "min_len")  # the settings that count something


def validate_decoding(decoding: Any, allow_unknown: bool = False) -> None:
    """Check decoding settings (a subset of DECODING_DEFAULTS' keys): each a number in range (beam_size >= 1,
    alpha >= 0, no_repeat_ngram_size >= 0, 1 <= max_len <= MAX_LEN_LIMIT, 0 <= min_len <= max_len), whole
    numbers where they count something, and ``bad_endings`` a list of words.

    Args:
        decoding: the settings.
        allow_unknown: ignore keys this version does not know (a model written by a newer version);
            otherwise they are an error.

    Raises:
        ValueError: naming the setting and what is wrong.
    """
    if not isinstance(decoding, dict):
        raise ValueError(f"decoding settings must be a JSON object, got {type(decoding).__name__}")
    unknown = sorted(set(decoding) - set(DECODING_DEFAULTS))
    if unknown and not allow_unknown:
        raise ValueError(f"unknown decoding settings {unknown}; known: {sorted(DECODING_DEFAULTS)}")
    for key, value in decoding.items():
        if key == "bad_endings":  # words after which <end> is forbidden
            if not isinstance(value, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in value):
                raise ValueError(f"decoding bad_endings must be a list of words, got {value!r}")
            continue
        if key not in DECODING_LIMITS:
            continue
        lo, hi = DECODING_LIMITS[key]
        whole = key in WHOLE
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or not math.isfinite(value):
            raise ValueError(f"decoding {key} must be {'a whole' if whole else 'a finite'} number, got {value!r}")
        if value < lo or (hi is not None and value > hi):
            allowed = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise ValueError(f"decoding {key} must be {allowed}, got {value!r}")
    max_len = decoding.get("max_len", DECODING_DEFAULTS["max_len"])
    if decoding.get("min_len", 0) > max_len:
        raise ValueError(f"decoding min_len must be at most max_len ({max_len}), got {decoding['min_len']!r}")


def decoding_hints(extra: dict[str, Any] | None) -> dict[str, Any]:
    """The decoding a model recommends (``config["extra"]["decoding"]``), checked: its known keys, with
    ``bad_endings`` as a tuple. Empty when it recommends nothing.

    Args:
        extra: the model's ``config["extra"]``.

    Raises:
        ValueError: a recommendation that is not a JSON object or holds a setting out of range.
    """
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise ValueError(f"config.json's extra must be a JSON object, got {type(extra).__name__}")
    hints = extra.get("decoding")
    if hints is None:
        return {}
    validate_decoding(hints, allow_unknown=True)
    out = {k: hints[k] for k in DECODING_DEFAULTS if k in hints}
    if "alpha" in out:
        out["alpha"] = float(out["alpha"])
    if "bad_endings" in out:
        out["bad_endings"] = tuple(out["bad_endings"])
    return out
