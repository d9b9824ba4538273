"""Captioned-image datasets: Flickr30k from the Hub, local imagefolders and local parquet files.

    open_captioned_images(source, split=None, ...) -> CaptionedImages   # map-style, images decoded lazily
    images.records[i]  -> ImageRecord(id, split, captions)                # cheap: no image decoded
    images[i]          -> CaptionedImage(id, image: PIL RGB, captions, split)
    iter_captioned_images(source, split=None, ...) -> Iterator[CaptionedImage]

Sources (``source`` argument):
- a Hub dataset id, default ``nlphuji/flickr30k`` at revision ``refs/convert/parquet`` (the Hub's
  parquet conversion; datasets>=4 refuses the repo's loading script). Its ``split`` column holds the
  Karpathy split: train 29,000 / val 1,014 / test 1,000 images, five captions each (``caption``).
- a local folder in Hugging Face ``imagefolder`` layout with ``metadata.jsonl`` lines
  ``{"file_name": ..., "captions": [...]}``, either one split folder or a folder of split folders
  (their names are the splits), e.g. ``../shared/data/flickr8k/{train,validation}``.
- a local ``.parquet`` file or a folder of them, with the Hub dataset's schema (image struct
  {bytes, path}, caption list, split, filename, ...).

Split names are normalised: ``val``, ``valid`` and ``dev`` become ``validation``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from storyteller.images import ImageError, load_image

FLICKR30K = "nlphuji/flickr30k"
FLICKR30K_REVISION = "refs/convert/parquet"
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}
_SPLIT_ORDER = ("train", "validation", "test")
_CAPTION_COLUMNS = ("caption", "captions", "sentences", "text")
_ID_COLUMNS = ("filename", "file_name", "img_id", "image_id", "id")


@dataclass(frozen=True)
class ImageRecord:
    """One image's metadata, without the pixels."""

    id: str
    split: str
    captions: list[str]


@dataclass
class CaptionedImage:
    """One decoded image with its captions."""

    id: str
    image: Image.Image  # RGB as storyteller.images.load_image gives it (the app's decoding)
    captions: list[str]
    split: str


def normalize_split(name: str) -> str:
    """``"val"``/``"valid"``/``"dev"`` -> ``"validation"``; other names unchanged (lower-cased)."""
    name = str(name).strip().lower()
    return _SPLIT_ALIASES.get(name, name)


def _as_captions(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(c, str) for c in value):
        return list(value)
    raise ValueError(f"{where}: captions must be a string or a list of strings, got {value!r:.200}")


def _decode(data: bytes | None, path: str | None, id_: str, draft_size: int | None = None) -> Image.Image:
    # The app's own loader (EXIF orientation, transparency on white, 16-bit grey scaled, CMYK...), at
    # full resolution unless draft_size is set (then big JPEGs are decoded as the app decodes them).
    try:
        return load_image(data if data is not None else path, draft_size=draft_size)
    except ImageError as e:
        raise ValueError(f"image {id_!r} cannot be decoded: {e}") from e


class CaptionedImages(Sequence):
    """A selection of captioned images; ``records`` are in memory, pixels are decoded on access.

    Picklable, so DataLoader workers can decode images in parallel. Use ``open_captioned_images``.

    Attributes:
        records: per-image id, split and captions, in dataset order.
        description: JSON-able account of the source, columns and selection (stored in cache manifests).
    """

    records: list[ImageRecord]
    description: dict[str, Any]
    draft_size: int | None = None  # JPEG draft decoding as in storyteller.images.load_image (None: full size)

    def load_image(self, i: int) -> Image.Image:
        """Decode image ``i`` as RGB."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> CaptionedImage:
        r = self.records[i]
        return CaptionedImage(id=r.id, image=self.load_image(i), captions=r.captions, split=r.split)

    def split_counts(self) -> dict[str, int]:
        """Number of images per split, in order of first appearance."""
        counts: dict[str, int] = {}
        for r in self.records:
            counts[r.split] = counts.get(r.split, 0) + 1
        return counts


class _FolderImages(CaptionedImages):
    def __init__(self, records: list[ImageRecord], paths: list[Path], description: dict[str, Any]):
        self.records, self.paths, self.description = records, paths, description

    def load_image(self, i: int) -> Image.Image:
        return _decode(None, str(self.paths[i]), self.records[i].id, self.draft_size)


class _ArrowImages(CaptionedImages):
    def __init__(self, records: list[ImageRecord], parts: list, rows: list[tuple[int, int]],
                 image_column: str, description: dict[str, Any]):
        # parts: datasets.Dataset objects reduced to the image column with decode=False, so a row
        # read returns {"bytes", "path"} and decoding happens here (in the worker), once.
        self.records, self.parts, self.rows, self.description = records, parts, rows, description
        self.image_column = image_column

    def load_image(self, i: int) -> Image.Image:
        part, row = self.rows[i]
        value = self.parts[part][row][self.image_column]
        if isinstance(value, dict):
            return _decode(value.get("bytes"), value.get("path"), self.records[i].id, self.draft_size)
        if isinstance(value, str):
            return _decode(None, value, self.records[i].id, self.draft_size)
        raise ValueError(f"image {self.records[i].id!r}: column {self.image_column!r} holds {type(value).__name__}, "
                         "expected an image struct {bytes, path} or a path")


def _select(records: list[ImageRecord], split: str | Sequence[str] | None, limit_per_split: int | None,
            source: str) -> list[int]:
    present = list(dict.fromkeys(r.split for r in records))
    if split is None:
        wanted = present
    else:
        wanted = [normalize_split(s) for s in ([split] if isinstance(split, str) else split)]
        missing = [s for s in wanted if s not in present]
        if missing:
            raise ValueError(f"{source}: no split {missing}; splits present: {present}")
    if limit_per_split is not None and limit_per_split < 1:
        raise ValueError(f"limit_per_split must be >= 1, got {limit_per_split}")
    taken = {s: 0 for s in wanted}
    keep = []
    for i, r in enumerate(records):
        if r.split in taken and (limit_per_split is None or taken[r.split] < limit_per_split):
            taken[r.split] += 1
            keep.append(i)
    return keep


def _check_unique(records: list[ImageRecord], source: str) -> None:
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise ValueError(f"{source}: image id {r.id!r} occurs twice; pick an id column with unique values")
        seen.add(r.id)


def _split_order(name: str) -> tuple[int, str]:
    return (_SPLIT_ORDER.index(name) if name in _SPLIT_ORDER else len(_SPLIT_ORDER), name)


def _open_imagefolder(root: Path, split, limit_per_split) -> _FolderImages:
    if (root / "metadata.jsonl").is_file():  # a single split folder: its name is the split
        folders = {normalize_split(root.name): root}
    else:
        folders = {normalize_split(d.name): d for d in root.iterdir() if (d / "metadata.jsonl").is_file()}
    records, paths = [], []
    for name in sorted(folders, key=_split_order):
        meta = folders[name] / "metadata.jsonl"
        with open(meta, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    file_name = row["file_name"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{meta} line {n}: expected {{\"file_name\", \"captions\"}} ({e!r})") from None
                if "captions" not in row:
                    raise ValueError(f"{meta} line {n}: no 'captions' field")
                records.append(ImageRecord(str(file_name), name, _as_captions(row["captions"], f"{meta} line {n}")))
                paths.append(folders[name] / file_name)
    keep = _select(records, split, limit_per_split, str(root))
    records, paths = [records[i] for i in keep], [paths[i] for i in keep]
    _check_unique(records, str(root))
    description = {"source": str(root.resolve()), "kind": "imagefolder", "splits": sorted({r.split for r in records}, key=_split_order),
                   "limit_per_split": limit_per_split}
    return _FolderImages(records, paths, description)


def _pick_column(names: list[str], given: str | None, candidates: Sequence[str], what: str, source: str,
                 required: bool) -> str | None:
    if given is not None:
        if given not in names:
            raise ValueError(f"{source}: no {what} column {given!r}; columns: {names}")
        return given
    for c in candidates:
        if c in names:
            return c
    if required:
        raise ValueError(f"{source}: no {what} column (looked for {list(candidates)}); columns: {names}; "
                         f"name it explicitly")
    return None


def _open_arrow(dataset_dict, source: str, kind: str, revision: str | None, split, limit_per_split,
                caption_column, split_column, id_column, image_column) -> _ArrowImages:
    import datasets

    hf_splits = list(dataset_dict)
    if not hf_splits:
        raise ValueError(f"{source}: the dataset is empty")
    names = list(dataset_dict[hf_splits[0]].column_names)
    image_column = _pick_column(names, image_column, ("image",), "image", source, True)
    caption_column = _pick_column(names, caption_column, _CAPTION_COLUMNS, "caption", source, True)
    split_column = _pick_column(names, split_column, ("split",), "split", source, False)
    id_column = _pick_column(names, id_column, _ID_COLUMNS, "id", source, False)

    records, rows, parts = [], [], []
    for p, hf_split in enumerate(hf_splits):
        ds = dataset_dict[hf_split]
        meta_cols = [c for c in (caption_column, split_column, id_column) if c is not None]
        meta = ds.select_columns(meta_cols).to_dict()  # no image column: nothing is decoded here
        for row in range(len(ds)):
            where = f"{source} [{hf_split}] row {row}"
            the_split = normalize_split(meta[split_column][row] if split_column else hf_split)
            id_ = str(meta[id_column][row]) if id_column else f"{hf_split}/{row}"
            records.append(ImageRecord(id_, the_split, _as_captions(meta[caption_column][row], where)))
            rows.append((p, row))
        try:  # Image feature, plain {bytes, path} struct or path string all cast to undecoded images
            parts.append(ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False)))
        except Exception as e:
            raise ValueError(f"{source}: column {image_column!r} ({ds.features[image_column]}) is not an image "
                             f"column: {e}") from e

    keep = _select(records, split, limit_per_split, source)
    records, rows = [records[i] for i in keep], [rows[i] for i in keep]
    _check_unique(records, source)
    description = {"source": source, "kind": kind, "revision": revision,
                   "columns": {"image": image_column, "caption": caption_column, "split": split_column, "id": id_column},
                   "splits": sorted({r.split for r in records}, key=_split_order), "limit_per_split": limit_per_split}
    return _ArrowImages(records, parts, rows, image_column, description)


def _parquet_files(path: Path) -> dict[str, list[str]]:
    if path.is_file():
        return {"train": [str(path)]}
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise ValueError(f"{path}: neither an imagefolder (no metadata.jsonl in it or its subfolders) "
                         "nor a folder of .parquet files")
    # Files in split-named subfolders (Hub layout: <config>/<split>/*.parquet) keep that split name;
    # a split column in the data overrides it anyway.
    by_split: dict[str, list[str]] = {}
    for f in files:
        name = f.parent.name if f.parent != path else "train"
        by_split.setdefault(name, []).append(str(f))
    return by_split


def open_captioned_images(source: str | os.PathLike = FLICKR30K, split: str | Sequence[str] | None = None, *,
                          revision: str | None = None, caption_column: str | None = None,
                          split_column: str | None = None, id_column: str | None = None,
                          image_column: str | None = None, limit_per_split: int | None = None,
                          cache_dir: str | None = None) -> CaptionedImages:
    """Open a captioned-image dataset; no image is decoded until accessed.

    Args:
        source: a Hub dataset id, a local imagefolder, or a local parquet file/folder.
        split: one split name, a list of them, or None for all (``val`` means ``validation``).
        revision: Hub revision; for ``nlphuji/flickr30k`` defaults to ``refs/convert/parquet``.
        caption_column: column with the caption list (default: first of caption, captions, sentences, text).
        split_column: column with each row's split (default: ``split`` if present, else the dataset's splits).
        id_column: column with a unique image id (default: first of filename, file_name, img_id, image_id, id).
        image_column: column with the image (default ``image``).
        limit_per_split: keep only the first N images of each split.
        cache_dir: ``datasets`` cache folder for Hub/parquet sources.
    """
    path = Path(source).expanduser()
    if path.is_dir() and ((path / "metadata.jsonl").is_file() or any((d / "metadata.jsonl").is_file() for d in path.iterdir())):
        return _open_imagefolder(path, split, limit_per_split)
    import datasets

    if path.exists():
        if path.is_file() and path.suffix != ".parquet":
            raise ValueError(f"{path}: expected a .parquet file or an imagefolder with metadata.jsonl")
        dd = datasets.load_dataset("parquet", data_files=_parquet_files(path), cache_dir=cache_dir)
        return _open_arrow(dd, str(path.resolve()), "parquet", None, split, limit_per_split,
                           caption_column, split_column, id_column, image_column)
    source = str(source)
    if revision is None and source == FLICKR30K:
        revision = FLICKR30K_REVISION
    try:
        dd = datasets.load_dataset(source, revision=revision, cache_dir=cache_dir)
    except Exception as e:  # offline, unknown repo, loading-script repo...: say what was tried
        raise ValueError(f"{source!r} is not a local folder or parquet file, and loading it from the Hugging Face "
                         f"Hub (revision {revision!r}) failed: {type(e).__name__}: {e}") from e
    return _open_arrow(dd, source, "hub", revision, split, limit_per_split,
                       caption_column, split_column, id_column, image_column)


def iter_captioned_images(source: str | os.PathLike = FLICKR30K, split: str | Sequence[str] | None = None,
                          **kwargs: Any) -> Iterator[CaptionedImage]:
    """Yield decoded ``CaptionedImage``s in dataset order; same arguments as ``open_captioned_images``.

    Args:
        source: a Hub dataset id, a local imagefolder, or a local parquet file/folder.
        split: one split name, a list of them, or None for all.
        **kwargs: passed to ``open_captioned_images``.
    """
    images = open_captioned_images(source, split, **kwargs)
    for i in range(len(images)):
        yield images[i]
