"""What each stage of the Flickr30k recipe costs as the dataset grows: time, peak RAM, peak disk, and growth.

    python -m bench.scale --dataset /data/flickr30k-like --work /tmp/scale --sizes 1000 4000 16000 31014
    python -m bench.scale --dataset /data/flickr30k-like --work /tmp/scale-r50 --synthetic resnet50 --stages fit scst
    python -m bench.scale --dataset /data/flickr30k-like --work /tmp/r50-speed --sizes 200 --stages extract \\
        --backbone resnet50 --random-weights

For each size N (photos: the first N rows of the parquet, which hold the three splits in Flickr30k's
proportions), every stage runs as its own child process, the way the recipe runs it, and is measured:

- ``extract``  the backbone over the N photos (``--grid``), or, with ``--features-from CACHE``, the first N rows cut
               from a finished cache, or, with ``--synthetic BACKBONE``, random features of that backbone's shape
               (ResNet50: 7x7x2048) written straight to a cache;
- ``fit``      the attention decoder for a fixed budget: 1 epoch over ``--fit-images`` training photos, validated on
               ``--val-images``; it still opens and holds (or memory-maps) every one of the N photos' grids;
- ``reward``   CIDEr-D document frequencies over the training split's references (5 per photo), the table SCST builds
               once, then 1,000 samples scored;
- ``scst``     1 epoch over ``--scst-images`` photos, validated on ``--val-images``;
- ``bundle``   float16 weights and the card;
- ``evaluate`` the bundle, greedy and beam 3, on the whole test split (it grows with N);
- ``upload``   ``hub_upload.py --dry-run`` with a Space: the files staged for upload, no network.

Measured per stage: wall seconds; peak RSS (``getrusage`` of the child: file pages it maps count too) and peak
anonymous RSS (``RssAnon`` of /proc, sampled every 0.2 s: the memory the process really needs); peak disk of the
size's folder (sampled likewise). Every child gets ``--threads`` threads (OMP_NUM_THREADS). Prints a Markdown
table with each figure's ratio to the smallest size's, and writes WORK/scale.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STAGES = ("extract", "fit", "reward", "scst", "bundle", "evaluate", "upload")  # the recipe's order
SYNTHETIC_GRID = {"resnet50": (7, 7, 2048), "efficientnet_lite0": (7, 7, 1280)}


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:  # removed while walking (a .tmp renamed into place)
                pass
    return total


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(cmd: list[str], env: dict[str, str], disk: Path, log: Path) -> dict[str, Any]:
    """Run ``cmd`` to the end; its wall seconds, peak RSS, peak anonymous RSS and the peak bytes under ``disk``.

    Args:
        cmd: the command.
        env: its environment.
        disk: folder whose size is sampled.
        log: file that gets its stdout and stderr.
    """
    peaks = {"anon": 0, "disk": folder_bytes(disk)}
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                peaks["anon"] = max(peaks["anon"], _rss_anon(proc.pid))
                peaks["disk"] = max(peaks["disk"], folder_bytes(disk))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    seconds = time.perf_counter() - t0
    peaks["disk"] = max(peaks["disk"], folder_bytes(disk))
    if proc.returncode != 0:
        raise SystemExit(f"bench.scale: {' '.join(cmd[:4])}... failed (exit {proc.returncode}); see {log}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "peak_anon_mb": round(peaks["anon"] / 2 ** 20),
            "peak_disk_mb": round(peaks["disk"] / 2 ** 20)}


def subset_parquet(dataset: Path, n: int, out: Path) -> Path:
    """The first ``n`` rows of a parquet dataset (its files in name order) as OUT/TEST/test/0000.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = out / "TEST" / "test"
    target = folder / "0000.parquet"
    if target.is_file() and pq.ParquetFile(target).metadata.num_rows == n:
        return out
    folder.mkdir(parents=True, exist_ok=True)
    tables, left = [], n
    for f in sorted(dataset.rglob("*.parquet")):
        if left <= 0:
            break
        t = pq.read_table(f)
        tables.append(t.slice(0, left))
        left -= len(tables[-1])
    if left > 0:
        raise SystemExit(f"bench.scale: {dataset} has only {n - left} rows, fewer than {n}")
    tmp = folder / "0000.parquet.tmp"
    pq.write_table(pa.concat_tables(tables), tmp, row_group_size=500)
    tmp.replace(target)
    return out


def cut_cache(source: Path, n: int, out: Path) -> None:
    """The first ``n`` rows of a finished feature cache as a cache of its own, streamed (never all in memory)."""
    from train.features import ChunkedCacheWriter, FeatureCache

    if (out / "manifest.json").is_file() and len(FeatureCache.open(out)) == n:
        return
    src = FeatureCache.open(source)
    chunk = 1024
    writer = ChunkedCacheWriter(out, src.backbone, {**src.manifest["dataset"], "first_rows": n}, n, chunk, src.grid_shape)
    for k in range(writer.done_chunks, writer.num_chunks):
        rows = writer.chunk_rows(k)
        writer.write_chunk(k, src.features[rows.start:rows.stop], src.ids[rows.start:rows.stop],
                           src.splits[rows.start:rows.stop], src.captions[rows.start:rows.stop],
                           grid=None if src.grid is None else src.grid[rows.start:rows.stop])
    writer.finalize()


def synthetic_cache(dataset: Path, backbone: str, out: Path, as_extracted: bool = False) -> None:
    """Random float16 features and grids of ``backbone``'s shape for the photos of ``dataset`` (ids, splits and
    captions from it), written straight into a cache: the memory and disk of a real one, without extracting.

    Args:
        dataset: the parquet dataset.
        backbone: a key of ``SYNTHETIC_GRID``.
        out: the cache folder.
        as_extracted: describe the rows exactly as ``extract --random-weights`` would (no ``"synthetic"`` mark), so
            that the recipe's extract step takes the cache as its own finished one and goes on to fit.
    """
    from storyteller.backbones import backbone_spec
    from train.data import open_captioned_images
    from train.features import DTYPE, FEATURES, GRID, finish_in_place

    images = open_captioned_images(dataset)
    n, (h, w, d) = len(images), SYNTHETIC_GRID[backbone]
    if (out / "manifest.json").is_file() and json.loads((out / "manifest.json").read_text())["count"] == n:
        return
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    block = np.abs(rng.normal(size=(256, h, w, d))).astype(DTYPE)  # post-ReLU-like values, reused with a row shift
    grid = np.lib.format.open_memmap(out / GRID, mode="w+", dtype=DTYPE, shape=(n, h, w, d))
    feats = np.lib.format.open_memmap(out / FEATURES, mode="w+", dtype=DTYPE, shape=(n, d))
    for start in range(0, n, len(block)):
        part = np.roll(block, start // len(block), axis=0)[: n - start]
        grid[start:start + len(part)] = part
        feats[start:start + len(part)] = part.astype(np.float32).mean((1, 2))
    grid.flush()
    feats.flush()
    del grid, feats
    spec = {**backbone_spec(backbone), "weights": None}
    records = images.records
    finish_in_place(out, [r.id for r in records], [r.split for r in records], [r.captions for r in records], spec,
                    images.description if as_extracted else {**images.description, "synthetic": True})


def reward_task(features: Path, samples: int = 1000) -> None:
    """The ``reward`` stage: CIDEr-D document frequencies over the training split's references, as ``scst`` builds
    them, then ``samples`` captions (other photos' references) scored against random photos."""
    from train.features import FeatureCache
    from storyteller.cider import CaptionReward

    cache = FeatureCache.open(features)
    refs = [cache.captions[r] for r in cache.split("train")]
    t0 = time.perf_counter()
    reward = CaptionReward(refs)
    t1 = time.perf_counter()
    encoded = reward.encode_references(refs)
    rng = np.random.default_rng(0)
    image = rng.integers(len(refs), size=samples)
    hyps = [reward.encode(refs[int(i)][0]) for i in rng.integers(len(refs), size=samples)]
    cider, _ = reward.score(hyps, image, encoded)
    print(json.dumps({"images": len(refs), "references": sum(map(len, refs)), "ngrams": int(reward.df_keys.size),
                      "df_seconds": round(t1 - t0, 2), "score_seconds": round(time.perf_counter() - t1, 2),
                      "mean_cider": round(float(cider.mean()), 4)}))


def stage_command(stage: str, n: int, d: Path, args: argparse.Namespace) -> list[str]:
    """The child command of one stage at size ``n`` in folder ``d`` (the recipe's arguments, fixed budgets)."""
    py, feats, t = sys.executable, d / "features", str(args.threads)
    me = [py, "-m", "bench.scale", "--dataset", str(d / "data"), "--work", str(d)]
    if stage == "extract" and args.synthetic:
        return [*me, "--task", "synthetic", "--backbone", args.synthetic]
    if stage == "extract" and args.features_from and n not in args.extract_sizes:
        return [*me, "--task", "cut", "--features-from", str(args.features_from), "--sizes", str(n)]
    budget = ["--max-val-images", str(args.val_images), "--progress", "off", "--num-threads", t,
              "--feature-memory", args.feature_memory]
    return {
        "extract": [py, "-m", "train", "extract", "--dataset", str(d / "data"), "--backbone", args.backbone, "--grid",
                    "--out", str(feats), "--threads", t, "--workers", "0", "--quiet",
                    *(["--random-weights"] if args.random_weights else [])],
        "fit": [py, "-m", "train", "fit", "--features", str(feats), "--out", str(d / "fit"), "--decoder", "attention",
                "--epochs", "1", "--batch-size", "128", "--lr", "1e-3", "--dropout", "0.5", "--min-freq", "1",
                "--max-train-images", str(args.fit_images), *budget],
        "reward": [*me, "--task", "reward"],
        "scst": [py, "-m", "train", "scst", "--init", str(d / "fit" / "model"), "--features", str(feats),
                 "--out", str(d / "scst"), "--samples", "5", "--baseline", "mean", "--reward", "cider:1",
                 "--batch-size", "50", "--lr", "2e-4", "--epochs", "1", "--bad-endings", "none",
                 "--max-train-images", str(args.scst_images), *budget],
        "bundle": [py, "-m", "train", "bundle", "--model", str(d / "scst" / "model"), "--out", str(d / "bundle"),
                   "--beam", "3", "--alpha", "1.0", "--no-repeat-ngram-size", "3", "--bad-endings", "standard"],
        "evaluate": [py, "-m", "train", "evaluate", "--model", str(d / "bundle"), "--features", str(feats),
                     "--split", "test", "--beam", "1", "3", "--precision", "fp32", "--batch-size", "100",
                     "--out", str(d / "test.json")],
        "upload": [py, "hub_upload.py", str(d / "bundle"), "--repo-id", "scale/storyteller-test",
                   "--space-id", "scale/storyteller-space", "--dry-run"],
    }[stage]


def run_size(n: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every stage of ``args.stages`` at ``n`` photos, measured; outputs of an earlier run are replaced."""
    import shutil

    d = args.work / str(n)
    subset_parquet(args.dataset, n, d / "data")
    (d / "tmp").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TMPDIR": str(d / "tmp"), "HF_DATASETS_CACHE": str(d / "hf-datasets"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    results = {}
    for stage in args.stages:
        for old in {"fit": ["fit"], "scst": ["scst"], "bundle": ["bundle"]}.get(stage, []):
            shutil.rmtree(d / old, ignore_errors=True)
        results[stage] = measure(stage_command(stage, n, d, args), env, d, d / "log.txt")
        print(f"{n:>6} photos  {stage:<8} {results[stage]}", flush=True)
    return results


def table(results: dict[int, dict[str, dict[str, Any]]]) -> str:
    """Markdown: per stage and size the figures, with each one's ratio to the smallest size's."""
    sizes = sorted(results)
    lines = ["| stage | photos | x photos | seconds | x | peak RSS MB | peak anon MB | x | peak disk MB | x |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    stages = [s for s in STAGES if any(s in results[n] for n in sizes)]
    for stage in stages:
        base = next(results[n][stage] for n in sizes if stage in results[n])
        first = next(n for n in sizes if stage in results[n])
        for n in sizes:
            if stage not in results[n]:
                continue
            r = results[n][stage]

            def ratio(key: str) -> str:
                return f"{r[key] / base[key]:.1f}" if base[key] else "-"

            lines.append(f"| {stage} | {n:,} | {n / first:.1f} | {r['seconds']:.1f} | {ratio('seconds')} | "
                         f"{r['peak_rss_mb']:,} | {r['peak_anon_mb']:,} | {ratio('peak_anon_mb')} | "
                         f"{r['peak_disk_mb']:,} | {ratio('peak_disk_mb')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run ``python -m bench.scale``.

    Args:
        argv: command-line arguments.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", type=Path, required=True, help="parquet folder (bench/make_flickr30k_like.py's)")
    p.add_argument("--work", type=Path, required=True, help="output folder, outside the repository")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000, 31014])
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--random-weights", action="store_true", help="extract with seeded random backbone weights")
    p.add_argument("--features-from", type=Path, default=None,
                   help="a finished cache of the whole dataset: sizes not in --extract-sizes cut their rows from it")
    p.add_argument("--extract-sizes", type=int, nargs="*", default=[], help="with --features-from: sizes still extracted")
    p.add_argument("--synthetic", choices=sorted(SYNTHETIC_GRID), default=None,
                   help="random features of this backbone's grid shape instead of extracting")
    p.add_argument("--feature-memory", choices=("auto", "ram", "mmap"), default="auto", help="fit and scst's")
    p.add_argument("--fit-images", type=int, default=200, help="fit's fixed budget: training photos of its one epoch")
    p.add_argument("--scst-images", type=int, default=100, help="scst's fixed budget: training photos of its one epoch")
    p.add_argument("--val-images", type=int, default=100, help="validation photos of fit and scst")
    p.add_argument("--threads", type=int, default=1, help="threads of every child")
    p.add_argument("--json", type=Path, default=None, help="where the figures go (default WORK/scale.json)")
    p.add_argument("--task", choices=("cut", "synthetic", "reward"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.task == "cut":
        return cut_cache(args.features_from, args.sizes[0], args.work / "features")
    if args.task == "synthetic":
        return synthetic_cache(args.dataset, args.backbone, args.work / "features")
    if args.task == "reward":
        return reward_task(args.work / "features")
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict[str, dict[str, Any]]] = {}
    for n in args.sizes:
        results[n] = run_size(n, args)
        write = {"date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:], "results": results}
        (args.json or args.work / "scale.json").write_text(json.dumps(write, indent=1), encoding="utf-8")
    print(table(results))


if __name__ == "__main__":
    main()
