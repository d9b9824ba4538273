"""Captioning for a server: photos already decoded go through the backbone, both searches and (where asked) the
word-by-word scoring in one batch, and a :class:`Batcher` gathers the photos of concurrent requests into such batches.

    batcher = Batcher(captioner, max_batch=8)
    result, scored, features = batcher.submit(photo, beam_size=3, max_len=20, alpha=0.0, score_all=None)

The captions carry their words' log-probabilities from the search (``Caption.word_log_probs``), so the page's
captions need no scoring (``score_all=None``); the scoring (the words the model offered instead at every step)
can follow on the photo's ``features`` with :func:`score_shown`.

On a small CPU a decoder step costs about the same for one caption as for eight (the step is a handful of small
matrix products: overhead, not arithmetic), so eight waiting requests captioned together take little more
time than one. Requests with different decoding settings go in different batches.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import torch

from .decoding_settings import end_allowed_from
from .scoring import ScoredCaption, score_captions

__all__ = ["caption_batch", "score_shown", "Batcher"]


def score_shown(captioner: Any, features: torch.Tensor, results: Sequence[Any], score_all: Sequence[bool | None],
                max_len: int) -> list[list[ScoredCaption]]:
    """Score the photos' captions word by word in one batch (``storyteller.scoring.score_captions``).

    Args:
        captioner: the ``Captioner`` whose searches made ``results``.
        features: the photos' features (one row per result), as the searches were given.
        results: per photo, its ``CaptionResult``.
        score_all: per photo, True: greedy and every beam hypothesis; False: greedy and the best; None: none.
        max_len: the searches' ``max_len``.

    Returns:
        per photo, its scored captions ``[greedy, beam 1, ...]`` (empty where ``score_all`` is None).
    """
    caps, rows, finished = [], [], []
    for i, (r, full) in enumerate(zip(results, score_all)):
        if full is None:
            continue
        for c in [r.greedy, *(r.beam if full else r.beam[:1])]:
            caps.append(c.tokens)
            rows.append(i)
            finished.append(c.finished)
    if not caps:
        return [[] for _ in results]
    min_len = end_allowed_from(captioner.decoding["min_len"], max_len)
    scored = score_captions(captioner.model, features, caps, finished, images=rows, min_len=min_len)
    return [[s for s, row in zip(scored, rows) if row == i] for i in range(len(results))]


@torch.inference_mode()
def caption_batch(captioner: Any, photos: Sequence[Any], beam_size: int, max_len: int, alpha: float,
                  score_all: Sequence[bool | None], warnings: Sequence[list[str]] | None = None
                  ) -> list[tuple[Any, list[ScoredCaption], torch.Tensor]]:
    """Caption decoded photos in one batch (all ``beam_size`` beam hypotheses kept) and score their captions
    where asked.

    Args:
        captioner: a ``storyteller.captioner.Captioner``.
        photos: decoded photos (PIL), e.g. from ``Captioner.load_image``.
        beam_size, max_len, alpha: the searches' settings (checked by the caller).
        score_all: per photo, score greedy and every beam hypothesis (True: the JSON API), greedy and the best
            (False), or nothing (None: the page, whose shading comes from ``Caption.word_log_probs``).
        warnings: per photo, its ``image_warnings``.

    Returns:
        per photo, its ``CaptionResult`` (timings of the batch: ``backbone``, ``search``, ``scoring`` where any
        photo was scored; ``batch`` photos), its scored captions ``[greedy, beam 1, ...]`` (empty where not
        scored) and its features (1, ...) for scoring later (:func:`score_shown`).
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    features = captioner.backbone.encode(list(photos), timings=timings, grid=captioner.has_attention)
    timings["total"] = (time.perf_counter() - t0) * 1e3  # so far; caption_features adds the search and confidence
    results = captioner.caption_features(features, beam_size=beam_size, max_len=max_len, alpha=alpha,
                                         n_best=beam_size, warnings=warnings, timings=timings)
    t = time.perf_counter()
    scored = score_shown(captioner, features, results, score_all, max_len)
    scoring = (time.perf_counter() - t) * 1e3 if any(scored) else 0.0
    out = []
    for i, r in enumerate(results):
        r.timings_ms.update(batch=float(len(results)), total=r.timings_ms["total"] + scoring,
                            **({"scoring": scoring} if any(scored) else {}))
        out.append((r, scored[i], features[i:i + 1].clone()))  # its own copy: a state keeps one photo, not the batch
    return out


class Batcher:
    """One worker thread captions what concurrent requests submit, up to ``max_batch`` photos at a time.

    A request waits for the batch before it (the worker is busy) while others arrive, so batches form by
    themselves under load and a lone request goes at once. Safe to call from any number of threads.

    Args:
        captioner: the model.
        max_batch: most photos in one batch.
        work: the function that captions a batch (default :func:`caption_batch`; the app passes its own).
    """

    def __init__(self, captioner: Any, max_batch: int = 8, work: Any = None):
        self.captioner, self.max_batch = captioner, max(1, int(max_batch))
        self.work = work or caption_batch
        self._waiting: list[tuple[tuple, Any, bool | None, list[str], Future]] = []
        self._cv = threading.Condition()
        self._worker = threading.Thread(target=self._run, name="storyteller-batcher", daemon=True)
        self._worker.start()

    def submit(self, photo: Any, beam_size: int, max_len: int, alpha: float, score_all: bool | None,
               warnings: list[str] | None = None) -> tuple[Any, list[ScoredCaption], torch.Tensor]:
        """Caption one decoded photo with others waiting; blocks until done; raises what the batch raised."""
        fut: Future = Future()
        with self._cv:
            self._waiting.append(((beam_size, max_len, alpha), photo, score_all, warnings or [], fut))
            self._cv.notify()
        return fut.result()

    def _take(self) -> list[tuple[tuple, Any, bool | None, list[str], Future]]:
        """The oldest request and up to max_batch - 1 more with the same settings, taken off the list."""
        with self._cv:
            while not self._waiting:
                self._cv.wait()
            key = self._waiting[0][0]
            batch = [w for w in self._waiting if w[0] == key][:self.max_batch]
            taken = {id(w) for w in batch}
            self._waiting = [w for w in self._waiting if id(w) not in taken]
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            (k, n, a) = batch[0][0]
            try:
                out = self.work(self.captioner, [w[1] for w in batch], k, n, a, [w[2] for w in batch],
                                [w[3] for w in batch])
            except BaseException as e:  # every waiting request gets the error, the worker goes on
                for w in batch:
                    w[4].set_exception(e)
                continue
            for w, o in zip(batch, out):
                w[4].set_result(o)
