"""Neural Storyteller web app (Gradio): upload, paste or snap a photo, get greedy and beam-search captions.

    python app.py [--model M] [--revision R] [--host 127.0.0.1] [--port 7860] [--concurrency N] [--batch B]
                  [--threads T] [--sessions S]
    STORYTELLER_MODEL=user/model gradio app.py      # reload mode; the env var picks the model

Which model, first match wins: ``--model`` (with ``--revision``); ``$STORYTELLER_MODEL``; the Space's model
reference in ``space_model.txt`` (one line, ``user/model@commit``, written by ``hub_upload.py --space-id``:
the Space downloads that model from the Hub at start-up, through the Hub cache); the bundled
``models/flickr8k-lite0-ensemble/``. It is loaded once at start-up; the handlers are pure functions of their inputs.

The page is phone first: a photo is captioned as soon as it arrives (upload, paste, webcam, example tap)
and both captions come into view; each word is shaded by the probability the model gave it (the value on
hover or tap; the searches record it as they go) and, where the model has a calibrator, each caption has a
confidence badge. Those come first; a chained event then scores the two captions word by word (the words the
model offered instead at every step, on the photo's features kept from the first event) and adds one line saying when greedy and beam search agree (with beam search's runner-ups),
else a small table of where they part and the words the model offered there, and the attention view. Decoding
settings sit in a closed "Settings" accordion. A refused input is one notice above cleared outputs and one
log line. The HTML comes from ``storyteller.render``.

Concurrent requests' photos are captioned together by one batch worker (``storyteller.serving.Batcher``,
``--batch``). On a ZeroGPU Space the model's work is ``caption_on_device`` under ``@spaces.GPU``, called from
each request (docs/space.md).

API (gradio_client), beside the page's:

- ``/caption_json`` (image, beam_size, max_len, alpha; all but the image optional): one JSON object,
  ``greedy`` and ``beam`` as ``{text, words, word_log_probs, end_log_prob, log_prob, score, confidence}``, ``n_best``
  (a list of those), ``parting``, ``attention`` (attention models only), ``timings_ms``, ``warnings`` and
  ``model``. Per-word log-probabilities come from scoring each caption with the decoder in teacher-forcing
  mode (``storyteller.scoring``), on the same weights and precision as the search (within float rounding of the
  search's own ``Caption.word_log_probs``).
- ``/caption`` (the same four inputs): the page's texts, the n-best table and a small result JSON.

A refusal (no photo, not an image, a setting out of range) is an error for API callers. The raw
upload goes to ``storyteller.images.load_image`` (the events run with ``preprocess=False``, so Gradio
never decodes it). Uploaded files are deleted after ``--upload-max-age`` seconds.

Example::

    python app.py --model models/flickr8k-lite0-attention --port 7860
"""
from __future__ import annotations

import argparse
import base64
import binascii
import html
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import gradio as gr
import torch

from storyteller.captioner import DECODING_DEFAULTS, Captioner, CaptionResult, ModelLoadError, load
from storyteller.loading import is_hub_id
from storyteller.card import ensemble_summary
from storyteller.decoding_settings import SLIDER_RANGES
from storyteller.images import MAX_BYTES, ImageError, image_warnings
from storyteller.render import (CSS, Captioned, attention_html, attention_note, changed_html, model_markdown,
                                nbest_html, notice_html, parting_record, words_html)
from storyteller.scoring import ScoredCaption
from storyteller.serving import Batcher, caption_batch, score_shown
from storyteller.vocab import Vocabulary

try:  # Hugging Face's helper for ZeroGPU Spaces (in the ZeroGPU Space's requirements; absent elsewhere)
    import spaces
except ImportError:
    spaces = None

HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "examples"
BEAM_RANGE, MAX_LEN_RANGE, ALPHA_RANGE = (SLIDER_RANGES[k] for k in ("beam_size", "max_len", "alpha"))
log = logging.getLogger("storyteller.app")
# Start-up progress goes to stdout, so a failed start is still one line on stderr (see _load_or_exit).
startup_log = logging.getLogger("storyteller.app.startup")
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
# On a ZeroGPU Space (Hugging Face sets SPACES_ZERO_GPU there) the model runs on the GPU that @spaces.GPU attaches.
ZERO_GPU = spaces is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")  # as spaces reads it
GPU_DURATION_S = 20  # ZeroGPU's limit for one caption call (s): well over a caption's time, short to queue sooner
# Photos of concurrent requests captioned together, and requests handled at once (each waits for its batch);
# bench/bench_app.py --baseline measures these against one photo at a time and 2 at once (docs/benchmarks.md).
DEFAULT_MAX_BATCH = int(os.environ.get("STORYTELLER_MAX_BATCH", "8"))
DEFAULT_CONCURRENCY = int(os.environ.get("STORYTELLER_CONCURRENCY", "8"))
# Requests waiting beyond those being captioned: at ~0.3 s a photo, 64 is ~10 s of work on 2 cores; a
# longer queue would only keep visitors waiting past what a browser tab sits through.
QUEUE_SIZE = 64
# Browser sessions whose last inputs and outputs Gradio keeps in memory (its default is 10,000). Each keeps its
# page's outputs, the attention view's images among them (about 0.3 MB a session here), until newer sessions push
# it out: 10,000 of them grew the server by 0.3 MB a request without end (bench/bench_app.py --soak 3000,
# 2026-12-07). Our own state only has to live from a photo's captions to its chained event, a few seconds.
DEFAULT_SESSIONS = int(os.environ.get("STORYTELLER_SESSIONS", "500"))
# The largest upload Gradio accepts: the image loader's own limit (a 200 MP phone JPEG is 30-60 MB).
UPLOAD_LIMIT = f"{MAX_BYTES // 2**20}mb"
# The Space's model reference: one line, "user/model@commit" (or a folder inside the Space), written by
# hub_upload.py --space-id; a new model version reaches the Space by changing this line.
SPACE_MODEL_FILE = "space_model.txt"


# -- pure helpers ------------------------------------------------------------------------------------
def image_source(payload: Any) -> str | bytes:
    """The uploaded file as a path (or bytes for a data: URL) from the raw Image payload.

    Args:
        payload: what the Image component sends with preprocessing off: a FileData dict, a path, or None.
    """
    if payload is None:
        raise refuse("Upload, paste or take a photo first (or tap an example photo).", "No photo yet")
    if isinstance(payload, (str, os.PathLike)):
        return str(payload)
    if isinstance(payload, dict):
        if payload.get("path"):
            return str(payload["path"])
        url = payload.get("url") or ""
        if url.startswith("data:") and "," in url:
            try:
                return base64.b64decode(url.split(",", 1)[1], validate=True)
            except (binascii.Error, ValueError):
                raise refuse("The image data could not be decoded.", "Not a usable image") from None
    raise refuse("The upload did not contain an image file.", "No photo yet")


def _setting(value: Any, name: str, lo: float, hi: float, whole: bool) -> Any:
    """A decoding setting checked: a number in [lo, hi]; with ``whole``, a whole number (2.5 is refused, not cut)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise refuse(f"{name} must be a number, got {value!r}.", "Bad setting") from None
    if not lo <= v <= hi:  # NaN fails this too
        raise refuse(f"{name} must be between {lo} and {hi}, got {value!r}.", "Bad setting")
    if whole:
        if not v.is_integer():
            raise refuse(f"{name} must be a whole number, got {value!r}.", "Bad setting")
        return int(v)
    return v


def _clamp(value: Any, lo: float, hi: float, fallback: float, cast: type) -> Any:
    """``value`` as ``cast`` moved into [lo, hi]; ``fallback`` if it is not a finite number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v):
        v = fallback
    return cast(min(max(v, lo), hi))


def slider_defaults(decoding: dict[str, Any]) -> dict[str, Any]:
    """Start values of the beam, max-length and alpha sliders: the model's recommended decoding,
    each moved into its slider's range.

    The caption events run with ``preprocess=False``, so Gradio does not check slider values against
    their bounds; ``_setting`` does, and would refuse the page's very first request if a model
    recommended, say, ``max_len`` 50 on a 1..40 slider.

    Args:
        decoding: ``Captioner.decoding`` (the model's recommendation over DECODING_DEFAULTS).
    """
    return {"beam_size": _clamp(decoding.get("beam_size"), *BEAM_RANGE, DECODING_DEFAULTS["beam_size"], int),
            "max_len": _clamp(decoding.get("max_len"), *MAX_LEN_RANGE, DECODING_DEFAULTS["max_len"], int),
            "alpha": _clamp(decoding.get("alpha"), *ALPHA_RANGE, DECODING_DEFAULTS["alpha"], float)}


def _examples() -> list[list[str]]:
    """Rows ``[photo path, its first human caption]`` from examples/ and examples/captions.json."""
    try:
        captions = json.loads((EXAMPLES_DIR / "captions.json").read_text(encoding="utf-8")).get("captions", {})
    except (OSError, ValueError):
        captions = {}
    files = sorted(EXAMPLES_DIR.glob("*.jpg")) if EXAMPLES_DIR.is_dir() else []
    return [[str(p), (captions.get(p.name) or [""])[0].strip().rstrip(" .")] for p in files]


def refuse(message: str, title: str) -> gr.Error:
    """A user error: one log line (no traceback) and the ``gr.Error`` to raise.

    Args:
        message: what is wrong, for the user.
        title: its heading.
    """
    log.info("caption refused: %s: %s", title, message)
    # plain text: API callers get it as is; the page never shows this error, it shows notice_html's escaped copy
    return gr.Error(message, title=title, print_exception=False)


# -- one photo, captioned and scored -------------------------------------------------------------------
def _gpu_seconds(*args: Any, **kwargs: Any) -> int:
    """ZeroGPU's time limit for one call of :func:`caption_on_device` (its ``duration``): a caption takes well
    under a second on a GPU; the margin covers the first call's CUDA start-up. Shorter limits queue sooner."""
    return GPU_DURATION_S


def caption_on_device(captioner: Captioner, photos: list, beam_size: int, max_len: int, alpha: float,
                      score_all: list[bool], warnings: list[list[str]]) -> list:
    """The work that needs the model's device: backbone, both searches and the scoring asked for, for a batch of
    decoded photos (``storyteller.serving.caption_batch``). On ZeroGPU this is the ``@spaces.GPU`` function: a GPU
    is attached while it runs. Results come back on the CPU (tensors moved), as ZeroGPU wants."""
    out = caption_batch(captioner, photos, beam_size, max_len, alpha, score_all, warnings)
    for result, _, _ in out:
        for c in [result.greedy, *result.beam]:
            if c is not None and c.attention is not None:
                c.attention = c.attention.cpu()
    return [(result, scored, features.cpu()) for result, scored, features in out]


if spaces is not None:  # on a Space (ZeroGPU or not): Hugging Face's decorator; it has no effect off ZeroGPU
    caption_on_device = spaces.GPU(duration=_gpu_seconds)(caption_on_device)


class Route:
    """How the events reach :func:`caption_on_device`: straight from the request's thread (ZeroGPU bills the
    visitor whose request it is; or ``max_batch`` 1), or through a ``Batcher`` that captions the photos of
    concurrent requests together (a CPU server).

    ``page_scoring``: what the page's first event scores (``caption_batch``'s ``score_all``): nothing on a CPU
    (the chained event scores the two captions shown); greedy's and the best on ZeroGPU, in the same GPU call
    (a few ms there, where a second call would queue for a GPU again).

    Args:
        captioner: the model.
        max_batch: most photos captioned together (1: no batching).
    """

    def __init__(self, captioner: Captioner, max_batch: int = 1):
        self.batcher = None
        if max_batch > 1 and not ZERO_GPU:
            # the module's function looked up at call time: the events call whatever caption_on_device is
            self.batcher = Batcher(captioner, max_batch, work=lambda *a: caption_on_device(*a))
        self.captioner = captioner
        self.page_scoring: bool | None = False if ZERO_GPU else None

    def __call__(self, photo: Any, beam_size: int, max_len: int, alpha: float, score_all: bool | None,
                 warnings: list[str]) -> tuple[CaptionResult, list[ScoredCaption], torch.Tensor]:
        if self.batcher is not None:
            return self.batcher.submit(photo, beam_size, max_len, alpha, score_all, warnings)
        return caption_on_device(self.captioner, [photo], beam_size, max_len, alpha, [score_all], [warnings])[0]


def caption_and_score(captioner: Captioner, image: Any, beam_size: Any, max_len: Any, alpha: Any,
                      score_all: bool | None = True, route: Route | None = None) -> Captioned:
    """Check the inputs, decode the photo once, caption it (greedy and beam search, all ``beam_size`` beam
    hypotheses kept) and score its captions word by word on the same features where asked.

    Args:
        captioner: the loaded model.
        image: the raw Image payload (FileData dict, path, or None).
        beam_size: beam width (BEAM_RANGE, a whole number).
        max_len: most decoder steps, ``<end>`` included (MAX_LEN_RANGE, a whole number).
        alpha: length-normalisation exponent (ALPHA_RANGE).
        score_all: score every beam hypothesis (True: the JSON API), greedy's and the best (False), or none (None:
            the page's first event; :func:`scored_for_page` scores them after).
        route: how to reach the model (default: straight, no batching).

    Raises:
        gr.Error: no photo, not a usable image, or a setting out of range (logged in one line).
    """
    src = image_source(image)
    k = _setting(beam_size, "Beam width", *BEAM_RANGE, whole=True)
    n = _setting(max_len, "Max length", *MAX_LEN_RANGE, whole=True)
    a = _setting(alpha, "Length normalisation alpha", *ALPHA_RANGE, whole=False)
    t0 = time.perf_counter()
    try:
        photo = captioner.load_image(src)  # decoded once: the features and the attention view use it
    except ImageError as e:  # the loader's message says what is wrong; the title says it is not usable
        message = str(e)
        raise refuse(message[:1].upper() + message[1:], "Not a usable image") from None
    decode_ms = (time.perf_counter() - t0) * 1e3
    result, scored, features = (route or Route(captioner))(photo, k, n, a, score_all, image_warnings(photo))
    t = result.timings_ms
    t["preprocess"] = t.get("preprocess", 0.0) + decode_ms  # our decode, plus the resize and normalise
    t["total"] = t.get("total", 0.0) + decode_ms
    return Captioned(photo, result, scored, k, n, a, features)


def scored_for_page(captioner: Captioner, c: Captioned) -> list[ScoredCaption]:
    """Greedy's caption and the best scored word by word (for the words offered at each step and where they
    part): those of the first event where it scored them (ZeroGPU), else scored now on the photo's kept features
    (a CPU server: the model is here)."""
    if len(c.scored) < 2:
        c.scored = score_shown(captioner, c.features.to(captioner.device), [c.result], [False], c.max_len)[0]
    return c.scored


# -- what the API returns ---------------------------------------------------------------------------
def caption_entry(vocab: Vocabulary, caption: Any, scored: ScoredCaption) -> dict[str, Any]:
    """One caption for the JSON API: its text and words, each word's log-probability, <end>'s (None when
    cut at max_len), the search's log_prob (the sum of those parts), score and confidence (None when the model
    has no calibrator).

    Args:
        vocab: the model's vocabulary.
        caption: a ``storyteller.decoding.Caption``.
        scored: the same caption scored word by word.
    """
    conf = getattr(caption, "confidence", None)
    return {"text": caption.text, "words": [vocab.itos[t] for t in caption.tokens],
            "word_log_probs": [round(lp, 5) for lp in scored.word_log_probs],
            "end_log_prob": None if scored.end_log_prob is None else round(scored.end_log_prob, 5),
            "log_prob": round(caption.log_prob, 5), "score": round(caption.score, 5),
            "confidence": None if conf is None else round(float(conf), 4)}


def caption_json(captioner: Captioner, c: Captioned, model: dict[str, Any]) -> dict[str, Any]:
    """The ``/caption_json`` answer for one photo (see the module docstring).

    Args:
        captioner: the loaded model.
        c: the photo captioned and scored.
        model: :func:`model_summary` (made once at start-up).
    """
    vocab, r = captioner.model.vocab, c.result
    entries = [caption_entry(vocab, cap, s) for cap, s in zip([r.greedy, *r.beam], c.scored)]
    out: dict[str, Any] = {"greedy": entries[0], "beam": entries[1], "n_best": entries[1:],
                           "parting": parting_record(vocab, c)}
    if captioner.has_attention and r.beam[0].attention is not None:  # the beam caption's maps, words x h x w
        out["attention"] = [[[round(float(v), 4) for v in row] for row in m] for m in r.beam[0].attention.tolist()]
    out["timings_ms"] = {k: round(v, 1) for k, v in c.timings.items()}
    out["warnings"] = list(r.warnings)
    decoding = {**model["decoding"], "beam_size": c.beam_size, "max_len": c.max_len, "alpha": c.alpha}
    out["model"] = {**model, "decoding": decoding}
    return out


def model_summary(captioner: Captioner, info: dict[str, Any]) -> dict[str, Any]:
    """What the API says about the model: its label, revision, decoder, precision and default decoding."""
    d = {**DECODING_DEFAULTS, **captioner.decoding}
    return {"label": info.get("model_name") or info["model"], "revision": info.get("revision"),
            "decoder": info.get("decoder"), "precision": info.get("precision"),
            "decoding": {"beam_size": d["beam_size"], "max_len": d["max_len"], "alpha": d["alpha"],
                         "no_repeat_ngram_size": d["no_repeat_ngram_size"], "min_len": d["min_len"],
                         "bad_endings": list(d["bad_endings"])}}


# The outputs by name. /caption returns API_OUTPUTS (no attention view for a pooled model: it has none to
# show). The page shows FIRST_OUTPUTS as soon as the search is done, then LATER_OUTPUTS in a chained event
# (which scores the captions for "what beam search changed"). Cleared: what every output shows before a caption.
API_OUTPUTS = ("greedy caption", "greedy figures", "beam caption", "beam figures", "n-best list", "timings",
               "notice", "result", "attention")
PAGE_OUTPUTS = ("greedy words", "beam words", "what beam search changed")
FIRST_OUTPUTS = tuple(n for n in API_OUTPUTS if n != "attention") + ("greedy words", "beam words")
LATER_OUTPUTS = ("what beam search changed", "attention")
CLEARED = {name: None if name == "result" else "" for name in API_OUTPUTS + PAGE_OUTPUTS}


def _confidence(caption: Any) -> float | None:
    conf = getattr(caption, "confidence", None)
    return None if conf is None else round(float(conf), 4)


def caption_values(captioner: Captioner, c: Captioned) -> dict[str, Any]:
    """The outputs shown first (FIRST_OUTPUTS), by name: the captions, their figures, shaded words and
    confidence badges, the n-best list, the timings, a warning and the small result JSON."""
    vocab, r, t = captioner.model.vocab, c.result, c.timings
    # greedy and beam search run in one pass (one decoder call per step for both), so they share its time
    search_ms = t["preprocess"] + t["backbone"] + t["search"]
    best = r.beam[0]
    shared = f" (shared by {t['batch']:.0f} photos captioned together)" if t.get("batch", 1) > 1 else ""
    scoring = f"; word-by-word scoring **{t['scoring']:.0f} ms**" if "scoring" in t else ""
    timing = (f"Image encoding, shared by both: preprocessing **{t['preprocess']:.0f} ms** + backbone "
              f"`{captioner.backbone.spec.get('name')}` **{t['backbone']:.0f} ms**; greedy and beam search ({c.beam_size} beams) "
              f"in one pass **{t['search']:.0f} ms**{scoring}; total **{t['total']:.0f} ms**{shared}.")
    result = {"greedy": {"caption": r.greedy.text, "log_prob": round(r.greedy.log_prob, 4), "ms": round(search_ms, 1),
                         "confidence": _confidence(r.greedy)},
              "beam": [{"caption": b.text, "log_prob": round(b.log_prob, 4), "score": round(b.score, 4),
                        "confidence": _confidence(b)} for b in r.beam],
              "beam_size": c.beam_size, "beam_ms": round(search_ms, 1),
              "timings_ms": {k: round(v, 1) for k, v in t.items()}, "warnings": list(r.warnings)}
    return {"greedy caption": r.greedy.text,
            "greedy figures": f"log-probability **{r.greedy.log_prob:.3f}** · **{search_ms:.0f} ms**",
            "beam caption": best.text,
            "beam figures": f"log-probability **{best.log_prob:.3f}** · score **{best.score:.3f}** · **{search_ms:.0f} ms**",
            "n-best list": nbest_html(r.beam), "timings": timing,
            "notice": notice_html("warning", "Odd photo.", " ".join(r.warnings)) if r.warnings else "",
            "result": result,
            # shaded by the log-probabilities the searches recorded: no scoring on the captions' path
            "greedy words": words_html(vocab, r.greedy, "Greedy", r.greedy),
            "beam words": words_html(vocab, best, "Beam search", best)}


def later_values(captioner: Captioner, c: Captioned | None, names: tuple[str, ...] = LATER_OUTPUTS,
                 note: str | None = None) -> dict[str, Any]:
    """The outputs that follow the captions (LATER_OUTPUTS, those of ``names``): where greedy and beam part (the
    captions scored word by word, here if not yet), and where the model looked (None: nothing captioned, cleared).
    ``note``: the attention view's ``attention_note`` (the app makes it once; default: made here)."""
    if c is None:
        return {n: CLEARED[n] for n in names}
    out: dict[str, Any] = {}
    if "what beam search changed" in names:
        scored_for_page(captioner, c)
        out["what beam search changed"] = changed_html(captioner.model.vocab, c)
    best = c.result.beam[0]
    if "attention" in names:
        out["attention"] = ""
        if best.attention is not None:
            words = [captioner.model.vocab.itos[tok] for tok in best.tokens]
            out["attention"] = attention_html(c.photo, words, best.attention, captioner.backbone.spec["preprocessing"],
                                              attention_note(captioner.info) if note is None else note)
    return out


def page_values(captioner: Captioner, c: Captioned, names: tuple[str, ...] = API_OUTPUTS + PAGE_OUTPUTS,
                note: str | None = None) -> dict[str, Any]:
    """The outputs ``names`` for one captioned photo, by name (default: every one, API_OUTPUTS + PAGE_OUTPUTS);
    ``note`` as in :func:`later_values`."""
    return {**caption_values(captioner, c),
            **later_values(captioner, c, tuple(n for n in LATER_OUTPUTS if n in names), note)}


def caption_photo(captioner: Captioner, names: tuple[str, ...], *inputs: Any, route: Route | None = None,
                  note: str | None = None) -> tuple:
    """Caption one photo for the API; returns the outputs ``names`` in order.

    Args:
        captioner: the loaded model.
        names: output names (API_OUTPUTS and PAGE_OUTPUTS entries).
        inputs: image, beam width, max length, alpha.
        route: how to reach the model (default: straight).
        note: the attention view's note (default: made here).

    Raises:
        gr.Error: no photo, not a usable image, or a setting out of range (logged in one line).
    """
    # the captions' own word log-probabilities make the shading; scoring only for "what beam search changed"
    score = False if "what beam search changed" in names else None
    values = page_values(captioner, caption_and_score(captioner, *inputs, score_all=score, route=route), names, note)
    return tuple(values[n] for n in names)


def caption_for_page(captioner: Captioner, names: tuple[str, ...], *inputs: Any, route: Route | None = None
                     ) -> tuple[tuple, Captioned | None]:
    """The page's first event: the captions (``names``, FIRST_OUTPUTS entries) and the captioned photo for the
    chained event. A refusal becomes the one notice above cleared outputs (no error state on every output); an
    unexpected failure is logged with its traceback and shown the same way.

    Args:
        captioner: the loaded model.
        names: output names, in order.
        inputs: image, beam width, max length, alpha.
        route: how to reach the model (default: straight).
    """
    try:
        c = caption_and_score(captioner, *inputs, score_all=(route or Route(captioner)).page_scoring, route=route)
        values = caption_values(captioner, c)
        return tuple(values[n] for n in names), c
    except gr.Error as e:
        notice = notice_html("error", f"{e.title}:" if e.title else "Error:", str(e.message))
    except Exception:  # a bug, not the user's fault: keep the traceback for the log
        log.exception("caption failed")
        notice = notice_html("error", "Something went wrong:", "the server could not caption this photo. Try another one.")
    return tuple(notice if n == "notice" else CLEARED[n] for n in names), None


# After a photo is captioned: bring both captions into view if they are not (a phone, or an example tapped
# at the bottom of the page); nothing moves when they are in view already.
SHOW_CAPTIONS_JS = """() => {
  const el = document.getElementById('captions');
  if (!el) return;
  const r = el.getBoundingClientRect();
  if (r.top < 0 || r.bottom > window.innerHeight) el.scrollIntoView({block: r.height > window.innerHeight ? 'start' : 'nearest'});
}"""


def header_html(captioner: Captioner) -> str:
    """The title, one line on what the page does, and one on how the model served works (pooled or
    attention; left out on a phone, where the Model panel says it)."""
    if hasattr(captioner.model, "members"):  # an ensemble (not Captioner.info: that reads the evaluations too)
        how = ensemble_summary(captioner.model.init_arguments(), shown=" (shown under the captions)")
    elif captioner.has_attention:
        how = ("Show-Attend-Tell: a frozen ImageNet CNN turns the photo into a grid of features, and an LSTM writes the "
               "caption, looking over the grid for every word (shown under the captions).")
    else:
        how = ("Show-and-Tell: a frozen ImageNet CNN sums the photo up in one feature vector, and an LSTM writes the "
               "caption.")
    return ('<h1>Neural Storyteller</h1><p class="lead">Upload, paste or take a photo, or tap an example: greedy and '
            'beam search caption it side by side, each word shaded by how sure the model was.</p>'
            f'<p class="how">{html.escape(how)}</p>')


def upload_max_age() -> int:
    """Seconds an uploaded file is kept (``$STORYTELLER_UPLOAD_MAX_AGE``, default 600, at least 1)."""
    try:
        return max(1, int(os.environ.get("STORYTELLER_UPLOAD_MAX_AGE", "600")))
    except ValueError:
        return 600


# -- the app -----------------------------------------------------------------------------------------
def _caption_panels(has_attention: bool) -> dict[str, Any]:
    """The right-hand column: notice, the two captions with their confidence, words and figures, what beam
    search changed, the human caption, the n-best list, the attention view and the timings. Returns the
    components by output name (plus ``reference``)."""
    out: dict[str, Any] = {"notice": gr.HTML(elem_id="notice", label="notice")}
    with gr.Row(equal_height=False, elem_id="captions"):
        for key, title, elem in (("greedy", "Greedy", "greedy"), ("beam", "Beam search", "beam")):
            with gr.Column(variant="panel", min_width=260):
                out[f"{key} caption"] = gr.Textbox(label=f"{title} caption", interactive=False, lines=1, max_lines=6,
                                                   elem_id=f"{elem}-caption", elem_classes="caption", buttons=["copy"])
                out[f"{key} words"] = gr.HTML(elem_id=f"{elem}-words", label=f"{title} words")
                out[f"{key} figures"] = gr.Markdown(elem_id=f"{elem}-stats", label=f"{title} figures")
    out["what beam search changed"] = gr.HTML(elem_id="beam-changed", label="what beam search changed")
    # shown only for example photos (their first human caption); hidden for the visitor's own
    out["reference"] = gr.Textbox(label="Human caption (example photos)", interactive=False, lines=1, max_lines=4,
                                  elem_id="reference", visible=False)
    with gr.Accordion("n-best list (beam search)", open=False, elem_id="nbest-accordion"):
        out["n-best list"] = gr.HTML(elem_id="nbest", label="n-best list")
    if has_attention:  # where the model looked for each word of the beam caption (pooled models have no such view)
        out["attention heading"] = gr.Markdown("**Where it looked**: the beam caption, word by word (tap a word to "
                                               "enlarge it)", elem_id="attention-heading")
        out["attention"] = gr.HTML(elem_id="attention", label="Where it looked: the beam caption, word by word")
    out["timings"] = gr.Markdown(elem_id="timing", label="timings")
    out["result"] = gr.JSON(visible=False, label="result")
    return out


def build_demo(captioner: Captioner, concurrency: int | None = None, max_age: int | None = None,
               max_batch: int | None = None) -> gr.Blocks:
    """The Gradio Blocks app around one loaded captioner.

    Args:
        captioner: the model to serve (see ``storyteller.captioner.load``).
        concurrency: requests handled at the same time (the queue holds QUEUE_SIZE more); default
            :data:`DEFAULT_CONCURRENCY`.
        max_age: seconds after which uploaded files are deleted (checked every tenth of that, at
            least every second); None: :func:`upload_max_age`.
        max_batch: most photos of concurrent requests captioned together (1: one at a time); default
            :data:`DEFAULT_MAX_BATCH`.
    """
    info = {**captioner.info, "hub": not Path(captioner.source).expanduser().exists()}
    model = model_summary(captioner, info)
    note = attention_note(info)  # the attention view's note: the model's, made once here
    defaults = slider_defaults(captioner.decoding)
    max_age = upload_max_age() if max_age is None else max(1, int(max_age))
    route = Route(captioner, DEFAULT_MAX_BATCH if max_batch is None else max_batch)
    api_names = tuple(n for n in API_OUTPUTS if n != "attention" or captioner.has_attention)
    first_names = FIRST_OUTPUTS
    later_names = tuple(n for n in LATER_OUTPUTS if n != "attention" or captioner.has_attention)

    def caption(image: Any, beam_size: float, max_len: float, alpha: float) -> tuple:
        """Caption one photo with greedy and beam search: the page's texts, the n-best table and a small JSON."""
        return caption_photo(captioner, api_names, image, beam_size, max_len, alpha, route=route, note=note)

    def caption_json_api(image: Any, beam_size: float, max_len: float, alpha: float) -> dict[str, Any]:
        """Caption one photo: greedy and beam captions with per-word log-probabilities, as one JSON object."""
        return caption_json(captioner, caption_and_score(captioner, image, beam_size, max_len, alpha, route=route),
                            model)

    def caption_page(image: Any, beam_size: float, max_len: float, alpha: float) -> tuple:
        """A new photo on the page: captioned (a refusal is the one notice); a removed photo clears all."""
        if image is None:
            return tuple(CLEARED[n] for n in first_names) + (None,)
        values, c = caption_for_page(captioner, first_names, image, beam_size, max_len, alpha, route=route)
        return values + (c,)

    def caption_button(image: Any, beam_size: float, max_len: float, alpha: float) -> tuple:
        """The button: caption again with the settings; without a photo, the notice says what to do."""
        values, c = caption_for_page(captioner, first_names, image, beam_size, max_len, alpha, route=route)
        return values + (c,)

    def later(c: Captioned | None) -> tuple:
        """What follows the captions: where they part, and where the model looked."""
        values = later_values(captioner, c, note=note)
        return tuple(values[n] for n in later_names)

    with gr.Blocks(title="Neural Storyteller", analytics_enabled=False, delete_cache=(max(1, max_age // 10), max_age)) as demo:
        gr.HTML(header_html(captioner), elem_id="header")
        with gr.Row(elem_id="main"):
            with gr.Column(scale=2, min_width=300):
                image = gr.Image(label="Photo", type="filepath", image_mode=None, elem_id="photo",
                                 sources=["upload", "webcam", "clipboard"], height=340)
                with gr.Accordion("Settings", open=False, elem_id="settings"):
                    beam = gr.Slider(*BEAM_RANGE, value=defaults["beam_size"], step=1, label="Beam width")
                    max_len = gr.Slider(*MAX_LEN_RANGE, value=defaults["max_len"], step=1,
                                        label="Max length (decoder steps, <end> included)")
                    alpha = gr.Slider(*ALPHA_RANGE, value=defaults["alpha"], step=0.1,
                                      label="Length normalisation alpha (0 = raw log-prob)")
                    button = gr.Button("Caption again with these settings", variant="primary", elem_id="caption-button")
            with gr.Column(scale=3, min_width=300):
                panels = _caption_panels(captioner.has_attention)
        examples = _examples()
        if examples:  # a strip of thumbnails; the human caption goes to the box under the captions
            gr.Examples(examples=examples, inputs=[image, panels["reference"]], visible_columns=[0], elem_id="examples",
                        label="Example photos (Flickr8k validation): tap one", examples_per_page=len(examples))
        with gr.Accordion("Model", open=False, elem_id="model-accordion"):
            gr.Markdown(model_markdown(info, getattr(captioner.model, "grid", None)), elem_id="model-info")
        # the photo captioned, for the chained event that follows within seconds (one per browser tab, about a
        # megabyte; dropped after 5 minutes, so a busy public Space does not keep every visitor's photo)
        state = gr.State(None, time_to_live=300)
        _wire(image, button, [image, beam, max_len, alpha], panels, state, (api_names, first_names, later_names),
              (caption, caption_json_api, caption_page, caption_button, later))
    demo.queue(default_concurrency_limit=DEFAULT_CONCURRENCY if concurrency is None else concurrency,
               max_size=QUEUE_SIZE)
    return demo


def _wire(image: Any, button: Any, inputs: list, panels: dict[str, Any], state: Any, names: tuple,
          handlers: tuple) -> None:
    """The events. The page: a new photo (upload, paste, webcam, example tap) clears the old captions at once,
    is captioned, the captions come into view, and then where they part and where the model looked follow
    (a chained event: the captions do not wait for them); the button re-runs with new settings. The API:
    ``/caption`` and ``/caption_json`` on a hidden trigger, refusals as errors for the caller."""
    api_names, first_names, later_names = names
    caption, caption_json_api, caption_page, caption_button, later = handlers
    first_outputs = [panels[n] for n in first_names] + [state]
    later_outputs = [panels[n] for n in later_names]
    cleared = tuple(CLEARED[n] for n in first_names) + (None,) + tuple(CLEARED[n] for n in later_names)
    progress = [panels["greedy caption"], panels["beam caption"]]  # where the captions will appear
    # One event per photo that first clears the old captions (and the old attention view), then writes the new
    # captions (a generator), and "always_last": a photo given while another is being captioned is captioned
    # next, with the latest photo, so the page never keeps the first photo's captions under the second photo.
    def clear_then(handler):
        def run(*args):
            yield cleared
            yield handler(*args) + tuple(gr.skip() for _ in later_names)
        return run

    for trigger, handler, name in ((image.change, caption_page, "caption_page"),
                                   (button.click, caption_button, "caption_button")):
        trigger(clear_then(handler), inputs=inputs, outputs=first_outputs + later_outputs, preprocess=False,
                api_visibility="undocumented", api_name=name, show_progress_on=progress, trigger_mode="always_last") \
            .then(None, js=SHOW_CAPTIONS_JS, api_visibility="private") \
            .then(later, inputs=[state], outputs=later_outputs, api_visibility="private", show_progress="hidden")
    api_trigger = gr.Button(visible=False, elem_id="api-caption")
    api_trigger.click(caption, inputs=inputs, outputs=[panels[n] for n in api_names], api_name="caption",
                      preprocess=False)
    api_json = gr.JSON(visible=False, label="caption")
    api_trigger.click(caption_json_api, inputs=inputs, outputs=[api_json], api_name="caption_json", preprocess=False)
    # a photo of the visitor's own has no human caption: the box goes; an example tap fills and shows it
    gr.on([image.upload, image.clear], lambda: gr.update(value="", visible=False), outputs=[panels["reference"]],
          api_visibility="private", queue=False)
    panels["reference"].change(lambda text: gr.update(visible=bool(text)), inputs=[panels["reference"]],
                               outputs=[panels["reference"]], api_visibility="private", queue=False)


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Neural Storyteller web app.")
    p.add_argument("--model", default=None,
                   help=f"local model folder or Hub repo id (default: $STORYTELLER_MODEL, else the Space's {SPACE_MODEL_FILE}, "
                        "else models/flickr8k-lite0-ensemble)")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to bind (default 127.0.0.1; a Space sets GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                   help="requests handled at once (default 8, or $STORYTELLER_CONCURRENCY); with --batch > 1 they "
                        "wait for one batch worker")
    p.add_argument("--batch", type=int, default=DEFAULT_MAX_BATCH,
                   help="most photos of concurrent requests captioned together (default 8, or $STORYTELLER_MAX_BATCH; "
                        "1: each request on its own, as before)")
    p.add_argument("--upload-max-age", type=int, default=upload_max_age(),
                   help="seconds an uploaded photo is kept before it is deleted (default 600, or "
                        "$STORYTELLER_UPLOAD_MAX_AGE)")
    p.add_argument("--sessions", type=int, default=DEFAULT_SESSIONS,
                   help="browser sessions whose last page Gradio keeps in memory, the most recent (default 500, or "
                        "$STORYTELLER_SESSIONS; about 0.3 MB each)")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "int8"],
                   help="how the decoder computes on a CPU (default: $STORYTELLER_PRECISION, else auto: a fixed "
                        "rule by what the CPU supports, the same as the CLI's)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("STORYTELLER_THREADS", "0")),
                   help="PyTorch threads (default: the CPUs but one for the batch worker; without batching CPUs / "
                        "concurrency; at least 1; or $STORYTELLER_THREADS)")
    args = p.parse_args(argv)
    if args.concurrency < 1:
        p.error("--concurrency must be >= 1")
    if args.batch < 1:
        p.error("--batch must be >= 1")
    if args.sessions < 1:
        p.error("--sessions must be >= 1")
    # one batch worker runs the model: it gets every core but one, which is left to the server (uploads, decoding,
    # rendering; on 2 cores one thread also runs the tiny decoder steps faster than two: docs/benchmarks.md);
    # without it, concurrent requests share the cores
    args.threads = args.threads if args.threads > 0 else (
        max(1, CPUS - 1) if args.batch > 1 else max(1, CPUS // args.concurrency))
    return args


def launch_options(args: argparse.Namespace) -> dict[str, Any]:
    """``demo.launch`` arguments from the command line: address, upload limit, page style and how many browser
    sessions' pages Gradio keeps (``--sessions``, DEFAULT_SESSIONS)."""
    return {"server_name": args.host, "server_port": args.port, "max_file_size": UPLOAD_LIMIT, "css": CSS,
            "state_session_capacity": args.sessions}


def space_model(folder: Path = HERE) -> tuple[str, str | None] | None:
    """The Space's model reference from ``folder/space_model.txt``: (repo id or folder, revision or None);
    None without the file. The first line that is not blank or a ``#`` comment: ``user/model@commit``,
    ``user/model`` or a folder inside the Space (``models/name``).

    Args:
        folder: where app.py lives.
    """
    try:
        lines = (folder / SPACE_MODEL_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    ref = next((line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")), "")
    if not ref:
        return None
    name, _, revision = ref.partition("@")
    if (folder / name).is_dir():  # a model bundled in the Space (hub_upload.py --bundle)
        return str(folder / name), None
    return name, revision or None


def model_to_serve(model: str | None, revision: str | None) -> tuple[str | None, str | None]:
    """Which model the app serves: ``--model``; else ``$STORYTELLER_MODEL`` (left to ``load``); else the
    Space's reference; else the bundled default (``load`` again)."""
    from storyteller.captioner import MODEL_ENV_VAR

    if model or os.environ.get(MODEL_ENV_VAR, "").strip():
        return model, revision
    return space_model() or (None, revision)


def _load_or_exit(name: str | None, revision: str | None, precision: str | None = None) -> Captioner:
    name, revision = model_to_serve(name, revision)
    at = f" at revision {revision}" if revision else ""
    # a repo id, not a folder here (a path written as one, e.g. ./missing, is a folder that is not there)
    hub = name is not None and is_hub_id(name)
    startup_log.info("loading the model %s%s%s ...", name or "(the default)", at,
                     " (from the Hub cache, downloaded first if needed)" if hub else "")
    t = time.perf_counter()
    try:
        # ZeroGPU: the model goes to CUDA at start-up (ZeroGPU allows it outside @spaces.GPU) and runs in fp32
        captioner = load(name, revision=revision, precision=precision, device="cuda" if ZERO_GPU else "cpu")
    except ModelLoadError as e:  # one clear line instead of a traceback
        print(f"app.py: cannot start: {e}", file=sys.stderr)  # the weights too: LFS pointer, truncated, corrupt
        raise SystemExit(1) from None
    if not ZERO_GPU:  # on ZeroGPU there is no GPU outside a visitor's request to warm up on
        captioner.warmup()
    startup_log.info("model ready in %.1f s: %s (%s, %s)", time.perf_counter() - t, captioner.info["model_name"],
                     captioner.info["decoder"], captioner.precision)
    return captioner


# One line per refused request (no traceback) and a traceback for real failures, on stderr.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
log.setLevel(logging.INFO)
if not startup_log.handlers:
    _out = logging.StreamHandler(sys.stdout)
    _out.setFormatter(logging.Formatter(LOG_FORMAT))
    startup_log.addHandler(_out)
    startup_log.propagate = False
ARGS = _parse_args(sys.argv[1:] if __name__ == "__main__" else [])
# Concurrent requests each get their share of the cores: on a small CPU, tiny decoder steps run
# faster on one thread than split across two that the other request also wants (bench/bench_app.py).
torch.set_num_threads(ARGS.threads)
captioner = _load_or_exit(ARGS.model, ARGS.revision, ARGS.precision)
demo = build_demo(captioner, concurrency=ARGS.concurrency, max_age=ARGS.upload_max_age, max_batch=ARGS.batch)

if __name__ == "__main__":
    demo.launch(**launch_options(ARGS))
