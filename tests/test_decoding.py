import itertools

import pytest
import torch

from storyteller.decoders import ShowAndTell, ShowAttendTell
from storyteller.decoding import beam_search, greedy_search
from storyteller.vocab import Vocabulary

END = Vocabulary.end_id
GRID = (2, 3)  # the attention decoder's test grids: 6 regions of 10 channels


@pytest.fixture(params=["pooled", "attention"])
def kind(request):
    """Every search test runs for both decoders: the same interface, the same guarantees."""
    return request.param


def make_model(kind="pooled", words=("a", "dog", "cat", "runs", "on", "grass", "the"), seed=0, hidden=16):
    torch.manual_seed(seed)
    vocab = Vocabulary(list(words))
    if kind == "attention":
        m = ShowAttendTell(len(vocab), feature_dim=10, embed_dim=8, hidden_dim=hidden, attention_dim=8, dropout=0.2)
        with torch.no_grad():  # peakier attention than the default init, so where it looks matters
            m.att_out.weight.mul_(4)
    else:
        m = ShowAndTell(len(vocab), feature_dim=10, embed_dim=8, hidden_dim=hidden, num_layers=2, dropout=0.2)
    with torch.no_grad():  # sharper distributions than the default init, so searches disagree
        m.head.weight.mul_(8)
    m.vocab = vocab
    return m.eval()


def rand_feats(kind, n):
    """n images' features: pooled (n, 10), or (n, 2, 3, 10) grids for the attention decoder."""
    return torch.randn(n, *GRID, 10) if kind == "attention" else torch.randn(n, 10)


def seq_logprob(model, feature, tokens):
    """log P(tokens | image) under the model, with the decoders' masking (<pad>, <start>, <unk> never emitted)."""
    with torch.no_grad():
        state = model.init_state(feature[None])
        prev, total = torch.tensor([Vocabulary.start_id]), 0.0
        for tok in tokens:
            logp, state = model.step(prev, state)
            total += float(logp[0, tok])
            prev = torch.tensor([tok])
    return total


def brute_force(model, feature, max_len, alpha, min_len):
    """Every caption the searches could return, with its length-normalised score."""
    words = list(range(4, model.vocab_size))
    out = []
    for n in range(0, max_len + 1):
        for ws in itertools.product(words, repeat=n):
            if n < max_len and n >= min_len:
                seq = list(ws) + [END]  # finished
            elif n == max_len:
                seq = list(ws)  # cut at max_len
            else:
                continue
            lp = seq_logprob(model, feature, seq)
            out.append((lp / (((5 + len(seq)) / 6) ** alpha), list(ws)))
    return sorted(out, key=lambda x: -x[0])


@pytest.mark.parametrize("alpha,min_len", [(0.0, 1), (0.7, 0), (1.5, 1)])
def test_exhaustive_beam_finds_the_true_best_caption(kind, alpha, min_len):
    model = make_model(kind, words=("a", "b"), seed=3)  # vocab of 6: 4 specials + 2 words
    feats = rand_feats(kind, 3)
    max_len = 4
    for b in range(3):
        truth = brute_force(model, feats[b], max_len, alpha, min_len)
        # every state the search can reach fits in a beam of 32: exhaustive
        got = beam_search(model, feats[b:b + 1], beam_size=32, max_len=max_len, alpha=alpha, n_best=5,
                          min_len=min_len)[0]
        assert [c.tokens for c in got] == [ws for _, ws in truth[:5]]
        assert [c.score for c in got] == pytest.approx([s for s, _ in truth[:5]], abs=1e-5)
        # a narrow beam never beats the exhaustive optimum
        narrow = beam_search(model, feats[b:b + 1], beam_size=2, max_len=max_len, alpha=alpha, min_len=min_len)[0][0]
        assert narrow.score <= truth[0][0] + 1e-5


def test_beam_of_one_is_exactly_greedy(kind):
    model = make_model(kind)
    feats = rand_feats(kind, 6)
    for kwargs in [{}, {"no_repeat_ngram_size": 2}, {"suppress_unk": False, "min_len": 0}]:
        greedy = greedy_search(model, feats, max_len=12, **kwargs)
        beam = beam_search(model, feats, beam_size=1, max_len=12, **kwargs)
        assert [g.tokens for g in greedy] == [b[0].tokens for b in beam]
        assert [g.log_prob for g in greedy] == pytest.approx([b[0].log_prob for b in beam], abs=1e-5)
        assert [g.finished for g in greedy] == [b[0].finished for b in beam]


def test_batch_gives_the_same_captions_as_one_image_at_a_time(kind):
    model = make_model(kind)
    feats = rand_feats(kind, 5)
    g_batch = greedy_search(model, feats, max_len=10)
    b_batch = beam_search(model, feats, beam_size=4, max_len=10, alpha=0.6, n_best=3)
    for i in range(5):
        assert greedy_search(model, feats[i:i + 1], max_len=10)[0].tokens == g_batch[i].tokens
        single = beam_search(model, feats[i:i + 1], beam_size=4, max_len=10, alpha=0.6, n_best=3)[0]
        assert [c.tokens for c in single] == [c.tokens for c in b_batch[i]]


def test_greedy_log_prob_is_the_sequence_log_probability(kind):
    model = make_model(kind)
    feats = rand_feats(kind, 3)
    for f, cap in zip(feats, greedy_search(model, feats, max_len=8)):
        seq = cap.tokens + ([END] if cap.finished else [])
        assert cap.log_prob == pytest.approx(seq_logprob(model, f, seq), abs=1e-5)


def test_n_best_sorted_and_max_len_holds(kind):
    model = make_model(kind)
    feats = rand_feats(kind, 4)
    for max_len in (1, 3, 7):
        for caps in beam_search(model, feats, beam_size=6, max_len=max_len, n_best=6, alpha=0.8):
            assert 1 <= len(caps) <= 6
            scores = [c.score for c in caps]
            assert scores == sorted(scores, reverse=True)
            assert all(len(c.tokens) <= max_len for c in caps)
            assert len({tuple(c.tokens) for c in caps}) == len(caps)  # no duplicate hypotheses
        assert all(len(c.tokens) <= max_len for c in greedy_search(model, feats, max_len=max_len))


def test_a_model_that_never_ends_still_yields_captions(kind):
    model = make_model(kind)
    with torch.no_grad():
        model.head.bias[END] = -1e4
    feats = rand_feats(kind, 3)
    for cap in greedy_search(model, feats, max_len=6):
        assert len(cap.tokens) == 6 and not cap.finished and cap.text
    for caps in beam_search(model, feats, beam_size=4, max_len=6, n_best=2):
        assert len(caps) == 2
        assert all(len(c.tokens) == 6 and not c.finished and c.text for c in caps)


def test_special_tokens_never_reach_the_text(kind):
    model = make_model(kind)
    with torch.no_grad():
        model.head.bias[Vocabulary.unk_id] = 50.0  # the model wants <unk> everywhere
        model.head.bias[Vocabulary.pad_id] = 40.0
    feats = rand_feats(kind, 3)
    for cap in greedy_search(model, feats, max_len=5):
        assert Vocabulary.unk_id not in cap.tokens and cap.text and "<" not in cap.text
    for caps in beam_search(model, feats, beam_size=3, max_len=5, n_best=3):
        for c in caps:
            assert Vocabulary.unk_id not in c.tokens and "<" not in c.text


def test_unk_allowed_is_shown_in_the_text_and_scores_back(kind):
    """With suppress_unk=False an emitted <unk> stays in tokens and shows as "<unk>" in the text, never silently
    dropped (a caption reading "... is eating a"), and scoring its tokens gives back its log_prob."""
    from storyteller.scoring import score_captions

    model = make_model(kind)
    with torch.no_grad():
        model.head.bias[Vocabulary.unk_id] = 3.0  # <unk> likely, but not everywhere
    feats = rand_feats(kind, 4)
    greedy = greedy_search(model, feats, max_len=6, suppress_unk=False)
    beams = beam_search(model, feats, beam_size=3, max_len=6, n_best=3, suppress_unk=False)
    caps = [(b, c) for b, c in enumerate(greedy)] + [(b, c) for b, cs in enumerate(beams) for c in cs]
    assert sum(Vocabulary.unk_id in c.tokens for _, c in caps) >= 3
    for _, c in caps:
        assert c.text.split() == [model.vocab.itos[i] for i in c.tokens]
        assert c.text.split().count("<unk>") == c.tokens.count(Vocabulary.unk_id)
    scored = score_captions(model, feats, [c.tokens for _, c in caps], [c.finished for _, c in caps],
                            images=[b for b, _ in caps], top_k=0)
    for (_, c), s in zip(caps, scored):
        assert s.log_prob == pytest.approx(c.log_prob, abs=1e-4)


def test_repeated_ngram_blocking(kind):
    model = make_model(kind)
    with torch.no_grad():
        model.head.bias[5] = 30.0  # "dog dog dog ..." unless blocked
    feats = rand_feats(kind, 2)
    assert greedy_search(model, feats, max_len=6)[0].tokens == [5] * 6
    for n in (2, 3):
        outs = [c.tokens for c in greedy_search(model, feats, max_len=8, no_repeat_ngram_size=n)]
        outs += [c.tokens for caps in beam_search(model, feats, beam_size=3, max_len=8, n_best=3,
                                                  no_repeat_ngram_size=n) for c in caps]
        for toks in outs:
            grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
            assert len(grams) == len(set(grams)), toks


def test_decoding_restores_training_mode_and_validates_arguments(kind):
    model = make_model(kind).train()
    feats = rand_feats(kind, 2)
    a = greedy_search(model, feats, max_len=5)
    assert model.training  # mode restored
    assert [c.tokens for c in a] == [c.tokens for c in greedy_search(model, feats, max_len=5)]  # dropout was off
    model.eval()
    next(m for m in model.modules() if isinstance(m, torch.nn.Dropout)).train()  # one part left in training mode
    assert [[c.tokens for c in greedy_search(model, feats, max_len=5)] for _ in range(4)] == [[c.tokens for c in a]] * 4
    with pytest.raises(ValueError):
        beam_search(model, feats, beam_size=0)
    with pytest.raises(ValueError):
        beam_search(model, feats, beam_size=2, n_best=3)
    with pytest.raises(ValueError):
        greedy_search(model, torch.randn(10), max_len=5)
    with pytest.raises(ValueError):
        greedy_search(model, feats, max_len=0)


def test_attention_maps_come_back_one_per_word(kind):
    model = make_model(kind)
    feats = rand_feats(kind, 3)
    greedy = greedy_search(model, feats, max_len=7)
    beams = beam_search(model, feats, beam_size=3, max_len=7, n_best=2)
    for cap in greedy + [c for caps in beams for c in caps]:
        if kind == "pooled":
            assert cap.attention is None
            continue
        assert cap.attention.shape == (len(cap.tokens), *GRID)
        assert (cap.attention >= 0).all()
        assert cap.attention.flatten(1).sum(1) == pytest.approx(torch.ones(len(cap.tokens)), abs=1e-5)


def test_attention_maps_are_the_steps_that_chose_each_word():
    # Replay the greedy caption step by step: word i's map must be the weights of the step that emitted it.
    model = make_model("attention")
    feats = rand_feats("attention", 2)
    for f, cap in zip(feats, greedy_search(model, feats, max_len=6)):
        with torch.no_grad():
            state = model.init_state(f[None])
            prev = torch.tensor([Vocabulary.start_id])
            for i, tok in enumerate(cap.tokens):
                _, state, alpha = model.step(prev, state, return_attention=True)
                assert torch.allclose(cap.attention[i].flatten(), alpha[0], atol=1e-6)
                prev = torch.tensor([tok])
    # the same captions from beam 1 carry the same maps, through beam search's reordering
    for g, b in zip(greedy_search(model, feats, max_len=6), beam_search(model, feats, beam_size=1, max_len=6)):
        assert torch.allclose(g.attention, b[0].attention, atol=1e-6)


def test_bad_endings_are_never_the_last_word(kind):
    """The rule forbids <end> after the words it names, and only there: the word most captions end on is
    banned as an ending, captions still finish (on other words), and none finishes on it."""
    from collections import Counter

    model, feats = make_model(kind), rand_feats(kind, 12)
    with torch.no_grad():  # a model that ends often, on many words (a random one rarely ends at all)
        model.head.bias[END] += 4.0

    def endings(**kw):  # (finished, last word) of every greedy and beam caption
        caps = greedy_search(model, feats, max_len=8, **kw)
        caps += [c for cs in beam_search(model, feats, beam_size=3, max_len=8, n_best=3, **kw) for c in cs]
        return [(c.finished, model.vocab.itos[c.tokens[-1]]) for c in caps if c.tokens]

    ended = Counter(w for finished, w in endings() if finished)
    assert ended, "the test needs captions that end"
    bad = ended.most_common(1)[0][0]
    finished = [w for done, w in endings(bad_endings=[bad]) if done]
    assert finished, "the rule must leave finished captions to check"
    assert bad not in finished
    with pytest.raises(TypeError):
        greedy_search(model, feats, bad_endings="the")


def test_non_finite_features_are_a_clear_error(kind):
    """Bug 5 of issue 21: NaN or inf features gave an empty beam list and an IndexError in greedy search."""
    model = make_model(kind)
    for bad in (float("nan"), float("inf")):
        feats = rand_feats(kind, 3)
        feats[1].view(-1)[0] = bad
        for search in (greedy_search, beam_search):
            with pytest.raises(ValueError, match="NaN or infinite"):
                search(model, feats, max_len=5)


def test_a_caption_comes_back_even_when_every_word_is_forbidden(kind):
    # One word, no repeated unigram, at least two words: after "a" nothing is allowed.
    model = make_model(kind, words=("a",))
    feats = rand_feats(kind, 2)
    for cap in greedy_search(model, feats, max_len=5, no_repeat_ngram_size=1, min_len=2):
        assert cap.tokens == [4] and cap.finished
    for caps in beam_search(model, feats, beam_size=3, max_len=5, no_repeat_ngram_size=1, min_len=2, n_best=1):
        assert len(caps) == 1 and caps[0].tokens == [4]


def test_attention_weights_are_a_distribution_on_any_grid():
    model = make_model("attention")
    for grid in [(1, 1), (3, 5), (7, 7)]:
        feats = torch.randn(2, *grid, 10)
        with torch.no_grad():
            state = model.init_state(feats)
            logp, state, alpha = model.step(torch.full((2,), Vocabulary.start_id), state, return_attention=True)
        assert alpha.shape == (2, grid[0] * grid[1]) and logp.shape == (2, model.vocab_size)
        assert (alpha >= 0).all() and alpha.sum(-1) == pytest.approx(torch.ones(2), abs=1e-6)
        cap = greedy_search(model, feats, max_len=4)[0]
        assert cap.attention.shape == (len(cap.tokens), *grid)
    with pytest.raises(ValueError, match="grids"):
        model.init_state(torch.randn(2, 10))  # pooled features: no regions to attend over


def _searches_to_the_end(monkeypatch):
    """Turn the early stop off: every image runs until its hypotheses all finish or reach max_len."""
    from storyteller import decoding

    monkeypatch.setattr(decoding._Beams, "_stop_done_images", lambda self, lp: None)


def _count_steps(model):
    calls = []
    step = model.step
    model.step = lambda *a, **k: calls.append(1) or step(*a, **k)
    return calls


@pytest.mark.parametrize("alpha", [-1.0, 0.0, 0.6, 1.5])
def test_early_stop_returns_exactly_what_a_search_to_the_end_returns(kind, alpha, monkeypatch):
    """An image stops once no open hypothesis can reach its n_best-th finished one; its captions,
    scores and order are those of the search run to the end (batched, alone, and in the one pass
    with greedy), and it saves decoder steps. (Stopping at the current length's penalty instead of the
    largest one it can still get fails here at alpha 1.5.)"""
    from storyteller.decoding import greedy_and_beam_search

    def run(model, feats, kw):
        batch = beam_search(model, feats, **kw)
        calls = _count_steps(model)
        alone = [beam_search(model, feats[i:i + 1], **kw)[0] for i in range(len(feats))]
        steps = len(calls)
        del model.step
        one_pass = greedy_and_beam_search(model, feats, **kw)[1]
        caps = [c for cs in batch + alone + one_pass for c in cs]
        maps = [c.attention for c in caps if c.attention is not None]
        return [(c.tokens, c.finished) for c in caps], [c.score for c in caps], maps, steps

    steps_to_end = steps_early = 0
    for seed in range(16):  # long-lasting hypotheses that win late, at alpha 1.5, appear in a few of these
        model = make_model(kind, seed=seed)
        with torch.no_grad():  # captions that end, some early and some late
            model.head.bias[END] += 2.0 * (seed % 2)
        torch.manual_seed(seed)
        feats = rand_feats(kind, 4)
        for n_best in (1, 2):
            kw = dict(beam_size=4, max_len=16, alpha=alpha, n_best=n_best, no_repeat_ngram_size=2 * (seed % 3 == 0))
            with monkeypatch.context() as m:
                _searches_to_the_end(m)
                want, want_scores, want_maps, full = run(model, feats, kw)
            got, scores, maps, early = run(model, feats, kw)
            assert got == want, (seed, n_best)
            # fewer live rows run in smaller batches: float32 products may round the last bit differently
            assert scores == pytest.approx(want_scores, rel=1e-6), (seed, n_best)
            assert len(maps) == len(want_maps) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(maps, want_maps))
            steps_to_end, steps_early = steps_to_end + full, steps_early + early
    assert steps_early < steps_to_end  # it did stop early somewhere


@pytest.mark.parametrize("when", ["every step", "first step"])
def test_early_stop_holds_for_a_decoder_that_returns_positive_scores(kind, when, monkeypatch):
    """The bound needs log-probabilities from the stop on: a decoder returning raw scores above 0 at every
    step is searched to the end; scores above 0 from earlier steps (here the first) only change which
    length penalty bounds them. Either way the captions are those of a search to the end."""
    from storyteller import decoding

    model = make_model(kind, seed=1)
    step = model.step

    def raw(tokens, *a, **k):  # +5: every step, or only the first one (its input is <start>)
        out = step(tokens, *a, **k)
        bonus = 5.0 if when == "every step" else 5.0 * (tokens == Vocabulary.start_id).float()[:, None]
        return (out[0] + bonus, *out[1:])

    model.step = raw
    kw = dict(beam_size=4, max_len=10, alpha=0.6, n_best=1)
    checked, stop = [], decoding._Beams._stop_done_images

    def watched(self, lp):
        was = self.open.copy()
        stop(self, lp)
        checked.append(bool((was == self.open).all()))

    for seed in range(6):
        torch.manual_seed(seed)
        feats = rand_feats(kind, 4)
        with monkeypatch.context() as m:
            m.setattr(decoding._Beams, "_stop_done_images", watched)
            got = beam_search(model, feats, **kw)
        with monkeypatch.context() as m:
            _searches_to_the_end(m)
            want = beam_search(model, feats, **kw)
        assert [[c.tokens for c in caps] for caps in got] == [[c.tokens for c in caps] for caps in want], seed
    assert checked
    if when == "every step":
        assert all(checked)  # no image was ever closed early


def test_an_empty_batch_gives_no_captions(kind):
    model = make_model(kind)
    assert greedy_search(model, rand_feats(kind, 0), max_len=4) == []
    assert beam_search(model, rand_feats(kind, 0), beam_size=3, max_len=4) == []


def test_features_that_overflow_the_decoder_are_a_clear_error():
    """Finite but huge features can make the attention decoder's log-probabilities NaN: one clear error, not an
    empty beam list or an IndexError."""
    model = make_model("attention")
    feats = rand_feats("attention", 2) * 1e38
    with pytest.raises(ValueError, match="NaN log-probabilities"):
        beam_search(model, feats, beam_size=3, max_len=4)


def test_decoding_restores_every_modules_own_mode_and_refuses_negative_ngrams(kind):
    model = make_model(kind).train()
    model.embed_dropout.eval()  # a submodule in its own mode
    greedy_search(model, rand_feats(kind, 2), max_len=3)
    assert model.training and not model.embed_dropout.training and model.out_dropout.training
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        greedy_search(model, rand_feats(kind, 2), max_len=3, no_repeat_ngram_size=-1)



@pytest.mark.parametrize("kind", ["pooled", "attention", "ensemble"])
def test_captions_carry_per_word_log_probs_that_add_up_and_match_teacher_forced_scoring(kind, tmp_path):
    """Each caption's per-word log-probabilities, recorded by the search as it goes (beams reordered), add up to
    its log_prob and equal what teacher-forced scoring finds, for finished and cut captions."""
    import numpy as np

    from helpers_models import save_test_model
    from storyteller.decoders import load_decoder
    from storyteller.decoding import greedy_and_beam_search
    from storyteller.scoring import score_captions
    from train import ensemble as ensemble_cmd

    pooled = save_test_model(tmp_path / "p", seed=1, pretrained_backbone=False)
    attention = save_test_model(tmp_path / "a", seed=2, pretrained_backbone=False, attention=True)
    folders = {"pooled": [pooled], "attention": [attention], "ensemble": [attention, pooled]}[kind]
    members = [load_decoder(f) for f in folders]
    with torch.no_grad():
        for m in members:  # <end> likely once allowed: min_len 3 words, so max_len 3 cuts every caption, 12 ends them
            m.head.bias[END] += 5.0
    if kind == "ensemble":
        model = ensemble_cmd.build_ensemble(members, [str(f) for f in folders], [2, 1])
    else:
        (model,) = members
    model.eval()
    g = torch.Generator().manual_seed(3)
    feats = torch.rand((4, 7, 7, 1280) if kind != "pooled" else (4, 1280), generator=g)
    seen_cut = seen_finished = False
    for max_len in (3, 12):
        greedy, beams = greedy_and_beam_search(model, feats, beam_size=3, n_best=3, max_len=max_len, alpha=0.7,
                                               no_repeat_ngram_size=2, min_len=3)
        caps, images = [], []
        for b, (gc, bs) in enumerate(zip(greedy, beams)):
            caps += [gc, *bs]
            images += [b] * (1 + len(bs))
        scored = score_captions(model, feats, [c.tokens for c in caps], [c.finished for c in caps], images=images,
                                min_len=3)
        for c, s in zip(caps, scored):
            assert len(c.word_log_probs) == len(c.tokens)
            assert (c.end_log_prob is None) == (not c.finished)
            seen_cut |= not c.finished
            seen_finished |= c.finished
            parts = np.float32(0.0)
            for lp in c.word_log_probs + ([c.end_log_prob] if c.finished else []):
                parts = np.float32(parts + np.float32(lp))  # the search's own float32 sum
            assert parts == np.float32(c.log_prob), (c.text, c.word_log_probs, c.end_log_prob, c.log_prob)
            assert c.word_log_probs == pytest.approx(s.word_log_probs, abs=1e-4)
            assert (c.end_log_prob is None and s.end_log_prob is None) or c.end_log_prob == pytest.approx(s.end_log_prob, abs=1e-4)
    assert seen_cut and seen_finished
