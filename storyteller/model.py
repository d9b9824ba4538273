"""Compatibility names for code written against earlier versions: the decoders live in ``storyteller.decoders``."""
from .decoders import (CONFIG_FILE, DECODERS, VOCAB_FILE, WEIGHTS_FILE, HubDecoder, ShowAndTell, load_decoder,
                       lstm_update, packed_gates)

DECODER = ShowAndTell.decoder_type


def decoder_classes() -> dict[str, type]:
    """``config.json``'s ``decoder`` value -> the class that loads it (``storyteller.decoders.DECODERS``)."""
    return dict(DECODERS)


__all__ = ["CONFIG_FILE", "VOCAB_FILE", "WEIGHTS_FILE", "DECODER", "HubDecoder", "ShowAndTell", "decoder_classes",
           "load_decoder", "lstm_update", "packed_gates"]
