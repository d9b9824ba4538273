"""Caption a photo library: folders in, one record per photo out, resumable.

    from storyteller.images import ImageError
    from storyteller.photo_library import caption_folder

    for name, result in caption_folder("photos/"):      # walked recursively, in a stable order
        if isinstance(result, ImageError):
            print(name, "error:", result)                 # not a usable image; the others go on
        else:
            print(name, result.best.text)                 # a CaptionResult: greedy, beam, warnings

The command line (``python -m storyteller caption DIR... --out captions.jsonl``) runs the same pipeline
and writes one record per photo to a :class:`RecordFile` (JSONL or CSV), in the file after every batch, so a
killed run resumes where it stopped.

Pipeline: DataLoader workers decode each photo (``storyteller.images.load_image`` with JPEG draft decoding,
exactly as ``Captioner.load_image``) and make its pixels (``captioner.transform``), while the main process
runs the backbone (``Captioner.encode_pixels``) and the batched greedy + beam search
(``Captioner.caption_features``) on the batch before. ``bench/bench_library.py`` compares its throughput
with the backbone's forward alone.

Which files: a folder is walked recursively for the extensions in :data:`IMAGE_EXTENSIONS` (any case);
names starting with ``.`` (hidden files and folders) are skipped; a folder reached twice (a symlink loop, or
two links to one folder) is walked once. A file given by name is taken whatever its extension. A record
names a walked photo by its path relative to the folder given (``sub/cat.jpg``), a file as it was given.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Container, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from .captioner import Captioner, CaptionResult, load
from .images import ImageError, image_warnings, load_image

__all__ = ["IMAGE_EXTENSIONS", "RECORD_FIELDS", "RECORD_FORMATS", "Photo", "LibraryError", "walk_inputs",
           "find_images", "default_workers", "caption_batches", "caption_folder", "to_record", "RecordFile",
           "read_records"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
# The columns of a record, in CSV order; a JSONL record holds image + error, or image + the other four.
RECORD_FIELDS = ("image", "greedy", "beam", "beam_log_prob", "confidence", "needs_review", "warnings", "error")
RECORD_FORMATS = {".jsonl": "jsonl", ".csv": "csv"}
WARNINGS_SEPARATOR = " | "  # a CSV cell holds a photo's warning sentences joined by this
PREFETCH_BATCHES = 4  # batches each worker decodes ahead, so one slow file does not starve the backbone
_CSV_LINE_END = "\r\n"  # RFC 4180, what spreadsheets write
_UTF8_BOM = b"\xef\xbb\xbf"  # so Excel reads a CSV as UTF-8, not the system code page
_JSONL_START = b'{"image": '  # how every JSONL record starts (json.dumps, "image" first)


class Photo(NamedTuple):
    """One file to caption.

    Args:
        name: what its record calls it: the path relative to the folder given, or the file as given.
        path: where to read it (the folder given joined with ``name``, or the file as given).
        error: why it cannot even be tried (a folder that could not be listed), else None.
    """

    name: str
    path: str
    error: str | None = None


class LibraryError(ValueError):
    """The inputs or the output file cannot be used as asked; the message says why, in one line."""


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _walk(root: str) -> list[Photo]:
    """The image files under ``root``, named relative to it, in sorted path order."""
    found: list[Photo] = []
    seen: set[tuple[int, int]] = set()  # (device, inode) of every folder walked: loops end here
    pending = [(root, "")]
    while pending:
        folder, prefix = pending.pop()
        try:
            st = os.stat(folder)  # follows symlinks: a link back up the tree finds a folder already seen
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            found.append(Photo(prefix or root, folder, _one_line(f"cannot list the folder: {e.strerror or e}")))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue  # hidden files and folders (.git, .thumbnails, ._resource forks)
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                subfolders.append((os.path.join(folder, entry.name), f"{prefix}{entry.name}/"))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Photo(prefix + entry.name, os.path.join(folder, entry.name)))
        pending.extend(reversed(subfolders))  # depth first, in name order
    return sorted(found, key=lambda p: p.name.split("/"))


def walk_inputs(inputs: Sequence[str | os.PathLike]) -> list[Photo]:
    """Every file the inputs name, in order: folders walked (see the module docstring), files as given.

    Args:
        inputs: folders and files.
    """
    photos: list[Photo] = []
    for given in inputs:
        given = os.fspath(given)
        photos.extend(_walk(given) if os.path.isdir(given) else [Photo(given, given)])
    return photos


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def find_images(inputs: Sequence[str | os.PathLike]) -> list[Photo]:
    """:func:`walk_inputs`, each name once: a file named twice is captioned once.

    Args:
        inputs: folders and files.

    Raises:
        LibraryError: two different files would get the same name (``a/x.jpg`` and ``b/x.jpg`` from the
            folders ``a`` and ``b``), so their records could not be told apart.
    """
    first: dict[str, Photo] = {}
    for photo in walk_inputs(inputs):
        other = first.setdefault(photo.name, photo)
        if other is not photo and not _same_file(other.path, photo.path):
            raise LibraryError(f"{other.path} and {photo.path} would both be recorded as {photo.name!r}: caption "
                               f"those folders in separate runs (each with its own output), or give their parent folder")
    return list(first.values())


def default_workers(device: torch.device | str) -> int:
    """DataLoader worker processes when none are asked for.

    On a CPU, decoding a photo costs about a tenth of the backbone's forward and the forward uses
    every core, so one worker keeps it fed (none on a single core); big CPUs get one per 8 cores. A
    GPU outruns JPEG decoding, so there most cores decode.

    Args:
        device: where the backbone runs.
    """
    cores = os.cpu_count() or 1
    if torch.device(device).type == "cuda":
        return max(1, min(8, cores - 1))
    return 0 if cores < 2 else max(1, min(4, cores // 8))


class _PhotoPixels(Dataset):
    """Photo i -> (i, pixels or None, warnings, error or None); runs in the DataLoader workers.

    Args:
        photos: the files.
        transform: the backbone's picklable PIL -> (3, crop, crop) transform (``Captioner.transform``).
        draft_size: ``Captioner.draft_size``: JPEG draft decoding exactly as ``Captioner.load_image``.
    """

    def __init__(self, photos: Sequence[Photo], transform: Any, draft_size: int):
        self.photos, self.transform, self.draft_size = list(photos), transform, draft_size

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, list[str], str | None]:
        photo = self.photos[i]
        if photo.error:
            return i, None, [], photo.error
        try:
            image = load_image(photo.path, draft_size=self.draft_size or None)
            return i, self.transform(image), image_warnings(image), None
        except ImageError as e:
            return i, None, [], _one_line(e)
        except Exception as e:  # a plugin failing in its own way on a hostile file must not end the run
            return i, None, [], _one_line(f"could not decode the image ({type(e).__name__}: {e})")


def _collate(items: list[tuple[int, torch.Tensor | None, list[str], str | None]]) -> dict[str, Any]:
    """A batch: the usable photos' pixels stacked (B, 3, crop, crop), their indices and warnings, the errors."""
    ok = [it for it in items if it[1] is not None]
    return {"index": [it[0] for it in ok], "pixels": torch.stack([it[1] for it in ok]) if ok else None,
            "warnings": [it[2] for it in ok], "errors": [(it[0], it[3]) for it in items if it[1] is None]}


def caption_batches(photos: Sequence[Photo], captioner: Captioner, *, batch_size: int = 16,
                    workers: int | None = None, **settings: Any
                    ) -> Iterator[list[tuple[Photo, CaptionResult | ImageError]]]:
    """Caption ``photos`` a batch at a time, decoding in DataLoader workers while the model runs.

    Args:
        photos: the files, e.g. from :func:`find_images`.
        captioner: a loaded :class:`~storyteller.captioner.Captioner`.
        batch_size: photos per batch (one backbone forward and one search each).
        workers: DataLoader worker processes (None: :func:`default_workers`; 0 decodes in this process).
        settings: decoding settings for ``Captioner.caption_features`` (``beam_size``, ``max_len``,
            ``alpha``, ``n_best``, ``no_repeat_ngram_size``, ``greedy``, ``beam``).

    Yields:
        per batch, in input order: (photo, its CaptionResult), or (photo, ImageError) for a file that is
        not a usable image.

    Raises:
        ValueError: decoding settings the model rejects.
    """
    if not photos:
        return
    device = captioner.device
    workers = default_workers(device) if workers is None else workers
    loader = DataLoader(_PhotoPixels(photos, captioner.transform, captioner.draft_size), batch_size=batch_size,
                        shuffle=False, num_workers=workers, collate_fn=_collate, pin_memory=device.type == "cuda",
                        prefetch_factor=PREFETCH_BATCHES if workers > 0 else None)

    def search(batch: dict[str, Any], features: torch.Tensor | None, timings: dict[str, float]
               ) -> list[tuple[Photo, CaptionResult | ImageError]]:
        results: dict[int, CaptionResult | ImageError] = {i: ImageError(msg) for i, msg in batch["errors"]}
        if features is not None:
            captions = captioner.caption_features(features, warnings=batch["warnings"], timings=timings, **settings)
            results.update(zip(batch["index"], captions))
        return [(photos[i], results[i]) for i in sorted(results)]

    # The search of batch k runs in a second thread while this one runs the backbone on batch k+1: torch
    # releases the GIL in its kernels, so the two overlap and the backbone alone sets the pace.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="caption-search") as pool:
        pending: Future | None = None
        for batch in loader:
            features, timings = None, {}
            if batch["pixels"] is not None:
                t0 = time.perf_counter()
                features = captioner.encode_pixels(batch["pixels"])
                ms = (time.perf_counter() - t0) * 1e3
                timings = {"backbone": ms, "total": ms}  # decoding ran in the workers, alongside
            running = pool.submit(search, batch, features, timings)
            if pending is not None:
                yield pending.result()
            pending = running
        if pending is not None:
            yield pending.result()


def caption_folder(inputs: str | os.PathLike | Sequence[str | os.PathLike], captioner: Captioner | None = None, *,
                   skip: Container[str] = (), batch_size: int = 16, workers: int | None = None, **settings: Any
                   ) -> Iterator[tuple[str, CaptionResult | ImageError]]:
    """Caption every image under one or more folders (and files), one photo at a time as batches finish.

    Args:
        inputs: a folder or file, or a list of them (see the module docstring for which files are taken).
        captioner: a loaded captioner (default: ``storyteller.captioner.load()``, the default model).
        skip: names (as in the results) not to caption, e.g. those an earlier run already wrote.
        batch_size, workers, settings: as in :func:`caption_batches`.

    Yields:
        (name, result): ``name`` relative to the folder given (or the file as given); ``result`` a
        ``CaptionResult``, or an ``ImageError`` saying why that file is not a usable image.

    Raises:
        LibraryError: two files would get the same name.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    photos = [p for p in find_images(inputs) if p.name not in skip]
    if not photos:
        return
    captioner = captioner if captioner is not None else load()
    for batch in caption_batches(photos, captioner, batch_size=batch_size, workers=workers, **settings):
        for photo, result in batch:
            yield photo.name, result


def to_record(name: str, result: CaptionResult | BaseException, review_below: float | None = None) -> dict[str, Any]:
    """The record of one photo: ``image``, ``greedy``, ``beam``, ``beam_log_prob``, ``confidence`` (the beam
    caption's; None when the model has no calibration), ``needs_review``, ``warnings``; or ``image`` and
    ``error`` (one line) for a file that could not be captioned.

    Args:
        name: the photo's name in the records.
        result: its captions, or why it could not be captioned.
        review_below: ``needs_review`` is True where the confidence is below this (None: never; a caption
            without a confidence needs review whenever a threshold is given).
    """
    if isinstance(result, BaseException):
        return {"image": name, "error": _one_line(result)}
    best = result.beam[0] if result.beam else None
    confidence = best.confidence if best else None
    review = review_below is not None and (confidence is None or confidence < review_below)
    return {"image": name, "greedy": result.greedy.text if result.greedy else None,
            "beam": best.text if best else None, "beam_log_prob": round(best.log_prob, 4) if best else None,
            "confidence": confidence, "needs_review": review, "warnings": list(result.warnings)}


def _json_line(record: dict[str, Any]) -> str:
    line = json.dumps(record, ensure_ascii=False) + "\n"  # names and captions readable as UTF-8
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not valid UTF-8 (Linux allows it): \u escapes instead
        line = json.dumps(record) + "\n"
    return line


def _record_format(path: Path) -> str:
    fmt = RECORD_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise LibraryError(f"--out {path}: the output format comes from the extension, "
                           f"{' or '.join(RECORD_FORMATS)}; got {path.suffix or 'none'!r}")
    return fmt


def _csv_row(record: dict[str, Any]) -> list[str]:
    row = []
    for field in RECORD_FIELDS:
        value = record.get(field)
        if field == "warnings" and value is not None:
            value = WARNINGS_SEPARATOR.join(value)
        row.append("" if value is None else str(value))
    return row


def _csv_record(row: list[str]) -> dict[str, Any]:
    """A CSV row back in the JSONL record's shape."""
    cells = dict(zip(RECORD_FIELDS, row))
    if cells["error"]:
        return {"image": cells["image"], "error": cells["error"]}
    return {"image": cells["image"], "greedy": cells["greedy"], "beam": cells["beam"],
            "beam_log_prob": float(cells["beam_log_prob"]) if cells["beam_log_prob"] else None,
            "confidence": float(cells["confidence"]) if cells["confidence"] else None,
            "needs_review": cells["needs_review"] == "True",
            "warnings": cells["warnings"].split(WARNINGS_SEPARATOR) if cells["warnings"] else []}


def _parse_jsonl(text: str, path: Path) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not (isinstance(rec, dict) and isinstance(rec.get("image"), str) and ("beam" in rec or "error" in rec)):
            raise LibraryError(f"{path} is not a caption-records file (line {n} is not a record), so it is left "
                               f"alone; give another --out")
        records.append(rec)
    return records


def _parse_csv(text: str, path: Path) -> list[dict[str, Any]]:
    refuse = LibraryError(f"{path} is not a caption-records file (its header is not "
                          f"{','.join(RECORD_FIELDS)}), so it is left alone; give another --out")
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error:
        raise refuse from None
    if not rows or rows[0] != list(RECORD_FIELDS):
        raise refuse
    for n, row in enumerate(rows[1:], 2):
        if len(row) != len(RECORD_FIELDS) or not row[0]:
            raise LibraryError(f"{path} is not a caption-records file (row {n} has {len(row)} cells, records have "
                               f"{len(RECORD_FIELDS)}), so it is left alone; give another --out")
    return [_csv_record(row) for row in rows[1:]]


def _csv_complete(data: bytes, start: int) -> int:
    """How many bytes of a CSV hold complete rows: the end of the last row whose line end was written.

    A quoted cell (a file name) may hold newlines, so the csv module's own parsing finds where rows end. A
    file whose parsing fails before its end is not cut short but not ours: it is counted whole, so that
    parsing it refuses it.

    Args:
        data: the file's bytes.
        start: where the rows begin (after a byte-order mark).
    """
    text = data[start:].decode("utf-8", errors="surrogateescape")  # a cut may split a character
    read = {"bytes": start, "line": "", "all": False}

    def lines() -> Iterator[str]:
        for line in io.StringIO(text, newline=""):  # the lines csv.reader reads, line ends kept
            read["bytes"] += len(line.encode("utf-8", errors="surrogateescape"))
            read["line"] = line
            yield line
        read["all"] = True

    keep = 0
    try:
        for _ in csv.reader(lines(), strict=True):  # a row comes back once its last line has been read
            if read["line"].endswith("\n"):  # not cut before (or inside) its line end
                keep = read["bytes"]
    except csv.Error:
        if not read["all"]:  # a prefix of our rows only fails at its end (a quoted cell left open)
            return len(data)
    return keep


class RecordFile:
    """A file of caption records, JSONL or CSV by its extension, that a rerun resumes.

    Constructing it only reads: :attr:`records` are the complete records the file holds, :attr:`done`
    maps each recorded name to its record. A last line without its newline (a run killed mid-write) is
    not counted; :meth:`open` cuts it off (and with ``overwrite`` every record), then :meth:`write` appends
    a batch of records at a time with one unbuffered write, so a kill loses at most the batch being written,
    and a write that fails (a full disk) raises :class:`LibraryError` with the file holding the batches before.

    Args:
        path: the file; it and its folder are created when missing.
        overwrite: start over: :meth:`open` empties the file (its records are not counted as done).

    Raises:
        LibraryError: the extension is not ``.jsonl`` or ``.csv``, the path cannot be read, or the file holds
            something other than caption records (it is never changed then, even with ``overwrite``).
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path, self.overwrite = Path(path), overwrite
        self.format = _record_format(self.path)
        data = self._read()
        bom = len(_UTF8_BOM) if self.format == "csv" and data.startswith(_UTF8_BOM) else 0
        # bytes of complete records; what follows was cut short (a JSONL record is one line, a CSV one is not)
        self._keep = _csv_complete(data, bom) if self.format == "csv" else data.rfind(b"\n") + 1
        try:
            text = data[bom:self._keep].decode("utf-8")
        except UnicodeDecodeError:
            raise self._foreign("it is not UTF-8 text") from None
        self._check_tail(data[self._keep:])
        parse = _parse_csv if self.format == "csv" else _parse_jsonl
        self.records: list[dict[str, Any]] = parse(text, self.path) if text else []
        self.done: dict[str, dict[str, Any]] = {} if overwrite else {r["image"]: r for r in self.records}
        self._file: io.FileIO | None = None

    def as_read(self, name: str) -> str:
        """``name`` as this file gives it back: a CSV stores a file name that is not valid UTF-8 with \\x escapes."""
        if self.format != "csv":
            return name  # JSON's \u escapes give the very same string back
        return name.encode("utf-8", errors="backslashreplace").decode("utf-8")

    def record_of(self, name: str) -> dict[str, Any] | None:
        """The record already written for the file ``name`` (as :func:`find_images` names it), or None."""
        return self.done.get(self.as_read(name))

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as e:
            raise LibraryError(f"--out {self.path}: cannot read it ({e.strerror or e})") from None

    def _foreign(self, why: str) -> LibraryError:
        return LibraryError(f"{self.path} is not a caption-records file ({why}), so it is left alone; give another --out")

    def _check_tail(self, tail: bytes) -> None:
        """A cut-short last line must look like the start of one of ours, or the file is someone else's."""
        if not tail:
            return
        if self.format == "jsonl":
            ours = tail.startswith(_JSONL_START) or _JSONL_START.startswith(tail)
        else:  # with a complete header line the rows were checked as ours; else the tail must begin the header
            ours = self._keep > 0 or (_UTF8_BOM + self._header()).startswith(tail)
        if not ours:
            raise self._foreign("its last line is not a record")

    @staticmethod
    def _header() -> bytes:
        return (",".join(RECORD_FIELDS) + _CSV_LINE_END).encode("utf-8")

    def open(self) -> RecordFile:
        """Open for appending: cut off a half-written last line (everything with ``overwrite``).

        The file is unbuffered: a write that fails (a full disk) leaves no bytes behind in a buffer that
        closing the file would try to write again."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "r+b" if self.path.exists() else "w+b", buffering=0)
        except OSError as e:
            raise LibraryError(f"--out {self.path}: cannot write it ({e.strerror or e})") from None
        self._file = f
        try:
            f.truncate(0 if self.overwrite else self._keep)
            f.seek(0, os.SEEK_END)
        except OSError as e:
            self.close()
            raise LibraryError(f"--out {self.path}: cannot write it ({e.strerror or e})") from None
        if self.overwrite:
            self.records = []
        if self.format == "csv" and f.tell() == 0:
            try:
                self._append(_UTF8_BOM + self._header())
            except LibraryError:
                self.close()  # __exit__ does not run when __enter__ raises
                raise
        return self

    def _append(self, data: bytes) -> None:
        """Write all of ``data`` at the end, or (a full disk) cut off what got written and raise LibraryError."""
        f = self._file
        start = f.tell()
        try:
            view = memoryview(data)
            while view:  # an unbuffered write may take only part (the last bytes before a size limit)
                view = view[f.write(view):]
        except OSError as e:  # a full disk, a removed drive: every finished batch is in the file already
            try:
                f.truncate(start)  # no half record left behind; a rerun would cut it off anyway
                f.seek(start)
            except OSError:
                pass
            raise LibraryError(f"cannot write {self.path} ({e.strerror or e}); it holds every batch finished before "
                               "this one: make room and rerun the same command to go on") from None

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        """Append records (one unbuffered write: in the file when this returns) and count them as done."""
        if self._file is None:
            raise RuntimeError("RecordFile.write before open()")
        if self.format == "csv":
            buf = io.StringIO()
            csv.writer(buf, lineterminator=_CSV_LINE_END).writerows(_csv_row(r) for r in records)
            # a file name that is not valid UTF-8 (Linux allows it) is written with \x escapes
            data = buf.getvalue().encode("utf-8", errors="backslashreplace")
        else:
            data = "".join(_json_line(r) for r in records).encode("utf-8")
        self._append(data)  # one write: a kill between batches leaves whole records
        for r in records:
            self.records.append(r)
            self.done[self.as_read(r["image"])] = r

    def close(self) -> None:
        """Close the file; nothing is buffered, so this writes nothing (and cannot fail for a full disk)."""
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError as e:  # e.g. a network drive reporting a delayed error
                raise LibraryError(f"cannot close {self.path} ({e.strerror or e}); rerun the same command to go on "
                                   "from its last complete record") from None

    def __enter__(self) -> RecordFile:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete records of a ``.jsonl`` or ``.csv`` output file, in file order, each as a dict shaped like
    a JSONL record (a CSV's warnings split back into a list).

    Raises:
        LibraryError: not a caption-records file.
    """
    return RecordFile(path).records
