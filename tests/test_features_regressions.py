"""A feature-cache chunk counts as finished only when both its ``.npy`` and its ``.jsonl`` are in place.

``write_chunk`` renames the ``.npy`` into place first, then the ``.jsonl``. A run killed between the
two renames leaves a chunk with features and no index: the rerun must recompute that chunk (and
end with the same cache as an uninterrupted run), not count it as done and crash reading its index.
"""
from __future__ import annotations

import numpy as np

from storyteller.backbones import backbone_spec, create_backbone
from train.data import open_captioned_images
from train.features import PARTIAL, FeatureCache
from tests.test_extract import TINY, make_photos
from train.extract import extract


def test_a_chunk_killed_between_its_two_renames_is_recomputed(tmp_path):
    root = make_photos(tmp_path / "photos", 5)  # 10 images, chunks of 3: 4 chunks
    spec = {**backbone_spec("efficientnet_lite0"), "preprocessing": TINY, "weights": None}
    images = open_captioned_images(root)
    straight = extract(images, create_backbone(spec, pretrained=False), tmp_path / "straight", batch_size=3,
                       workers=0, chunk_size=3, progress=False).cache

    cut = tmp_path / "cut"
    extract(images, create_backbone(spec, pretrained=False), cut, batch_size=3, workers=0, chunk_size=3,
            stop_after_chunks=2, progress=False)
    partial = cut / PARTIAL
    assert (partial / "chunk_00001.npy").is_file() and (partial / "chunk_00001.jsonl").is_file()
    # the crash: chunk 1's .npy was renamed into place, its .jsonl was still being written
    (partial / "chunk_00001.jsonl").rename(partial / "chunk_00001.jsonl.tmp")
    with open(partial / "chunk_00001.jsonl.tmp", "r+", encoding="utf-8") as f:
        f.truncate(10)

    again = extract(images, create_backbone(spec, pretrained=False), cut, batch_size=3, workers=0, chunk_size=3,
                    progress=False)
    assert again.chunks_resumed == 1 and again.chunks_computed == 3  # chunk 1 recomputed, not trusted
    resumed = FeatureCache.open(cut)
    assert resumed.ids == straight.ids and resumed.captions == straight.captions
    np.testing.assert_array_equal(np.asarray(resumed.features), np.asarray(straight.features))
    assert not partial.exists()
