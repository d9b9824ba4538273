"""storyteller.precision: packed low-precision step weights (int8, bf16) for both decoders, how the
precision is chosen (argument, $STORYTELLER_PRECISION, auto), staleness after training, and the
quality of the shipped models in int8 on the real validation photos (where ../shared is present)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from storyteller import precision as P
from storyteller.attention import ShowAttendTell
from storyteller.captioner import ModelLoadError, load
from storyteller.decoding import greedy_search
from storyteller.model import ShowAndTell
from storyteller.vocab import Vocabulary
from tests.helpers_models import WORDS, save_test_model

INT8 = pytest.mark.skipif("int8" not in P.supported_precisions(), reason="no PyTorch int8 engine on this CPU")


def decoders():
    torch.manual_seed(0)
    vocab = Vocabulary.build([" ".join(WORDS)] * 5, min_freq=1)
    pooled = ShowAndTell(len(vocab), feature_dim=64, embed_dim=32, hidden_dim=64, num_layers=2)
    att = ShowAttendTell(len(vocab), feature_dim=64, embed_dim=32, hidden_dim=64, attention_dim=32, grid=[3, 3])
    for m in (pooled, att):
        m.vocab = vocab
        m.eval()
    return [(pooled, torch.randn(5, 64)), (att, torch.randn(5, 3, 3, 64))]


@pytest.mark.parametrize("precision", ["int8", "bf16"])
@pytest.mark.parametrize("kind", [0, 1], ids=["pooled", "attention"])
def test_packed_step_is_the_float_step_to_within_its_precision(precision, kind):
    if precision == "int8" and "int8" not in P.supported_precisions():
        pytest.skip("no int8 engine")
    model, feats = decoders()[kind]
    tokens = torch.tensor([1, 5, 6, 7, 8])
    with torch.inference_mode():
        state = model.init_state(feats)
        want, want_state = model.step(tokens, state)[:2]
        P.prepare(model, precision)
        assert P.packed(model) is not None and P.packed(model).precision == precision
        got, got_state = model.step(tokens, state)[:2]
    prob_err = (got.exp() - want.exp()).abs().max().item()
    assert 0 < prob_err < 0.02, prob_err  # packed (not the float path), and close
    assert (got_state[0] - want_state[0]).abs().max() < 0.1  # hidden states in (-1, 1)
    P.prepare(model, "fp32")  # unpacks
    assert P.packed(model) is None


@pytest.mark.parametrize("precision", ["int8", "bf16"])
@pytest.mark.parametrize("kind", [0, 1], ids=["pooled", "attention"])
def test_packed_state_carries_the_next_steps_products(precision, kind):
    """A packed step multiplies each new hidden state once and passes the next step's part on in the state.
    Over steps with beam-style row reordering it stays with the float steps, and the part it carries equals
    what a step makes afresh from a state without it."""
    if precision == "int8" and "int8" not in P.supported_precisions():
        pytest.skip("no int8 engine")
    model, feats = decoders()[kind]
    order = torch.tensor([2, 2, 0, 4, 1])  # rows copied and dropped, as beam search does
    with torch.inference_mode():
        states = {}
        for p in ("fp32", precision):
            P.prepare(model, p)
            state, tokens = model.init_state(feats), torch.tensor([1, 5, 6, 7, 8])
            for _ in range(4):
                logp, state = model.step(tokens, state)[:2]
                state, tokens = model.select_state(state, order), logp.argmax(-1)[order]
            states[p] = (logp, state, tokens)
        (want, _, _), (got, state, tokens) = states["fp32"], states[precision]
        assert len(state) == len(states["fp32"][1]) + 1  # the carried products
        assert (got.exp() - want.exp()).abs().max() < 0.03
        fresh = model.step(tokens, state[:-1])[0]  # the same step, its carried part made afresh (rec / pre packs)
        carried = model.step(tokens, state)[0]
    if precision == "int8":  # integer sums: the recurrent rows alone give exactly the stacked product's numbers
        assert torch.equal(carried, fresh)
    else:  # bfloat16 kernels may sum a (4H, H) and a (V + 4H, H) product's rows in different orders
        assert (carried - fresh).abs().max() < 1e-2


@INT8
def test_int8_rows_do_not_depend_on_the_other_rows_of_their_batch():
    """PyTorch's dynamic int8 linear quantises a batch with one scale; ours quantises each row alone, so
    a photo's greedy row gives the same numbers beside beam rows, or beside another photo's large ones."""
    torch.manual_seed(0)
    w, b = torch.randn(96, 48) * 0.1, torch.randn(96)
    lin = P._Int8Linear(w, b)
    rows = torch.randn(6, 48) * torch.logspace(-2, 2, 6)[:, None]  # magnitudes 0.01 .. 100
    alone = torch.cat([lin(rows[i:i + 1]) for i in range(6)])
    assert torch.equal(lin(rows), alone)
    assert torch.equal(lin(rows.flip(0)), alone.flip(0))
    ref = rows @ w.T + b
    rel = ((alone - ref).norm(dim=1) / (rows @ w.T).norm(dim=1)).max().item()
    # each row to within 7-8-bit precision of its own scale (0.09 measured at 48 inputs), small rows included:
    # one scale for the batch would round the 0.01-sized row to zeros (error 1.0)
    assert rel < 0.2, rel
    assert torch.equal(lin(rows[None]), alone[None])  # (1, rows, in) inputs keep their shape


def test_packed_gates_give_the_lstm_cell():
    """Gate rows reordered i, f, o, 2g and one sigmoid (tanh(g) = 2 sigmoid(2g) - 1) are the LSTM cell."""
    from storyteller.model import lstm_update, packed_gates

    torch.manual_seed(0)
    H, E, N = 16, 8, 5
    w_ih, w_hh, b_ih, b_hh = torch.randn(4 * H, E), torch.randn(4 * H, H), torch.randn(4 * H), torch.randn(4 * H)
    x, h, c = torch.randn(N, E) * 2, torch.rand(N, H) * 2 - 1, torch.randn(N, H)
    want_h, want_c = torch.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    gates = x @ packed_gates(w_ih, H).T + h @ packed_gates(w_hh, H).T + packed_gates(b_ih + b_hh, H)
    got_h, got_c = lstm_update(gates, c)
    assert torch.allclose(got_h, want_h, atol=1e-6) and torch.allclose(got_c, want_c, atol=1e-6)
    table = torch.randn(7, 4 * H)  # a word table's gates are its columns
    assert torch.equal(packed_gates(table, H, dim=1), packed_gates(table.T, H).T)


@pytest.mark.parametrize("kind", [0, 1], ids=["pooled", "attention"])
def test_packed_step_in_float32_is_the_float_step(kind):
    """The packing itself (word tables, stacked products, gate rows i, f, o, 2g, carried products) in
    float32: the same numbers as the model's own step, to float32 rounding, over steps with beam-style
    row reordering. (int8 and bf16 are checked above to within their precision, which would hide a
    packing slip such as an unpacked bias.)"""
    model, feats = decoders()[kind]
    order = torch.tensor([2, 2, 0, 4, 1])
    with torch.inference_mode():
        out = {}
        for packed in (False, True):
            model._packed = P.PackedWeights("fp32", model.step_linears(), list(model.parameters()),
                                            unit_range=model.step_unit_range) if packed else None
            state, tokens, logps = model.init_state(feats), torch.tensor([1, 5, 6, 7, 8]), []
            for _ in range(4):
                logp, state = model.step(tokens, state)[:2]
                logps.append(logp)
                state, tokens = model.select_state(state, order), logp.argmax(-1)[order]
            out[packed] = torch.stack(logps)
        model._packed = None
    assert (out[True] - out[False]).abs().max() < 1e-5


@INT8
def test_hidden_state_products_skip_the_row_rescaling_and_stay_batch_independent():
    """Products of a hidden state (always within [-1, 1]) quantise on the fixed range the +1 / -1
    columns set, with the bias in the kernel: the same numbers alone or in any batch, and as close to
    the float product as the rescaled rows. The context (unbounded) keeps its per-row scale."""
    torch.manual_seed(0)
    w, b = torch.randn(96, 48) * 0.1, torch.randn(96)
    unit, scaled = P._Int8Linear(w, b, unit_range=True), P._Int8Linear(w, b)
    h = torch.tanh(torch.randn(6, 48) * 2)  # hidden-state-like rows, max |h| near 1
    alone = torch.cat([unit(h[i:i + 1]) for i in range(6)])
    assert torch.equal(unit(h), alone) and torch.equal(unit(h.flip(0)), alone.flip(0))
    ref = h @ w.T + b
    assert (unit(h) - ref).abs().max() < 2 * (scaled(h) - ref).abs().max() + 1e-3
    assert unit.bias is None and scaled.bias is not None  # the bias went into the kernel
    for model, _ in decoders():
        P.prepare(model, "int8")
        ops = {n: op for n, op in P.packed(model).ops.items() if isinstance(op, P._Int8Linear)}
        assert {n for n, op in ops.items() if op.unit_range} == set(model.step_unit_range) == set(ops) - {"ih_context"}


@INT8
def test_int8_output_layer_cannot_overflow_the_kernels_16_bit_sums():
    """fbgemm's AVX2 kernel adds pairs of uint8 x int8 products in int16: 8-bit activations at their
    largest (255) times weights at theirs (127) overflow it. The output layer quantises to 7 bits, so even
    the worst row comes out right; the gates keep 8 bits (measured on validation: they hold)."""
    w, x = torch.ones(8, 64), torch.ones(2, 64)  # every product at its largest
    x[1] = torch.linspace(-1, 1, 64)  # and a row whose products cancel
    y = P._Int8Linear(w, torch.zeros(8), reduce_range=True)(x)
    assert y[0].tolist() == pytest.approx([64.0] * 8, rel=0.02)  # 8 bits gave 0.5 here (AVX2, no VNNI)
    assert y[1].abs().max() < 0.5
    for model, _ in decoders():
        P.prepare(model, "int8")
        ops = P.packed(model).ops
        seven = {name for name, op in ops.items() if isinstance(op, P._Int8Linear) and op.reduce_range}
        assert "head" in seven and seven == set(model.step_seven_bit)


@INT8
def test_first_step_recurrent_packs_equal_the_stacked_products():
    """int8: the first step multiplies the initial state by the recurrent rows alone (``rec{l}``; the
    attention model's ``pre``): exactly the numbers the stacked products that later steps use give for
    those rows (same int8 weights, same activation bits, integer sums), so no caption depends on which
    product made them. (float32 packs: test_packed_step_in_float32_is_the_float_step.)"""
    for model, feats in decoders():
        P.prepare(model, "int8")
        ops = P.packed(model).ops
        with torch.inference_mode():
            h = model.init_state(feats)[0]  # (L, B, H)
            if model.has_attention:
                V = model.head.out_features
                pairs = [(ops["pre"](h[0]), ops["head"](h[0])[:, V:])]
            else:
                G, L = 4 * model.hidden_dim, model.num_layers
                names = [f"out{layer}" for layer in range(L - 1)] + ["head"]
                pairs = [(ops[f"rec{layer}"](h[layer]), ops[name](h[layer])[:, -G:]) for layer, name in enumerate(names)]
        model._packed = None
        for alone, stacked in pairs:
            assert torch.equal(alone, stacked)


@pytest.mark.parametrize("precision", ["fp32", "int8", "bf16"])
@pytest.mark.parametrize("kind", [0, 1], ids=["pooled", "attention"])
def test_one_pass_and_batches_decode_as_separate_searches_in_every_precision(precision, kind):
    """greedy_and_beam_search (the app's one pass) = greedy_search + beam_search run apart, and a batch
    = its photos one by one, in each precision: a row's numbers must not depend on its batch."""
    from storyteller.decoding import beam_search, greedy_and_beam_search

    if precision not in P.supported_precisions() and precision != "bf16":  # bf16 runs anywhere, if slowly
        pytest.skip(f"no {precision} engine on this CPU")
    model, feats = decoders()[kind]
    P.prepare(model, precision)
    kw = dict(max_len=8, no_repeat_ngram_size=2)
    g, b = greedy_and_beam_search(model, feats, beam_size=3, alpha=0.5, n_best=2, **kw)
    g_apart = greedy_search(model, feats, **kw)
    b_apart = beam_search(model, feats, beam_size=3, alpha=0.5, n_best=2, **kw)
    one_by_one = [greedy_and_beam_search(model, feats[i:i + 1], beam_size=3, alpha=0.5, n_best=2, **kw)
                  for i in range(len(feats))]
    for i in range(len(feats)):
        for other_g, other_b in ((g_apart[i], b_apart[i]), (one_by_one[i][0][0], one_by_one[i][1][0])):
            assert g[i].tokens == other_g.tokens and g[i].log_prob == pytest.approx(other_g.log_prob, rel=1e-4, abs=1e-4)
            assert [c.tokens for c in b[i]] == [c.tokens for c in other_b]
            assert [c.score for c in b[i]] == pytest.approx([c.score for c in other_b], rel=1e-4, abs=1e-4)
    assert P.packed(model) is None if precision == "fp32" else P.packed(model).precision == precision


@INT8
@pytest.mark.parametrize("kind, changed", [(0, "lstm.weight_hh_l1"), (0, "embed.weight"), (1, "gate.weight"),
                                           (1, "embed.weight")])
def test_packed_weights_are_dropped_when_the_weights_change_or_in_training(kind, changed):
    model, feats = decoders()[kind]
    P.prepare(model, "int8")
    model.train()
    assert P.packed(model) is None  # training never sees packed copies
    model.eval()
    assert P.packed(model) is not None
    with torch.no_grad():  # an optimizer step changes weights in place; the embedding feeds a derived word table
        model.get_parameter(changed).mul_(0.5)
    assert P.packed(model) is None  # stale: step falls back to the model's own weights
    with torch.inference_mode():
        state = model.init_state(feats)
        got = model.step(torch.tensor([1] * 5), state)[0]
        model._packed = None
        want = model.step(torch.tensor([1] * 5), state)[0]
        P.prepare(model, "int8")  # packing again picks the change up
        repacked = model.step(torch.tensor([1] * 5), state)[0]
    assert torch.equal(got, want)
    assert (repacked.exp() - want.exp()).abs().max() < 0.02


def test_precision_is_chosen_by_argument_then_environment_then_auto(monkeypatch):
    model, _ = decoders()[0]
    monkeypatch.delenv(P.ENV, raising=False)
    assert P.resolve_precision("fp32", model) == ("fp32", {})
    monkeypatch.setenv(P.ENV, "bf16")
    assert P.resolve_precision(None, model)[0] == "bf16"
    assert P.resolve_precision("fp32", model)[0] == "fp32"  # the argument wins
    monkeypatch.setenv(P.ENV, "int4")
    with pytest.raises(ValueError, match=r"int4.*\$STORYTELLER_PRECISION"):
        P.resolve_precision(None, model)
    monkeypatch.delenv(P.ENV)
    chosen, timings = P.resolve_precision(None, model)  # auto: timed, the fastest supported one
    assert chosen in P.supported_precisions()
    if len(P.supported_precisions()) > 1:
        assert set(timings) == set(P.supported_precisions()) and all(t > 0 for t in timings.values())
        assert timings[chosen] <= timings["fp32"]
    assert P.packed(model) is None  # timing leaves the model as it was


@INT8
@pytest.mark.parametrize("fastest", ["int8", "fp32"])
def test_use_precision_packs_the_chosen_precision_once(monkeypatch, fastest):
    """use_precision (what load() and evaluate call) keeps the pack auto timed: each candidate is packed
    once, the chosen one is not packed again, and the model ends in the chosen precision."""
    model, _ = decoders()[0]
    monkeypatch.delenv(P.ENV, raising=False)
    monkeypatch.setattr(P, "supported_precisions", lambda device="cpu": ["fp32", "int8"])
    monkeypatch.setattr(P, "time_step", lambda m, f, **k: 1.0 if (P.packed(m) is not None) == (fastest == "int8") else 5.0)
    packed_from = []
    step_linears = model.step_linears
    monkeypatch.setattr(model, "step_linears", lambda: packed_from.append(1) or step_linears())
    chosen, timings = P.use_precision(model)
    assert chosen == fastest and set(timings) == {"fp32", "int8"}
    assert len(packed_from) == 1  # int8 packed for its timing only
    assert (P.packed(model) is None) == (fastest == "fp32")
    if fastest == "int8":
        assert P.packed(model).precision == "int8"
    assert P.use_precision(model, "fp32") == ("fp32", {}) and P.packed(model) is None  # an explicit name: no timing


def test_bf16_is_offered_only_on_cpus_with_bfloat16_instructions(monkeypatch):
    """Inference and fit's default autocast use the same check: AMX or AVX-512 BF16 (not AMX alone)."""
    from train.fit import default_amp

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(P, "cpu_flags", lambda: {"avx2", "fma"})
    assert "bf16" not in P.supported_precisions() and default_amp(torch.device("cpu")) is None
    monkeypatch.setattr(P, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})  # AVX-512 BF16, no AMX
    assert "bf16" in P.supported_precisions() and default_amp(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(P, "cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)  # PyTorch's AMX probe
    assert P.cpu_has_bf16() and default_amp(torch.device("cpu")) == torch.bfloat16
    assert P.supported_precisions("meta") == ["fp32"]  # not a CPU: no packing


@INT8
def test_load_applies_the_precision_and_refuses_unknown_ones(tmp_path, monkeypatch):
    model_dir = save_test_model(tmp_path / "m", pretrained_backbone=False, hidden_dim=64)
    monkeypatch.delenv(P.ENV, raising=False)
    cap = load(model_dir, precision="int8")
    assert cap.precision == "int8" and cap.info["precision"] == "int8" and P.packed(cap.model) is not None
    assert load(model_dir, precision="fp32").info["precision"] == "fp32"
    with pytest.raises(ModelLoadError, match="precision must be"):
        load(model_dir, precision="fp8")


@INT8
def test_shipped_models_in_int8_hold_their_validation_scores(flickr8k_dir):
    """Validation (1,000 photos, live Lite0 features): each shipped model's BLEU-4 and CIDEr-D at greedy
    and at its default beam in int8 are within 0.005 of float32."""
    from storyteller.data import open_captioned_images
    from storyteller.decoding import beam_search
    from storyteller.metrics import evaluate_captions
    from storyteller.model import load_decoder
    from train.evaluate import live_features
    from tests.test_bundled_model import ATTENTION, BUNDLED

    images = open_captioned_images(flickr8k_dir, "validation")
    refs = [r.captions for r in images.records]
    assert load_decoder(BUNDLED).backbone == load_decoder(ATTENTION).backbone  # one Lite0 pass serves both
    grids = live_features(images, load_decoder(BUNDLED).backbone, torch.device("cpu"), 64, 0, grid=True)
    inputs = {BUNDLED: grids.mean((1, 2)), ATTENTION: grids}  # the pooled vector is the grid's mean
    for model_dir, feats in inputs.items():
        model = load_decoder(model_dir).float().eval()
        d = model.extra["decoding"]
        kw = dict(max_len=d["max_len"], no_repeat_ngram_size=d.get("no_repeat_ngram_size", 0),
                  bad_endings=d.get("bad_endings", ()))
        scores = {}
        for precision in ("fp32", "int8"):
            P.prepare(model, precision)
            greedy = [c.text for c in greedy_search(model, feats, **kw)]
            beam = [c[0].text for c in beam_search(model, feats, beam_size=d["beam_size"], alpha=d["alpha"], **kw)]
            scores[precision] = {name: evaluate_captions(caps, refs) for name, caps in (("greedy", greedy), ("beam", beam))}
        for name in ("greedy", "beam"):
            for metric in ("bleu4", "cider"):
                a, b = scores["fp32"][name][metric], scores["int8"][name][metric]
                assert abs(a - b) <= 0.005, (model_dir.name, name, metric, a, b)


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_init_state_is_one_float16_product_close_to_float32(precision):
    """The pooled decoder's init_h and init_c run as one stacked product with float16 weights (where fbgemm
    has it) in the low precisions, not int8 or bfloat16: within float16's rounding of the float32 state."""
    model, feats = decoders()[0]
    with torch.inference_mode():
        want = model.init_state(feats)
        P.prepare(model, precision)
        op = P.packed(model)["init"]
        got = model.init_state(feats)
    assert isinstance(op, P._Fp16Linear if P._fp16_works() else P._Fp32Linear)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.is_contiguous()
        assert (g - w).abs().max() < 2e-3
        assert not torch.equal(g, w) or not P._fp16_works()  # float16 weights are really in use


def test_init_state_keeps_the_float32_weights_where_gradients_flow():
    """Teacher-forced training calls init_state with gradients on: it must use the model's own float32
    weights (gradients reach init_h and init_c), even in eval mode with fresh packs."""
    model, feats = decoders()[0]
    P.prepare(model, "bf16")  # packs the init product in every precision but fp32
    h, c = model.init_state(feats)
    assert torch.equal(h, torch.tanh(model.init_h(feats)).view(5, 2, -1).transpose(0, 1))
    (h.sum() + c.sum()).backward()
    assert model.init_h.weight.grad.abs().sum() > 0 and model.init_c.weight.grad.abs().sum() > 0
