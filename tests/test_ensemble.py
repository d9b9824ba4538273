"""The ensemble decoder (issue 24): trained decoders that the searches decode as one."""
from __future__ import annotations

import json

import pytest
import torch

from helpers_models import save_test_model
from storyteller.decoders import Ensemble, load_decoder, reads_grid
from storyteller.decoding import beam_search, greedy_and_beam_search, greedy_search
from train import ensemble as ensemble_cmd


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """A pooled and an attention model with the same vocabulary and backbone, and a second pooled one."""
    root = tmp_path_factory.mktemp("members")
    pooled = save_test_model(root / "pooled", seed=1, pretrained_backbone=False)
    attention = save_test_model(root / "attention", seed=2, pretrained_backbone=False, attention=True)
    pooled2 = save_test_model(root / "pooled2", seed=3, pretrained_backbone=False)
    return pooled, attention, pooled2


def grids(n: int = 3, dim: int = 1280, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, 3, dim, generator=g)


def build(folders, weights=None):
    models = [load_decoder(f) for f in folders]
    return ensemble_cmd.build_ensemble(models, [str(f) for f in folders], weights), models


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_step_is_the_weighted_mean_of_the_members_probabilities(members, precision):
    from storyteller.precision import supported_precisions

    if precision not in supported_precisions():
        pytest.skip(f"no {precision} kernel on this CPU")
    pooled, attention, _ = members
    ens, (a, p) = build([attention, pooled], weights=[3, 1])
    ens.precision = precision
    assert [m.precision for m in ens.members] == [precision, precision]
    for m in (p, a):
        m.precision = precision
    g = grids()
    tokens = torch.tensor([1, 1, 1])
    logp, state, alpha = ens.step(tokens, ens.init_state(g), return_attention=True)
    lp_a, _, alpha_a = a.step(tokens, a.init_state(g), return_attention=True)
    lp_p, _ = p.step(tokens, p.init_state(g.flatten(1, 2).mean(1)))  # the pooled member reads the grid's mean
    expected = torch.log(0.75 * lp_a.exp() + 0.25 * lp_p.exp())
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alpha, alpha_a)  # the attending member's maps
    assert isinstance(state, tuple) and len(state) == 2


def test_an_ensemble_of_one_model_twice_captions_as_the_model(members):
    """Equal shares of the same distribution are that distribution: the searches give the model's captions."""
    _, attention, _ = members
    ens, (a, _) = build([attention, attention])
    g = grids(4)
    assert [c.text for c in greedy_search(ens, g)] == [c.text for c in greedy_search(a, g)]
    ours = beam_search(ens, g, beam_size=3, n_best=3)
    theirs = beam_search(a, g, beam_size=3, n_best=3)
    assert [[c.text for c in cs] for cs in ours] == [[c.text for c in cs] for cs in theirs]
    for cs, ts in zip(ours, theirs):
        assert cs[0].log_prob == pytest.approx(ts[0].log_prob, abs=1e-4)
        torch.testing.assert_close(cs[0].attention, ts[0].attention)


def test_the_mixture_differs_from_each_member(members):
    """A check that the members really mix: two different pooled models give log-probabilities unlike either."""
    pooled, _, pooled2 = members
    ens, (p, q) = build([pooled, pooled2])
    assert not ens.has_attention
    f = torch.rand(2, 1280)
    logp, _ = ens.step(torch.tensor([1, 1]), ens.init_state(f))
    for m in (p, q):
        lp, _ = m.step(torch.tensor([1, 1]), m.init_state(f))
        assert (logp - lp).abs().max() > 1e-3



def test_round_trip_is_exact_and_loading_is_strict(members, tmp_path):
    pooled, attention, _ = members
    out = ensemble_cmd.main(["--models", str(attention), str(pooled), "--weights", "2", "1", "--out", str(tmp_path / "e")])
    loaded = load_decoder(out)
    built, _ = build([attention, pooled], weights=[2, 1])
    assert isinstance(loaded, Ensemble) and loaded.has_attention
    assert loaded.state_dict().keys() == built.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in built.state_dict().items())
    assert loaded.log_shares == built.log_shares and loaded.vocab == built.vocab
    g = grids(2)
    assert [c.text for c in greedy_search(loaded, g)] == [c.text for c in greedy_search(built, g)]
    config = json.loads((out / "config.json").read_text())
    assert config["decoder"] == "ensemble" and reads_grid(config)
    assert [m["decoder"] for m in config["members"]] == ["show_attend_tell", "show_and_tell"]
    assert all("extra" not in m and "backbone" not in m for m in config["members"])
    assert "ensemble" in (out / "README.md").read_text()

    # strict: a member's tensor missing from the weights is an error, not random weights
    from safetensors.torch import load_file, save_file

    weights = load_file(str(out / "model.safetensors"))
    weights.pop(next(k for k in weights if k.startswith("members.1.")))
    save_file(weights, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="does not match"):
        load_decoder(out)


def test_members_that_cannot_be_decoded_as_one_are_refused(members, tmp_path):
    pooled, attention, _ = members
    other_vocab = save_test_model(tmp_path / "other", seed=1, pretrained_backbone=False)
    words = json.loads((other_vocab / "vocab.json").read_text())
    words["itos"][-1], words["itos"][-2] = words["itos"][-2], words["itos"][-1]
    (other_vocab / "vocab.json").write_text(json.dumps(words))
    with pytest.raises(SystemExit, match="vocabulary differs"):
        ensemble_cmd.main(["--models", str(pooled), str(other_vocab), "--out", str(tmp_path / "a")])
    other_backbone = save_test_model(tmp_path / "b0", backbone="efficientnet_lite1", pretrained_backbone=False)
    with pytest.raises(SystemExit, match="backbone differs"):
        ensemble_cmd.main(["--models", str(pooled), str(other_backbone), "--out", str(tmp_path / "b")])
    ens = ensemble_cmd.main(["--models", str(pooled), str(attention), "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="ensemble already"):
        ensemble_cmd.main(["--models", str(ens), str(pooled), "--out", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match="one positive finite number per member"):
        ensemble_cmd.main(["--models", str(pooled), str(attention), "--weights", "1", "--out", str(tmp_path / "e")])
    with pytest.raises(SystemExit, match="not empty"):
        ensemble_cmd.main(["--models", str(pooled), str(attention), "--out", str(tmp_path / "c")])


def test_reads_grid_follows_the_members():
    pooled = {"decoder": "show_and_tell"}
    attention = {"decoder": "show_attend_tell"}
    assert reads_grid(attention) and not reads_grid(pooled) and not reads_grid({"decoder": "nonsense"})
    assert reads_grid({"decoder": "ensemble", "members": [pooled, attention]})
    assert not reads_grid({"decoder": "ensemble", "members": [pooled, pooled]})



def test_the_captioner_app_panel_and_card_show_an_ensemble_with_attention(members, tmp_path):
    """Loaded like any model: the grid goes in, each word has its map, the Model panel and card name the members."""
    from PIL import Image

    import app
    from storyteller import load

    pooled, attention, _ = members
    out = ensemble_cmd.main(["--models", str(pooled), str(attention), "--out", str(tmp_path / "e")])
    captioner = load(str(out))
    assert captioner.has_attention
    photo = Image.new("RGB", (96, 64), (200, 120, 40))
    result = captioner.caption([photo])[0]
    maps = result.beam[0].attention
    assert maps is not None and maps.shape[0] == len(result.beam[0].tokens)
    assert captioner.attention_figure(photo, result.beam[0]).size[0] > 0
    info = captioner.info
    assert info["decoder"] == "ensemble" and [m["decoder"] for m in info["members"]] == ["show_and_tell", "show_attend_tell"]
    panel = app.model_markdown(info, captioner.model.grid)
    assert "an ensemble of 2" in panel and "Show-Attend-Tell LSTM 1 x 32" in panel and "looked over for every word" in panel
    assert captioner.model.grid == load(str(attention)).model.grid  # the attending member's grid
    card = (out / "README.md").read_text()
    assert "ensemble" in card and "where the attention decoder looked" in card


def test_the_app_header_says_two_decoders(members, tmp_path):
    import app
    from storyteller import load

    pooled, attention, _ = members
    out = ensemble_cmd.main(["--models", str(pooled), str(attention), "--out", str(tmp_path / "e")])
    header = app.header_html(load(str(out)))
    assert "2 LSTM decoders decoded as one" in header and "a Show-Attend-Tell decoder looks over the grid" in header
    assert "Show-Attend-Tell:" in app.header_html(load(str(attention)))


def test_an_ensemble_is_described_as_it_is_made():
    """The one sentence the app's header and the Space page use: member kinds and counts, shares."""
    from storyteller.card import ensemble_summary

    pooled, attention = {"decoder": "show_and_tell"}, {"decoder": "show_attend_tell"}
    two_pooled = ensemble_summary({"members": [pooled, pooled]})
    assert "2 Show-and-Tell LSTM decoders" in two_pooled and "grid" not in two_pooled and "weighted" not in two_pooled
    three = ensemble_summary({"members": [attention, attention, pooled], "weights": [1, 1, 2]}, shown=" (here)")
    assert "3 LSTM decoders" in three and "2 Show-Attend-Tell decoders look over the grid for every word (here)" in three
    assert "a Show-and-Tell decoder reads their mean" in three and "weighted mean" in three


def test_forward_is_the_mixture_of_the_members_teacher_forced_probabilities(members):
    """forward (what SCST and the cross-entropy share differentiate) reads the same mixture as step: log of the
    weighted mean of the members' probabilities, position by position, with a gradient into every member."""
    pooled, attention, _ = members
    ens, (p, a) = build([pooled, attention], weights=[1, 3])
    g = grids(2)
    captions = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 9, 2, 0, 0], [1, 5, 9, 7, 6, 2]])  # <start> .. <end> <pad>
    lengths, images = torch.tensor([5, 4, 6]), torch.tensor([0, 1, 1])  # the third caption is of photo 1 too
    for m in (ens, p, a):
        m.eval()
    logp, targets = ens(g, captions, lengths, images)
    lp, tp = p(g.flatten(1, 2).mean(1), captions, lengths, images)  # the pooled member reads the grid's mean
    la, ta = a(g, captions, lengths, images)
    assert torch.equal(targets, tp) and torch.equal(targets, ta) and logp.shape == (int((lengths - 1).sum()), ens.vocab_size)
    expected = torch.log(0.25 * lp.softmax(-1) + 0.75 * la.softmax(-1))
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.log_softmax(logp, -1), logp, atol=1e-5, rtol=1e-5)  # already normalised
    torch.nn.functional.cross_entropy(logp, targets).backward()
    assert all(m.head.weight.grad is not None and m.head.weight.grad.abs().sum() > 0 for m in ens.members)


def test_scst_fine_tunes_both_members_of_an_ensemble_through_the_mixture(tmp_path):
    """python -m train scst --init ENSEMBLE: the members trained together (grids for the attention member, their
    mean for the pooled one) and exported as one ensemble that loads strictly and keeps its shares."""
    from safetensors.torch import load_file

    from test_attention import att_args, make_grid_cache
    from test_fit import fit_args
    from test_scst import scst_args
    from train import fit, scst

    cache = make_grid_cache(tmp_path / "grid", per_class=6, val_per_class=2)
    fit.main(att_args(cache, tmp_path / "att", "--epochs", "2"))
    fit.main(fit_args(cache, tmp_path / "pooled", "--epochs", "2"))
    joined = ensemble_cmd.main(["--models", str(tmp_path / "pooled" / "model"), str(tmp_path / "att" / "model"),
                                "--weights", "1", "2", "--out", str(tmp_path / "ens")])
    out = tmp_path / "scst"
    scst.main(scst_args(joined, cache, out, "--epochs", "1"))
    model = load_decoder(out / "model")
    assert isinstance(model, Ensemble) and model.shares == [1, 2] and model.extra["training"]["init_model"] == "ens"
    before, after = load_file(joined / "model.safetensors"), torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert set(before) == set(after)
    for i in (0, 1):  # every member moved
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(f"members.{i}."))


def test_finished_rows_leave_the_call_with_their_own_state(members, monkeypatch, tmp_path):
    """With <end> likely, captions finish at different steps and the finished rows leave the decoder call
    (select_state / scatter_state on every step where any row finished): the ensemble of one model twice still
    gives exactly that model's captions."""
    import storyteller.decoding as decoding

    _, attention, _ = members
    model = load_decoder(attention)
    with torch.no_grad():  # <end>'s logit made to swing with the state: captions of 1 to 12 words
        model.head.weight[2] *= 6.0
        model.head.bias[2] += 0.2
    folder = tmp_path / "ends"
    model.save_pretrained(folder)
    monkeypatch.setattr(decoding, "LIVE_SHARE", 1.01)  # any finished row: the live rows are picked out
    ens, (a, _) = build([folder, folder])
    g = grids(8, seed=3)
    theirs = beam_search(a, g, beam_size=3, n_best=2, max_len=12, alpha=1.0)
    greedy = greedy_search(a, g, max_len=12)
    assert len({len(c.tokens) for c in greedy}) > 2  # rows finish at different steps: the case this test is about
    assert [[c.text for c in cs] for cs in beam_search(ens, g, beam_size=3, n_best=2, max_len=12, alpha=1.0)] == \
        [[c.text for c in cs] for cs in theirs]
    assert [c.text for c in greedy_search(ens, g, max_len=12)] == [c.text for c in greedy]


@pytest.mark.parametrize("weights", [[1, -1], [True, True], [1e309, 1], "12", [1]])
def test_a_config_with_bad_shares_is_a_load_error(members, tmp_path, weights):
    from storyteller.captioner import ModelLoadError, load

    pooled, attention, _ = members
    out = ensemble_cmd.main(["--models", str(pooled), str(attention), "--out", str(tmp_path / "e")])
    config = json.loads((out / "config.json").read_text())
    config["weights"] = weights
    (out / "config.json").write_text(json.dumps(config).replace("Infinity", "1e309"))
    with pytest.raises(ModelLoadError, match="weights must be one positive finite number per member"):
        load(str(out))
