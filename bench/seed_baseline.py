"""The original project's decoder, the baseline both training benchmarks measure against.

Imported by bench/bench_train.py (CPU) and bench/gpu_train.py (GPU); not part of the library.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from storyteller.vocab import Vocabulary


class SeedDecoder(nn.Module):
    """The original project's decoder: feature -> Linear -> h0 (c0 zeros); Embedding -> LSTM -> Linear.

    Args:
        vocab_size: tokens.
        feature_dim: image feature size.
        embed_dim: embedding size.
        hidden_dim: LSTM size.
    """

    def __init__(self, vocab_size: int, feature_dim: int, embed_dim: int = 512, hidden_dim: int = 512):
        super().__init__()
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=Vocabulary.pad_id)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, batch_first=True)
        self.fc = nn.Linear(hidden_dim, vocab_size)

    def forward(self, features: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """(B, F), (B, T) padded -> logits (B, T-1, V) at every position, padding included."""
        h0 = self.init_h(features).unsqueeze(0)  # (1, B, H)
        out, _ = self.lstm(self.embed(captions[:, :-1]), (h0, torch.zeros_like(h0)))
        return self.fc(out)
