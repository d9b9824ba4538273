"""storyteller.heatmap: the box a heat map covers is the part of the photo the backbone's centre crop saw
(checked against the real preprocessing), the blend's named levels, and the per-word figure."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from storyteller.backbones import backbone_spec, build_transform
from storyteller.heatmap import HEAT_BLEND, LOOK_FLOOR, OUTSIDE_CROP, PhotoOverlay, attention_figure, crop_box

LITE0 = backbone_spec("efficientnet_lite0")["preprocessing"]  # resize 256, crop 224
RESNET = backbone_spec("resnet50")["preprocessing"]  # resize 232, crop 224: another ratio


def test_crop_box_is_the_centre_square_of_crop_over_resize_of_the_short_side():
    # 300 px short side: 300 * 224 / 256 = 262.5 px seen, centred in 400 x 300
    assert crop_box((400, 300), LITE0) == (69, 19, 331, 281)
    assert crop_box((300, 400), LITE0) == (19, 69, 281, 331)
    assert crop_box((256, 256), {"resize": 256, "crop": 256}) == (0, 0, 256, 256)


@pytest.mark.parametrize("preprocessing", [LITE0, RESNET], ids=["lite0", "resnet50"])
@pytest.mark.parametrize("size", [(640, 480), (333, 500), (1000, 250)])
def test_crop_box_matches_what_the_backbones_transform_keeps(preprocessing, size):
    """A photo whose red channel is its x coordinate and green its y: the transform's first and last
    kept columns and rows say where its crop began and ended."""
    w, h = size
    xs = np.broadcast_to(np.linspace(0, 255, w, dtype=np.float32)[None, :], (h, w))
    ys = np.broadcast_to(np.linspace(0, 255, h, dtype=np.float32)[:, None], (h, w))
    photo = Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).round().astype(np.uint8), "RGB")
    pixels = build_transform({**preprocessing, "mean": [0, 0, 0], "std": [1, 1, 1]})(photo)  # (3, crop, crop) in 0..1
    left, top, right, bottom = crop_box(size, preprocessing)
    red, green = pixels[0] * 255, pixels[1] * 255
    # the first and last kept columns (rows) are centred half a resized pixel inside the crop's edges
    half = 0.5 * min(w, h) / preprocessing["resize"]
    seen = {"left": float(red[:, 0].mean()) / 255 * (w - 1) - half, "right": float(red[:, -1].mean()) / 255 * (w - 1) + half,
            "top": float(green[0].mean()) / 255 * (h - 1) - half, "bottom": float(green[-1].mean()) / 255 * (h - 1) + half}
    tol = 1.5 + max(w, h) / 255  # rounding the box, and the ramp's 8-bit steps
    for name, want in zip(("left", "top", "right", "bottom"), (left, top, right, bottom)):
        assert abs(seen[name] - want) <= tol, (name, seen[name], want)


def test_overlay_dims_outside_the_crop_and_lights_where_the_model_looked():
    grey = Image.new("RGB", (400, 300), (200, 200, 200))
    draw = PhotoOverlay(grey, LITE0)
    weights = np.zeros((7, 7), dtype=np.float32)
    weights[3, 3] = 1.0  # looked at the centre only
    out = np.asarray(draw(torch.from_numpy(weights)), dtype=np.float32)
    assert out.shape == (300, 400, 3)
    assert np.allclose(out[150, 10], 200 * OUTSIDE_CROP, atol=1)  # left of the crop: never seen
    left, top, right, bottom = crop_box((400, 300), LITE0)
    corner = out[top + 2, left + 2]  # inside the crop, where the model did not look
    assert np.allclose(corner, 200 * LOOK_FLOOR, atol=2)
    centre = out[150, 200]  # the peak: the photo darkened by the blend, plus the ramp's brightest colour
    assert centre.max() > corner.max() and centre[2] < centre[0]  # warm, not grey
    assert 0 < HEAT_BLEND < 1


def test_attention_figure_has_a_panel_per_word():
    photo = Image.new("RGB", (320, 240), (90, 120, 150))
    maps = torch.rand(5, 7, 7)
    sheet = attention_figure(photo, ["a", "dog", "runs", "on", "grass"], maps, LITE0, panel_width=100, columns=3)
    assert sheet.width == 3 * (100 + 6) + 6 and sheet.height > 2 * 75  # 3 columns, 2 rows of 4:3 panels
    with pytest.raises(ValueError, match="one \\(h, w\\) map per word"):
        attention_figure(photo, ["a", "dog"], maps, LITE0)


def test_a_tall_thin_photo_makes_small_panels():
    """A 6x2600 photo at its own aspect ratio made 200x86,667-pixel panels (and 256x110,933 tiles in the app,
    more than JPEG can hold): panels are at most MAX_PANEL_ASPECT times as tall as wide."""
    from PIL import Image

    from storyteller.heatmap import MAX_PANEL_ASPECT, attention_figure, fit_photo

    thin = Image.new("RGB", (6, 2600), (100, 50, 20))
    small = fit_photo(thin, 256)
    assert small.height <= MAX_PANEL_ASPECT * 256 and small.width >= 1
    assert fit_photo(Image.new("RGB", (640, 480)), 256).size == (256, 192)  # ordinary photos: full width, own ratio
    spec = {"resize": 256, "crop": 224, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    fig = attention_figure(thin, ["a", "b"], np.full((2, 7, 7), 1 / 49, dtype=np.float32), spec, panel_width=200)
    assert fig.height < 3 * 200 * MAX_PANEL_ASPECT
