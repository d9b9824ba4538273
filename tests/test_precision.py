"""storyteller.precision: a decoder's step products in fp32, bf16 and int8 for both decoders, made again when
the weights change, how the precision is chosen (argument, $STORYTELLER_PRECISION, auto's fixed rule), and the
quality of the shipped models in int8 on the real validation photos (where ../shared is present)."""
from __future__ import annotations

import warnings

import pytest
import torch

from storyteller import precision as P
from storyteller.captioner import ModelLoadError, load
from storyteller.decoders import DecoderState, ShowAndTell, ShowAttendTell
from storyteller.decoding import greedy_search
from storyteller.vocab import Vocabulary
from tests.helpers_models import WORDS, save_test_model

INT8 = pytest.mark.skipif("int8" not in P.supported_precisions(), reason="no PyTorch int8 engine on this CPU")
LOW = ["int8", "bf16"]


def decoders():
    torch.manual_seed(0)
    vocab = Vocabulary.build([" ".join(WORDS)] * 5, min_freq=1)
    pooled = ShowAndTell(len(vocab), feature_dim=64, embed_dim=32, hidden_dim=64, num_layers=2)
    att = ShowAttendTell(len(vocab), feature_dim=64, embed_dim=32, hidden_dim=64, attention_dim=32, grid=[3, 3])
    for m in (pooled, att):
        m.vocab = vocab
        m.eval()
    return [(pooled, torch.randn(5, 64)), (att, torch.randn(5, 3, 3, 64))]


def skip_unsupported(precision: str) -> None:
    if precision == "int8" and "int8" not in P.supported_precisions():
        pytest.skip("no int8 engine on this CPU")


def run_steps(model, feats, steps: int = 4):
    """Log-probabilities of ``steps`` steps with beam-style row reordering, and the last state."""
    order = torch.tensor([2, 2, 0, 4, 1])  # rows copied and dropped, as beam search does
    with torch.inference_mode():
        state, tokens, logps = model.init_state(feats), torch.tensor([1, 5, 6, 7, 8]), []
        for _ in range(steps):
            logp, state = model.step(tokens, state)[:2]
            logps.append(logp)
            state, tokens = model.select_state(state, order), logp.argmax(-1)[order]
    return torch.stack(logps), state


def int8_ops(model) -> dict:
    """The model's int8 products by name (a split product's inner one)."""
    ops = {n: op.op if isinstance(op, P._Split) else op for n, op in model.products().ops.items()}
    return {n: op for n, op in ops.items() if isinstance(op, P._Int8Linear)}


def shapes(state: DecoderState) -> list:
    return [tuple(t.shape) for t in (*state.h, *state.c, *state.carry, *state.photos)] + [state.image is None]


@pytest.mark.parametrize("precision", LOW)
@pytest.mark.parametrize("kind", [0, 1], ids=["pooled", "attention"])
def test_low_precision_steps_follow_float32_and_keep_one_state_structure(precision, kind):
    """One step per decoder: the products change with the precision, the state's structure does not, and the
    log-probabilities stay within the precision's rounding of float32's over steps with row reordering."""
    skip_unsupported(precision)
    model, feats = decoders()[kind]
    want, want_state = run_steps(model, feats)
    model.precision = precision
    got, got_state = run_steps(model, feats)
    assert model.products().precision == precision
    err = (got.exp() - want.exp()).abs().max().item()
    assert 0 < err < 0.03, err  # really another precision, and close
    assert shapes(got_state) == shapes(want_state)


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


@INT8
def test_int8_all_zero_inputs_give_the_bias_and_an_all_zero_grid_captions():
    """A row of zeros (a black photo's grid, a cleared state) has no range of its own to quantise with: it must
    give the bias, not NaN, and a search on an all-zero grid in int8 must return captions."""
    torch.manual_seed(0)
    w, b = torch.randn(24, 16), torch.randn(24)
    lin = P._Int8Linear(w, b)
    zeros = torch.zeros(3, 16)
    assert torch.equal(lin(zeros), b.expand(3, -1))
    _, (att, feats) = decoders()
    att.precision = "int8"
    caps = greedy_search(att, torch.zeros_like(feats[:2]), max_len=4)
    assert len(caps) == 2 and all(c.text and torch.isfinite(torch.tensor(c.log_prob)) for c in caps)


def test_packed_gates_give_the_lstm_cell():
    """Gate rows reordered i, f, o, 2g and one sigmoid (tanh(g) = 2 sigmoid(2g) - 1) are the LSTM cell."""
    from storyteller.decoders import lstm_update, packed_gates

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
    for model, _ in decoders():  # 7 bits exactly where a product holds output-layer rows (or a part of one)
        model.precision = "int8"
        declared = model.step_products()
        seven = {name for name, op in int8_ops(model).items() if op.reduce_range}
        assert seven and seven == {name for name, p in declared.items() if p.logits}


@INT8
def test_first_steps_carried_products_equal_the_stacked_products_rows():
    """The initial state's carried products come from the last rows of the stacked products alone (``rec{l}``,
    the attention model's ``carry``): in int8 exactly the numbers the stacked products give for those rows
    (same int8 weights, activation bits and range: ``Product.tail``), so no caption depends on which made them."""
    for model, feats in decoders():
        model.precision = "int8"
        ops = model.products().ops
        with torch.inference_mode():
            state = model.init_state(feats)
            if model.has_attention:
                pairs = [(state.carry[0], ops["hidden"](state.h[0])[1])]
            else:
                pairs = [(state.carry[layer], ops[f"layer{layer}"](state.h[layer])[1]) for layer in range(model.num_layers)]
        for alone, stacked in pairs:
            assert torch.equal(alone, stacked)


@INT8
def test_hidden_state_products_skip_the_row_rescaling_and_stay_batch_independent():
    """Products of a hidden state (always within [-1, 1]) quantise on the fixed range the +1 / -1
    columns set, with the bias in the kernel: the same numbers alone or in any batch, and as close to
    the float product as the rescaled rows. Any other input keeps its per-row scale."""
    torch.manual_seed(0)
    w, b = torch.randn(96, 48) * 0.1, torch.randn(96)
    unit, scaled = P._Int8Linear(w, b, unit_range=True), P._Int8Linear(w, b)
    h = torch.tanh(torch.randn(6, 48) * 2)  # hidden-state-like rows, max |h| near 1
    alone = torch.cat([unit(h[i:i + 1]) for i in range(6)])
    assert torch.equal(unit(h), alone) and torch.equal(unit(h.flip(0)), alone.flip(0))
    ref = h @ w.T + b
    assert (unit(h) - ref).abs().max() < 2 * (scaled(h) - ref).abs().max() + 1e-3
    assert unit.bias is None and scaled.bias is not None  # the bias went into the kernel
    for model, _ in decoders():  # unit range exactly for the products the decoder declares HIDDEN
        model.precision = "int8"
        declared, int8 = model.step_products(), int8_ops(model)
        assert {n for n, op in int8.items() if op.unit_range} == {n for n, p in declared.items() if p.reads is P.Input.HIDDEN}
        assert set(int8) == {n for n, p in declared.items() if p.reads in (P.Input.HIDDEN, P.Input.ANY)}


@pytest.mark.parametrize("precision", ["fp32", "int8", "bf16"])
@pytest.mark.parametrize("kind", [0, 1], ids=["pooled", "attention"])
def test_one_pass_and_batches_decode_as_separate_searches_in_every_precision(precision, kind):
    """greedy_and_beam_search (the app's one pass) = greedy_search + beam_search run apart, and a batch
    = its photos one by one, in each precision: a row's numbers must not depend on its batch."""
    from storyteller.decoding import beam_search, greedy_and_beam_search

    skip_unsupported(precision)
    model, feats = decoders()[kind]
    model.precision = precision
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
    assert model.products().precision == precision


def _edit_in_place(model, name):  # an optimiser step: in place, versioned
    with torch.no_grad():
        model.get_parameter(name).mul_(0.5)


def _edit_through_data(model, name):  # PyTorch does not version edits through .data
    model.get_parameter(name).data.mul_(0.5)


def _assign_data(model, name):
    model.get_parameter(name).data = model.get_parameter(name).data * 0.5


def _load_state_dict_assign(model, name):  # new Parameter objects
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state[name] = state[name] * 0.5
    model.load_state_dict(state, assign=True)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("edit", [_edit_in_place, _edit_through_data, _assign_data, _load_state_dict_assign],
                         ids=["in-place", "data-in-place", "data-assigned", "load-assign"])
@pytest.mark.parametrize("kind, changed", [(0, "lstm.weight_hh_l1"), (0, "embed.weight"), (1, "gate.weight"),
                                           (1, "embed.weight")])
def test_products_are_made_again_whenever_the_weights_change(precision, edit, kind, changed):
    """Bug 1 of issue 21: every way of changing a weight (the embedding feeds a derived word table) makes the
    next step use the new weights, exactly as a model built with them from the start."""
    skip_unsupported(precision)
    model, feats = decoders()[kind]
    model.precision = precision
    before, _ = run_steps(model, feats, 2)
    edit(model, changed)
    after, _ = run_steps(model, feats, 2)
    fresh = type(model)(**model.init_arguments())
    fresh.load_state_dict(model.state_dict())
    fresh.eval().precision = precision
    want, _ = run_steps(fresh, feats, 2)
    assert not torch.equal(after, before)
    assert torch.equal(after, want)


@pytest.mark.parametrize("attention", [False, True], ids=["pooled", "attention"])
def test_one_bias_value_edited_through_data_is_noticed(attention):
    """Favouring one word by its bias (an edit through .data, which PyTorch does not version) reaches the
    captions: 1-D tensors are fingerprinted whole (a strided sample of a 300-word bias would miss this id)."""
    torch.manual_seed(0)
    vocab = Vocabulary([f"w{i}" for i in range(296)])
    model = (ShowAttendTell(len(vocab), feature_dim=16, embed_dim=8, hidden_dim=16, attention_dim=8) if attention
             else ShowAndTell(len(vocab), feature_dim=16, embed_dim=8, hidden_dim=16)).eval()
    model.vocab, model.precision = vocab, "fp32"
    feats = torch.randn(2, 2, 2, 16) if attention else torch.randn(2, 16)
    word = 4 * (len(vocab) // P.FINGERPRINT_SAMPLES) + 1  # never among the old strided samples
    assert word not in greedy_search(model, feats, max_len=3)[0].tokens
    model.head.bias.data[word] = 1e4
    assert all(c.tokens[0] == word for c in greedy_search(model, feats, max_len=3))


def test_a_model_built_under_inference_mode_decodes_and_copies_without_its_products():
    """Tensors made under torch.inference_mode have no version counter; packed products do not copy (deepcopy
    goes through the same __getstate__ as pickling, which DataLoader workers and copies of the model use)."""
    import copy as copying

    with torch.inference_mode():
        model, feats = decoders()[0]
        model.precision = "bf16"
        want = [c.tokens for c in greedy_search(model, feats, max_len=4)]
    assert model._products is not None and model.__getstate__()["_products"] is None  # what a copy or pickle gets
    copy = copying.deepcopy(model)  # the packed kernels stay behind; products() makes them again
    assert [c.tokens for c in greedy_search(copy, feats, max_len=4)] == want


def test_a_blank_environment_variable_means_auto(monkeypatch):
    monkeypatch.setenv(P.ENV, "  ")
    assert P.resolve_precision(None) == P.auto_precision()


def test_auto_is_a_fixed_rule_by_what_the_cpu_supports(monkeypatch):
    """auto is a fixed rule, never a timing (a timing race let the same machine give one photo different captions):
    int8 where it runs, else bf16 where the CPU has bfloat16 instructions, else fp32; a GPU runs fp32."""
    monkeypatch.delenv(P.ENV, raising=False)
    for supported, want in ((["fp32", "bf16", "int8"], "int8"), (["fp32", "int8"], "int8"), (["fp32", "bf16"], "bf16"),
                            (["fp32"], "fp32")):
        monkeypatch.setattr(P, "supported_precisions", lambda device="cpu", s=supported: s if str(device) == "cpu" else ["fp32"])
        assert P.resolve_precision(None) == P.resolve_precision("auto") == P.auto_precision() == want
    assert P.resolve_precision("auto", "cuda") == "fp32"


def test_precision_is_chosen_by_argument_then_environment_then_auto(monkeypatch):
    monkeypatch.delenv(P.ENV, raising=False)
    assert P.resolve_precision("fp32") == "fp32"
    monkeypatch.setenv(P.ENV, "bf16")
    assert P.resolve_precision(None) == "bf16"
    assert P.resolve_precision("fp32") == "fp32"  # the argument wins
    monkeypatch.setenv(P.ENV, "int4")
    with pytest.raises(ValueError, match=r"int4.*\$STORYTELLER_PRECISION"):
        P.resolve_precision(None)
    with pytest.raises(ValueError, match="int4"):
        P.resolve_precision("int4")


@pytest.mark.parametrize("asked", ["int8", "bf16"])
def test_a_gpu_runs_float32_whatever_is_asked(monkeypatch, asked):
    """Bug 3 of issue 21: int8 or bf16 asked for a GPU (argument or environment) runs fp32 there, with a warning."""
    monkeypatch.setenv(P.ENV, asked)
    for requested in (None, asked):
        with pytest.warns(UserWarning, match="fp32"):
            assert P.resolve_precision(requested, "cuda") == "fp32"
    if torch.cuda.is_available():
        model, _ = decoders()[0]
        model.precision = asked
        model.to("cuda")
        assert model.products().precision == "fp32"


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
    assert cap.precision == "int8" and cap.info["precision"] == "int8" and cap.model.products().precision == "int8"
    assert load(model_dir, precision="fp32").info["precision"] == "fp32"
    assert load(model_dir).precision == P.auto_precision()
    with pytest.raises(ModelLoadError, match="precision must be"):
        load(model_dir, precision="fp8")


def test_auto_loads_an_attention_model_whose_config_has_no_grid(tmp_path, monkeypatch):
    """Bug 2 of issue 21: ``"grid": null`` (the documented default) loads under auto and captions."""
    import json

    monkeypatch.delenv(P.ENV, raising=False)
    model_dir = save_test_model(tmp_path / "att", pretrained_backbone=False, attention=True)
    config = json.loads((model_dir / "config.json").read_text())
    config["grid"] = None
    (model_dir / "config.json").write_text(json.dumps(config))
    from PIL import Image

    result = load(model_dir, precision="auto").caption([Image.new("RGB", (64, 48), (90, 120, 30))])[0]
    assert result.greedy.text and result.beam[0].attention is not None


@INT8
def test_shipped_models_in_int8_hold_their_validation_scores(flickr8k_dir):
    """Validation (1,000 photos, live Lite0 features): each shipped model's BLEU-4 and CIDEr-D at greedy
    and at its default beam in int8 are within 0.005 of float32."""
    from train.data import open_captioned_images
    from storyteller.decoding import beam_search
    from storyteller.metrics import evaluate_captions
    from storyteller.decoders import load_decoder
    from train.evaluate import live_features
    from tests.test_bundled_model import ATTENTION, BUNDLED, SCST

    images = open_captioned_images(flickr8k_dir, "validation")
    refs = [r.captions for r in images.records]
    assert load_decoder(BUNDLED).backbone == load_decoder(ATTENTION).backbone  # one Lite0 pass serves both
    grids = live_features(images, load_decoder(BUNDLED).backbone, torch.device("cpu"), 64, 0, grid=True)
    # the pooled vector is the grid's mean; the default ensemble takes the grid (its pooled member the mean)
    inputs = {BUNDLED: grids, SCST: grids.mean((1, 2)), ATTENTION: grids}
    for model_dir, feats in inputs.items():
        model = load_decoder(model_dir).float().eval()
        d = model.extra["decoding"]
        kw = dict(max_len=d["max_len"], no_repeat_ngram_size=d.get("no_repeat_ngram_size", 0),
                  bad_endings=d.get("bad_endings", ()))
        scores = {}
        for precision in ("fp32", "int8"):
            model.precision = precision
            greedy = [c.text for c in greedy_search(model, feats, **kw)]
            beam = [c[0].text for c in beam_search(model, feats, beam_size=d["beam_size"], alpha=d["alpha"], **kw)]
            scores[precision] = {name: evaluate_captions(caps, refs) for name, caps in (("greedy", greedy), ("beam", beam))}
        for name in ("greedy", "beam"):
            for metric in ("bleu4", "cider"):
                a, b = scores["fp32"][name][metric], scores["int8"][name][metric]
                assert abs(a - b) <= 0.005, (model_dir.name, name, metric, a, b)


@pytest.mark.parametrize("precision", LOW)
def test_init_state_is_one_float16_product_close_to_float32(precision):
    """The pooled decoder's init_h and init_c run as one stacked product (a PHOTO product) with float16 weights
    (where fbgemm has it) in the low precisions, not int8 or bfloat16: within float16's rounding of float32."""
    model, feats = decoders()[0]
    with torch.inference_mode():
        want = model.init_state(feats)
        model.precision = precision
        op = model.products()["init"]
        got = model.init_state(feats)
    assert isinstance(op, P._Fp16Linear if P._fp16_works() else P._Fp32Linear)
    for g, w in zip((*got.h, *got.c), (*want.h, *want.c)):
        assert g.shape == w.shape and g.is_contiguous()
        assert (g - w).abs().max() < 2e-3
        assert not torch.equal(g, w) or not P._fp16_works()  # float16 weights are really in use


def test_training_initial_state_is_the_models_own_float32_layers():
    """Teacher-forced training (``forward``) starts from ``initial_lstm_state``: the model's own layers, with
    gradient, whatever the decoding precision."""
    model, feats = decoders()[0]
    model.precision = "bf16"
    h, c = model.initial_lstm_state(feats)
    assert torch.equal(h, torch.tanh(model.init_h(feats)).view(5, 2, -1).transpose(0, 1))
    (h.sum() + c.sum()).backward()
    assert model.init_h.weight.grad.abs().sum() > 0 and model.init_c.weight.grad.abs().sum() > 0
