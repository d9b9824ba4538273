"""Captions into photos' metadata, where photo managers read them: ``python -m storyteller tag``.

    python -m storyteller tag captions.csv --root photos/ [--column alt]   # reviewed records
    python -m storyteller tag photos/ [--embed] [--dry-run]                 # caption and write in one run

Where: an XMP sidecar by default (``photo.jpg.xmp``, or ``photo.xmp`` with ``--sidecar-name stem``),
written with the standard library; with ``--embed``, inside JPEG, PNG, WebP and TIFF files by the exiftool
program (``storyteller.exiftool``): XMP ``dc:description`` and ``Iptc4xmpCore:AltTextAccessibility``
(x-default), and EXIF ``ImageDescription`` in JPEGs. Other formats (HEIC, camera RAW, GIF) get a sidecar.

Whose words: our text carries a marker (``storyteller.xmp.NS_STORYTELLER``: the model, its revision, the
confidence when there is one, and a hash of the text), so a rerun replaces only our own unedited text. A
description without our marker, or ours edited since (its hash no longer matches), is a person's: that
photo is skipped and reported.

Safety: every write goes to a temporary file in the photo's folder, is fsynced, checked (the image data must
be byte-identical) and renamed over the original, so a kill leaves each file as it was or fully written.
docs/photo-library.md has the whole story.
"""
from __future__ import annotations

import argparse
import csv
import errno
import io
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import xmp
from .decoding_settings import check_search_options
from .photo_meta import Place, image_data_digest, image_kind, read_place

__all__ = ["ALT_TEXT_MAX", "TagError", "Caption", "Outcome", "Tagger", "add_arguments", "run_cli",
           "read_tag_records", "alt_text_of", "sidecar_path", "model_identity", "clean_stale_temps"]

ALT_TEXT_MAX = 250  # IPTC's recommended most characters for Alt Text (Accessibility)
_TMP_TAG = ".storyteller-tmp-"  # our temporary files: .<name>.storyteller-tmp-<pid><suffix>
EMBED_FORMATS = ("jpeg", "png", "webp", "tiff")
RECORD_SUFFIXES = (".jsonl", ".csv")


class TagError(ValueError):
    """The inputs or the options cannot be used as asked; the message says why, in one line."""


@dataclass
class Caption:
    """One photo's text to write.

    Args:
        name: the photo as the report names it.
        path: where the photo is.
        text: the caption (None: there is none, see ``error``).
        confidence: the caption's confidence, None when unknown.
        reviewed: the text came from a column a person writes (not the model's ``beam``/``greedy``).
        error: why there is no caption.
        error_status: how a missing caption counts: ``failed`` (captioning it failed now) or ``skipped``.
    """

    name: str
    path: Path
    text: str | None = None
    confidence: float | None = None
    reviewed: bool = False
    error: str | None = None
    error_status: str = "failed"


def alt_text_of(text: str) -> str:
    """``text`` within IPTC's recommended Alt Text length: cut at a word and marked with an ellipsis when longer.

    Args:
        text: the caption.
    """
    if len(text) <= ALT_TEXT_MAX:
        return text
    cut = text[:ALT_TEXT_MAX - 1]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut).rstrip(" ,;:") + "\u2026"


def sidecar_path(photo: Path, naming: str) -> Path:
    """``photo.jpg.xmp`` (naming ``ext``: darktable, digiKam, Immich) or ``photo.xmp`` (``stem``: Adobe).

    Args:
        photo: the photo.
        naming: ``ext`` or ``stem``.
    """
    return photo.with_name(photo.name + ".xmp") if naming == "ext" else photo.with_suffix(".xmp")


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def _ownership(place: Place) -> tuple[str, str]:
    """("none" | "ours" | "edited" | "theirs", the field that decided) for one place."""
    fields = place.xmp
    texts = {"XMP dc:description": fields.description, "XMP AltTextAccessibility": fields.alt_text, **place.others}
    texts = {k: v for k, v in texts.items() if v}
    hashed = fields.marker.get("TextHash")
    if not hashed:
        return ("theirs", next(iter(texts))) if texts else ("none", "")
    ours = (fields.description and xmp.text_hash(fields.description) == hashed
            and fields.alt_text in ("", alt_text_of(fields.description))
            and all(v == fields.description for k, v in place.others.items()))
    return ("ours", "") if ours else ("edited", next(iter(texts), "its text (removed)"))


def _err_line(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "the disk is full (no space left for the temporary copy); it is left as it was"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write in its folder ({e.strerror}); it is left as it was"
    return f"cannot write it ({e.strerror or e}); it is left as it was"


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if directory:  # some systems cannot open folders; the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _temp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}{_TMP_TAG}{os.getpid()}{path.suffix}")


def _replace(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, give it ``path``'s permissions, rename it over ``path``, fsync the folder."""
    _fsync(tmp)
    if path.exists():
        shutil.copymode(path, tmp)
    os.replace(tmp, path)
    _fsync(path.parent, directory=True)


def clean_stale_temps(folder: Path) -> int:
    """Remove temporary files an earlier run of ours left in ``folder`` when killed; returns how many.

    Args:
        folder: a folder holding photos.
    """
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        if not (entry.name.startswith(".") and _TMP_TAG in entry.name):
            continue
        pid = entry.name.split(_TMP_TAG, 1)[1].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another tag run at work in this folder now
        try:
            os.unlink(entry.path)
            removed += 1
        except OSError:
            pass
    return removed


def _read_only(path: Path) -> bool:
    """No write permission for us, or none at all in its mode: a file marked read-only stays so, even for root
    (who may write anything, but a photo its owner locked is not ours to change)."""
    return not os.access(path, os.W_OK) or not path.stat().st_mode & 0o222


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@dataclass
class Outcome:
    """What happened to one photo: status ``written``, ``skipped``, ``review`` or ``failed``, the line to report,
    and for the summary: where it was written (``embedded``, ``sidecar``) or why it was skipped, in short."""

    status: str
    detail: str
    where: str = ""
    reason: str = ""


@dataclass
class Tagger:
    """Writes captions where asked, never over a person's words; one :meth:`tag` per photo.

    Args:
        model, revision: what the marker names.
        embed: write into the photo (JPEG, PNG, WebP, TIFF) rather than a sidecar.
        sidecar_naming: ``ext`` (photo.jpg.xmp) or ``stem`` (photo.xmp).
        dry_run: decide and report, write nothing.
        min_confidence: write only captions at least this sure (None: all).
        exiftool: a running ``storyteller.exiftool.ExifTool`` (needed for --embed and for sidecars
            other programs wrote), or None.
    """

    model: str
    revision: str
    embed: bool = False
    sidecar_naming: str = "ext"
    dry_run: bool = False
    min_confidence: float | None = None
    exiftool: Any = None
    counts: Counter = field(default_factory=Counter)
    _folders: set = field(default_factory=set)
    _stems: dict = field(default_factory=dict)

    def places(self, photo: Path) -> tuple[Place, Place, str | None]:
        """(the photo's embedded metadata, its sidecar, the embed format or None) ; raises OSError/ValueError."""
        kind = image_kind(photo)
        return read_place(photo), read_place(sidecar_path(photo, self.sidecar_naming), sidecar=True), kind

    def blocked(self, places: Iterable[Place]) -> str | None:
        """Why a person's words forbid writing, else None."""
        for place in places:
            status, which = _ownership(place)
            if status == "theirs":
                return f"has a description we did not write ({which} in {place.where})"
            if status == "edited":
                return f"our caption in {place.where} was edited by a person ({which}), so it is theirs now"
        return None

    def _enter(self, photo: Path) -> None:
        """The first time a run meets a folder: remove a killed run's temporary files from it."""
        if not self.dry_run and photo.parent not in self._folders:
            self._folders.add(photo.parent)
            clean_stale_temps(photo.parent)

    def done_by_model(self, photo: Path) -> Outcome | None:
        """Before captioning: the skip of a photo that needs no caption from this model (a person's words, or
        this model's text already there), else None."""
        self._enter(photo)
        try:
            embedded, sidecar, kind = self.places(photo)
        except (OSError, ValueError):
            return None  # tag() reports it
        why = self.blocked([embedded, sidecar])
        if why:
            return Outcome("skipped", why, reason="a person's description")
        target = embedded if self.embed and kind in EMBED_FORMATS else sidecar
        marker = target.xmp.marker
        if marker.get("Reviewed") == "True" and _ownership(target)[0] == "ours":
            return Outcome("skipped", f"its caption in {target.where} was reviewed by a person (tag from the records "
                           "file to change it)", reason="a person's description")
        if _ownership(target)[0] == "ours" and (marker.get("Model"), marker.get("Revision", "")) == \
                (self.model, self.revision):
            return Outcome("skipped", f"already tagged by this model ({target.where})", reason="already tagged")
        return None

    def tag(self, cap: Caption) -> Outcome:
        """Write one photo's caption where asked, unless a person's words or the confidence forbid it."""
        outcome = self._tag(cap)
        self.count(outcome)
        return outcome

    def count(self, outcome: Outcome) -> None:
        """Add an outcome to :attr:`counts` (keys: (status, where or reason))."""
        self.counts[(outcome.status, outcome.where or outcome.reason)] += 1

    def _tag(self, cap: Caption) -> Outcome:
        self._enter(cap.path)
        if cap.text is None:
            return Outcome(cap.error_status, cap.error or "no caption", reason="no caption")
        text = _clean(cap.text)
        if not text:
            return Outcome("skipped", "the caption is empty", reason="empty caption")
        try:
            embedded, sidecar, kind = self.places(cap.path)
        except FileNotFoundError:
            return Outcome("failed", f"not found ({cap.path})")
        except OSError as e:
            return Outcome("failed", f"cannot read it ({e.strerror or e})")
        except ValueError as e:
            return Outcome("skipped", f"its sidecar is not readable XMP, so it is left alone ({e})",
                           reason="unreadable sidecar")
        why = self.blocked([embedded, sidecar])
        if why:
            return Outcome("skipped", why, reason="a person's description")
        into_photo = self.embed and kind in EMBED_FORMATS
        target = embedded if into_photo else sidecar
        if target.xmp.marker.get("Reviewed") == "True" and not cap.reviewed and target.xmp.description != text:
            return Outcome("skipped", f"its caption in {target.where} was reviewed by a person",
                           reason="a person's description")
        if _ownership(target)[0] == "ours" and target.xmp.description == text \
                and target.xmp.alt_text == alt_text_of(text):
            return Outcome("skipped", f"already tagged with this caption ({target.where})", reason="already tagged")
        if self.min_confidence is not None and (cap.confidence is None or cap.confidence < self.min_confidence):
            known = "unknown" if cap.confidence is None else f"{cap.confidence:.2f} < {self.min_confidence:g}"
            return Outcome("review", f"confidence {known}: {text}")
        note = "" if into_photo or not self.embed else \
            f" ({(kind or cap.path.suffix.lstrip('.') or 'this format').upper()} is not written in place)"
        return self._write(cap, text, target, into_photo, note)

    def _marker(self, cap: Caption, text: str) -> dict[str, str]:
        marker = {"Model": self.model, "Revision": self.revision, "Confidence": "", "TextHash": xmp.text_hash(text),
                  "Reviewed": "True" if cap.reviewed else ""}
        if cap.confidence is not None:
            marker["Confidence"] = f"{cap.confidence:.3f}"
        return marker

    def _write(self, cap: Caption, text: str, target: Place, into_photo: bool, note: str) -> Outcome:
        where = "embedded" if into_photo else "sidecar"
        verb = "would write" if self.dry_run else "wrote"
        what = "into the photo" if into_photo else f"to {target.where}{note}"
        replaced = " (replacing our earlier caption)" if target.xmp.description else ""
        if not into_photo and target.xmp.foreign and self.exiftool is None:
            return Outcome("skipped", f"{target.where} holds other programs' metadata; install exiftool to add to it",
                           reason="sidecar needs exiftool")
        if not into_photo and self.sidecar_naming == "stem":
            twin = self._stem_twin(cap.path)
            if twin:
                return Outcome("skipped", f"{target.where} is also the sidecar of {twin}; use --sidecar-name ext",
                               reason="shared sidecar")
        if self.dry_run:
            return Outcome("written", f"{verb} {what}{replaced}: {text}", where)
        fields = xmp.Fields(text, alt_text_of(text), self._marker(cap, text))
        file = cap.path if into_photo else cap.path.parent / target.where
        if file.exists() and _read_only(file):
            return Outcome("failed", f"{file.name} is read-only; it is left as it is (make it writable to tag it)")
        try:
            if into_photo or target.xmp.foreign:
                error = self._exiftool_write(file, fields, embed_exif=into_photo and image_kind(file) == "jpeg")
                if error:
                    return Outcome("failed", error)
            else:
                self._write_sidecar(file, fields)
        except OSError as e:
            return Outcome("failed", _err_line(e))
        return Outcome("written", f"{verb} {what}{replaced}: {text}", where)

    def _stem_twin(self, photo: Path) -> str | None:
        """Another file of the folder with the same stem (photo.jpg beside photo.cr2): it shares photo.xmp."""
        key = (photo.parent, photo.stem.lower())
        if key not in self._stems:
            try:
                self._stems[key] = sorted(e.name for e in os.scandir(photo.parent)
                                          if Path(e.name).stem.lower() == key[1] and not e.name.lower().endswith(".xmp"))
            except OSError:
                self._stems[key] = []
        others = [n for n in self._stems[key] if n != photo.name]
        return others[0] if others else None

    def _write_sidecar(self, path: Path, fields: xmp.Fields) -> None:
        tmp = _temp_for(path)
        try:
            with open(tmp, "xb") as f:
                f.write(xmp.packet(fields).encode("utf-8"))
            _replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _exiftool_write(self, path: Path, fields: xmp.Fields, embed_exif: bool) -> str | None:
        """Into a photo, or a sidecar another program wrote: exiftool writes a temporary copy, we check its image
        data is the original's, then rename it over the original. Returns an error line, or None."""
        tags = {"XMP-dc:Description": fields.description, "XMP-iptcCore:AltTextAccessibility": fields.alt_text,
                **{f"XMP-storyteller:{k}": v for k, v in fields.marker.items()}}
        if embed_exif:
            tags["EXIF:ImageDescription"] = fields.description
        tmp = _temp_for(path)
        try:
            with open(path, "rb") as src, open(tmp, "xb") as dst:
                shutil.copyfileobj(src, dst)
            error = self.exiftool.write(tmp, tags)
            if error:
                return f"exiftool could not write it ({error}); it is left as it was"
            if path.suffix.lower() != ".xmp" and image_data_digest(tmp) != image_data_digest(path):
                return "the written copy's image data differed from the original's, so the original is kept as it was"
            _replace(tmp, path)
            return None
        except ValueError as e:
            return f"cannot check the written copy ({e}); it is left as it was"
        finally:
            tmp.unlink(missing_ok=True)
            tmp.with_name(tmp.name + "_exiftool_tmp").unlink(missing_ok=True)  # exiftool's own, if it was stopped


def model_identity(captioner: Any) -> tuple[str, str]:
    """(name, revision) for the marker: the model as ``info`` names it; the Hub revision asked for, else the
    snapshot's commit, else ``sha256:`` of a local folder's config, vocabulary and weights (12 hex digits).

    Args:
        captioner: a loaded ``Captioner``.
    """
    import hashlib

    from .decoders import CONFIG_FILE, VOCAB_FILE, local_weight_files

    name = captioner.info["model_name"]
    folder = captioner.model_dir
    if captioner.revision:
        return name, captioner.revision
    if folder is None:
        return name, ""
    if folder.parent.name == "snapshots":  # a Hugging Face cache snapshot: its folder is the commit
        return name, folder.name
    h = hashlib.sha256()
    for path in [folder / CONFIG_FILE, folder / VOCAB_FILE, *local_weight_files(folder)]:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return name, "sha256:" + h.hexdigest()[:12]


def _confidence(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _records_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a records file: JSONL objects, or CSV rows by header (comma, semicolon or tab)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TagError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise TagError(f"{path} is not UTF-8 text: save it from the spreadsheet as 'CSV UTF-8'") from None
    if path.suffix.lower() == ".jsonl":
        rows = []
        lines = text.split("\n")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if n == len(lines):  # a last line cut short by a killed caption run: its photo has no record
                    continue
                raise TagError(f"{path}: line {n} is not JSON") from None
        return [r for r in rows if isinstance(r, dict)]
    first = text.split("\n", 1)[0]
    delimiter = max(",;\t", key=first.count)  # spreadsheets in some languages save with ';'
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))


def read_tag_records(path: str | os.PathLike, column: str = "beam", root: str | os.PathLike = "."
                     ) -> tuple[list[Caption], dict[str, Any]]:
    """The captions to write from a ``caption --out`` records file (JSONL or CSV, possibly edited).

    Args:
        path: the records file.
        column: the column (key) holding the text to write; not ``beam``/``greedy`` marks it reviewed.
        root: the folder the records' ``image`` names are relative to (the one given to ``caption``).

    Returns:
        (one Caption per record, in file order; the ``model``/``revision`` the records name, if any).

    Raises:
        TagError: unreadable, not records, or no such column.
    """
    path = Path(path)
    if path.suffix.lower() not in RECORD_SUFFIXES:
        raise TagError(f"{path}: a records file is .jsonl or .csv (from caption --out)")
    rows = _records_rows(path)
    if not rows or any(not r.get("image") for r in rows):
        raise TagError(f"{path} holds no caption records (each needs an 'image'); make one with caption --out")
    if not any(column in r for r in rows):
        names = sorted({k for r in rows for k in r if k})
        raise TagError(f"{path} has no column {column!r} (it has: {', '.join(names)}); choose one with --column")
    reviewed = column not in ("beam", "greedy")
    captions = []
    for r in rows:
        text = r.get(column)
        error = r.get("error") or (None if text is not None else f"its record has no {column!r}")
        if error and not text:
            captions.append(Caption(r["image"], Path(root, r["image"]), error=f"no caption in the records ({error})",
                                    error_status="skipped"))
            continue
        captions.append(Caption(r["image"], Path(root, r["image"]), str(text), _confidence(r.get("confidence")),
                                reviewed))
    meta = {k: rows[0].get(k) for k in ("model", "revision") if rows[0].get(k)}
    return captions, meta


def _summary(tagger: Tagger, total: int, seconds: float) -> str:
    c = tagger.counts

    def group(status: str) -> str:
        parts = [f"{n} {key}" for (s, key), n in sorted(c.items()) if s == status and key and n]
        return f" ({', '.join(parts)})" if parts else ""

    n = {s: sum(v for (k, _), v in c.items() if k == s) for s in ("written", "skipped", "review", "failed")}
    verb = "would be written" if tagger.dry_run else "written"
    line = (f"tag: {n['written']} {verb}{group('written')}, {n['skipped']} skipped{group('skipped')}, "
            f"{n['failed']} failed")
    if tagger.min_confidence is not None:
        line += f", {n['review']} left for review (confidence under {tagger.min_confidence:g} or unknown)"
    return line + f"; {total} files in {seconds:.1f} s" + (" (dry run: nothing was changed)" if tagger.dry_run else "")


def _report(bar: Any, name: str, outcome: Outcome, dry_run: bool) -> None:
    """One line per photo on stdout: STATUS<TAB>photo<TAB>what happened (``would-write`` in a dry run)."""
    status = "would-write" if outcome.status == "written" and dry_run else outcome.status
    bar.write(f"{status}\t{name}\t{outcome.detail}", file=sys.stdout)
    bar.update(1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``tag`` subcommand's own options (the model options come from the caller).

    Args:
        p: its subparser.
    """
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a records file from caption --out (.jsonl or .csv, possibly edited), or photos and folders "
                        "to caption and tag in one run")
    p.add_argument("--embed", action="store_true",
                   help="write into JPEG, PNG, WebP and TIFF files (needs exiftool) instead of XMP sidecars; other "
                        "formats still get a sidecar")
    p.add_argument("--sidecar-name", choices=["ext", "stem"], default="ext",
                   help="sidecar naming: ext = photo.jpg.xmp (darktable, digiKam, Immich; default), "
                        "stem = photo.xmp (Adobe)")
    p.add_argument("--dry-run", action="store_true", help="list what would be written; change nothing")
    p.add_argument("--min-confidence", type=float, default=None, metavar="X",
                   help="write only captions whose confidence is >= X (0..1); list the others for review")
    p.add_argument("--column", default="beam", help="records file: the column to write (default: beam); any other "
                   "column (e.g. alt) marks the text as reviewed by a person")
    p.add_argument("--root", default=".", help="records file: the folder its image names are relative to (the one "
                   "given to caption; default: the current folder)")
    p.add_argument("--beam", type=int, default=None, metavar="K", help="folders: beam width (default: the model's)")
    p.add_argument("--max-len", type=int, default=None, metavar="N", help="folders: most decoder steps")
    p.add_argument("--alpha", type=float, default=None, help="folders: beam length normalisation")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="folders: photos per batch (default 16)")
    p.add_argument("--workers", type=int, default=None, metavar="W", help="folders: processes decoding photos")


def _check(args: argparse.Namespace) -> bool:
    """True for a records file, False for photos and folders; raises TagError on unusable options."""
    if args.min_confidence is not None and not 0 <= args.min_confidence <= 1:
        raise TagError("--min-confidence must be between 0 and 1")
    try:
        check_search_options(args)  # the limits the searches apply, as caption checks them
    except ValueError as e:
        raise TagError(str(e)) from None
    if args.batch_size < 1 or (args.workers or 0) < 0:
        raise TagError("--batch-size must be >= 1, --workers >= 0")
    records = [i for i in args.inputs if Path(i).suffix.lower() in RECORD_SUFFIXES and not Path(i).is_dir()]
    if records and len(args.inputs) > 1:
        raise TagError("give one records file (.jsonl/.csv) alone, or photos and folders, not both")
    if not records and (args.column != "beam" or args.root != "."):
        raise TagError("--column and --root go with a records file (.jsonl or .csv from caption --out)")
    return bool(records)


def _drive(tagger: Tagger, outcomes: Iterator[tuple[str, Outcome]], total: int) -> int:
    """Report each outcome (stdout), a progress bar and the summary (stderr); the exit status."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    with tqdm(total=total, unit="photo", desc="tag", file=sys.stderr, disable=None) as bar:
        try:
            for name, outcome in outcomes:
                _report(bar, name, outcome, tagger.dry_run)
        except KeyboardInterrupt:
            print("tag: interrupted; every photo is as it was or fully written: rerun the same command to go on",
                  file=sys.stderr)
            return 130
    print(_summary(tagger, total, time.perf_counter() - t0), file=sys.stderr)
    return 1 if any(v for (s, _), v in tagger.counts.items() if s == "failed") else 0


def _no_confidence(where: str, x: float) -> TagError:
    return TagError(f"--min-confidence {x:g}: {where} gives no confidence for any caption, so none can be compared "
                    f"with {x:g}; nothing was written. Review the captions (caption --out FILE.csv) and tag without "
                    f"--min-confidence")


def _record_outcomes(captions: list[Caption], tagger: Tagger) -> Iterator[tuple[str, Outcome]]:
    for cap in captions:
        yield cap.name, tagger.tag(cap)


def _folder_outcomes(args: argparse.Namespace, photos: list[Any], tagger: Tagger, captioner: Any
                     ) -> Iterator[tuple[str, Outcome]]:
    """Skip what needs no caption, caption the rest in batches (photo_library's pipeline), tag as each ends."""
    from .photo_library import caption_batches

    todo = []
    for photo in photos:
        skip = Outcome("failed", photo.error) if photo.error else tagger.done_by_model(Path(photo.path))
        if skip:
            tagger.count(skip)
            yield photo.name, skip
        else:
            todo.append(photo)
    checked = tagger.min_confidence is None
    for batch in caption_batches(todo, captioner, batch_size=args.batch_size, workers=args.workers,
                                 beam_size=args.beam, max_len=args.max_len, alpha=args.alpha):
        results = [r for _, r in batch if not isinstance(r, Exception)]
        if not checked and results:  # a model without a calibrator gives no confidence to any caption
            if all(r.beam[0].confidence is None for r in results):
                raise _no_confidence(f"the model {tagger.model}", tagger.min_confidence)
            checked = True
        for photo, result in batch:
            if isinstance(result, Exception):
                cap = Caption(photo.name, Path(photo.path), error=f"could not be captioned: {result}")
            else:
                cap = Caption(photo.name, Path(photo.path), result.beam[0].text, result.beam[0].confidence)
            yield photo.name, tagger.tag(cap)


def _start_exiftool(embed: bool) -> Any:
    """A running ExifTool: required for --embed (TagError without it), used when present otherwise."""
    from .exiftool import ExifTool, ExifToolMissing

    try:
        return ExifTool()
    except ExifToolMissing as e:
        if embed:
            raise TagError(str(e)) from None
        return None


def run_cli(args: argparse.Namespace, load_captioner: Callable[[argparse.Namespace], Any]) -> int:
    """``python -m storyteller tag``; returns the exit status (0 nothing failed, 1 some photos failed, 2 the
    inputs, options, model or exiftool cannot be used, 130 interrupted).

    Args:
        args: the parsed options (:func:`add_arguments` and the model options).
        load_captioner: loads the model from ``args``, or returns None after an error line.
    """
    exiftool = None
    try:
        from_records = _check(args)
        if from_records:
            captions, meta = read_tag_records(args.inputs[0], args.column, args.root)
            if args.min_confidence is not None and all(c.confidence is None for c in captions if c.text):
                raise _no_confidence(args.inputs[0], args.min_confidence)
            model = meta.get("model") or (_label(args.model) if args.model else
                                          f"not recorded in {Path(args.inputs[0]).name}")
            revision = meta.get("revision") or args.revision or ""
        else:
            from .photo_library import LibraryError, find_images

            try:
                photos = find_images(args.inputs)
            except LibraryError as e:
                raise TagError(str(e)) from None
            if not photos:
                print(f"tag: no image files in {' '.join(args.inputs)}", file=sys.stderr)
                return 0
            captioner = load_captioner(args)
            if captioner is None:
                return 2
            model, revision = model_identity(captioner)
        exiftool = _start_exiftool(args.embed)
        tagger = Tagger(model, revision, embed=args.embed, sidecar_naming=args.sidecar_name, dry_run=args.dry_run,
                        min_confidence=args.min_confidence, exiftool=exiftool)
        if from_records:
            return _drive(tagger, _record_outcomes(captions, tagger), len(captions))
        return _drive(tagger, _folder_outcomes(args, photos, tagger, captioner), len(photos))
    except TagError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if exiftool is not None:
            exiftool.close()


def _label(model: str) -> str:
    from .captioner import model_label

    return model_label(model)
