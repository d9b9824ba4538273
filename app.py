"""Neural Storyteller web app (Gradio): upload, paste or snap a photo, get greedy and beam-search captions.

    python app.py [--model M] [--revision R] [--host 127.0.0.1] [--port 7860] [--concurrency N] [--threads T]
    STORYTELLER_MODEL=user/model gradio app.py      # reload mode; the env var picks the model

Which model, first match wins: ``--model`` (with ``--revision``); ``$STORYTELLER_MODEL``; the Space's model
reference in ``space_model.txt`` (one line, ``user/model@commit``, written by ``hub_upload.py --space-id``:
the Space downloads that model from the Hub at start-up, through the Hub cache); the bundled
``models/flickr8k-lite0-ensemble/``. It is loaded once at start-up; the handlers are pure functions of their inputs.

The page is phone first: a photo is captioned as soon as it arrives (upload, paste, webcam, example tap)
and both captions come into view; each word is shaded by the probability the model gave it (the value on
hover or tap); one line says when greedy and beam search agree (with beam search's runner-ups), else a
small table shows where they part and the words the model offered there. Decoding settings sit in a
closed "Settings" accordion. A refused input is one notice above cleared outputs and one log line.

API (gradio_client), beside the page's:

- ``/caption_json`` (image, beam_size, max_len, alpha; all but the image optional): one JSON object,
  ``greedy`` and ``beam`` as ``{text, words, word_log_probs, end_log_prob, log_prob, score}``, ``n_best``
  (a list of those), ``parting``, ``attention`` (attention models only), ``timings_ms``, ``warnings`` and
  ``model``. Per-word log-probabilities come from scoring each caption with the decoder in teacher-forcing
  mode (``storyteller.scoring``), on the same weights and precision as the search.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import torch

from storyteller.captioner import DECODING_DEFAULTS, Captioner, CaptionResult, ModelLoadError, load
from storyteller.decoding_settings import SLIDER_RANGES
from storyteller.card import dataset_label, ensemble_summary
from storyteller.images import MAX_BYTES, ImageError, image_warnings
from storyteller.scoring import ScoredCaption, parting_step, score_result
from storyteller.vocab import Vocabulary

HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "examples"
BEAM_RANGE, MAX_LEN_RANGE, ALPHA_RANGE = (SLIDER_RANGES[k] for k in ("beam_size", "max_len", "alpha"))
log = logging.getLogger("storyteller.app")
# Start-up progress goes to stdout, so a failed start is still one line on stderr (see _load_or_exit).
startup_log = logging.getLogger("storyteller.app.startup")
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
DEFAULT_CONCURRENCY = int(os.environ.get("STORYTELLER_CONCURRENCY", "2"))
# Requests waiting beyond those being captioned: at ~0.3 s a photo, 64 is ~10 s of work on 2 cores; a
# longer queue would only keep visitors waiting past what a browser tab sits through.
QUEUE_SIZE = 64
# The largest upload Gradio accepts: the image loader's own limit (a 200 MP phone JPEG is 30-60 MB).
UPLOAD_LIMIT = f"{MAX_BYTES // 2**20}mb"
# The Space's model reference: one line, "user/model@commit" (or a folder inside the Space), written by
# hub_upload.py --space-id; a new model version reaches the Space by changing this line.
SPACE_MODEL_FILE = "space_model.txt"
RUNNERS_UP = 2  # beam captions shown after "they agree": the next best two say what else the beam weighed
ATTENTION_PANEL = 256  # px width of each word's overlay in the attention gallery (shown at ~140 px on a desktop)


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


def model_link(info: dict[str, Any]) -> str:
    """The model's name as Markdown: a link to its Hub repo at the revision served, or a plain label."""
    name = info.get("model_name") or info["model"]
    rev = info.get("revision")
    if info.get("hub"):
        url = f"https://huggingface.co/{name}" + (f"/tree/{rev}" if rev else "")
        return f"[{name}]({url})" + (f" @ `{rev[:12]}`" if rev else "")
    return f"`{name}`" + (f" @ `{rev}`" if rev else "")


def model_markdown(info: dict[str, Any], grid: list[int] | tuple[int, int] | None = None) -> str:
    """The Model panel: which model (linked to its Hub repo and revision), backbone, decoder, and its
    recorded evaluation figures.

    Args:
        info: ``Captioner.info`` (plus ``hub``: True when the model came from a Hub repo).
        grid: an attention model's feature grid (h, w), if known.
    """
    if info.get("has_attention") or info.get("decoder") == "show_attend_tell":
        where = f"a {grid[0]}x{grid[1]} grid" if grid else "a grid"
        features = f"{where} of {info.get('feature_dim')}-d features, looked over for every word"
    else:
        features = f"one {info.get('feature_dim')}-d pooled feature vector"
    lines = [f"**Model**: {model_link(info)}",  # a label or a Hub link, never the server's folders
             f"**Backbone**: `{info.get('backbone')}`: {features} (ImageNet weights "
             f"`{str(info.get('backbone_weights')).split(':')[-1]}`)",
             f"**Decoder**: {decoder_markdown(info)}, {info.get('vocab_size')} tokens"]
    if info.get("precision"):
        lines.append(f"**Decoder weights**: {info['precision']}")
    if info.get("dataset"):  # its name or Hub id: never the training machine's path
        lines.append(f"**Trained on**: {dataset_label(info['dataset'])[0]}")
    return "  \n".join(lines) + "\n\n" + scores_markdown(info)


def decoder_markdown(info: dict[str, Any]) -> str:
    """The decoder in a few words: its LSTM's sizes, or an ensemble's members and how they are joined."""
    def one(d: dict[str, Any]) -> str:
        kind = "Show-Attend-Tell" if d.get("decoder") == "show_attend_tell" else "Show-and-Tell"
        return f"{kind} LSTM {d.get('num_layers')} x {d.get('hidden_dim')}, embeddings {d.get('embed_dim')}"

    if info.get("members"):
        weights = info.get("weights")  # None: equal shares
        mean = f"the mean of their next-word probabilities, weighted {', '.join(f'{w:g}' for w in weights)}" \
            if weights and len(set(weights)) > 1 else "the mean of their next-word probabilities"
        return f"an ensemble of {len(info['members'])} ({'; '.join(one(d) for d in info['members'])}), {mean}"
    return one(info)


def scores_markdown(info: dict[str, Any]) -> str:
    """The model's recorded figures: one small table per dataset and split (decoding, BLEU-1, BLEU-4, CIDEr-D),
    narrow enough for a phone; else the figures recorded during training; else a line saying there are none."""
    cols = [("bleu1", "BLEU-1"), ("bleu4", "BLEU-4"), ("cider", "CIDEr-D")]
    tables: dict[str, list[list[Any]]] = {}
    for ev in info.get("evaluations") or []:
        where = f"{ev.get('dataset_name', '')} {ev.get('split', '')}".strip()
        for method, m in (ev.get("methods") or {}).items():
            tables.setdefault(where, []).append([method] + [m.get(k) for k, _ in cols])
    metrics = info.get("metrics") or {}
    if not tables and any(metrics.get(k) is not None for k, _ in cols):
        tables[f"{metrics.get('split', 'validation')} (during training)"] = [
            [metrics.get("decoding", "greedy")] + [metrics.get(k) for k, _ in cols]]
    if not tables:
        return "No evaluation figures recorded for this model."
    out = []
    for where, rows in tables.items():
        body = ["| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v)) for v in r) + " |"
                for r in rows]
        out.append(f"**Scores on {where}**\n\n| decoding | " + " | ".join(label for _, label in cols) + " |\n"
                   + "|---" * (len(cols) + 1) + "|\n" + "\n".join(body))
    return "\n\n".join(out)


def _examples() -> list[list[str]]:
    """Rows ``[photo path, its first human caption]`` from examples/ and examples/captions.json."""
    try:
        captions = json.loads((EXAMPLES_DIR / "captions.json").read_text(encoding="utf-8")).get("captions", {})
    except (OSError, ValueError):
        captions = {}
    files = sorted(EXAMPLES_DIR.glob("*.jpg")) if EXAMPLES_DIR.is_dir() else []
    return [[str(p), (captions.get(p.name) or [""])[0].strip().rstrip(" .")] for p in files]


def notice_html(kind: str, title: str, message: str) -> str:
    """The one message box above the captions (an error, or a warning about the photo).

    Args:
        kind: ``"error"`` or ``"warning"``.
        title: a few words in bold.
        message: the sentence(s); HTML-escaped here.
    """
    return (f'<div class="notice notice-{kind}" role="{"alert" if kind == "error" else "status"}">'
            f"<strong>{html.escape(title)}</strong> {html.escape(message)}</div>")


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
@dataclass
class Captioned:
    """One photo's captions: the searches' result, every caption scored word by word, and the settings."""

    photo: Any  # the decoded photo (PIL), drawn on by the attention view
    result: CaptionResult
    scored: list[ScoredCaption]  # [greedy, beam 1, ..., beam n]
    beam_size: int
    max_len: int
    alpha: float

    @property
    def timings(self) -> dict[str, float]:
        return self.result.timings_ms


def caption_and_score(captioner: Captioner, image: Any, beam_size: Any, max_len: Any, alpha: Any) -> Captioned:
    """Check the inputs, decode the photo once, caption it (greedy and beam search, all ``beam_size`` beam
    hypotheses kept) and score every caption word by word on the same features.

    Args:
        captioner: the loaded model.
        image: the raw Image payload (FileData dict, path, or None).
        beam_size: beam width (BEAM_RANGE, a whole number).
        max_len: most decoder steps, ``<end>`` included (MAX_LEN_RANGE, a whole number).
        alpha: length-normalisation exponent (ALPHA_RANGE).

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
    except ImageError as e:
        raise refuse(f"Cannot caption this file: {e}", "Not a usable image") from None
    timings: dict[str, float] = {}
    features = captioner.features([photo], timings=timings)
    # preprocessing: our decode, plus the resize and normalise inside features(); the total so far
    timings["preprocess"] = (time.perf_counter() - t0) * 1e3 - timings["backbone"]
    timings["total"] = timings["preprocess"] + timings["backbone"]
    result = captioner.caption_features(features, beam_size=k, max_len=n, alpha=a, n_best=k,
                                        warnings=[image_warnings(photo)], timings=timings)[0]
    t1 = time.perf_counter()
    scored = score_result(captioner, features, result, max_len=n)
    result.timings_ms["scoring"] = (time.perf_counter() - t1) * 1e3
    result.timings_ms["total"] += result.timings_ms["scoring"]
    return Captioned(photo, result, scored, k, n, a)


# -- what the API returns ---------------------------------------------------------------------------
def _word(vocab: Vocabulary, token: int | None) -> str | None:
    """A token as shown: the word, ``(end)`` for <end>, None past a cut caption's end."""
    if token is None:
        return None
    return "(end)" if token == Vocabulary.end_id else vocab.itos[token]


def _step_log_prob(s: ScoredCaption, step: int) -> float | None:
    """The log-probability of what caption ``s`` emitted at ``step`` (a word or <end>)."""
    return s.word_log_probs[step] if step < len(s.tokens) else s.end_log_prob


def caption_entry(vocab: Vocabulary, caption: Any, scored: ScoredCaption) -> dict[str, Any]:
    """One caption for the JSON API: its text and words, each word's log-probability, <end>'s (None when
    cut at max_len), the search's log_prob (the sum of those parts) and score.

    Args:
        vocab: the model's vocabulary.
        caption: a ``storyteller.decoding.Caption``.
        scored: the same caption scored word by word.
    """
    return {"text": caption.text, "words": [vocab.itos[t] for t in caption.tokens],
            "word_log_probs": [round(lp, 5) for lp in scored.word_log_probs],
            "end_log_prob": None if scored.end_log_prob is None else round(scored.end_log_prob, 5),
            "log_prob": round(caption.log_prob, 5), "score": round(caption.score, 5)}


def parting_record(vocab: Vocabulary, c: Captioned) -> dict[str, Any] | None:
    """Where greedy and beam search's best caption part: the step, the words they share, and for each
    search its word there and the top next words the model offered there; None when they agree."""
    greedy, beam = c.scored[0], c.scored[1]
    t = parting_step(greedy, beam)
    if t is None:
        return None

    def side(s: ScoredCaption) -> dict[str, Any]:
        lp = _step_log_prob(s, t)
        return {"word": _word(vocab, s.token_at(t)), "log_prob": None if lp is None else round(lp, 5),
                "top": [{"word": _word(vocab, tok), "log_prob": round(v, 5)} for tok, v in (s.top[t] if t < len(s.top) else [])]}

    return {"step": t, "shared": [vocab.itos[tok] for tok in greedy.tokens[:t]], "greedy": side(greedy), "beam": side(beam)}


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


# -- what the page shows ------------------------------------------------------------------------------
def _percent(p: float) -> str:
    return f"{100 * p:.1f}%" if p >= 0.001 else f"{100 * p:.2g}%"


def _chip(word: str, log_prob: float, kind: str = "w") -> str:
    """One word shaded by its probability (``--p``), the value on hover (title) and on tap (focus shows it)."""
    p = math.exp(log_prob)
    return (f'<span class="{kind}" tabindex="0" style="--p:{p:.3f}" data-p="{_percent(p)}" '
            f'title="probability {p:.4f} (log-probability {log_prob:.3f})">{html.escape(word)}</span>')


def words_html(vocab: Vocabulary, s: ScoredCaption, label: str) -> str:
    """A caption's words, each shaded by the probability the model gave it, then <end>'s (or "cut").

    Args:
        vocab: the model's vocabulary.
        s: the caption scored word by word.
        label: the search's name, for screen readers.
    """
    chips = [_chip(vocab.itos[t], lp) for t, lp in zip(s.tokens, s.word_log_probs)]
    chips.append(_chip("(end)", s.end_log_prob, "w end") if s.end_log_prob is not None
                 else '<span class="cut">(cut at max length)</span>')
    return (f'<div class="words" role="group" aria-label="{html.escape(label)}, word by word, shaded by probability">'
            + " ".join(chips) + "</div>")


def nbest_html(captions: list[Any]) -> str:
    """The n-best beam hypotheses as a small table: rank, the whole caption, log-probability, score.

    Args:
        captions: ``CaptionResult.beam`` (best first).
    """
    rows = "".join(f'<tr><td class="num">{i + 1}</td><td class="text">{html.escape(c.text)}</td>'
                   f'<td class="num">{c.log_prob:.3f}</td><td class="num">{c.score:.3f}</td></tr>'
                   for i, c in enumerate(captions))
    return ('<table class="nbest"><thead><tr><th class="num">#</th><th class="text">caption</th>'
            '<th class="num">log-prob</th><th class="num">score</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>")


def agree_html(c: Captioned) -> str:
    """The one line for captions that agree, with beam search's runner-ups."""
    others = c.result.beam[1:1 + RUNNERS_UP]
    if not others:
        return '<div class="agree" id="agree">Greedy and beam search agree (a beam of width 1 is greedy search).</div>'
    runners = "; ".join(f"“{html.escape(o.text)}” (log-prob {o.log_prob:.2f})" for o in others)
    label = "runner-up" if len(others) == 1 else "runners-up"
    return (f'<div class="agree" id="agree"><strong>Greedy and beam search agree.</strong> '
            f'Beam search\'s {label}: <span class="runners">{runners}</span>.</div>')


def parting_html(vocab: Vocabulary, c: Captioned) -> str:
    """Where the two captions part: the words they share, then the model's top next words there, with
    the word each search took (see :func:`parting_record`)."""
    part = parting_record(vocab, c)
    g, b = part["greedy"], part["beam"]
    shared = f"both write “{html.escape(' '.join(part['shared']))}”, then" if part["shared"] else "from the first word"
    rows: dict[str, float] = {}
    for side in (g, b):  # each search's top next words (the same prefix: the same distribution), and its pick
        for alt in side["top"] + ([{"word": side["word"], "log_prob": side["log_prob"]}] if side["word"] else []):
            rows.setdefault(alt["word"], alt["log_prob"])
    body = []
    for w, lp in sorted(rows.items(), key=lambda kv: -kv[1]):
        takers = [name for name, side in (("greedy", g), ("beam search", b)) if side["word"] == w]
        body.append(f'<tr{" class=taken" if takers else ""}><td>{html.escape(w)}</td>'
                    f'<td class="num">{_percent(math.exp(lp))}</td><td>{", ".join(takers)}</td></tr>')
    best, greedy = c.result.beam[0], c.result.greedy
    return (f'<div class="parting" id="parting" data-step="{part["step"]}"><p><strong>Where they part</strong> '
            f'(word {part["step"] + 1}): {shared} greedy takes “{html.escape(str(g["word"]))}” and beam search '
            f'“{html.escape(str(b["word"]))}”. The model\'s top next words there:</p>'
            '<table class="parting-table"><thead><tr><th>next word</th><th class="num">probability</th>'
            f'<th>taken by</th></tr></thead><tbody>{"".join(body)}</tbody></table>'
            f'<p class="why">Greedy takes the likeliest word at every step; beam search keeps the {c.beam_size} best '
            f'captions so far and returns the best whole caption: log-prob {best.log_prob:.2f} (score '
            f'{best.score:.2f}) against greedy\'s {greedy.log_prob:.2f}.</p></div>')


def changed_html(vocab: Vocabulary, c: Captioned) -> str:
    """What beam search changed: the agree line, or where the captions part."""
    return agree_html(c) if parting_step(c.scored[0], c.scored[1]) is None else parting_html(vocab, c)


def attention_gallery(captioner: Captioner, photo: Any, caption: Any) -> list[tuple[Any, str]] | None:
    """The beam caption's attention view: one (overlay, word) per word; None for a pooled model.

    Args:
        captioner: the loaded model.
        photo: the decoded photo (PIL) the caption is of.
        caption: the beam caption (with its per-word attention maps).
    """
    if caption.attention is None:
        return None
    from storyteller.heatmap import PhotoOverlay, fit_photo

    small = fit_photo(photo, ATTENTION_PANEL)  # at most ATTENTION_PANEL wide and twice that tall
    draw_map = PhotoOverlay(small, captioner.backbone.spec["preprocessing"])  # the photo prepared once
    words = [captioner.model.vocab.itos[t] for t in caption.tokens]
    return [(draw_map(m), w) for w, m in zip(words, caption.attention)]


# The outputs by name. /caption returns API_OUTPUTS (no attention gallery for a pooled model: it has
# none to show); the page also fills PAGE_OUTPUTS. Cleared: what every output shows before a caption.
API_OUTPUTS = ("greedy caption", "greedy figures", "beam caption", "beam figures", "n-best list", "timings",
               "notice", "result", "attention")
PAGE_OUTPUTS = ("greedy words", "beam words", "what beam search changed")
CLEARED = {name: None if name in ("result", "attention") else "" for name in API_OUTPUTS + PAGE_OUTPUTS}


def page_values(captioner: Captioner, c: Captioned) -> dict[str, Any]:
    """Every output's value for one captioned photo, by name (API_OUTPUTS + PAGE_OUTPUTS)."""
    vocab, r, t = captioner.model.vocab, c.result, c.timings
    # greedy and beam search run in one pass (one decoder call per step for both), so they share its time
    search_ms = t["preprocess"] + t["backbone"] + t["search"]
    best = r.beam[0]
    timing = (f"Image encoding, shared by both: preprocessing **{t['preprocess']:.0f} ms** + backbone "
              f"`{captioner.backbone.spec.get('name')}` **{t['backbone']:.0f} ms**; greedy and beam search ({c.beam_size} beams) "
              f"in one pass **{t['search']:.0f} ms**; word-by-word scoring **{t['scoring']:.0f} ms**; "
              f"total **{t['total']:.0f} ms**.")
    result = {"greedy": {"caption": r.greedy.text, "log_prob": round(r.greedy.log_prob, 4), "ms": round(search_ms, 1)},
              "beam": [{"caption": b.text, "log_prob": round(b.log_prob, 4), "score": round(b.score, 4)} for b in r.beam],
              "beam_size": c.beam_size, "beam_ms": round(search_ms, 1),
              "timings_ms": {k: round(v, 1) for k, v in t.items()}, "warnings": list(r.warnings)}
    return {"greedy caption": r.greedy.text,
            "greedy figures": f"log-probability **{r.greedy.log_prob:.3f}** · **{search_ms:.0f} ms**",
            "beam caption": best.text,
            "beam figures": f"log-probability **{best.log_prob:.3f}** · score **{best.score:.3f}** · **{search_ms:.0f} ms**",
            "n-best list": nbest_html(r.beam), "timings": timing,
            "notice": notice_html("warning", "Odd photo.", " ".join(r.warnings)) if r.warnings else "",
            "result": result, "attention": attention_gallery(captioner, c.photo, best),
            "greedy words": words_html(vocab, c.scored[0], "Greedy"),
            "beam words": words_html(vocab, c.scored[1], "Beam search"),
            "what beam search changed": changed_html(vocab, c)}


def caption_photo(captioner: Captioner, names: tuple[str, ...], *inputs: Any) -> tuple:
    """Caption one photo for the API; returns the outputs ``names`` in order.

    Args:
        captioner: the loaded model.
        names: output names (API_OUTPUTS and PAGE_OUTPUTS entries).
        inputs: image, beam width, max length, alpha.

    Raises:
        gr.Error: no photo, not a usable image, or a setting out of range (logged in one line).
    """
    values = page_values(captioner, caption_and_score(captioner, *inputs))
    return tuple(values[n] for n in names)


def caption_for_page(captioner: Captioner, names: tuple[str, ...], *inputs: Any) -> tuple:
    """:func:`caption_photo` for the page: a refusal becomes the one notice above cleared outputs (no error
    state on every output); an unexpected failure is logged with its traceback and shown the same way.

    Args:
        captioner: the loaded model.
        names: output names, in order.
        inputs: image, beam width, max length, alpha.
    """
    try:
        return caption_photo(captioner, names, *inputs)
    except gr.Error as e:
        notice = notice_html("error", f"{e.title}:" if e.title else "Error:", str(e.message))
    except Exception:  # a bug, not the user's fault: keep the traceback for the log
        log.exception("caption failed")
        notice = notice_html("error", "Something went wrong:", "the server could not caption this photo. Try another one.")
    return tuple(notice if n == "notice" else CLEARED[n] for n in names)


CSS = """
#header h1 { margin: 0 0 0.2rem; font-size: 1.6rem; }
#header p { margin: 0; }
#header .html-container, #notice .html-container, #beam-changed .html-container { padding: 0; }
#notice:has(.prose:empty), #beam-changed:has(.prose:empty) { display: none; }
#captions .caption textarea { font-size: 1.3rem; line-height: 1.45; font-weight: 500; }
#captions { align-items: flex-start; gap: 0.5rem; }
#captions > .column { justify-content: flex-start; gap: 0.25rem; }
#captions > .column > * { flex-grow: 0; }
.words { line-height: 2; overflow-wrap: anywhere; }
.words .w { --p: 0; background: rgba(234, 88, 12, calc(0.06 + 0.6 * var(--p))); border-radius: 4px;
            padding: 0.05rem 0.3rem; cursor: help; white-space: nowrap; }
.words .w:focus, .words .w:hover { outline: 2px solid #ea580c; outline-offset: 1px; }
.words .w:focus::after, .words .w:hover::after { content: " " attr(data-p); font-size: 0.8em; font-weight: 600; }
.words .end { font-size: 0.85em; font-style: italic; }
.words .cut { font-size: 0.85em; font-style: italic; opacity: 0.7; }
.agree, .parting { padding: 0.5rem 0.8rem; border-radius: 8px; background: var(--background-fill-secondary); }
.parting p { margin: 0.2rem 0; }
table.parting-table { border-collapse: collapse; margin: 0.3rem 0; }
table.parting-table th, table.parting-table td { padding: 0.15rem 0.6rem 0.15rem 0; text-align: left; }
table.parting-table tr.taken td { font-weight: 700; }
.notice { padding: 0.6rem 0.9rem; border-radius: 8px; margin: 0.2rem 0; }
.notice-error { background: #fdecec; border-left: 4px solid #d32f2f; color: #7f1d1d; }
.notice-warning { background: #fff7e0; border-left: 4px solid #e0a100; color: #5c4300; }
table.nbest { width: 100%; border-collapse: collapse; font-family: inherit; table-layout: auto; }
table.nbest th, table.nbest td { padding: 0.3rem 0.5rem; border-bottom: 1px solid var(--border-color-primary); }
table.nbest td.text { white-space: normal; overflow-wrap: anywhere; width: 100%; }
.num { white-space: nowrap; text-align: right; font-variant-numeric: tabular-nums; }
#model-info table { table-layout: auto; width: auto; max-width: 100%; }
#model-info th, #model-info td { overflow-wrap: normal !important; word-break: normal !important; hyphens: none;
                                 padding: 0.2rem 0.4rem; }
#model-info td:nth-child(n+3), #model-info th:nth-child(n+3) { white-space: nowrap; text-align: right; }
#model-info code { overflow-wrap: anywhere; }
#examples { max-width: 100%; overflow-x: hidden; }
#examples .gallery-item .container.gallery { width: 4.5rem; max-width: 4.5rem; height: 4.5rem; overflow: hidden;
                                             border-radius: 6px; }
#examples .gallery-item img { object-fit: cover; }
/* the attention view: every word of a caption of up to 20 words in view, no inner scroll, no clipped column */
#attention .grid-wrap { height: auto !important; min-height: 0 !important; max-height: none !important;
                        overflow: visible !important; }
#attention .grid-container { grid-template-columns: repeat(auto-fill, minmax(7.5rem, 1fr)) !important; }
@media (max-width: 640px) {
  #header h1 { font-size: 1.3rem; }
  #header p { font-size: 0.85rem; line-height: 1.3; }
  #header p.how { display: none; }
  #photo { height: 240px !important; }
  #captions .caption textarea { font-size: 1.2rem; }
  #attention .grid-container { grid-template-columns: repeat(3, minmax(0, 1fr)) !important; }
  #model-info { font-size: 0.85rem; }
  #examples .gallery-item .container.gallery { width: 3.5rem; max-width: 3.5rem; height: 3.5rem; }
}
"""
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
    """The right-hand column: notice, the two captions with their words and figures, what beam search
    changed, the human caption, the n-best list, the attention view and the timings. Returns the
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
    out["reference"] = gr.Textbox(label="Human caption (example photos)", interactive=False, lines=1, max_lines=4,
                                  elem_id="reference")
    with gr.Accordion("n-best list (beam search)", open=False, elem_id="nbest-accordion"):
        out["n-best list"] = gr.HTML(elem_id="nbest", label="n-best list")
    if has_attention:  # where the model looked for each word of the beam caption (pooled models have no such view)
        out["attention"] = gr.Gallery(label="Where it looked: the beam caption, word by word", columns=5, format="jpeg",
                                      height="auto", object_fit="contain", elem_id="attention", show_label=True,
                                      preview=False, allow_preview=False)
    out["timings"] = gr.Markdown(elem_id="timing", label="timings")
    out["result"] = gr.JSON(visible=False, label="result")
    return out


def build_demo(captioner: Captioner, concurrency: int = DEFAULT_CONCURRENCY, max_age: int | None = None) -> gr.Blocks:
    """The Gradio Blocks app around one loaded captioner.

    Args:
        captioner: the model to serve (see ``storyteller.captioner.load``).
        concurrency: requests captioned at the same time (the queue holds QUEUE_SIZE more).
        max_age: seconds after which uploaded files are deleted (checked every tenth of that, at
            least every second); None: :func:`upload_max_age`.
    """
    info = {**captioner.info, "hub": not Path(captioner.source).expanduser().exists()}
    model = model_summary(captioner, info)
    defaults = slider_defaults(captioner.decoding)
    max_age = upload_max_age() if max_age is None else max(1, int(max_age))
    api_names = tuple(n for n in API_OUTPUTS if n != "attention" or captioner.has_attention)
    page_names = api_names + PAGE_OUTPUTS

    def caption(image: Any, beam_size: float, max_len: float, alpha: float) -> tuple:
        """Caption one photo with greedy and beam search: the page's texts, the n-best table and a small JSON."""
        return caption_photo(captioner, api_names, image, beam_size, max_len, alpha)

    def caption_json_api(image: Any, beam_size: float, max_len: float, alpha: float) -> dict[str, Any]:
        """Caption one photo: greedy and beam captions with per-word log-probabilities, as one JSON object."""
        return caption_json(captioner, caption_and_score(captioner, image, beam_size, max_len, alpha), model)

    def caption_page(image: Any, beam_size: float, max_len: float, alpha: float) -> tuple:
        """A new photo on the page: captioned (a refusal is the one notice); a removed photo clears all."""
        if image is None:
            return tuple(CLEARED[n] for n in page_names)
        return caption_for_page(captioner, page_names, image, beam_size, max_len, alpha)

    def caption_button(image: Any, beam_size: float, max_len: float, alpha: float) -> tuple:
        """The button: caption again with the settings; without a photo, the notice says what to do."""
        return caption_for_page(captioner, page_names, image, beam_size, max_len, alpha)

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
        _wire(image, button, [image, beam, max_len, alpha], panels, api_names, page_names,
              (caption, caption_json_api, caption_page, caption_button))
    demo.queue(default_concurrency_limit=concurrency, max_size=QUEUE_SIZE)
    return demo


def _wire(image: Any, button: Any, inputs: list, panels: dict[str, Any], api_names: tuple[str, ...],
          page_names: tuple[str, ...], handlers: tuple) -> None:
    """The events. The page: a new photo (upload, paste, webcam, example tap) clears the old captions at once,
    is captioned, and the captions come into view; the button re-runs with new settings. The API:
    ``/caption`` and ``/caption_json`` on a hidden trigger, refusals as errors for the caller."""
    caption, caption_json_api, caption_page, caption_button = handlers
    page_outputs = [panels[n] for n in page_names]
    cleared = tuple(CLEARED[n] for n in page_names)
    progress = [panels["greedy caption"], panels["beam caption"]]  # where the captions will appear
    # One event per photo that first clears the old captions, then writes the new ones (a generator), and
    # "always_last": a photo given while another is being captioned is captioned next, with the latest photo,
    # so the page never keeps the first photo's captions under the second photo.
    def clear_then(handler):
        def run(*args):
            yield cleared
            yield handler(*args)
        return run

    for trigger, handler in ((image.change, caption_page), (button.click, caption_button)):
        trigger(clear_then(handler), inputs=inputs, outputs=page_outputs, preprocess=False, api_visibility="private",
                show_progress_on=progress, trigger_mode="always_last") \
            .then(None, js=SHOW_CAPTIONS_JS, api_visibility="private")
    api_trigger = gr.Button(visible=False, elem_id="api-caption")
    api_trigger.click(caption, inputs=inputs, outputs=[panels[n] for n in api_names], api_name="caption",
                      preprocess=False)
    api_json = gr.JSON(visible=False, label="caption")
    api_trigger.click(caption_json_api, inputs=inputs, outputs=[api_json], api_name="caption_json", preprocess=False)
    # a photo of the user's own has no human caption
    gr.on([image.upload, image.clear], lambda: "", outputs=[panels["reference"]], api_visibility="private", queue=False)


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
                   help="requests captioned at once (default 2, or $STORYTELLER_CONCURRENCY)")
    p.add_argument("--upload-max-age", type=int, default=upload_max_age(),
                   help="seconds an uploaded photo is kept before it is deleted (default 600, or "
                        "$STORYTELLER_UPLOAD_MAX_AGE)")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "int8"],
                   help="how the decoder computes on a CPU (default: $STORYTELLER_PRECISION, else auto: a fixed "
                        "rule by what the CPU supports, the same as the CLI's)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("STORYTELLER_THREADS", "0")),
                   help="PyTorch threads (default: CPUs / concurrency, at least 1; or $STORYTELLER_THREADS)")
    args = p.parse_args(argv)
    if args.concurrency < 1:
        p.error("--concurrency must be >= 1")
    args.threads = args.threads if args.threads > 0 else max(1, CPUS // args.concurrency)
    return args


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
    hub = name is not None and not Path(name).expanduser().exists()  # a repo id, not a folder here
    startup_log.info("loading the model %s%s%s ...", name or "(the default)", at,
                     " (from the Hub cache, downloaded first if needed)" if hub else "")
    t = time.perf_counter()
    try:
        captioner = load(name, revision=revision, precision=precision)
    except ModelLoadError as e:  # one clear line instead of a traceback
        print(f"app.py: cannot start: {e}", file=sys.stderr)  # the weights too: LFS pointer, truncated, corrupt
        raise SystemExit(1) from None
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
demo = build_demo(captioner, concurrency=ARGS.concurrency, max_age=ARGS.upload_max_age)

if __name__ == "__main__":
    demo.launch(server_name=ARGS.host, server_port=ARGS.port, max_file_size=UPLOAD_LIMIT, css=CSS)
