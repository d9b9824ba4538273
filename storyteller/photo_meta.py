"""A photo's own metadata, read with the standard library and Pillow, and its image data, to prove a write
left it alone.

    found = read_place("photo.jpg")             # Place: XMP fields + EXIF/IPTC/PNG descriptions
    digest = image_data_digest("photo.jpg")     # SHA-256 of everything but the metadata segments

Used by ``storyteller.tagging``: the descriptions decide whether a photo may be tagged, the digest is
compared before and after a write (only metadata segments may differ).
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from . import xmp

__all__ = ["Place", "image_kind", "read_place", "image_data_digest", "CAMERA_PLACEHOLDERS"]

# What cameras put in EXIF ImageDescription on their own: not a person's words.
CAMERA_PLACEHOLDERS = frozenset({"OLYMPUS DIGITAL CAMERA", "SONY DSC", "DIGITAL CAMERA", "KONICA MINOLTA DIGITAL CAMERA",
                                 "MINOLTA DIGITAL CAMERA", "SAMSUNG DIGITAL CAMERA", "DCIM", "DEFAULT", "IMAGE"})
_JPEG_METADATA = set(range(0xE0, 0xF0)) | {0xFE}  # APP0..APP15 and COM: everything else is image data
_PNG_METADATA = {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"}
_WEBP_METADATA = {b"EXIF", b"XMP ", b"VP8X"}  # VP8X only carries flags and the canvas size (checked in VP8/VP8L)


@dataclass
class Place:
    """What one place (a photo's embedded metadata, or a sidecar) holds.

    Args:
        where: its file name, for the report.
        xmp: its XMP fields.
        others: other description fields with text: label -> text (EXIF ImageDescription, IPTC
            Caption-Abstract, PNG Description).
    """

    where: str
    xmp: xmp.Fields = field(default_factory=xmp.Fields)
    others: dict[str, str] = field(default_factory=dict)


def image_kind(path: str | os.PathLike) -> str | None:
    """``jpeg``, ``png``, ``webp`` or ``tiff`` by the file's first bytes (what --embed writes), else None.

    Args:
        path: the photo.
    """
    with open(path, "rb") as f:
        head = f.read(12)
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def _other_descriptions(path: Path) -> dict[str, str]:
    """EXIF ImageDescription (camera placeholders left out), IPTC Caption-Abstract, a PNG Description chunk."""
    from PIL import Image, IptcImagePlugin

    found: dict[str, str] = {}
    try:
        with Image.open(path) as im:
            exif = im.getexif().get(0x010E)
            if isinstance(exif, bytes):
                exif = exif.decode("utf-8", errors="replace")
            if isinstance(exif, str) and exif.strip(" \x00") and exif.strip(" \x00").upper() not in CAMERA_PLACEHOLDERS:
                found["EXIF ImageDescription"] = exif.strip(" \x00")
            iptc = IptcImagePlugin.getiptcinfo(im) or {}
            caption = iptc.get((2, 120))
            if isinstance(caption, list):
                caption = caption[0] if caption else None
            if isinstance(caption, bytes) and caption.strip():
                found["IPTC Caption-Abstract"] = caption.decode("utf-8", errors="replace").strip()
            text = im.info.get("Description") if im.format == "PNG" else None
            if isinstance(text, str) and text.strip():
                found["PNG Description"] = text.strip()
    except Exception:  # a format Pillow cannot open (HEIC, RAW) or a damaged header: only the XMP packet counts
        pass
    return found


def read_place(path: str | os.PathLike, sidecar: bool = False) -> Place:
    """What a photo (its embedded XMP and other description fields) or a sidecar holds.

    Args:
        path: the photo or sidecar.
        sidecar: ``path`` is an XMP sidecar (a missing one is an empty place).

    Raises:
        OSError: the file cannot be read.
        ValueError: its XMP is not well-formed (a sidecar that is not XMP).
    """
    path = Path(path)
    if sidecar and not path.exists():
        return Place(path.name)
    data = path.read_bytes()
    if sidecar:
        return Place(path.name, xmp.read_packet(data))
    packet = xmp.find_packet(data)
    return Place(path.name, xmp.read_packet(packet) if packet else xmp.Fields(), _other_descriptions(path))


def _jpeg_parts(data: bytes) -> list[bytes]:
    parts, i = [data[:2]], 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ValueError("not a JPEG segment")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan: the compressed image data to the end
            parts.append(data[i:])
            return parts
        size = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker not in _JPEG_METADATA:
            parts.append(data[i:i + 2 + size])
        i += 2 + size
    raise ValueError("no image data (no start of scan)")


def _chunks(data: bytes, start: int, header: str, skip: set[bytes]) -> list[bytes]:
    """PNG (big-endian, CRC after the data) or RIFF (little-endian, padded to even) chunks not in ``skip``."""
    parts, i = [], start
    while i + 8 <= len(data):
        if header == "png":
            size, kind = struct.unpack(">I", data[i:i + 4])[0], data[i + 4:i + 8]
            end = i + 12 + size
        else:
            kind, size = data[i:i + 4], struct.unpack("<I", data[i + 4:i + 8])[0]
            end = i + 8 + size + (size & 1)
        if kind not in skip:
            parts.append(kind + data[i + 8:i + 8 + size])
        i = end
    return parts


def image_data_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a photo's image data: a JPEG's segments but APPn and COM (with the compressed scan), a PNG's
    or WebP's chunks but text/EXIF/XMP, a TIFF's decoded pixels (every page). Writing metadata leaves it as is.

    Args:
        path: a JPEG, PNG, WebP or TIFF file.

    Raises:
        ValueError: the file is none of these, or is damaged.
    """
    kind = image_kind(path)
    data = Path(path).read_bytes()
    h = hashlib.sha256()
    if kind == "jpeg":
        parts = _jpeg_parts(data)
    elif kind == "png":
        parts = _chunks(data, 8, "png", _PNG_METADATA)
    elif kind == "webp":
        parts = _chunks(data, 12, "riff", _WEBP_METADATA)
    elif kind == "tiff":
        from PIL import Image, ImageSequence

        with Image.open(path) as im:
            parts = [f"{p.mode} {p.size}".encode() + p.tobytes() for p in ImageSequence.Iterator(im)]
    else:
        raise ValueError(f"{Path(path).name} is not a JPEG, PNG, WebP or TIFF file")
    for part in parts:
        h.update(struct.pack(">Q", len(part)) + part)
    return h.hexdigest()
