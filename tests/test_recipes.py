"""train/recipes/flickr30k.sh end to end, offline: a tiny local parquet with the Hub Flickr30k schema, a
random-weight ResNet50, extract -> fit -> scst -> bundle -> evaluate (test split) -> hub_upload --dry-run.

The script is the one a user runs with a GPU and the Hub; only sizes come from the environment.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train" / "recipes" / "flickr30k.sh"
SCENES = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220)}


def flickr30k_parquet(folder: Path, per_split: dict[str, int]) -> Path:
    """Parquet with nlphuji/flickr30k's columns (image struct, caption list, sentids, split, img_id,
    filename); flat-colour photos whose five captions name their colour."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    rows, i = [], 0
    for split, n in per_split.items():
        for _ in range(n):
            colour = list(SCENES)[i % 3]
            buf = io.BytesIO()
            Image.new("RGB", (64, 48), SCENES[colour]).save(buf, format="JPEG")
            caps = [f"a {colour} {rng.choice(['picture', 'photo', 'square'])} on the wall" for _ in range(5)]
            rows.append({"image": {"bytes": buf.getvalue(), "path": f"{1000 + i}.jpg"}, "caption": caps,
                         "sentids": [str(5 * i + k) for k in range(5)], "split": split, "img_id": str(i),
                         "filename": f"{1000 + i}.jpg"})
            i += 1
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "flickr30k.parquet")
    return folder


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_flickr30k_recipe_runs_end_to_end_offline_and_reruns(tmp_path):
    data = flickr30k_parquet(tmp_path / "f30k", {"train": 12, "val": 3, "test": 3})
    work = tmp_path / "run"
    env = {**os.environ, "PYTHON": sys.executable, "DATASET": str(data), "REVISION": "", "WORK": str(work),
           "EXTRACT_ARGS": "--random-weights --quiet --batch-size 8 --workers 0",
           "FIT_ARGS": "--epochs 2 --batch-size 16 --embed-dim 16 --hidden-dim 16 --attention-dim 16 --min-freq 1",
           "SCST_ARGS": "--epochs 1 --batch-size 4 --samples 2", "EVAL_ARGS": "--batch-size 4",
           "UPLOAD_ARGS": "--dry-run", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
           "OMP_NUM_THREADS": "1"}

    def run() -> str:
        p = subprocess.run(["bash", str(SCRIPT), "tester"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout

    out = run()
    # every step ran, in order, and the dry run said where the model and the Space would go
    steps = [line for line in out.splitlines() if line.startswith("== ")]
    assert [s.split()[1] for s in steps] == ["1/6", "2/6", "3/6", "4/6", "5/6", "6/6"]
    assert "dry run: nothing uploaded" in out and "dry run: nothing was published" in out
    assert "https://huggingface.co/tester/storyteller-flickr30k-resnet50-attention" in out
    assert "https://huggingface.co/spaces/tester/neural-storyteller" in out

    bundle = work / "bundle"
    config = json.loads((bundle / "config.json").read_text())
    assert config["decoder"] == "show_attend_tell" and config["backbone"]["name"] == "resnet50"
    assert config["extra"]["decoding"]["bad_endings"][:3] == ["a", "an", "the"]
    assert "scst" in json.dumps(config["extra"]).lower()  # the card's facts say it was fine-tuned with SCST
    test = json.loads((work / "test.json").read_text())
    assert test["split"] == "test" and test["num_images"] == 3
    assert str(tmp_path) not in (bundle / "README.md").read_text()  # no machine path in what would ship

    # a second run resumes every step from what is there and ships the same weights
    weights = (bundle / "model.safetensors").read_bytes()
    run()
    assert (bundle / "model.safetensors").read_bytes() == weights


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("recipe", ["flickr8k_lite0.sh", "flickr8k_lite0_scst.sh"])
@pytest.mark.parametrize("backbone", [None, "efficientnet_lite2"])
def test_pooled_recipes_extract_with_the_backbone_asked_for(tmp_path, recipe, backbone):
    # a `python` that only records its arguments: the recipe's own commands, in order, without running them
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{log}"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "WORK": str(tmp_path / "run"),
           "OUT": str(tmp_path / "model"), "FEATURES": str(tmp_path / "features")}
    if backbone:
        env["BACKBONE"] = backbone
    p = subprocess.run(["bash", str(REPO / "train" / "recipes" / recipe)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("-m train extract") and len(calls) >= 3
    assert f"--backbone {backbone or 'efficientnet_lite0'} " in calls[0] + " "
    assert not any("--backbone" in c for c in calls[1:])  # later steps read the backbone from the cache / model


def _fake_python(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose `python` only records its arguments, one call a line."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{log}"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "UPLOAD_ARGS", "EXTRACT_ARGS")}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "WORK": str(tmp_path / "run")}, log


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("argv, why", [([], "no HUB_USER given"), (["tester", "--no-publish"], "--no-publish"),
                                       (["--no-publish", "tester"], "--no-publish")])
def test_flickr30k_recipe_without_a_hub_user_trains_only(tmp_path, argv, why):
    env, log = _fake_python(tmp_path)
    p = subprocess.run(["bash", str(SCRIPT), *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    calls = log.read_text().splitlines()
    assert [c.split()[2] for c in calls] == ["extract", "fit", "scst", "bundle", "evaluate"]
    assert not any("hub_upload" in c for c in calls)  # nothing staged for upload, no token needed
    assert f"== 6/6 publish: skipped ({why}); nothing was uploaded" in p.stdout
    assert "huggingface.co" not in p.stdout
    assert all("--resume" in c for c in calls[1:3])  # fit and scst go on from their checkpoints


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_flickr30k_recipe_with_a_hub_user_publishes_and_refuses_odd_arguments(tmp_path):
    env, log = _fake_python(tmp_path)
    p = subprocess.run(["bash", str(SCRIPT), "tester"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    upload = log.read_text().splitlines()[-1]
    assert upload.startswith("hub_upload.py ") and "--repo-id tester/storyteller-flickr30k-resnet50-attention" in upload
    assert "published:" in p.stdout
    for argv in (["--publish"], ["a", "b"]):
        p = subprocess.run(["bash", str(SCRIPT), *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and "usage: bash train/recipes/flickr30k.sh [HUB_USER] [--no-publish]" in p.stderr
