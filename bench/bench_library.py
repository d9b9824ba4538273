"""Benchmark: captioning a photo folder (storyteller.photo_library) against the backbone's forward alone, same photos.

    python bench/bench_library.py                                   # ../shared/data/flickr8k-fullres/validation
    python bench/bench_library.py --photos ../shared/data/flickr8k/validation --images 256 --threads 1,2

"forward only" times ``captioner.encode_pixels(pixels)`` (the backbone) on batches decoded and transformed
beforehand: the machine's ceiling. "library" runs ``storyteller.photo_library.caption_batches`` on the same files:
decoding in DataLoader workers, the backbone and the greedy + beam search in this process, i.e. what
``python -m storyteller caption DIR --out FILE`` does apart from writing its records (a few hundred bytes a
photo). The ratio library / forward is the issue's goal: >= 0.8. Both run with the same model (the bundled
one by default), batch size and torch threads, interleaved, the best of --repeats kept (other jobs share
the CPU: a burst of foreign load should not land on one configuration only); "median round ratio" is the
median over rounds of library / forward measured back to back.

"CPU ms/photo" is the CPU time each path spends per photo, DataLoader workers included: the pipeline does
more work than the forward (decoding, the search), which it can hide only on cores the backbone leaves
free. On a machine saturated by other jobs the wall-clock ratio falls towards forward CPU / library CPU.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from storyteller.captioner import load  # noqa: E402
from storyteller.photo_library import caption_batches, default_workers, find_images  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (DataLoader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def forward_only(captioner, batches: list[torch.Tensor]) -> tuple[float, float]:
    """Photos per second of the backbone alone on ready pixels, and CPU ms per photo."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    for pixels in batches:
        captioner.encode_pixels(pixels)
    if captioner.device.type == "cuda":
        torch.cuda.synchronize()
    n = sum(len(p) for p in batches)
    return n / (time.perf_counter() - t0), (cpu_seconds() - c0) * 1e3 / n


def library(captioner, photos, batch_size: int, workers: int) -> tuple[float, float]:
    """Photos per second of the library pipeline (worker start-up included), and CPU ms per photo (workers
    included)."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    for batch in caption_batches(photos, captioner, batch_size=batch_size, workers=workers):
        pass
    return len(photos) / (time.perf_counter() - t0), (cpu_seconds() - c0) * 1e3 / len(photos)


def measure(captioner, photos, batches, batch_size: int, workers: list[int], repeats: int) -> dict:
    """Interleaved rounds of forward-only and the library with each worker count: per configuration the
    best rate, the CPU ms/photo of that best run, and the median over rounds of library / forward."""
    forward_only(captioner, batches[:1])  # oneDNN builds its kernels for these shapes once
    library(captioner, photos[:batch_size], batch_size, 0)
    runs: dict = {k: [] for k in ["forward", *workers]}
    for r in range(repeats):
        for k in (["forward", *workers] if r % 2 == 0 else [*workers, "forward"]):
            runs[k].append(forward_only(captioner, batches) if k == "forward" else
                           library(captioner, photos, batch_size, k))
    best = {k: max(v) for k, v in runs.items()}
    rounds = {w: statistics.median(lib[0] / fwd[0] for lib, fwd in zip(runs[w], runs["forward"])) for w in workers}
    return {"best": best, "median_ratio": rounds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", default=str(SHARED / "flickr8k-fullres" / "validation"), help="a folder of photos")
    p.add_argument("--images", type=int, default=0, help="use the first N photos (0: all)")
    p.add_argument("--model", default=None, help="model folder or Hub id (default: the bundled model)")
    p.add_argument("--precision", default=None, help="decoder precision (default: the model's auto choice)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--workers", default=None, help="comma-separated DataLoader worker counts (default: the library's)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best of each is kept")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    photos = find_images([args.photos])
    photos = photos[:args.images] if args.images else photos
    if not photos:
        sys.exit(f"no photos in {args.photos}")
    captioner = load(args.model, device=args.device, precision=args.precision)
    workers = [int(w) for w in args.workers.split(",")] if args.workers else [default_workers(captioner.device)]
    pixels = [captioner.transform(captioner.load_image(ph.path)) for ph in photos]
    batches = [torch.stack(pixels[i:i + args.batch_size]) for i in range(0, len(pixels), args.batch_size)]
    print(f"{len(photos)} photos from {Path(args.photos).name}, batch {args.batch_size}, device {captioner.device}, "
          f"{os.cpu_count()} cores, model {captioner.info['model_name']} (decoder {captioner.precision}, beam "
          f"{captioner.decoding['beam_size']}), {args.repeats} interleaved rounds, best kept")
    print(f"{'threads':>7} {'workers':>7} {'forward photos/s':>16} {'library photos/s':>16} {'ratio':>6} "
          f"{'median round ratio':>18} {'CPU ms/photo forward':>20} {'library':>8}")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        m = measure(captioner, photos, batches, args.batch_size, workers, args.repeats)
        (fwd, fwd_cpu) = m["best"]["forward"]
        for w in workers:
            lib, lib_cpu = m["best"][w]
            print(f"{threads:>7} {w:>7} {fwd:>16.1f} {lib:>16.1f} {lib / fwd:>6.2f} {m['median_ratio'][w]:>18.2f} "
                  f"{fwd_cpu:>20.1f} {lib_cpu:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
