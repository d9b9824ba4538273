"""python -m train extract: cached features equal the app's live features; interrupt + resume; refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storyteller.backbones import backbone_spec, create_backbone
from storyteller.data import open_captioned_images
from storyteller.features import FeatureCache, FeatureCacheError
from train import __main__ as train_main
from train.extract import extract, main

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


def test_cached_features_equal_live_encode(tmp_path):
    """The app's path (Backbone.encode on a PIL image) gives the feature the decoder was trained on."""
    root = make_photos(tmp_path / "photos", 2)
    images = open_captioned_images(root)
    backbone = create_backbone("efficientnet_lite0")
    result = extract(images, backbone, tmp_path / "cache", batch_size=3, workers=1, chunk_size=2, progress=False)
    cache = FeatureCache.open(tmp_path / "cache", expect_backbone="efficientnet_lite0")
    assert len(cache) == 4 and result.chunks_computed == 2 and cache.ids == [r.id for r in images.records]
    app = create_backbone(json.loads(json.dumps(cache.backbone)))  # rebuilt from the stored spec, as the app does
    for i, (id_, split) in enumerate(zip(cache.ids, cache.splits)):
        live = app.encode([Image.open(root / split / id_)])[0].numpy()  # (1280,)
        np.testing.assert_allclose(cache.features[i].astype(np.float32), live, rtol=2e-3, atol=2e-3)
    assert not np.allclose(cache.features[0], cache.features[1], atol=0.05)  # a mixed-up row would fail above


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
