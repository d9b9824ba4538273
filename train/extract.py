"""Extract pooled CNN features (and with --grid the feature grids) of a captioned-image dataset into a
feature cache (train/features.py).

    python -m train extract --dataset ../shared/data/flickr8k --backbone efficientnet_lite0 --out feats/flickr8k-lite0
    python -m train extract --dataset ../shared/data/flickr8k --backbone efficientnet_lite0 --grid --out feats/f8k-lite0-grid
    python -m train extract --dataset nlphuji/flickr30k --backbone resnet50 --out feats/f30k-r50 --device cuda
    python -m train extract --dataset ../shared/data/flickr8k --grid --flip --out feats/f8k-lite0-grid-flip  # mirrored

``--flip`` extracts the photos mirrored left to right, into a cache of their own (same rows, ids and captions;
its manifest's dataset says ``"mirrored": true``): ``fit --flip-features`` trains on it half the time.

Pipeline: DataLoader workers decode + resize + normalise (the backbone's picklable transform) ->
batched forward under torch.inference_mode (CUDA: channels_last + bf16/fp16 autocast) -> float16
chunks in OUT/.partial/ -> at the end features.npy + index.jsonl + manifest.json (last). Killing it
leaves no valid cache; rerunning the same command resumes after the last finished chunk.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from storyteller.backbones import Backbone, create_backbone, list_backbones
from train.data import FLICKR30K, CaptionedImages, open_captioned_images
from train.features import (MANIFEST, PARTIAL, ChunkedCacheWriter, FeatureCache, FeatureCacheError,
                                  same_backbone)


class Mirrored:
    """A transform that mirrors the photo left to right first (picklable, for DataLoader workers)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        from PIL import ImageOps

        return self.transform(ImageOps.mirror(image))


class PixelDataset(Dataset):
    """Rows ``start..len(images)`` of a dataset as normalised pixel tensors (decoded in DataLoader workers).

    Args:
        images: the captioned images.
        transform: the backbone's PIL -> (3, crop, crop) transform.
        start: first row (resuming skips finished chunks).
    """

    def __init__(self, images: CaptionedImages, transform, start: int = 0):
        self.images, self.transform, self.start = images, transform, start

    def __len__(self) -> int:
        return len(self.images) - self.start

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.images.load_image(self.start + i))


def make_loader(images: CaptionedImages, transform, start: int, batch_size: int, workers: int,
                pin_memory: bool = False) -> DataLoader:
    """In-order batches of (B, 3, crop, crop) pixels from row ``start`` on.

    Args:
        images: the captioned images.
        transform: picklable PIL -> tensor transform.
        start: first row.
        batch_size: images per batch.
        workers: DataLoader worker processes (0 decodes in the main process).
        pin_memory: page-lock batches for faster host-to-GPU copies.
    """
    return DataLoader(PixelDataset(images, transform, start), batch_size=batch_size, shuffle=False,
                      num_workers=workers, pin_memory=pin_memory, prefetch_factor=4 if workers > 0 else None,
                      persistent_workers=False)


@dataclass
class ExtractResult:
    """What one extraction run did."""

    cache: FeatureCache | None  # None when stopped early (stop_after_chunks)
    chunks_computed: int  # chunks this run computed
    chunks_resumed: int  # finished chunks found from an earlier run
    images_computed: int
    seconds: float


def extract(images: CaptionedImages, backbone: Backbone, out: str | os.PathLike, batch_size: int = 64,
            workers: int = 1, chunk_size: int = 1024, stop_after_chunks: int | None = None,
            progress: bool = True, grid: bool = False, mirror: bool = False) -> ExtractResult:
    """Compute (or resume) the feature cache of ``images`` in ``out``.

    Args:
        images: the captioned images, in the order rows will have.
        backbone: frozen backbone; its device is used.
        out: cache folder.
        batch_size: images per forward.
        workers: DataLoader workers decoding images.
        chunk_size: rows per resumable chunk.
        stop_after_chunks: debug/test hook: return after computing this many chunks, as if killed.
        progress: show a tqdm bar.
        grid: also store each image's (h, w, D) feature grid (for attention decoders).
        mirror: extract the photos mirrored left to right (the dataset description says so).
    """
    records = images.records
    writer = ChunkedCacheWriter(out, backbone.spec, dataset_description(images, mirror), len(records), chunk_size,
                                grid=backbone.grid_shape() if grid else None)
    resumed = writer.done_chunks
    start = writer.chunk_rows(resumed).start if resumed < writer.num_chunks else len(records)
    if writer.done_ids() != [r.id for r in records[:start]]:
        raise FeatureCacheError(f"{writer.partial}: the finished chunks hold other images than the dataset's first "
                                f"{start} rows (did the dataset change?); delete {writer.partial} and rerun")
    t0 = time.perf_counter()
    computed = 0
    if start < len(records):
        device = backbone.device
        transform = Mirrored(backbone.transform) if mirror else backbone.transform
        loader = make_loader(images, transform, start, batch_size, workers, pin_memory=device.type == "cuda")
        from tqdm.auto import tqdm

        bar = tqdm(total=len(records), initial=start, unit="img", disable=not progress, smoothing=0.1,
                   desc=f"extract {backbone.spec['name']}")
        pending: list[np.ndarray] = []  # (b, D) float32 feature blocks not yet written
        pending_grid: list[np.ndarray] = []  # (b, h, w, D) float16 grid blocks (with grid)
        n_pending, k = 0, resumed
        with torch.inference_mode():
            for pixels in loader:
                pixels = pixels.to(device, non_blocking=True)
                if grid:
                    feats, grids = backbone.forward_grid(pixels)  # (B, D), (B, h, w, D) float32
                    pending_grid.append(grids.half().cpu().numpy())  # float16 now: a chunk of grids is ~1 GB in float32
                else:
                    feats = backbone(pixels)  # (B, D) float32
                pending.append(feats.cpu().numpy())
                n_pending += len(feats)
                bar.update(len(feats))
                while k < writer.num_chunks and n_pending >= len(writer.chunk_rows(k)):
                    block = np.concatenate(pending)
                    rows = writer.chunk_rows(k)
                    chunk, rest = block[:len(rows)], block[len(rows):]
                    gchunk = None
                    if grid:
                        gblock = np.concatenate(pending_grid)
                        gchunk, pending_grid = gblock[:len(rows)], [gblock[len(rows):]]
                    recs = records[rows.start:rows.stop]
                    writer.write_chunk(k, chunk, [r.id for r in recs], [r.split for r in recs], [r.captions for r in recs],
                                       grid=gchunk)
                    pending, n_pending, k, computed = [rest], len(rest), k + 1, computed + 1
                    if stop_after_chunks is not None and computed >= stop_after_chunks and k < writer.num_chunks:
                        bar.close()
                        return ExtractResult(None, computed, resumed, rows.stop - start, time.perf_counter() - t0)
        bar.close()
    seconds = time.perf_counter() - t0
    cache = writer.finalize()
    return ExtractResult(cache, computed, resumed, len(records) - start, seconds)


def dataset_description(images: CaptionedImages, mirror: bool = False) -> dict:
    """What the cache's manifest says its rows are: the dataset's description, plus ``"mirrored": true`` for
    photos extracted mirrored (so a mirrored cache is never taken for the plain one, nor resumed as it)."""
    return {**images.description, "mirrored": True} if mirror else images.description


def _existing_is_same(out: Path, backbone: dict, dataset: dict, grid: bool = False) -> bool | None:
    """None: no finished cache in ``out``; True/False: it was made from the same backbone and dataset
    (and has grids when ``grid`` asks for them)."""
    if not (out / MANIFEST).is_file():
        return None
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    return (same_backbone(manifest.get("backbone", {}), backbone) and manifest.get("dataset") == json.loads(json.dumps(dataset))
            and (not grid or manifest.get("grid") is not None))


def default_workers(device: torch.device) -> int:
    """DataLoader workers when --workers is not given.

    On CUDA the GPU outruns JPEG decoding, so use most cores. On CPU decoding costs ~10% of an
    EfficientNet-Lite0 forward and the forward already uses every core. bench/bench_extract.py on the
    2-core dev box: 0 workers 0.93x / 1 worker 0.88x / 2 workers 0.56x forward-only speed when the
    box was quiet; 0.67x / 0.91x / 1.01x with other jobs on it. One worker is the robust choice;
    big CPUs get one per 8 cores.

    Args:
        device: where the backbone runs.
    """
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return max(1, min(4, cores // 8))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train extract", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default=FLICKR30K, help="Hub dataset id, local imagefolder, or parquet file/folder")
    p.add_argument("--revision", default=None, help="Hub revision (nlphuji/flickr30k: refs/convert/parquet)")
    p.add_argument("--caption-column", default=None)
    p.add_argument("--split-column", default=None)
    p.add_argument("--id-column", default=None)
    p.add_argument("--image-column", default=None)
    p.add_argument("--splits", default=None, help="comma-separated splits to extract (default: all)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per split")
    p.add_argument("--backbone", default="efficientnet_lite0", choices=list_backbones())
    p.add_argument("--random-weights", action="store_true", help="seeded random backbone weights (tests, benchmarks)")
    p.add_argument("--grid", action="store_true",
                   help="also store each image's feature grid (float16; Flickr8k with Lite0: about 1 GB) for attention decoders")
    p.add_argument("--flip", action="store_true",
                   help="extract the photos mirrored left to right (a cache of its own, for fit --flip-features)")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader processes decoding images (default: see default_workers)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for the forward (default: torch's)")
    p.add_argument("--chunk-size", type=int, default=1024, help="rows per resumable chunk")
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1... (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished cache or an unfinished one made differently")
    p.add_argument("--stop-after-chunks", type=int, default=None, help=argparse.SUPPRESS)  # interruption tests
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> ExtractResult | None:
    """Run ``python -m train extract``.

    Args:
        argv: command-line arguments (without the command name).
    """
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.chunk_size < 1 or (args.workers is not None and args.workers < 0):
        sys.exit("--batch-size and --chunk-size must be >= 1, --workers >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workers = default_workers(device) if args.workers is None else args.workers
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    out = Path(args.out)

    images = open_captioned_images(args.dataset, args.splits.split(",") if args.splits else None,
                                   revision=args.revision, caption_column=args.caption_column,
                                   split_column=args.split_column, id_column=args.id_column,
                                   image_column=args.image_column, limit_per_split=args.limit)
    if len(images) == 0:
        sys.exit(f"{args.dataset}: no images selected")
    backbone = create_backbone(args.backbone, pretrained=not args.random_weights, device=device)
    same = _existing_is_same(out, backbone.spec, dataset_description(images, args.flip), args.grid)
    if same and not args.overwrite:
        shutil.rmtree(out / PARTIAL, ignore_errors=True)  # leftover of a run killed right after its manifest
        print(f"{out} already holds this finished cache: {FeatureCache.open(out)}")
        return None
    if args.overwrite:
        shutil.rmtree(out / PARTIAL, ignore_errors=True)
    elif same is False:
        sys.exit(f"{out} holds a finished cache made from another backbone or dataset{' or without grids' if args.grid else ''}; "
                 "pass --overwrite to replace it")

    print(f"{len(images)} images {images.split_counts()}{' mirrored' if args.flip else ''} from {args.dataset} -> {backbone.spec['name']} "
          f"({backbone.feature_dim}-d, weights {backbone.spec['weights']}) on {device}, "
          f"{workers} workers, {torch.get_num_threads()} torch threads")
    try:
        result = extract(images, backbone, out, batch_size=args.batch_size, workers=workers,
                         chunk_size=args.chunk_size, stop_after_chunks=args.stop_after_chunks, progress=not args.quiet,
                         grid=args.grid, mirror=args.flip)
    except FeatureCacheError as e:
        sys.exit(str(e))
    rate = result.images_computed / max(result.seconds, 1e-9)
    resumed = f", resumed after {result.chunks_resumed} finished chunks" if result.chunks_resumed else ""
    if result.cache is None:
        print(f"stopped after {result.chunks_computed} chunks as asked{resumed}; rerun to resume")
    else:
        print(f"wrote {result.cache}: {result.images_computed} images in {result.seconds:.1f}s "
              f"({rate:.1f} img/s){resumed}")
    return result


if __name__ == "__main__":
    main()
