"""The model card (README.md) of an exported model folder, for the Hugging Face Hub.

``write_model_card(model_dir)`` renders everything from the folder itself:

- ``config.json``: backbone spec (name, weights, preprocessing), decoder sizes, and ``extra`` as
  written by ``python -m train fit``: ``dataset`` (the feature cache's dataset description),
  ``training`` (epochs, best epoch, hyperparameters) and ``metrics`` (best validation figures);
- ``vocab.json``: vocabulary size;
- ``evaluation.json`` if present (``python -m train evaluate --write-to-model``): one results table
  per evaluated dataset/split, and example captions;
- ``loss_curve.png`` if present, shown in the card.

The front matter carries library_name, tags, license, datasets (when the source is a Hub dataset
id), pipeline_tag image-to-text and a model-index with the scores, so the Hub shows them.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .fileio import write_text_atomic

EVALUATION_FILE = "evaluation.json"
CARD_FILE = "README.md"
METRIC_COLUMNS = [("bleu1", "BLEU-1"), ("bleu2", "BLEU-2"), ("bleu3", "BLEU-3"), ("bleu4", "BLEU-4"),
                  ("cider", "CIDEr-D")]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# An absolute path of some machine inside a text: /a/b (two parts at least, not a URL's path), ~/x,
# C:\x or file://. Relative paths such as examples/x.jpg and URLs are not matched.
_ABS_PATH = re.compile(r"(?<![\w.:/-])(?:/[\w.@+-]+(?:/[\w.@+-]*)+|~/[\w.-]+|[A-Za-z]:\\\\?[\w.-]+)|file://")
# Files a model folder publishes whose text must name no machine path.
PUBLISHED_TEXT_FILES = ("config.json", "evaluation.json", "README.md")


def read_evaluations(model_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The evaluations stored in ``model_dir/evaluation.json`` (empty list if there is none).

    Args:
        model_dir: a model folder.
    """
    path = Path(model_dir) / EVALUATION_FILE
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    return list(data.get("evaluations", []))


def dataset_label(dataset: Any) -> tuple[str, str | None]:
    """(human-readable name, Hub dataset id or None) of a dataset, never a local path.

    Args:
        dataset: config extra's ``dataset`` entry (the feature cache's description ``{"source",
            "kind", ...}``, or ``{"name"}``), or an evaluation's ``dataset`` (a Hub id or a path).
    """
    kind = None
    if isinstance(dataset, str):
        source = dataset
    elif isinstance(dataset, dict):  # the feature cache's description: {"source", "kind": hub|imagefolder|parquet, ...}
        source = str(dataset.get("source") or dataset.get("name") or "")
        kind = dataset.get("kind")
    else:
        source = ""
    if not source:
        return "unknown dataset", None
    is_hub = kind == "hub" if kind else bool(_HUB_ID.match(source)) and not Path(source).exists()
    hub = source if is_hub else None
    name = hub or Path(source.rstrip("/")).name or source
    return name, hub


def public_dataset(description: Any) -> dict[str, Any]:
    """A dataset description fit to ship in a model: its name (or Hub id) instead of a local path.

    Args:
        description: the feature cache's / ``CaptionedImages.description`` (``{"source", "kind",
            "splits", ...}``), or an already public one (returned with the same keys).

    Returns:
        ``{"name", "kind", "splits", ...}``, plus ``"source"`` (the Hub id) and its ``revision`` for
        Hub datasets; never a path of the machine that trained or evaluated the model. A description
        whose source is a bare name (no path) is returned unchanged.
    """
    name, hub = dataset_label(description)
    d = description if isinstance(description, dict) else {}
    source = str(d.get("source") or "")
    if d and not hub and source and not (Path(source).expanduser().is_absolute() or "/" in source or "\\" in source
                                         or source.startswith((".", "~"))):
        return dict(d)  # a bare name (e.g. "synthetic") is no machine's path: kept as it is
    out: dict[str, Any] = {"name": name, "kind": d.get("kind") or ("hub" if hub else "local")}
    if hub:
        out["source"] = hub
        if d.get("revision"):
            out["revision"] = d["revision"]
    for key in ("columns", "splits", "limit_per_split"):
        if key in d:
            out[key] = d[key]
    return out


def local_paths(text: str) -> list[str]:
    """The absolute paths (``/home/me/data``, ``~/x``, ``C:\\x``, ``file://``) written in ``text``.

    Args:
        text: a file's contents (JSON, Markdown...).
    """
    return sorted(set(_ABS_PATH.findall(text)))


def published_local_paths(model_dir: str | os.PathLike) -> dict[str, list[str]]:
    """File name -> absolute paths found in a model folder's published text files (empty if clean).

    Args:
        model_dir: a model folder.
    """
    found = {}
    for name in PUBLISHED_TEXT_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            hits = local_paths(path.read_text(encoding="utf-8", errors="replace"))
            if hits:
                found[name] = hits
    return found


def _fmt(value: Any, digits: int = 4, key: str = "") -> str:
    if isinstance(value, float) and key in ("images_per_s", "mean_length"):
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def _metrics_table(rows: list[tuple[str, dict[str, Any]]], extra_cols: list[tuple[str, str]]) -> str:
    cols = METRIC_COLUMNS + extra_cols
    head = "| decoding | " + " | ".join(label for _, label in cols) + " |"
    sep = "|---" * (len(cols) + 1) + "|"
    body = ["| " + name + " | " + " | ".join(_fmt(m.get(k), key=k) for k, _ in cols) + " |" for name, m in rows]
    return "\n".join([head, sep, *body])


def _method_label(key: str, metrics: dict[str, Any]) -> str:
    beam = metrics.get("beam")
    if key == "greedy" or beam == 1:
        return "greedy"
    return f"beam {beam}" if beam else key


def _front_matter(config: dict[str, Any], evaluations: list[dict[str, Any]], name: str, license: str) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    extra = config.get("extra") or {}
    ds_name, hub_id = dataset_label(extra.get("dataset"))
    results = []
    for ev in evaluations:  # evaluate's figures first: they are the measured ones
        # each evaluation under the dataset it was run on, which need not be the training one
        ev_name, ev_hub = dataset_label(ev.get("dataset")) if ev.get("dataset") else (ds_name, hub_id)
        for key, m in ev.get("methods", {}).items():
            for metric, label in (("bleu4", "BLEU-4"), ("cider", "CIDEr-D")):
                if m.get(metric) is not None:
                    results.append(EvalResult(task_type="image-to-text", dataset_type=ev_hub or ev_name,
                                              dataset_name=ev.get("dataset_name") or ev_name, dataset_split=ev.get("split"),
                                              metric_type="bleu" if metric == "bleu4" else "cider",
                                              metric_name=f"{label} ({_method_label(key, m)})",
                                              metric_value=round(float(m[metric]), 4)))
    train_metrics = extra.get("metrics") or {}
    if not results:  # no evaluation.json: the validation figures of training
        for metric, label in (("bleu4", "BLEU-4"), ("cider", "CIDEr-D")):
            if train_metrics.get(metric) is not None:
                results.append(EvalResult(task_type="image-to-text", dataset_type=hub_id or ds_name, dataset_name=ds_name,
                                          dataset_split=train_metrics.get("split"),
                                          metric_type="bleu" if metric == "bleu4" else "cider",
                                          metric_name=f"{label} (greedy)", metric_value=round(float(train_metrics[metric]), 4)))
    backbone = (config.get("backbone") or {}).get("name")
    family = ["show-attend-tell", "attention"] if _attention(config) else ["show-and-tell"]
    family += ["ensemble"] if config.get("decoder") == "ensemble" else []
    data = ModelCardData(library_name="neural-storyteller", license=license, pipeline_tag="image-to-text",
                         tags=["image-captioning", *family, "lstm", *([backbone] if backbone else [])],
                         datasets=[hub_id] if hub_id else None, metrics=["bleu", "cider"],
                         model_name=name, eval_results=results or None)
    return data.to_yaml()


def _attention(config: dict[str, Any]) -> bool:
    """True for a model that reads the CNN's feature grid: Show-Attend-Tell, or an ensemble holding one."""
    members = config.get("members") if config.get("decoder") == "ensemble" else None
    if isinstance(members, list):
        return any(isinstance(m, dict) and _attention(m) for m in members)
    return config.get("decoder") == "show_attend_tell"


def _member_words(config: dict[str, Any]) -> str:
    """One decoder of an ensemble in a few words."""
    if config.get("decoder") == "show_attend_tell":
        return f"a Show-Attend-Tell LSTM (hidden {config.get('hidden_dim')}) attending over the grid"
    return (f"a Show-and-Tell LSTM ({config.get('num_layers')} layer(s), hidden {config.get('hidden_dim')}) started "
            "from the pooled feature")


def ensemble_summary(config: dict[str, Any], shown: str = "") -> str:
    """An ensemble's ``config.json`` (a dict) in one sentence for visitors: how many decoders of which kind read
    what, and how they are joined. ``shown`` follows the words on looking over the grid (e.g. where the page
    shows it)."""
    members = [m for m in config.get("members") or [] if isinstance(m, dict)]
    attending = sum(_attention(m) for m in members)
    pooled = len(members) - attending
    weights = config.get("weights")
    mean = "weighted mean" if weights and len(set(weights)) > 1 else "mean"
    if not attending:
        return (f"{len(members)} Show-and-Tell LSTM decoders decoded as one: a frozen ImageNet CNN sums the photo up in "
                f"one feature vector, each decoder starts from it, and the caption follows the {mean} of their next-word "
                "probabilities.")
    parts = []
    if pooled:
        parts.append("a Show-and-Tell decoder reads their mean" if pooled == 1 else
                     f"{pooled} Show-and-Tell decoders read their mean")
    parts.append(("a Show-Attend-Tell decoder looks" if attending == 1 else f"{attending} Show-Attend-Tell decoders look")
                 + f" over the grid for every word{shown}")
    return (f"{len(members)} LSTM decoders decoded as one: a frozen ImageNet CNN turns the photo into a grid of "
            f"features; {', '.join(parts)}; and the caption follows the {mean} of their next-word probabilities.")


def _intro(config: dict[str, Any], name: str, ds_name: str) -> list[str]:
    backbone = config.get("backbone") or {}
    cnn, dim = backbone.get("name", "CNN"), backbone.get("feature_dim", config.get("feature_dim"))
    if config.get("decoder") == "ensemble":
        members = [m for m in config.get("members") or [] if isinstance(m, dict)]
        what = (f"An ensemble image captioner: a frozen ImageNet **{cnn}** turns a photo into "
                + (f"a grid of {dim}-d features (their mean is the pooled feature);" if _attention(config) else
                   f"one pooled {dim}-d feature;") + f" {len(members)} decoders over {config.get('vocab_size')} tokens ("
                + "; ".join(_member_words(m) for m in members) + ") each predict the next word, and the caption "
                "follows the " + ("weighted " if len(set(config.get("weights") or [1])) > 1 else "") + "mean of their "
                "probabilities" + (", so where the attention decoder looked can be shown per word."
                                   if _attention(config) else "."))
    elif _attention(config):
        grid = "x".join(map(str, config.get("grid") or [])) or "h x w"
        what = (f"A Show-Attend-Tell image captioner: a frozen ImageNet **{cnn}** turns a photo into a {grid} grid of "
                f"{dim}-d features; an LSTM (hidden {config.get('hidden_dim')}, embeddings {config.get('embed_dim')}, "
                f"{config.get('vocab_size')} tokens) writes the caption word by word and looks at the grid for every "
                "word (soft attention, Xu et al. 2015), so where it looked can be shown per word.")
    else:
        what = (f"A Show-and-Tell image captioner: a frozen ImageNet **{cnn}** turns a photo into one pooled {dim}-d "
                f"feature, which sets the initial state of an LSTM language model ({config.get('num_layers')} layer(s), "
                f"hidden {config.get('hidden_dim')}, embeddings {config.get('embed_dim')}, {config.get('vocab_size')} "
                "tokens) that writes the caption word by word.")
    return [f"# {name}", "", f"{what} Trained with Neural Storyteller on **{ds_name}**.", ""]


def _results_section(model_dir: Path, evaluations: list[dict[str, Any]], train_metrics: dict[str, Any],
                     ds_name: str) -> list[str]:
    out = ["## Results", ""]
    for ev in evaluations:
        rows = [(_method_label(k, m), m) for k, m in ev.get("methods", {}).items()]
        ngram = ev.get("no_repeat_ngram_size")
        blocking = "" if ngram is None else f", no repeated {ngram}-grams" if ngram else ", no n-gram blocking"
        min_len = f", at least {ev['min_len']} words" if ev.get("min_len") not in (None, 1) else ""
        out += [f"**{ev.get('dataset_name', ds_name)}**, split `{ev.get('split')}`, {ev.get('num_images')} images, "
                f"max {ev.get('max_len')} words{min_len}, length-normalisation alpha {ev.get('alpha')}{blocking} "
                f"({'cached features' if ev.get('features') else 'features computed from the photos'}):", "",
                _metrics_table(rows, [("mean_length", "mean length"), ("vocab_used", "distinct words"),
                                      ("images_per_s", "images/s")]), ""]
    if train_metrics:
        out += [f"Best validation epoch during training (split `{train_metrics.get('split')}`, "
                f"{train_metrics.get('decoding', 'greedy')}):", "",
                _metrics_table([("greedy", train_metrics)], [("val_loss", "val loss")]), ""]
    if not evaluations and not train_metrics:
        out += ["No scores recorded in this folder.", ""]
    out += ["BLEU and CIDEr-D are computed as coco-caption does (BLEU on a 0..1 scale, CIDEr-D x10), after the "
            "project's tokenizer (lowercase, punctuation stripped).", ""]
    if (model_dir / "loss_curve.png").is_file():
        out += ["## Training curve", "", "![training and validation loss per epoch](loss_curve.png)", ""]
    return out


def _examples_section(model_dir: Path, examples: list[dict[str, Any]]) -> list[str]:
    if not examples:
        return []
    methods = list(dict.fromkeys(k for ex in examples for k in ex.get("captions", {})))
    # thumbnails only where the file is in the folder (an upload must then carry examples/ too)
    examples = [dict(ex, image=ex["image"] if ex.get("image") and (model_dir / ex["image"]).is_file() else None)
                for ex in examples]
    show_images = any(ex.get("image") for ex in examples)
    head = (["image"] if show_images else []) + ["id"] + [re.sub(r"^beam(\d+)$", r"beam \1", m) for m in methods] \
        + ["references (first two)"]
    out = ["## Example captions", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for ex in examples:
        cells = [f"![{ex.get('id')}]({ex['image']})" if ex.get("image") else ""] if show_images else []
        cells += [f"`{ex.get('id')}`"] + [_cell(ex.get("captions", {}).get(m, "")) for m in methods]
        cells += ["<br>".join(_cell(r) for r in ex.get("references", [])[:2])]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    return out


def _confidence_section(model_dir: Path) -> list[str]:
    """What the model's confidence means and how well it was calibrated (``calibration.json``); nothing without one."""
    path = model_dir / "calibration.json"  # storyteller.confidence.CALIBRATION_FILE (card imports no torch module)
    if not path.is_file():
        return []
    cal = json.loads(path.read_text(encoding="utf-8"))
    v = cal.get("validation") or {}
    spread = next((x for k, x in v.items() if k.startswith("over_") and isinstance(x, dict)), {})

    def fig(key: str) -> str:
        s = spread.get(key) or {}
        return f"{s['mean']:.3f} ± {s['sd']:.3f}" if "mean" in s else _fmt(v.get(key), 3)

    out = ["## Confidence", "",
           f"Every caption carries a `confidence`: the estimated probability that it is good, where good means "
           f"{_cell(cal.get('criterion', {}).get('description', '?'))}. It is a logistic function of "
           f"{', '.join(f'`{s}`' for s in cal.get('signals', []))}, fitted by `python -m train calibrate` on "
           f"{v.get('photos', '?')} {v.get('split', 'validation')} photos (figures: fitted on one half, judged on the "
           f"other, over random halvings). References are other people's words, not a person's eyes: treat it as a "
           f"ranking of which captions to check first.", "",
           "| | validation |", "|---|---:|",
           f"| share of good captions | {_fmt(v.get('good_rate'), 3)} |",
           f"| mean confidence | {fig('mean_confidence')} |",
           f"| AUROC against the criterion | {fig('auroc_criterion')} |",
           f"| AUROC against per-photo CIDEr-D above the median | {fig('auroc_cider_above_median')} |",
           f"| expected calibration error | {fig('ece')} |",
           f"| mean CIDEr-D of the most confident quarter / of all | {fig('top_quarter_cider_ratio')} |", ""]
    return out


def _details_section(config: dict[str, Any]) -> list[str]:
    backbone = config.get("backbone") or {}
    pre = backbone.get("preprocessing") or {}
    vocab_size = config.get("vocab_size")
    if config.get("decoder") == "ensemble":
        decoder = ("- **Decoder**: an ensemble, decoded as one decoder: log p(word) = log sum_i w_i p_i(word) over "
                   + "; ".join(_member_words(m) for m in config.get("members") or [] if isinstance(m, dict))
                   + f" (weights {config.get('weights') or 'equal'}).")
    else:
        decoder = (f"- **Decoder**: image feature -> Linear -> tanh -> LSTM initial state (h0, c0); word embeddings "
                   f"({config.get('embed_dim')}) -> LSTM ({config.get('num_layers')} x {config.get('hidden_dim')}) -> "
                   f"Linear over {vocab_size} tokens; dropout {config.get('dropout')}.")
    return ["## Model details", "",
            f"- **Backbone**: `{backbone.get('name')}` (weights `{backbone.get('weights')}`), frozen; global average "
            f"pooling gives a {backbone.get('feature_dim')}-d feature.",
            f"- **Preprocessing**: resize the short side to {pre.get('resize')} ({pre.get('interpolation')}), "
            f"centre crop {pre.get('crop')}x{pre.get('crop')}, scale to [0, 1], normalise with mean "
            f"{pre.get('mean')} and std {pre.get('std')}. `config.json` stores this spec; "
            f"`storyteller.backbones.create_backbone(model.backbone)` rebuilds the same network and transform.",
            decoder,
            f"- **Vocabulary**: `vocab.json`, {vocab_size} tokens including `<pad> <start> <end> <unk>`.", ""]


def _training_section(training: dict[str, Any], ds_name: str, hub_id: str | None) -> list[str]:
    out = ["## Training data", ""]
    out.append(f"- **Dataset**: {ds_name}" + (f" ([{hub_id}](https://huggingface.co/datasets/{hub_id}))" if hub_id else ""))
    if training.get("method"):
        out.append(f"- **Training**: {training['method']}.")
    if training.get("train_images"):  # a finished run's record (an average of a run still going has none)
        out.append(f"- **Splits**: trained on `{training.get('train_split')}` ({training.get('train_images')} images), "
                   f"model selected on `{training.get('val_split')}` ({training.get('val_images')} images) by "
                   f"{training.get('select')}; best epoch {training.get('best_epoch')} of {training.get('epochs_run')} run.")
    elif training.get("train_split"):
        out.append(f"- **Splits**: trained on `{training.get('train_split')}`, checked on `{training.get('val_split')}`.")
    hp = training.get("hyperparameters") or {}
    if hp:
        out.append("- **Hyperparameters**: " + ", ".join(f"{k} {v}" for k, v in hp.items()) + ".")
    out.append("")
    return out


def _usage_section(load_from: str, vocab_size: Any, ds_name: str) -> list[str]:
    out = ["## How to use", "", "```python", "import storyteller", "",
           f'captioner = storyteller.load("{load_from}")  # decoder + vocabulary + the CNN named in config.json',
           'print(captioner("photo.jpg"))  # beam-search caption', "```", "",
           "or step by step:", "", "```python", "from PIL import Image", "",
           "from storyteller import beam_search, greedy_search, load_decoder",
           "from storyteller.backbones import create_backbone", "",
           f'model = load_decoder("{load_from}")  # config.json + model.safetensors + vocab.json',
           "backbone = create_backbone(model.backbone)  # the CNN and preprocessing the decoder was trained with",
           "# (1, feature_dim), or an attention model's (1, h, w, feature_dim) grid",
           'features = backbone.encode([Image.open("photo.jpg")], grid=model.has_attention)',
           "print(greedy_search(model, features)[0].text)",
           "print(beam_search(model, features, beam_size=3)[0][0].text)", "```", ""]
    out += ["## Intended use", "",
            "Short, literal English descriptions of everyday photos (people, animals, outdoor scenes) for demos, "
            "teaching and as a baseline for captioning research. Not for accessibility-critical alt text without human "
            "review, surveillance, or any decision about people.", ""]
    out += ["## Limitations", "",
            f"- It only knows the {vocab_size} tokens of its training captions and the kinds of scenes in {ds_name}; "
            "other photos get plausible-sounding but often wrong captions.",
            "- Counts, spatial relations and small objects are often wrong, and captions tend to be generic (the "
            "most frequent phrasing wins): a pooled model sees one feature per image, an attention model a coarse grid.",
            "- It inherits the biases of its training captions (e.g. gendered words guessed from appearance).",
            "- Scores on a validation split used for model selection are optimistic; compare models on a held-out split.", ""]
    return out


def write_model_card(model_dir: str | os.PathLike, *, repo_id: str | None = None,
                     examples: list[dict[str, Any]] | None = None, license: str = "mit") -> Path:
    """Write ``model_dir/README.md`` (atomically) from the folder's config, evaluation and plot.

    Args:
        model_dir: a folder written by ``ShowAndTell.save_pretrained`` (config.json, vocab.json...).
        repo_id: the Hub repo the card is for (e.g. ``"user/storyteller-flickr8k"``); used as the
            model name and in the loading snippet. Default: a name made of dataset and backbone, loaded by path.
        examples: example captions to show, each ``{"id": str, "references": [str, ...],
            "captions": {"greedy": str, "beam 3": str, ...}, "image": optional path relative to
            model_dir}``. Default: the examples of the first evaluation in evaluation.json, if any.
        license: the card's license identifier.

    Returns:
        the path of the written README.md.
    """
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    extra = config.get("extra") or {}
    evaluations = read_evaluations(model_dir)
    if examples is None:
        examples = next((ev["examples"] for ev in evaluations if ev.get("examples")), [])
    ds_name, hub_id = dataset_label(extra.get("dataset"))
    backbone_name = (config.get("backbone") or {}).get("name", "cnn")
    name = repo_id or re.sub(r"[^\w.-]+", "-", f"neural-storyteller-{ds_name}-{backbone_name}").strip("-")
    out = ["---", _front_matter(config, evaluations, name, license).rstrip(), "---", ""]
    out += _intro(config, name, ds_name)
    out += _results_section(model_dir, evaluations, extra.get("metrics") or {}, ds_name)
    out += _examples_section(model_dir, examples)
    out += _confidence_section(model_dir)
    out += _details_section(config)
    out += _training_section(extra.get("training") or {}, ds_name, hub_id)
    out += _usage_section(repo_id or "path/to/this/folder", config.get("vocab_size"), ds_name)
    path = model_dir / CARD_FILE
    write_text_atomic(path, "\n".join(out))
    return path


def _cell(text: str) -> str:
    """Text made safe for one Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")
