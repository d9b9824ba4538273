"""Decoding speed at the machine's limit: one step, batched searches, the original per-image loop, one photo.

    python -m bench.bench_decode --threads 1                       # bundled model, 300 validation photos
    python -m bench.bench_decode --features CACHE --images 1000    # features from a cache (python -m train extract)

Everything runs in one process on the same model and photos, so the ratios hold under the same load.
Prints a table and one JSON line:
- one decoder step for one image (median of many) in each precision (fp32; int8 where PyTorch has a
  quantised engine; bf16, marked "emulated" on CPUs without bfloat16 instructions) and the original
  project's step: ``nn.LSTM`` called on a length-1 sequence, then Linear and log-softmax, same sizes;
- batched greedy, beam 3 and beam 5 captions/s over the photos (``--images``, default 300), in fp32
  and in the precision ``auto`` picks; and greedy + beam 5 in one pass (``greedy_and_beam_search``);
- the original project's per-image beam search (a Python loop over hypotheses, one step call each) on
  the same decoder in fp32, over the first ``--seed-images`` photos;
- one photo's search alone (20 photos): greedy then beam 5 as two searches, against one pass, in fp32
  and in the auto precision; the one pass again without beam search's early stop, and the decoder
  calls per photo with and without it;
- one photo through ``Captioner.caption`` (greedy + beam 5, the app's call) against its feature
  extraction alone (``Captioner.features``), p50 over the example photos x ``--repeats``.
Photos: the first ``--images`` validation photos of ``--dataset`` (live features), or ``--features``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storyteller import precision as P  # noqa: E402
from bench.timing import time_step  # noqa: E402
from storyteller.captioner import DEFAULT_MODEL_DIR, load  # noqa: E402
from storyteller.decoding import beam_search, greedy_and_beam_search, greedy_search  # noqa: E402
from storyteller.vocab import Vocabulary  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def original_step(model, tokens: torch.Tensor, state):
    """The original project's decoding step: nn.LSTM on a length-1 sequence, Linear, log-softmax."""
    out, state = model.lstm(model.embed(tokens)[:, None, :], state)  # (B, 1, H)
    return torch.log_softmax(model.head(out[:, 0]), dim=-1), state


@torch.inference_mode()
def original_beam_search(model, feature: torch.Tensor, k: int, max_len: int) -> list[int]:
    """The original project's per-image beam search: every hypothesis is one batch-1 step call per step."""
    beams = [([Vocabulary.start_id], 0.0, model.initial_lstm_state(feature[None]))]
    done = []
    for _ in range(max_len):
        cands = []
        for seq, score, state in beams:
            logp, new = original_step(model, torch.tensor([seq[-1]]), state)
            top = logp[0].topk(k)
            for lp, tok in zip(top.values.tolist(), top.indices.tolist()):
                cands.append((seq + [tok], score + lp, new))
        cands.sort(key=lambda c: c[1], reverse=True)
        beams = []
        for c in cands[:k]:
            (done if c[0][-1] == Vocabulary.end_id else beams).append(c)
        if not beams:
            break
    return max(done + beams, key=lambda c: c[1])[0]


@contextlib.contextmanager
def count_steps(model):
    """Record one entry per ``model.step`` call (the list is yielded)."""
    calls: list[int] = []
    model.step = lambda *a, **k: calls.append(1) or type(model).step(model, *a, **k)
    try:
        yield calls
    finally:
        del model.step


def load_features(args, captioner) -> torch.Tensor:
    if args.features:
        from train.features import FeatureCache

        cache = FeatureCache.open(args.features, expect_backbone=captioner.backbone.spec)
        rows = cache.split("validation")[: args.images]
        return torch.from_numpy(np.asarray(cache.features[rows], dtype=np.float32))
    from train.data import open_captioned_images
    from train.evaluate import live_features

    images = open_captioned_images(args.dataset, "validation", limit_per_split=args.images)
    return live_features(images, captioner.backbone.spec, torch.device("cpu"), 32, 0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="pooled model folder (default: the bundled one)")
    p.add_argument("--dataset", default=str(REPO.parent / "shared" / "data" / "flickr8k"), help="imagefolder")
    p.add_argument("--features", default=None, help="feature cache instead of live features")
    p.add_argument("--images", type=int, default=300, help="photos for the batched searches")
    p.add_argument("--seed-images", type=int, default=60, help="photos for the original per-image beam loop")
    p.add_argument("--batch-size", type=int, default=100, help="images per batched search call")
    p.add_argument("--photos", default=str(REPO / "examples"), help="folder of .jpg photos for the one-photo figure")
    p.add_argument("--repeats", type=int, default=5, help="passes over --photos")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the app's setting is 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    captioner = load(args.model, precision="fp32")
    model = captioner.model
    if getattr(model, "has_attention", False):
        sys.exit("bench_decode measures the pooled decoder (the original step is nn.LSTM's)")
    auto = P.resolve_precision("auto")
    supported = P.supported_precisions()
    d = captioner.decoding
    kw = dict(max_len=d["max_len"], no_repeat_ngram_size=d["no_repeat_ngram_size"], bad_endings=d["bad_endings"])
    res: dict = {"model": Path(args.model).name, "threads": args.threads, "auto_precision": auto,
                 "supported": supported, "cpu_capability": torch.backends.cpu.get_cpu_capability()}

    # -- one decoder step for one image
    feat1 = torch.zeros(1, model.feature_dim)
    steps = {}
    with torch.inference_mode():
        for prec in P.PRECISIONS:  # each step continues the last one's state, as in a search
            model.precision = prec
            steps[prec] = time_step(model, feat1, repeats=300)
        model.precision = "fp32"
        tok = torch.tensor([Vocabulary.start_id])
        lstm_state = model.initial_lstm_state(feat1)
        steps["original nn.LSTM step"] = median_ms(lambda: original_step(model, tok, lstm_state), 300)
    res["step_ms"] = {k: round(v, 3) for k, v in steps.items()}

    # -- batched searches over many photos
    feats = load_features(args, captioner)
    n = feats.shape[0]
    chunks = feats.split(args.batch_size)
    searches = {"greedy": lambda f: greedy_search(model, f, **kw),
                "beam 3": lambda f: beam_search(model, f, beam_size=3, alpha=d["alpha"], **kw),
                "beam 5": lambda f: beam_search(model, f, beam_size=5, alpha=d["alpha"], **kw),
                "greedy + beam 5, one pass": lambda f: greedy_and_beam_search(model, f, beam_size=5, alpha=d["alpha"], **kw)}
    all_beams = {"all 5 beams, one pass": lambda f: greedy_and_beam_search(model, f, beam_size=5, alpha=d["alpha"],
                                                                            n_best=5, **kw)}
    rates = {}
    for prec in dict.fromkeys(["fp32", auto]):
        model.precision = prec
        for name, fn in searches.items():  # (the all-beams search is for one photo only, below)
            t = time.perf_counter()
            for c in chunks:
                fn(c)
            rates[f"{name} ({prec})"] = n / (time.perf_counter() - t)
    model.precision = "fp32"
    t = time.perf_counter()
    for f in feats[: args.seed_images]:
        original_beam_search(model, f, 5, d["max_len"])
    rates["original per-image beam 5 (fp32)"] = args.seed_images / (time.perf_counter() - t)
    res["captions_per_s"] = {k: round(v, 1) for k, v in rates.items()}
    res["batched_beam5_vs_original"] = round(rates[f"beam 5 ({auto})"] / rates["original per-image beam 5 (fp32)"], 1)

    # -- one photo's search alone: greedy then beam 5 (two searches, as before) against one pass
    one_feats = [f[None] for f in feats[:20]]
    one_search = {}
    for prec in dict.fromkeys(["fp32", auto]):
        model.precision = prec
        one_search[f"greedy, then beam 5 ({prec})"] = statistics.median(
            median_ms(lambda f=f: (searches["greedy"](f), searches["beam 5"](f)), 3) for f in one_feats)
        one_search[f"greedy + beam 5, one pass ({prec})"] = statistics.median(
            median_ms(lambda f=f: searches["greedy + beam 5, one pass"](f), 3) for f in one_feats)
    searches.update(all_beams)
    # the same one pass searched to the end: asking for all 5 beams (the app's n-best list) rules out the early
    # stop per image; and decoder calls per photo with each
    one_search[f"greedy + beam 5, one pass, no early stop ({auto})"] = statistics.median(
        median_ms(lambda f=f: searches["all 5 beams, one pass"](f), 3) for f in one_feats)
    res["one_photo_search_ms"] = {k: round(v, 2) for k, v in one_search.items()}
    calls = {}
    for name, search in (("early stop", "greedy + beam 5, one pass"), ("to the end", "all 5 beams, one pass")):
        with count_steps(model) as n_steps:
            for f in one_feats:
                searches[search](f)
        calls[name] = len(n_steps) / len(one_feats)
    res["decoder_calls_per_photo"] = {k: round(v, 2) for k, v in calls.items()}

    # -- one photo through the app's call, at the auto precision
    model.precision = auto
    photos = sorted(Path(args.photos).glob("*.jpg"))
    whole, feat_only, search = [], [], []
    captioner.warmup()
    for _ in range(args.repeats):
        for path in photos:
            t = time.perf_counter()
            r = captioner.caption([path], beam_size=5)[0]
            whole.append((time.perf_counter() - t) * 1e3)
            search.append(r.timings_ms["search"])
            t = time.perf_counter()
            captioner.features([path])
            feat_only.append((time.perf_counter() - t) * 1e3)
    one = {"caption_p50_ms": statistics.median(whole), "features_p50_ms": statistics.median(feat_only),
           "search_p50_ms": statistics.median(search)}
    one["caption_vs_features"] = one["caption_p50_ms"] / one["features_p50_ms"]
    res["one_photo"] = {k: round(v, 2) for k, v in one.items()}
    res["images"], res["seed_images"] = n, args.seed_images

    print(f"model {res['model']}, {args.threads} thread(s), CPU {res['cpu_capability']}, supported {supported}, "
          f"auto -> {auto}")
    print("one decoder step, one image (ms):")
    for k, v in steps.items():
        note = " (emulated: no bfloat16 instructions)" if k == "bf16" and "bf16" not in supported else ""
        print(f"  {k:<28}{v:>8.3f}  {steps['original nn.LSTM step'] / v:>5.1f}x the original{note}")
    print(f"captions/s over {n} photos (batches of {args.batch_size}; the original loop over {args.seed_images}):")
    for k, v in rates.items():
        print(f"  {k:<40}{v:>9.1f}")
    print("one photo's search, median over 20 photos (ms):")
    for k, v in one_search.items():
        print(f"  {k:<50}{v:>9.2f}")
    print(f"decoder calls per photo, one pass: {calls['early stop']:.2f} with the early stop, "
          f"{calls['to the end']:.2f} to the end")
    print(f"one photo (greedy + beam 5, p50 over {len(whole)}): caption {one['caption_p50_ms']:.1f} ms, its "
          f"features alone {one['features_p50_ms']:.1f} ms ({one['caption_vs_features']:.2f}x), search "
          f"{one['search_p50_ms']:.1f} ms")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
