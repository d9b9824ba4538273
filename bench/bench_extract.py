"""Benchmark: feature extraction throughput vs the backbone's forward alone on the same images.

    python bench/bench_extract.py --dataset ../shared/data/flickr8k --images 128 --workers 0,1,2

"forward only" times backbone(pixels) on batches decoded and transformed beforehand; "extract" runs
the real pipeline (train/extract.py: JPEG decode + resize in DataLoader workers, forward, float16
chunks, assembly) on the same images. The ratio extract / forward shows what decoding and writing
cost; the goal is >= 0.8. Random weights for both backbones (speed does not depend on the values).

It also times the forward with and without BatchNorm folded into the convolutions (``fold_batchnorm``,
the default), interleaved: at the batch size above, and at batch 1 (each of the first 32 images alone, as
the app runs a photo).

``--chunks 1,2,4,8,16`` times only the forward on a CPU with the trunk run that many photos at a time
(``storyteller.backbones.CPU_CHUNK``, which the app, the CLI and the extractor use), interleaved, in ms a photo:

    python bench/bench_extract.py --dataset ../shared/data/flickr8k --images 64 --threads 1 --chunks 1,2,4,8,16
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from storyteller import backbones  # noqa: E402
from storyteller.backbones import create_backbone  # noqa: E402
from train.data import open_captioned_images  # noqa: E402
from train.extract import extract  # noqa: E402


class Subset:
    """The first n images of a CaptionedImages (same records, same decoding)."""

    def __init__(self, images, n: int):
        self.images, self.records = images, images.records[:n]
        self.description = {**images.description, "bench_first": n}

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, i: int):
        return self.images.load_image(i)


def forward_only(backbone, batches: list[torch.Tensor]) -> float:
    """Images per second of backbone(pixels) alone."""
    with torch.inference_mode():
        backbone(batches[0][:4])  # warm-up: oneDNN primitive creation
        t0 = time.perf_counter()
        for x in batches:
            backbone(x.to(backbone.device))
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
    return sum(len(x) for x in batches) / (time.perf_counter() - t0)


def fold_comparison(backbone, batches: list[torch.Tensor], device: str, repeats: int) -> list[tuple]:
    """Forward images/s (the batches) and median ms at batch 1, ``backbone`` (BatchNorm folded, the default)
    against the same network unfolded, interleaved."""
    name = backbone.spec["name"]
    nets = {"BatchNorm folded": backbone,
            "BatchNorm not folded": create_backbone(name, pretrained=False, device=device, fold_bn=False)}
    rate = {k: 0.0 for k in nets}
    one = {k: [] for k in nets}
    photos = [x[i:i + 1] for x in batches for i in range(len(x))][:32]  # one photo at a time
    with torch.inference_mode():
        for r in range(repeats):
            for k in (list(nets) if r % 2 == 0 else list(nets)[::-1]):
                rate[k] = max(rate[k], forward_only(nets[k], batches))
                nets[k](photos[0].to(device))
                for x in photos:
                    x = x.to(device)
                    if x.device.type == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    nets[k](x)
                    if x.device.type == "cuda":
                        torch.cuda.synchronize()
                    one[k].append((time.perf_counter() - t) * 1e3)
    base_rate, base_ms = rate["BatchNorm not folded"], statistics.median(one["BatchNorm not folded"])
    return [(name, f"forward, {k}", rate[k], rate[k] / base_rate, statistics.median(one[k]),
             statistics.median(one[k]) / base_ms) for k in nets]


def chunk_comparison(backbone, batches: list[torch.Tensor], chunks: list[int], repeats: int) -> dict[int, float]:
    """Median ms a photo of the forward over ``batches`` with ``CPU_CHUNK`` set to each of ``chunks`` in turn,
    interleaved ``repeats`` times (the order reversed every other round)."""
    times: dict[int, list[float]] = {c: [] for c in chunks}
    keep = backbones.CPU_CHUNK
    try:
        with torch.inference_mode():
            backbone(batches[0][:4])  # warm-up
            for r in range(repeats):
                for c in (chunks if r % 2 == 0 else chunks[::-1]):
                    backbones.CPU_CHUNK = c
                    for x in batches:
                        t = time.perf_counter()
                        backbone(x)
                        times[c].append((time.perf_counter() - t) * 1e3 / len(x))
    finally:
        backbones.CPU_CHUNK = keep
    return {c: statistics.median(v) for c, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"))
    p.add_argument("--split", default="train")
    p.add_argument("--backbones", default="efficientnet_lite0,resnet50")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts to try")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best of each is kept")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--chunks", default=None, help="only the CPU chunk comparison: comma-separated CPU_CHUNK values")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.chunks:
        chunks = [int(c) for c in args.chunks.split(",")]
        images = Subset(open_captioned_images(args.dataset, args.split), args.images)
        print(f"{len(images)} images, batch {args.batch_size}, CPU, torch threads {torch.get_num_threads()}, "
              f"{max(args.repeats, 3)} interleaved rounds; the default CPU_CHUNK is {backbones.CPU_CHUNK}")
        print("\n| backbone | " + " | ".join(f"{c} at a time" for c in chunks) + " |\n|---|" + "---:|" * len(chunks))
        for name in args.backbones.split(","):
            backbone = create_backbone(name, pretrained=False, device="cpu")
            pixels = [backbone.transform(images.load_image(i)) for i in range(len(images))]
            batches = [torch.stack(pixels[i:i + args.batch_size]) for i in range(0, len(pixels), args.batch_size)]
            ms = chunk_comparison(backbone, batches, chunks, max(args.repeats, 3))
            print(f"| {name} | " + " | ".join(f"{ms[c]:.1f} ms" for c in chunks) + " |", flush=True)
        return

    images = Subset(open_captioned_images(args.dataset, args.split), args.images)
    print(f"{len(images)} images from {args.dataset} [{args.split}], batch {args.batch_size}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, best of {args.repeats}")
    rows, folds = [], []
    worker_counts = [int(w) for w in args.workers.split(",")]
    for name in args.backbones.split(","):
        backbone = create_backbone(name, pretrained=False, device=args.device)
        t0 = time.perf_counter()
        pixels = [backbone.transform(images.load_image(i)) for i in range(len(images))]
        decode_rate = len(images) / (time.perf_counter() - t0)
        batches = [torch.stack(pixels[i:i + args.batch_size]) for i in range(0, len(pixels), args.batch_size)]
        # Other processes share this CPU: interleave the configurations and keep each one's best of
        # --repeats, so a burst of foreign load does not land on one configuration only.
        best = {"forward": 0.0, **{w: 0.0 for w in worker_counts}}
        for _ in range(args.repeats):
            best["forward"] = max(best["forward"], forward_only(backbone, batches))
            for workers in worker_counts:
                out = Path(tempfile.mkdtemp(prefix="bench-extract-"))
                try:
                    r = extract(images, backbone, out, batch_size=args.batch_size, workers=workers, chunk_size=1024,
                                progress=False)
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                best[workers] = max(best[workers], r.images_computed / r.seconds)
        fwd = best["forward"]
        rows.append((name, "decode+transform only (1 process)", decode_rate, None))
        rows.append((name, "forward only", fwd, 1.0))
        rows += [(name, f"extract, {w} workers", best[w], best[w] / fwd) for w in worker_counts]
        for row in rows[-(2 + len(worker_counts)):]:
            print(f"  {row[0]:<20} {row[1]:<36} {row[2]:8.1f} img/s" + (f"   {row[3]:.2f}x forward" if row[3] else ""), flush=True)

        folds.extend(fold_comparison(backbone, batches, args.device, max(args.repeats, 2)))
        for row in folds[-2:]:
            print(f"  {row[0]:<20} {row[1]:<36} {row[2]:8.1f} img/s   {row[3]:.2f}x   batch 1: {row[4]:.1f} ms "
                  f"({row[5]:.2f}x)", flush=True)

    print("\n| backbone | pipeline | images/s | vs forward only |\n|---|---|---:|---:|")
    for name, what, rate, ratio in rows:
        print(f"| {name} | {what} | {rate:.1f} | {'' if ratio is None else f'{ratio:.2f}'} |")
    print(f"\n| backbone | forward | images/s (batch {args.batch_size}) | vs not folded | one photo, median ms "
          f"| vs not folded |\n|---|---|---:|---:|---:|---:|")
    for name, what, rate, ratio, ms, ms_ratio in folds:
        print(f"| {name} | {what} | {rate:.1f} | {ratio:.2f} | {ms:.1f} | {ms_ratio:.2f} |")


if __name__ == "__main__":
    main()
