"""Decoding settings, defined once: their names, defaults, allowed ranges and clamps, the bad-ending word
lists, and what a model recommends in its ``config.json``. The searches (``storyteller.decoding``), scoring,
the captioner, the CLI, the app's sliders and ``train evaluate`` all read them from here.

    DECODING_DEFAULTS                        # {"beam_size": 3, "max_len": 20, ...}: when a model recommends nothing
    check_setting("beam_size", 0)            # ValueError: beam_size must be >= 1, got 0
    end_allowed_from(min_len=5, max_len=3)   # 3: <end> is allowed from min(min_len, max_len) words on
    decoding_hints(model.extra)              # {"beam_size": 3, "alpha": 0.5, ...}: checked, or ValueError
    parse_bad_endings("standard")            # the command lines' --bad-endings -> a word list

A model recommends its decoding in ``config["extra"]["decoding"]`` (written by ``python -m train bundle``); the
captioner, the app, the CLI and ``train evaluate`` start from it. A recommendation out of range is an error at
load, not at the first caption.

The per-step token masks these settings give (``<end>`` before ``min_len``, ``<unk>``) are
``storyteller.token_rules``.
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
# (lowest, highest) allowed value of each numeric setting, None = unbounded: what the command lines accept, and
# the searches too, but for alpha (a search ranks correctly at any alpha; a negative one favours long captions).
DECODING_LIMITS: dict[str, tuple[float, float | None]] = {
    "beam_size": (1, None), "alpha": (0.0, None), "no_repeat_ngram_size": (0, None), "max_len": (1, None),
    "min_len": (0, None)}
# What a model may recommend: the same, with max_len capped.
RECOMMENDED_LIMITS: dict[str, tuple[float, float | None]] = {**DECODING_LIMITS, "max_len": (1, MAX_LEN_LIMIT)}
WHOLE = ("beam_size", "no_repeat_ngram_size", "max_len", "min_len")  # the settings that count something
# The app's sliders: (lowest, highest), inside DECODING_LIMITS; a CPU Space answers these in seconds.
SLIDER_RANGES: dict[str, tuple[float, float]] = {"beam_size": (1, 10), "max_len": (1, 40), "alpha": (0.0, 2.0)}

# Words a caption should not end on (``--bad-endings standard``). SCST learns to stop on function words
# ("... with a") because CIDEr-D barely punishes it; the searches forbid <end> right after these.
BAD_ENDINGS = ("a", "an", "the", "of", "with", "in", "on", "at", "to", "and", "his", "her", "their", "its", "is",
               "are", "while", "for", "from", "by", "near")
STANDARD = "standard"  # the name of BAD_ENDINGS on every command line
NONE = "none"  # no bad-ending rule
BAD_ENDINGS_HELP = (f"words after which <end> is forbidden: '{STANDARD}' ({' '.join(BAD_ENDINGS)}), "
                    f"'{NONE}', or a comma-separated list")


def check_setting(key: str, value: Any, limits: dict[str, tuple[float, float | None]] = DECODING_LIMITS,
                  name: str | None = None) -> None:
    """Check that a numeric decoding setting lies in its allowed range.

    Args:
        key: the setting (a key of ``limits``).
        value: its value.
        limits: DECODING_LIMITS (what a search accepts) or RECOMMENDED_LIMITS (what a model may recommend).
        name: how the message names the setting (default ``key``; e.g. ``--beam`` on a command line).

    Raises:
        ValueError: ``"<name> must be >= <lowest>, got <value>"`` (or ``between``), NaN included.
    """
    lo, hi = limits[key]
    if not (value >= lo and (hi is None or value <= hi)):  # written so that NaN fails
        allowed = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name or key} must be {allowed}, got {value!r}")


# A command line's search options: (option, attribute of the parsed arguments, setting)
SEARCH_OPTIONS = (("--beam", "beam", "beam_size"), ("--max-len", "max_len", "max_len"), ("--alpha", "alpha", "alpha"))


def check_search_options(args: Any) -> None:
    """A command line's ``--beam``, ``--max-len`` and ``--alpha`` (None: the model's) against the limits the
    searches apply (``caption`` and ``tag`` check them before anything is loaded).

    Raises:
        ValueError: naming the option, as :func:`check_setting`.
    """
    for option, attr, key in SEARCH_OPTIONS:
        value = getattr(args, attr)
        if value is not None:
            check_setting(key, value, name=option)


def check_beam(beam_size: int, n_best: int = 1) -> None:
    """Check a beam width and the hypotheses wanted from it.

    Args:
        beam_size: hypotheses kept per image.
        n_best: captions returned per image.

    Raises:
        ValueError: ``beam_size`` out of DECODING_LIMITS, or ``n_best`` not in 1..beam_size.
    """
    check_setting("beam_size", beam_size)
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be in 1..beam_size={beam_size}, got {n_best}")


def end_allowed_from(min_len: int, max_len: int) -> int:
    """The ``min_len`` a search runs with: ``<end>`` is allowed after this many words. A ``max_len`` below
    the model's ``min_len`` lowers it, so a short search still lets a caption end.

    Args:
        min_len: the fewest words asked for.
        max_len: the search's most decoder steps.
    """
    return min(min_len, max_len)


def validate_decoding(decoding: Any, allow_unknown: bool = False) -> None:
    """Check decoding settings (a subset of DECODING_DEFAULTS' keys): each a number in RECOMMENDED_LIMITS
    (beam_size >= 1, alpha >= 0, no_repeat_ngram_size >= 0, 1 <= max_len <= MAX_LEN_LIMIT,
    0 <= min_len <= max_len), whole numbers where they count something, and ``bad_endings`` a list of words.

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
        if key not in RECOMMENDED_LIMITS:
            continue
        whole = key in WHOLE
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or not math.isfinite(value):
            raise ValueError(f"decoding {key} must be {'a whole' if whole else 'a finite'} number, got {value!r}")
        check_setting(key, value, RECOMMENDED_LIMITS, name=f"decoding {key}")
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
