"""bench/make_flickr30k_like.py (a Flickr30k-shaped parquet from Flickr8k-style photos) and bench/scale.py's pieces:
the subset parquet, the cut cache, the synthetic cache, the measurement of a child and the table."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import make_flickr30k_like as maker
from bench import scale
from train.data import open_captioned_images
from train.features import FeatureCache


def fake_flickr8k(root: Path, n: int = 8) -> Path:
    """A Flickr8k-style imagefolder: train/ and validation/ with metadata.jsonl, noisy 64x48 photos."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n - 2), ("validation", 2)):
        folder = root / split
        folder.mkdir(parents=True)
        lines = []
        for i in range(count):
            name = f"{split}{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / name)
            lines.append(json.dumps({"file_name": name, "captions": [f"a dog on the left {i}", f"photo {i} of a dog"]}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def like(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("f30k")
    info = maker.make(fake_flickr8k(root / "f8k"), root / "out", total=62, seed=0)
    assert info["photos"] == 62 and info["distinct_files"] == 62 and info["captions"] == 124
    return root / "out"


def test_the_made_dataset_reads_as_flickr30k_with_its_split_proportions(like):
    images = open_captioned_images(like)
    assert len(images) == 62 and images.description["columns"] == {
        "image": "image", "caption": "caption", "split": "split", "id": "filename"}
    assert images.split_counts() == {"train": 58, "validation": 2, "test": 2}  # 29,000 / 1,014 / 1,000 scaled
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(like.rglob("*.parquet"))[0])
    assert table.column_names == ["image", "caption", "sentids", "split", "img_id", "filename"]
    digests = [hashlib.sha256(r["bytes"]).hexdigest() for r in table.column("image").to_pylist()]
    assert len(set(digests)) == len(digests)  # no two photos are the same file
    # a photo's variants stay in one split (no test photo has a twin in train); mirrored ones swap sides
    split_of: dict[str, set[str]] = {}
    for r in images.records:
        split_of.setdefault(r.id.rsplit("_", 1)[0], set()).add(r.split)
    assert all(len(s) == 1 for s in split_of.values())
    mirrored = [r for r in images.records if int(r.id.rsplit("_", 1)[1].split(".")[0]) % 2 == 1]
    assert mirrored and all("on the right" in r.captions[0] for r in mirrored)
    assert images[0].image.size[0] <= 64


def test_the_maker_refuses_to_write_over_a_dataset(like, tmp_path):
    with pytest.raises(SystemExit, match="already holds parquet"):
        maker.make(like.parent / "f8k", like, total=10)
    with pytest.raises(SystemExit, match="no train/metadata.jsonl"):
        maker.make(tmp_path, tmp_path / "out", total=10)


def test_subset_parquet_and_synthetic_cache(like, tmp_path):
    sub = scale.subset_parquet(like, 20, tmp_path / "sub")
    images = open_captioned_images(sub)
    assert [r.id for r in images.records] == [r.id for r in open_captioned_images(like).records[:20]]
    scale.synthetic_cache(sub, "resnet50", tmp_path / "feats")
    cache = FeatureCache.open(tmp_path / "feats")
    assert cache.grid.shape == (20, 7, 7, 2048) and cache.backbone["name"] == "resnet50"
    assert cache.ids == [r.id for r in images.records] and cache.captions[3] == images.records[3].captions
    scale.cut_cache(tmp_path / "feats", 7, tmp_path / "cut")
    cut = FeatureCache.open(tmp_path / "cut")
    assert len(cut) == 7 and np.array_equal(cut.grid, cache.grid[:7]) and cut.ids == cache.ids[:7]


def test_measure_sees_a_childs_memory_and_disk(tmp_path):
    code = (f"import pathlib, time; b = bytearray(80 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
            f"pathlib.Path({str(tmp_path / 'f')!r}).write_bytes(bytes(30 * 2**20)); time.sleep(0.6)")
    r = scale.measure([sys.executable, "-c", code], {}, tmp_path, tmp_path / "log.txt")
    assert r["peak_anon_mb"] >= 80 and r["peak_rss_mb"] >= 80 and r["peak_disk_mb"] >= 30 and r["seconds"] >= 0.6
    with pytest.raises(SystemExit, match="failed"):
        scale.measure([sys.executable, "-c", "raise SystemExit(3)"], {}, tmp_path, tmp_path / "log.txt")


def test_table_gives_growth_against_the_smallest_size():
    row = {"seconds": 10.0, "peak_rss_mb": 100, "peak_anon_mb": 50, "peak_disk_mb": 0}
    text = scale.table({1000: {"fit": row}, 4000: {"fit": {**row, "seconds": 40.0, "peak_anon_mb": 200}}})
    assert "| fit | 4,000 | 4.0 | 40.0 | 4.0 | 100 | 200 | 4.0 | 0 | - |" in text


def test_finish_in_place_refuses_metadata_of_another_length(tmp_path):
    from train.features import FEATURES, FeatureCacheError, finish_in_place

    tmp_path.mkdir(exist_ok=True)
    np.save(tmp_path / FEATURES, np.zeros((3, 4), dtype=np.float16))
    spec = {"name": "efficientnet_lite0", "weights": None, "feature_dim": 4, "preprocessing": {}}
    with pytest.raises(ValueError, match="3 rows but ids/splits/captions have 2/2/2"):
        finish_in_place(tmp_path, ["a", "b"], ["train"] * 2, [["x"]] * 2, spec)
    with pytest.raises(FeatureCacheError):  # nothing half-made is taken for a cache
        FeatureCache.open(tmp_path)
    cache = finish_in_place(tmp_path, ["a", "b", "c"], ["train"] * 3, [["x"]] * 3, spec)
    assert len(cache) == 3 and cache.grid is None
