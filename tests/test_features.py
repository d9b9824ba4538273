"""The feature cache: round trip, backbone checks, refusing unfinished or corrupt caches, chunked writer."""
from __future__ import annotations

import json

import numpy as np
import pytest

from storyteller.backbones import backbone_spec
from train.features import (ChunkedCacheWriter, FeatureCache, FeatureCacheError, check_backbone,
                                  write_feature_cache)

SPEC = {**backbone_spec("efficientnet_lite0"), "feature_dim": 8}  # tiny D: the cache only needs a spec


def small_cache(path, n=5, spec=SPEC):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, spec["feature_dim"])).astype(np.float32)
    ids = [f"img{i}.jpg" for i in range(n)]
    splits = ["train", "validation", "train", "test", "train"][:n]
    captions = [[f"caption {i}", "ünïcode ok"] for i in range(n)]
    write_feature_cache(path, feats, ids, splits, captions, spec, {"source": "unit-test"})
    return feats, ids, splits, captions


def test_round_trip(tmp_path):
    feats, ids, splits, captions = small_cache(tmp_path / "c")
    cache = FeatureCache.open(tmp_path / "c", expect_backbone=SPEC)
    assert len(cache) == 5 and cache.features.dtype == np.float16 and isinstance(cache.features, np.memmap)
    np.testing.assert_allclose(cache.features, feats, rtol=1e-3, atol=1e-3)
    assert (cache.ids, cache.splits, cache.captions) == (ids, splits, captions)
    assert cache.split("train").tolist() == [0, 2, 4] and cache.split("train").dtype == np.int64
    assert cache.manifest["dataset"] == {"source": "unit-test"} and cache.manifest["complete"] is True
    assert {"torch", "torchvision", "timm", "storyteller"} <= set(cache.manifest["versions"])
    with pytest.raises(FeatureCacheError, match=r"no split 'val'.*\['train', 'validation', 'test'\]"):
        cache.split("val")


def test_backbone_mismatch_names_both(tmp_path):
    small_cache(tmp_path / "c")
    FeatureCache.open(tmp_path / "c", expect_backbone="efficientnet_lite0")  # by name: name/weights/preprocessing match
    with pytest.raises(FeatureCacheError, match="efficientnet_lite0.*resnet50.*differs in: name, weights, preprocessing"):
        FeatureCache.open(tmp_path / "c", expect_backbone="resnet50")
    other_crop = {**SPEC, "preprocessing": {**SPEC["preprocessing"], "crop": 192}}
    with pytest.raises(FeatureCacheError, match='"crop": 224.*"crop": 192.*differs in: preprocessing'):
        FeatureCache.open(tmp_path / "c", expect_backbone=other_crop)
    with pytest.raises(FeatureCacheError, match="differs in: weights"):
        check_backbone(SPEC, {**SPEC, "weights": None})


def test_refuses_unfinished_cache(tmp_path):
    small_cache(tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(FeatureCacheError, match="incomplete"):
        FeatureCache.open(tmp_path / "c")
    (tmp_path / "c" / "manifest.json").unlink()
    (tmp_path / "c" / ".partial").mkdir()
    with pytest.raises(FeatureCacheError, match="not a finished feature cache.*rerun the same extract command"):
        FeatureCache.open(tmp_path / "c")
    with pytest.raises(FeatureCacheError, match="does not exist"):
        FeatureCache.open(tmp_path / "nowhere")


def test_corrupt_files_give_clear_errors(tmp_path):
    small_cache(tmp_path / "c")
    npy = tmp_path / "c" / "features.npy"
    good = npy.read_bytes()
    npy.write_bytes(good[:-10])  # truncated: header says 5 rows, data is shorter
    with pytest.raises(FeatureCacheError, match="features.npy cannot be read.*corrupt"):
        FeatureCache.open(tmp_path / "c")
    npy.write_bytes(good)
    index = tmp_path / "c" / "index.jsonl"
    lines = index.read_text().splitlines(keepends=True)
    index.write_text("".join(lines[:-1]))
    with pytest.raises(FeatureCacheError, match="index.jsonl has 4 rows but features.npy and the manifest have 5"):
        FeatureCache.open(tmp_path / "c")
    index.write_text("".join(lines[:-1]) + "{not json\n")
    with pytest.raises(FeatureCacheError, match="line 5 is not a valid index row"):
        FeatureCache.open(tmp_path / "c")
    index.write_text("".join(lines))
    np.save(npy, np.zeros((5, 9), np.float16))  # wrong D
    with pytest.raises(FeatureCacheError, match=r"\(5, 9\).*\(5, 8\)"):
        FeatureCache.open(tmp_path / "c")


def test_writer_validates_input(tmp_path):
    f = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="2 rows but ids/splits/captions have 1/2/2"):
        write_feature_cache(tmp_path, f, ["a"], ["train"] * 2, [["x"]] * 2, SPEC)
    with pytest.raises(ValueError, match="unique"):
        write_feature_cache(tmp_path, f, ["a", "a"], ["train"] * 2, [["x"]] * 2, SPEC)
    with pytest.raises(ValueError, match="dim 8 but backbone 'resnet50' has 2048"):
        write_feature_cache(tmp_path, f, ["a", "b"], ["train"] * 2, [["x"]] * 2, backbone_spec("resnet50"))
    with pytest.raises(ValueError, match="list of str"):
        write_feature_cache(tmp_path, f, ["a", "b"], ["train"] * 2, ["x", ["y"]], SPEC)
    with pytest.raises(ValueError, match="NaN"):
        write_feature_cache(tmp_path, f + np.nan, ["a", "b"], ["train"] * 2, [["x"]] * 2, SPEC)


def test_chunked_writer_resumes_and_refuses_to_mix(tmp_path):
    rows = np.arange(7 * 8, dtype=np.float32).reshape(7, 8)
    ids = [str(i) for i in range(7)]

    def put(w, k):
        r = w.chunk_rows(k)
        w.write_chunk(k, rows[r.start:r.stop], ids[r.start:r.stop], ["train"] * len(r), [["c"]] * len(r))

    w = ChunkedCacheWriter(tmp_path / "c", SPEC, {"source": "s"}, count=7, chunk_size=3)
    assert (w.num_chunks, w.done_chunks) == (3, 0)
    put(w, 0)
    with pytest.raises(ValueError, match="out of order"):
        put(w, 2)
    with pytest.raises(FeatureCacheError):
        FeatureCache.open(tmp_path / "c")  # unfinished: nothing valid yet
    with pytest.raises(FeatureCacheError, match="different settings.*differs in: chunk_size"):
        ChunkedCacheWriter(tmp_path / "c", SPEC, {"source": "s"}, count=7, chunk_size=4)
    with pytest.raises(FeatureCacheError, match="differs in: backbone"):
        ChunkedCacheWriter(tmp_path / "c", {**SPEC, "weights": None}, {"source": "s"}, count=7, chunk_size=3)
    w = ChunkedCacheWriter(tmp_path / "c", SPEC, {"source": "s"}, count=7, chunk_size=3)
    assert w.done_chunks == 1 and w.done_ids() == ["0", "1", "2"]
    with pytest.raises(FeatureCacheError, match="1 of 3 chunks"):
        w.finalize()
    put(w, 1)
    put(w, 2)
    cache = w.finalize()
    assert not (tmp_path / "c" / ".partial").exists()
    np.testing.assert_array_equal(cache.features, rows.astype(np.float16))
    assert cache.ids == ids and cache.manifest["dataset"] == {"source": "s"}


ODD_CAPTIONS = ["café crème", "line\u2028separator", "para\u2029graph", "next\x85line", "tab\tand\r\nbreak"]


def test_unicode_line_breaks_in_captions_survive_resume_and_finalize(tmp_path):
    """U+2028/U+2029/U+0085 are line breaks to str.splitlines(); they must not split an index row."""
    rows = np.ones((4, 8), np.float32)
    ids = ["a", "b", "c", "d"]
    caps = [ODD_CAPTIONS, [ODD_CAPTIONS[1]], ["plain"], [ODD_CAPTIONS[0]]]
    w = ChunkedCacheWriter(tmp_path / "c", SPEC, {"source": "s"}, count=4, chunk_size=2)
    w.write_chunk(0, rows[:2], ids[:2], ["train"] * 2, caps[:2])
    w = ChunkedCacheWriter(tmp_path / "c", SPEC, {"source": "s"}, count=4, chunk_size=2)  # a rerun resumes
    assert w.done_chunks == 1 and w.done_ids() == ["a", "b"]
    w.write_chunk(1, rows[2:], ids[2:], ["train"] * 2, caps[2:])
    cache = w.finalize()
    assert cache.ids == ids and cache.captions == caps
    text = (tmp_path / "c" / "index.jsonl").read_text(encoding="utf-8")
    assert len(text.splitlines()) == 4  # escaped, so even a splitlines() reader sees one row per line

    write_feature_cache(tmp_path / "w", rows, ids, ["train"] * 4, caps, SPEC)
    assert FeatureCache.open(tmp_path / "w").captions == caps


def test_chunks_with_raw_unicode_line_breaks_still_resume(tmp_path):
    """Chunks written by an older version hold U+2028 & co. raw (ensure_ascii=False); they still resume."""
    rows = np.ones((2, 8), np.float32)
    w = ChunkedCacheWriter(tmp_path / "c", SPEC, {"source": "s"}, count=2, chunk_size=1)
    w.write_chunk(0, rows[:1], ["a"], ["train"], [ODD_CAPTIONS])
    jsonl = tmp_path / "c" / ".partial" / "chunk_00000.jsonl"
    raw = json.dumps({"id": "a", "split": "train", "captions": ODD_CAPTIONS}, ensure_ascii=False) + "\n"
    jsonl.write_text(raw, encoding="utf-8")
    assert "\u2028" in jsonl.read_text(encoding="utf-8")
    w = ChunkedCacheWriter(tmp_path / "c", SPEC, {"source": "s"}, count=2, chunk_size=1)
    assert w.done_ids() == ["a"]
    w.write_chunk(1, rows[1:], ["b"], ["train"], [["b"]])
    cache = w.finalize()
    assert cache.captions == [ODD_CAPTIONS, ["b"]]
