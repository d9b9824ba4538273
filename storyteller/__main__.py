"""Command line: caption image files with a Neural Storyteller model.

    python -m storyteller caption [--model M] [--revision R] [--beam K] [--max-len N] [--alpha A]
                                  [--n-best N] [--json] [--batch-size B] [--device D] [--attention DIR] PATH...
    python -m storyteller caption PATH... --out captions.jsonl|captions.csv [--overwrite] [--workers W]
    python -m storyteller info [--model M] [--revision R]
    python -m storyteller tag captions.csv|PATH... [--embed] [--dry-run] [--min-confidence X]   (storyteller.tagging)

A PATH is an image file or a folder; folders are walked recursively for image files (hidden ones skipped,
in a stable order; see ``storyteller.photo_library``).

``caption`` prints one line per image, in input order: ``IMAGE<TAB>beam caption<TAB>greedy caption``
(with ``--json``: one JSON object per line with ``image``, ``beam``, ``beam_size``, ``greedy``,
their log-probabilities, ``warnings`` and the timings of the batch the image was captioned in:
``batch_images`` and ``batch_timings_ms``). A tiny or nearly uniform photo is captioned with a
warning (on stderr; in the JSON's ``warnings``). An image that cannot be read gets an error line (on stderr; with
``--json`` an object with ``"error"`` on stdout) and the others are still captioned. Exit status:
0 if every image was captioned, 1 if some failed, 2 if the model could not be loaded.
``--attention DIR`` (attention models) also writes ``DIR/<image name>.attention.png`` per image:
the photo under the heat map of each word of the beam caption, the word below each panel.
``--out FILE`` captions a photo library instead: one record per file (``image``, ``greedy``, ``beam``,
``beam_log_prob``, ``warnings``, or ``image`` and ``error``) in FILE, JSONL or CSV by its extension, written
as each batch finishes; photos are decoded in DataLoader workers while the model runs, a progress bar and a
summary line go to stderr. Rerunning the same command skips the files FILE already holds (a half-written last
line from a killed run is redone); ``--overwrite`` starts over. ``docs/photo-library.md`` has the details.
``--model`` takes a local model folder or a Hub repo id; without it, ``$STORYTELLER_MODEL`` or the
bundled ``models/flickr8k-lite0-ensemble/``. ``info`` prints the model's backbone, sizes and scores as JSON.

Example::

    python -m storyteller caption --model models/flickr8k-lite0-scst --beam 5 examples/*.jpg
    python -m storyteller caption --attention attention_maps/ examples/*.jpg   # with an attention model
    python -m storyteller caption photos/ --out captions.csv                   # a whole folder, resumable
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .decoding_settings import MAX_LEN_HELP, check_search_options

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m storyteller", description="Neural Storyteller image captioning.")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", default=None,
                        help="local model folder or Hub repo id (default: $STORYTELLER_MODEL, else models/flickr8k-lite0-ensemble)")
        sp.add_argument("--revision", default=None, help="Hub branch, tag or commit (repo ids only)")
        sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
        sp.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "int8"],
                        help="how the decoder computes on a CPU (default: $STORYTELLER_PRECISION, else auto: int8 "
                             "where it runs, else bf16 where the CPU has bfloat16 instructions, else fp32)")

    c = sub.add_parser("caption", help="caption image files")
    model_args(c)
    c.add_argument("images", nargs="+", metavar="PATH",
                   help="image files (JPEG, PNG, GIF, WebP, ...) or folders (walked recursively)")
    c.add_argument("--beam", type=int, default=None, metavar="K", help="beam width (default: the model's, else 3)")
    c.add_argument("--max-len", type=int, default=None, metavar="N",
                   help=f"{MAX_LEN_HELP} (default: the model's, else 20)")
    c.add_argument("--alpha", type=float, default=None, help="beam length normalisation (0: raw log-probability)")
    c.add_argument("--n-best", type=int, default=1, metavar="N", help="with --json, list the N best beam captions")
    c.add_argument("--batch-size", type=int, default=16, metavar="B", help="images per batch (default 16)")
    c.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads (default: torch's, the cores)")
    c.add_argument("--out", default=None, metavar="FILE",
                   help="write one record per file to FILE (.jsonl or .csv), as each batch finishes; rerunning "
                        "the same command resumes")
    c.add_argument("--overwrite", action="store_true", help="with --out: start over instead of resuming")
    c.add_argument("--workers", type=int, default=None, metavar="W",
                   help="with --out: processes decoding photos (default: 1 on a CPU, more with a GPU; 0: none)")
    c.add_argument("--review-below", type=float, default=None, metavar="X",
                   help="with --out: mark records whose confidence is below X (or unknown) \"needs_review\": true")
    c.add_argument("--json", action="store_true", help="one JSON object per line")
    c.add_argument("--attention", default=None, metavar="DIR",
                   help="attention models: write DIR/<image>.attention.png, the heat map of each word of the beam caption")

    i = sub.add_parser("info", help="print the model's backbone, sizes and scores as JSON")
    model_args(i)

    from .tagging import add_arguments as tag_arguments

    t = sub.add_parser("tag", help="write captions into photos' metadata (XMP sidecars, or --embed), after review")
    model_args(t)
    tag_arguments(t)
    return p


def _caption_record(path: str, result: Any, beam_size: int, n_best: int) -> dict[str, Any]:
    best = result.beam[0]
    rec = {"image": path, "beam": best.text, "beam_log_prob": round(best.log_prob, 4),
           "beam_score": round(best.score, 4), "beam_size": beam_size, "greedy": result.greedy.text,
           "greedy_log_prob": round(result.greedy.log_prob, 4),
           # the estimated probability that the caption is good (storyteller.confidence); null: no calibration
           "beam_confidence": best.confidence, "greedy_confidence": result.greedy.confidence,
           "warnings": list(result.warnings),
           # the backbone and the searches run once per batch: these are the batch's times, not this image's
           "batch_images": result.batch_size,
           "batch_timings_ms": {k: round(v, 1) for k, v in result.timings_ms.items()}}
    if n_best > 1:
        rec["n_best"] = [{"caption": c.text, "log_prob": round(c.log_prob, 4), "score": round(c.score, 4),
                          "confidence": c.confidence} for c in result.beam]
    return rec


def _cmd_caption(args: argparse.Namespace, captioner: Any) -> int:
    from .images import ImageError

    beam_size = args.beam if args.beam is not None else captioner.decoding["beam_size"]
    settings = dict(beam_size=beam_size, max_len=args.max_len, alpha=args.alpha, n_best=args.n_best)
    failed = 0

    def report_error(path: str, message: str) -> None:
        nonlocal failed
        failed += 1
        if args.json:
            print(json.dumps({"image": path, "error": message}), flush=True)
        else:
            print(f"{path}\terror: {message}", file=sys.stderr, flush=True)

    pending: list[tuple[str, Any]] = []  # (path, decoded image) waiting for a batch
    written: set[str] = set()  # attention pictures of this run: two photos named alike get distinct files

    def save_attention(path: str, image: Any, result: Any) -> None:
        from pathlib import Path

        stem = Path(path).name
        name, k = f"{stem}.attention.png", 1
        while name in written:
            k += 1
            name = f"{stem}.{k}.attention.png"
        written.add(name)
        out = Path(args.attention) / name
        captioner.attention_figure(image, result.beam[0]).save(out)
        if not args.json:
            print(f"{path}	attention: {out}", file=sys.stderr, flush=True)

    def flush() -> None:
        if not pending:
            return
        results = captioner.caption([img for _, img in pending], **settings)
        for (path, img), r in zip(pending, results):
            if args.attention:
                save_attention(path, img, r)
            if args.json:
                print(json.dumps(_caption_record(path, r, beam_size, args.n_best)), flush=True)
            else:
                for note in r.warnings:
                    print(f"{path}\twarning: {note}", file=sys.stderr, flush=True)
                print(f"{path}\t{r.beam[0].text}\t{r.greedy.text}", flush=True)
        pending.clear()

    from .photo_library import IMAGE_EXTENSIONS, walk_inputs

    photos = []
    for given in args.images:  # files as given; a folder's image files, as folder/name
        found = walk_inputs([given])
        if not found:  # only a folder gives nothing: say so rather than print nothing
            print(f"{given}\tno image files ({' '.join(sorted(IMAGE_EXTENSIONS))})", file=sys.stderr, flush=True)
        photos.extend(found)
    for photo in photos:
        path = photo.path
        if photo.error:  # a folder that could not be listed
            flush()
            report_error(path, photo.error)
            continue
        try:
            pending.append((path, captioner.load_image(path)))  # decoded as the app decodes it
        except ImageError as e:
            flush()  # keep output in input order
            report_error(path, str(e))
            continue
        if len(pending) >= args.batch_size:
            flush()
    flush()
    return 1 if failed else 0


def _cmd_library(args: argparse.Namespace) -> int:
    """caption --out: every file of the inputs into a resumable record file (storyteller.photo_library)."""
    import time

    from tqdm import tqdm

    from .photo_library import LibraryError, RecordFile, caption_batches, find_images, to_record

    try:
        photos = find_images(args.images)
        out = RecordFile(args.out, overwrite=args.overwrite)
    except LibraryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not photos:
        print(f"caption: no image files in {' '.join(args.images)}", file=sys.stderr)
        return 0
    todo = [p for p in photos if out.record_of(p.name) is None]
    captioner = _load_captioner(args) if todo else None
    if todo and captioner is None:
        return 2
    settings = dict(beam_size=args.beam, max_len=args.max_len, alpha=args.alpha)
    new_errors, t0 = 0, time.perf_counter()
    try:
        with out, tqdm(total=len(todo), unit="photo", desc="caption", file=sys.stderr, disable=None) as bar:
            for batch in caption_batches(todo, captioner, batch_size=args.batch_size, workers=args.workers,
                                         **settings):
                records = [to_record(photo.name, result, args.review_below) for photo, result in batch]
                out.write(records)
                new_errors += sum("error" in r for r in records)
                bar.update(len(records))
                bar.set_postfix(errors=new_errors)
    except LibraryError as e:  # the output cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"caption: interrupted; {args.out} holds every finished batch: rerun the same command to go on",
              file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it
    seconds = time.perf_counter() - t0
    skipped = len(photos) - len(todo)
    if todo:
        print(f"caption: {len(todo) - new_errors} captioned, {new_errors} errors, {skipped} already in {args.out}; "
              f"{len(todo)} files in {seconds:.1f} s ({len(todo) / seconds:.1f} photos/s)", file=sys.stderr)
    else:
        print(f"caption: nothing to do, all {skipped} files are already in {args.out}", file=sys.stderr)
    errors = sum("error" in out.record_of(p.name) for p in photos)
    if errors:
        print(f"caption: {errors} of {len(photos)} files could not be captioned: their records in {args.out} "
              f"have an \"error\"", file=sys.stderr)
    return 1 if errors else 0


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit 2 through argparse) before anything is loaded."""
    try:
        check_search_options(args)  # the limits the searches apply, stated once
    except ValueError as e:
        p.error(str(e))
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.n_best < 1 or (args.beam is not None and args.n_best > args.beam):
        p.error("--n-best must be in 1..--beam")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.workers is not None and args.workers < 0:
        p.error("--workers must be >= 0")
    if args.out is None and (args.overwrite or args.workers is not None):
        p.error("--overwrite and --workers go with --out")
    if args.out is not None and (args.json or args.attention or args.n_best > 1):
        p.error("--out writes its own records (JSONL or CSV by extension): --json, --attention and --n-best are "
                "for printed output")
    if args.review_below is not None and (args.out is None or not 0.0 <= args.review_below <= 1.0):
        p.error("--review-below goes with --out and is a confidence in 0..1")


def _load_captioner(args: argparse.Namespace) -> Any:
    """The model, or None after one error line on stderr."""
    from .captioner import ModelLoadError, load

    try:
        return load(args.model, revision=args.revision, device=args.device, precision=args.precision)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "tag":
        from .tagging import run_cli

        return run_cli(args, _load_captioner)
    if args.command == "caption":
        _check_args(parser, args)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
    try:
        if args.command == "caption" and args.out is not None:
            return _cmd_library(args)
        captioner = _load_captioner(args)
        if captioner is None:
            return 2
        if args.command == "info":
            print(json.dumps(captioner.info, indent=2, default=str))
            return 0
        if args.attention and not _attention_folder(args, captioner):
            return 2
        return _cmd_caption(args, captioner)
    except ValueError as e:  # decoding settings the model rejects (e.g. --n-best above its default beam)
        print(f"error: {e}", file=sys.stderr)
        return 2


def _attention_folder(args: argparse.Namespace, captioner: Any) -> bool:
    """Check --attention can be done (an attention model, a folder we can create); False after an error line."""
    if not captioner.has_attention:
        print(f"error: --attention: {captioner.info['model_name']} is a pooled model (no decoder of it looks over the "
              "grid), so it has no attention maps; use a Show-Attend-Tell model or an ensemble holding one",
              file=sys.stderr)
        return False
    from pathlib import Path

    try:
        Path(args.attention).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: --attention: cannot create {args.attention} ({e.strerror})", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
