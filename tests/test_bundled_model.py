"""The models that ship in models/: the default flickr8k-lite0-ensemble (the pooled SCST model and an attention
SCST model decoded as one), flickr8k-lite0-scst (pooled, SCST) and flickr8k-lite0-attention (cross-entropy).
Each loads and captions offline on a fresh clone, and the figures in its model card are reproduced
by the project's own evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from storyteller.captioner import load
from storyteller.metrics import evaluate_captions
from storyteller.vocab import SPECIAL_TOKENS

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "flickr8k-lite0-ensemble"  # the default
SCST = REPO / "models" / "flickr8k-lite0-scst"
ATTENTION = REPO / "models" / "flickr8k-lite0-attention"
SHOWS_ATTENTION = (BUNDLED, ATTENTION)
EXAMPLES = REPO / "examples"
SHIPPED = pytest.mark.parametrize("model_dir", [BUNDLED, SCST, ATTENTION], ids=["default-ensemble", "pooled-scst", "attention"])
# reproducing a card from live features takes a minute a model
REPRODUCED = SHIPPED


def card_evaluation(model_dir=BUNDLED) -> dict:
    data = json.loads((model_dir / "evaluation.json").read_text(encoding="utf-8"))
    return next(e for e in data["evaluations"] if e["split"] == "validation")


@SHIPPED
def test_bundled_model_captions_the_example_photos_offline(monkeypatch, model_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("STORYTELLER_MODEL", raising=False)
    captioner = load() if model_dir == BUNDLED else load(model_dir)  # no name: the bundled model
    assert Path(captioner.info["model"]).resolve() == model_dir.resolve()
    assert captioner.has_attention == (model_dir in SHOWS_ATTENTION)
    human = json.loads((EXAMPLES / "captions.json").read_text(encoding="utf-8"))["captions"]
    names = sorted(human)
    results = captioner.caption([captioner.load_image(EXAMPLES / n) for n in names])
    beam = [r.beam[0].text for r in results]
    for r in results:
        for text in (r.greedy.text, r.beam[0].text):
            assert text and not any(tok in text for tok in SPECIAL_TOKENS)
    # sensible, not just non-empty: the captions match their own photo's human captions far better
    # than another photo's
    own = evaluate_captions(beam, [human[n] for n in names])
    other = evaluate_captions(beam, [human[n] for n in names[1:] + names[:1]])
    assert own["bleu1"] > 0.4, (beam, own)
    assert own["f1"] > other["f1"] + 0.1, (beam, own, other)
    if captioner.has_attention:  # one map per word, each a distribution over the 7x7 grid
        for r in results:
            cap = r.beam[0]
            assert cap.attention.shape == (len(cap.tokens), 7, 7)
            assert cap.attention.flatten(1).sum(1) == pytest.approx([1.0] * len(cap.tokens), abs=1e-4)


@SHIPPED
def test_card_reports_the_validation_figures(model_dir):
    ev = card_evaluation(model_dir)
    card = (model_dir / "README.md").read_text(encoding="utf-8")
    beam = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["extra"]["decoding"]["beam_size"]
    bleu4 = ev["methods"][f"beam{beam}"]["bleu4"]
    assert f"{bleu4:.3f}" in card
    assert ev["num_images"] == 1000


def test_the_default_is_the_best_shipped_model_by_validation_cider():
    def cider(model_dir):
        ev = card_evaluation(model_dir)
        beam = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["extra"]["decoding"]["beam_size"]
        return ev["methods"][f"beam{beam}"]["cider"]

    assert cider(BUNDLED) > max(cider(SCST), cider(ATTENTION))


@REPRODUCED
def test_bundled_model_reproduces_its_card_figures(flickr8k_dir, tmp_path, model_dir):
    from train.evaluate import main as evaluate

    ev = card_evaluation(model_dir)
    beam = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["extra"]["decoding"]["beam_size"]
    out = tmp_path / "eval.json"
    # live features from the photos (not the cache the card was made from): the app's path
    evaluate(["--model", str(model_dir), "--dataset", str(flickr8k_dir), "--split", "validation",
              "--beam", str(beam), "--examples", "0", "--out", str(out)])
    got = json.loads(out.read_text(encoding="utf-8"))["methods"][f"beam{beam}"]
    want = ev["methods"][f"beam{beam}"]
    assert got["bleu4"] == pytest.approx(want["bleu4"], abs=0.01)
    assert got["cider"] == pytest.approx(want["cider"], abs=0.02)


def test_the_default_shows_where_it_looked_without_naming_a_model(monkeypatch, tmp_path, capsys):
    """`python -m storyteller caption --attention DIR photo.jpg`, no --model: the per-word picture (issue 24)."""
    from PIL import Image

    from storyteller.__main__ import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("STORYTELLER_MODEL", raising=False)
    photo = sorted(EXAMPLES.glob("*.jpg"))[0]
    assert main(["caption", "--attention", str(tmp_path / "maps"), str(photo)]) == 0
    caption = capsys.readouterr().out.strip().split("\t")[-1]
    picture = Image.open(tmp_path / "maps" / f"{photo.name}.attention.png")
    assert picture.width > 0 and caption
