"""What a caption's confidence costs: one photo through ``Captioner.caption`` with and without the calibration.

    python -m bench.bench_confidence [--model models/flickr8k-lite0-ensemble] [--repeats 20] [--threads 1]

Both runs use the same loaded model, photos and settings (the app's call: greedy + beam with the model's own
decoding), interleaved photo by photo, each first as often, so that the machine's load falls on both alike; the calibration is
switched off by setting ``captioner.calibrator = None`` for the baseline. Prints the p50 of each, their ratio
and the p50 of the confidence step alone (``timings_ms["confidence"]``), and one JSON line. The target (issue
32): the ratio at most 1.10.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storyteller.captioner import DEFAULT_MODEL_DIR, load  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--photos", default=str(REPO / "examples"), help="folder of .jpg photos")
    p.add_argument("--repeats", type=int, default=20, help="passes over the photos")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the app's setting is 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    captioner = load(args.model)
    calibrator = captioner.calibrator
    if calibrator is None:
        sys.exit(f"{args.model} has no calibration: nothing to measure")
    photos = sorted(Path(args.photos).glob("*.jpg"))
    images = [captioner.load_image(ph) for ph in photos]
    for img in images:  # warm-up, both ways
        captioner.caption([img])
    with_ms, without_ms, step_ms = [], [], []
    for rep in range(args.repeats):
        for img in images:
            for on in ((True, False) if rep % 2 == 0 else (False, True)):  # either order as often: no order bias
                captioner.calibrator = calibrator if on else None
                t = time.perf_counter()
                r = captioner.caption([img])[0]
                (with_ms if on else without_ms).append((time.perf_counter() - t) * 1e3)
                if on:
                    step_ms.append(r.timings_ms["confidence"])
    captioner.calibrator = calibrator
    out = {"model": Path(args.model).name, "photos": len(images), "repeats": args.repeats, "threads": args.threads,
           "precision": captioner.precision, "p50_with_ms": round(statistics.median(with_ms), 2),
           "p50_without_ms": round(statistics.median(without_ms), 2),
           "p50_confidence_step_ms": round(statistics.median(step_ms), 2)}
    out["ratio"] = round(out["p50_with_ms"] / out["p50_without_ms"], 3)
    print(f"one photo, {out['precision']}, {args.threads} thread(s): with confidence {out['p50_with_ms']} ms, "
          f"without {out['p50_without_ms']} ms (x{out['ratio']}); the confidence step {out['p50_confidence_step_ms']} ms")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
