"""Compatibility names for code written against earlier versions: the decoders live in ``storyteller.decoders``."""
from .decoders import ShowAttendTell, attention_penalty

DECODER = ShowAttendTell.decoder_type

__all__ = ["DECODER", "ShowAttendTell", "attention_penalty"]
