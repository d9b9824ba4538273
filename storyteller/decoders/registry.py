"""The decoder family: ``config.json``'s ``decoder`` value -> the class that loads it.

    model = load_decoder("models/flickr8k-lite0-scst")       # a folder or a Hub repo id

A new decoder is one file in this package (a ``HubDecoder`` subclass with its ``decoder_type``) and one line in
:data:`DECODERS`. Configs written before ``decoder`` existed are Show-and-Tell.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..loading import CONFIG_FILE, resolve_file
from .base import HubDecoder
from .ensemble import Ensemble
from .show_and_tell import ShowAndTell
from .show_attend_tell import ShowAttendTell

DECODERS: dict[str, type[HubDecoder]] = {
    ShowAndTell.decoder_type: ShowAndTell,
    ShowAttendTell.decoder_type: ShowAttendTell,
    Ensemble.decoder_type: Ensemble,
}
DEFAULT_DECODER = ShowAndTell.decoder_type  # what a config without a "decoder" key holds


def decoder_class(config: dict[str, Any]) -> type[HubDecoder]:
    """The class of a ``config.json`` (a dict).

    Raises:
        ValueError: not a dict, or a decoder this version does not know.
    """
    kind = config.get("decoder", DEFAULT_DECODER) if isinstance(config, dict) else None
    if kind not in DECODERS:
        raise ValueError(f"{CONFIG_FILE} names decoder {kind!r}; this version knows {sorted(DECODERS)}")
    return DECODERS[kind]


def reads_grid(config: dict[str, Any]) -> bool:
    """True when a ``config.json`` (a dict) describes a decoder that reads the feature grid and shows where it
    looked: an attention decoder, or an ensemble holding one. False for pooled decoders and unknown configs."""
    try:
        cls = decoder_class(config)
    except ValueError:
        return False
    if cls is Ensemble:
        members = config.get("members")
        return isinstance(members, list) and any(isinstance(m, dict) and reads_grid(m) for m in members)
    return cls.has_attention


def load_decoder(model_id: str | Path, **kwargs: Any) -> HubDecoder:
    """Load any Neural Storyteller decoder from a local folder or a Hub repo, strictly.

    Args:
        model_id: a local model folder or a Hub repo id.
        **kwargs: passed to ``from_pretrained`` (revision, map_location, local_files_only...).

    Raises:
        ValueError: an unreadable or unknown config, a vocabulary or weights that do not match it, or
            non-finite weights.
        OSError: a missing file.
    """
    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "force_download", "local_files_only", "token") if k in kwargs}
    config_path = resolve_file(str(model_id), CONFIG_FILE, **hub)
    try:
        config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{model_id}: unreadable {CONFIG_FILE} ({e})") from None
    try:
        cls = decoder_class(config)
    except ValueError as e:
        raise ValueError(f"{model_id}: {e}") from None
    return cls.from_pretrained(str(model_id), **kwargs)
