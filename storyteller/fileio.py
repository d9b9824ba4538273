"""Atomic text writes: a temp file beside the target, then ``os.replace``, so a reader (or a run killed
mid-write) never sees half a file. Text is always UTF-8, whatever the locale."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8) atomically, creating the parent folder.

    Args:
        path: destination.
        text: the whole file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON (non-ASCII kept as is) to ``path`` atomically.

    Args:
        path: destination.
        obj: a JSON-able object.
        indent: ``json.dumps`` indent.
    """
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
