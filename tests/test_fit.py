"""python -m train fit: outputs, export, exact resume, early stopping, torchrun (gloo) on CPU.

All runs use a tiny synthetic feature cache whose captions are a function of the feature, so a
working loop learns it in a few epochs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from train.features import write_feature_cache
from storyteller.decoders import ShowAndTell
from train import fit

REPO = Path(__file__).resolve().parents[1]
DIM = 16
SPEC = {"name": "efficientnet_lite0", "weights": None, "feature_dim": DIM,
        "preprocessing": {"resize": 256, "crop": 224, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}}
COLOURS, SHAPES = ["red", "green", "blue"], ["circle", "square"]


def make_cache(path: Path, per_class: int = 12, val_per_class: int = 3, seed: int = 0) -> Path:
    """6 classes (colour x shape), each a noisy prototype feature with 2 captions naming it."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(len(COLOURS) * len(SHAPES), DIM)) * 2
    feats, ids, splits, caps = [], [], [], []
    for split, n in (("train", per_class), ("validation", val_per_class)):
        for k in range(n):
            for c_i, colour in enumerate(COLOURS):
                for s_i, shape in enumerate(SHAPES):
                    feats.append(protos[c_i * len(SHAPES) + s_i] + 0.3 * rng.normal(size=DIM))
                    ids.append(f"{split}-{len(ids)}")
                    splits.append(split)
                    caps.append([f"a {colour} {shape} on the table", f"there is a {colour} {shape} here"])
    write_feature_cache(path, np.array(feats, dtype=np.float32), ids, splits, caps, SPEC, dataset={"source": "synthetic"})
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("cache") / "feats")


def fit_args(cache: Path, out: Path, *extra: str, threads: bool = True) -> list[str]:
    return ["--features", str(cache), "--out", str(out), "--epochs", "3", "--batch-size", "16", "--embed-dim", "16",
            "--hidden-dim", "32", "--min-freq", "1", "--lr", "5e-3", "--dropout", "0.2", "--progress", "off",
            *(["--num-threads", "1"] if threads else []), *extra]


@pytest.mark.parametrize("bucket", [0, 4])
def test_epoch_order_depends_on_seed_and_epoch_only_and_shards_evenly(bucket):
    lengths = torch.randint(3, 30, (103,), generator=torch.Generator().manual_seed(0))
    a = fit.epoch_order(lengths, 10, seed=1, epoch=2, bucket=bucket)
    b = fit.epoch_order(lengths, 10, seed=1, epoch=2, bucket=bucket)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == 11
    assert sorted(torch.cat(a).tolist()) == list(range(103))  # every pair once
    assert not torch.equal(torch.cat(a), torch.cat(fit.epoch_order(lengths, 10, seed=1, epoch=3, bucket=bucket)))
    r0 = fit.epoch_order(lengths, 10, 1, 2, rank=0, world_size=2, bucket=bucket)
    r1 = fit.epoch_order(lengths, 10, 1, 2, rank=1, world_size=2, bucket=bucket)
    assert len(r0) == len(r1) == 5  # 11 batches: the odd one out is dropped so ranks stay in step
    assert not set(torch.cat(r0).tolist()) & set(torch.cat(r1).tolist())


def test_length_buckets_cut_padding():
    lengths = torch.randint(3, 30, (4000,), generator=torch.Generator().manual_seed(0))

    def padded(batches):  # token slots the dense LSTM computes
        return sum(len(b) * int(lengths[b].max()) for b in batches)

    plain, bucketed = fit.epoch_order(lengths, 64, 0, 0, bucket=0), fit.epoch_order(lengths, 64, 0, 0, bucket=50)
    assert padded(bucketed) < 0.6 * padded(plain) and padded(bucketed) < 1.1 * int(lengths.sum())
    firsts = [int(b[0]) for b in bucketed]
    assert firsts != sorted(firsts, key=lambda i: int(lengths[i]))  # batches themselves are shuffled


def test_padded_teacher_forcing_equals_the_packed_forward():
    torch.manual_seed(0)
    model = ShowAndTell(12, feature_dim=DIM, embed_dim=8, hidden_dim=16, num_layers=2).eval()
    lengths = torch.tensor([6, 3, 8, 4])
    captions = torch.zeros(4, 8, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        captions[i, :n] = torch.tensor([1, *torch.randint(4, 12, (n - 2,)).tolist(), 2])
    feats = torch.randn(4, DIM)
    packed_logits, packed_targets = model(feats, captions, lengths)  # time-major order
    logits, targets = fit.TeacherForcing(model)(feats, captions, lengths)  # batch-major order
    assert sorted(targets.tolist()) == sorted(packed_targets.tolist()) and len(targets) == int((lengths - 1).sum())
    # the same (logits, target) rows in another order: sort both by their first logit
    a = torch.cat([logits, targets[:, None].float()], 1)
    b = torch.cat([packed_logits, packed_targets[:, None].float()], 1)
    a, b = a[torch.argsort(a[:, 0])], b[torch.argsort(b[:, 0])]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_caption_pairs_batch_trims_to_longest(cache):
    from train.features import FeatureCache
    from storyteller.vocab import Vocabulary

    c = FeatureCache.open(cache)
    vocab = Vocabulary.build([x for caps in c.captions for x in caps], min_freq=1)
    pairs = fit.encode_pairs(c.split("train"), c.captions, vocab, max_words=3)
    assert len(pairs) == 2 * len(c.split("train"))
    assert int(pairs.lengths.max()) == 5  # <start> + 3 words + <end>
    feats = torch.zeros(len(c), DIM)
    f, caps, lengths = pairs.batch(feats, torch.tensor([0, 1]))
    assert f.shape == (2, DIM) and caps.shape == (2, int(lengths.max()))
    assert caps[0, 0] == Vocabulary.start_id and caps[0, int(lengths[0]) - 1] == Vocabulary.end_id


def test_fit_writes_run_folder_and_exports_best_model(cache, tmp_path):
    out = tmp_path / "run"
    fit.main(fit_args(cache, out, "--epochs", "4"))
    args = json.loads((out / "args.json").read_text(encoding="utf-8"))
    assert args["epochs"] == 4 and args["select"] == "cider"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3, 4]
    for key in ("train_loss", "val_loss", "bleu4", "cider", "lr", "captions_per_s"):
        assert all(np.isfinite(x[key]) for x in lines), key
    assert lines[-1]["val_loss"] < lines[0]["val_loss"]  # it learns
    for png in ("loss_curve.png", "metric_curve.png", "model/loss_curve.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # no pickled code anywhere in it
    assert ckpt["epoch"] == 4 and ckpt["vocab"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]

    best = max(lines, key=lambda x: x["cider"])
    model = ShowAndTell.from_pretrained(out / "model")
    assert model.backbone == SPEC
    assert model.extra["metrics"]["cider"] == pytest.approx(best["cider"])
    assert model.extra["training"]["best_epoch"] == best["epoch"] == lines[-1]["best_epoch"]
    assert model.extra["dataset"] == {"source": "synthetic"}
    exported = load_file(out / "model" / "model.safetensors")
    for k, v in ckpt["best"]["model"].items():
        assert torch.equal(exported[k], v), k  # the exported weights are the best epoch's
    card = (out / "model" / "README.md").read_text(encoding="utf-8")
    assert "pipeline_tag: image-to-text" in card and "load_decoder(" in card
    assert not (out / "model.tmp").exists() and not (out / "model.old").exists()


def test_killed_then_resumed_run_ends_with_identical_weights(cache, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fit.main(fit_args(cache, straight))
    fit.main(fit_args(cache, resumed, "--stop-after-epochs", "2"))  # "killed" after epoch 2's checkpoint
    first = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert first["epoch"] == 2 and not (resumed / "model").exists()
    fit.main(fit_args(cache, resumed, "--resume"))
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert b["epoch"] == 3
    assert b["history"][0]["train_seconds"] == first["history"][0]["train_seconds"]  # resumed, not restarted
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():
        for name, t in state.items():
            assert torch.equal(t, b["optimizer"]["state"][i][name]), (i, name)
    assert a["scheduler"] == b["scheduler"]
    for k in ("train_loss", "val_loss", "bleu4", "cider"):
        assert [h[k] for h in a["history"]] == [h[k] for h in b["history"]], k
    ea, eb = load_file(straight / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


def test_resume_refuses_changed_arguments(cache, tmp_path):
    out = tmp_path / "run"
    fit.main(fit_args(cache, out, "--stop-after-epochs", "1"))
    with pytest.raises(SystemExit, match="--lr"):
        fit.main(fit_args(cache, out, "--resume", "--lr", "1e-3"))


def test_resume_checks_the_checkpoints_arguments_not_args_json(cache, tmp_path, monkeypatch):
    out = tmp_path / "run"
    fit.main(fit_args(cache, out, "--stop-after-epochs", "1"))  # run A, killed after its first checkpoint
    # run B: a fresh start with another --lr, killed during epoch 1 (args.json already rewritten, no checkpoint yet)
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(fit, "train_step", killed)
        with pytest.raises(KeyboardInterrupt):
            fit.main(fit_args(cache, out, "--lr", "1e-3"))
    assert json.loads((out / "args.json").read_text(encoding="utf-8"))["lr"] == 1e-3
    assert torch.load(out / "checkpoint.pt", weights_only=True)["args"]["lr"] == 5e-3  # still run A's
    with pytest.raises(SystemExit, match="--lr 0.005 -> 0.001"):
        fit.main(fit_args(cache, out, "--resume", "--lr", "1e-3"))  # B's arguments do not continue A's checkpoint


def test_missing_split_is_one_clear_line(cache, tmp_path):
    with pytest.raises(SystemExit, match=r"no split 'test'; splits present: \['train', 'validation'\]"):
        fit.main(fit_args(cache, tmp_path / "run", "--val-split", "test"))
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


@pytest.mark.parametrize("change, message", [
    (["--batch-size", "0"], r"--batch-size must be >= 1, got 0"),
    (["--max-len", "0"], r"--max-len must be >= 1, got 0"),
    (["--epochs", "0"], r"--epochs must be >= 1, got 0"),
    (["--eval-batch-size", "0"], r"--eval-batch-size must be >= 1, got 0"),
    (["--dropout", "1.5"], r"--dropout must be between 0 and 1, got 1.5"),
    (["--lr", "inf"], r"--lr must be >= 0, got inf"),
    (["--decoder", "attention", "--num-layers", "2"], r"the attention decoder has one LSTM layer"),
    (["--export-now"], r"--export-now needs --resume"),
])
def test_nonsense_arguments_exit_2_with_one_line_before_the_run_starts(cache, tmp_path, capsys, monkeypatch,
                                                                       change, message):
    from train.features import FeatureCache

    monkeypatch.setattr(FeatureCache, "open", lambda *a, **k: pytest.fail("read the cache for nonsense arguments"))
    with pytest.raises(SystemExit, match=message) as e:
        fit.main(fit_args(cache, tmp_path / "run", *change))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fit: error: ") and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_nonsense_arguments_exit_2_from_the_command_line(cache, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "train", "fit", *fit_args(cache, tmp_path / "run", "--batch-size", "0")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr == "fit: error: --batch-size must be >= 1, got 0\n"
    assert not (tmp_path / "run").exists()


def test_early_stopping_keeps_the_best_epoch(cache, tmp_path):
    # lr 0: every epoch scores exactly the same, so nothing improves after epoch 1
    out = tmp_path / "run"
    fit.main(fit_args(cache, out, "--epochs", "6", "--lr", "0", "--patience", "2", "--select", "val_loss"))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    assert ShowAndTell.from_pretrained(out / "model").extra["training"]["best_epoch"] == 1


def test_plateau_schedule_and_label_smoothing_run(cache, tmp_path):
    out = tmp_path / "run"
    fit.main(fit_args(cache, out, "--epochs", "2", "--schedule", "plateau", "--label-smoothing", "0.1",
                      "--select", "bleu4", "--max-val-images", "4"))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert "best" in ckpt["scheduler"] and ckpt["model_kwargs"]["vocab_size"] > 4
    assert ShowAndTell.from_pretrained(out / "model").extra["training"]["val_images"] == 4


def test_torchrun_two_ranks_gloo(cache, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train", "fit",
           *fit_args(cache, out, "--epochs", "2", threads=False)]  # torchrun's OMP_NUM_THREADS=1 per rank
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 ranks" in proc.stderr
    assert proc.stderr.count("epoch 1:") == 1  # rank 0 alone logs
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    model = ShowAndTell.from_pretrained(out / "model")
    assert model.vocab is not None and model.backbone == SPEC


def test_gpu_bench_synthetic_captions_are_well_formed():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_train", REPO / "bench" / "gpu_train.py")
    gpu_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_train)
    feats, pairs = gpu_train.synth_data(50, 40, 5, 300, 8, torch.device("cpu"))
    assert feats.shape == (50, 8) and len(pairs) == 200 and int(pairs.image.max()) == 39
    words = pairs.lengths - 2
    assert 9 < float(words.float().mean()) < 15 and int(words.min()) >= 3 and int(words.max()) <= 30
    rows = torch.arange(200)
    assert (pairs.tokens[:, 0] == 1).all() and (pairs.tokens[rows, pairs.lengths - 1] == 2).all()
    inside = torch.arange(pairs.tokens.shape[1])[None, :] < (pairs.lengths - 1)[:, None]
    inside[:, 0] = False
    assert (pairs.tokens[inside] >= 4).all() and (pairs.tokens[~inside & (torch.arange(pairs.tokens.shape[1])[None, :] >= pairs.lengths[:, None])] == 0).all()


def test_export_now_exports_the_best_epoch_so_far_and_the_run_can_continue(cache, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="needs --resume"):
        fit.main(fit_args(cache, out, "--export-now"))
    fit.main(fit_args(cache, out, "--stop-after-epochs", "2", "--select", "val_loss"))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    fit.main(fit_args(cache, out, "--resume", "--export-now", "--select", "val_loss"))
    exported = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(exported[k], ckpt["best"]["model"][k]) for k in exported)  # the best epoch, not the last
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["extra"]["training"]["best_epoch"] == ckpt["best"]["epoch"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2  # nothing trained
    fit.main(fit_args(cache, out, "--resume", "--select", "val_loss"))  # and the run goes on to its end
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 3
