"""storyteller.captioner: load() from a folder, the env var, or a (cached, offline) Hub repo; captioning in
one batch; and a clear ModelLoadError for every way loading can fail. No test touches the network."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import storyteller.loading as loading
from storyteller.captioner import Captioner, CaptionResult, ModelLoadError, load
from storyteller.decoding import beam_search, greedy_search
from storyteller.images import ImageError
from storyteller.vocab import SPECIAL_TOKENS
from tests.helpers_images import photo_like, write_bad_inputs, write_odd_inputs
from tests.helpers_models import put_in_hub_cache, save_test_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_test_model(tmp_path_factory.mktemp("model") / "tiny-lite0")


@pytest.fixture(scope="module")
def cap(model_dir) -> Captioner:
    return load(str(model_dir))


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """huggingface_hub in offline mode with an empty cache in tmp_path: no call can reach the network."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    return cache


def assert_clean(text: str) -> None:
    assert isinstance(text, str) and text.strip()
    assert not any(tok in text for tok in SPECIAL_TOKENS), text


# -- captioning ----------------------------------------------------------------------------------------
def test_caption_a_batch_returns_greedy_beam_and_timings(cap):
    images = [photo_like((500, 333), seed=1), photo_like((333, 500), seed=2)]
    results = cap.caption(images, beam_size=4, max_len=12, n_best=3)
    assert len(results) == 2 and all(isinstance(r, CaptionResult) for r in results)
    for r in results:
        assert_clean(r.greedy.text)
        assert len(r.beam) == 3 and all(len(c.tokens) <= 12 for c in r.beam)
        assert [c.score for c in r.beam] == sorted((c.score for c in r.beam), reverse=True)
        for c in (r.greedy, *r.beam):
            assert_clean(c.text)
            assert c.log_prob < 0
        assert r.best is r.beam[0]
        assert set(r.timings_ms) == {"preprocess", "backbone", "search", "total"}
        assert all(v >= 0 for v in r.timings_ms.values())
        assert r.timings_ms["total"] >= r.timings_ms["backbone"]
    d = results[0].to_dict()
    assert json.loads(json.dumps(d)) == d and d["greedy"]["text"] == results[0].greedy.text


def test_caption_runs_greedy_and_beam_in_one_pass_with_their_separate_results(cap, monkeypatch):
    """Captioner.caption decodes greedy + beam in one pass (one decoder call per step for both), and
    gets what greedy_search and beam_search give run separately."""
    from storyteller.decoding import beam_search, greedy_search

    images = [photo_like((500, 333), seed=s) for s in range(4)]
    calls = []
    step = cap.model.step
    monkeypatch.setattr(cap.model, "step", lambda *a, **k: calls.append(a[0].shape[0]) or step(*a, **k))
    results = cap.caption(images, beam_size=3, max_len=12, n_best=3)
    # one call a step for the rows of both: the first step once per photo (every row of a photo starts from
    # the same state and <start>), then 4 greedy + 4 x 3 beam rows
    assert calls[:2] == [4, 4 + 4 * 3] and len(calls) <= 12
    monkeypatch.setattr(cap.model, "step", step)
    feats = cap.features(images)
    kw = dict(max_len=12, no_repeat_ngram_size=cap.decoding["no_repeat_ngram_size"], bad_endings=cap.decoding["bad_endings"])
    greedy = greedy_search(cap.model, feats, **kw)
    beams = beam_search(cap.model, feats, beam_size=3, alpha=cap.decoding["alpha"], n_best=3, **kw)
    for r, g, b in zip(results, greedy, beams):
        # the precision is this CPU's pick (cap.precision): each precision keeps a row's numbers independent of
        # its batch (tests/test_precision.py); float sums may still round in another order, hence rel=1e-4
        assert r.greedy.tokens == g.tokens, cap.precision
        assert r.greedy.log_prob == pytest.approx(g.log_prob, rel=1e-4, abs=1e-5)
        assert [c.tokens for c in r.beam] == [c.tokens for c in b], cap.precision
        assert [c.score for c in r.beam] == pytest.approx([c.score for c in b], rel=1e-4, abs=1e-5)


def test_caption_uses_the_configured_backbone_and_preprocessing(cap):
    """Same result as the hand-wired pipeline: backbone from config.json -> its transform -> searches."""
    img = photo_like((400, 300), seed=3)
    assert cap.backbone.spec["name"] == "efficientnet_lite0" and cap.backbone.spec["weights"] is not None
    assert cap.transform.preprocessing == cap.model.backbone["preprocessing"]
    features = cap.backbone.encode([img])
    want_greedy = greedy_search(cap.model, features, max_len=10)[0].text
    want_beam = beam_search(cap.model, features, beam_size=3, max_len=10)[0][0].text
    got = cap.caption([img], beam_size=3, max_len=10)[0]
    assert got.greedy.text == want_greedy and got.beam[0].text == want_beam, cap.precision


def test_batch_gives_the_same_captions_as_one_by_one(cap):
    images = [photo_like((320, 240), seed=s) for s in range(3)]
    batch = cap.caption(images, beam_size=3, max_len=10)
    for img, r in zip(images, batch):
        one = cap.caption([img], beam_size=3, max_len=10)[0]
        assert one.greedy.text == r.greedy.text and one.beam[0].text == r.beam[0].text


def test_inputs_can_be_paths_bytes_files_and_odd_modes(cap, tmp_path):
    p = tmp_path / "p.jpg"
    photo_like((300, 200), seed=4).save(p, quality=90)
    with open(p, "rb") as f:
        results = cap.caption([p, str(p), p.read_bytes(), f], beam=False, max_len=8)
    assert len({r.greedy.text for r in results}) == 1 and results[0].beam == []
    assert results[0].best is results[0].greedy
    odd = write_odd_inputs(tmp_path / "odd")
    for r in cap.caption(list(odd.values()), max_len=8):
        assert_clean(r.greedy.text)


def test_call_returns_the_best_caption(cap):
    img = photo_like(seed=5)
    assert cap(img, max_len=8) == cap.caption([img], max_len=8)[0].beam[0].text


def test_bad_images_and_settings_raise_clear_errors(cap, tmp_path):
    bad = write_bad_inputs(tmp_path)
    for path in bad.values():
        with pytest.raises(ImageError):
            cap.caption([photo_like(), path])
    with pytest.raises(ValueError, match="n_best"):
        cap.caption([photo_like()], beam_size=2, n_best=3)
    with pytest.raises(ValueError, match="both off"):
        cap.caption([photo_like()], greedy=False, beam=False)
    with pytest.raises(ValueError, match="max_len"):
        cap.caption([photo_like()], max_len=0)
    assert cap.caption([]) == []
    assert_clean(cap.caption([photo_like()], max_len=5)[0].greedy.text)  # still fine afterwards


def test_real_photos(cap, fullres_dir):
    rows = [json.loads(line) for line in (fullres_dir / "metadata.jsonl").read_text().splitlines()[:4]]
    results = cap.caption([fullres_dir / r["file_name"] for r in rows], beam_size=5)
    assert len(results) == 4
    for r in results:
        assert_clean(r.greedy.text) and assert_clean(r.beam[0].text)


def test_info_shows_backbone_metrics_and_evaluations(tmp_path):
    d = save_test_model(tmp_path / "m", extra={"metrics": {"bleu4": 0.2, "cider": 0.5, "split": "validation"},
                                               "decoding": {"beam_size": 3, "alpha": 0.7}})
    ev = {"evaluations": [{"dataset_name": "flickr8k", "split": "validation", "num_images": 1000,
                           "methods": {"greedy": {"bleu4": 0.21, "cider": 0.52}, "beam3": {"beam": 3, "bleu4": 0.23}}}]}
    (d / "evaluation.json").write_text(json.dumps(ev))
    c = load(d)
    info = c.info
    assert info["backbone"] == "efficientnet_lite0" and info["feature_dim"] == 1280
    assert info["metrics"]["bleu4"] == 0.2 and info["evaluations"][0]["methods"]["greedy"]["cider"] == 0.52
    assert c.decoding["beam_size"] == 3 and c.decoding["alpha"] == 0.7  # the model's recorded decoding settings
    assert len(c.caption([photo_like()], n_best=3)[0].beam) == 3  # default beam 3 from config
    assert "efficientnet_lite0" in repr(c)


def test_unreadable_evaluation_json_warns_and_shows_none(tmp_path, monkeypatch):
    d = save_test_model(tmp_path / "m")
    (d / "evaluation.json").write_text("{not json", encoding="utf-8")
    c = load(d)
    with pytest.warns(UserWarning, match="evaluation.json"):
        assert c.info["evaluations"] == []
    import storyteller.card

    def bug(model_dir):
        raise RuntimeError("a bug, not a bad file")

    monkeypatch.setattr(storyteller.card, "read_evaluations", bug)
    with pytest.raises(RuntimeError, match="a bug"):  # only file problems are turned into "no figures"
        c.info


def test_model_files_are_read_as_utf8_whatever_the_locale(tmp_path):
    """config.json and evaluation.json hold UTF-8 text; an ASCII locale (LC_ALL=C) must still read them."""
    d = save_test_model(tmp_path / "m")
    config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    config["extra"]["dataset"] = "Flickr8k — café"
    (d / "config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    ev = {"evaluations": [{"dataset_name": "Flickr8k — café", "methods": {}}]}
    (d / "evaluation.json").write_text(json.dumps(ev, ensure_ascii=False), encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8"}
    code = ("import json, sys; from storyteller.captioner import load; "
            "i = load(sys.argv[1]).info; print(json.dumps([i['dataset'], i['evaluations'][0]['dataset_name']]))")
    run = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, encoding="utf-8",
                         env=env, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == ["Flickr8k — café"] * 2


# -- where the model comes from --------------------------------------------------------------------
def test_env_var_overrides_the_default(monkeypatch, model_dir, tmp_path):
    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", tmp_path / "no-bundled-model")
    monkeypatch.setenv("STORYTELLER_MODEL", str(model_dir))
    assert loading.default_model() == str(model_dir)
    c = load()
    assert c.source == str(model_dir)


def test_bundled_folder_is_the_default(monkeypatch, model_dir):
    monkeypatch.delenv("STORYTELLER_MODEL", raising=False)
    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", model_dir)
    assert loading.default_model() == str(model_dir)


def test_no_model_anywhere_says_how_to_pass_one(monkeypatch, tmp_path):
    monkeypatch.delenv("STORYTELLER_MODEL", raising=False)
    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", tmp_path / "models" / "flickr8k-lite0-ensemble")
    with pytest.raises(ModelLoadError) as e:
        load()
    msg = str(e.value)
    assert "flickr8k-lite0-ensemble" in msg and "--model" in msg and "STORYTELLER_MODEL" in msg and "repo id" in msg


def test_cached_hub_repo_loads_offline(offline_hub, model_dir):
    snap = put_in_hub_cache(model_dir, offline_hub, "someone/tiny-captioner")
    c = load("someone/tiny-captioner")
    assert c.source == "someone/tiny-captioner" and c.model_dir == snap
    assert_clean(c(photo_like(), max_len=6))


def test_hub_repo_not_cached_while_offline(offline_hub):
    with pytest.raises(ModelLoadError) as e:
        load("someone/not-downloaded")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "local" in msg and "someone/not-downloaded" in msg


def test_hub_revision_not_cached_while_offline(offline_hub, model_dir):
    put_in_hub_cache(model_dir, offline_hub, "someone/tiny-captioner")
    with pytest.raises(ModelLoadError, match="revision 'v2'"):
        load("someone/tiny-captioner", revision="v2")


def _http_error(cls, status: int):
    """A huggingface_hub HTTP error, built without its HTTP library (requests, httpx or httpx2, by version):
    the errors only read ``headers`` and ``request`` from the response."""
    response = SimpleNamespace(status_code=status, headers={}, request=None, url="https://huggingface.co/api/models/x")
    return cls("mocked", response=response)


@pytest.mark.parametrize("error, words", [
    ("RepositoryNotFoundError", "no Hub model repo"),
    ("GatedRepoError", "gated"),
    ("RevisionNotFoundError", "no revision"),
])
def test_hub_errors_become_clear_messages(monkeypatch, error, words):
    import huggingface_hub
    from huggingface_hub import errors

    exc = _http_error(getattr(errors, error), 404)

    def fake_snapshot_download(**kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(ModelLoadError, match=words):
        load("someone/does-not-exist", revision="v9")


def test_hub_repo_without_model_files(monkeypatch, tmp_path):
    import huggingface_hub

    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "README.md").write_text("# not a model")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: str(snap))
    with pytest.raises(ModelLoadError, match="not a Neural Storyteller model"):
        load("someone/a-dataset-card")


def test_invalid_names(tmp_path):
    with pytest.raises(ModelLoadError, match="no model folder"):
        load(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no model folder"):
        load("./models/nope")
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="is a file"):
        load(tmp_path / "f.json")


# -- broken model folders ----------------------------------------------------------------------------
@pytest.fixture
def broken(model_dir, tmp_path) -> Path:
    d = tmp_path / "broken"
    shutil.copytree(model_dir, d)
    return d


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "vocab.json"])
def test_folder_missing_a_file(broken, missing):
    (broken / missing).unlink()
    with pytest.raises(ModelLoadError, match=f"missing {missing}"):
        load(broken)


def test_vocabulary_that_does_not_match_the_config(broken):
    vocab = json.loads((broken / "vocab.json").read_text())
    vocab["itos"] = vocab["itos"][:-2]
    (broken / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ModelLoadError, match="vocab"):
        load(broken)


def test_weights_that_do_not_match_the_config(broken):
    config = json.loads((broken / "config.json").read_text())
    config["hidden_dim"] = 48
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="does not match"):
        load(broken)


def test_config_without_a_backbone(broken):
    config = json.loads((broken / "config.json").read_text())
    del config["backbone"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="no backbone"):
        load(broken)


def test_config_with_an_unknown_backbone_or_bad_json(broken):
    config = json.loads((broken / "config.json").read_text())
    config["backbone"]["name"] = "vgg99"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="vgg99"):
        load(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable"):
        load(broken)


def _edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change, words", [
    (lambda c: c.update(extra=["x"]), "extra must be a JSON object"),
    (lambda c: c.update(extra={"decoding": {"max_len": 0}}), "max_len must be between 1 and 100"),
    (lambda c: c.update(extra={"decoding": {"beam_size": "wide"}}), "beam_size must be a whole number"),
    (lambda c: c.update(extra={"decoding": {"alpha": -1}}), "alpha must be >= 0"),
    (lambda c: c.update(extra={"decoding": ["beam"]}), "must be a JSON object"),
    (lambda c: c.update(decoder="transformer"), "names decoder 'transformer'"),
    (lambda c: c.update(vocab_size="many"), "cannot load"),
], ids=["extra-list", "max-len-0", "beam-word", "alpha-negative", "decoding-list", "unknown-decoder", "vocab-size-word"])
def test_every_bad_config_is_a_model_load_error_at_load(broken, change, words):
    """Bug 4 of issue 21: a config.json that cannot work fails at load with a ModelLoadError, never later
    (max_len 0 used to load and fail at the first caption) and never as another exception."""
    _edit_config(broken, change)
    with pytest.raises(ModelLoadError, match=words):
        load(broken)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("tensor", ["init_c.weight", "head.bias"])
def test_non_finite_weights_are_a_model_load_error(broken, value, tensor):
    """NaN in init_c once gave one caption for every photo with exit 0; NaN elsewhere an IndexError at the
    first caption (in the app: at warm-up)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(broken / "model.safetensors")
    weights[tensor][0] = value
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=f"NaN or infinite values .*{tensor}"):
        load(broken)


def test_non_finite_weights_stop_the_cli_and_the_app_with_one_line(broken, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    weights = load_file(broken / "model.safetensors")
    weights["lstm.weight_hh_l0"][3, 3] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    photo = tmp_path / "p.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(photo)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    for cmd, code in (([sys.executable, "-m", "storyteller", "caption", "--model", str(broken), str(photo)], 2),
                      ([sys.executable, "app.py", "--model", str(broken), "--port", "0"], 1)):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        lines = [line for line in r.stderr.splitlines() if line.strip() and "Warning" not in line]
        assert r.returncode == code, r.stderr
        assert len(lines) == 1 and "NaN or infinite" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_backbone_feature_size_must_match_the_decoder(cap):
    class Wrong(torch.nn.Module):
        feature_dim = 7
        transform = None

    with pytest.raises(ModelLoadError, match="7-d"):
        Captioner(cap.model, Wrong(), source="x")


def test_captioner_accepts_pil_without_touching_it(cap):
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    cap.caption([img], max_len=4)
    assert img.mode == "RGBA"


@pytest.mark.parametrize("damage, words", [("lfs", "Git LFS pointer"), ("truncate", "truncated"),
                                           ("header", "not a safetensors"), ("empty", "not a safetensors")])
def test_broken_weights_file_is_a_model_load_error_saying_what_to_do(tmp_path, damage, words):
    from tests.helpers_models import save_test_model

    folder = save_test_model(tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"lfs": b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 123\n",
                         "truncate": data[: len(data) - 100], "header": b"\xff" * 8 + data[8:],
                         "empty": b""}[damage])
    with pytest.raises(ModelLoadError, match=words) as e:
        load(str(folder))
    assert "again" in str(e.value) or "lfs" in str(e.value)


def test_model_label_never_shows_a_machine_folder(tmp_path):
    from storyteller.captioner import DEFAULT_MODEL_DIR, model_label

    assert model_label(str(DEFAULT_MODEL_DIR)) == "models/flickr8k-lite0-ensemble"
    (tmp_path / "my-model").mkdir()
    assert model_label(str(tmp_path / "my-model")) == "my-model"
    assert model_label("user/model") == "user/model"


def test_the_app_the_cli_and_evaluate_give_a_photo_the_same_captions(tmp_path, monkeypatch):
    """Issue 21: on one machine the app's call, the CLI (at 1 and 2 threads) and `train evaluate` (live
    features) caption the example photos alike: precision by a fixed rule, rows independent of their batch."""
    from storyteller.precision import ENV
    from train.evaluate import main as evaluate

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("STORYTELLER_MODEL", raising=False)
    photos = sorted((REPO / "examples").glob("*.jpg"))
    captions = json.loads((REPO / "examples" / "captions.json").read_text(encoding="utf-8"))["captions"]
    captioner = load()
    k = captioner.decoding["beam_size"]
    app = {p.name: (r.greedy.text, r.beam[0].text)  # the app's call: one photo, every beam hypothesis
           for p in photos for r in captioner.caption([captioner.load_image(p)], beam_size=k, n_best=k)}
    for threads in ("1", "2"):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads}
        r = subprocess.run([sys.executable, "-m", "storyteller", "caption", "--json", *map(str, photos)],
                           capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        cli = {Path(rec["image"]).name: (rec["greedy"], rec["beam"]) for rec in map(json.loads, r.stdout.splitlines())}
        assert cli == app, (threads, r.stderr)
    folder = tmp_path / "data" / "validation"  # the example photos as an imagefolder split
    folder.mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for p in photos:
            shutil.copy(p, folder / p.name)
            f.write(json.dumps({"file_name": p.name, "captions": captions[p.name]}) + "\n")
    evaluate(["--model", str(captioner.model_dir), "--dataset", str(tmp_path / "data"), "--split", "validation",
              "--beam", "1", str(k), "--examples", str(len(photos)), "--out", str(tmp_path / "eval.json")])
    result = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    assert result["precision"] == captioner.precision
    got = {Path(ex["id"]).name: (ex["captions"]["greedy"], ex["captions"][f"beam{k}"]) for ex in result["examples"]}
    assert got == app

