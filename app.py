"""Neural Storyteller web app (Gradio): upload, paste or snap a photo, get greedy and beam-search captions.

    python app.py [--model M] [--revision R] [--host 127.0.0.1] [--port 7860] [--concurrency N] [--threads T]
    STORYTELLER_MODEL=user/model gradio app.py      # reload mode; the env var picks the model

The model (``--model``, else ``$STORYTELLER_MODEL``, else the bundled ``models/flickr8k-lite0/``) is
loaded once at start-up; the handler is a pure function of its inputs. The raw uploaded file goes
to ``storyteller.images.load_image`` (the event runs with ``preprocess=False``, so Gradio never
decodes it), which refuses non-images, truncated files and decompression bombs with a clear
message and converts CMYK, transparency, 16-bit grayscale, GIFs and EXIF rotation correctly.
API: ``Client(url).predict(handle_file("photo.jpg"), 5, 20, 0.0, api_name="/caption")``.

Example::

    python app.py --model models/flickr8k-lite0 --port 7860
"""
from __future__ import annotations

import argparse
import base64
import binascii
import html
import json
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
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
DEFAULT_CONCURRENCY = int(os.environ.get("STORYTELLER_CONCURRENCY", "2"))


# -- pure helpers ------------------------------------------------------------------------------------
def image_source(payload: Any) -> str | bytes:
    """The uploaded file as a path (or bytes for a data: URL) from the raw Image payload.

    Args:
        payload: what the Image component sends with preprocessing off: a FileData dict, a path, or None.
    """
    if payload is None:
        raise gr.Error("Upload, paste or take a photo first.", title="No image")
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
                raise gr.Error("The image data could not be decoded.", title="Not a usable image") from None
    raise gr.Error("The upload did not contain an image file.", title="No image")


def _setting(value: Any, name: str, lo: float, hi: float, cast: type) -> Any:
    try:
        v = cast(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{name} must be a number, got {value!r}.", title="Bad setting") from None
    if not lo <= v <= hi or v != v:
        raise gr.Error(f"{name} must be between {lo} and {hi}, got {value!r}.", title="Bad setting")
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


# -- the app -----------------------------------------------------------------------------------------
def build_demo(captioner: Captioner, concurrency: int = DEFAULT_CONCURRENCY) -> gr.Blocks:
    """The Gradio Blocks app around one loaded captioner.

    Args:
        captioner: the model to serve (see ``storyteller.captioner.load``).
        concurrency: requests captioned at the same time (the queue holds the rest).
    """
    info = captioner.info
    defaults = slider_defaults(captioner.decoding)

    def caption(image: Any, beam_size: float, max_len: float, alpha: float):
        """Caption one photo with greedy and beam search. Returns greedy caption, log-prob, ms; beam caption,
        log-prob, ms; the n-best list; and the timing breakdown."""
        src = image_source(image)
        k = _setting(beam_size, "Beam width", *BEAM_RANGE, int)
        n = _setting(max_len, "Max length", *MAX_LEN_RANGE, int)
        a = _setting(alpha, "Length normalisation alpha", *ALPHA_RANGE, float)
        try:
            r = captioner.caption([src], beam_size=k, max_len=n, alpha=a, n_best=k)[0]
        except ImageError as e:
            raise gr.Error(f"Cannot caption this file: {html.escape(str(e))}", title="Not a usable image") from None
        t = r.timings_ms
        shared = t["preprocess"] + t["backbone"]
        nbest = [[i + 1, c.text, round(c.log_prob, 3), round(c.score, 3)] for i, c in enumerate(r.beam)]
        timing = (f"Image encoding, shared by both: preprocessing **{t['preprocess']:.0f} ms** + backbone "
                  f"`{info.get('backbone')}` **{t['backbone']:.0f} ms**; greedy search **{t['greedy']:.0f} ms**; "
                  f"beam search ({k} beams) **{t['beam']:.0f} ms**; total **{t['total']:.0f} ms**.")
        return (r.greedy.text, round(r.greedy.log_prob, 3), round(shared + t["greedy"]),
                r.beam[0].text, round(r.beam[0].log_prob, 3), round(shared + t["beam"]), nbest, timing)

    with gr.Blocks(title="Neural Storyteller", analytics_enabled=False) as demo:
        gr.Markdown("# Neural Storyteller\nShow-and-Tell image captioning: a frozen ImageNet CNN summarises the photo in "
                    "one feature vector, an LSTM writes the caption. Compare greedy and beam search side by side.")
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(label="Photo", type="filepath", image_mode=None, elem_id="photo",
                                 sources=["upload", "webcam", "clipboard"], height=360)
                with gr.Row():
                    beam = gr.Slider(*BEAM_RANGE, value=defaults["beam_size"], step=1, label="Beam width")
                    max_len = gr.Slider(*MAX_LEN_RANGE, value=defaults["max_len"], step=1, label="Max length (words)")
                    alpha = gr.Slider(*ALPHA_RANGE, value=defaults["alpha"], step=0.1,
                                      label="Length normalisation alpha (0 = raw log-prob)")
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                reference = gr.Textbox(label="Human caption (for the example photos)", interactive=False,
                                       elem_id="reference")
            with gr.Column(scale=3):
                with gr.Row(equal_height=True):
                    with gr.Column(variant="panel"):
                        gr.Markdown("### Greedy")
                        greedy_text = gr.Textbox(label="Greedy caption", interactive=False, lines=2,
                                                 elem_id="greedy-caption")
                        with gr.Row():
                            greedy_lp = gr.Number(label="log-probability", interactive=False, precision=3)
                            greedy_ms = gr.Number(label="time (ms)", interactive=False, precision=0)
                    with gr.Column(variant="panel"):
                        gr.Markdown("### Beam search")
                        beam_text = gr.Textbox(label="Beam caption", interactive=False, lines=2, elem_id="beam-caption")
                        with gr.Row():
                            beam_lp = gr.Number(label="log-probability", interactive=False, precision=3)
                            beam_ms = gr.Number(label="time (ms)", interactive=False, precision=0)
                        with gr.Accordion("n-best list", open=False):
                            nbest = gr.Dataframe(headers=["#", "caption", "log-prob", "score"],
                                                 datatype=["number", "str", "number", "number"],
                                                 interactive=False, wrap=True)
                timing = gr.Markdown(elem_id="timing")
        examples = _examples()
        if examples:
            gr.Examples(examples=examples, inputs=[image, reference], elem_id="examples",
                        label="Example photos (Flickr8k validation) with a human caption")
        with gr.Accordion("Model", open=False):
            gr.Markdown(model_markdown(info), elem_id="model-info")

        button.click(caption, inputs=[image, beam, max_len, alpha],
                     outputs=[greedy_text, greedy_lp, greedy_ms, beam_text, beam_lp, beam_ms, nbest, timing],
                     api_name="caption", preprocess=False)
        # a photo of the user's own has no human caption
        gr.on([image.upload, image.clear], lambda: "", outputs=[reference], api_visibility="private", queue=False)
    demo.queue(default_concurrency_limit=concurrency, max_size=64)
    return demo


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Neural Storyteller web app.")
    p.add_argument("--model", default=None,
                   help="local model folder or Hub repo id (default: $STORYTELLER_MODEL, else models/flickr8k-lite0)")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to bind (default 127.0.0.1; a Space sets GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                   help="requests captioned at once (default 2, or $STORYTELLER_CONCURRENCY)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("STORYTELLER_THREADS", "0")),
                   help="PyTorch threads (default: CPUs / concurrency, at least 1; or $STORYTELLER_THREADS)")
    args = p.parse_args(argv)
    if args.concurrency < 1:
        p.error("--concurrency must be >= 1")
    args.threads = args.threads if args.threads > 0 else max(1, CPUS // args.concurrency)
    return args


def _load_or_exit(name: str | None, revision: str | None) -> Captioner:
    try:
        captioner = load(name, revision=revision)
    except ModelLoadError as e:  # one clear line instead of a traceback
        print(f"app.py: cannot start: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    captioner.warmup()
    return captioner


ARGS = _parse_args(sys.argv[1:] if __name__ == "__main__" else [])
# Concurrent requests each get their share of the cores: on a small CPU, tiny decoder steps run
# faster on one thread than split across two that the other request also wants (bench/bench_app.py).
torch.set_num_threads(ARGS.threads)
captioner = _load_or_exit(ARGS.model, ARGS.revision)
demo = build_demo(captioner, concurrency=ARGS.concurrency)

if __name__ == "__main__":
    demo.launch(server_name=ARGS.host, server_port=ARGS.port, max_file_size="64mb")
