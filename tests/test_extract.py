"""python -m train extract: cached features equal the app's live features (through Captioner); interrupt +
resume; refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from storyteller.backbones import backbone_spec, create_backbone
from storyteller.captioner import load
from train.data import open_captioned_images
from storyteller.decoding import greedy_search
from train.features import FeatureCache, FeatureCacheError
from tests.helpers_models import save_test_model
from train import __main__ as train_main
from train.extract import extract, main

REPO = Path(__file__).resolve().parents[1]
TINY = {"resize": 36, "crop": 32, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}


def make_photos(root: Path, n: int, splits=("train", "validation")) -> Path:
    """n JPEGs per split with different sizes/aspect ratios and content, imagefolder layout."""
    rng = np.random.default_rng(0)
    for split in splits:
        (root / split).mkdir(parents=True)
        with open(root / split / "metadata.jsonl", "w") as f:
            for i in range(n):
                h, w = int(rng.integers(40, 120)), int(rng.integers(40, 120))
                yy, xx = np.mgrid[0:h, 0:w]
                pixels = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy + 40 * i) % 256], -1).astype(np.uint8)
                pixels = np.clip(pixels + rng.integers(0, 30, pixels.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"{split}{i}.jpg", quality=92)
                f.write(json.dumps({"file_name": f"{split}{i}.jpg", "captions": [f"photo {i} of {split}"]}) + "\n")
    return root


def write_app_inputs(folder: Path) -> list[str]:
    """Real-photo inputs the app must handle, in imagefolder layout: a JPEG over twice the backbone's
    resize size (so the app decodes it in JPEG draft mode), a plain 500 px JPEG and an RGBA PNG with
    transparent pixels (composited on white)."""
    folder.mkdir(parents=True)
    photo = Image.open(REPO / "examples" / "1130369873_d80a1aa59c.jpg").convert("RGB")  # 500x333
    photo.resize((photo.width * 2, photo.height * 2), Image.LANCZOS).save(folder / "big.jpg", quality=92)
    photo.save(folder / "small.jpg", quality=92)
    rgba = np.asarray(photo.rotate(90, expand=True).convert("RGBA")).copy()
    rgba[:, : rgba.shape[1] // 3, 3] = 0  # a transparent band whose hidden pixels are the photo's
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    names = ["big.jpg", "small.jpg", "rgba.png"]
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"file_name": n, "captions": [f"a photo {n}"]}) + "\n" for n in names)
    return names


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_cached_features_equal_the_apps_live_features(tmp_path):
    """A cache row holds the feature the app computes for the same file: the app's path is a Captioner
    loaded from a model whose config.json names the lite0 spec, captioning the file on disk.

    The one designed difference: the app decodes JPEGs over twice the resize size in JPEG draft mode
    (2/4/8x smaller, in the DCT), the cache decodes in full. Measured with lite0 on 10 Flickr8k photos
    upscaled 2x, 4x and 8x: cosine 0.9969-0.9994 (mean 0.998) to the full decode, where merely re-saving
    the same photos at JPEG quality 75 instead of 92 gives 0.96 on average; this photo at 2x gives
    about 0.998. So that image is held to cosine > 0.995 here, and to float16 rounding with draft off.
    """
    names = write_app_inputs(tmp_path / "photos" / "train")
    images = open_captioned_images(tmp_path / "photos")
    extract(images, create_backbone("efficientnet_lite0"), tmp_path / "cache", batch_size=2, workers=1,
            chunk_size=2, progress=False)
    cache = FeatureCache.open(tmp_path / "cache", expect_backbone="efficientnet_lite0")
    assert cache.ids == names
    app = load(save_test_model(tmp_path / "model"))  # the backbone is rebuilt from config.json, as the app does
    files = [tmp_path / "photos" / "train" / n for n in names]
    assert app.load_image(files[0]).size == (500, 333) and Image.open(files[0]).size == (1000, 666)  # drafted

    live = app.features(files).numpy()  # what caption() feeds the decoder
    cached = cache.features[:].astype(np.float32)
    assert cosine(cached[0], live[0]) > 0.995  # big.jpg: draft-decoded by the app
    np.testing.assert_allclose(cached[1:], live[1:], rtol=2e-3, atol=2e-3)  # small.jpg, rgba.png: same pixels
    np.testing.assert_allclose(cached, app.features(files, draft_size=0).numpy(), rtol=2e-3, atol=2e-3)
    assert cosine(cached[1], cached[2]) < 0.9  # a mixed-up row would fail above

    greedy = app.caption(files, beam=False, max_len=8)
    assert [r.greedy.text for r in greedy] == [c.text for c in greedy_search(app.model, torch.from_numpy(live), max_len=8)]


def test_interrupted_run_resumes_and_equals_uninterrupted(tmp_path):
    root = make_photos(tmp_path / "photos", 5)  # 10 images -> chunks of 3: 3 + 3 + 3 + 1
    images = open_captioned_images(root)
    spec = {**backbone_spec("resnet50"), "preprocessing": TINY}
    backbone = create_backbone(spec, pretrained=False)

    first = extract(images, backbone, tmp_path / "cut", batch_size=3, workers=0, chunk_size=3,
                    stop_after_chunks=2, progress=False)
    assert first.cache is None and first.chunks_computed == 2
    with pytest.raises(FeatureCacheError, match="not a finished feature cache"):
        FeatureCache.open(tmp_path / "cut")
    again = extract(images, create_backbone(spec, pretrained=False), tmp_path / "cut", batch_size=3, workers=0,
                    chunk_size=3, progress=False)
    assert (again.chunks_resumed, again.chunks_computed, again.images_computed) == (2, 2, 4)

    whole = extract(images, backbone, tmp_path / "whole", batch_size=3, workers=0, chunk_size=3, progress=False)
    assert whole.chunks_computed == 4
    a, b = FeatureCache.open(tmp_path / "cut"), FeatureCache.open(tmp_path / "whole")
    np.testing.assert_array_equal(a.features, b.features)
    assert (a.ids, a.splits, a.captions) == (b.ids, b.splits, b.captions)
    assert a.manifest["backbone"] == b.manifest["backbone"] and a.manifest["backbone"]["weights"] is None


def test_resume_refuses_changed_data(tmp_path):
    root = make_photos(tmp_path / "photos", 3)
    spec = {**backbone_spec("resnet50"), "preprocessing": TINY}
    extract(open_captioned_images(root), create_backbone(spec, pretrained=False), tmp_path / "c", batch_size=2,
            workers=0, chunk_size=2, stop_after_chunks=1, progress=False)
    (root / "train" / "metadata.jsonl").write_text("".join(reversed((root / "train" / "metadata.jsonl").read_text().splitlines(True))))
    with pytest.raises(FeatureCacheError, match="other images"):
        extract(open_captioned_images(root), create_backbone(spec, pretrained=False), tmp_path / "c", batch_size=2,
                workers=0, chunk_size=2, progress=False)


def test_cli_stop_resume_refuse_mix(tmp_path, capsys):
    root = make_photos(tmp_path / "photos", 3)
    out = tmp_path / "feats"
    args = ["--dataset", str(root), "--backbone", "efficientnet_lite0", "--random-weights", "--out", str(out),
            "--batch-size", "2", "--chunk-size", "2", "--workers", "0", "--quiet"]
    train_main.main(["extract", *args, "--stop-after-chunks", "1"])  # through the `python -m train` dispatcher
    assert "rerun to resume" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="different settings.*differs in: dataset"):
        main([*args, "--limit", "2"])
    with pytest.raises(SystemExit, match="different settings.*differs in: backbone"):
        main([*args[:3], "resnet50", *args[4:]])
    result = main(args)
    assert result.chunks_resumed == 1 and result.chunks_computed == 2 and len(result.cache) == 6
    assert main(args) is None and "already holds this finished cache" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="another backbone or dataset.*--overwrite"):
        main([*args, "--splits", "train"])
    result = main([*args, "--splits", "train", "--overwrite"])
    assert FeatureCache.open(out).split_names() == ["train"] and result.chunks_computed == 2


def test_dispatcher_reports_unknown_and_missing_commands(monkeypatch):
    with pytest.raises(SystemExit, match="unknown command 'fitt'"):
        train_main.main(["fitt"])
    monkeypatch.setitem(train_main.COMMANDS, "nosuch", "test")
    with pytest.raises(SystemExit, match="train/nosuch.py is missing"):
        train_main.main(["nosuch"])


def test_flip_extracts_the_mirrored_photos_into_a_cache_of_their_own(tmp_path, capsys):
    """--flip: every row is the backbone's features of its photo mirrored left to right (grids too), the same
    ids and captions, and the manifest says so; a plain cache in that folder is never taken for it."""
    from PIL import ImageOps

    root = make_photos(tmp_path / "photos", 2)
    args = ["--dataset", str(root), "--backbone", "efficientnet_lite0", "--random-weights", "--grid", "--batch-size", "2",
            "--workers", "0", "--quiet"]
    main([*args, "--out", str(tmp_path / "plain")])
    main([*args, "--flip", "--out", str(tmp_path / "flip")])
    plain, flip = FeatureCache.open(tmp_path / "plain"), FeatureCache.open(tmp_path / "flip")
    assert flip.manifest["dataset"]["mirrored"] is True and "mirrored" not in plain.manifest["dataset"]
    assert (flip.ids, flip.splits, flip.captions) == (plain.ids, plain.splits, plain.captions)
    backbone = create_backbone("efficientnet_lite0", pretrained=False)
    images = open_captioned_images(root)
    with torch.inference_mode():
        pixels = torch.stack([backbone.transform(ImageOps.mirror(images.load_image(i))) for i in range(len(images))])
        feats, grids = backbone.forward_grid(pixels)
    np.testing.assert_allclose(flip.features, feats.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(np.asarray(flip.grid, np.float32), grids.numpy(), rtol=2e-2, atol=2e-2)
    assert not np.allclose(flip.features, plain.features, atol=1e-2)  # the photos are not symmetric
    with pytest.raises(SystemExit, match="another backbone or dataset"):  # the plain cache's folder: not resumed as it
        main([*args, "--flip", "--out", str(tmp_path / "plain")])
