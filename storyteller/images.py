"""One safe image loader for the app, the CLI and training: anything a user may upload -> RGB PIL image.

    load_image("photo.jpg")            # a path, bytes, a binary file object or a PIL image
    -> PIL.Image.Image in mode "RGB", EXIF orientation applied

What it guarantees, so no caller has to think about it again:

- **Refuses, with** :class:`ImageError` **(a ValueError)**: files that are not images, truncated or
  corrupt files, files that cannot be read (missing, a folder, no permission, I/O error), empty
  input, files over ``max_bytes``, and images too large to decode safely. The pixel limit applies to
  what is *decoded*, read from the header before any pixel is: ``max_pixels`` for every format, and
  for JPEGs, which the decoder can shrink by 2, 4 or 8 while decoding, the header may say up to
  ``max_jpeg_pixels`` (200 MP phone photos) as long as the shrunk image fits under ``max_pixels``; a
  progressive JPEG, whose decoder holds all its coefficients, up to ``MAX_PROGRESSIVE_BUFFER`` of them.
- **Converts correctly**: CMYK; grayscale and 1-bit; palette images; transparency (RGBA, LA, PA,
  P or RGB/L with a transparent colour) is composited on white, not dropped to black; 16-bit
  (``I;16``) and 32-bit (``I``, ``F``) grayscale are *scaled* to 8 bits rather than clipped to
  white; animated images (GIF, APNG, WebP) give their first frame; EXIF orientation is applied.
- **Fast on big JPEGs** when asked: ``draft_size`` lets the JPEG decoder downscale by up to 8x
  while keeping both sides at least that large (a 4000x3000 upload decodes at 500x375 for a 224
  model input).

Messages are for the person who uploaded the photo: plain words, no library names.

Example::

    python -c "from storyteller.images import load_image; print(load_image('examples/1130369873_d80a1aa59c.jpg').size)"
"""
from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps
from PIL.JpegImagePlugin import JpegImageFile

__all__ = ["ImageError", "ImageSource", "load_image", "image_warnings", "MAX_PIXELS", "MAX_JPEG_PIXELS",
           "MAX_PROGRESSIVE_BUFFER", "MAX_BYTES", "MIN_SIDE", "MIN_CONTRAST"]

MAX_PIXELS = 50_000_000  # decoded: a 48 MP phone photo decodes whole; a 20000x20000 bomb (400 MP) is refused
# A JPEG's own size (its header): 200 MP phone modes (16320x12240) pass. The decoder shrinks it by 2/4/8 while
# decoding until it fits under MAX_PIXELS; a progressive JPEG still holds its DCT coefficients whole (about
# 3 bytes a pixel at 4:2:0), so this also bounds the memory one decode takes.
MAX_JPEG_PIXELS = 200_000_000
# A progressive JPEG's decoder holds all its DCT coefficients (2 bytes a sample) whatever the scale it decodes
# at: 300 MB is a 100 MP photo at 4:2:0 chroma, and keeps one decode with the captioner loaded under 1.5 GB.
# (Phones write baseline JPEGs, decoded row by row: they need no such buffer.)
MAX_PROGRESSIVE_BUFFER = 300_000_000
MAX_BYTES = 64 * 1024 * 1024  # 64 MiB of encoded file: a 200 MP phone JPEG is 30-60 MB
JPEG_SCALES = (1, 2, 4, 8)  # the shrink factors a JPEG decoder applies in the DCT (libjpeg's scaled decoding)
_ORIENTATION = 0x0112  # EXIF tag
# Degenerate photos are captioned with a warning rather than refused (the model always says
# something; the user should know it is a guess): a side under MIN_SIDE pixels, or a standard
# deviation of the pixel values under MIN_CONTRAST (0..255 scale) in every channel.
MIN_SIDE = 32
MIN_CONTRAST = 4.0

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]


class ImageError(ValueError):
    """The input is not an image we can caption; the message says why, in words for the user."""


def load_image(src: ImageSource, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES,
               draft_size: int | None = None, max_jpeg_pixels: int = MAX_JPEG_PIXELS) -> Image.Image:
    """Open (or take) an image and return it as an 8-bit RGB PIL image, upright.

    Args:
        src: a file path, the encoded bytes, a binary file object, or a PIL image (not modified).
        max_pixels: refuse to decode more pixels than this (checked from the header, before decoding).
        max_bytes: refuse encoded inputs larger than this.
        draft_size: for JPEGs, allow the decoder to shrink the image by 2/4/8x as long as both
            sides stay >= ``draft_size`` (None: full resolution, or as large as fits under ``max_pixels``).
        max_jpeg_pixels: the largest JPEG (header size) to decode at all; it is shrunk while decoding
            by the least of 2/4/8 that brings it under ``max_pixels``.

    Returns:
        a new ``PIL.Image.Image`` in mode ``"RGB"``.

    Raises:
        ImageError: not an image, unreadable, truncated/corrupt, too large, or an unsupported colour mode.
    """
    if isinstance(src, Image.Image):
        _check_size(src.size, max_pixels)
        img = src
    else:
        img = _open(_read_bytes(src, max_bytes), max_pixels, draft_size, max_jpeg_pixels)
    try:
        img = _upright(img)
        return _to_rgb(img, copy=img is src)
    except ImageError:
        raise
    except Exception as e:  # a corrupt file can fail in many plugin-specific ways
        raise ImageError("the image could not be decoded: the file is damaged or unusual") from None


def image_warnings(img: Image.Image) -> list[str]:
    """Why a caption of ``img`` would be a guess: too small, or nearly one flat colour (empty if neither).

    Args:
        img: a decoded image (e.g. from :func:`load_image`).

    Returns:
        sentences for the user, e.g. ``["The photo is only 1x1 pixels; ..."]``.
    """
    w, h = img.size
    notes = []
    if min(w, h) < MIN_SIDE:
        notes.append(f"The photo is only {w}x{h} pixels (under {MIN_SIDE} on a side): too small to show "
                     f"anything, so the caption is a guess.")
    small = img.convert("RGB")
    if max(w, h) > 128:
        small = small.resize((min(w, 128), min(h, 128)), Image.Resampling.BILINEAR)
    std = float(np.asarray(small, dtype=np.float32).reshape(-1, 3).std(axis=0).max())
    if std < MIN_CONTRAST:
        notes.append("The photo is nearly one flat colour, with nothing in it to describe, so the caption is a guess.")
    return notes


def _read_bytes(src, max_bytes: int) -> bytes:
    """The encoded bytes of a path / bytes / file object, refusing more than ``max_bytes``."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        try:  # an unreadable file (permissions, a name too long, an I/O error) is a bad input, not a crash
            if path.is_dir():
                raise ImageError(f"{path} is a folder, not an image file")
            if not path.is_file():
                raise ImageError(f"no such image file: {path}")
            size = path.stat().st_size
            if size > max_bytes:
                raise ImageError(f"{path.name} is {size / 2**20:.0f} MiB; the limit is {max_bytes / 2**20:.0f} MiB")
            data = path.read_bytes()
        except OSError as e:
            raise ImageError(f"cannot read {path}: {e.strerror or e}") from None
    elif hasattr(src, "read"):
        try:
            data = src.read(max_bytes + 1)
        except OSError as e:
            raise ImageError(f"cannot read the file: {e.strerror or e}") from None
        if isinstance(data, str):
            raise ImageError("the file object was opened in text mode; open images with 'rb'")
    else:
        raise ImageError(f"expected a path, bytes, a binary file or a PIL image, got {type(src).__name__}")
    if not data:
        raise ImageError("the image file is empty")
    if len(data) > max_bytes:
        raise ImageError(f"the image file is over the {max_bytes / 2**20:.0f} MiB limit")
    return data


def _too_big(w: int, h: int, max_pixels: int, max_jpeg_pixels: int | None) -> ImageError:
    jpeg = f" (JPEG photos up to {max_jpeg_pixels / 1e6:.0f})" if max_jpeg_pixels else ""
    return ImageError(f"the image is {w}x{h} pixels ({w * h / 1e6:.0f} megapixels): too large to open safely. "
                      f"Photos up to {max_pixels / 1e6:.0f} megapixels{jpeg} can be captioned.")


def _check_size(size: tuple[int, int], max_pixels: int, max_jpeg_pixels: int | None = None) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f"the image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise _too_big(w, h, max_pixels, max_jpeg_pixels)


def _jpeg_scale(size: tuple[int, int], max_pixels: int, draft_size: int | None) -> int | None:
    """The JPEG shrink factor to decode at: the least of ``JPEG_SCALES`` that fits ``max_pixels``, or more
    while both sides stay >= ``draft_size`` (as ``Image.draft`` picks); None when even 8x does not fit."""
    w, h = size
    fits = [s for s in JPEG_SCALES if -(-w // s) * -(-h // s) <= max_pixels]
    if not fits:
        return None
    wanted = max((s for s in JPEG_SCALES if draft_size and min(w, h) // draft_size >= s), default=1)
    return max(fits[0], wanted)


def _check_progressive(img: Image.Image) -> None:
    """Refuse a progressive JPEG whose whole-image coefficient buffer would exceed MAX_PROGRESSIVE_BUFFER."""
    if not (img.info.get("progressive") or img.info.get("progression")):
        return
    def blocks(side: int, sampling: int, most: int) -> int:  # 8x8 blocks of one component along one side
        return -(-(-(-side * sampling // most)) // 8)

    w, h = img.size
    layers = getattr(img, "layer", None) or [("", 1, 1, 0)] * 3  # (component, h sampling, v sampling, table)
    hmax, vmax = max(lay[1] for lay in layers) or 1, max(lay[2] for lay in layers) or 1
    need = sum(blocks(w, lay[1], hmax) * blocks(h, lay[2], vmax) * 64 * 2 for lay in layers)  # 64 coefficients of 2 bytes
    if need > MAX_PROGRESSIVE_BUFFER:
        raise ImageError(f"the image is a {w}x{h} progressive JPEG ({w * h / 1e6:.0f} megapixels): too large to open "
                         f"safely in that form. Save it as an ordinary JPEG (photos up to 200 megapixels can be "
                         f"captioned), or smaller.")


def _open(data: bytes, max_pixels: int, draft_size: int | None, max_jpeg_pixels: int) -> Image.Image:
    """Decode the first frame of ``data``, checking from the header what will be decoded before decoding it."""
    jpeg = data[:3] == b"\xff\xd8\xff"
    try:
        if jpeg:  # not Image.open: its own size check would refuse a 200 MP JPEG before the shrinking decode
            img: Image.Image = JpegImageFile(io.BytesIO(data))
        else:
            with warnings.catch_warnings():  # our own limit replaces the library's global one
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # over twice the library's global limit: refused before ours
        found = re.search(r"\((\d+) pixels\)", str(e))  # the reader's message gives the real size
        size = (f"{int(found.group(1)) / 1e6:.0f} megapixels" if found else
                f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} megapixels")
        raise ImageError(f"the image has {size}: too large to open safely. Photos up to {max_pixels / 1e6:.0f} "
                         f"megapixels (JPEG photos up to {max_jpeg_pixels / 1e6:.0f}) can be captioned.") from None
    except Exception:  # not an image, or a header so broken the reader chokes on it
        raise ImageError("the file is not an image, or is in a format that cannot be read here (try a JPEG or PNG)") from None
    if jpeg:
        _check_size(img.size, max_jpeg_pixels)
        _check_progressive(img)
        scale = _jpeg_scale(img.size, max_pixels, draft_size)
        if scale is None:
            raise _too_big(*img.size, max_pixels, max_jpeg_pixels)
        if scale > 1:
            img.draft(None, (max(1, img.width // scale), max(1, img.height // scale)))
    _check_size(img.size, max_pixels, max_jpeg_pixels)  # what will be decoded
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animated: caption the first frame
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Exception:  # "image file is truncated", broken Huffman data, ...
        raise ImageError("the image file is truncated or corrupt: try another copy of it") from None
    return img


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; an unreadable EXIF block leaves the image as stored."""
    try:
        if img.getexif().get(_ORIENTATION, 1) in (1, None):
            return img
        return ImageOps.exif_transpose(img)
    except Exception:
        return img


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _to_rgb(img: Image.Image, copy: bool) -> Image.Image:
    """Any Pillow mode -> RGB; ``copy`` forces a new image when the input is already RGB."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_gray_to_uint8(img), mode="L").convert("RGB")
    if _has_alpha(img):
        with warnings.catch_warnings():  # "Palette images with Transparency expressed in bytes ..."
            warnings.simplefilter("ignore", UserWarning)
            rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode == "RGB":
        return img.copy() if copy else img
    try:
        return img.convert("RGB")  # L, 1, P, CMYK (Adobe-inverted CMYK JPEGs are handled by Pillow), YCbCr, HSV
    except ValueError:
        raise ImageError(f"the image uses a colour format that cannot be read here ({mode})") from None


def _gray_to_uint8(img: Image.Image) -> np.ndarray:
    """16/32-bit integer or float grayscale -> uint8, scaled (never clipped to white).

    ``I;16`` uses the full 16-bit range (65535 -> 255). Mode ``I`` (32-bit) and ``F`` (float) carry
    no range, so: values already in 0..255 (``I``) or 0..1 (``F``) keep that meaning, values within
    0..65535 are read as 16-bit, anything else is stretched from its min to its max.
    """
    a = np.asarray(img).astype(np.float64)
    if not np.isfinite(a).all():
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        scaled = a / 257.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        scaled = a * 255.0
    elif lo >= 0 and hi <= 255:
        scaled = a
    elif lo >= 0 and hi <= 65535:
        scaled = a / 257.0
    else:
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
