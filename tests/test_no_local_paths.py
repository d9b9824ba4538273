"""Nothing a model ships names a machine's folders: fit's export, bundle, `evaluate --write-to-model`
(from a cache and from the photos, both given as absolute paths), the card and the app's model
panel carry dataset labels (name or Hub id, split), and hub_upload refuses a folder that leaks one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.helpers_images import colour_imagefolder
from storyteller.card import local_paths, published_local_paths
from train import bundle, evaluate, extract, fit



@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    """extract -> fit -> bundle -> evaluate --write-to-model on a 9-photo imagefolder, every path absolute."""
    root = tmp_path_factory.mktemp("paths").resolve()
    data = root / "secret-home" / "flickr-mini"
    colour_imagefolder(data, {"train": 2, "validation": 1})
    threads = torch.get_num_threads()
    try:
        extract.main(["--dataset", str(data), "--backbone", "efficientnet_lite0", "--random-weights", "--out",
                      str(root / "feats"), "--workers", "0", "--threads", "1", "--quiet"])
        fit.main(["--features", str(root / "feats"), "--out", str(root / "run"), "--epochs", "1", "--batch-size", "4",
                  "--embed-dim", "8", "--hidden-dim", "16", "--min-freq", "1", "--progress", "off",
                  "--num-threads", "1"])
    finally:
        torch.set_num_threads(threads)
    bundled = bundle.bundle(root / "run" / "model", root / "bundled", {"beam_size": 2})
    common = ["--model", str(bundled), "--split", "validation", "--beam", "1", "2", "--examples", "2",
              "--write-to-model", "--out", str(root / "eval.json")]
    evaluate.main(common + ["--features", str(root / "feats"), "--dataset", str(data)])
    evaluate.main(common[:-2] + ["--out", str(root / "eval-live.json"), "--dataset", str(data), "--split", "train"])
    return {"root": root, "data": data, "fit_model": root / "run" / "model", "bundled": bundled}


def test_local_paths_finds_paths_and_spares_relative_ones_and_urls():
    assert local_paths('{"source": "/home/alice/data/flickr8k"}') == ["/home/alice/data/flickr8k"]
    assert local_paths("C:\\Users\\bob and ~/data") == ["C:\\Users", "~/data"]
    assert local_paths("![x](examples/a.jpg) see https://huggingface.co/datasets/a/b, 1/2/3, images/s") == []


@pytest.mark.parametrize("folder", ["fit_model", "bundled"])
def test_exported_model_folders_name_no_local_path(pipeline, folder):
    model_dir = pipeline[folder]
    assert (model_dir / "config.json").is_file() and (model_dir / "README.md").is_file()
    for f in model_dir.rglob("*"):
        if f.suffix in (".json", ".md"):
            text = f.read_text(encoding="utf-8")
            assert str(pipeline["root"]) not in text and not local_paths(text), (f.name, local_paths(text))
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    assert config["extra"]["dataset"]["name"] == "flickr-mini"  # a label instead
    assert config["extra"]["dataset"]["splits"] == ["train", "validation"]


def test_evaluations_are_recorded_by_label_and_split(pipeline):
    evaluations = json.loads((pipeline["bundled"] / "evaluation.json").read_text(encoding="utf-8"))["evaluations"]
    assert [(e["dataset"], e["dataset_name"], e["split"]) for e in evaluations] == \
        [("flickr-mini", "flickr-mini", "validation"), ("flickr-mini", "flickr-mini", "train")]
    assert [e["features"] for e in evaluations] == ["feats", None] and evaluations[0]["model"] == "bundled"
    assert published_local_paths(pipeline["bundled"]) == {}
    card = (pipeline["bundled"] / "README.md").read_text(encoding="utf-8")
    assert "flickr-mini" in card


def test_the_app_model_panel_names_no_local_path(pipeline):
    import app  # noqa: F401  (the module's helpers; its model is the default one)
    from storyteller.captioner import load

    info = load(str(pipeline["bundled"])).info
    md = app.model_markdown(info)
    assert "`bundled`" in md and "flickr-mini" in md
    assert str(pipeline["root"]) not in md and not local_paths(md), md


def test_hub_upload_refuses_a_folder_that_names_a_local_path(pipeline, tmp_path):
    import shutil

    import hub_upload

    leaky = tmp_path / "leaky"
    shutil.copytree(pipeline["bundled"], leaky)
    ev = json.loads((leaky / "evaluation.json").read_text(encoding="utf-8"))
    ev["evaluations"][0]["features"] = "/srv/me/feats"  # e.g. written by an older evaluate
    (leaky / "evaluation.json").write_text(json.dumps(ev), encoding="utf-8")
    with pytest.raises(hub_upload.UploadRefused, match="/srv/me/feats"):
        hub_upload.publish(leaky, "me/model", dry_run=True, log=lambda *a: None)
    hub_upload.publish(pipeline["bundled"], "me/model", dry_run=True, log=lambda *a: None)  # the clean one passes


@pytest.mark.parametrize("name", ["flickr8k-lite0-ensemble", "flickr8k-lite0-scst", "flickr8k-lite0-attention"])
def test_the_shipped_models_name_no_local_path(name):
    bundled = Path(__file__).resolve().parents[1] / "models" / name
    assert published_local_paths(bundled) == {}
    config = json.loads((bundled / "config.json").read_text(encoding="utf-8"))
    assert config["extra"]["dataset"]["name"] == "flickr8k"
