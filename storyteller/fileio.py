"""Atomic writes: a temp file beside the target, then ``os.replace``, so a reader (or a run killed
mid-write) never sees half a file. Text is always UTF-8, whatever the locale.

    write_json_atomic("out/eval.json", result)
    with atomic_path("out/curve.png") as tmp:   # any writer that takes a path (savefig, save_file, PIL)
        fig.savefig(tmp, format="png")
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside ``path`` to write to; it replaces ``path`` when the block ends without error
    (and is removed if the block fails). The parent folder is created.

    Args:
        path: destination.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8) atomically, creating the parent folder.

    Args:
        path: destination.
        text: the whole file.
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 1, sort_keys: bool = False) -> None:
    """Write ``obj`` as JSON (non-ASCII kept as is) to ``path`` atomically.

    Args:
        path: destination.
        obj: a JSON-able object.
        indent: ``json.dumps`` indent.
        sort_keys: sort object keys.
    """
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=sort_keys) + "\n")
