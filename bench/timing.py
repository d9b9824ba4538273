"""Timing helpers the benchmarks share (never the runtime: the runtime package does not time itself)."""
from __future__ import annotations

import statistics
import time

import torch


@torch.inference_mode()
def time_step(model: torch.nn.Module, features: torch.Tensor, repeats: int = 7, rows: int = 1) -> float:
    """Median ms of one ``model.step`` for ``rows`` rows (after two warm-up steps), in the model's
    precision, each step continuing from the state the last one returned (benchmarks).

    Args:
        model: the decoder (eval mode).
        features: one photo's features, (1, F) or (1, h, w, D).
        repeats: timed steps.
        rows: rows per step (1: one greedy caption; beam rows for a beam search).
    """
    products = model.products()
    state = model.init_state(features)
    if rows > 1:
        state = model.select_state(state, torch.zeros(rows, dtype=torch.long))
    tokens = torch.full((rows,), 4, dtype=torch.long)  # a word: ids 0-3 are the special tokens
    times = []
    for i in range(repeats + 2):
        t = time.perf_counter()
        state = model.step(tokens, state, products)[1]
        if i >= 2:
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)
