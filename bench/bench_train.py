"""Training speed on CPU: the fit training step against the original project's loop, in one run.

    python bench/bench_train.py                                  # 60 s of training per loop, default threads
    python bench/bench_train.py --seconds 90 --threads 1 --out bench/results/train_cpu_1t.json

Both loops train on the same Flickr8k captions (../shared/data/flickr8k, train split; validation
split for the loss) and the same image features: a finished cache (--features, default
../artifacts/feats-flickr8k-lite0) or, when there is none, synthetic 1280-d features made from each
image's captions (a fixed random projection of their bag of words, plus noise), so the image still
tells the decoder something.

- ``seed``: the original loop. Batch 64 in random order, captions padded to the batch maximum, no
  packing; feature -> Linear -> h0 (c0 = 0), Embedding -> nn.LSTM -> Linear over *every* padded
  position, CrossEntropyLoss(ignore_index=pad), Adam 1e-3, fp32. (It gets our pre-encoded tensors,
  so its data pipeline costs nothing; the original's per-item Python collate would only be slower.)
- ``fit``: ``train.fit`` as it runs: length-bucketed batches (``epoch_order``), ``TeacherForcing``
  (dense fused LSTM, head and loss on real tokens only), ``train_step`` (AdamW, clip 5), warmup then
  constant LR, larger batch with a sqrt-scaled LR; optionally bf16 autocast (CPUs with AMX).

All loops get the same training wall time (validation excluded), interleaved in slices so that
load from other processes hits them alike. After every slice each loop's validation loss (mean token
cross-entropy over the same held-out captions, same definition for both) is recorded. Printed: captions/s
of each loop and its ratio to seed, the final validation losses, and how long each fit loop took to
reach seed's final validation loss (the speed-up at equal validation loss). Dropout is 0 for all
loops so the comparison is about speed, not regularisation.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storyteller.decoders import ShowAndTell  # noqa: E402
from storyteller.vocab import Vocabulary, tokenize  # noqa: E402
from storyteller.fileio import write_json_atomic  # noqa: E402
from train import fit  # noqa: E402
from bench.seed_baseline import SeedDecoder  # noqa: E402


def load_data(features_dir: Path, captions_dir: Path, feature_dim: int = 1280, seed: int = 0):
    """(features (N, F) float32, train rows, val rows, captions per row, description)."""
    manifest = features_dir / "manifest.json"
    if manifest.is_file():
        from train.features import FeatureCache

        cache = FeatureCache.open(features_dir)
        feats = torch.from_numpy(np.asarray(cache.features, dtype=np.float32))
        return feats, cache.split("train"), cache.split("validation"), cache.captions, f"feature cache {features_dir}"
    captions, splits = [], []
    for split in ("train", "validation"):
        for line in (captions_dir / split / "metadata.jsonl").read_text().splitlines():
            captions.append(json.loads(line)["captions"])
            splits.append(split)
    # Synthetic features that carry the captions' content: bag of words x fixed random matrix + noise.
    words = {w: i for i, w in enumerate(sorted({t for caps in captions for c in caps for t in tokenize(c)}))}
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(len(words), feature_dim, generator=g) / 4
    bow = torch.zeros(len(captions), len(words))
    for i, caps in enumerate(captions):
        for c in caps:
            for t in tokenize(c):
                bow[i, words[t]] = 1.0
    feats = torch.relu(bow @ proj + 0.5 * torch.randn(len(captions), feature_dim, generator=g))
    rows = np.arange(len(captions))
    sp = np.array(splits)
    return feats, rows[sp == "train"], rows[sp == "validation"], captions, f"synthetic features from {captions_dir} captions"


class Loop:
    """One training loop that can run for a time slice and report its validation loss."""

    def __init__(self, name: str, kind: str, batch_size: int, lr: float, vocab_size: int, feature_dim: int,
                 train: fit.CaptionPairs, val: fit.CaptionPairs, features: torch.Tensor, amp: bool = False,
                 seed: int = 0):
        self.name, self.kind, self.batch_size, self.lr, self.amp = name, kind, batch_size, lr, amp
        self.train, self.val, self.features = train, val, features
        torch.manual_seed(seed)
        if kind == "seed":
            self.model = SeedDecoder(vocab_size, feature_dim)
            self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
            self.crit = nn.CrossEntropyLoss(ignore_index=Vocabulary.pad_id)
        else:
            # the fit command's own parser: its defaults, with the benchmark's batch / lr / dropout
            self.args = fit.build_parser().parse_args([
                "--features", "-", "--out", "-", "--batch-size", str(batch_size), "--lr", str(lr), "--dropout", "0",
                "--schedule", "constant", "--warmup-epochs", "0.02", "--epochs", "1000"])
            self.model = ShowAndTell(vocab_size, feature_dim, self.args.embed_dim, self.args.hidden_dim,
                                     self.args.num_layers, self.args.dropout)
            self.forward = fit.TeacherForcing(self.model)
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=self.args.weight_decay)
            steps = len(fit.epoch_order(train.lengths, batch_size, seed, 0, bucket=self.args.bucket))
            self.sched = fit.make_scheduler(self.opt, self.args, steps)
        self.model.train()
        self.epoch, self.batches, self.seed = 0, [], seed
        self.seconds, self.captions, self.history = 0.0, 0, []

    def _next_batch(self) -> torch.Tensor:
        if not self.batches:
            if self.kind == "seed":  # plain shuffled batches, as the original DataLoader(shuffle=True)
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self.batches = list(torch.randperm(len(self.train), generator=g).split(self.batch_size))
            else:
                self.batches = fit.epoch_order(self.train.lengths, self.batch_size, self.seed, self.epoch,
                                               bucket=self.args.bucket)
            self.epoch += 1
        return self.batches.pop(0)

    def step(self) -> int:
        feats, caps, lengths = self.train.batch(self.features, self._next_batch())
        if self.kind == "seed":
            logits = self.model(feats, caps)  # (B, T-1, V)
            loss = self.crit(logits.reshape(-1, logits.shape[-1]), caps[:, 1:].reshape(-1))
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        else:
            fit.train_step(self.forward, self.opt, feats, caps, lengths, clip_grad=self.args.clip_grad,
                           amp_dtype=torch.bfloat16 if self.amp else None)
            self.sched.step()
        return len(caps)

    def run(self, seconds: float) -> None:
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < seconds:
            n += self.step()
        self.seconds += time.perf_counter() - t0
        self.captions += n
        self.history.append({"seconds": round(self.seconds, 2), "captions": self.captions,
                             "slice_captions_per_s": n / (time.perf_counter() - t0), "val_loss": self.val_loss()})

    @torch.no_grad()
    def val_loss(self) -> float:
        self.model.eval()
        total, count = 0.0, 0
        for idx in torch.arange(len(self.val)).split(500):
            feats, caps, lengths = self.val.batch(self.features, idx)
            if self.kind == "seed":
                logits = self.model(feats, caps)
                tgt = caps[:, 1:].reshape(-1)
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt, ignore_index=Vocabulary.pad_id)
                n = int((tgt != Vocabulary.pad_id).sum())
            else:
                loss, n = fit.caption_loss(fit.TeacherForcing(self.model), feats, caps, lengths)
            total += float(loss) * n
            count += n
        self.model.train()
        return total / count


def time_to_reach(history: list[dict], target: float) -> float | None:
    """Training seconds at which the validation loss first got to ``target`` (linear between slices)."""
    prev_s, prev_v = 0.0, float("inf")
    for h in history:
        if h["val_loss"] <= target:
            if prev_v == float("inf"):
                return h["seconds"]
            return prev_s + (h["seconds"] - prev_s) * (prev_v - target) / (prev_v - h["val_loss"])
        prev_s, prev_v = h["seconds"], h["val_loss"]
    return None


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print its table.

    Args:
        argv: command line without the program name.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--features", default=str(REPO.parent / "artifacts" / "feats-flickr8k-lite0"),
                   help="feature cache with train/validation splits (synthetic features when it is missing)")
    p.add_argument("--captions", default=str(REPO.parent / "shared" / "data" / "flickr8k"),
                   help="imagefolder with train/ and validation/ metadata.jsonl (for synthetic features)")
    p.add_argument("--seconds", type=float, default=60, help="training wall time per loop")
    p.add_argument("--slice", type=float, default=6, help="seconds per turn before switching loops")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--val-captions", type=int, default=1000, help="validation captions for the loss")
    p.add_argument("--batch-size", type=int, default=256, help="batch of the fit loops")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW lr of the fit loops (seed: Adam 1e-3 at batch 64)")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16-autocast fit loop")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    features, train_rows, val_rows, captions, source = load_data(Path(args.features), Path(args.captions))
    vocab = Vocabulary.build((c for r in train_rows for c in captions[r]), min_freq=5)
    train = fit.encode_pairs(train_rows, captions, vocab, 30)
    val_all = fit.encode_pairs(val_rows, captions, vocab, 30)
    keep = torch.randperm(len(val_all), generator=torch.Generator().manual_seed(0))[: args.val_captions]
    val = fit.CaptionPairs(val_all.image[keep], val_all.tokens[keep], val_all.lengths[keep])
    V, F = len(vocab), features.shape[1]
    print(f"{source}: {len(train)} training captions, vocab {V}, features {F}-d, {torch.get_num_threads()} threads, "
          f"{args.seconds:.0f}s per loop in {args.slice:.0f}s slices", flush=True)

    loops = [Loop("seed (b64, padded, Adam 1e-3)", "seed", 64, 1e-3, V, F, train, val, features),
             Loop(f"fit (b{args.batch_size}, fp32)", "fit", args.batch_size, args.lr, V, F, train, val, features)]
    if not args.no_bf16:
        loops.append(Loop(f"fit (b{args.batch_size}, bf16 autocast)", "fit", args.batch_size, args.lr, V, F, train, val,
                          features, amp=True))
    for loop in loops:  # warm-up step outside the clock (allocations, oneDNN primitive creation)
        loop.step()
    while min(loop.seconds for loop in loops) < args.seconds:
        for loop in loops:
            if loop.seconds < args.seconds:
                loop.run(min(args.slice, args.seconds - loop.seconds + 0.01))
        print("  " + "  ".join(f"{lp.name.split(' (')[0]}{'' if lp.kind == 'seed' else '/' + ('bf16' if lp.amp else 'fp32')}: "
                               f"{lp.history[-1]['val_loss']:.3f}@{lp.seconds:.0f}s" for lp in loops), flush=True)

    base = loops[0]
    base_rate = base.captions / base.seconds
    target = base.history[-1]["val_loss"]
    rows = []
    for loop in loops:
        rate = loop.captions / loop.seconds
        reach = time_to_reach(loop.history, target)
        rows.append({"loop": loop.name, "captions_per_s": round(rate, 1), "median_slice_captions_per_s":
                     round(statistics.median(h["slice_captions_per_s"] for h in loop.history), 1),
                     "speedup": round(rate / base_rate, 2), "train_seconds": round(loop.seconds, 1),
                     "captions_seen": loop.captions, "final_val_loss": round(loop.history[-1]["val_loss"], 4),
                     "seconds_to_seed_final_val_loss": None if reach is None else round(reach, 1),
                     "time_to_quality_speedup": None if reach is None else round(base.seconds / reach, 2),
                     "history": loop.history})
    print(f"\n{'loop':<36}{'captions/s':>11}{'x seed':>8}{'val loss':>10}{'s to seed val':>15}{'x (equal val)':>15}")
    for r in rows:
        reach = "-" if r["seconds_to_seed_final_val_loss"] is None else f"{r['seconds_to_seed_final_val_loss']:.1f}"
        speed = "-" if r["time_to_quality_speedup"] is None else f"{r['time_to_quality_speedup']:.2f}"
        print(f"{r['loop']:<36}{r['captions_per_s']:>11.1f}{r['speedup']:>8.2f}{r['final_val_loss']:>10.4f}{reach:>15}{speed:>15}")
    print(f"(same training wall time per loop, {args.seconds:.0f}s; 'x (equal val)' = seed's time / time to reach "
          f"seed's final validation loss {target:.4f})")
    result = {"source": source, "threads": torch.get_num_threads(), "seconds_per_loop": args.seconds,
              "vocab_size": V, "train_captions": len(train), "val_captions": len(val), "torch": torch.__version__,
              "cpu_count": os.cpu_count(), "loops": rows}
    if args.out:
        write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
