"""Awkward and hostile image files for the loader, CLI, app and browser tests, generated on the fly.

    write_bad_inputs(tmp_path) -> {name: Path}     # files the loader must refuse with ImageError
    write_odd_inputs(tmp_path) -> {name: Path}     # legal but unusual files it must convert correctly
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220)}


def colour_imagefolder(data: Path, per_split: dict[str, int]) -> Path:
    """A tiny imagefolder of flat-colour PNGs: ``per_split[split]`` photos of each colour, captioned
    "a <colour> picture" / "all <colour>"."""
    import json

    for split, n in per_split.items():
        (data / split).mkdir(parents=True)
        lines = []
        for colour, rgb in COLOURS.items():
            for _ in range(n):
                name = f"{split}{len(lines)}.png"
                Image.new("RGB", (64, 48), rgb).save(data / split / name)
                lines.append(json.dumps({"file_name": name, "captions": [f"a {colour} picture", f"all {colour}"]}))
        (data / split / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data


def photo_like(size: tuple[int, int] = (320, 240), seed: int = 0) -> Image.Image:
    """A noisy RGB image (JPEG-compresses like a photo, unlike a flat colour)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.stack(np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h)), -1).mean(-1)
    arr = np.clip(base[..., None] + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int = 20000) -> bytes:
    """A genuine decompression bomb: a valid 1-bit ``side`` x ``side`` PNG of zeros (~50 KB on disk)."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def write_bad_inputs(folder: Path) -> dict[str, Path]:
    """Files that must be refused with a clear message: name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    full = jpeg_bytes(photo_like((320, 240)))
    files = {
        "not_an_image.jpg": b"this is a text file pretending to be a JPEG\n" * 20,
        "empty.png": b"",
        "truncated.jpg": full[: len(full) // 2],
        "bomb_20000x20000.png": png_bomb(20000),
    }
    out = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        out[name] = folder / name
    return out


def write_odd_inputs(folder: Path) -> dict[str, Path]:
    """Legal images in awkward modes, each with a known expected look: name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        img.save(folder / name, **kw)
        out[name] = folder / name

    red = Image.new("RGB", (64, 48), (200, 30, 30))
    save("cmyk.jpg", red.convert("CMYK"), quality=95)
    rgba = Image.new("RGBA", (64, 48), (0, 0, 0, 0))  # transparent black: must come out white
    rgba.paste((0, 0, 255, 255), (0, 0, 32, 48))  # left half opaque blue
    save("rgba.png", rgba)
    grad16 = np.tile(np.linspace(0, 65535, 64), (48, 1)).astype(np.uint16)  # left black .. right white
    save("gray16.png", Image.fromarray(grad16))
    save("gray.png", Image.fromarray(np.tile(np.linspace(0, 255, 64), (48, 1)).astype(np.uint8), "L"))
    frames = [Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out["animated.gif"] = folder / "animated.gif"
    return out
