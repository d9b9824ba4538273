"""What the app shows, as plain HTML / Markdown strings: word shading, confidence badges, tables, the
attention view, notices and the Model panel. No Gradio here: tests call these without a server.

    words_html(vocab, caption, "Greedy", caption)   # a caption's words shaded by probability, its badge
    confidence_html(caption)                # its plain-words badge ("" when the model has no calibrator)
    attention_html(photo, words, maps, preprocessing, note)   # the photo once, a heat layer per word

Every number shown on the page is also in the element's ``title`` (hover) and in a form a tap opens
(focus, or ``<details>``), since phones have no hover.
"""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from typing import Any

from .card import dataset_label
from .confidence import MEANING, badge
from .scoring import ScoredCaption, parting_step
from .vocab import Vocabulary

RUNNERS_UP = 2  # beam captions shown after "they agree": the next best two say what else the beam weighed
ATTENTION_PHOTO = 480  # px width the attention view's photo is encoded at, once (enlarged to <= 720 px on screen)
HEAT_WIDTH = 48  # px width of each word's heat layer; the browser scales it smoothly over the photo


@dataclass
class Captioned:
    """One photo's captions: the searches' result, the captions scored word by word (maybe later, on ``features``),
    and the settings."""

    photo: Any  # the decoded photo (PIL), drawn on by the attention view
    result: Any  # storyteller.captioner.CaptionResult
    scored: list[ScoredCaption]  # [greedy, beam 1, ..., beam n] (greedy and beam 1 only, or none yet: the page)
    beam_size: int
    max_len: int
    alpha: float
    features: Any = None  # the photo's features (1, ...), kept to score its captions after they are shown

    @property
    def timings(self) -> dict[str, float]:
        return self.result.timings_ms


# -- small pieces ------------------------------------------------------------------------------------------
def percent(p: float) -> str:
    """A probability as a percentage: one decimal, or two significant digits under 0.1%."""
    return f"{100 * p:.1f}%" if p >= 0.001 else f"{100 * p:.2g}%"


def notice_html(kind: str, title: str, message: str) -> str:
    """The one message box above the captions (an error, or a warning about the photo).

    Args:
        kind: ``"error"`` or ``"warning"``.
        title: a few words in bold.
        message: the sentence(s); HTML-escaped here.
    """
    return (f'<div class="notice notice-{kind}" role="{"alert" if kind == "error" else "status"}">'
            f"<strong>{html.escape(title)}</strong> {html.escape(message)}</div>")


def _chip(word: str, log_prob: float, kind: str = "w") -> str:
    """One word shaded by its probability (``--p``), the value on hover (title) and on tap (focus shows it)."""
    p = math.exp(log_prob)
    return (f'<span class="{kind}" tabindex="0" style="--p:{p:.3f}" data-p="{percent(p)}" '
            f'title="probability {p:.4f} (log-probability {log_prob:.3f})">{html.escape(word)}</span>')


# -- the captions ------------------------------------------------------------------------------------------
def confidence_html(caption: Any) -> str:
    """A caption's confidence: a plain-words badge, the number on hover (``title``) and on tap (``<details>``),
    with one line on what it means; "" when the caption has none (a model without a calibrator: never a
    made-up verdict). The one place the page renders a confidence.

    Args:
        caption: a ``storyteller.decoding.Caption`` (its ``confidence`` may be None).
    """
    conf = getattr(caption, "confidence", None)
    shown = badge(conf)
    if shown is None:
        return ""
    label, key = shown
    number = f"{100 * conf:.0f}%"
    tip = f"estimated chance the caption is good: {number}"
    return (f'<details class="confidence conf-{key}" data-confidence="{conf:.4f}">'
            f'<summary class="badge" title="{html.escape(tip)}">{html.escape(label)}</summary>'
            f'<span class="conf-detail"><strong>{number}</strong>: {html.escape(MEANING)}</span></details>')


def words_html(vocab: Vocabulary, s: Any, label: str, caption: Any = None) -> str:
    """A caption's confidence badge (if any), then its words, each shaded by the probability the model gave
    it, then <end>'s (or "cut").

    Args:
        vocab: the model's vocabulary.
        s: the caption's words and their log-probabilities: a ``Caption`` (from its search) or a
            ``ScoredCaption`` (``tokens``, ``word_log_probs``, ``end_log_prob``).
        label: the search's name, for screen readers.
        caption: the ``Caption`` itself, for its confidence (None: no badge).
    """
    chips = [_chip(vocab.itos[t], lp) for t, lp in zip(s.tokens, s.word_log_probs)]
    chips.append(_chip("(end)", s.end_log_prob, "w end") if s.end_log_prob is not None
                 else '<span class="cut">(cut at max length)</span>')
    return (confidence_html(caption)
            + f'<div class="words" role="group" aria-label="{html.escape(label)}, word by word, shaded by probability">'
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


# -- greedy against beam -----------------------------------------------------------------------------------
def _word(vocab: Vocabulary, token: int | None) -> str | None:
    """A token as shown: the word, ``(end)`` for <end>, None past a cut caption's end."""
    if token is None:
        return None
    return "(end)" if token == Vocabulary.end_id else vocab.itos[token]


def _step_log_prob(s: ScoredCaption, step: int) -> float | None:
    """The log-probability of what caption ``s`` emitted at ``step`` (a word or <end>)."""
    return s.word_log_probs[step] if step < len(s.tokens) else s.end_log_prob


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


def agree_html(c: Captioned) -> str:
    """The one line for captions that agree, with beam search's runner-ups and the score they are ranked by."""
    others = c.result.beam[1:1 + RUNNERS_UP]
    if not others:
        return '<div class="agree" id="agree">Greedy and beam search agree (a beam of width 1 is greedy search).</div>'
    # the beam ranks its captions by score (log-prob / length^alpha): show that, and the log-prob when they differ
    runners = "; ".join(f"“{html.escape(o.text)}” (score {o.score:.2f}"
                        + (f", log-prob {o.log_prob:.2f})" if c.alpha else ")") for o in others)
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
                    f'<td class="num">{percent(math.exp(lp))}</td><td>{", ".join(takers)}</td></tr>')
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


# -- where it looked ---------------------------------------------------------------------------------------
def _data_url(image: Any, fmt: str, **save: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def attention_note(info: dict[str, Any]) -> str:
    """Which decoder the maps come from: the model itself, or the member of an ensemble that looks over the grid.

    Args:
        info: ``Captioner.info`` (``members`` set for an ensemble).
    """
    members = info.get("members") or []
    if not members:
        return "The maps are the Show-Attend-Tell decoder's attention over the photo's feature grid."
    which = next((i for i, m in enumerate(members) if m.get("decoder") == "show_attend_tell"), None)
    if which is None:
        return ""
    m = members[which]
    return (f"The maps come from member {which + 1} of the ensemble's {len(members)}, its Show-Attend-Tell decoder "
            f"(LSTM {m.get('num_layers')} x {m.get('hidden_dim')}); the other members read one pooled vector and "
            "have no maps. The caption is the ensemble's.")


def legend_html() -> str:
    """The attention view's colour legend: the blend's colours over a mid-grey photo, from "not looked at" to
    the word's peak (each word's map is scaled to its own peak)."""
    from .heatmap import legend_colours

    stops = ", ".join(f"rgb{c}" for c in legend_colours())
    return (f'<div class="att-legend" aria-hidden="true"><span>not looked at</span><span class="bar" '
            f'style="background: linear-gradient(to right, {stops})"></span><span>where it looked most</span></div>')


def attention_html(photo: Any, words: list[str], maps: Any, preprocessing: dict[str, Any], note: str = "") -> str:
    """The attention view: the photo encoded once (JPEG, ATTENTION_PHOTO wide), a transparent heat layer per
    word painted over it (a small PNG the browser scales), the word under each tile (never over the map); a tap
    or click opens a tile at least 400 px wide (the whole screen width on a phone), another closes it. A
    colour legend and ``note`` (which decoder the maps come from) follow.

    Args:
        photo: the decoded photo (PIL).
        words: the caption's words.
        maps: (len(words), h, w) attention maps (``Caption.attention``).
        preprocessing: the backbone's preprocessing (``resize``, ``crop``).
        note: the line saying whose maps these are (:func:`attention_note`).
    """
    from .heatmap import HeatLayer, fit_photo

    small = fit_photo(photo, ATTENTION_PHOTO)
    layer = HeatLayer(small.size, preprocessing, HEAT_WIDTH)
    # the photo once for the whole view and each layer once for its tile: CSS variables that the tile and its
    # enlarged copy both paint (the heat layer over the photo), so no image travels twice
    photo_url = _data_url(small, "JPEG", quality=82)
    pic = f'<span class="att-pic" style="aspect-ratio: {small.width} / {small.height}"></span>'
    tiles = []
    for i, (word, m) in enumerate(zip(words, maps)):
        w = html.escape(word)
        tiles.append(f'<details class="att-tile" data-word="{w}" style="--heat: url({_data_url(layer(m), "PNG")})">'
                     f'<summary title="{w}: tap to enlarge"><figure>{pic}<figcaption>{w}</figcaption></figure>'
                     f'<span class="att-big" role="dialog" aria-label="where it looked for “{w}”">'
                     f'<figure>{pic}<figcaption>{i + 1}. {w} <small>(tap to close)</small></figcaption></figure>'
                     f'</span></summary></details>')
    return (f'<div class="att-view" style="--photo: url({photo_url})"><div class="att-grid">{"".join(tiles)}</div>'
            f'{legend_html()}' + (f'<p class="att-note">{html.escape(note)}</p>' if note else "") + "</div>")


# -- the Model panel ---------------------------------------------------------------------------------------
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
/* the confidence badge: plain words, the number and its meaning a tap away */
.confidence { display: inline-block; margin: 0 0 0.2rem; font-size: 0.9rem; }
.confidence summary { display: inline-block; cursor: help; list-style: none; border-radius: 999px;
                      padding: 0.05rem 0.6rem; font-weight: 600; }
.confidence summary::-webkit-details-marker { display: none; }
.confidence summary::after { content: "?"; display: inline-block; margin-left: 0.35em; width: 1.1em; height: 1.1em;
                             line-height: 1.1em; text-align: center; border-radius: 50%; border: 1px solid currentColor;
                             font-size: 0.75em; font-weight: 400; opacity: 0.7; }
.conf-likely-right summary { background: #dcfce7; color: #14532d; }
.conf-unsure summary { background: #fef3c7; color: #713f12; }
.conf-likely-wrong summary { background: #fee2e2; color: #7f1d1d; }
.confidence .conf-detail { display: block; font-size: 0.8rem; line-height: 1.3; margin-top: 0.2rem; }
/* the attention view: the photo once, a heat layer per word, the word under its tile (never over the map);
   a tap opens the tile over the page, at least 400 px wide (the screen's width on a phone) */
.att-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(7.5rem, 1fr)); gap: 0.4rem; }
.att-tile summary { list-style: none; cursor: zoom-in; }
.att-tile summary::-webkit-details-marker { display: none; }
.att-tile figure { margin: 0; }
.att-pic { display: block; width: 100%; border-radius: 4px; background-image: var(--heat), var(--photo);
           background-size: 100% 100%; background-repeat: no-repeat; }
.att-tile figcaption { text-align: center; font-size: 0.9rem; line-height: 1.3; padding-top: 0.1rem;
                       overflow-wrap: anywhere; }
.att-big { display: none; }
.att-tile[open] .att-big { display: flex; position: fixed; inset: 0; z-index: 1000; align-items: center;
                           justify-content: center; background: rgba(0, 0, 0, 0.82); cursor: zoom-out; }
.att-tile[open] .att-big figure { width: min(100vw, 45rem); max-height: 100vh; }
.att-big figcaption { color: #fff; font-size: 1.1rem; padding: 0.3rem; }
.att-legend { display: flex; align-items: center; gap: 0.5rem; font-size: 0.8rem; margin-top: 0.5rem; }
.att-legend .bar { flex: 1; max-width: 14rem; height: 0.8rem; border-radius: 3px; }
.att-note { font-size: 0.8rem; margin: 0.3rem 0 0; opacity: 0.85; }
@media (max-width: 640px) {
  #header h1 { font-size: 1.3rem; }
  #header p { font-size: 0.85rem; line-height: 1.3; }
  #header p.how { display: none; }
  #photo { height: 240px !important; }
  #captions .caption textarea { font-size: 1.2rem; }
  .att-grid { grid-template-columns: repeat(3, minmax(0, 1fr)); }
  #model-info { font-size: 0.85rem; }
  #examples .gallery-item .container.gallery { width: 3.5rem; max-width: 3.5rem; height: 3.5rem; }
}
"""
