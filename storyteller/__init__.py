"""Neural Storyteller: Show-and-Tell image captioning (CNN features -> LSTM decoder)."""
from .decoding import Caption, beam_search, greedy_search
from .model import ShowAndTell
from .vocab import Vocabulary, tokenize

__version__ = "0.1.0"
__all__ = ["Caption", "ShowAndTell", "Vocabulary", "beam_search", "greedy_search", "tokenize"]
