"""Features bigger than memory: ``--feature-memory mmap`` reads each batch's rows from the memory-mapped cache and
trains to the same weights as holding them; ``auto`` picks by size against free memory; ``read_rows`` reads
without mapping."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from test_attention import att_args, make_grid_cache
from test_fit import fit_args, make_cache
from train import features as F
from train import fit, scst


@pytest.fixture(scope="module")
def grid_cache(tmp_path_factory):
    return make_grid_cache(tmp_path_factory.mktemp("grid") / "feats", per_class=6, val_per_class=2)


def test_mapped_rows_give_the_rows_asked_in_the_order_asked(grid_cache):
    cache = F.FeatureCache.open(grid_cache)
    rows = cache.split("validation")
    mapped = F.MappedRows(cache.grid, rows)
    assert mapped.shape == (len(rows), *cache.grid.shape[1:]) and len(mapped) == len(rows)
    idx = torch.tensor([3, 0, 3, 1])
    assert torch.equal(mapped[idx], torch.from_numpy(np.asarray(cache.grid[rows[[3, 0, 3, 1]]])))
    assert torch.equal(mapped[1:3], torch.from_numpy(np.asarray(cache.grid[rows[1:3]])))
    pooled = F.MappedRows(cache.features, None, dtype=np.float32)
    assert pooled[np.array([2])].dtype == torch.float32


def test_read_rows_matches_the_memmap(grid_cache):
    cache = F.FeatureCache.open(grid_cache)
    rows = np.array([0, 5, 6, 20])
    assert np.array_equal(F.read_rows(grid_cache / F.GRID, rows), cache.grid[rows])
    assert np.array_equal(F.read_rows(grid_cache / F.FEATURES), cache.features)
    (grid_cache.parent / "cut.npy").write_bytes((grid_cache / F.GRID).read_bytes()[:-100])
    with pytest.raises(F.FeatureCacheError, match="truncated"):
        F.read_rows(grid_cache.parent / "cut.npy", np.array([len(cache) - 1]))


def test_auto_maps_what_does_not_fit_in_half_the_free_memory(monkeypatch):
    monkeypatch.setattr(F, "available_memory", lambda device="cpu": 10 * 2 ** 30)
    assert F.choose_feature_memory(4 * 2 ** 30, "cpu")[0] == "ram"
    mode, why = F.choose_feature_memory(6 * 2 ** 30, "cpu")
    assert mode == "mmap" and "6.0 GiB" in why and "10.0 GiB free host" in why
    assert F.choose_feature_memory(6 * 2 ** 30, "cpu", "ram") == ("ram", "as asked")
    assert F.choose_feature_memory(1, "cpu", "mmap")[0] == "mmap"
    with pytest.raises(ValueError, match="one of"):
        F.choose_feature_memory(1, "cpu", "disk")


def test_available_memory_is_positive():
    assert F.available_memory() > 0


@pytest.mark.parametrize("decoder", ["pooled", "attention"])
def test_a_memory_mapped_fit_trains_the_same_weights(grid_cache, tmp_path, capfd, decoder):
    args = att_args if decoder == "attention" else (lambda c, o, *e: fit_args(c, o, "--epochs", "2", *e))
    cache = grid_cache if decoder == "attention" else make_cache(tmp_path / "pooled")
    fit.main(args(cache, tmp_path / "ram", "--feature-memory", "ram"))
    assert "features: held in memory (as asked)" in capfd.readouterr().err
    fit.main(args(cache, tmp_path / "mmap", "--feature-memory", "mmap"))
    assert "features: memory-mapped, read per batch" in capfd.readouterr().err
    a = load_file(tmp_path / "ram" / "model" / "model.safetensors")
    b = load_file(tmp_path / "mmap" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fit_resumes_in_another_feature_memory_mode_and_caps_training_images(grid_cache, tmp_path):
    fit.main(att_args(grid_cache, tmp_path / "run", "--max-train-images", "10", "--stop-after-epochs", "1"))
    fit.main(att_args(grid_cache, tmp_path / "run", "--max-train-images", "10", "--resume", "--feature-memory", "mmap"))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["args"]["max_train_images"] == 10
    with pytest.raises(SystemExit, match="max-train-images"):
        fit.main(att_args(grid_cache, tmp_path / "run", "--resume"))  # another training set is another run


def test_scst_trains_the_same_from_memory_mapped_features(grid_cache, tmp_path):
    fit.main(att_args(grid_cache, tmp_path / "fit", "--epochs", "1"))
    common = ["--init", str(tmp_path / "fit"), "--features", str(grid_cache), "--epochs", "1", "--batch-size", "8",
              "--samples", "2", "--max-len", "6", "--progress", "off", "--bad-endings", "none", "--num-threads", "1"]
    scst.main([*common, "--out", str(tmp_path / "ram"), "--feature-memory", "ram"])
    scst.main([*common, "--out", str(tmp_path / "mmap"), "--feature-memory", "mmap"])
    a = load_file(tmp_path / "ram" / "model" / "model.safetensors")
    b = load_file(tmp_path / "mmap" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
