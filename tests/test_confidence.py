"""A caption's confidence (storyteller/confidence.py, train/calibrate.py): the maths, the files, the captioner.

Tiny random models and flat-colour photos keep these fast; the shipped models' calibrations are checked for what
they must hold (every caption a confidence in [0, 1], the figures the docs quote) where they are loaded anyway.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from storyteller.captioner import load
from storyteller.cider import CaptionReward
from storyteller.confidence import (BADGES, CALIBRATION_FILE, NEIGHBOURS_FILE, CalibrationError, Calibrator, badge,
                                    norm_log_prob)
from train import calibrate as C

from helpers_images import colour_imagefolder
from helpers_models import save_test_model


def test_badges_follow_the_thresholds_and_none_gives_none():
    assert badge(None) is None
    for threshold, label, key in BADGES:
        assert badge(threshold) == (label, key)
    assert badge(0.99)[0] == "likely right" and badge(0.0)[0] == "likely wrong"
    assert badge(BADGES[0][0] - 1e-6)[0] == BADGES[1][1]


def test_auroc_is_the_share_of_positive_negative_pairs_ranked_right():
    rng = np.random.default_rng(0)
    score = rng.integers(0, 5, 60).astype(float)  # many ties
    label = rng.random(60) < 0.4
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a, b in itertools.product(score[label], score[~label])]
    assert C.auroc(score, label) == pytest.approx(np.mean(pairs))
    assert C.auroc(-score, label) == pytest.approx(1 - np.mean(pairs))
    assert np.isnan(C.auroc(score, np.ones(60, bool)))


def test_logistic_fit_recovers_known_weights():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20000, 2)) * [2.0, 0.5] + [1.0, -3.0]
    true_logit = 0.7 + 1.5 * (x[:, 0] - 1.0) / 2.0 - 0.8 * (x[:, 1] + 3.0) / 0.5
    y = (rng.random(20000) < 1 / (1 + np.exp(-true_logit))).astype(float)
    w, b, mean, scale = C.fit_logistic(x, y, l2=0.0)
    assert np.allclose(w, [1.5, -0.8], atol=0.08) and b == pytest.approx(0.7, abs=0.08)
    assert np.allclose(mean, x.mean(0)) and np.allclose(scale, x.std(0))


def test_reliability_measures_miscalibration():
    rng = np.random.default_rng(2)
    p = rng.random(50000)
    honest = rng.random(50000) < p
    _, ece = C.reliability(p, honest)
    assert ece < 0.01
    rows, ece_over = C.reliability(p, rng.random(50000) < p / 2)  # says twice what is true
    assert ece_over > 0.2 and sum(r["count"] for r in rows) == 50000


def test_risk_coverage_keeps_the_most_confident():
    p = np.array([0.9, 0.1, 0.8, 0.2])
    cider = np.array([2.0, 0.0, 1.0, 0.5])
    good = np.array([1, 0, 1, 0], bool)
    rows = C.risk_coverage(p, good, cider)
    assert rows[0]["coverage"] == 0.25 and rows[0]["cider_d"] == 2.0
    assert rows[1]["good"] == 1.0 and rows[1]["cider_d"] == 1.5 and rows[-1]["cider_d"] == 0.875


def test_criterion_backs_words_by_stem_and_synonym_not_by_guess():
    refs = ["A person is riding a bicycle down the street .", "Someone cycles on a road"]
    assert C.backed_share("a man rides a bike on the street", refs) == 1.0  # man~person, rides~riding, bike~bicycle
    assert C.is_good("a man rides a bike", refs, cider=C.MIN_CIDER)
    assert not C.is_good("a man rides a bike", refs, cider=C.MIN_CIDER - 0.01)  # backed, but says too little
    share = C.backed_share("a dog runs on the beach", refs)
    assert share == 0.0 and not C.is_good("a dog runs on the beach", refs, cider=5.0)
    assert C.backed_share("a man in a red shirt", refs) == pytest.approx(1 / 3)  # man yes; red, shirt no
    assert C.backed_share("a the of", refs) == 0.0  # no content word: nothing is claimed, nothing backed


def test_reward_tables_give_the_same_cider_without_the_corpus():
    corpus = [["a dog runs on the grass", "the dog is running"], ["a man rides a bike", "a person on a bicycle"],
              ["two dogs play in the snow", "dogs in snow"], ["a dog runs", "a brown dog on grass"]]
    full = CaptionReward(corpus)
    small = CaptionReward.from_tables(*full.tables())
    assert len(small.df_keys) < len(full.df_keys)  # n-grams of one image dropped: their idf is the same
    hyps = ["a dog runs on the grass", "a man on a bike", "dogs play"]
    refs = [corpus[0], corpus[1], corpus[2]]
    want = full.score([full.encode(h) for h in hyps], np.arange(3), full.encode_references(refs))[0]
    got = small.score([small.encode_known(h) for h in hyps], np.arange(3), small.encode_references(refs))[0]
    assert np.allclose(want, got, rtol=0, atol=1e-12) and want.max() > 0


def _calibrate(model_dir, data, *extra):
    C.main(["--model", str(model_dir), "--dataset", str(data), "--k", "3", "--dim", "4", "--batch-size", "8", *extra])


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny random model calibrated on flat-colour photos (train: the neighbours; validation: the fit)."""
    root = tmp_path_factory.mktemp("cal")
    data = colour_imagefolder(root / "data", {"train": 4, "validation": 6})
    model_dir = save_test_model(root / "model", pretrained_backbone=False)
    _calibrate(model_dir, data, "--plot", str(root / "reliability.png"))
    return model_dir, data, root


def test_calibrate_writes_a_json_calibration_with_its_figures(calibrated):
    model_dir, _, root = calibrated
    data = json.loads((model_dir / CALIBRATION_FILE).read_text())
    assert data["criterion"]["name"] == C.CRITERION["name"] and data["signals"] == list(C.DEFAULT_SIGNALS)
    figures = data["validation"]
    assert figures["photos"] == 18 and 0 <= figures["ece"] <= 1 and len(figures["risk_coverage"]) == 4
    assert sum(r["count"] for r in figures["reliability"]) == 18
    assert data["neighbours"]["photos"] == 12 and (model_dir / NEIGHBOURS_FILE).is_file()
    assert (root / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(model_dir.glob(".*tmp"))  # atomic writes leave no temporary file


def test_a_calibrated_model_gives_every_caption_a_confidence(calibrated):
    model_dir, data, _ = calibrated
    captioner = load(model_dir)
    photos = sorted((data / "validation").glob("*.png"))[:5]
    results = captioner.caption(photos, beam_size=3, n_best=3)
    for r in results:
        for c in [r.greedy, *r.beam]:
            assert c.confidence is not None and 0.0 <= c.confidence <= 1.0
    # one photo's confidence does not depend on the batch it came in
    alone = captioner.caption(photos[2:3], beam_size=3, n_best=3)[0]
    assert alone.beam[0].text == results[2].beam[0].text
    assert alone.beam[0].confidence == pytest.approx(results[2].beam[0].confidence, abs=2e-4)
    assert "confidence" in results[0].timings_ms


def test_confidence_is_the_calibrators_function_of_the_signals(calibrated):
    model_dir, data, _ = calibrated
    captioner = load(model_dir)
    cal = captioner.calibrator
    photo = sorted((data / "validation").glob("*.png"))[0]
    feats = captioner.features([photo])
    result = captioner.caption_features(feats)[0]
    cap = result.beam[0]
    consensus = cal.neighbours.consensus(feats if feats.dim() == 2 else feats.flatten(1, -2).mean(1), [cap.text], [0])
    z = (np.array([norm_log_prob(cap.log_prob, len(cap.tokens), cap.finished), consensus[0]]) - cal.mean) / cal.scale
    assert cap.confidence == pytest.approx(1 / (1 + np.exp(-(cal.intercept + z @ np.array(cal.weights)))), abs=1e-4)


def test_a_model_without_calibration_shows_no_confidence(tmp_path):
    model_dir = save_test_model(tmp_path / "m", pretrained_backbone=False)
    captioner = load(model_dir)
    assert captioner.calibrator is None
    r = captioner.caption([_png(tmp_path)])[0]
    assert r.greedy.confidence is None and r.beam[0].confidence is None and "confidence" not in r.timings_ms


def _png(tmp_path):
    from PIL import Image

    path = tmp_path / "p.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return path


def test_broken_calibration_files_are_one_clear_load_error(calibrated, tmp_path):
    import shutil

    from storyteller.captioner import ModelLoadError

    model_dir, _, _ = calibrated
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    (copy / NEIGHBOURS_FILE).unlink()
    with pytest.raises(ModelLoadError, match=NEIGHBOURS_FILE):
        load(copy)
    (copy / CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(ModelLoadError, match="not readable JSON"):
        load(copy)
    with pytest.raises(CalibrationError, match="signals this version does not know"):
        Calibrator(signals=["mystery"], weights=[1.0], intercept=0.0, mean=[0.0], scale=[1.0], criterion={})


def test_calibration_round_trips_exactly(calibrated, tmp_path):
    import shutil

    model_dir, _, _ = calibrated
    cal = Calibrator.load(model_dir)
    out = tmp_path / "again"
    shutil.copytree(model_dir, out)
    cal.save(out)
    again = Calibrator.load(out)
    assert again.to_json() == cal.to_json()
    rows = np.array([[-1.0, 0.5], [-3.0, 0.0]])
    assert np.array_equal(again.probability(rows), cal.probability(rows))
    for name, t in cal.neighbours.tensors().items():
        assert torch.equal(t, again.neighbours.tensors()[name]), name


def test_dry_run_writes_nothing(tmp_path):
    data = colour_imagefolder(tmp_path / "data", {"train": 2, "validation": 3})
    model_dir = save_test_model(tmp_path / "model", pretrained_backbone=False)
    before = sorted(p.name for p in model_dir.iterdir())
    _calibrate(model_dir, data, "--dry-run")
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_command_line_and_records_carry_the_confidence(calibrated, tmp_path, capsys):
    from storyteller.__main__ import main
    from storyteller.photo_library import read_records

    model_dir, data, _ = calibrated
    photos = [str(p) for p in sorted((data / "validation").glob("*.png"))[:3]]
    assert main(["caption", "--model", str(model_dir), "--json", "--beam", "3", "--n-best", "2", *photos]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3
    for rec in lines:
        assert 0 <= rec["beam_confidence"] <= 1 and 0 <= rec["greedy_confidence"] <= 1
        assert rec["n_best"][0]["confidence"] == rec["beam_confidence"]
    for suffix in (".jsonl", ".csv"):
        out = tmp_path / f"records{suffix}"
        assert main(["caption", "--model", str(model_dir), "--out", str(out), "--review-below", "0.999", *photos]) == 0
        records = read_records(out)
        assert [r["confidence"] for r in records] == pytest.approx([x["beam_confidence"] for x in lines], abs=1e-9)
        assert all(r["needs_review"] is True for r in records)  # no confidence reaches 0.999 here
        low = tmp_path / f"none{suffix}"
        assert main(["caption", "--model", str(model_dir), "--out", str(low), "--review-below", "0", *photos]) == 0
        assert not any(r["needs_review"] for r in read_records(low))


def test_review_below_is_a_confidence_with_out(calibrated, capsys):
    from storyteller.__main__ import main

    model_dir, data, _ = calibrated
    photo = str(sorted((data / "validation").glob("*.png"))[0])
    for argv in (["--review-below", "0.5"], ["--out", "x.csv", "--review-below", "1.5"]):
        with pytest.raises(SystemExit) as e:
            main(["caption", "--model", str(model_dir), *argv, photo])
        assert e.value.code == 2
    assert "--review-below" in capsys.readouterr().err


SHIPPED = sorted(p for p in (Path(__file__).resolve().parents[1] / "models").iterdir() if (p / "config.json").is_file())


@pytest.mark.parametrize("model_dir", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_model_is_calibrated_with_honest_figures(model_dir):
    cal = Calibrator.load(model_dir)
    assert cal is not None, f"{model_dir.name} has no {CALIBRATION_FILE}: run python -m train calibrate"
    v = cal.validation
    assert v["split"] == "validation" and v["photos"] == 1000
    assert cal.criterion["name"] == C.CRITERION["name"]
    # calibrated: the mean confidence of the judged halves is the rate of good captions, within 0.05
    assert abs(v["mean_confidence"] - v["good_rate"]) < 0.05 and v["ece"] < 0.05
    assert v["auroc_criterion"] > 0.7 and v["auroc_cider_above_median"] > 0.7
    assert cal.neighbours.bank.shape == (6000, v["dim"]) and cal.neighbours.k == v["k"]


def test_the_default_model_gives_confidences_in_0_1():
    captioner = load()
    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.jpg"))
    for r in captioner.caption(examples, n_best=2):
        assert all(0.0 <= c.confidence <= 1.0 for c in [r.greedy, *r.beam])


def test_the_model_card_carries_the_calibration(calibrated, tmp_path):
    from storyteller.card import write_model_card

    model_dir, _, _ = calibrated
    text = write_model_card(model_dir).read_text()
    figures = json.loads((model_dir / CALIBRATION_FILE).read_text())["validation"]
    assert "## Confidence" in text and C.CRITERION["description"] in text
    assert f"| share of good captions | {figures['good_rate']:.3f} |" in text
    plain = save_test_model(tmp_path / "plain", pretrained_backbone=False)
    assert "## Confidence" not in write_model_card(plain).read_text()


def test_the_calibration_travels_with_the_model(calibrated, tmp_path):
    """Downloading (snapshot_download's allow_patterns) and publishing (hub_upload) share loading's file lists."""
    import hub_upload
    from storyteller.loading import OPTIONAL_MODEL_FILES

    assert {CALIBRATION_FILE, NEIGHBOURS_FILE} <= set(OPTIONAL_MODEL_FILES)
    model_dir, _, _ = calibrated
    files, _ = hub_upload.model_files(model_dir)
    assert {CALIBRATION_FILE, NEIGHBOURS_FILE} <= set(files)
