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

# The blend, at a word's attention peak: the ramp colour covers HEAT_BLEND of the pixel (enough to read the
# colour, the photo still shows through); where the model did not look the photo keeps LOOK_FLOOR of its
# brightness (dark, not black, so the scene stays readable); outside the centre crop, which the model never
# saw, OUTSIDE_CROP of it.
HEAT_BLEND = 0.65
LOOK_FLOOR = 0.45
OUTSIDE_CROP = 0.35
# A perceptual-ish ramp: transparent dark -> red -> yellow -> white, as (position, RGB).
_RAMP = np.array([[0.0, 0, 0, 0], [0.35, 180, 20, 20], [0.7, 255, 200, 0], [1.0, 255, 255, 230]], dtype=np.float32)


def crop_box(size: tuple[int, int], preprocessing: dict[str, Any]) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of a photo of ``size`` (w, h) that the backbone's centre crop saw:
    the short side is resized to ``resize`` and ``crop`` of it kept, so a square of ``crop / resize`` of the
    short side, centred."""
    w, h = size
    short = min(w, h)
    side = short * min(1.0, float(preprocessing["crop"]) / float(preprocessing["resize"]))
    left, top = (w - side) / 2, (h - side) / 2
    return round(left), round(top), round(left + side), round(top + side)


_LEVELS = np.linspace(0.0, 1.0, 256, dtype=np.float32)
# the ramp as a 256-entry table: colouring a map is one indexing, not an interpolation per pixel
_LUT = np.stack([np.interp(_LEVELS, _RAMP[:, 0], _RAMP[:, c + 1]) for c in range(3)], axis=1).astype(np.float32)


MAX_PANEL_ASPECT = 2.0  # a panel at most this many times as tall as wide: a tall, thin photo at its own aspect
# ratio would make panels tens of thousands of pixels tall


def fit_photo(photo: Image.Image, width: int) -> Image.Image:
    """``photo`` as RGB, shrunk (aspect ratio kept) to ``width`` pixels wide, or less where that would make it
    taller than MAX_PANEL_ASPECT x ``width``.

    Args:
        photo: any PIL image.
        width: the panel's width.
    """
    photo = photo.convert("RGB")
    scale = min(width / photo.width, MAX_PANEL_ASPECT * width / photo.height)
    return photo.resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))), Image.BICUBIC)


def blend_tables(strength: float = HEAT_BLEND) -> tuple[np.ndarray, np.ndarray]:
    """The blend per attention level b (256 steps): ``out = photo * scale[b] + tint[b]``.

    The photo is darkened where the model did not look, lit = photo * (LOOK_FLOOR + (1 - LOOK_FLOOR) b), and
    the ramp colour blended in with weight a = strength * b, so a map costs one multiply-add per pixel.

    Returns:
        scale (256, 1) and tint (256, 3), float32.
    """
    a = strength * _LEVELS
    scale = ((LOOK_FLOOR + (1 - LOOK_FLOOR) * _LEVELS) * (1 - a))[:, None].astype(np.float32)
    return scale, (_LUT * a[:, None]).astype(np.float32)


def upsample_map(weights: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One word's (h, w) map scaled to its own peak and bilinearly upsampled to ``size`` (w, h), on cell
    centres (as the CNN's receptive fields are): attention levels 0..255 as uint8."""
    w = np.asarray(weights, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weights must be (h, w), got shape {w.shape}")
    w = w / max(float(w.max()), 1e-12)  # each word's map scaled to its own peak
    big = np.asarray(Image.fromarray(w).resize(size, Image.BILINEAR), dtype=np.float32)
    return (big.clip(0, 1) * 255 + 0.5).astype(np.uint8)


class HeatLayer:
    """Heat maps as transparent layers (RGBA) to lay over a photo drawn once: composited "over" the photo they
    give :class:`PhotoOverlay`'s picture (``photo * scale + tint`` is ``photo * (1 - alpha) + colour * alpha``
    with ``alpha = 1 - scale`` and ``colour = tint / alpha``), so a page encodes the photo once and each word's
    map as a small layer the browser scales.

    Args:
        size: the photo's (w, h) at display size; the layer is drawn at ``width`` pixels wide, same aspect.
        preprocessing: the backbone's preprocessing (``resize``, ``crop``).
        width: the layer's width in pixels.
    """

    def __init__(self, size: tuple[int, int], preprocessing: dict[str, Any], width: int = 48,
                 strength: float = HEAT_BLEND):
        lw = max(1, min(width, size[0]))
        lh = max(1, round(size[1] * lw / size[0]))
        self.size = (lw, lh)
        self.box = crop_box(self.size, preprocessing)
        self.bw, self.bh = max(1, self.box[2] - self.box[0]), max(1, self.box[3] - self.box[1])
        scale, tint = blend_tables(strength)
        alpha = (1 - scale).clip(1e-6, 1)  # (256, 1)
        self.rgba = np.concatenate([(tint / alpha).clip(0, 255), alpha * 255], 1).round().astype(np.uint8)
        self.outside = np.array([0, 0, 0, round((1 - OUTSIDE_CROP) * 255)], dtype=np.uint8)  # the model never saw it

    def __call__(self, weights: torch.Tensor | np.ndarray) -> Image.Image:
        """The RGBA layer of one word's (h, w) map."""
        level = upsample_map(weights, (self.bw, self.bh))
        out = np.broadcast_to(self.outside, (self.size[1], self.size[0], 4)).copy()
        out[self.box[1]:self.box[1] + self.bh, self.box[0]:self.box[0] + self.bw] = self.rgba[level]
        return Image.fromarray(out, "RGBA")


def legend_colours(levels: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), grey: float = 128.0,
                   strength: float = HEAT_BLEND) -> list[tuple[int, int, int]]:
    """The colours a mid-grey photo takes at attention ``levels`` (0: not looked at, 1: the word's peak), for a
    legend drawn with the same blend as the maps."""
    scale, tint = blend_tables(strength)
    idx = [min(255, max(0, round(b * 255))) for b in levels]
    return [tuple(int(round(min(255.0, grey * float(scale[i, 0]) + float(t)))) for t in tint[i]) for i in idx]


class PhotoOverlay:
    """Draws any number of heat maps over one photo; the photo's arrays are prepared once.

    Args:
        photo: the photo (any mode and size).
        preprocessing: the backbone's preprocessing (``resize``, ``crop``) from the model's config.
        strength: how much of the heat map is blended in where attention peaks (0..1).
    """

    def __init__(self, photo: Image.Image, preprocessing: dict[str, Any], strength: float = HEAT_BLEND):
        base = np.asarray(photo.convert("RGB"), dtype=np.float32)
        self.box = crop_box((base.shape[1], base.shape[0]), preprocessing)
        self.bw, self.bh = max(1, self.box[2] - self.box[0]), max(1, self.box[3] - self.box[1])
        self.dimmed = base * OUTSIDE_CROP  # outside the crop: dimmed, the model never saw it
        self.region = base[self.box[1]:self.box[1] + self.bh, self.box[0]:self.box[0] + self.bw]
        self.scale, self.tint = blend_tables(strength)

    def __call__(self, weights: torch.Tensor | np.ndarray) -> Image.Image:
        """The photo with ``weights`` (h, w), one word's attention over the grid, as a heat map."""
        level = upsample_map(weights, (self.bw, self.bh))  # (bh, bw) in 0..255
        out = self.dimmed.copy()
        out[self.box[1]:self.box[1] + self.bh, self.box[0]:self.box[0] + self.bw] = (
            self.region * self.scale[level] + self.tint[level])
        return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def overlay(photo: Image.Image, weights: torch.Tensor | np.ndarray, preprocessing: dict[str, Any],
            strength: float = HEAT_BLEND) -> Image.Image:
    """The photo with attention ``weights`` (h, w) as a heat map over the part the model saw.

    Args:
        photo: the photo (any mode and size).
        weights: one word's attention over the grid, (h, w), non-negative.
        preprocessing: the backbone's preprocessing (``resize``, ``crop``) from the model's config.
        strength: how much of the heat map is blended in where attention peaks (0..1).
    """
    return PhotoOverlay(photo, preprocessing, strength)(weights)


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
    small = fit_photo(photo, panel_width)  # (panel_width or less, ph)
    ph = small.height
    font = _font(max(12, panel_width // 11))
    label_h, pad = max(12, panel_width // 11) + 10, 6
    cols = max(1, min(columns, len(words)))
    rows = -(-len(words) // cols)
    sheet = Image.new("RGB", (cols * (panel_width + pad) + pad, rows * (ph + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw_map = PhotoOverlay(small, preprocessing)
    for i, (word, m) in enumerate(zip(words, maps)):
        x = pad + (i % cols) * (panel_width + pad)
        y = pad + (i // cols) * (ph + label_h + pad)
        sheet.paste(draw_map(m), (x + (panel_width - small.width) // 2, y))
        tw = draw.textlength(word, font=font)
        draw.text((x + (panel_width - tw) / 2, y + ph + 3), word, fill="black", font=font)
    return sheet
