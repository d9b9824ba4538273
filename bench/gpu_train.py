"""Epoch time of the fit training step on a GPU, at Flickr30k size, on synthetic data.

    python bench/gpu_train.py --out gpu_train.json                 # CUDA, ~1-2 minutes on an H100/H200
    python bench/gpu_train.py --small --out /tmp/gpu_train.json    # CPU smoke run (small data, same code)

Needs torch and this repository (storyteller/ and train/fit.py: the step timed is fit's own
``TeacherForcing`` + ``train_step`` + ``epoch_order``); no dataset, no downloads.

Data: 31,014 images x 2048-d features (ResNet50 size), 145,000 training captions (29,000 images x
5, the Karpathy train split) with word counts drawn from a log-normal fitted to Flickr30k (mean
~12, most 8-20, cut at 30 words like fit) and Zipf-distributed word ids over an 8,000-token vocab.
Everything lives on the GPU, as in fit.

Configurations, one epoch each after a short warm-up (CUDA synchronised around the clock):
- ``data only``: the batch gather alone (index features and captions, build the real-token index),
  i.e. the ceiling that data feeding puts on any model;
- ``fit bf16``: fit's step (padded length-bucketed batches, head/loss on real tokens, AdamW fused,
  clip 5, dropout 0.5, bf16 autocast) at batch 256 and 1024; also fp32 and the packed variant at
  1024 for comparison;
- ``seed``: the original project's loop (batch 64, random order, padded to the batch maximum, head
  over every padded position, Adam 1e-3, fp32).

Prints a table (epoch seconds, captions/s, tokens/s, peak GPU memory) and writes it to ``--out`` as
JSON, after each configuration (a run cut short still leaves its finished rows).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storyteller.decoders import ShowAndTell  # noqa: E402
from storyteller.vocab import Vocabulary  # noqa: E402
from storyteller.fileio import write_json_atomic  # noqa: E402
from train import fit  # noqa: E402
from bench.seed_baseline import SeedDecoder  # noqa: E402


def synth_data(images: int, train_images: int, captions_per_image: int, vocab_size: int, feature_dim: int,
               device: torch.device, seed: int = 0) -> tuple[torch.Tensor, fit.CaptionPairs]:
    """Random features (images, feature_dim) and CaptionPairs for the first ``train_images`` images.

    Args:
        images: rows of the feature matrix.
        train_images: images with captions to train on.
        captions_per_image: captions per training image.
        vocab_size: tokens, specials included.
        feature_dim: feature size.
        device: where features and tokens live.
        seed: generator seed.
    """
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(images, feature_dim, generator=g).to(device)  # (N, F) float32
    n = train_images * captions_per_image
    # words per caption: log-normal with median e^2.42 = 11.2, sigma 0.33 -> mean ~11.9, 90% in 7..19
    words = torch.exp(2.42 + 0.33 * torch.randn(n, generator=g)).round().clamp(3, 30).long()
    lengths = words + 2  # <start> ... <end>
    ranks = torch.arange(vocab_size - 4, dtype=torch.float64)
    zipf = 1.0 / (ranks + 10.0)  # word frequencies: Zipf with a flattened head
    T = int(lengths.max())
    tokens = torch.multinomial(zipf.float(), n * T, replacement=True, generator=g).view(n, T) + 4
    pos = torch.arange(T)[None, :]
    tokens[pos >= lengths[:, None]] = Vocabulary.pad_id
    tokens[torch.arange(n), lengths - 1] = Vocabulary.end_id
    tokens[:, 0] = Vocabulary.start_id
    image = torch.arange(train_images).repeat_interleave(captions_per_image)
    return features, fit.CaptionPairs(image.to(device), tokens.to(device), lengths)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(name: str, kind: str, batch_size: int, features: torch.Tensor, pairs: fit.CaptionPairs, vocab_size: int,
               device: torch.device, amp: bool, packed: bool = False, warmup: int = 10, max_steps: int = 0,
               max_seconds: float = 0.0) -> dict:
    """Time one epoch of one configuration (or its first ``max_steps`` / ``max_seconds``, scaled); returns its row."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if amp else None
    F = features.shape[1]
    if kind == "seed":
        model = SeedDecoder(vocab_size, F).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        crit = nn.CrossEntropyLoss(ignore_index=Vocabulary.pad_id)
        order = lambda epoch: list(torch.randperm(len(pairs), generator=torch.Generator().manual_seed(epoch)).split(batch_size))  # noqa: E731
    else:
        model = ShowAndTell(vocab_size, F, 512, 512, 1, dropout=0.5).to(device)
        forward = fit.TeacherForcing(model, packed=packed)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, fused=device.type == "cuda")
        order = lambda epoch: fit.epoch_order(pairs.lengths, batch_size, 0, epoch, bucket=50)  # noqa: E731

    def step(idx: torch.Tensor) -> int:
        feats, caps, lengths = pairs.batch(features, idx)
        if kind == "data":
            # the gather plus the real-token index the step builds: what feeding alone costs
            T = caps.shape[1] - 1
            real = (torch.arange(T)[None, :] < (lengths - 1)[:, None]).flatten().nonzero().squeeze(1).to(device, non_blocking=True)
            feats.sum().add_(caps.reshape(-1).index_select(0, real).sum())
            return int(real.numel())
        if kind == "seed":
            logits = model(feats, caps)
            loss = crit(logits.reshape(-1, logits.shape[-1]), caps[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return int((lengths - 1).sum())
        _, n = fit.train_step(forward, opt, feats, caps, lengths, amp_dtype=dtype, clip_grad=5.0)
        return n

    if kind != "data":
        model.train()
    # allocations, cuDNN / oneDNN plans per sequence length, outside the clock (--small: a whole epoch,
    # since on CPU each new length builds a oneDNN primitive and a small epoch has few steps to amortise it)
    for idx in order(1)[:warmup]:
        step(idx)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = order(0)
    if max_steps:
        batches = batches[:max_steps]
    t0 = time.perf_counter()
    tokens = captions = steps = 0
    for idx in batches:
        tokens += step(idx)
        captions += len(idx)
        steps += 1
        if max_seconds and time.perf_counter() - t0 > max_seconds:
            break  # too slow for the time budget: the rate so far is scaled to a full epoch
    sync(device)
    seconds = time.perf_counter() - t0
    full = len(pairs) / captions  # a --max-steps run is scaled to a full epoch
    row = {"config": name, "batch_size": batch_size, "amp": "bf16" if amp else "fp32", "steps": steps,
           "epoch_seconds": round(seconds * full, 3), "scaled_from_partial_epoch": captions < len(pairs), "captions_per_s": round(captions / seconds, 1),
           "tokens_per_s": round(tokens / seconds, 1),
           "peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> dict:
    """Run the configurations and print the table.

    Args:
        argv: command line without the program name.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--small", action="store_true", help="CPU-sized data (600 images, 1,000 captions, vocab 2,000)")
    p.add_argument("--device", default="auto", help="cuda, cpu (auto: cuda when available)")
    p.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto",
                   help="autocast of the fit configs (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--max-steps", type=int, default=0, help="time only this many steps per config, scaled to an epoch")
    p.add_argument("--max-seconds", type=float, default=25.0,
                   help="cut a configuration's epoch after this many seconds and scale its rate to a full epoch (0: never)")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    amp = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")
    if args.small:
        size = dict(images=600, train_images=200, captions_per_image=5, vocab_size=2000, feature_dim=2048)
    else:
        size = dict(images=31_014, train_images=29_000, captions_per_image=5, vocab_size=8_000, feature_dim=2048)
    t0 = time.perf_counter()
    features, pairs = synth_data(**size, device=device)
    words = (pairs.lengths - 2).float()
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
            **size, "captions": len(pairs), "mean_words": round(float(words.mean()), 2),
            "words_p10_p90": [int(words.quantile(0.1)), int(words.quantile(0.9))], "synth_seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(info), flush=True)

    configs = [("data only", "data", 256, False, False), ("data only", "data", 1024, False, False),
               ("fit", "fit", 256, amp, False), ("fit", "fit", 1024, amp, False),
               ("fit", "fit", 1024, False, False), ("fit --packed", "fit", 1024, amp, True),
               ("seed loop", "seed", 64, False, False)]
    configs = list(dict.fromkeys(configs))  # without autocast, "fit 1024" and "fit 1024 fp32" are one config
    rows: list[dict] = []
    result = {"info": info, "rows": rows}
    for name, kind, bs, use_amp, packed in configs:
        try:
            row = run_config(name, kind, bs, features, pairs, size["vocab_size"], device, use_amp, packed,
                             warmup=10_000 if args.small else 20, max_steps=args.max_steps, max_seconds=args.max_seconds)
        except Exception as e:  # e.g. a bf16 RNN the GPU's cuDNN lacks: record it, go on with the others
            row = {"config": name, "batch_size": bs, "amp": "bf16" if use_amp else "fp32", "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:  # after every row: a run cut short still leaves its finished rows
            write_json_atomic(args.out, result)

    print(f"\n{'config':<16}{'batch':>6}{'amp':>6}{'epoch s':>10}{'captions/s':>12}{'tokens/s':>12}{'peak MiB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:<16}{r['batch_size']:>6}{r['amp']:>6}  failed: {r['error']}")
            continue
        mem = "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
        print(f"{r['config']:<16}{r['batch_size']:>6}{r['amp']:>6}{r['epoch_seconds']:>10.2f}{r['captions_per_s']:>12.0f}"
              f"{r['tokens_per_s']:>12.0f}{mem:>10}")
    ok = {(r["config"], r["batch_size"], r["amp"]): r for r in rows if "error" not in r}
    seed = ok.get(("seed loop", 64, "fp32"))
    best = min((r for r in rows if "error" not in r and r["config"].startswith("fit")), key=lambda r: r["epoch_seconds"], default=None)
    if seed and best:
        feed = ok.get(("data only", best["batch_size"], "fp32"))
        summary = {"best_fit": f"{best['config']} b{best['batch_size']} {best['amp']}",
                   "speedup_vs_seed": round(seed["epoch_seconds"] / best["epoch_seconds"], 2),
                   "data_feeding_share": round(feed["epoch_seconds"] / best["epoch_seconds"], 3) if feed else None}
        result["summary"] = summary
        print(f"\nbest fit step: {summary['best_fit']}, {best['epoch_seconds']:.2f} s/epoch = "
              f"{summary['speedup_vs_seed']:.1f}x the seed loop ({seed['epoch_seconds']:.2f} s/epoch).")
        if feed:
            print(f"ceiling: feeding the data alone takes {feed['epoch_seconds']:.2f} s/epoch at batch {best['batch_size']} "
                  f"({100 * summary['data_feeding_share']:.0f}% of the step's time); the rest is the model's compute.")
    if args.out:
        write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
