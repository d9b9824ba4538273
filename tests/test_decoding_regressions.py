"""Beam search keeps the hypotheses with the best *length-normalised* score at every step when alpha > 0.

The exhaustive test (a beam as wide as the search space) never prunes, so it cannot see which
hypotheses a narrow beam keeps. Here a fixed Markov decoder (next-word log-probabilities depend on
the last word only) and a beam of 2 make ranking by raw log-probability and ranking by the
normalised score keep different hypotheses; an independent reference beam search says which is right.
"""
from __future__ import annotations

import math

import pytest
import torch

from storyteller.decoding import beam_search, greedy_and_beam_search, greedy_search
from storyteller.vocab import Vocabulary

WORDS = ["a", "b", "c", "d"]
PAD, START, END, UNK = 0, 1, 2, 3


class MarkovDecoder(torch.nn.Module):
    """The decoding protocol (``storyteller.decoders.base``) over a fixed (V, V) table of next-word
    log-probabilities: the table is the step's one product, and a row's state is its photo (never read: the
    next word depends on the last word only)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.vocab = Vocabulary(WORDS)

    def products(self) -> torch.Tensor:
        return self.table

    def initial_state(self, features: torch.Tensor, products: torch.Tensor) -> torch.Tensor:
        return torch.arange(features.shape[0])

    def init_state(self, features: torch.Tensor) -> torch.Tensor:
        return self.initial_state(features, self.products())

    def step(self, tokens: torch.Tensor, state: torch.Tensor, products: torch.Tensor | None = None):
        table = self.products() if products is None else products
        return table[tokens], state

    def select_state(self, state: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return state[rows]

    def scatter_state(self, state: torch.Tensor, rows: torch.Tensor, sub: torch.Tensor) -> torch.Tensor:
        out = state.clone()
        out[rows] = sub
        return out


def random_table(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(4 + len(WORDS), 4 + len(WORDS), generator=g) * 2.0, dim=-1)


def reference_beam(table: torch.Tensor, K: int, max_len: int, alpha: float, normalised_pruning: bool = True):
    """A plain-Python beam search with the documented semantics; returns [(word ids, raw log-prob, score)]."""
    def penalty(n: int) -> float:
        return ((5 + n) / 6) ** alpha if alpha else 1.0

    beams = [([], 0.0, False)]  # (emitted ids incl. <end>, raw log-prob, finished)
    for t in range(max_len):
        cands = []
        for ids, raw, done in beams:
            if done:
                cands.append((ids, raw, True))
                continue
            last = ids[-1] if ids else START
            for v in range(table.shape[1]):
                if v in (PAD, START, UNK) or (v == END and t < 1):
                    continue
                cands.append((ids + [v], raw + float(table[last, v]), v == END))
        key = (lambda h: h[1] / penalty(len(h[0]))) if normalised_pruning else (lambda h: h[1])
        beams = sorted(cands, key=key, reverse=True)[:K]
        if all(done for _, _, done in beams):
            break
    final = sorted(beams, key=lambda h: h[1] / penalty(len(h[0])), reverse=True)
    return [([i for i in ids if i != END], raw, raw / penalty(len(ids))) for ids, raw, _ in final]


def discriminating_seed(K: int, max_len: int, alpha: float) -> int:
    """The first table where raw-log-prob pruning keeps a different best caption than normalised pruning."""
    for seed in range(500):
        t = random_table(seed)
        if reference_beam(t, K, max_len, alpha)[0][0] != reference_beam(t, K, max_len, alpha, False)[0][0]:
            return seed
    raise AssertionError("no discriminating table found")


@pytest.mark.parametrize("alpha", [0.7, 1.5])
def test_narrow_beam_prunes_by_the_length_normalised_score(alpha):
    K, max_len = 2, 6
    seed = discriminating_seed(K, max_len, alpha)
    table = random_table(seed)
    expected = reference_beam(table, K, max_len, alpha)
    raw_pruned = reference_beam(table, K, max_len, alpha, normalised_pruning=False)
    assert expected[0][0] != raw_pruned[0][0]  # the test can tell the two rankings apart
    got = beam_search(MarkovDecoder(table), torch.zeros(1, 1), beam_size=K, max_len=max_len, alpha=alpha,
                      n_best=K, suppress_unk=True)[0]
    assert [c.tokens for c in got] == [ids for ids, _, _ in expected], (seed, got, expected)
    for c, (_, raw, score) in zip(got, expected):
        assert math.isclose(c.log_prob, raw, abs_tol=1e-4) and math.isclose(c.score, score, abs_tol=1e-4)


def test_alpha_zero_prunes_by_raw_log_probability():
    table = random_table(discriminating_seed(2, 6, 0.7))
    got = beam_search(MarkovDecoder(table), torch.zeros(1, 1), beam_size=2, max_len=6, alpha=0.0, n_best=2)[0]
    assert [c.tokens for c in got] == [ids for ids, _, _ in reference_beam(table, 2, 6, 0.0)]


class StridedMarkovDecoder(MarkovDecoder):
    """The same decoder, whose step returns a transposed view (not contiguous) of its log-probabilities."""

    def __init__(self, table: torch.Tensor):
        super().__init__(table)
        self.columns = table.t().contiguous()  # (V, V): next word x last word

    def step(self, tokens: torch.Tensor, state, products=None):
        return self.columns[:, tokens].t(), state


def test_a_step_that_returns_a_strided_view_is_searched_the_same():
    """The token rules set forbidden cells through a flat view of the step's output: a decoder may return a
    strided tensor, and the search must still apply every rule to it (n-grams, bad endings, special tokens)."""
    table = random_table(3)
    kw = dict(beam_size=3, max_len=8, alpha=0.7, n_best=3, no_repeat_ngram_size=2, bad_endings=["b"])
    assert not StridedMarkovDecoder(table).step(torch.tensor([4, 5]), None)[0].is_contiguous()
    want = greedy_and_beam_search(MarkovDecoder(table), torch.zeros(2, 1), **kw)
    got = greedy_and_beam_search(StridedMarkovDecoder(table), torch.zeros(2, 1), **kw)
    for g, w in zip([got[0], *got[1]], [want[0], *want[1]]):
        assert [(c.tokens, c.finished) for c in g] == [(c.tokens, c.finished) for c in w]
    for c in [*got[0], *(c for cs in got[1] for c in cs)]:
        ids = [START, *c.tokens]
        assert len({tuple(ids[i:i + 2]) for i in range(1, len(ids) - 1)}) == len(ids) - 2  # no repeated bigram
        assert c.tokens[-1] != 5 or not c.finished  # never ends on "b"


def test_exact_ties_greedy_is_the_same_alone_in_the_one_pass_and_as_a_beam_of_one():
    """A table full of exactly equal log-probabilities (as an untrained or quantised head gives): greedy search,
    the greedy half of the one pass, and a beam of 1 all take the first of equal tokens."""
    g = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(16)]
    table = torch.log_softmax(torch.randint(0, 2, (4 + len(words),) * 2, generator=g).float(), -1)
    model = MarkovDecoder(table)
    model.vocab = Vocabulary(words)
    feats = torch.zeros(3, 1)
    alone = [c.tokens for c in greedy_search(model, feats, max_len=6)]
    assert [c.tokens for c in greedy_and_beam_search(model, feats, beam_size=5, max_len=6)[0]] == alone
    assert [cs[0].tokens for cs in beam_search(model, feats, beam_size=1, max_len=6)] == alone
    assert [cs[0].tokens for cs in greedy_and_beam_search(model, feats, beam_size=1, max_len=6)[1]] == alone


def test_a_decoder_with_bfloat16_log_probabilities_is_searched():
    """NumPy has no bfloat16: a decoder stepping in bfloat16 gets the captions of the same values in float32."""
    table = random_table(5).to(torch.bfloat16)

    class Bf16Decoder(MarkovDecoder):
        def step(self, tokens, state, products=None):
            return self.table[tokens].to(torch.bfloat16), state

    kw = dict(beam_size=3, max_len=6, alpha=0.5, n_best=2, no_repeat_ngram_size=2)
    got = greedy_and_beam_search(Bf16Decoder(table), torch.zeros(2, 1), **kw)
    want = greedy_and_beam_search(MarkovDecoder(table.float()), torch.zeros(2, 1), **kw)
    assert [c.tokens for c in got[0]] == [c.tokens for c in want[0]]
    assert [[c.tokens for c in cs] for cs in got[1]] == [[c.tokens for c in cs] for cs in want[1]]


def test_greedy_rows_take_the_first_of_tied_best_words_alone_and_beside_beams():
    """Greedy search takes ``max``'s answer, the lowest id of the best value, also when its rows share a
    step with beam rows (one pass) and whatever order ``topk`` gives equal values."""
    V = 4 + len(WORDS)
    table = torch.full((V, V), -5.0)
    table[:, 4:] = torch.log(torch.tensor([0.1, 0.3, 0.3, 0.3]))  # "b", "c", "d" tie after every word
    table[:, END] = -3.0  # (the tied words beat <end>)
    model = MarkovDecoder(torch.log_softmax(table, -1))
    alone = greedy_search(model, torch.zeros(3, 1), max_len=4)
    together, _ = greedy_and_beam_search(model, torch.zeros(3, 1), beam_size=3, max_len=4, alpha=0.5)
    want = [5, 5, 5, 5]  # "b" every time: the first of the three tied ids
    assert [c.tokens for c in alone] == [c.tokens for c in together] == [want] * 3
