"""Make a Flickr30k-shaped parquet dataset from the Flickr8k photos, to run the Flickr30k recipe at its real size
where the Hub is out of reach.

    python -m bench.make_flickr30k_like --flickr8k ../shared/data/flickr8k --out /tmp/flickr30k-like

What it writes matches ``nlphuji/flickr30k`` at revision ``refs/convert/parquet`` as ``train/data.py`` reads it:
OUT/TEST/test/0000.parquet ... (the Hub's layout: one config, one "test" split holding every row), columns
``image`` {bytes, path}, ``caption`` (5 strings), ``sentids``, ``split`` (train 29,000 / val 1,014 / test 1,000),
``img_id`` and ``filename``: 31,014 photos, 155,070 captions.

Each Flickr8k photo (7,000) is used 4 or 5 times, each time varied: mirrored or not, a different crop (5-15%
off the sides), a different JPEG quality (70-95). A photo's variants share its captions ("left" and "right"
swapped in a mirrored one) and its split, so no test photo has a twin in train. Every file's SHA-256 is checked:
no two are byte-identical (a collision is re-encoded at another quality). Seeded: the same command makes the
same bytes. Keep OUT outside the repository (about 0.6 GB).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import sys
import time
from pathlib import Path

from PIL import Image, ImageOps

SIZES = {"test": 1000, "val": 1014, "train": 29000}  # nlphuji/flickr30k's Karpathy split
ROWS_PER_FILE = 3500  # ~9 files, as the Hub's conversion shards it (sizes differ: our photos are 224 px)


def _swap_sides(caption: str) -> str:
    # A mirrored photo's left is the original's right (the same swap fit --flip-features makes).
    words = caption.split(" ")
    swap = {"left": "right", "right": "left", "Left": "Right", "Right": "Left"}
    return " ".join(swap.get(w, w) for w in words)


def _variant(image: Image.Image, k: int, rng: random.Random) -> tuple[Image.Image, bool]:
    """Variant ``k`` of a photo: k = 0 is the photo itself, odd k are mirrored; k >= 2 are cropped."""
    mirrored = k % 2 == 1
    if k >= 2:
        w, h = image.size
        left, top = int(w * rng.uniform(0.0, 0.15)), int(h * rng.uniform(0.0, 0.15))
        right, bottom = w - int(w * rng.uniform(0.0, 0.15)), h - int(h * rng.uniform(0.0, 0.15))
        image = image.crop((left, top, right, bottom))
    if mirrored:
        image = ImageOps.mirror(image)
    return image, mirrored


def _encode(image: Image.Image, quality: int, seen: set[bytes]) -> bytes:
    for q in [quality, *range(96, 60, -1)]:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=q)
        data = buf.getvalue()
        digest = hashlib.sha256(data).digest()
        if digest not in seen:
            seen.add(digest)
            return data
    raise RuntimeError("could not make a distinct file")  # never seen: every quality collided


def _sources(flickr8k: Path) -> list[tuple[Path, list[str]]]:
    out = []
    for split in ("train", "validation"):
        meta = flickr8k / split / "metadata.jsonl"
        if not meta.is_file():
            sys.exit(f"{flickr8k}: no {split}/metadata.jsonl; expected the Flickr8k imagefolder (train, validation)")
        for line in meta.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                out.append((flickr8k / split / row["file_name"], list(row["captions"])))
    return out


def plan(n_sources: int, total: int, seed: int) -> list[tuple[int, int, str]]:
    """(source, variant, split) for every output row, rows shuffled as the Hub's are (splits interleaved).

    Args:
        n_sources: number of source photos.
        total: rows wanted (31,014 for Flickr30k).
        seed: shuffling seed.
    """
    rng = random.Random(seed)
    order = list(range(n_sources))
    rng.shuffle(order)
    scale = total / sum(SIZES.values())
    quotas = [max(1, round(n * scale)) for name, n in SIZES.items() if name != "train"]
    quotas.append(total - sum(quotas))  # train: the rest
    names = list(SIZES)
    # total // n_sources variants of every photo, one more for the first total % n_sources. A photo's variants
    # all go to one split: the split being filled takes what it still needs of a photo, and what it leaves goes to
    # the last photo (of train), so the split sizes are exact.
    rows, split, left, spare = [], 0, quotas[0], 0
    for rank, s in enumerate(order):
        count = total // n_sources + (1 if rank < total % n_sources else 0)
        if split < len(quotas) - 1:
            take = min(count, left)
            spare, count = spare + count - take, take
        elif rank == n_sources - 1:
            count += spare
        rows += [(s, v, names[split]) for v in range(count)]
        left -= count
        while left == 0 and split < len(quotas) - 1:
            split += 1
            left = quotas[split]
    rng.shuffle(rows)
    return rows


def make(flickr8k: Path, out: Path, total: int = sum(SIZES.values()), seed: int = 0) -> dict:
    """Write the dataset; returns counts and seconds.

    Args:
        flickr8k: the Flickr8k imagefolder (train/ and validation/ with metadata.jsonl).
        out: output folder (created; must not hold parquet files already).
        total: number of photos (31,014 for Flickr30k's size).
        seed: seed of the variants and the order.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if total < 3:
        sys.exit("--photos must be >= 3 (one per split)")
    folder = out / "TEST" / "test"
    if folder.exists() and any(folder.glob("*.parquet")):
        sys.exit(f"{folder} already holds parquet files; delete it or choose another --out")
    sources = _sources(flickr8k)
    folder.mkdir(parents=True, exist_ok=True)
    rows, seen, t0 = plan(len(sources), total, seed), set(), time.perf_counter()
    batch: list[dict] = []
    files = 0

    def flush() -> None:
        nonlocal batch, files
        tmp = folder / f"{files:04d}.parquet.tmp"
        pq.write_table(pa.Table.from_pylist(batch), tmp, row_group_size=500)
        tmp.replace(folder / f"{files:04d}.parquet")
        files, batch = files + 1, []

    for i, (s, v, split) in enumerate(rows):
        path, captions = sources[s]
        rng = random.Random(seed * 1_000_003 + s * 31 + v)
        with Image.open(path) as im:
            image, mirrored = _variant(im.convert("RGB"), v, rng)
        data = _encode(image, rng.randint(70, 95), seen)
        name = f"{path.stem}_{v}.jpg"
        caps = [_swap_sides(c) for c in captions] if mirrored else captions
        batch.append({"image": {"bytes": data, "path": name}, "caption": caps,
                      "sentids": [str(5 * i + k) for k in range(len(caps))], "split": split, "img_id": str(i),
                      "filename": name})
        if len(batch) == ROWS_PER_FILE:
            flush()
    if batch:
        flush()
    counts = {name: sum(1 for r in rows if r[2] == name) for name in SIZES}
    return {"photos": len(rows), "captions": sum(len(sources[s][1]) for s, _, _ in rows), "splits": counts,
            "files": files, "distinct_files": len(seen), "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> None:
    """Run ``python -m bench.make_flickr30k_like``.

    Args:
        argv: command-line arguments.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flickr8k", default="../shared/data/flickr8k", help="the Flickr8k imagefolder")
    p.add_argument("--out", required=True, help="output folder, outside the repository")
    p.add_argument("--photos", type=int, default=sum(SIZES.values()), help="number of photos (Flickr30k: 31,014)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps(make(Path(args.flickr8k), Path(args.out), args.photos, args.seed)))


if __name__ == "__main__":
    main()
