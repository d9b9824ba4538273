"""Neural Storyteller web app (Gradio): upload, paste or snap a photo, get greedy and beam-search captions.

    python app.py [--model M] [--revision R] [--host 127.0.0.1] [--port 7860] [--concurrency N] [--threads T]
    STORYTELLER_MODEL=user/model gradio app.py      # reload mode; the env var picks the model

The model (``--model``, else ``$STORYTELLER_MODEL``, else the bundled ``models/flickr8k-lite0-scst/``) is
loaded once at start-up; the handlers are pure functions of their inputs. A photo is captioned as
soon as it arrives (upload, paste, webcam, example click); the button re-runs with new settings. On
the page a refused input is one notice above cleared outputs and one log line; for API callers
(``/caption``) it is an error. Uploaded files are deleted after ``--upload-max-age`` seconds. The raw uploaded file goes
to ``storyteller.images.load_image`` (the event runs with ``preprocess=False``, so Gradio never
decodes it), which refuses non-images, truncated files and decompression bombs with a clear
message and converts CMYK, transparency, 16-bit grayscale, GIFs and EXIF rotation correctly.
API: ``Client(url).predict(handle_file("photo.jpg"), 5, 20, 0.0, api_name="/caption")``.

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
from pathlib import Path
from typing import Any

import gradio as gr
import torch

from storyteller.captioner import DECODING_DEFAULTS, Captioner, ModelLoadError, load
from storyteller.card import dataset_label
from storyteller.images import ImageError

HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "examples"
BEAM_RANGE, MAX_LEN_RANGE, ALPHA_RANGE = (1, 10), (1, 40), (0.0, 2.0)
log = logging.getLogger("storyteller.app")
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
DEFAULT_CONCURRENCY = int(os.environ.get("STORYTELLER_CONCURRENCY", "2"))


# -- pure helpers ------------------------------------------------------------------------------------
def image_source(payload: Any) -> str | bytes:
    """The uploaded file as a path (or bytes for a data: URL) from the raw Image payload.

    Args:
        payload: what the Image component sends with preprocessing off: a FileData dict, a path, or None.
    """
    if payload is None:
        raise refuse("Upload, paste or take a photo first.", "No image")
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
    raise refuse("The upload did not contain an image file.", "No image")


def _setting(value: Any, name: str, lo: float, hi: float, cast: type) -> Any:
    try:
        v = cast(value)
    except (TypeError, ValueError):
        raise refuse(f"{name} must be a number, got {value!r}.", "Bad setting") from None
    if not lo <= v <= hi or v != v:
        raise refuse(f"{name} must be between {lo} and {hi}, got {value!r}.", "Bad setting")
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

    The caption event runs with ``preprocess=False``, so Gradio does not check slider values
    against their bounds; ``_setting`` does, and would refuse the page's very first request if a
    model recommended, say, ``max_len`` 50 on a 1..40 slider.

    Args:
        decoding: ``Captioner.decoding`` (the model's recommendation over DECODING_DEFAULTS).
    """
    return {"beam_size": _clamp(decoding.get("beam_size"), *BEAM_RANGE, DECODING_DEFAULTS["beam_size"], int),
            "max_len": _clamp(decoding.get("max_len"), *MAX_LEN_RANGE, DECODING_DEFAULTS["max_len"], int),
            "alpha": _clamp(decoding.get("alpha"), *ALPHA_RANGE, DECODING_DEFAULTS["alpha"], float)}


def model_markdown(info: dict[str, Any]) -> str:
    """The model panel: which model and backbone, and its recorded evaluation figures.

    Args:
        info: ``Captioner.info``.
    """
    rev = f" @ `{info['revision']}`" if info.get("revision") else ""
    lines = [f"**Model**: `{info.get('model_name') or info['model']}`{rev}",  # a label, never the server's folders
             f"**Backbone**: `{info.get('backbone')}` ({info.get('feature_dim')}-d pooled features, weights "
             f"`{info.get('backbone_weights')}`)",
             f"**Decoder**: LSTM {info.get('num_layers')} x {info.get('hidden_dim')}, embeddings {info.get('embed_dim')}, "
             f"{info.get('vocab_size')} tokens"]
    if info.get("precision"):
        lines.append(f"**Decoder weights**: {info['precision']} (`--precision`; auto picks the fastest this CPU supports)")
    if info.get("dataset"):  # its name or Hub id: never the training machine's path
        lines.append(f"**Trained on**: {dataset_label(info['dataset'])[0]}")
    cols = [("bleu1", "BLEU-1"), ("bleu4", "BLEU-4"), ("cider", "CIDEr-D")]
    rows = []
    for ev in info.get("evaluations") or []:
        where = f"{ev.get('dataset_name', '')} {ev.get('split', '')}".strip()
        for method, m in (ev.get("methods") or {}).items():
            rows.append([where, method] + [m.get(k) for k, _ in cols])
    metrics = info.get("metrics") or {}
    if not rows and any(metrics.get(k) is not None for k, _ in cols):
        rows.append([f"{metrics.get('split', 'validation')} (during training)", metrics.get("decoding", "greedy")]
                    + [metrics.get(k) for k, _ in cols])
    out = "  \n".join(lines)
    if rows:
        head = "| data | decoding | " + " | ".join(label for _, label in cols) + " |"
        body = ["| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v)) for v in r) + " |"
                for r in rows]
        out += "\n\n" + "\n".join([head, "|---" * (len(cols) + 2) + "|", *body])
    else:
        out += "\n\nNo evaluation figures recorded for this model."
    return out


def _examples() -> list[list[str]]:
    """Rows ``[photo path, its first human caption]`` from examples/ and examples/captions.json."""
    try:
        captions = json.loads((EXAMPLES_DIR / "captions.json").read_text(encoding="utf-8")).get("captions", {})
    except (OSError, ValueError):
        captions = {}
    files = sorted(EXAMPLES_DIR.glob("*.jpg")) if EXAMPLES_DIR.is_dir() else []
    return [[str(p), (captions.get(p.name) or [""])[0].strip().rstrip(" .")] for p in files]


# -- the handlers (pure: the loaded captioner and the inputs in, the outputs out) ------------------------
OUTPUT_NAMES = ("greedy caption", "greedy figures", "beam caption", "beam figures", "n-best list", "timings",
                "notice", "result", "attention")
CLEARED = ("", "", "", "", "", "", "", None, None)  # what every output shows before a caption (no placeholder numbers)
ATTENTION_PANEL = 256  # px width of each word's overlay in the attention gallery (shown at ~140 px on a desktop)


def notice_html(kind: str, title: str, message: str) -> str:
    """The one message box above the captions (an error, or a warning about the photo).

    Args:
        kind: ``"error"`` or ``"warning"``.
        title: a few words in bold.
        message: the sentence(s); HTML-escaped here.
    """
    return (f'<div class="notice notice-{kind}" role="{"alert" if kind == "error" else "status"}">'
            f"<strong>{html.escape(title)}</strong> {html.escape(message)}</div>")


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


def refuse(message: str, title: str) -> gr.Error:
    """A user error: one log line (no traceback) and the ``gr.Error`` to raise.

    Args:
        message: what is wrong, for the user.
        title: its heading.
    """
    log.info("caption refused: %s: %s", title, message)
    return gr.Error(html.escape(message), title=title, print_exception=False)


def caption_photo(captioner: Captioner, image: Any, beam_size: Any, max_len: Any, alpha: Any) -> tuple:
    """Caption one photo with greedy and beam search; returns the outputs in OUTPUT_NAMES order.

    Args:
        captioner: the loaded model.
        image: the raw Image payload (FileData dict, path, or None).
        beam_size: beam width (BEAM_RANGE).
        max_len: most decoder steps, ``<end>`` included (MAX_LEN_RANGE).
        alpha: length-normalisation exponent (ALPHA_RANGE).

    Raises:
        gr.Error: no image, not a usable image, or a setting out of range (logged in one line).
    """
    src = image_source(image)
    k = _setting(beam_size, "Beam width", *BEAM_RANGE, int)
    n = _setting(max_len, "Max length", *MAX_LEN_RANGE, int)
    a = _setting(alpha, "Length normalisation alpha", *ALPHA_RANGE, float)
    try:
        photo = captioner.load_image(src) if captioner.has_attention else src  # decoded once, drawn on below
        r = captioner.caption([photo], beam_size=k, max_len=n, alpha=a, n_best=k)[0]
    except ImageError as e:
        raise refuse(f"Cannot caption this file: {e}", "Not a usable image") from None
    t = r.timings_ms
    # greedy and beam search run in one pass (one decoder call per step for both), so they share its time
    greedy_ms = beam_ms = t["preprocess"] + t["backbone"] + t["search"]
    best = r.beam[0]
    timing = (f"Image encoding, shared by both: preprocessing **{t['preprocess']:.0f} ms** + backbone "
              f"`{captioner.info.get('backbone')}` **{t['backbone']:.0f} ms**; greedy and beam search ({k} beams) "
              f"in one pass **{t['search']:.0f} ms**; total **{t['total']:.0f} ms**.")
    notice = notice_html("warning", "Odd photo.", " ".join(r.warnings)) if r.warnings else ""
    result = {"greedy": {"caption": r.greedy.text, "log_prob": round(r.greedy.log_prob, 4), "ms": round(greedy_ms, 1)},
              "beam": [{"caption": c.text, "log_prob": round(c.log_prob, 4), "score": round(c.score, 4)} for c in r.beam],
              "beam_size": k, "beam_ms": round(beam_ms, 1), "timings_ms": {k_: round(v, 1) for k_, v in t.items()},
              "warnings": list(r.warnings)}
    return (r.greedy.text, f"log-probability **{r.greedy.log_prob:.3f}** · **{greedy_ms:.0f} ms**",
            best.text, f"log-probability **{best.log_prob:.3f}** · score **{best.score:.3f}** · **{beam_ms:.0f} ms**",
            nbest_html(r.beam), timing, notice, result, attention_gallery(captioner, photo, best))


def attention_gallery(captioner: Captioner, photo: Any, caption: Any) -> list[tuple[Any, str]] | None:
    """The beam caption's attention view: one (overlay, word) per word; None for a pooled model.

    Args:
        captioner: the loaded model.
        photo: the decoded photo (PIL) the caption is of.
        caption: the beam caption (with its per-word attention maps).
    """
    if caption.attention is None:
        return None
    from storyteller.heatmap import PhotoOverlay

    small = photo.convert("RGB")
    small = small.resize((ATTENTION_PANEL, max(1, round(ATTENTION_PANEL * small.height / small.width))))
    draw_map = PhotoOverlay(small, captioner.backbone.spec["preprocessing"])  # the photo prepared once
    words = [captioner.model.vocab.itos[t] for t in caption.tokens]
    return [(draw_map(m), w) for w, m in zip(words, caption.attention)]


def caption_for_page(captioner: Captioner, *inputs: Any) -> tuple:
    """:func:`caption_photo` for the page: a refusal becomes the one notice above cleared outputs (no error
    state on every output); an unexpected failure is logged with its traceback and shown the same way.

    Args:
        captioner: the loaded model.
        inputs: image, beam width, max length, alpha.
    """
    try:
        return caption_photo(captioner, *inputs)
    except gr.Error as e:
        return (*CLEARED[:6], notice_html("error", f"{e.title}:" if e.title else "Error:", html.unescape(str(e.message))),
                None, None)
    except Exception:  # a bug, not the user's fault: keep the traceback for the log
        log.exception("caption failed")
        return (*CLEARED[:6], notice_html("error", "Something went wrong:", "the server could not caption this photo. "
                                          "Try another one."), None, None)


CSS = """
#captions .caption textarea { font-size: 1.3rem; line-height: 1.45; font-weight: 500; }
#captions { align-items: flex-start; }
#captions > .column { justify-content: flex-start; }
#captions > .column > * { flex-grow: 0; }
.notice { padding: 0.6rem 0.9rem; border-radius: 8px; margin: 0.2rem 0; }
.notice-error { background: #fdecec; border-left: 4px solid #d32f2f; color: #7f1d1d; }
.notice-warning { background: #fff7e0; border-left: 4px solid #e0a100; color: #5c4300; }
table.nbest { width: 100%; border-collapse: collapse; font-family: inherit; table-layout: auto; }
table.nbest th, table.nbest td { padding: 0.3rem 0.5rem; border-bottom: 1px solid var(--border-color-primary); }
table.nbest td.text { white-space: normal; overflow-wrap: anywhere; width: 100%; }
table.nbest .num { white-space: nowrap; text-align: right; font-variant-numeric: tabular-nums; }
#examples table { table-layout: fixed; width: 100%; }
#examples td, #examples th { white-space: normal !important; overflow-wrap: anywhere; }
#examples img { max-width: 100%; height: auto; }
#examples .table-wrap, #examples .paginate { max-width: 100%; overflow-x: hidden; }
"""


def upload_max_age() -> int:
    """Seconds an uploaded file is kept (``$STORYTELLER_UPLOAD_MAX_AGE``, default 600, at least 1)."""
    try:
        return max(1, int(os.environ.get("STORYTELLER_UPLOAD_MAX_AGE", "600")))
    except ValueError:
        return 600


# -- the app -----------------------------------------------------------------------------------------
def build_demo(captioner: Captioner, concurrency: int = DEFAULT_CONCURRENCY, max_age: int | None = None) -> gr.Blocks:
    """The Gradio Blocks app around one loaded captioner.

    Args:
        captioner: the model to serve (see ``storyteller.captioner.load``).
        concurrency: requests captioned at the same time (the queue holds the rest).
        max_age: seconds after which uploaded files are deleted (checked every tenth of that, at
            least every second); None: :func:`upload_max_age`.
    """
    info = captioner.info
    defaults = slider_defaults(captioner.decoding)
    max_age = upload_max_age() if max_age is None else max(1, int(max_age))

    def caption(image: Any, beam_size: float, max_len: float, alpha: float) -> tuple:
        """Caption one photo with greedy and beam search (the API: refusals are errors)."""
        return caption_photo(captioner, image, beam_size, max_len, alpha)

    def caption_page(image: Any, beam_size: float, max_len: float, alpha: float) -> tuple:
        """Caption one photo for the page (a refusal is the one notice)."""
        if image is None:  # the photo was removed: nothing to say
            return CLEARED
        return caption_for_page(captioner, image, beam_size, max_len, alpha)

    with gr.Blocks(title="Neural Storyteller", analytics_enabled=False, delete_cache=(max(1, max_age // 10), max_age)) as demo:
        how = ("Show-Attend-Tell image captioning: a frozen ImageNet CNN turns the photo into a grid of features, "
               "an LSTM writes the caption and looks at the grid for every word (shown below the captions)."
               if captioner.has_attention else
               "Show-and-Tell image captioning: a frozen ImageNet CNN summarises the photo in one feature vector, "
               "an LSTM writes the caption.")
        gr.Markdown(f"# Neural Storyteller\n{how} Upload, paste or take a photo, or click an example: it is "
                    "captioned at once, with greedy and beam search side by side.")
        with gr.Row():
            with gr.Column(scale=2, min_width=300):
                image = gr.Image(label="Photo", type="filepath", image_mode=None,
                                 elem_id="photo", sources=["upload", "webcam", "clipboard"], height=360)
                beam = gr.Slider(*BEAM_RANGE, value=defaults["beam_size"], step=1, label="Beam width")
                max_len = gr.Slider(*MAX_LEN_RANGE, value=defaults["max_len"], step=1,
                                    label="Max length (decoder steps, <end> included)")
                alpha = gr.Slider(*ALPHA_RANGE, value=defaults["alpha"], step=0.1,
                                  label="Length normalisation alpha (0 = raw log-prob)")
                button = gr.Button("Caption again with these settings", variant="primary", elem_id="caption-button")
                reference = gr.Textbox(label="Human caption (for the example photos)", interactive=False,
                                       elem_id="reference")
            with gr.Column(scale=3, min_width=300):
                notice = gr.HTML(elem_id="notice")
                with gr.Row(equal_height=False, elem_id="captions"):
                    with gr.Column(variant="panel", min_width=260):
                        gr.Markdown("### Greedy")
                        greedy_text = gr.Textbox(label="Greedy caption", interactive=False, lines=2, max_lines=6,
                                                 elem_id="greedy-caption", elem_classes="caption", buttons=["copy"])
                        greedy_stats = gr.Markdown(elem_id="greedy-stats")
                    with gr.Column(variant="panel", min_width=260):
                        gr.Markdown("### Beam search")
                        beam_text = gr.Textbox(label="Beam caption", interactive=False, lines=2, max_lines=6,
                                               elem_id="beam-caption", elem_classes="caption", buttons=["copy"])
                        beam_stats = gr.Markdown(elem_id="beam-stats")
                with gr.Accordion("n-best list (beam search)", open=False, elem_id="nbest-accordion"):
                    nbest = gr.HTML(elem_id="nbest")
                # attention models: where the model looked for each word of the beam caption (hidden for pooled ones)
                attention = gr.Gallery(label="Where it looked: the beam caption, word by word", columns=4, format="jpeg",
                                       height="auto", object_fit="contain", elem_id="attention",
                                       visible=captioner.has_attention, show_label=True, preview=False)
                timing = gr.Markdown(elem_id="timing")
                result = gr.JSON(visible=False)
        examples = _examples()
        if examples:
            gr.Examples(examples=examples, inputs=[image, reference], elem_id="examples",
                        label="Example photos (Flickr8k validation) with a human caption: click one")
        with gr.Accordion("Model", open=False):
            gr.Markdown(model_markdown(info), elem_id="model-info")

        outputs = [greedy_text, greedy_stats, beam_text, beam_stats, nbest, timing, notice, result, attention]
        inputs = [image, beam, max_len, alpha]
        # The page: a new photo (upload, paste, webcam, example click) clears the old captions at once and
        # is captioned; the button re-runs with new settings. Refusals are one notice, not an error per output.
        gr.on([image.change, button.click], lambda: CLEARED, outputs=outputs, queue=False, show_progress="hidden",
              api_visibility="private").then(caption_page, inputs=inputs, outputs=outputs, preprocess=False,
                                             api_visibility="private", show_progress_on=[notice])
        # The API (gradio_client, `/caption`): the same captions; a refusal is an error for the caller.
        api_trigger = gr.Button(visible=False, elem_id="api-caption")
        api_trigger.click(caption, inputs=inputs, outputs=outputs, api_name="caption", preprocess=False)
        # a photo of the user's own has no human caption
        gr.on([image.upload, image.clear], lambda: "", outputs=[reference], api_visibility="private", queue=False)
    demo.queue(default_concurrency_limit=concurrency, max_size=64)
    return demo


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Neural Storyteller web app.")
    p.add_argument("--model", default=None,
                   help="local model folder or Hub repo id (default: $STORYTELLER_MODEL, else models/flickr8k-lite0-scst)")
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
                   help="decoder weights (default: $STORYTELLER_PRECISION, else auto: the fastest this CPU supports, "
                        "timed once at start-up)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("STORYTELLER_THREADS", "0")),
                   help="PyTorch threads (default: CPUs / concurrency, at least 1; or $STORYTELLER_THREADS)")
    args = p.parse_args(argv)
    if args.concurrency < 1:
        p.error("--concurrency must be >= 1")
    args.threads = args.threads if args.threads > 0 else max(1, CPUS // args.concurrency)
    return args


def _load_or_exit(name: str | None, revision: str | None, precision: str | None = None) -> Captioner:
    try:
        captioner = load(name, revision=revision, precision=precision)
    except ModelLoadError as e:  # one clear line instead of a traceback
        print(f"app.py: cannot start: {e}", file=sys.stderr)  # the weights too: LFS pointer, truncated, corrupt
        raise SystemExit(1) from None
    captioner.warmup()
    return captioner


# One line per refused request (no traceback) and a traceback for real failures, on stderr.
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
log.setLevel(logging.INFO)
ARGS = _parse_args(sys.argv[1:] if __name__ == "__main__" else [])
# Concurrent requests each get their share of the cores: on a small CPU, tiny decoder steps run
# faster on one thread than split across two that the other request also wants (bench/bench_app.py).
torch.set_num_threads(ARGS.threads)
captioner = _load_or_exit(ARGS.model, ARGS.revision, ARGS.precision)
demo = build_demo(captioner, concurrency=ARGS.concurrency, max_age=ARGS.upload_max_age)

if __name__ == "__main__":
    demo.launch(server_name=ARGS.host, server_port=ARGS.port, max_file_size="64mb", css=CSS)
