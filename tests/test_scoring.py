"""storyteller.scoring: teacher-forced word log-probabilities add up to the searches' log_prob, on small
random decoders (pooled and attention, several photos, finished and cut captions) and on the shipped
models in fp32 and int8; the first differing step of two captions."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from storyteller.decoders import ShowAndTell, ShowAttendTell
from storyteller.decoding import greedy_and_beam_search
from storyteller.precision import use_precision
from storyteller.scoring import ScoredCaption, parting_step, score_captions, score_result
from storyteller.vocab import Vocabulary

REPO = Path(__file__).resolve().parents[1]
TOL = 2e-3  # the tolerance: float32 sums over up to 20 words, rows batched differently
WORDS = "a dog runs through the grass man in red shirt is riding bike on street two children play water".split()


def random_decoder(attention: bool, seed: int = 0, end_bias: float = 0.0):
    """A small random decoder; ``end_bias`` raises <end>'s logit so some captions finish before max_len."""
    torch.manual_seed(seed)
    vocab = Vocabulary(WORDS)
    if attention:
        model = ShowAttendTell(vocab_size=len(vocab), feature_dim=12, embed_dim=8, hidden_dim=16, attention_dim=8,
                               grid=[3, 3])
    else:
        model = ShowAndTell(vocab_size=len(vocab), feature_dim=12, embed_dim=8, hidden_dim=16, num_layers=2)
    with torch.no_grad():
        model.head.bias[Vocabulary.end_id] += end_bias
    model.vocab = vocab
    return model.eval()


def features(attention: bool, B: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((B, 3, 3, 12) if attention else (B, 12), generator=g)


def check_sums(model, feats, max_len: int, **kw) -> list[bool]:
    """Search, score every caption of every photo in one batch, compare; returns the finished flags seen."""
    greedy, beams = greedy_and_beam_search(model, feats, beam_size=3, n_best=3, max_len=max_len, **kw)
    caps, images = [], []
    for b, (g, bs) in enumerate(zip(greedy, beams)):
        assert len(bs) == 3
        caps += [g, *bs]
        images += [b] * (1 + len(bs))
    scored = score_captions(model, feats, [c.tokens for c in caps], [c.finished for c in caps], images=images,
                            min_len=kw.get("min_len", 1))
    for c, s in zip(caps, scored):
        assert len(s.word_log_probs) == len(c.tokens) == len(s.tokens)
        assert (s.end_log_prob is None) == (not c.finished)
        assert all(lp <= 0 for lp in s.word_log_probs)
        assert abs(s.log_prob - c.log_prob) <= TOL, (c.text, s.log_prob, c.log_prob)
        assert len(s.top) == len(c.tokens) + 1
    return [c.finished for c in caps]


@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("ending", ["ends", "cut"])
def test_parts_add_up_to_the_searches_log_prob_on_random_decoders(attention, precision, ending):
    # <end> made likely (every caption ends once min_len allows it) or unlikely (every caption is cut at max_len)
    model = random_decoder(attention, end_bias=3.0 if ending == "ends" else -5.0)
    use_precision(model, precision)
    seen = check_sums(model, features(attention), max_len=7, no_repeat_ngram_size=2, bad_endings=("a", "the"), min_len=3)
    assert all(seen) if ending == "ends" else not any(seen)


def test_a_word_scored_at_the_wrong_step_does_not_add_up():
    """The check above can fail: scoring a caption shifted by one word misses the search's log_prob."""
    model = random_decoder(False, end_bias=-5.0)
    feats = features(False, B=1)
    greedy, _ = greedy_and_beam_search(model, feats, beam_size=2, max_len=6)
    assert len(set(greedy[0].tokens)) > 1
    g = greedy[0]
    (right,) = score_captions(model, feats, [g.tokens], [g.finished])
    (shifted,) = score_captions(model, feats, [g.tokens[1:] + g.tokens[:1]], [g.finished])
    assert abs(right.log_prob - g.log_prob) <= TOL < abs(shifted.log_prob - g.log_prob)


def test_top_words_are_the_models_best_allowed_tokens():
    model = random_decoder(False)
    feats = features(False, B=1)
    (s,) = score_captions(model, feats, [[5, 6, 7]], [False], top_k=4, min_len=2)
    with torch.no_grad():
        logp, _ = model.step(torch.tensor([Vocabulary.start_id]), model.init_state(feats))
    logp = logp[0].clone()
    logp[[Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.unk_id, Vocabulary.end_id]] = -math.inf  # min_len 2
    want = logp.topk(4)
    assert [t for t, _ in s.top[0]] == want.indices.tolist()
    assert [lp for _, lp in s.top[0]] == pytest.approx(want.values.tolist(), abs=1e-5)
    assert s.word_log_probs[0] == pytest.approx(float(logp[5]), abs=1e-5)
    assert all(t not in (Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.unk_id) for step in s.top for t, _ in step)


def test_end_is_offered_from_min_len_words_on_not_before():
    """The top words offer <end> once min_len words are written (as the searches allow it), never earlier."""
    model = random_decoder(False, end_bias=30.0)  # <end> the likeliest token wherever it is allowed
    feats = features(False, B=1)
    for min_len in (0, 1, 2, 3):
        (s,) = score_captions(model, feats, [[5, 6, 7]], [True], top_k=3, min_len=min_len)
        firsts = [step[0][0] for step in s.top]
        assert firsts == [Vocabulary.end_id if t >= min_len else firsts[t] for t in range(4)]
        assert all(Vocabulary.end_id not in [tok for tok, _ in s.top[t]] for t in range(min_len))


def test_parting_step():
    def cap(tokens, ended=True):
        return ScoredCaption(tokens, [-1.0] * len(tokens), -0.5 if ended else None, [])

    assert parting_step(cap([4, 5, 6]), cap([4, 5, 6])) is None
    assert parting_step(cap([4, 5, 6]), cap([4, 7, 6])) == 1
    assert parting_step(cap([4, 5]), cap([4, 5, 6])) == 2  # one ends where the other goes on
    assert parting_step(cap([4, 5]), cap([4, 5], ended=False)) == 2  # one ended, one was cut: not the same
    assert parting_step(cap([], ended=False), cap([])) == 0
    assert cap([4, 5]).token_at(2) == Vocabulary.end_id and cap([4, 5], ended=False).token_at(2) is None


def test_bad_arguments_are_refused():
    model = random_decoder(False)
    with pytest.raises(ValueError, match="finished flags"):
        score_captions(model, features(False, B=1), [[4]], [True, False])
    with pytest.raises(ValueError, match="photo indices"):
        score_captions(model, features(False, B=1), [[4]], [True], images=[1])
    assert score_captions(model, features(False, B=1), [], []) == []


@pytest.mark.parametrize("name", ["flickr8k-lite0-ensemble", "flickr8k-lite0-scst", "flickr8k-lite0-attention"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_parts_add_up_on_the_shipped_models(name, precision):
    from storyteller.captioner import load

    folder = REPO / "models" / name
    if not (folder / "config.json").is_file():
        pytest.skip(f"{folder} is not here")
    captioner = load(str(folder), precision=precision)
    assert captioner.precision == precision
    photos = sorted((REPO / "examples").glob("*.jpg"))[:3]
    for photo in photos:
        feats = captioner.features([photo])
        result = captioner.caption_features(feats, beam_size=3, n_best=3)[0]
        scored = score_result(captioner, feats, result)
        caps = [result.greedy, *result.beam]
        assert len(scored) == len(caps) == 4
        for c, s in zip(caps, scored):
            assert s.tokens == c.tokens and abs(s.log_prob - c.log_prob) <= TOL, (c.text, s.log_prob, c.log_prob)
