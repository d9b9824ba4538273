"""Score a trained model's captions on a dataset split, greedy and beam search, batched.

    python -m train evaluate --model runs/flickr8k-lite0/model --dataset ../shared/data/flickr8k \\
        --split validation --beam 1 3 5 --out runs/flickr8k-lite0/eval.json --report runs/flickr8k-lite0/eval.md
    python -m train evaluate --model user/storyteller --features feats/flickr8k-lite0 --split validation \\
        --beam 1 3 --out eval.json            # cached features (must come from the model's backbone)

Beam 1 is greedy search. Decoding settings not given on the command line (``--beam``, ``--alpha``,
``--no-repeat-ngram-size``, ``--max-len``, ``--min-len``) are the model's recommended ones
(``config["extra"]["decoding"]``, written by ``python -m train bundle``; the app and the CLI use
them too), else greedy + beam 3, alpha 0, no n-gram blocking, 20 steps: so the figures describe
the model as it is used. Features come from ``--features`` (a cache checked against the model's
backbone spec) or are computed live from the photos with the model's own backbone and
preprocessing. The JSON holds, per decoding method, every figure of ``evaluate_captions``
(BLEU-1..4, CIDEr-D, unigram precision/recall/F1), the mean caption length in words, the number of
distinct words used, decoding images/s, the 10 most frequent captions with their counts
(``top_captions``) and, for each stock phrase (``--stock-phrases``, default :data:`STOCK_PHRASES`),
the share of images whose caption says it against the share of the same images' human references
that do, and their ratio (``stock_phrases``: a model that says them more often than people do is
guessing); the decoding settings used; plus a few examples drawn with ``--seed``. ``--report``
writes the same as Markdown with thumbnails (JPEGs in a folder beside the report).
``--write-to-model`` stores the result in the model folder's evaluation.json (and re-renders its
README.md card), replacing an earlier evaluation of the same dataset (its name or Hub id) and split.
The result names the dataset, the feature cache and the model by name or Hub id, never by a path of
this machine, so it can ship in a model folder. Live features are computed as the app computes
them (``Captioner.features``: big JPEGs decoded in draft mode down to the backbone's resize size).
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storyteller.captioner import model_label
from storyteller.card import dataset_label
from storyteller.decoding import beam_search, greedy_search
from storyteller.fileio import atomic_path, write_json_atomic, write_text_atomic
from storyteller.decoders import HubDecoder, load_decoder
from storyteller.precision import use_precision
from storyteller.decoding_settings import (BAD_ENDINGS_HELP, DECODING_DEFAULTS, MAX_LEN_HELP, check_setting,
                                           decoding_hints, end_allowed_from, parse_bad_endings)
from storyteller.vocab import tokenize

EVALUATION_FORMAT = "storyteller-evaluation-v1"
THUMBNAIL_SIZE = 256  # longest side of the report's JPEG thumbnails, in pixels
THUMBNAIL_QUALITY = 85  # their JPEG quality: small files, no visible blocks at this size
# Phrases a captioner says when it guesses rather than sees (issue 24's blind read of unseen photos:
# "holding a camera" for a baby with a flag, "a little girl" for adult golfers, stock clothing):
# evaluate counts how often its captions say each against the same images' human references.
STOCK_PHRASES = ("in front of a building", "holding a camera", "red shirt", "little boy", "little girl")
# What --max-len means in evaluate, fit and scst (storyteller.decoding's searches and scst's sampler agree).
TOP_CAPTIONS = 10  # most frequent captions listed per decoding method
WARMUP_IMAGES, WARMUP_STEPS = 2, 2  # one tiny decode before timing: first-call allocations are not in images/s
# Decoding when neither the command line nor the model's config["extra"]["decoding"] says otherwise:
# the captioner's (and so the app's and the CLI's) defaults.
DECODING_FALLBACK = DECODING_DEFAULTS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (config.json, model.safetensors, vocab.json) or Hub repo id")
    p.add_argument("--dataset", default=None,
                   help="captioned images (Hub id, imagefolder or parquet); needed unless --features is given, "
                        "and for the report's thumbnails")
    p.add_argument("--features", default=None, help="feature cache to read instead of running the backbone")
    p.add_argument("--split", default="validation", help="split to evaluate")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N images of the split only (0: all)")
    # Decoding: None means the model's recommended value (config extra decoding), else DECODING_FALLBACK's.
    p.add_argument("--beam", type=int, nargs="+", default=None,
                   help="beam sizes to run, 1 is greedy search (unset: 1 and the model's recommended beam, else 1 3)")
    p.add_argument("--alpha", type=float, default=None,
                   help="beam search GNMT length-normalisation exponent (unset: the model's recommended, else 0)")
    p.add_argument("--max-len", type=int, default=None,
                   help=f"{MAX_LEN_HELP} (unset: the model's recommended, else 20)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None,
                   help="forbid repeating n-grams of this size, 0: off (unset: the model's recommended, else 0)")
    p.add_argument("--min-len", type=int, default=None,
                   help="fewest words before <end> (unset: the model's recommended, else 1)")
    p.add_argument("--bad-endings", default=None, help=BAD_ENDINGS_HELP + " (unset: the model's recommended)")
    p.add_argument("--stock-phrases", default=None,
                   help="comma-separated phrases whose share of captions is compared with the human references', "
                        "'none': off (unset: " + ", ".join(STOCK_PHRASES) + ")")
    p.add_argument("--batch-size", type=int, default=256, help="images per decoding / feature-extraction batch")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding photos for live features")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "int8", "auto"],
                   help="how the decoder's step computes on a CPU (storyteller.precision). Default: the app's and "
                        "the CLI's, $STORYTELLER_PRECISION else auto (int8 where it runs), so the captions are the "
                        "ones users get; the result records the precision")
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--report", default=None, help="Markdown report file (thumbnails go to a folder beside it)")
    p.add_argument("--examples", type=int, default=5, help="random example images in the JSON and the report")
    p.add_argument("--seed", type=int, default=0, help="seed that picks the example images")
    p.add_argument("--write-to-model", action="store_true",
                   help="also store the result in MODEL/evaluation.json and refresh MODEL/README.md (local folders only)")
    return p


# -- features ------------------------------------------------------------------------------------

@torch.inference_mode()
def live_features(images, backbone_spec: dict[str, Any], device: torch.device, batch_size: int, workers: int,
                  grid: bool = False) -> torch.Tensor:
    """(N, F) float32 features of ``images`` (a CaptionedImages) from the model's own backbone, decoded
    as the app decodes uploads (``Captioner.load_image``: JPEG draft mode down to the resize size);
    with ``grid``, the (N, h, w, F) feature grids an attention decoder reads.

    Args:
        images: the captioned images, in order.
        backbone_spec: ``model.backbone``: network, weights and preprocessing.
        device: where the backbone runs.
        batch_size: images per forward.
        workers: DataLoader processes decoding images.
        grid: return feature grids instead of pooled vectors.
    """
    from storyteller.backbones import create_backbone
    from train.extract import make_loader

    backbone = create_backbone(backbone_spec, device=device)
    images = copy.copy(images)  # the caller's stays at full resolution (report thumbnails)
    images.draft_size = int(getattr(backbone.transform, "preprocessing", {}).get("resize", 0)) or None
    loader = make_loader(images, backbone.transform, 0, batch_size, workers, pin_memory=device.type == "cuda")
    if grid:
        return torch.cat([backbone.forward_grid(pixels.to(device, non_blocking=True))[1] for pixels in loader])
    return torch.cat([backbone(pixels.to(device, non_blocking=True)).float() for pixels in loader])


# -- decoding and scoring ------------------------------------------------------------------------

def method_name(beam: int) -> str:
    """``greedy`` for beam 1, ``beamK`` otherwise (the keys of the results).

    Args:
        beam: beam size.
    """
    return "greedy" if beam == 1 else f"beam{beam}"


def decoding_settings(args: argparse.Namespace, extra: dict[str, Any] | None) -> dict[str, Any]:
    """The decoding to evaluate: each setting from the command line, else the model's recommendation
    (``extra["decoding"]``), else DECODING_FALLBACK.

    Args:
        args: the parsed arguments (None where an option was not given).
        extra: the model's ``config["extra"]``.

    Returns:
        ``{"beams": [...], "alpha", "no_repeat_ngram_size", "max_len", "min_len"}``.

    Raises:
        SystemExit: a setting out of range (given or recommended).
    """
    try:
        recommended = {**DECODING_FALLBACK, **decoding_hints(extra)}
    except ValueError as e:  # a config.json written by hand, or by an older bundle
        sys.exit(f"the model's recommended decoding cannot be used: {e}")
    given = {"alpha": args.alpha, "no_repeat_ngram_size": args.no_repeat_ngram_size, "max_len": args.max_len,
             "min_len": args.min_len}
    settings = {k: recommended[k] if v is None else v for k, v in given.items()}
    try:
        bad = parse_bad_endings(getattr(args, "bad_endings", None))
    except ValueError as e:
        sys.exit(str(e))
    settings["bad_endings"] = list(recommended["bad_endings"] if bad is None else bad)
    beams = args.beam if args.beam is not None else [1, recommended["beam_size"]]
    settings["beams"] = list(dict.fromkeys(beams))
    try:
        for b in settings["beams"]:
            check_setting("beam_size", b, name="beam size")
        for key in ("max_len", "alpha", "no_repeat_ngram_size", "min_len"):
            check_setting(key, settings[key])
    except ValueError as e:
        sys.exit(str(e))
    return settings


def decode_all(model: HubDecoder, features: torch.Tensor, beam: int, *, max_len: int, batch_size: int,
               alpha: float = 0.0, no_repeat_ngram_size: int = 0, min_len: int = 1,
               amp_dtype: torch.dtype | None = None, bad_endings: Sequence[str] = ()) -> list[str]:
    """Captions of every row of ``features`` (N, F), in batches; beam 1 runs greedy search.

    Args:
        model: the decoder (its vocab attached).
        features: (N, F) on the model's device.
        beam: beam size.
        max_len: most decoding steps.
        batch_size: images per decoder batch.
        alpha: length normalisation (beam > 1 only).
        no_repeat_ngram_size: n-gram blocking (0: off).
        min_len: fewest words before ``<end>`` (at most max_len).
        amp_dtype: autocast dtype (e.g. torch.bfloat16) or None for full precision.
        bad_endings: words after which ``<end>`` is forbidden.
    """
    kw = dict(max_len=max_len, no_repeat_ngram_size=no_repeat_ngram_size, min_len=end_allowed_from(min_len, max_len),
              bad_endings=tuple(bad_endings))
    texts = []
    for chunk in features.split(batch_size):
        with torch.autocast(features.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            if beam == 1:
                texts += [c.text for c in greedy_search(model, chunk, **kw)]
            else:
                texts += [caps[0].text for caps in beam_search(model, chunk, beam_size=beam, alpha=alpha, **kw)]
    return texts


def caption_statistics(hypotheses: list[str]) -> dict[str, float]:
    """Mean caption length in words, the number of distinct words over all captions, and the share of
    captions ending on a function word (``train.reward.BAD_ENDINGS``).

    Args:
        hypotheses: generated captions.
    """
    from train.reward import bad_ending_share

    toks = [tokenize(h) for h in hypotheses]
    return {"mean_length": float(np.mean([len(t) for t in toks])) if toks else 0.0,
            "vocab_used": len({w for t in toks for w in t}), "bad_ending_share": bad_ending_share(hypotheses)}


def parse_phrases(spec: str | None) -> tuple[str, ...]:
    """``--stock-phrases`` -> the phrases to count: :data:`STOCK_PHRASES` for None, none for ``none``.

    Args:
        spec: the option's value (comma-separated phrases).
    """
    if spec is None:
        return STOCK_PHRASES
    if spec.strip().lower() == "none":
        return ()
    return tuple(dict.fromkeys(" ".join(tokenize(p)) for p in spec.split(",") if tokenize(p)))


def frequent_captions(captions: Sequence[str], n: int = TOP_CAPTIONS) -> list[dict[str, Any]]:
    """The ``n`` most frequent captions with their counts, most frequent first (ties: first seen first).

    Args:
        captions: one caption per image.
        n: how many.
    """
    return [{"caption": c, "count": k} for c, k in Counter(captions).most_common(n)]


def _has_phrase(text: str, needle: str) -> bool:
    """Whether ``text`` holds ``needle`` (`` w1 w2 ``, tokenized, space-padded) as whole words."""
    return needle in f" {' '.join(tokenize(text))} "


def _needle(phrase: str) -> str:
    return f" {' '.join(tokenize(phrase))} "


def phrase_share(captions: Sequence[str], phrase: str) -> float:
    """Share of ``captions`` that contain ``phrase`` as whole words, after the project's tokenizer (0 for none).

    Args:
        captions: raw captions.
        phrase: a phrase (tokenized the same way).
    """
    needle = _needle(phrase)
    hits = sum(_has_phrase(c, needle) for c in captions)
    return hits / len(captions) if captions else 0.0


def stock_phrase_rates(captions: Sequence[str], references: Sequence[Sequence[str]],
                       phrases: Sequence[str] = STOCK_PHRASES) -> dict[str, dict[str, float | None]]:
    """How often the model says each phrase against how often people say it about the same images, and how
    often a photo's own people back it up.

    Args:
        captions: the model's caption of each image.
        references: each image's human captions.
        phrases: the phrases to count.

    Returns:
        phrase -> ``{"model": share of images whose caption has it, "human": share of the reference
        captions that have it, "ratio": model / human (None when no reference has it), "backed": share of the
        images whose caption has it where at least one of that image's own references has it too (None when
        no caption has it)}``. A ratio far above 1 with a low ``backed`` is a guess the model makes where
        people see something else.
    """
    refs = [r for rs in references for r in rs]
    out = {}
    for phrase in phrases:
        needle = _needle(phrase)
        said = [i for i, c in enumerate(captions) if _has_phrase(c, needle)]
        backed = sum(any(_has_phrase(r, needle) for r in references[i]) for i in said)
        model, human = len(said) / len(captions) if captions else 0.0, phrase_share(refs, phrase)
        out[phrase] = {"model": model, "human": human, "ratio": model / human if human > 0 else None,
                       "backed": backed / len(said) if said else None}
    return out


def diversity_figures(captions: Sequence[str], references: Sequence[Sequence[str]],
                      phrases: Sequence[str]) -> dict[str, Any]:
    """``top_captions`` (:func:`frequent_captions`) and ``stock_phrases`` (:func:`stock_phrase_rates`)
    of one decoding method; distinct words are ``caption_statistics``'s ``vocab_used``.

    Args:
        captions: the model's caption of each image.
        references: each image's human captions.
        phrases: the stock phrases.
    """
    return {"top_captions": frequent_captions(captions),
            "stock_phrases": stock_phrase_rates(captions, references, phrases)}


# -- outputs -------------------------------------------------------------------------------------

def _safe_name(id_: str) -> str:
    """A file-name stem for an image id (``"train/0001.jpg"`` -> ``"train_0001"``)."""
    stem = re.sub(r"\.(jpe?g|png|gif|webp|bmp|tiff?)$", "", id_, flags=re.IGNORECASE)
    return re.sub(r"[^\w.-]", "_", stem)[:100] or "image"


def save_thumbnail(image, path: Path) -> None:
    """A small JPEG (longest side THUMBNAIL_SIZE) of a PIL image, written atomically.

    Args:
        image: a PIL image.
        path: destination .jpg.
    """
    thumb = image.convert("RGB")
    thumb.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    with atomic_path(path) as tmp:
        thumb.save(tmp, format="JPEG", quality=THUMBNAIL_QUALITY)


def decoding_summary(result: dict[str, Any]) -> str:
    """The decoding settings of a result in words, e.g. ``max length 20, alpha 0.5, no repeated 3-grams``.

    Args:
        result: an evaluation result (older results may lack some settings).
    """
    parts = [f"max length {result.get('max_len')}", f"alpha {result.get('alpha')}"]
    ngram = result.get("no_repeat_ngram_size")
    if ngram is not None:
        parts.append(f"no repeated {ngram}-grams" if ngram else "no n-gram blocking")
    if result.get("min_len") not in (None, 1):
        parts.append(f"min length {result['min_len']}")
    if result.get("bad_endings"):
        parts.append("no ending on " + "/".join(result["bad_endings"]))
    summary = ", ".join(parts)
    recommended = result.get("recommended_decoding")
    if recommended:
        summary += " (the model recommends " + ", ".join(f"{k} {v}" for k, v in recommended.items()) + ")"
    return summary


def render_report(result: dict[str, Any]) -> str:
    """The Markdown report of one evaluation result (examples' ``thumbnail`` paths relative to the report).

    Args:
        result: the dict written to ``--out``.
    """
    cols = [("bleu1", "BLEU-1"), ("bleu2", "BLEU-2"), ("bleu3", "BLEU-3"), ("bleu4", "BLEU-4"), ("cider", "CIDEr-D"),
            ("precision", "P"), ("recall", "R"), ("f1", "F1"), ("mean_length", "mean length"),
            ("vocab_used", "distinct words"), ("images_per_s", "images/s")]
    out = [f"# Evaluation of `{result['model']}`", "",
           f"Dataset `{result['dataset']}`, split `{result['split']}`, {result['num_images']} images; "
           f"features {'from cache `' + result['features'] + '`' if result['features'] else 'computed live'} "
           f"(backbone `{(result.get('backbone') or {}).get('name')}`); {decoding_summary(result)}.", "",
           "| decoding | " + " | ".join(c for _, c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key, m in result["methods"].items():
        label = "greedy" if m["beam"] == 1 else f"beam {m['beam']}"
        out.append(f"| {label} | " + " | ".join(f"{m[k]:.4f}" if isinstance(m[k], float) and k != "images_per_s"
                                                   else f"{m[k]:.1f}" if isinstance(m[k], float) else str(m[k])
                                                   for k, _ in cols) + " |")
    out += render_diversity(result)
    out += ["", f"## Examples ({len(result['examples'])} random images, seed {result['seed']})", ""]
    for ex in result["examples"]:
        out += [f"### `{ex['id']}`", ""]
        if ex.get("thumbnail"):
            out += [f"![{ex['id']}]({ex['thumbnail']})", ""]
        for key, text in ex["captions"].items():
            out.append(f"- **{key}**: {text or '(empty)'}")
        out += ["- **ground truth**:"] + [f"  - {r}" for r in ex["references"]] + [""]
    return "\n".join(out)


def render_diversity(result: dict[str, Any]) -> list[str]:
    """Report lines: per decoding method, its distinct words, most frequent captions and stock-phrase
    rates against the human references (methods without these figures, from older results, are skipped).

    Args:
        result: the dict written to ``--out``.
    """
    out = []
    for m in result["methods"].values():
        if "top_captions" not in m:
            continue
        label = "greedy" if m["beam"] == 1 else f"beam {m['beam']}"
        out += ["", f"## {label}: distinct words, frequent captions, stock phrases", "",
                f"{m['vocab_used']} distinct words over {result['num_images']} captions.", "",
                "| most frequent captions | count |", "|---|---|"]
        out += [f"| {c['caption'] or '(empty)'} | {c['count']} |" for c in m["top_captions"]]
        if m.get("stock_phrases"):
            out += ["", "| phrase | model (share of images) | people (share of references) | model / people | "
                        "backed by the photo's own references |", "|---|---|---|---|---|"]
            for phrase, r in m["stock_phrases"].items():
                ratio = "-" if r["ratio"] is None else f"{r['ratio']:.1f}x"
                backed = "-" if r.get("backed") is None else f"{r['backed']:.0%}"  # older results lack it
                out.append(f"| {phrase} | {r['model']:.2%} | {r['human']:.2%} | {ratio} | {backed} |")
    return out


def update_model_evaluation(model_dir: Path, result: dict[str, Any], images: dict[str, Any] | None = None) -> Path:
    """Store ``result`` in ``model_dir/evaluation.json`` (replacing one of the same dataset and split).

    Args:
        model_dir: local model folder.
        result: one evaluation result as written to ``--out``.
        images: example id -> PIL image; thumbnails are copied to ``model_dir/examples/`` for the card.
    """
    from storyteller.card import EVALUATION_FILE, read_evaluations, write_model_card

    entry = json.loads(json.dumps(result))
    for ex in entry["examples"]:
        ex.pop("thumbnail", None)
        if images and ex["id"] in images:
            rel = f"examples/{_safe_name(ex['id'])}.jpg"
            save_thumbnail(images[ex["id"]], model_dir / rel)
            ex["image"] = rel
    same = (dataset_label(entry["dataset"]), entry["split"])  # older files named the dataset by its path
    evaluations = [e for e in read_evaluations(model_dir) if (dataset_label(e.get("dataset")), e.get("split")) != same]
    evaluations.append(entry)
    write_json_atomic(model_dir / EVALUATION_FILE, {"format": EVALUATION_FORMAT, "evaluations": evaluations})
    if (model_dir / "README.md").is_file():
        write_model_card(model_dir)
    return model_dir / EVALUATION_FILE


# -- main ----------------------------------------------------------------------------------------

@dataclass
class EvalSplit:
    """The images of the evaluated split.

    Attributes:
        ids: image ids.
        references: each image's human captions.
        features: (N, F) pooled features, or (N, h, w, F) grids for an attention decoder, on the device.
        dataset: the dataset's description (feature cache manifest or ``CaptionedImages.description``).
        extraction: ``{"images_per_s"}`` of live features, None for cached ones.
        images: the CaptionedImages of ``--dataset`` (thumbnails), or None.
    """

    ids: list[str]
    references: list[list[str]]
    features: torch.Tensor
    dataset: dict[str, Any]
    extraction: dict[str, float] | None
    images: Any


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The decoder in eval mode on ``device`` and the precision of its step weights.

    Args:
        args: the evaluate arguments.
        device: where it decodes.
    """
    try:
        model = load_decoder(args.model).to(device).eval()
        precision = use_precision(model, args.precision)  # a GPU runs fp32 whatever is asked
    except (ValueError, OSError) as e:
        sys.exit(f"{args.model}: {e}")
    return model, precision


def open_images(args: argparse.Namespace):
    """The CaptionedImages of ``--dataset`` (``--limit`` applied), or None without ``--dataset``.

    Args:
        args: the evaluate arguments.
    """
    if args.dataset is None:
        return None
    from train.data import open_captioned_images

    try:
        return open_captioned_images(args.dataset, args.split, limit_per_split=args.limit if args.limit > 0 else None)
    except ValueError as e:  # no such split / dataset: say so in one line
        sys.exit(str(e))


def cached_split(args: argparse.Namespace, model: torch.nn.Module, device: torch.device, images) -> EvalSplit:
    """The split from ``--features`` (a cache checked against the model's backbone).

    Args:
        args: the evaluate arguments.
        model: the decoder.
        device: where it decodes.
        images: the ``--dataset`` images (thumbnails) or None.
    """
    from train.features import FeatureCache, FeatureCacheError

    try:
        cache = FeatureCache.open(args.features, expect_backbone=model.backbone) if model.backbone else FeatureCache.open(args.features)
        rows = cache.split(args.split)
        grid = cache.require_grid() if getattr(model, "has_attention", False) else None
    except FeatureCacheError as e:
        sys.exit(str(e))
    if args.limit > 0:
        rows = rows[: args.limit]
    if grid is not None:
        features = torch.from_numpy(np.asarray(grid[rows], dtype=np.float32)).to(device)  # (N, h, w, F)
    else:
        features = torch.from_numpy(np.asarray(cache.features[rows], dtype=np.float32)).to(device)  # (N, F)
    return EvalSplit([cache.ids[r] for r in rows], [cache.captions[r] for r in rows], features,
                     cache.manifest.get("dataset") or {}, None, images)


def live_split(args: argparse.Namespace, model: torch.nn.Module, device: torch.device, images) -> EvalSplit:
    """The split from the ``--dataset`` photos, features computed with the model's own backbone.

    Args:
        args: the evaluate arguments.
        model: the decoder.
        device: where the backbone and the decoder run.
        images: the ``--dataset`` images.
    """
    if model.backbone is None:
        sys.exit(f"{args.model} has no backbone spec in its config.json; give --features from its feature cache")
    t0 = time.perf_counter()
    features = live_features(images, model.backbone, device, args.batch_size, args.workers,
                             grid=bool(getattr(model, "has_attention", False)))
    ids = [r.id for r in images.records]
    return EvalSplit(ids, [r.captions for r in images.records], features, images.description,
                     {"images_per_s": round(len(ids) / (time.perf_counter() - t0), 2)}, images)


def decode_methods(model: torch.nn.Module, split: EvalSplit, decoding: dict[str, Any], batch_size: int,
                   phrases: Sequence[str], device: torch.device) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """Caption the split with every beam size and score it.

    Args:
        model: the decoder.
        split: the images.
        decoding: :func:`decoding_settings`' result.
        batch_size: images per decoder batch.
        phrases: the stock phrases to count.
        device: where it decodes (CUDA is synchronised around the timing).

    Returns:
        ``(methods, captions)``: per method (``greedy``, ``beamK``) its figures and its captions.
    """
    from storyteller.metrics import evaluate_captions

    methods: dict[str, dict[str, Any]] = {}
    captions: dict[str, list[str]] = {}
    decode_all(model, split.features[:WARMUP_IMAGES], max(decoding["beams"]), max_len=WARMUP_STEPS,
               batch_size=WARMUP_IMAGES)
    settings = {k: decoding[k] for k in ("alpha", "no_repeat_ngram_size", "max_len", "min_len", "bad_endings")}
    for beam in decoding["beams"]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        texts = decode_all(model, split.features, beam, batch_size=batch_size, **settings)
        seconds = time.perf_counter() - t0
        key = method_name(beam)
        captions[key] = texts
        methods[key] = {"beam": beam, **evaluate_captions(texts, split.references), **caption_statistics(texts),
                        "images_per_s": len(texts) / seconds, **diversity_figures(texts, split.references, phrases)}
        print(f"{key}: BLEU-4 {methods[key]['bleu4']:.4f}  CIDEr-D {methods[key]['cider']:.4f}  "
              f"({methods[key]['images_per_s']:.0f} images/s)", file=sys.stderr)
    return methods, captions


def build_result(args: argparse.Namespace, model: torch.nn.Module, precision: str, split: EvalSplit,
                 decoding: dict[str, Any], methods: dict[str, dict[str, Any]],
                 captions: dict[str, list[str]]) -> dict[str, Any]:
    """The dict written to ``--out``, with ``--examples`` images drawn with ``--seed``.

    The dataset is named by its Hub id or its folder's name (never this machine's path: the result may
    ship in a model folder), the same whether the features came from a cache or live, so both ways of
    evaluating one split replace each other in evaluation.json.

    Args:
        args: the evaluate arguments.
        model: the decoder.
        precision: its step weights' precision.
        split: the images.
        decoding: :func:`decoding_settings`' result.
        methods: per method its figures.
        captions: per method its captions.
    """
    ids, references = split.ids, split.references
    pick = sorted(random.Random(args.seed).sample(range(len(ids)), min(args.examples, len(ids))))
    examples = [{"id": ids[i], "references": references[i], "captions": {k: captions[k][i] for k in captions}}
                for i in pick]
    name, hub = dataset_label(split.dataset if split.dataset.get("source") else str(args.dataset or ""))
    settings = {k: decoding[k] for k in ("alpha", "no_repeat_ngram_size", "max_len", "min_len", "bad_endings")}
    return {"format": EVALUATION_FORMAT, "model": model_label(args.model), "dataset": hub or name,
            "dataset_name": name, "split": args.split, "num_images": len(ids), "precision": precision,
            "features": Path(args.features).resolve().name if args.features else None,
            "backbone": model.backbone, **settings, "recommended_decoding": decoding_hints(model.extra),
            "extraction": split.extraction, "methods": methods, "seed": args.seed, "examples": examples}


def write_outputs(args: argparse.Namespace, result: dict[str, Any], images) -> None:
    """``--out``, ``--report`` (with thumbnails beside it) and ``--write-to-model``.

    Args:
        args: the evaluate arguments.
        result: :func:`build_result`'s dict (examples get their ``thumbnail`` paths here).
        images: the ``--dataset`` images, or None (no thumbnails).
    """
    examples = result["examples"]
    example_images = {}
    if images is not None and examples:
        index = {r.id: i for i, r in enumerate(images.records)}
        example_images = {ex["id"]: images.load_image(index[ex["id"]]) for ex in examples if ex["id"] in index}
    if args.report:
        report = Path(args.report)
        folder = report.with_name(report.stem + "_images")
        for ex in examples:
            if ex["id"] in example_images:
                rel = f"{folder.name}/{_safe_name(ex['id'])}.jpg"
                save_thumbnail(example_images[ex["id"]], report.parent / rel)
                ex["thumbnail"] = rel
        write_text_atomic(report, render_report(result))
    write_json_atomic(Path(args.out), result)
    if args.write_to_model:
        if not Path(args.model).is_dir():
            sys.exit(f"--write-to-model needs a local model folder; {args.model} is not one")
        update_model_evaluation(Path(args.model), result, example_images)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m train evaluate``: see the module docstring and ``--help``.

    Args:
        argv: command line without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        the result dict written to ``--out``.
    """
    args = build_parser().parse_args(argv)
    phrases = parse_phrases(args.stock_phrases)
    if args.features is None and args.dataset is None:
        sys.exit("give --dataset (features computed live) or --features (a feature cache)")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    model, precision = load_model(args, device)
    decoding = decoding_settings(args, model.extra)
    images = open_images(args)
    split = (cached_split if args.features is not None else live_split)(args, model, device, images)
    if not split.ids:
        sys.exit(f"no images in split {args.split!r}")
    methods, captions = decode_methods(model, split, decoding, args.batch_size, phrases, device)
    result = build_result(args, model, precision, split, decoding, methods, captions)
    write_outputs(args, result, images)
    return result


if __name__ == "__main__":
    main()
