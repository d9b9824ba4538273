"""End to end on CPU: render a captioned dataset, then extract -> fit -> evaluate through ``python -m train``.

The photos are PIL-drawn scenes: one shape (circle, square, triangle) in one colour (red, green,
blue, yellow) on a white or black background, at a random size and offset. Every caption names all
three attributes, in three phrasings. Pooled ImageNet features of the real EfficientNet-Lite0
weights separate colour, shape and background, so only a working pipeline (features that mean
something, captions aligned with the right features, a decoder that learns and decodes) scores
well on the held-out split, while the best constant caption cannot: each of its 4-grams fits at
most half of the images.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from storyteller.metrics import evaluate_captions
from storyteller.decoders import ShowAndTell
from train.__main__ import main as train_main

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 210, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}


def render(colour: str, shape: str, background: str, rng: random.Random, size: int = 160) -> Image.Image:
    """One shape, jittered in size, position and tint, on a plain background."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    r = rng.uniform(0.22, 0.32) * size
    cx, cy = (size / 2 + rng.uniform(-0.1, 0.1) * size for _ in range(2))
    fill = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLOURS[colour])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - 0.9 * r, cy - 0.9 * r, cx + 0.9 * r, cy + 0.9 * r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    return image


def captions_for(colour: str, shape: str, background: str) -> list[str]:
    return [f"a {colour} {shape} on a {background} background", f"a {colour} {shape} on {background}",
            f"a {background} picture with a {colour} {shape}"]


def make_shapes_dataset(root: Path, per_scene: dict[str, int], seed: int = 0) -> Path:
    """An imagefolder ``root/{split}/`` of JPEGs + metadata.jsonl, ``per_scene[split]`` images per scene.

    Args:
        root: output folder.
        per_scene: images per (colour, shape, background) scene for each split (24 scenes).
        seed: drives the jitter.
    """
    rng = random.Random(seed)
    for split, n in per_scene.items():
        folder = root / split
        folder.mkdir(parents=True)
        lines = []
        for colour in COLOURS:
            for shape in SHAPES:
                for background in BACKGROUNDS:
                    for _ in range(n):
                        name = f"{split}_{len(lines):04d}.jpg"  # neutral names: nothing to learn from them
                        render(colour, shape, background, rng).save(folder / name, quality=90)
                        lines.append(json.dumps({"file_name": name, "captions": captions_for(colour, shape, background)}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def best_constant_bleu4(train_dir: Path, references: list[list[str]]) -> tuple[float, str]:
    """The best BLEU-4 that one caption from the training set, given for every image, reaches."""
    candidates = sorted({c for line in (train_dir / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
                         for c in json.loads(line)["captions"]})
    return max((evaluate_captions([c] * len(references), references)["bleu4"], c) for c in candidates)


def test_extract_fit_evaluate_learns_held_out_scenes(tmp_path):
    data = make_shapes_dataset(tmp_path / "shapes", {"train": 8, "validation": 2})
    threads = torch.get_num_threads()
    try:  # one thread: on a shared 2-core machine this is faster than two fighting for the cores
        train_main(["extract", "--dataset", str(data), "--backbone", "efficientnet_lite0", "--out", str(tmp_path / "feats"),
                    "--workers", "0", "--threads", "1", "--quiet"])
        train_main(["fit", "--features", str(tmp_path / "feats"), "--out", str(tmp_path / "run"), "--epochs", "12",
                    "--batch-size", "32", "--embed-dim", "64", "--hidden-dim", "128", "--min-freq", "1", "--lr", "3e-3",
                    "--dropout", "0.2", "--num-threads", "1", "--progress", "off"])
        # live features this time: the model's own backbone spec must reproduce what extract cached
        train_main(["evaluate", "--model", str(tmp_path / "run" / "model"), "--dataset", str(data), "--split", "validation",
                    "--beam", "1", "3", "--out", str(tmp_path / "eval.json"), "--report", str(tmp_path / "eval.md"),
                    "--examples", "3"])
    finally:
        torch.set_num_threads(threads)

    result = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    assert result["num_images"] == 48 and result["features"] is None
    refs = [json.loads(line)["captions"] for line in (data / "validation" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    baseline, constant = best_constant_bleu4(data / "train", refs)
    assert 0.2 < baseline < 0.7, (baseline, constant)  # sanity of the task: the constant gets half-way at best
    for method in ("greedy", "beam3"):
        bleu4 = result["methods"][method]["bleu4"]
        assert bleu4 > baseline + 0.3 and bleu4 > 0.8, (method, bleu4, baseline, constant)
    assert result["methods"]["greedy"]["vocab_used"] >= 12  # it names many colours / shapes, not one

    model = ShowAndTell.from_pretrained(tmp_path / "run" / "model")
    assert model.backbone["name"] == "efficientnet_lite0" and model.backbone["weights"] is not None
    assert model.extra["metrics"]["bleu4"] > baseline  # training's own validation agrees
    report = (tmp_path / "eval.md").read_text(encoding="utf-8")
    assert report.count("### `validation_") == 3 and "| beam 3 |" in report

    # the recipe's last steps: bundle with recommended decoding, then evaluate what ships with no decoding flags
    train_main(["bundle", "--model", str(tmp_path / "run" / "model"), "--out", str(tmp_path / "bundle"),
                "--beam", "3", "--alpha", "0.5", "--no-repeat-ngram-size", "3", "--max-len", "16"])
    train_main(["evaluate", "--model", str(tmp_path / "bundle"), "--features", str(tmp_path / "feats"),
                "--split", "validation", "--out", str(tmp_path / "bundle_eval.json"), "--write-to-model"])
    shipped = json.loads((tmp_path / "bundle_eval.json").read_text(encoding="utf-8"))
    assert list(shipped["methods"]) == ["greedy", "beam3"]
    assert (shipped["alpha"], shipped["no_repeat_ngram_size"], shipped["max_len"]) == (0.5, 3, 16)
    card = (tmp_path / "bundle" / "README.md").read_text(encoding="utf-8")
    assert "max 16 words, length-normalisation alpha 0.5, no repeated 3-grams" in card


SPOTS = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7)}


def make_placed_shapes_dataset(root: Path, per_scene: dict[str, int], seed: int = 0) -> dict[str, tuple]:
    """Like ``make_shapes_dataset``, with each smaller shape in one of four places (the captions do not
    say where). Returns ``{file name: (shape, (cx, cy, r))}`` in pixels of the 160-px photo."""
    rng = random.Random(seed)
    boxes = {}
    for split, n in per_scene.items():
        (root / split).mkdir(parents=True)
        lines = []
        for colour in COLOURS:
            for shape in SHAPES:
                for background in BACKGROUNDS:
                    for fx, fy in SPOTS.values():
                        for _ in range(n):
                            name = f"{split}_{len(lines):04d}.jpg"
                            image = Image.new("RGB", (160, 160), BACKGROUNDS[background])
                            draw = ImageDraw.Draw(image)
                            cx, cy, r = fx * 160 + rng.uniform(-4, 4), fy * 160 + rng.uniform(-4, 4), 0.14 * 160
                            if shape == "circle":
                                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[colour])
                            elif shape == "square":
                                draw.rectangle([cx - 0.9 * r, cy - 0.9 * r, cx + 0.9 * r, cy + 0.9 * r], fill=COLOURS[colour])
                            else:
                                draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=COLOURS[colour])
                            image.save(root / split / name, quality=90)
                            boxes[name] = (shape, (cx, cy, r))
                            lines.append(json.dumps({"file_name": name, "captions": captions_for(colour, shape, background)}))
        (root / split / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return boxes


def shape_cells(box: tuple, size: int = 160) -> torch.Tensor:
    """(7, 7) mask of the Lite0 grid cells a shape's square box overlaps: the photo is resized to 256 and
    centre-cropped to 224 (16 px off each side), and each cell covers 32 x 32 of the crop."""
    cx, cy, r = box
    x0, x1, y0, y1 = ((v * 256 / size - 16) / 32 for v in (cx - r, cx + r, cy - r, cy + r))
    cols = (torch.arange(7) + 1 > x0) & (torch.arange(7) < x1)
    rows = (torch.arange(7) + 1 > y0) & (torch.arange(7) < y1)
    return (rows[:, None] & cols[None, :]).float()


def test_attention_extract_grid_fit_evaluate_learns_held_out_scenes_and_where_the_shape_is(tmp_path):
    """Rendered scenes with the shape in one of four places, through the attention path: extract --grid ->
    fit --decoder attention -> evaluate on live grids -> bundle -> the captioner's per-word maps. The map
    of the shape's word must fall on the shape's grid cells far above chance: a model that ignores where
    things are (uniform maps) scores 1x chance."""
    from storyteller.captioner import load

    data = tmp_path / "shapes"
    boxes = make_placed_shapes_dataset(data, {"train": 3, "validation": 1})
    threads = torch.get_num_threads()
    try:
        train_main(["extract", "--dataset", str(data), "--backbone", "efficientnet_lite0", "--grid",
                    "--out", str(tmp_path / "feats"), "--workers", "0", "--threads", "1", "--quiet"])
        train_main(["fit", "--features", str(tmp_path / "feats"), "--out", str(tmp_path / "run"), "--decoder", "attention",
                    "--epochs", "10", "--batch-size", "32", "--embed-dim", "64", "--hidden-dim", "128",
                    "--attention-dim", "64", "--min-freq", "1", "--lr", "3e-3", "--dropout", "0.2", "--num-threads", "1",
                    "--progress", "off"])
        train_main(["evaluate", "--model", str(tmp_path / "run" / "model"), "--dataset", str(data), "--split", "validation",
                    "--beam", "1", "3", "--out", str(tmp_path / "eval.json"), "--examples", "0"])
        train_main(["bundle", "--model", str(tmp_path / "run" / "model"), "--out", str(tmp_path / "bundle"),
                    "--beam", "3", "--alpha", "0.5"])
    finally:
        torch.set_num_threads(threads)

    result = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    assert result["num_images"] == 96 and result["features"] is None  # live grids from the photos
    refs = [json.loads(line)["captions"] for line in (data / "validation" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    baseline, constant = best_constant_bleu4(data / "train", refs)
    for method in ("greedy", "beam3"):
        bleu4 = result["methods"][method]["bleu4"]
        assert bleu4 > baseline + 0.3 and bleu4 > 0.8, (method, bleu4, baseline, constant)

    captioner = load(tmp_path / "bundle", precision="fp32")
    assert captioner.has_attention and captioner.info["decoder"] == "show_attend_tell"
    names = sorted(n for n in boxes if n.startswith("validation"))
    results = captioner.caption([data / "validation" / n for n in names], greedy=False)
    ratios, masses = [], []
    for name, r in zip(names, results):
        best = r.beam[0]
        assert best.attention.shape == (len(best.tokens), 7, 7)
        assert torch.allclose(best.attention.flatten(1).sum(1), torch.ones(len(best.tokens)), atol=1e-4)
        shape, box = boxes[name]
        words = best.text.split()
        if shape in words:
            cells = shape_cells(box)
            mass = float((best.attention[words.index(shape)] * cells).sum())
            masses.append(mass)
            ratios.append(mass / float(cells.mean()))  # uniform attention: mass = share of cells
    assert len(ratios) >= 0.8 * len(names)  # it names the right shape
    mean_ratio, mean_mass = sum(ratios) / len(ratios), sum(masses) / len(masses)
    assert mean_ratio > 2.0 and mean_mass > 0.5, (mean_ratio, mean_mass)  # measured: 2.7x chance, 0.68 of the mass

    photo = captioner.load_image(data / "validation" / names[0])
    best = results[0].beam[0]
    figure = captioner.attention_figure(photo, best, panel_width=80, columns=4)
    rows = -(-len(best.tokens) // 4)  # one panel per word, 4 to a row
    assert figure.width >= 4 * 80 and figure.height >= rows * 80 * photo.height / photo.width
