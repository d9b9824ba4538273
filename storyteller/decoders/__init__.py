"""Caption decoders: the base class and state (``base``), Show-and-Tell (``show_and_tell``), Show-Attend-Tell
(``show_attend_tell``), ensembles of them (``ensemble``), and the registry that ``load_decoder`` reads
``config.json`` with (``registry``)."""
from ..loading import CONFIG_FILE, VOCAB_FILE, WEIGHT_SHARDS_GLOB, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, local_weight_files
from .base import DecoderState, HubDecoder, lstm_update, packed_gates
from .ensemble import Ensemble
from .registry import DECODERS, decoder_class, load_decoder, reads_grid
from .show_and_tell import ShowAndTell
from .show_attend_tell import ShowAttendTell, attention_penalty

__all__ = ["CONFIG_FILE", "VOCAB_FILE", "WEIGHTS_FILE", "WEIGHTS_INDEX_FILE", "WEIGHT_SHARDS_GLOB", "local_weight_files", "DecoderState", "HubDecoder", "lstm_update", "packed_gates",
           "DECODERS", "decoder_class", "load_decoder", "reads_grid", "Ensemble", "ShowAndTell", "ShowAttendTell",
           "attention_penalty"]
