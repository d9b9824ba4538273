"""storyteller.metrics against the reference coco-caption scorers (pycocoevalcap, test-only) and
hand-computed cases."""
from __future__ import annotations

import json
import random

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from storyteller.metrics import cider_d, corpus_bleu, evaluate_captions, token_prf
from storyteller.vocab import tokenize

TOL = 1e-6


def coco_reference(hyps: list[str], refs: list[list[str]]) -> tuple[list[float], float, list[float]]:
    """pycocoevalcap's BLEU-1..4, CIDEr-D and per-image CIDEr-D on the project's tokenization."""
    gts = {i: [" ".join(tokenize(r)) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(tokenize(h))] for i, h in enumerate(hyps)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, per_image = Cider().compute_score(gts, res)
    return [float(b) for b in bleu], float(cider), [float(s) for s in per_image]


def assert_matches_coco(hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    ours = evaluate_captions(hyps, refs)
    bleu, cider, _ = coco_reference(hyps, refs)
    for k in range(4):
        assert ours[f"bleu{k + 1}"] == pytest.approx(bleu[k], abs=TOL), f"bleu{k + 1}"
    assert ours["cider"] == pytest.approx(cider, abs=TOL)
    return ours


@pytest.fixture(scope="module")
def real_captions(flickr8k_dir) -> list[list[str]]:
    with open(flickr8k_dir / "validation" / "metadata.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(300), f)]
    return [row["captions"] for row in rows]


def test_real_captions_match_coco(real_captions):
    # 150 images: one human caption scored against the other four (high scores) ...
    hyps = [caps[0] for caps in real_captions[:150]]
    refs = [caps[1:] for caps in real_captions[:150]]
    # ... and 150 with another image's caption (low scores, so agreement isn't only near the ceiling).
    rng = random.Random(0)
    others = real_captions[150:]
    hyps += [others[(i + 37) % len(others)][rng.randrange(5)] for i in range(len(others))]  # never its own
    refs += [caps[:4] for caps in others]
    ours = assert_matches_coco(hyps, refs)
    assert 0.05 < ours["bleu4"] < 0.9 and 0.1 < ours["cider"] < 5  # a non-degenerate regime

    _, per_image = cider_d([tokenize(h) for h in hyps], [[tokenize(r) for r in rs] for rs in refs])
    _, _, coco_per_image = coco_reference(hyps, refs)
    assert per_image == pytest.approx(coco_per_image, abs=TOL)
    # matched captions must beat mismatched ones on average, or the pairing above is broken
    assert sum(per_image[:150]) > 2 * sum(per_image[150:])


def test_random_small_vocabulary_matches_coco():
    # Runs without shared data: a 6-word vocabulary forces repeated n-grams (clipping), n-grams shared
    # across images (df > 1), empty captions and 1..5 references per image.
    rng = random.Random(1)
    words = "a dog cat runs the red".split()

    def caption() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randrange(0, 9)))

    hyps = [caption() for _ in range(60)]
    refs = [[caption() for _ in range(rng.randrange(1, 6))] for _ in range(60)]
    refs[0].append("a dog runs")  # at least one non-empty reference, which coco's CIDEr needs
    assert any(h == "" for h in hyps) and any(r == "" for rs in refs for r in rs)
    assert_matches_coco(hyps, refs)


def test_helpers_take_tokens_and_other_orders():
    hyps = [["a", "dog", "runs"], ["a", "cat"]]
    refs = [[["a", "dog", "runs", "fast"]], [["the", "cat"], ["a", "cat", "sleeps"]]]
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    coco_bleu2, _ = Bleu(2).compute_score(gts, res, verbose=0)
    assert corpus_bleu(hyps, refs, n=2) == pytest.approx(coco_bleu2, abs=TOL)
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    scorer = CiderScorer(sigma=3.0)  # coco's scorer counts 1..4-grams whatever its n, so compare at n=4
    for i in range(len(hyps)):
        scorer += (res[i][0], gts[i])
    coco_cider, _ = scorer.compute_score()
    assert cider_d(hyps, refs, sigma=3.0)[0] == pytest.approx(coco_cider, abs=TOL)
    # image 1: "a dog runs" vs its only ref: m=3 of 3 and 4; image 2: "a cat" vs "the cat" (Dice 2/4)
    # and "a cat sleeps" (Dice 4/5) -> m=2, |r*|=3.
    assert token_prf(hyps, refs) == pytest.approx(((3 + 2) / 5, (3 + 2) / 7, 2 * (5 / 5) * (5 / 7) / (5 / 5 + 5 / 7)))


def test_references_that_tokenize_to_nothing_do_not_crash():
    ours = evaluate_captions(["a dog runs", "a cat"], [["..."], ["!", ""]])
    assert ours["cider"] == ours["precision"] == ours["recall"] == ours["f1"] == 0.0
    assert ours["bleu1"] == pytest.approx(0.0, abs=1e-12)  # coco's 1e-15 smoothing, not exactly 0


def test_empty_hypothesis_does_not_crash_and_matches_coco():
    hyps = ["", "a dog runs on the grass", "a man rides a red bike"]
    refs = [["a cat sleeps"], ["a dog is running on grass", "the dog runs"], ["a man on a bike", "a cyclist"]]
    assert_matches_coco(hyps, refs)


def test_all_empty_hypotheses_score_zero():
    refs = [["a cat sleeps on a bed"], ["a dog runs"]]
    ours = assert_matches_coco(["", "."], refs)
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "precision", "recall", "f1"):
        assert ours[key] == pytest.approx(0.0, abs=1e-12), key


def test_hypothesis_longer_than_every_reference():
    hyps = ["a brown dog runs fast across the green grass in the park", "two kids play"]
    refs = [["a dog runs", "a brown dog in a park"], ["kids play", "two kids"]]
    ours = assert_matches_coco(hyps, refs)
    # By hand. Image 1: 12 tokens; per-word max reference counts a:2 brown dog runs in park:1, so the
    # hypothesis matches a, brown, dog, runs, in, park = 6; closest ref length to 12 is 6.
    # Image 2: 3 tokens, all of two/kids/play matched = 3; both refs have length 2.
    # Hypothesis total 15 > reference total 8: no brevity penalty, BLEU-1 is clipped precision.
    assert ours["bleu1"] == pytest.approx((6 + 3) / (12 + 3), abs=TOL)


def test_closest_reference_length_ties_go_to_the_shorter():
    # hyp has 4 tokens; refs have 3 and 5 (both at distance 1). Choosing 3 means no brevity penalty;
    # choosing 5 would multiply by exp(1 - 5/4).
    ours = evaluate_captions(["a dog runs fast"], [["a dog sits", "the dog runs very slowly"]])
    # a, dog, runs match; "fast" does not: 3 of 4 with no brevity penalty.
    assert ours["bleu1"] == pytest.approx(3 / 4, abs=TOL)


def test_single_reference_per_image_matches_coco():
    hyps = ["a dog runs on the grass", "a man rides a bike", "children play in the snow"]
    refs = [["a dog running on grass"], ["a man riding a red bike down a hill"], ["kids in snow"]]
    assert_matches_coco(hyps, refs)


def test_identical_hypothesis_and_reference():
    hyps = ["A black dog jumps over a log .", "Two girls eat ice cream on a bench"]
    refs = [["a black dog jumps over a log"], ["two girls eat ice cream on a bench"]]
    ours = assert_matches_coco(hyps, refs)
    assert ours["bleu4"] == pytest.approx(1.0, abs=1e-6)
    # No n-gram is shared between the two images, so every idf is log(2) - log(1): each cosine is 1,
    # there is no length penalty, and each image scores 10.
    assert ours["cider"] == pytest.approx(10.0, abs=1e-9)
    assert ours["precision"] == ours["recall"] == ours["f1"] == 1.0


def test_one_image_only():
    # idf = log(1 image) - log(df = 1) = 0 for every n-gram, so coco-caption's CIDEr-D is 0 for one image.
    ours = assert_matches_coco(["a dog runs"], [["a dog runs", "the dog is running"]])
    assert ours["cider"] == 0.0
    assert ours["bleu1"] == pytest.approx(1.0, abs=TOL)


def test_precision_recall_f1_by_hand():
    # hyp {a, dog, runs} vs "a dog": m=2, Dice 4/5; vs "the dog runs fast": m=2, Dice 4/7 -> best is "a dog".
    ours = evaluate_captions(["a dog runs"], [["a dog", "the dog runs fast"]])
    p, r = 2 / 3, 2 / 2
    assert ours["precision"] == pytest.approx(p)
    assert ours["recall"] == pytest.approx(r)
    assert ours["f1"] == pytest.approx(2 * p * r / (p + r))


def test_precision_recall_are_micro_averaged_and_clipped():
    # image 1 as above (m=2, |hyp|=3, |r*|=2); image 2: "cat" x3 vs "a cat" clips to m=1, |hyp|=3, |r*|=2.
    ours = evaluate_captions(["a dog runs", "cat cat cat"], [["a dog", "the dog runs fast"], ["a cat"]])
    p, r = (2 + 1) / (3 + 3), (2 + 1) / (2 + 2)
    assert ours["precision"] == pytest.approx(p)
    assert ours["recall"] == pytest.approx(r)
    assert ours["f1"] == pytest.approx(2 * p * r / (p + r))


def test_best_reference_ties_keep_the_first():
    # vs "a x": m=1, Dice 2/6; vs "a b y z w v x x": m=2, Dice 4/12 -- equal, so the first is used.
    ours = evaluate_captions(["a b c d"], [["a x", "a b y z w v x x"]])
    assert ours["precision"] == pytest.approx(1 / 4)
    assert ours["recall"] == pytest.approx(1 / 2)


def test_tokenizer_is_applied():
    ours = evaluate_captions(["A Dog's ball!"], [["a dogs ball"]])
    assert ours["bleu1"] == pytest.approx(1.0, abs=TOL)
    assert ours["precision"] == ours["recall"] == 1.0


@pytest.mark.parametrize(
    "hyps, refs, error",
    [
        (["a dog"], [["a dog"], ["a cat"]], ValueError),  # lengths differ
        (["a dog", "a cat"], [["a dog"], []], ValueError),  # an image without references
        ([], [], ValueError),  # nothing to score
        (["a dog"], ["a dog"], TypeError),  # references[0] is a bare string
        ([None], [["a dog"]], TypeError),
    ],
)
def test_input_validation(hyps, refs, error):
    with pytest.raises(error):
        evaluate_captions(hyps, refs)


def test_empty_reference_list_error_names_the_image():
    with pytest.raises(ValueError, match=r"references\[1\]"):
        evaluate_captions(["a", "b"], [["a"], []])
