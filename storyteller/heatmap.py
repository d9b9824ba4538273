"""Attention heat maps: where an attention decoder looked for each word, drawn over the photo.

    overlay(photo, weights (h, w), preprocessing) -> the photo with the weights as a heat map
    attention_figure(photo, words, maps, preprocessing) -> one picture: a small panel per word, the
                                                           word under it

The decoder only saw the backbone's centre crop (resize the short side to ``resize``, crop
``crop`` x ``crop``), so a map covers that square of the photo; the rest of the photo, which the
model never saw, is drawn dimmed. Photos keep their own aspect ratio. Only numpy and Pillow: the
app's runtime has no plotting library.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# A perceptual-ish ramp: transparent dark -> red -> yellow -> white, as (position, RGB).
_RAMP = np.array([[0.0, 0, 0, 0], [0.35, 180, 20, 20], [0.7, 255, 200, 0], [1.0, 255, 255, 230]], dtype=np.float32)


def crop_box(size: tuple[int, int], preprocessing: dict[str, Any]) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of a photo of ``size`` (w, h) that the backbone's centre crop saw."""
    w, h = size
    short = min(w, h)
    side = short * min(1.0, float(preprocessing["crop"]) / float(preprocessing["resize"]))
    left, top = (w - side) / 2, (h - side) / 2
    return round(left), round(top), round(left + side), round(top + side)


def _colour(weights: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) colours of the ramp."""
    out = np.empty((*weights.shape, 3), dtype=np.float32)
    for c in range(3):
        out[..., c] = np.interp(weights, _RAMP[:, 0], _RAMP[:, c + 1])
    return out


def overlay(photo: Image.Image, weights: torch.Tensor | np.ndarray, preprocessing: dict[str, Any],
            strength: float = 0.65) -> Image.Image:
    """The photo with attention ``weights`` (h, w) as a heat map over the part the model saw.

    Args:
        photo: the photo (any mode and size).
        weights: one word's attention over the grid, (h, w), non-negative.
        preprocessing: the backbone's preprocessing (``resize``, ``crop``) from the model's config.
        strength: how much of the heat map is blended in where attention peaks (0..1).
    """
    photo = photo.convert("RGB")
    w = np.asarray(weights, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weights must be (h, w), got shape {w.shape}")
    w = w / max(float(w.max()), 1e-12)  # each word's map scaled to its own peak
    box = crop_box(photo.size, preprocessing)
    bw, bh = max(1, box[2] - box[0]), max(1, box[3] - box[1])
    # bilinear upsampling of the grid to the crop, on cell centres (as the CNN's receptive fields are)
    big = np.asarray(Image.fromarray(w).resize((bw, bh), Image.BILINEAR), dtype=np.float32).clip(0, 1)
    base = np.asarray(photo, dtype=np.float32)
    out = base * 0.35  # outside the crop: dimmed, the model never saw it
    region = base[box[1]:box[1] + bh, box[0]:box[0] + bw]
    a = (strength * big)[..., None]
    lit = region * (0.45 + 0.55 * big[..., None])  # darken where the model did not look
    out[box[1]:box[1] + bh, box[0]:box[0] + bw] = lit * (1 - a) + _colour(big) * a
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def attention_figure(photo: Image.Image, words: Sequence[str], maps: torch.Tensor | np.ndarray,
                     preprocessing: dict[str, Any], panel_width: int = 200, columns: int = 5) -> Image.Image:
    """One picture with a panel per word: the photo (own aspect ratio) under that word's heat map,
    the word written below it.

    Args:
        photo: the photo.
        words: the caption's words.
        maps: (len(words), h, w) attention maps, one per word (``Caption.attention``).
        preprocessing: the backbone's preprocessing from the model's config.
        panel_width: width of each panel in pixels.
        columns: panels per row.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3 or len(maps) != len(words):
        raise ValueError(f"need one (h, w) map per word: {len(words)} words, maps of shape {maps.shape}")
    if not words:
        raise ValueError("no words to draw")
    photo = photo.convert("RGB")
    ph = max(1, round(panel_width * photo.height / photo.width))
    small = photo.resize((panel_width, ph), Image.BICUBIC)
    font = _font(max(12, panel_width // 11))
    label_h, pad = max(12, panel_width // 11) + 10, 6
    cols = max(1, min(columns, len(words)))
    rows = -(-len(words) // cols)
    sheet = Image.new("RGB", (cols * (panel_width + pad) + pad, rows * (ph + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (word, m) in enumerate(zip(words, maps)):
        x = pad + (i % cols) * (panel_width + pad)
        y = pad + (i // cols) * (ph + label_h + pad)
        sheet.paste(overlay(small, m, preprocessing), (x, y))
        tw = draw.textlength(word, font=font)
        draw.text((x + (panel_width - tw) / 2, y + ph + 3), word, fill="black", font=font)
    return sheet
