"""Neural Storyteller: image captioning (CNN features -> LSTM decoder: Show-and-Tell or Show-Attend-Tell).

    import storyteller
    captioner = storyteller.load()                 # bundled model, $STORYTELLER_MODEL, a folder or a Hub id
    print(captioner("photo.jpg"))                  # beam-search caption
"""
from __future__ import annotations

from .decoding import Caption, beam_search, greedy_and_beam_search, greedy_search
from .metrics import evaluate_captions
from .decoders import ShowAndTell, ShowAttendTell, load_decoder
from .vocab import Vocabulary, tokenize

__version__ = "0.1.0"

# Imported on first use: they pull in torchvision/timm/PIL, which the training loop does not need.
_LAZY = {
    "load": "captioner", "Captioner": "captioner", "CaptionResult": "captioner", "ModelLoadError": "loading",
    "load_image": "images", "ImageError": "images",
    "create_backbone": "backbones", "list_backbones": "backbones",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'storyteller' has no attribute {name!r}")


__all__ = ["Caption", "ShowAndTell", "ShowAttendTell", "load_decoder", "Vocabulary", "beam_search", "evaluate_captions", "greedy_and_beam_search", "greedy_search",
           "tokenize", *_LAZY]
