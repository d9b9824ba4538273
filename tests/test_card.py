"""storyteller.card.write_model_card: Hub front matter, metric tables, curve, examples, usage."""
from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard

from storyteller.card import write_model_card
from storyteller.decoders import ShowAndTell
from storyteller.vocab import Vocabulary

SPEC = {"name": "efficientnet_lite0", "weights": "w", "feature_dim": 8,
        "preprocessing": {"resize": 256, "crop": 224, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}}
TRAIN_METRICS = {"split": "validation", "decoding": "greedy, max_len 20", "val_loss": 2.5, "bleu1": 0.6,
                 "bleu2": 0.4, "bleu3": 0.3, "bleu4": 0.2222, "cider": 0.5111}


def save_model(path, dataset, metrics=TRAIN_METRICS):
    torch.manual_seed(0)
    vocab = Vocabulary(["a", "dog", "runs"])
    m = ShowAndTell(len(vocab), feature_dim=8, embed_dim=4, hidden_dim=4, backbone=SPEC,
                    extra={"dataset": dataset, "metrics": metrics,
                           "training": {"train_split": "train", "train_images": 100, "val_split": "validation",
                                        "val_images": 10, "select": "cider", "best_epoch": 3, "epochs_run": 5,
                                        "hyperparameters": {"lr": 0.002}}})
    m.vocab = vocab
    m.save_pretrained(path)
    return path


def write_evaluations(model_dir, evaluations):
    (model_dir / "evaluation.json").write_text(
        json.dumps({"format": "storyteller-evaluation-v1", "evaluations": evaluations}), encoding="utf-8")


def test_card_from_training_metrics(tmp_path):
    d = save_model(tmp_path / "m", {"source": "/data/flickr8k", "kind": "imagefolder"})
    path = write_model_card(d, repo_id="someone/storyteller-test")
    text = path.read_text(encoding="utf-8")
    card = ModelCard.load(path)  # the Hub's own parser accepts the front matter
    assert card.data.pipeline_tag == "image-to-text" and card.data.library_name == "neural-storyteller"
    assert card.data.license == "mit" and "image-captioning" in card.data.tags
    assert card.data.datasets is None  # a local folder is not a Hub dataset id
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values == {"BLEU-4 (greedy)": 0.2222, "CIDEr-D (greedy)": 0.5111}
    assert card.data.model_name == "someone/storyteller-test"
    assert "| greedy | 0.6000 | 0.4000 | 0.3000 | 0.2222 | 0.5111 | 2.5000 |" in text
    assert 'load_decoder("someone/storyteller-test")' in text and "A Show-and-Tell image captioner" in text
    assert "flickr8k" in text and "centre crop 224x224" in text and "## Limitations" in text
    assert "loss_curve.png" not in text  # no curve in the folder, no broken image link
    assert "## Example captions" not in text


def test_card_uses_evaluation_json_curve_and_examples(tmp_path):
    d = save_model(tmp_path / "m", {"source": "nlphuji/flickr30k", "kind": "hub"})
    (d / "loss_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (d / "examples").mkdir()
    (d / "examples" / "1.jpg").write_bytes(b"\xff\xd8\xff")
    evaluation = {"dataset": "nlphuji/flickr30k", "dataset_name": "nlphuji/flickr30k", "split": "test",
                  "num_images": 1000, "max_len": 20, "alpha": 0.0, "features": None,
                  "methods": {"greedy": {"beam": 1, "bleu1": 0.6, "bleu2": 0.4, "bleu3": 0.28, "bleu4": 0.19,
                                         "cider": 0.41, "mean_length": 9.1, "vocab_used": 400, "images_per_s": 900.0},
                              "beam3": {"beam": 3, "bleu1": 0.62, "bleu2": 0.42, "bleu3": 0.3, "bleu4": 0.21,
                                        "cider": 0.45, "mean_length": 9.0, "vocab_used": 350, "images_per_s": 300.0}},
                  "examples": [{"id": "1.jpg", "references": ["a dog runs", "a | dog"],
                                "captions": {"greedy": "a dog", "beam3": "a dog runs"}, "image": "examples/1.jpg"}]}
    write_evaluations(d, [evaluation])
    path = write_model_card(d)
    text = path.read_text(encoding="utf-8")
    card = ModelCard.load(path)
    assert card.data.datasets == ["nlphuji/flickr30k"]
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values == {"BLEU-4 (greedy)": 0.19, "CIDEr-D (greedy)": 0.41, "BLEU-4 (beam 3)": 0.21, "CIDEr-D (beam 3)": 0.45}
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}
    assert "| beam 3 | 0.6200 | 0.4200 | 0.3000 | 0.2100 | 0.4500 | 9.0 | 350 | 300.0 |" in text
    assert "| greedy | 0.6000 | 0.4000 | 0.3000 | 0.2222 | 0.5111 | 2.5000 |" in text  # training figures still shown
    assert "![training and validation loss per epoch](loss_curve.png)" in text
    assert "![1.jpg](examples/1.jpg)" in text and "a dog runs" in text and "a \\| dog" in text  # pipe escaped
    assert 'load_decoder("path/to/this/folder")' in text and 'storyteller.load("path/to/this/folder")' in text
    (d / "examples" / "1.jpg").unlink()  # a thumbnail that is not there is not linked
    assert "](examples/1.jpg)" not in write_model_card(d).read_text(encoding="utf-8")


def test_card_examples_argument_and_missing_extra(tmp_path):
    torch.manual_seed(0)
    vocab = Vocabulary(["a", "cat"])
    m = ShowAndTell(len(vocab), feature_dim=8, embed_dim=4, hidden_dim=4)  # no backbone, no extra
    m.vocab = vocab
    m.save_pretrained(tmp_path / "bare")
    text = write_model_card(tmp_path / "bare", examples=[{"id": "x", "references": ["a cat"],
                                                           "captions": {"greedy": "a cat"}}]).read_text(encoding="utf-8")
    assert "No scores recorded" in text and "| `x` | a cat | a cat |" in text
    assert ModelCard.load(tmp_path / "bare" / "README.md").data.eval_results is None


def test_card_needs_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_model_card(tmp_path)


def test_each_evaluation_is_filed_under_its_own_dataset(tmp_path):
    d = save_model(tmp_path / "m", {"source": "/data/flickr8k", "kind": "imagefolder"})
    methods = {"greedy": {"beam": 1, "bleu4": 0.2, "cider": 0.4}}
    write_evaluations(d, [
        {"dataset": "nlphuji/flickr30k", "dataset_name": "nlphuji/flickr30k", "split": "test", "num_images": 1000,
         "max_len": 16, "alpha": 0.5, "no_repeat_ngram_size": 3, "features": None, "methods": methods},
        {"dataset": "/data/flickr8k", "dataset_name": "flickr8k", "split": "validation", "num_images": 1000,
         "max_len": 20, "alpha": 0.0, "no_repeat_ngram_size": 0, "features": "feats", "methods": methods}])
    path = write_model_card(d)
    card = ModelCard.load(path)
    assert {(r.dataset_type, r.dataset_name, r.dataset_split) for r in card.data.eval_results} == \
        {("nlphuji/flickr30k", "nlphuji/flickr30k", "test"), ("flickr8k", "flickr8k", "validation")}
    text = path.read_text(encoding="utf-8")
    assert "max 16 words, length-normalisation alpha 0.5, no repeated 3-grams" in text  # the decoding that was scored
    assert "alpha 0.0, no n-gram blocking" in text
    assert "/data/flickr8k" not in text  # a local path is named by its folder only


def test_dataset_label_never_shows_a_local_path():
    from storyteller.card import dataset_label

    assert dataset_label({"source": "/home/me/data/flickr8k/", "kind": "imagefolder"}) == ("flickr8k", None)
    assert dataset_label({"source": "nlphuji/flickr30k", "kind": "hub"}) == ("nlphuji/flickr30k", "nlphuji/flickr30k")
    assert dataset_label("/srv/x/coco.parquet") == ("coco.parquet", None)
    assert dataset_label(None) == ("unknown dataset", None)


def test_public_dataset_drops_local_paths_and_keeps_names_and_hub_ids():
    from storyteller.card import public_dataset

    local = {"source": "/home/alice/data/flickr8k", "kind": "imagefolder", "splits": ["train"], "limit_per_split": None}
    assert public_dataset(local) == {"name": "flickr8k", "kind": "imagefolder", "splits": ["train"], "limit_per_split": None}
    assert public_dataset(public_dataset(local)) == public_dataset(local)  # idempotent
    hub = {"source": "nlphuji/flickr30k", "kind": "hub", "revision": "refs/convert/parquet", "splits": ["test"]}
    assert public_dataset(hub) == {"name": "nlphuji/flickr30k", "kind": "hub", "source": "nlphuji/flickr30k",
                                   "revision": "refs/convert/parquet", "splits": ["test"]}
    assert public_dataset({"source": "synthetic"}) == {"source": "synthetic"}
    assert public_dataset({"source": "../data/f8k", "kind": "parquet"})["name"] == "f8k"


def test_an_attention_models_card_says_it_attends_and_loads_it_right(tmp_path):
    """The card of a Show-Attend-Tell model describes a grid and attention, not one pooled feature, and its
    usage code loads any decoder and asks the backbone for the grid."""
    from storyteller.decoders import ShowAttendTell

    vocab = Vocabulary(["a", "dog", "runs"])
    m = ShowAttendTell(len(vocab), feature_dim=8, embed_dim=4, hidden_dim=4, attention_dim=4, grid=[7, 7],
                       backbone=SPEC, extra={"dataset": {"source": "/data/flickr8k", "kind": "imagefolder"}})
    m.vocab = vocab
    m.save_pretrained(tmp_path / "att")
    text = write_model_card(tmp_path / "att").read_text(encoding="utf-8")
    assert "A Show-Attend-Tell image captioner" in text and "7x7 grid" in text
    assert "one pooled" not in text and "ShowAndTell" not in text
    assert "grid=model.has_attention" in text and "show-attend-tell" in text

