"""Datasets: local imagefolders, local parquet with the Hub Flickr30k schema, selection and errors (offline)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.data import CaptionedImage, iter_captioned_images, normalize_split, open_captioned_images
from storyteller.images import load_image


@pytest.fixture
def offline_hf(monkeypatch, tmp_path):
    """No network and a private datasets cache for anything that goes through ``datasets``."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf-cache"


def jpeg_bytes(color: tuple[int, int, int], size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def make_imagefolder(root: Path, splits: dict[str, int]) -> Path:
    for split, n in splits.items():
        (root / split).mkdir(parents=True)
        with open(root / split / "metadata.jsonl", "w") as f:
            for i in range(n):
                name = f"{split}_{i}.jpg"
                (root / split / name).write_bytes(jpeg_bytes((20 * i, 100, 0)))
                f.write(json.dumps({"file_name": name, "captions": [f"{split} photo {i}", "A thing ."]}) + "\n")
    return root


def make_flickr30k_parquet(path: Path, splits: list[str]) -> Path:
    """A tiny parquet with the columns and types of nlphuji/flickr30k's parquet conversion."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"image": {"bytes": jpeg_bytes((0, 40 * i, 200)), "path": f"{1000 + i}.jpg"},
             "caption": [f"caption {i} {k}" for k in range(5)], "sentids": [str(5 * i + k) for k in range(5)],
             "split": s, "img_id": str(i), "filename": f"{1000 + i}.jpg"} for i, s in enumerate(splits)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_normalize_split():
    assert [normalize_split(s) for s in ["val", "Valid", "dev", "train", "test"]] == ["validation"] * 3 + ["train", "test"]


def test_imagefolder_splits_records_and_images(tmp_path):
    root = make_imagefolder(tmp_path / "data", {"val": 2, "train": 3})
    images = open_captioned_images(root)
    assert images.split_counts() == {"train": 3, "validation": 2}  # canonical order, val -> validation
    assert images.records[0].id == "train_0.jpg" and images.records[3].captions == ["val photo 0", "A thing ."]
    item = images[4]
    assert isinstance(item, CaptionedImage) and item.split == "validation" and item.id == "val_1.jpg"
    assert item.image.mode == "RGB" and item.image.size == (40, 30)
    assert images.description["kind"] == "imagefolder" and images.description["splits"] == ["train", "validation"]

    assert [r.id for r in open_captioned_images(root, "validation").records] == ["val_0.jpg", "val_1.jpg"]
    assert [r.id for r in open_captioned_images(root, limit_per_split=1).records] == ["train_0.jpg", "val_0.jpg"]
    one = open_captioned_images(root / "train")  # a single split folder works too
    assert len(one) == 3 and one.records[0].split == "train"
    assert [c.id for c in iter_captioned_images(root, "val")] == ["val_0.jpg", "val_1.jpg"]
    with pytest.raises(ValueError, match=r"no split \['test'\].*'train', 'validation'"):
        open_captioned_images(root, "test")


def test_images_are_decoded_exactly_as_the_app_decodes_them(tmp_path):
    """Training pixels = the app's pixels: transparency on white (not black), 16-bit grey scaled (not white)."""
    folder = tmp_path / "odd" / "train"
    folder.mkdir(parents=True)
    rgba = np.zeros((24, 32, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 16:, 3] = 255  # left half fully transparent (its hidden colour is red), right half opaque red
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    gray16 = (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 80).astype(np.uint16)  # 0..61360
    Image.fromarray(gray16).save(folder / "gray16.png")
    assert Image.open(folder / "gray16.png").mode.startswith("I")
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for name in ("rgba.png", "gray16.png"):
            f.write(json.dumps({"file_name": name, "captions": ["odd"]}) + "\n")
    images = open_captioned_images(folder)
    for i, name in enumerate(("rgba.png", "gray16.png")):
        got = np.asarray(images[i].image)
        assert images[i].image.mode == "RGB"
        np.testing.assert_array_equal(got, np.asarray(load_image(folder / name)))
    assert (np.asarray(images[0].image)[:, :16] == 255).all()  # transparent -> white
    assert np.asarray(images[1].image).max() == 239  # 61360 / 257, not clipped to 255


def test_imagefolder_bad_input(offline_hf, tmp_path):
    root = make_imagefolder(tmp_path / "data", {"train": 2})
    (root / "train" / "train_1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="train_1.jpg.*cannot be decoded"):
        open_captioned_images(root)[1]
    with open(root / "train" / "metadata.jsonl", "a") as f:
        f.write('{"file_name": "x.jpg"}\n')
    with pytest.raises(ValueError, match="line 3: no 'captions'"):
        open_captioned_images(root)
    with pytest.raises(ValueError, match="x.parquet.*not a local folder"):
        open_captioned_images(tmp_path / "x.parquet", cache_dir=str(offline_hf))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither an imagefolder.*nor a folder of .parquet"):
        open_captioned_images(tmp_path / "empty", cache_dir=str(offline_hf))


def test_flickr30k_schema_parquet(offline_hf, tmp_path):
    """The Hub Flickr30k code path, fed a local parquet with the same schema."""
    path = make_flickr30k_parquet(tmp_path / "f30k.parquet", ["train", "val", "test", "train", "val"])
    images = open_captioned_images(path, cache_dir=str(offline_hf))
    assert images.split_counts() == {"train": 2, "validation": 2, "test": 1}
    assert [r.id for r in images.records] == [f"{1000 + i}.jpg" for i in range(5)]
    assert images.records[1].captions == [f"caption 1 {k}" for k in range(5)]
    img = images[2].image
    assert img.mode == "RGB" and img.size == (40, 30) and abs(img.getpixel((20, 15))[1] - 80) < 8
    assert images.description["columns"] == {"image": "image", "caption": "caption", "split": "split", "id": "filename"}

    val = open_captioned_images(path, "val", id_column="img_id", cache_dir=str(offline_hf))
    assert [(r.id, r.split) for r in val.records] == [("1", "validation"), ("4", "validation")]
    with pytest.raises(ValueError, match="no caption column 'sentences'"):
        open_captioned_images(path, caption_column="sentences", cache_dir=str(offline_hf))
    with pytest.raises(ValueError, match="image id 'train' occurs twice"):  # ids must be unique
        open_captioned_images(path, id_column="split", cache_dir=str(offline_hf))


def test_parquet_folder_with_split_subfolders_and_no_split_column(offline_hf, tmp_path):
    import pyarrow.parquet as pq

    for split in ["train", "validation"]:
        (tmp_path / "pq" / split).mkdir(parents=True)
        make_flickr30k_parquet(tmp_path / "pq" / split / "0.parquet", [split])
        t = pq.read_table(tmp_path / "pq" / split / "0.parquet").drop_columns(["split"])
        t = t.set_column(t.column_names.index("filename"), "filename", [[f"{split}.jpg"]])
        pq.write_table(t, tmp_path / "pq" / split / "0.parquet")
    images = open_captioned_images(tmp_path / "pq", cache_dir=str(offline_hf))
    assert sorted((r.id, r.split) for r in images.records) == [("train.jpg", "train"), ("validation.jpg", "validation")]


def test_hub_source_offline_error_is_clear(offline_hf):
    with pytest.raises(ValueError, match="nlphuji/flickr30k.*refs/convert/parquet"):
        open_captioned_images("nlphuji/flickr30k", cache_dir=str(offline_hf))


def test_real_flickr8k_counts(flickr8k_dir):
    images = open_captioned_images(flickr8k_dir)
    assert images.split_counts() == {"train": 6000, "validation": 1000}
    assert all(len(r.captions) == 5 for r in images.records)
    assert images[6000].image.size == (224, 224)
