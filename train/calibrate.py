"""Fit a model's confidence calibration on validation photos: ``python -m train calibrate --model DIR``.

    python -m train calibrate --model models/flickr8k-lite0-ensemble --dataset ../shared/data/flickr8k \\
        [--features CACHE] [--plot docs/reliability.png] [--dry-run]

1. The neighbours: the training photos' pooled features (from ``--features``, a ``train extract`` cache, or
   computed here), projected by a PCA fitted on them, and their human captions (``storyteller.confidence``).
2. Every validation photo is captioned as users get it (``Captioner.caption``: greedy and the beam's n-best at
   the model's own decoding), and every caption gets its signals (``storyteller.confidence.SIGNALS``).
3. What "good" means (``CRITERION``): every content word of the caption is backed by the photo's own five
   human captions (the same word, the same stem, or a word of the same group in ``SYNONYMS``).
4. Cross-validation: the photos are split into two halves at random (``--seed``); a logistic regression is
   fitted on each half and judged on the other. The figures (AUROC against the criterion and against "per-photo
   CIDEr-D above the median", expected calibration error, a reliability table, the risk-coverage table, the
   n-best chosen by confidence) are of those judged halves only.
5. The calibration written into the model folder is the same regression fitted on all the validation photos:
   ``calibration.json`` (criterion, signals, weights, figures) and ``calibration.safetensors`` (neighbours).

The test photos are never read: the figures are validation figures (the validation split also chose the
models' epochs and decoding, so they are somewhat optimistic; docs/results.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storyteller.cider import CaptionReward
from storyteller.confidence import (BADGES, SIGNALS, Calibrator, Neighbours, badge, logistic, pooled, sigmoid,
                                    signal_rows)
from storyteller.vocab import tokenize

# Words that carry no claim about the photo: a caption is judged on the rest.
FUNCTION_WORDS = frozenset(
    "a an the of with in on at to and his her their its is are while for from by near into onto over under up down "
    "out through some two three one four other another each something it this that there as be being has have who "
    "which very".split())
# Words a reader accepts for each other (a "man" whom the references call a "person" is not a mistake).
SYNONYMS: tuple[frozenset[str], ...] = tuple(frozenset(g.split()) for g in (
    "man person guy men people male gentleman", "woman lady person women people female girl",
    "boy child kid children kids toddler baby youngster son", "girl child kid children kids toddler baby daughter",
    "dog puppy dogs animal", "people persons group crowd men women person", "shirt top tshirt t-shirt",
    "water lake river ocean sea pool", "grass field lawn grassy", "road street", "rock rocks cliff boulder",
    "bike bicycle", "jumps leaps jumping leaping"))
MIN_CIDER = 0.5  # the criterion's floor of per-photo CIDEr-D: a caption must also say enough of what people said
CRITERION = {
    "name": "content-words-backed-and-cider-0.5",
    "description": ("every content word of the caption (not a function word) is backed by one of the photo's own "
                    "human captions (the same word, the same stem (-s, -es, -ing, -ed), or a word of the same synonym "
                    "group: man/person/guy, boy/child/kid, ...), and the caption's CIDEr-D against those captions "
                    f"(document frequencies of the training captions) is at least {MIN_CIDER}: nothing it says is "
                    "unbacked, and it says enough (train/calibrate.py lists the words)")}
DEFAULT_SIGNALS = ("norm_log_prob", "consensus")


def stem(word: str) -> str:
    """A crude stem: the word without -ing, -es, -s or -ed (at least three letters left)."""
    for suffix in ("ing", "es", "s", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def backed_share(caption: str, references: list[str]) -> float:
    """The share of the caption's content words that some reference backs (0 for a caption without any)."""
    words = [w for w in tokenize(caption) if w not in FUNCTION_WORDS]
    if not words:
        return 0.0
    ref_words = {w for r in references for w in tokenize(r)}
    ref_stems = {stem(w) for w in ref_words}
    backed = [w in ref_words or stem(w) in ref_stems or any(w in g and g & ref_words for g in SYNONYMS)
              for w in words]
    return sum(backed) / len(words)


def is_good(caption: str, references: list[str], cider: float) -> bool:
    """The criterion (``CRITERION``): every content word backed and a per-photo CIDEr-D of ``MIN_CIDER`` or more."""
    return cider >= MIN_CIDER and backed_share(caption, references) == 1.0


# -- the statistics ---------------------------------------------------------------------------------
def auroc(score: np.ndarray, label: np.ndarray) -> float:
    """The probability that a random positive scores above a random negative (ties count half); NaN without both."""
    score, label = np.asarray(score, dtype=np.float64), np.asarray(label, dtype=bool)
    pos, neg = int(label.sum()), int((~label).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    # average ranks over ties: each run of equal scores gets the mean of its positions (1-based)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(score)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return float((ranks[label].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iterations: int = 50
                 ) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Logistic regression on standardised columns by Newton's method with a small L2 penalty.

    Returns:
        (weights, intercept, mean, scale) of ``Calibrator``.
    """
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    z = np.c_[np.ones(len(x)), (x - mean) / scale]
    w = np.zeros(z.shape[1])
    ridge = l2 * np.diag(np.r_[0.0, np.ones(z.shape[1] - 1)])  # the intercept is not penalised
    for _ in range(iterations):
        p = sigmoid(z @ w)
        step = np.linalg.solve((z * (p * (1 - p))[:, None]).T @ z + ridge, z.T @ (p - y) + ridge @ w)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w[1:], float(w[0]), mean, scale


def reliability(p: np.ndarray, y: np.ndarray, bins: int = 10) -> tuple[list[dict[str, float]], float]:
    """Equal-width bins of confidence: (rows of {low, high, count, mean_confidence, rate}, expected calibration error)."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            rows.append({"low": round(float(edges[b]), 2), "high": round(float(edges[b + 1]), 2), "count": int(m.sum()),
                         "mean_confidence": round(float(p[m].mean()), 4), "rate": round(float(y[m].mean()), 4)})
            ece += m.mean() * abs(p[m].mean() - y[m].mean())
    return rows, float(ece)


def risk_coverage(p: np.ndarray, good: np.ndarray, cider: np.ndarray) -> list[dict[str, float]]:
    """The most confident 25/50/75/100%: their share of good captions and mean per-photo CIDEr-D."""
    order = np.argsort(-p, kind="stable")
    out = []
    for share in (0.25, 0.5, 0.75, 1.0):
        top = order[: max(1, int(round(share * len(p))))]
        out.append({"coverage": share, "good": round(float(good[top].mean()), 4),
                    "cider_d": round(float(cider[top].mean()), 4), "min_confidence": round(float(p[top].min()), 4)})
    return out


# -- the data ---------------------------------------------------------------------------------------
def build_neighbours(features: np.ndarray, captions: list[list[str]], dim: int, k: int) -> Neighbours:
    """The training photos as ``Neighbours``: a PCA of their pooled features to ``dim`` and their captions."""
    x = torch.as_tensor(features, dtype=torch.float64)
    mean = x.mean(0)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    projection = v[:dim].T  # (D, dim): the first principal directions
    bank = (x - mean) @ projection
    bank = bank / bank.norm(dim=1, keepdim=True).clamp_min(1e-12)
    reward = CaptionReward(captions)
    encoded = [reward.encode(c) for refs in captions for c in refs]
    image_refs = np.concatenate([[0], np.cumsum([len(r) for r in captions])])
    return Neighbours(mean.float(), projection.float(), bank.half(), encoded, image_refs, reward, k)


def training_features(captioner, dataset: str, split: str, cache: str | None, batch: int
                      ) -> tuple[np.ndarray, list[list[str]]]:
    """Pooled features and captions of the training photos: from a feature cache, else computed here."""
    if cache:
        from train.features import FeatureCache

        c = FeatureCache.open(cache, expect_backbone=captioner.model.backbone)
        rows = np.asarray(c.split(split))
        return np.asarray(c.features[rows], dtype=np.float32), [c.captions[i] for i in rows]
    from train.data import open_captioned_images

    images = open_captioned_images(dataset, split=split)
    feats = []
    for s in range(0, len(images), batch):
        f = captioner.features([images.load_image(i) for i in range(s, min(s + batch, len(images)))])
        feats.append(pooled(f).float().numpy())
        print(f"  training features {min(s + batch, len(images))}/{len(images)}", file=sys.stderr, flush=True)
    return np.concatenate(feats), [r.captions for r in images.records]


def caption_split(captioner, dataset: str, split: str, batch: int, limit: int | None):
    """Caption every photo of ``split`` as users get it: (results, references, pooled features)."""
    from train.data import open_captioned_images

    images = open_captioned_images(dataset, split=split, limit_per_split=limit)
    beam = captioner.decoding["beam_size"]
    results, rows = [], []
    for s in range(0, len(images), batch):
        pils = [images.load_image(i) for i in range(s, min(s + batch, len(images)))]
        features = captioner.features(pils)
        results += captioner.caption_features(features, n_best=beam)
        rows.append(pooled(features))
        print(f"  captioned {len(results)}/{len(images)}", file=sys.stderr, flush=True)
    return results, [r.captions for r in images.records], torch.cat(rows)


def collect(signals: list[str], neighbours: Neighbours, results, references, features):
    """Per caption (greedy and each beam entry of every photo): its photo, kind, signals, criterion and CIDEr-D."""
    captions, photo, kind = [], [], []
    for b, r in enumerate(results):
        for j, c in enumerate([r.greedy] + list(r.beam)):
            captions.append(c)
            photo.append(b)
            kind.append(j)  # 0 greedy, 1.. the beam's n-best
    texts = [c.text for c in captions]
    consensus = neighbours.consensus(features, texts, photo)
    rows = signal_rows(signals, captions, consensus)
    cider = neighbours.reward.score([neighbours.reward.encode(t) for t in texts], np.array(photo),
                                    neighbours.reward.encode_references(references))[0]  # each photo's refs once
    good = np.array([is_good(t, references[b], x) for t, b, x in zip(texts, photo, cider)])
    return {"texts": texts, "photo": np.array(photo), "kind": np.array(kind), "rows": rows, "good": good,
            "cider": cider}


def cross_validate(data: dict[str, Any], cols: list[int], seed: int) -> np.ndarray:
    """Each photo's captions' confidences from the regression fitted on the other half of the photos (beam
    captions, the first of each n-best, are what it is fitted on)."""
    photos = np.unique(data["photo"])
    rng = np.random.default_rng(seed)
    half = set(rng.permutation(photos)[: len(photos) // 2].tolist())
    in_a = np.array([p in half for p in data["photo"]])
    out = np.zeros(len(in_a))
    fit_rows = data["kind"] == 1
    for train_half in (in_a, ~in_a):
        w, b, mean, scale = fit_logistic(data["rows"][train_half & fit_rows][:, cols],
                                         data["good"][train_half & fit_rows].astype(float))
        out[~train_half] = logistic(data["rows"][~train_half][:, cols], w, b, mean, scale)
    return out


def judge(p: np.ndarray, data: dict[str, Any]) -> dict[str, Any]:
    """The figures of cross-validated confidences on the beam captions."""
    m = data["kind"] == 1
    pb, good, cider = p[m], data["good"][m], data["cider"][m]
    table, ece = reliability(pb, good)
    coverage = risk_coverage(pb, good, cider)
    by_badge = {}
    for _, label, key in BADGES:
        sel = np.array([badge(x)[1] == key for x in pb])
        by_badge[label] = {"captions": int(sel.sum()), "good": round(float(good[sel].mean()), 4) if sel.any() else None}
    return {"photos": int(m.sum()), "good_rate": round(float(good.mean()), 4),
            "mean_confidence": round(float(pb.mean()), 4), "auroc_criterion": round(auroc(pb, good), 4),
            "auroc_cider_above_median": round(auroc(pb, cider > np.median(cider)), 4),
            "ece": round(ece, 4), "reliability": table, "risk_coverage": coverage,
            "top_quarter_cider_ratio": (round(float(coverage[0]["cider_d"] / cider.mean()), 4)
                                        if cider.mean() > 0 else None),
            "badges": by_badge}


def rerank(p: np.ndarray, data: dict[str, Any]) -> dict[str, Any]:
    """The beam's first caption against the n-best entry with the highest cross-validated confidence."""
    beam = np.flatnonzero(data["kind"] == 1)
    chosen = []
    for i in beam:
        mine = np.flatnonzero((data["photo"] == data["photo"][i]) & (data["kind"] >= 1))
        chosen.append(mine[np.argmax(p[mine])])
    chosen = np.array(chosen)
    return {"beam_first": {"good": round(float(data["good"][beam].mean()), 4), "cider_d": round(float(data["cider"][beam].mean()), 4)},
            "most_confident": {"good": round(float(data["good"][chosen].mean()), 4),
                               "cider_d": round(float(data["cider"][chosen].mean()), 4),
                               "changed": int((chosen != beam).sum())}}


SPLITS = 10  # random halvings averaged in the summary figures


def spread(data: dict[str, Any], cols: list[int], seed: int) -> dict[str, Any]:
    """The headline figures over ``SPLITS`` random halvings (seeds ``seed``..): mean and standard deviation."""
    runs = [judge(cross_validate(data, cols, seed + i), data) for i in range(SPLITS)]
    out = {}
    for key in ("auroc_criterion", "auroc_cider_above_median", "ece", "top_quarter_cider_ratio", "mean_confidence"):
        values = np.array([r[key] for r in runs], dtype=np.float64)
        out[key] = {"mean": round(float(values.mean()), 4), "sd": round(float(values.std()), 4)}
    return out


def measure(data: dict[str, Any], signals: list[str], seed: int) -> dict[str, Any]:
    """AUROC against the criterion (mean of ``SPLITS`` halvings) of each signal alone and of the set without each
    of its signals: what each adds."""
    def mean_auroc(cols):
        beam = data["kind"] == 1  # what judge()'s auroc_criterion reads, without its tables
        return round(float(np.mean([round(auroc(cross_validate(data, cols, seed + i)[beam], data["good"][beam]), 4)
                                    for i in range(SPLITS)])), 4)

    report = {"alone": {s: mean_auroc([j]) for j, s in enumerate(signals)}, "without": {}}
    if len(signals) > 1:
        for j, s in enumerate(signals):
            report["without"][s] = mean_auroc([i for i in range(len(signals)) if i != j])
    return report


def plot_reliability(figures: dict[str, Any], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = figures["reliability"]
    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=120)
    ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--", label="perfect calibration")
    ax.plot([r["mean_confidence"] for r in rows], [r["rate"] for r in rows], "o-", color="#3b5bdb",
            label="validation photos (judged halves)")
    for r in rows:
        ax.annotate(str(r["count"]), (r["mean_confidence"], r["rate"]), textcoords="offset points", xytext=(4, -10),
                    fontsize=7, color="#555")
    ax.set_xlabel("confidence (mean of the bin)")
    ax.set_ylabel("share of good captions")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m train calibrate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder to calibrate (the calibration is written into it)")
    ap.add_argument("--dataset", default="../shared/data/flickr8k", help="captioned photos: imagefolder or parquet")
    ap.add_argument("--split", default="validation", help="the photos the calibration is fitted and judged on")
    ap.add_argument("--train-split", default="train", help="the photos the model was trained on: the neighbours")
    ap.add_argument("--features", help="a train extract cache holding the training split's pooled features")
    ap.add_argument("--signals", default=",".join(DEFAULT_SIGNALS), help=f"comma-separated, of {sorted(SIGNALS)}")
    ap.add_argument("--k", type=int, default=10, help="nearest training photos for the consensus")
    ap.add_argument("--dim", type=int, default=128, help="PCA dimensions of the neighbours' features")
    ap.add_argument("--seed", type=int, default=0, help="which photos fall in which half")
    ap.add_argument("--limit", type=int, help="at most this many photos of --split (tests)")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--precision", default=None, help="decoder precision (default: as the app: auto)")
    ap.add_argument("--threads", type=int, help="torch threads")
    ap.add_argument("--plot", help="write the reliability plot (PNG) here")
    ap.add_argument("--report", help="also write the whole report (JSON) here")
    ap.add_argument("--dry-run", action="store_true", help="measure and print; write nothing into the model")
    args = ap.parse_args(argv)
    args.signals = [s.strip() for s in args.signals.split(",") if s.strip()]
    unknown = [s for s in args.signals if s not in SIGNALS]
    if unknown or not args.signals:
        ap.error(f"--signals: unknown {unknown}; known: {sorted(SIGNALS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from storyteller.captioner import load

    captioner = load(args.model, precision=args.precision)
    captioner.calibrator = None  # the signals of the model's own captions, not an older calibration's output
    train_features, train_captions = training_features(captioner, args.dataset, args.train_split, args.features,
                                                     args.batch_size)
    neighbours = build_neighbours(train_features, train_captions, args.dim, args.k)
    results, references, features = caption_split(captioner, args.dataset, args.split, args.batch_size, args.limit)
    data = collect(args.signals, neighbours, results, references, features)
    cols = list(range(len(args.signals)))
    p = cross_validate(data, cols, args.seed)
    figures = judge(p, data)
    report = {"criterion": CRITERION, "signals": args.signals, "validation": figures,
              f"over_{SPLITS}_halvings": spread(data, cols, args.seed),
              "signals_measured": measure(data, args.signals, args.seed), "n_best_by_confidence": rerank(p, data)}
    beam = data["kind"] == 1
    w, b, mean, scale = fit_logistic(data["rows"][beam], data["good"][beam].astype(float))
    calibrator = Calibrator(signals=args.signals, weights=[round(float(x), 6) for x in w], intercept=round(b, 6),
                            mean=[float(x) for x in mean], scale=[float(x) for x in scale], criterion=CRITERION,
                            neighbours=neighbours if "consensus" in args.signals else None,
                            validation={**figures, "split": args.split, "seed": args.seed, "k": args.k, "dim": args.dim,
                                        "precision": captioner.precision,
                                        "n_best_by_confidence": report["n_best_by_confidence"],
                                        f"over_{SPLITS}_halvings": report[f"over_{SPLITS}_halvings"],
                                        "signals_measured": report["signals_measured"]})
    print(json.dumps({k: v for k, v in report.items()}, indent=1))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if args.plot:
        plot_reliability(figures, f"{Path(args.model).name}: {figures['photos']} {args.split} photos", args.plot)
    if args.dry_run:
        print("dry run: nothing written into the model", file=sys.stderr)
        return
    for path in calibrator.save(args.model):
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
