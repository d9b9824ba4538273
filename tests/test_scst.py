"""python -m train scst: the reward against pycocoevalcap, the sign of the gradient, outputs and export,
exact resume, clear errors, torchrun (gloo) on CPU.

SCST runs start from a model that ``fit`` trains for a few epochs on test_fit's tiny synthetic cache
(captions are a function of the feature).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from storyteller.decoders import ShowAndTell
from storyteller.metrics import corpus_bleu
from storyteller.vocab import Vocabulary, tokenize
from test_fit import SPEC, fit_args, make_cache
from train import fit, scst
from storyteller.cider import CaptionReward

REPO = Path(__file__).resolve().parents[1]
WORDS = "a dog man runs in the park with ball red shirt two children play on grass water".split()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("cache") / "feats")


@pytest.fixture(scope="module")
def init_run(cache, tmp_path_factory) -> Path:
    """A fit run folder (its model/ is the starting model) trained for 3 epochs."""
    out = tmp_path_factory.mktemp("fit") / "run"
    fit.main(fit_args(cache, out))
    return out


def scst_args(init: Path, cache: Path, out: Path, *extra: str, threads: bool = True) -> list[str]:
    return ["--init", str(init), "--features", str(cache), "--out", str(out), "--epochs", "3", "--batch-size", "8",
            "--lr", "1e-3", "--samples", "3", "--max-len", "8", "--progress", "off", "--bad-endings", "none",
            *(["--num-threads", "1"] if threads else []), *extra]


# -- the reward --------------------------------------------------------------------------------

def _random_caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def test_reward_equals_coco_cider_d_with_the_same_document_frequencies():
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    rng = random.Random(0)
    n = 24  # coco's scorer takes log(#images) from the pairs it scores: score as many as the df corpus has
    train = [[_random_caption(rng) for _ in range(rng.randint(3, 6))] for _ in range(n)]
    hyps = [_random_caption(rng) for _ in range(n)]
    hyps[:3] = ["", "zebra crossing", "A dog, running!"]  # empty, unseen words, punctuation
    refs = [[_random_caption(rng) for _ in range(rng.randint(2, 5))] for _ in range(n)]
    refs[5] = train[5]  # a sample scored against training references too

    cider, bleu4 = CaptionReward(train).score_text(hyps, refs)

    join = lambda c: " ".join(tokenize(c))  # noqa: E731  (coco splits on spaces: give it our tokens)
    df = CiderScorer()
    for r in train:
        df.cook_append(None, [join(x) for x in r])
    df.compute_doc_freq()  # document frequencies of the training references
    coco = CiderScorer()
    for h, r in zip(hyps, refs):
        coco.cook_append(join(h), [join(x) for x in r])
    coco.document_frequency = df.document_frequency
    expected = np.array(coco.compute_cider())
    assert expected.std() > 0.1 and (expected > 0).sum() > n // 2  # a real spread of scores
    np.testing.assert_allclose(cider, expected, atol=1e-6, rtol=0)
    # sentence BLEU-4 is corpus BLEU-4 of a one-image corpus
    for h, r, b in zip(hyps, refs, bleu4):
        assert b == pytest.approx(corpus_bleu([tokenize(h)], [[tokenize(x) for x in r]])[3], abs=1e-12)


def test_reward_does_not_depend_on_the_rest_of_the_batch():
    rng = random.Random(1)
    train = [[_random_caption(rng) for _ in range(5)] for _ in range(30)]
    reward = CaptionReward(train)
    refs = reward.encode_references(train)
    hyps = [reward.encode(_random_caption(rng)) for _ in range(12)]
    image = np.array([rng.randrange(30) for _ in hyps])
    together, _ = reward.score(hyps, image, refs)
    alone = [reward.score([h], [0], [refs[i]])[0][0] for h, i in zip(hyps, image)]
    np.testing.assert_allclose(together, alone, atol=1e-12)


def test_baseline_is_the_mean_of_the_other_samples():
    r = np.array([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 2.0, 2.0])  # 2 images x 4 samples
    np.testing.assert_allclose(scst.advantages(r, 4), [1.0, -1 / 3, -1 / 3, -1 / 3, 3 - 5 / 3, 1 - 7 / 3, 2 - 2, 2 - 2])
    np.testing.assert_allclose(scst.advantages(r, 4, np.array([0.5, 2.0])), r - np.repeat([0.5, 2.0], 4))


# -- the gradient ----------------------------------------------------------------------------------

def test_scst_steps_raise_the_reward_and_the_best_captions_probability():
    """A tiny decoder, 4 images with one right caption each: the policy gradient must move towards it."""
    torch.manual_seed(0)
    words = ["a", "red", "blue", "circle", "square", "the", "on"]
    vocab = Vocabulary(words)
    captions = ["a red circle", "a blue square", "a red square", "a blue circle"]
    model = ShowAndTell(len(vocab), feature_dim=8, embed_dim=8, hidden_dim=16).eval()
    model.vocab = vocab
    feats = torch.randn(4, 8) * 2
    reward = CaptionReward([[c] * 3 for c in captions])
    refs = reward.encode_references([[c] * 3 for c in captions])
    vocab_map = reward.vocab_map(vocab.itos)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = torch.tensor([[Vocabulary.start_id, *vocab.encode(c, add_special=False), Vocabulary.end_id] for c in captions])

    def best_log_prob() -> float:  # mean log-probability of the right caption of each image
        with torch.no_grad():
            return -float(scst.policy_loss(model, feats, target, torch.full((4,), 5), torch.full((4,), 4.0)))

    gen = torch.Generator().manual_seed(0)
    before, rewards = best_log_prob(), []
    for _ in range(40):
        out = scst.scst_step(model, model, optimizer, feats, refs, reward, vocab_map, {"cider": 1.0}, 8, 5, "mean", gen)
        rewards.append(out["reward"].mean())
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 1.0  # CIDEr-D (x10 scale) rises
    assert best_log_prob() > before + 1.0  # and the best caption got likelier


def test_xe_weight_adds_the_weighted_cross_entropy_of_human_captions_to_the_loss():
    """--xe-weight: the step's loss is the policy loss (the same samples: the same generator) plus the weight
    times the cross-entropy of the given human captions under the model (eval function, no dropout)."""
    import copy

    torch.manual_seed(0)
    vocab = Vocabulary(["a", "red", "blue", "circle", "square"])
    model = ShowAndTell(len(vocab), feature_dim=8, embed_dim=8, hidden_dim=16, dropout=0.3).eval()
    model.vocab = vocab
    feats = torch.randn(3, 8)
    reward = CaptionReward([["a red circle"]] * 3)
    refs, vocab_map = reward.encode_references([["a red circle"]] * 3), reward.vocab_map(vocab.itos)
    human = torch.tensor([[Vocabulary.start_id, *vocab.encode(c, add_special=False), Vocabulary.end_id]
                          for c in ("a red circle", "a blue square", "a red square")])
    lengths = torch.full((3,), 5)
    with torch.no_grad():
        logits, targets = model(feats, human, lengths)
        xe = float(torch.nn.functional.cross_entropy(logits, targets))
    losses = []
    for extra in (None, (human, lengths, 0.7)):
        m = copy.deepcopy(model)
        out = scst.scst_step(m, m, torch.optim.SGD(m.parameters(), lr=0.0), feats, refs, reward, vocab_map,
                             {"cider": 1.0}, 4, 5, "mean", torch.Generator().manual_seed(3), xe=extra)
        losses.append(out["loss"])
    assert losses[1] - losses[0] == pytest.approx(0.7 * xe, rel=1e-4)


def test_scst_with_xe_weight_runs_and_records_it(init_run, cache, tmp_path):
    out = tmp_path / "scst-xe"
    scst.main(scst_args(init_run, cache, out, "--xe-weight", "0.5"))
    model = ShowAndTell.from_pretrained(out / "model")
    assert model.extra["training"]["hyperparameters"]["xe_weight"] == 0.5
    assert "0.5 x the cross-entropy of one human caption" in model.extra["training"]["method"]


def test_sampled_captions_follow_the_decoding_rules(init_run):
    model, _ = scst.load_init_model(str(init_run))
    feats = torch.randn(6, model.feature_dim)
    caps, lengths = scst.sample_captions(model, feats, 4, 6, torch.Generator().manual_seed(0))
    assert caps.shape[0] == 24 and lengths.shape == (24,)
    assert (caps[:, 0] == Vocabulary.start_id).all() and (caps[:, 1] != Vocabulary.end_id).all()
    for row, n in zip(caps.tolist(), lengths.tolist()):
        words = row[1:n]
        assert not set(words) & {Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.unk_id}
        assert all(t == Vocabulary.pad_id for t in row[n:])
        assert Vocabulary.end_id not in words[:-1] and (words[-1] == Vocabulary.end_id or len(words) == 6)


def test_policy_loss_is_the_samplers_distribution_averaged_per_token_then_per_sample():
    """-mean over samples of advantage x mean log-probability of the sample's tokens, under the
    distribution the sampler drew from (no <pad>/<start>/<unk>, no <end> as the first word), against
    a plain step-by-step reference. Kills a summed loss (over tokens or samples) and a re-scored
    policy without the sampler's masks (an untrained 7-token model puts ~3/7 of its mass on them)."""
    torch.manual_seed(0)
    vocab = Vocabulary(["a", "b", "c"])
    model = ShowAndTell(len(vocab), feature_dim=6, embed_dim=8, hidden_dim=8).eval()
    feats = torch.randn(2, 6)
    caps, lengths = scst.sample_captions(model, feats, 3, 5, torch.Generator().manual_seed(3))  # 6 samples
    assert len(set(lengths.tolist())) > 1  # several lengths: a per-token mean differs from a sum
    advantage = torch.tensor([1.0, -0.5, 2.0, 0.25, -1.0, 0.75])
    images = torch.arange(2).repeat_interleave(3)
    loss = scst.policy_loss(model, feats, caps, lengths, advantage, images)

    banned = [Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.unk_id]
    expected = 0.0
    with torch.no_grad():
        for s in range(6):
            state = model.init_state(feats[images[s]][None])
            total = 0.0
            for t in range(int(lengths[s]) - 1):
                logp, state = model.step(caps[s, t:t + 1], state)
                allowed = logp[0].clone()
                allowed[banned + ([Vocabulary.end_id] if t == 0 else [])] = float("-inf")
                total += float(torch.log_softmax(allowed, 0)[caps[s, t + 1]])
            expected += float(advantage[s]) * total / (int(lengths[s]) - 1)
    assert float(loss.detach()) == pytest.approx(-expected / 6, abs=1e-5)


def test_forward_rows_match_the_models_packed_order(init_run):
    model, _ = scst.load_init_model(str(init_run))
    caps, lengths = scst.sample_captions(model, torch.randn(5, model.feature_dim), 3, 7, torch.Generator().manual_seed(1))
    logits, targets = model(torch.randn(15, model.feature_dim), caps, lengths)
    sample, step = scst.forward_rows(caps, lengths, targets)
    assert torch.equal(caps[sample, step + 1], targets)
    assert sorted(zip(sample.tolist(), step.tolist())) == [(s, t) for s in range(15) for t in range(int(lengths[s]) - 1)]
    with pytest.raises(ValueError, match="unknown order"):
        scst.forward_rows(caps, lengths, targets.flip(0) + 1)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_policy_forward_is_the_eval_function_in_train_mode(device):
    """The policy's log-probabilities are computed in training mode (cuDNN refuses to differentiate an
    eval-mode nn.LSTM) with dropout off: equal to eval mode, no random numbers drawn, modes restored."""
    torch.manual_seed(0)
    vocab = Vocabulary.build([" ".join(WORDS)] * 5, min_freq=1)
    model = ShowAndTell(len(vocab), feature_dim=12, embed_dim=8, hidden_dim=16, num_layers=2, dropout=0.5).to(device)
    model.eval()
    feats = torch.randn(6, 12, device=device)
    caps, lengths = scst.sample_captions(model, feats, 1, 6, torch.Generator(device=device).manual_seed(0))
    with torch.no_grad():
        want, _ = model(feats, caps, lengths)
    state = torch.get_rng_state()
    with scst.dropout_off_train_mode(model):
        assert model.training
        got, _ = model(feats, caps, lengths)
        got.sum().backward()  # the step CUDA refused in eval mode
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.allclose(got, want, atol=1e-5 if device == "cuda" else 0, rtol=0)
    assert not model.training and model.lstm.dropout == 0.5
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.5}


# -- the command -----------------------------------------------------------------------------------

def test_scst_writes_run_folder_and_exports_a_fine_tuned_model(init_run, cache, tmp_path):
    out = tmp_path / "scst"
    scst.main(scst_args(init_run, cache, out, "--bad-endings", "standard"))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1, 2, 3]  # epoch 0: the starting model
    for key in ("mean_reward", "sample_seconds", "reward_seconds", "update_seconds", "greedy_cider", "beam_cider",
                "beam_bad_ending_share", "greedy_mean_length"):
        assert all(np.isfinite(x[key]) for x in lines[1:]), key
    for png in ("reward_curve.png", "metric_curve.png", "model/reward_curve.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    best = max(lines, key=lambda x: x["cider"])
    assert ckpt["best"]["epoch"] == best["epoch"] == lines[-1]["best_epoch"]

    model = ShowAndTell.from_pretrained(out / "model")
    assert model.backbone == SPEC and model.vocab.itos == ShowAndTell.from_pretrained(init_run / "model").vocab.itos
    training = model.extra["training"]
    assert training["init_model"] == "run" and training["best_epoch"] == best["epoch"]
    assert "self-critical" in training["method"] and training["hyperparameters"]["samples"] == 3
    assert model.extra["decoding"]["bad_endings"] == ["a", "the", "on", "is"]  # the standard words its vocabulary has
    exported = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in ckpt["best"]["model"].items())
    card = (out / "model" / "README.md").read_text(encoding="utf-8")
    assert "self-critical sequence training" in card and "`run`" in card
    assert str(tmp_path) not in (out / "model" / "config.json").read_text(encoding="utf-8")


def test_kept_epochs_average_into_a_model_folder(init_run, cache, tmp_path):
    """--keep-epochs keeps every epoch's weights (epoch 0: the start); `train average` writes their mean as a
    model folder that loads and says which epochs it averaged (checkpoint averaging, issue 24)."""
    from train import average
    from train.trainer import epoch_weights_file

    out = tmp_path / "scst"
    scst.main(scst_args(init_run, cache, out, "--keep-epochs", "--bad-endings", "standard"))
    files = [epoch_weights_file(out / scst.EPOCHS_DIR, e) for e in range(4)]
    assert all(f.is_file() for f in files)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    last = load_file(files[-1])
    assert all(torch.equal(last[k], v.float()) for k, v in ckpt["model"].items())  # epoch 3 = the last state
    folder = average.main(["--run", str(out), "--epochs", "2", "3", "--out", str(tmp_path / "avg")])
    model = ShowAndTell.from_pretrained(folder)
    two = load_file(files[2])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, (two[k] + last[k]) / 2)
    assert model.extra["training"]["averaged_epochs"] == [2, 3] and "metrics" not in model.extra
    assert "averaged over epochs 2, 3" in (folder / "README.md").read_text(encoding="utf-8") or \
        "averaged" in json.dumps(model.extra["training"])
    with pytest.raises(SystemExit, match="epoch_009"):
        average.main(["--run", str(out), "--epochs", "2", "9", "--out", str(tmp_path / "avg2")])

    # a run still going has no model/: the architecture comes from the model it started from, the card's
    # method from the run's own args.json (SCST, its cross-entropy share), not from the starting model's card
    import shutil

    shutil.rmtree(out / "model")
    going = average.main(["--run", str(out), "--epochs", "1", "2", "--out", str(tmp_path / "avg-going")])
    model = ShowAndTell.from_pretrained(going)
    one = load_file(files[1])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, (one[k] + two[k]) / 2)
    training = model.extra["training"]
    assert training["method"].startswith("fine-tuned from") and "self-critical" in training["method"]
    assert training["method"].endswith("weights averaged over epochs 1, 2")
    assert training["averaged_epochs"] == [1, 2] and training["hyperparameters"]["samples"] == 3
    card = (going / "README.md").read_text(encoding="utf-8")
    assert "None images" not in card and "epoch None" not in card and "trained on `train`" in card and "self-critical" in card
    # the run's decoding rule comes with it: it validated with bad endings, so the average recommends them
    assert model.extra["decoding"]["bad_endings"] == ["a", "the", "on", "is"]  # the standard words its vocabulary has


def test_killed_then_resumed_scst_ends_with_identical_weights(init_run, cache, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    scst.main(scst_args(init_run, cache, straight))
    scst.main(scst_args(init_run, cache, resumed, "--stop-after-epochs", "2"))  # "killed" after epoch 2
    first = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert first["epoch"] == 2 and not (resumed / "model").exists()
    scst.main(scst_args(init_run, cache, resumed, "--resume"))
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert b["epoch"] == 3 and b["history"][1]["train_seconds"] == first["history"][1]["train_seconds"]
    init = load_file(init_run / "model" / "model.safetensors")
    assert any(not torch.equal(a["model"][k], init[k]) for k in init)  # it trained
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():
        for name, t in state.items():
            assert torch.equal(t, b["optimizer"]["state"][i][name]), (i, name)
    for k in ("mean_reward", "cider", "greedy_cider"):
        assert [h[k] for h in a["history"][1:]] == [h[k] for h in b["history"][1:]], k
    with pytest.raises(SystemExit, match="--lr"):
        scst.main(scst_args(init_run, cache, resumed, "--resume", "--lr", "1e-4"))
    # a finished 2-epoch run continued to 3 epochs (constant lr: --epochs may grow on --resume) is the same run
    extended = tmp_path / "extended"
    scst.main(scst_args(init_run, cache, extended, "--epochs", "2"))
    assert (extended / "model").is_dir()
    scst.main(scst_args(init_run, cache, extended, "--resume", "--epochs", "3"))
    c = torch.load(extended / "checkpoint.pt", weights_only=True)
    assert c["epoch"] == 3 and all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])


def test_resumed_scst_early_stops_at_the_same_epoch_as_an_uninterrupted_run(init_run, cache, tmp_path):
    """lr 0: every epoch scores exactly as epoch 0, so patience 2 stops after epoch 2. A run killed
    after epoch 1 (its patience counter at 1) must stop there too when resumed, and a resumed run
    that already stopped trains nothing more."""
    early = ("--epochs", "6", "--lr", "0", "--patience", "2")

    def epochs(run: Path) -> list[int]:
        return [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    scst.main(scst_args(init_run, cache, straight, *early))
    assert epochs(straight) == [0, 1, 2]
    scst.main(scst_args(init_run, cache, resumed, *early, "--stop-after-epochs", "1"))
    ckpt = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["bad_epochs"] == 1 and not ckpt["stopped"]
    scst.main(scst_args(init_run, cache, resumed, *early, "--resume"))
    assert epochs(resumed) == epochs(straight)
    done = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert done["stopped"] and done["bad_epochs"] == 2 and done["best"]["epoch"] == 0
    scst.main(scst_args(init_run, cache, resumed, *early, "--resume"))
    assert epochs(resumed) == [0, 1, 2]


def test_greedy_baseline_and_bleu_mix_run(init_run, cache, tmp_path):
    out = tmp_path / "g"
    scst.main(scst_args(init_run, cache, out, "--epochs", "1", "--baseline", "greedy", "--reward", "cider:1,bleu4:0.5"))
    line = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()][-1]
    assert np.isfinite(line["mean_greedy_reward"]) and line["mean_reward"] > 0


@pytest.mark.parametrize("change, message", [
    (["--val-split", "test"], r"no split 'test'; splits present"),
])
def test_user_mistakes_are_one_clear_line(init_run, cache, tmp_path, change, message):
    with pytest.raises(SystemExit, match=message):
        scst.main(scst_args(init_run, cache, tmp_path / "run", *change))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, message", [
    (["--max-len", "0"], r"--max-len must be >= 1, got 0"),
    (["--samples", "0", "--baseline", "greedy"], r"--samples must be >= 1, got 0"),
    (["--batch-size", "0"], r"--batch-size must be >= 1, got 0"),
    (["--eval-batch-size", "-1"], r"--eval-batch-size must be >= 1"),
    (["--lr", "nan"], r"--lr must be >= 0, got nan"),
    (["--samples", "1"], r"needs --samples >= 2"),
    (["--reward", "meteor:1"], r"--reward: expected NAME:WEIGHT"),
    (["--bad-endings", " , "], r"--bad-endings: expected 'standard', 'none' or comma-separated words"),
])
def test_nonsense_arguments_exit_2_with_one_line_before_the_run_starts(init_run, cache, tmp_path, capsys, monkeypatch,
                                                                       change, message):
    monkeypatch.setattr(scst, "load_init_model", lambda init: pytest.fail("loaded a model for nonsense arguments"))
    with pytest.raises(SystemExit, match=message) as e:
        scst.main(scst_args(init_run, cache, tmp_path / "run", *change))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("scst: error: ") and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # no run folder, no validation


def test_model_and_cache_that_do_not_belong_together_are_refused(init_run, cache, tmp_path):
    from train.features import write_feature_cache

    other = {**SPEC, "preprocessing": {**SPEC["preprocessing"], "crop": 200}}
    wrong_backbone = tmp_path / "b"
    write_feature_cache(wrong_backbone, np.zeros((2, 16), np.float32), ["x", "y"], ["train", "validation"],
                        [["a red circle"], ["a red circle"]], other)
    with pytest.raises(SystemExit, match="differs in: preprocessing"):
        scst.main(scst_args(init_run, wrong_backbone, tmp_path / "r1"))
    wrong_words = tmp_path / "w"
    write_feature_cache(wrong_words, np.zeros((2, 16), np.float32), ["x", "y"], ["train", "validation"],
                        [["ein roter kreis"], ["ein blaues quadrat"]], SPEC)
    with pytest.raises(SystemExit, match="vocabulary knows only 0% of the words"):
        scst.main(scst_args(init_run, wrong_words, tmp_path / "r2"))


def test_torchrun_two_ranks_gloo(init_run, cache, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train", "scst",
           *scst_args(init_run, cache, out, "--epochs", "1", threads=False)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 ranks" in proc.stderr and proc.stderr.count("epoch 1:") == 1
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()] == [0, 1]
    assert ShowAndTell.from_pretrained(out / "model").extra["training"]["init_model"] == "run"


def test_bad_endings_are_never_the_last_word_and_flow_through_bundle_evaluate_and_captioner(init_run, cache, tmp_path):
    import argparse
    from collections import Counter

    from storyteller import decoding
    from storyteller.captioner import decoding_hints
    from train.features import FeatureCache
    from train import bundle, evaluate

    out = tmp_path / "scst"
    scst.main(scst_args(init_run, cache, out, "--epochs", "1", "--bad-endings", "table,here,zebra"))
    model = ShowAndTell.from_pretrained(out / "model")
    assert model.extra["decoding"]["bad_endings"] == ["table", "here"]  # words of its vocabulary only

    # the words the starting model ends its captions on most, as bad endings: <end> right after them is
    # forbidden, nothing else. Greedy shows it exactly: a caption that ended on one goes on from the same
    # prefix to a finished caption that does not; every other caption is unchanged; the words still occur.
    c = FeatureCache.open(cache)
    init, _ = scst.load_init_model(str(init_run))
    feats = scst.load_split_features(c, c.split("validation"), init)
    free = decoding.greedy_search(init, feats, max_len=12)
    ends = Counter(cap.tokens[-1] for cap in free if cap.finished and cap.tokens)
    words = [init.vocab.itos[i] for i, _ in ends.most_common(2)]
    bad = {init.vocab.stoi[w] for w in words}
    hit = [cap.finished and cap.tokens[-1] in bad for cap in free]
    assert sum(hit) >= len(free) // 3  # what the model would do
    ruled = decoding.greedy_search(init, feats, max_len=12, bad_endings=words)
    for before, after, changed in zip(free, ruled, hit):
        if changed:
            n = len(before.tokens)
            assert after.tokens[:n] == before.tokens and len(after.tokens) > n, (before.text, after.text)
            assert after.finished and after.tokens[-1] not in bad, after.text
        else:
            assert after.tokens == before.tokens and after.finished == before.finished
    assert any(t in bad for cap in ruled for t in cap.tokens)  # the words themselves are not banned
    beams = [b[0] for b in decoding.beam_search(init, feats, beam_size=3, max_len=12, bad_endings=words)]
    assert not any(cap.finished and cap.tokens[-1] in bad for cap in beams)
    assert sum(cap.finished for cap in beams) >= len(beams) // 2

    # the rule travels: captioner hints, evaluate's settings (and --bad-endings none), bundle
    assert decoding_hints(model.extra)["bad_endings"] == ("table", "here")
    given = argparse.Namespace(alpha=None, no_repeat_ngram_size=None, max_len=None, min_len=None, beam=None, bad_endings=None)
    assert evaluate.decoding_settings(given, model.extra)["bad_endings"] == ["table", "here"]
    assert evaluate.decoding_settings(argparse.Namespace(**{**vars(given), "bad_endings": "none"}), model.extra)["bad_endings"] == []
    bundled = bundle.bundle(out / "model", tmp_path / "bundle", {"beam_size": 3})
    assert ShowAndTell.from_pretrained(bundled).extra["decoding"]["bad_endings"] == ["table", "here"]
    with pytest.raises(ValueError, match="bad_endings must be a list of words"):
        bundle.validate_decoding({"bad_endings": "table"})
    result = evaluate.main(["--model", str(bundled), "--features", str(cache), "--beam", "1", "3", "--max-len", "12",
                            "--out", str(tmp_path / "eval.json")])
    assert result["bad_endings"] == ["table", "here"]
    assert all(0.0 <= m["bad_ending_share"] <= 1.0 for m in result["methods"].values())


def test_scst_fine_tunes_an_attention_decoder_on_feature_grids(tmp_path):
    from storyteller.decoders import ShowAttendTell
    from storyteller.decoders import load_decoder
    from test_attention import att_args, make_grid_cache

    grid_cache = make_grid_cache(tmp_path / "grid", per_class=6, val_per_class=2)
    fit.main(att_args(grid_cache, tmp_path / "att", "--epochs", "2"))
    out = tmp_path / "scst"
    scst.main(scst_args(tmp_path / "att", grid_cache, out, "--epochs", "1"))
    model = load_decoder(out / "model")
    assert isinstance(model, ShowAttendTell) and model.extra["training"]["init_model"] == "att"
    before = load_file(tmp_path / "att" / "model" / "model.safetensors")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert any(not torch.equal(before[k], ckpt["model"][k]) for k in before)  # the grids fed a real update
    from train.features import FeatureCache, write_feature_cache

    g = FeatureCache.open(grid_cache)  # the same photos and captions without grids
    write_feature_cache(tmp_path / "pooled", np.asarray(g.features, np.float32), g.ids, g.splits, g.captions, g.backbone)
    with pytest.raises(SystemExit, match="pooled features only"):  # grids are needed, and said so in one line
        scst.main(scst_args(tmp_path / "att", tmp_path / "pooled", tmp_path / "r"))
