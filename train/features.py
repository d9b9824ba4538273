"""The on-disk feature cache: one pooled CNN feature per image (and optionally its feature grid),
with its id, split and captions.

    DIR/manifest.json  {"format": "storyteller-features", "version": 1, "complete": true, "count": N,
                        "feature_dim": D, "dtype": "float16", "grid": [h, w] or null,
                        "backbone": <spec>, "dataset": {...}, "versions": {...}}
    DIR/features.npy   (N, D) float16, memory-mapped on open (np.load(mmap_mode="r", allow_pickle=False))
    DIR/grid.npy       (N, h, w, D) float16, memory-mapped; only in caches extracted with ``--grid``
                       (Flickr8k at 7x7x1280: about 1 GB, so it is read row by row, never loaded whole)
    DIR/index.jsonl    N lines {"id": str, "split": str, "captions": [str, ...]}, row order of features.npy

``manifest.json`` is written last (atomically, via os.replace), so a folder without it is an
unfinished extraction and ``FeatureCache.open`` refuses it. ``ChunkedCacheWriter`` is the resumable
writer behind ``python -m train extract``: it writes chunks into ``DIR/.partial/`` and assembles the
three files only when every chunk is done.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from storyteller.fileio import write_json_atomic

FORMAT, VERSION = "storyteller-features", 1
MANIFEST, FEATURES, GRID, INDEX, PARTIAL = "manifest.json", "features.npy", "grid.npy", "index.jsonl", ".partial"
DTYPE = np.float16


class FeatureCacheError(ValueError):
    """A feature cache that is missing, unfinished, corrupt, or made with another backbone."""


def _canon(obj: Any) -> Any:
    """JSON round trip, so tuples/lists and ints/floats compare as they will after saving."""
    return json.loads(json.dumps(obj))


def _backbone_key(spec: dict[str, Any]) -> dict[str, Any]:
    # What makes two features comparable: the network, its weights and the exact preprocessing.
    return _canon({k: spec.get(k) for k in ("name", "weights", "preprocessing")})


def same_backbone(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two backbone specs give comparable features (same name, weights and preprocessing)."""
    return _backbone_key(a) == _backbone_key(b)


def check_backbone(found: dict[str, Any], expect: str | dict[str, Any], where: str = "feature cache") -> None:
    """Raise ``FeatureCacheError`` naming both specs unless ``found`` matches ``expect``.

    Args:
        found: the spec stored with the features.
        expect: a backbone name (its pretrained spec) or a spec dict.
        where: what holds ``found``, for the message.
    """
    if isinstance(expect, str):
        from storyteller.backbones import backbone_spec

        expect = backbone_spec(expect)
    a, b = _backbone_key(found), _backbone_key(expect)
    if a != b:
        diff = [k for k in a if a[k] != b[k]]
        raise FeatureCacheError(f"{where} was made with backbone {json.dumps(a)} but {json.dumps(b)} was expected "
                                f"(differs in: {', '.join(diff)}); re-extract the features with that backbone")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the features, recorded in every manifest."""
    import PIL
    import timm
    import torch
    import torchvision

    from storyteller import __version__

    return {"storyteller": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "numpy": np.__version__, "pillow": PIL.__version__}


def _index_line(id_: str, split: str, captions: list[str]) -> str:
    # ASCII-only (non-ASCII as \uXXXX escapes): no caption character can look like a line break to
    # any reader, including str.splitlines(), which also breaks at U+2028, U+2029 and U+0085.
    return json.dumps({"id": id_, "split": split, "captions": list(captions)}, ensure_ascii=True) + "\n"


def _open_jsonl(path: Path) -> TextIO:
    """Open a JSONL file for reading lines that end at "\\n" only.

    Index files written before ``_index_line`` escaped non-ASCII hold U+2028, U+2029 and U+0085 raw
    inside captions; ``newline="\\n"`` keeps those (and a stray "\\r") inside their line.
    """
    return open(path, encoding="utf-8", newline="\n")


class FeatureCache:
    """A finished feature cache, opened read-only with the features memory-mapped.

    Attributes:
        features: (N, D) float16 memmap.
        grid: (N, h, w, D) float16 memmap, or None for a pooled-only cache.
        ids, splits, captions: per-row metadata in row order.
        manifest: the parsed manifest.json; ``backbone`` is its backbone spec.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], features: np.ndarray,
                 ids: list[str], splits: list[str], captions: list[list[str]], grid: np.ndarray | None = None):
        self.path, self.manifest, self.features, self.grid = path, manifest, features, grid
        self.ids, self.splits, self.captions = ids, splits, captions
        self.backbone: dict[str, Any] = manifest["backbone"]
        self.feature_dim: int = int(manifest["feature_dim"])

    @property
    def grid_shape(self) -> tuple[int, int] | None:
        """(h, w) of the stored feature grids, or None when the cache has none."""
        return None if self.grid is None else (int(self.grid.shape[1]), int(self.grid.shape[2]))

    def require_grid(self) -> np.ndarray:
        """The grid memmap, or a clear error for a cache extracted without ``--grid``."""
        if self.grid is None:
            raise FeatureCacheError(f"{self.path} holds pooled features only; an attention model needs feature "
                                    f"grids: re-extract with `python -m train extract --grid` into a new folder")
        return self.grid

    @classmethod
    def open(cls, path: str | os.PathLike, expect_backbone: str | dict[str, Any] | None = None) -> "FeatureCache":
        """Open and validate a cache folder.

        Args:
            path: the cache folder.
            expect_backbone: a backbone name or spec the features must come from; None skips the check.
        """
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            hint = (" An unfinished extraction is in .partial/: rerun the same extract command to finish it."
                    if (path / PARTIAL).is_dir() else "")
            what = "does not exist" if not path.exists() else f"has no {MANIFEST}, so it is not a finished feature cache"
            raise FeatureCacheError(f"{path} {what}.{hint}")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise FeatureCacheError(f"{mpath} is not valid JSON: {e}") from None
        if manifest.get("format") != FORMAT:
            raise FeatureCacheError(f"{mpath}: format {manifest.get('format')!r} is not {FORMAT!r}")
        if manifest.get("version") != VERSION:
            raise FeatureCacheError(f"{mpath}: version {manifest.get('version')!r}; this code reads version {VERSION}")
        if manifest.get("complete") is not True:
            raise FeatureCacheError(f"{path}: manifest says the cache is incomplete; rerun the extraction")
        if expect_backbone is not None:
            check_backbone(manifest["backbone"], expect_backbone, where=str(path))
        count, dim = int(manifest["count"]), int(manifest["feature_dim"])

        try:
            features = np.load(path / FEATURES, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:  # missing, truncated ("mmap length is greater than file size"), bad header
            raise FeatureCacheError(f"{path / FEATURES} cannot be read ({e}); the cache is corrupt, re-extract it") from None
        if features.shape != (count, dim) or features.dtype != DTYPE:
            raise FeatureCacheError(f"{path / FEATURES} holds {features.dtype} {features.shape}, manifest says "
                                    f"{np.dtype(DTYPE)} ({count}, {dim}); the cache is corrupt, re-extract it")

        grid = None
        if manifest.get("grid") is not None:
            h, w = (int(v) for v in manifest["grid"])
            try:
                grid = np.load(path / GRID, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise FeatureCacheError(f"{path / GRID} cannot be read ({e}); the cache is corrupt, re-extract it") from None
            if grid.shape != (count, h, w, dim) or grid.dtype != DTYPE:
                raise FeatureCacheError(f"{path / GRID} holds {grid.dtype} {grid.shape}, manifest says "
                                        f"{np.dtype(DTYPE)} {(count, h, w, dim)}; the cache is corrupt, re-extract it")

        ids, splits, captions = [], [], []
        with _open_jsonl(path / INDEX) as f:
            for n, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                    id_, split, caps = str(row["id"]), str(row["split"]), list(row["captions"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise FeatureCacheError(f"{path / INDEX} line {n} is not a valid index row ({e!r}): {line[:200]!r}") from None
                ids.append(id_)
                splits.append(split)
                captions.append(caps)
        if len(ids) != count:
            raise FeatureCacheError(f"{path / INDEX} has {len(ids)} rows but {FEATURES} and the manifest have {count}; "
                                    "the cache is corrupt, re-extract it")
        return cls(path, manifest, features, ids, splits, captions, grid)

    def __len__(self) -> int:
        return len(self.ids)

    def split_names(self) -> list[str]:
        """The splits present, in order of first appearance."""
        return list(dict.fromkeys(self.splits))

    def split(self, name: str) -> np.ndarray:
        """Row indices (int64) of one split.

        Args:
            name: e.g. ``"train"``, ``"validation"``, ``"test"``.
        """
        rows = np.array([i for i, s in enumerate(self.splits) if s == name], dtype=np.int64)
        if len(rows) == 0:
            raise FeatureCacheError(f"{self.path} has no split {name!r}; splits present: {self.split_names()}")
        return rows

    def __repr__(self) -> str:
        counts = {s: self.splits.count(s) for s in self.split_names()}
        grid = f", grid={self.grid_shape[0]}x{self.grid_shape[1]}" if self.grid is not None else ""
        return (f"FeatureCache({str(self.path)!r}, backbone={self.backbone['name']!r}, dim={self.feature_dim}{grid}, "
                f"splits={counts})")


def _validate_rows(features: np.ndarray, ids: list[str], splits: list[str], captions: list[list[str]]) -> None:
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {features.shape}")
    n = features.shape[0]
    if not (len(ids) == len(splits) == len(captions) == n):
        raise ValueError(f"features has {n} rows but ids/splits/captions have {len(ids)}/{len(splits)}/{len(captions)}")
    if len(set(ids)) != n:
        raise ValueError("ids must be unique")
    for i, caps in enumerate(captions):
        if isinstance(caps, str) or not all(isinstance(c, str) for c in caps):
            raise ValueError(f"captions[{i}] must be a list of str, got {caps!r}")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or inf")


def _validate_grid(grid: np.ndarray, features_shape: tuple[int, ...]) -> None:
    if grid.ndim != 4 or grid.shape[0] != features_shape[0] or grid.shape[3] != features_shape[1]:
        raise ValueError(f"grid must be (N, h, w, D) = ({features_shape[0]}, h, w, {features_shape[1]}), got {grid.shape}")
    if not np.isfinite(grid).all():
        raise ValueError("grid contains NaN or inf")


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array.astype(DTYPE), allow_pickle=False)
    os.replace(tmp, path)


def _finish(path: Path, count: int, feature_dim: int, backbone: dict[str, Any], dataset: dict[str, Any] | None,
            grid: tuple[int, int] | None = None) -> None:
    # features.npy, grid.npy and index.jsonl are already in place; the manifest goes last and makes the cache valid.
    if grid is None:
        (path / GRID).unlink(missing_ok=True)  # a grid left from an older cache here must not be read as ours
    manifest = {"format": FORMAT, "version": VERSION, "complete": True, "count": count, "feature_dim": feature_dim,
                "dtype": np.dtype(DTYPE).name, "grid": list(grid) if grid else None, "backbone": _canon(backbone),
                "dataset": _canon(dataset or {}), "versions": library_versions()}
    write_json_atomic(path / MANIFEST, manifest)


def _invalidate(path: Path) -> None:
    # Drop the manifest before touching the data files, so no reader sees a half-replaced cache as valid.
    (path / MANIFEST).unlink(missing_ok=True)


def write_feature_cache(path: str | os.PathLike, features: np.ndarray, ids: list[str], splits: list[str],
                        captions: list[list[str]], backbone: dict[str, Any], dataset: dict[str, Any] | None = None,
                        grid: np.ndarray | None = None) -> None:
    """Write a whole cache at once (tests and small data); replaces any cache already at ``path``.

    Args:
        path: the cache folder (created).
        features: (N, D) features, any float dtype; stored as float16.
        ids, splits, captions: per-row metadata, N each; ids unique.
        backbone: the spec of the backbone that made the features.
        dataset: JSON-able description of how the rows were made.
        grid: optional (N, h, w, D) feature grids (stored as float16).
    """
    features = np.asarray(features)
    _validate_rows(features, ids, splits, captions)
    if grid is not None:
        grid = np.asarray(grid)
        _validate_grid(grid, features.shape)
    if not {"name", "weights", "feature_dim", "preprocessing"} <= set(backbone):
        raise ValueError(f"backbone must be a spec with name, weights, feature_dim, preprocessing; got keys {sorted(backbone)}")
    if int(backbone["feature_dim"]) != features.shape[1]:
        raise ValueError(f"features have dim {features.shape[1]} but backbone {backbone['name']!r} has {backbone['feature_dim']}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _invalidate(path)
    tmp = path / (FEATURES + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, features.astype(DTYPE), allow_pickle=False)
    os.replace(tmp, path / FEATURES)
    if grid is not None:
        _save_npy_atomic(path / GRID, grid)
    _write_index(path, ids, splits, captions)
    _finish(path, features.shape[0], features.shape[1], backbone, dataset,
            None if grid is None else (grid.shape[1], grid.shape[2]))


def _write_index(path: Path, ids: list[str], splits: list[str], captions: list[list[str]]) -> None:
    """index.jsonl (one row per line) through a temporary file and a rename."""
    tmp = path / (INDEX + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(_index_line(i, s, c) for i, s, c in zip(ids, splits, captions))
    os.replace(tmp, path / INDEX)


def finish_in_place(path: str | os.PathLike, ids: list[str], splits: list[str], captions: list[list[str]],
                    backbone: dict[str, Any], dataset: dict[str, Any] | None = None) -> "FeatureCache":
    """Make a cache of a folder whose ``features.npy`` (and ``grid.npy``) were written in place, e.g. through
    ``np.lib.format.open_memmap`` for data too big to pass to :func:`write_feature_cache`: writes the index, then the
    manifest (last), and opens the cache (which checks the shapes).

    Args:
        path: the cache folder holding features.npy (N, D) float16 and optionally grid.npy (N, h, w, D) float16.
        ids, splits, captions: per-row metadata, N each.
        backbone: the spec of the backbone the features stand for.
        dataset: JSON-able description of the rows.
    """
    path = Path(path)
    _invalidate(path)
    features = np.load(path / FEATURES, mmap_mode="r", allow_pickle=False)
    grid = np.load(path / GRID, mmap_mode="r", allow_pickle=False) if (path / GRID).is_file() else None
    if not (len(ids) == len(splits) == len(captions) == len(features)):
        raise ValueError(f"{FEATURES} has {len(features)} rows but ids/splits/captions have "
                         f"{len(ids)}/{len(splits)}/{len(captions)}")
    _write_index(path, ids, splits, captions)
    _finish(path, len(features), int(features.shape[1]), backbone, dataset,
            None if grid is None else (int(grid.shape[1]), int(grid.shape[2])))
    return FeatureCache.open(path)


class ChunkedCacheWriter:
    """Resumable writer: fixed-size chunks in ``DIR/.partial/``, assembled at the end.

    ``.partial/job.json`` records what the chunks are made of (backbone, dataset, chunk size, row
    count); a rerun with the same job continues after the last finished chunk, a different job is
    refused rather than mixed. Chunk k holds rows ``[k * chunk_size, (k + 1) * chunk_size)``; its
    ``.grid.npy`` (with ``grid``) and ``.npy`` are renamed into place before its ``.jsonl``, so a chunk
    counts as done only when all of them exist.

    Args:
        path: the cache folder.
        backbone: spec of the backbone making the features.
        dataset: JSON-able description of the rows (source, splits, limit...).
        count: total number of rows.
        chunk_size: rows per chunk.
        grid: (h, w) of the feature grids written with every chunk, or None for pooled features only.
    """

    def __init__(self, path: str | os.PathLike, backbone: dict[str, Any], dataset: dict[str, Any],
                 count: int, chunk_size: int, grid: tuple[int, int] | None = None):
        if chunk_size < 1 or count < 1:
            raise ValueError(f"need count >= 1 and chunk_size >= 1, got {count} and {chunk_size}")
        self.path, self.partial = Path(path), Path(path) / PARTIAL
        self.backbone, self.count, self.chunk_size = backbone, count, chunk_size
        self.feature_dim = int(backbone["feature_dim"])
        self.num_chunks = -(-count // chunk_size)
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self.job = _canon({"backbone": backbone, "dataset": dataset, "count": count, "chunk_size": chunk_size,
                           "feature_dim": self.feature_dim, "grid": list(self.grid) if self.grid else None})
        job_file = self.partial / "job.json"
        if job_file.is_file():
            old = json.loads(job_file.read_text(encoding="utf-8"))
            old.setdefault("grid", None)  # jobs written before grids existed
            if old != self.job:
                diff = [k for k in self.job if old.get(k) != self.job[k]]
                raise FeatureCacheError(f"{self.partial} holds an unfinished extraction with different settings "
                                        f"(differs in: {', '.join(diff)}); rerun with the same arguments to resume, "
                                        f"or delete {self.partial} to start over")
        else:
            self.partial.mkdir(parents=True, exist_ok=True)
            write_json_atomic(job_file, self.job)
        _invalidate(self.path)  # an old finished cache here is being replaced
        self.done_chunks = 0  # finished chunks, contiguous from chunk 0
        while self.done_chunks < self.num_chunks and self._chunk_done(self.done_chunks):
            self.done_chunks += 1

    def _chunk_paths(self, k: int) -> tuple[Path, Path]:
        return self.partial / f"chunk_{k:05d}.npy", self.partial / f"chunk_{k:05d}.jsonl"

    def _grid_path(self, k: int) -> Path:
        return self.partial / f"chunk_{k:05d}.grid.npy"

    def _chunk_done(self, k: int) -> bool:
        npy, jsonl = self._chunk_paths(k)
        return npy.is_file() and jsonl.is_file() and (self.grid is None or self._grid_path(k).is_file())

    def chunk_rows(self, k: int) -> range:
        """Row numbers covered by chunk ``k``."""
        return range(k * self.chunk_size, min((k + 1) * self.chunk_size, self.count))

    def done_ids(self) -> list[str]:
        """Ids of the rows in finished chunks, to check a resumed run sees the same data in the same order."""
        ids = []
        for k in range(self.done_chunks):
            with _open_jsonl(self._chunk_paths(k)[1]) as f:
                ids += [json.loads(line)["id"] for line in f]
        return ids

    def write_chunk(self, k: int, features: np.ndarray, ids: list[str], splits: list[str], captions: list[list[str]],
                    grid: np.ndarray | None = None) -> None:
        """Write chunk ``k`` (must be the next one).

        Args:
            k: chunk number, equal to ``done_chunks``.
            features: (len(chunk_rows(k)), D) features.
            ids, splits, captions: the rows' metadata.
            grid: (len(chunk_rows(k)), h, w, D) grids; required exactly when the writer has ``grid``.
        """
        if k != self.done_chunks:
            raise ValueError(f"chunk {k} written out of order; next is {self.done_chunks}")
        features = np.asarray(features)
        _validate_rows(features, ids, splits, captions)
        if features.shape != (len(self.chunk_rows(k)), self.feature_dim):
            raise ValueError(f"chunk {k} needs shape {(len(self.chunk_rows(k)), self.feature_dim)}, got {features.shape}")
        if (grid is None) != (self.grid is None):
            raise ValueError(f"chunk {k}: this cache {'needs' if self.grid else 'takes no'} feature grids")
        npy, jsonl = self._chunk_paths(k)
        if grid is not None:
            grid = np.asarray(grid)
            if grid.shape != (features.shape[0], *self.grid, self.feature_dim):
                raise ValueError(f"chunk {k} grid needs shape {(features.shape[0], *self.grid, self.feature_dim)}, got {grid.shape}")
            _validate_grid(grid, features.shape)
            _save_npy_atomic(self._grid_path(k), grid)
        with open(npy.with_suffix(".npy.tmp"), "wb") as f:
            np.save(f, features.astype(DTYPE), allow_pickle=False)
        os.replace(npy.with_suffix(".npy.tmp"), npy)
        jsonl.with_suffix(".jsonl.tmp").write_text("".join(_index_line(*r) for r in zip(ids, splits, captions)), encoding="utf-8")
        os.replace(jsonl.with_suffix(".jsonl.tmp"), jsonl)
        self.done_chunks += 1

    def finalize(self, dataset: dict[str, Any] | None = None) -> FeatureCache:
        """Assemble the finished chunks into features.npy + index.jsonl, write the manifest, drop .partial.

        Args:
            dataset: description for the manifest; defaults to the job's.
        """
        if self.done_chunks != self.num_chunks:
            raise FeatureCacheError(f"only {self.done_chunks} of {self.num_chunks} chunks are done")
        tmp_npy, tmp_idx = self.path / (FEATURES + ".tmp"), self.path / (INDEX + ".tmp")
        # Stream chunk by chunk into a memmapped .npy, so assembling never holds all features in RAM.
        out = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=DTYPE, shape=(self.count, self.feature_dim))
        tmp_grid = self.path / (GRID + ".tmp")
        out_grid = None if self.grid is None else np.lib.format.open_memmap(
            tmp_grid, mode="w+", dtype=DTYPE, shape=(self.count, *self.grid, self.feature_dim))
        seen: set[str] = set()
        with open(tmp_idx, "w", encoding="utf-8") as idx:
            for k in range(self.num_chunks):
                npy, jsonl = self._chunk_paths(k)
                rows = self.chunk_rows(k)
                chunk = np.load(npy, allow_pickle=False)
                with _open_jsonl(jsonl) as f:
                    lines = list(f)
                if chunk.shape != (len(rows), self.feature_dim) or len(lines) != len(rows):
                    raise FeatureCacheError(f"{npy.name}: {chunk.shape} features / {len(lines)} index rows, expected "
                                            f"{len(rows)}; delete {self.partial} and rerun")
                for line in lines:
                    seen.add(json.loads(line)["id"])
                out[rows.start:rows.stop] = chunk
                if out_grid is not None:
                    g = np.load(self._grid_path(k), mmap_mode="r", allow_pickle=False)
                    if g.shape != (len(rows), *self.grid, self.feature_dim):
                        raise FeatureCacheError(f"{self._grid_path(k).name}: grid {g.shape}, expected {len(rows)} rows "
                                                f"of {self.grid}; delete {self.partial} and rerun")
                    out_grid[rows.start:rows.stop] = g
                idx.writelines(lines)
        out.flush()
        del out
        if out_grid is not None:
            out_grid.flush()
            del out_grid
        if len(seen) != self.count:
            raise FeatureCacheError(f"chunks hold {len(seen)} distinct ids for {self.count} rows; delete {self.partial} and rerun")
        os.replace(tmp_npy, self.path / FEATURES)
        if self.grid is not None:
            os.replace(tmp_grid, self.path / GRID)
        os.replace(tmp_idx, self.path / INDEX)
        _finish(self.path, self.count, self.feature_dim, self.backbone, self.job["dataset"] if dataset is None else dataset,
                self.grid)
        shutil.rmtree(self.partial)
        return FeatureCache.open(self.path)


# -- reading features for training: into memory, or memory-mapped when they do not fit -------------

FEATURE_MEMORY = ("auto", "ram", "mmap")
RAM_SHARE = 0.5  # auto: hold the features in memory when they take at most this share of what is free


def available_memory(device: Any = "cpu") -> int:
    """Bytes free for new data: ``MemAvailable`` of /proc/meminfo (else physical pages) for the CPU, the free
    memory of a CUDA device.

    Args:
        device: a torch device or its name.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))  # no /proc (not Linux): all of it


def choose_feature_memory(nbytes: int, device: Any, asked: str = "auto") -> tuple[str, str]:
    """``("ram" | "mmap", why)``: where a run keeps ``nbytes`` of features.

    ``ram``: one copy on the training device (GPU memory on CUDA); ``mmap``: the cache stays memory-mapped on
    disk and each batch's rows are read (from the OS page cache after the first epoch) and copied to the
    device. ``auto`` picks ``ram`` when the features take at most ``RAM_SHARE`` of the free memory (of the
    GPU on CUDA, and of the host on both, which stages the copy), else ``mmap``.

    Args:
        nbytes: size of the features as held (float16 grids, float32 pooled vectors).
        device: the training device.
        asked: ``auto``, ``ram`` or ``mmap`` (``--feature-memory``).
    """
    import torch

    if asked not in FEATURE_MEMORY:
        raise ValueError(f"feature memory must be one of {FEATURE_MEMORY}, got {asked!r}")
    if asked != "auto":
        return asked, "as asked"
    device = torch.device(device)
    gib = 2 ** 30
    free = {"host": available_memory("cpu")}
    if device.type == "cuda":
        free["GPU"] = available_memory(device)
    for where, n in free.items():
        if nbytes > RAM_SHARE * n:
            return "mmap", (f"{nbytes / gib:.1f} GiB of features > {RAM_SHARE:.0%} of the {n / gib:.1f} GiB free "
                            f"{where} memory")
    return "ram", f"{nbytes / gib:.1f} GiB of features fit in {RAM_SHARE:.0%} of the free memory"


def read_rows(path: str | os.PathLike, rows: np.ndarray | None = None) -> np.ndarray:
    """Rows of a ``.npy`` file read into memory with plain reads, no mapping: the process then holds the copy
    only, not the copy plus the mapped file's pages (which ``np.array(memmap)`` would count twice).

    Args:
        path: the ``.npy`` file (C order, no pickles).
        rows: row numbers to read, or None for all.
    """
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if fortran or dtype.hasobject:
            raise FeatureCacheError(f"{path}: not a C-ordered numeric array")
        start, row_bytes = f.tell(), int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        if rows is None:
            count = int(np.prod(shape, dtype=np.int64))
            out = np.fromfile(f, dtype=dtype, count=count)
            if out.size != count:
                raise FeatureCacheError(f"{path} is truncated; re-extract it")
            return out.reshape(shape)
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *shape[1:]), dtype=dtype)
        flat = memoryview(out.reshape(-1).view(np.uint8))
        for i, r in enumerate(rows):  # ascending rows in practice (cache.split): the reads go forwards
            f.seek(start + int(r) * row_bytes)
            if f.readinto(flat[i * row_bytes:(i + 1) * row_bytes]) != row_bytes:
                raise FeatureCacheError(f"{path} is truncated at row {r}; re-extract it")
        return out


class MappedRows:
    """Rows of a memory-mapped feature array, read when indexed: what training holds instead of a tensor when
    the features do not fit in memory (``--feature-memory mmap``).

    Indexing with a (B,) tensor, array or slice returns a (B, ...) tensor on ``device``, rows in the order asked,
    exactly the values a tensor of the whole array would give (so a run's results do not depend on the mode).

    Args:
        array: the (N, ...) memmap (``FeatureCache.features`` or ``.grid``).
        rows: which of its rows this view holds (None: all), e.g. a split.
        device: where indexed rows are sent.
        dtype: numpy dtype the rows are cast to (None: as stored).
    """

    def __init__(self, array: np.ndarray, rows: np.ndarray | None = None, device: Any = "cpu", dtype: Any = None):
        import torch

        self.array, self.device, self.dtype = array, torch.device(device), dtype
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.shape = (len(array) if self.rows is None else len(self.rows), *array.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def to(self, device: Any, non_blocking: bool = False) -> "MappedRows":
        """The same view, sending rows to ``device``."""
        return MappedRows(self.array, self.rows, device, self.dtype)

    def cpu(self) -> "MappedRows":
        """The same view, sending rows to the CPU."""
        return self.to("cpu")

    def __getitem__(self, idx: Any) -> Any:
        import torch

        if isinstance(idx, slice):
            idx = np.arange(len(self))[idx]
        elif isinstance(idx, torch.Tensor):
            idx = idx.detach().cpu().numpy()
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        src = idx if self.rows is None else self.rows[idx]
        order = np.argsort(src, kind="stable")  # read the file forwards, then put the rows back in the order asked
        block = np.empty((len(src), *self.shape[1:]), dtype=self.dtype or self.array.dtype)
        block[order] = self.array[src[order]]
        out = torch.from_numpy(block)
        return out.to(self.device, non_blocking=True) if self.device.type != "cpu" else out


def training_features(cache: FeatureCache, rows: np.ndarray | None, grid: bool, device: Any,
                      memory: str = "auto", log: Any = None) -> Any:
    """The features a training run reads, the one place that decides whether they are held or memory-mapped.

    Grids stay float16 ((N, h, w, D); the model casts each batch), pooled vectors become float32 ((N, D)).

    Args:
        cache: the feature cache.
        rows: the rows wanted (None: every row, indexed by cache row).
        grid: the grids (attention decoders) rather than the pooled vectors.
        device: the training device.
        memory: ``auto``, ``ram`` or ``mmap`` (:func:`choose_feature_memory`).
        log: a ``print``-like function told what was chosen and why (None: silent).

    Returns:
        a tensor on ``device`` (``ram``) or a :class:`MappedRows` (``mmap``).
    """
    import torch

    array = cache.require_grid() if grid else cache.features
    dtype = np.float16 if grid else np.float32
    n = len(array) if rows is None else len(rows)
    nbytes = n * int(np.prod(array.shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    mode, why = choose_feature_memory(nbytes, device, memory)
    if log is not None:
        log(f"features: {'held in memory' if mode == 'ram' else 'memory-mapped, read per batch'} ({why})")
    if mode == "mmap":
        return MappedRows(array, rows, device, dtype)
    values = read_rows(cache.path / (GRID if grid else FEATURES), rows)
    return torch.from_numpy(values.astype(dtype, copy=False)).to(device)
