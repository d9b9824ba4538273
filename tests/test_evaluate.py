"""python -m train evaluate: cached vs live features, metrics, report with thumbnails, evaluation.json."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers_images import colour_imagefolder
from train.data import open_captioned_images
from storyteller.decoding import beam_search, greedy_search
from train.features import FeatureCache
from storyteller.metrics import evaluate_captions
from storyteller.decoders import ShowAndTell
from storyteller.precision import auto_precision
from storyteller.vocab import Vocabulary
from train import evaluate



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 9-image imagefolder, its cache from a random-weights lite0, and an untrained model on that backbone."""
    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    colour_imagefolder(data, {"train": 1, "validation": 2})
    from train import extract

    threads = torch.get_num_threads()
    try:
        extract.main(["--dataset", str(data), "--backbone", "efficientnet_lite0", "--random-weights", "--out",
                      str(root / "feats"), "--workers", "0", "--threads", "1", "--quiet"])
    finally:
        torch.set_num_threads(threads)
    cache = FeatureCache.open(root / "feats")
    torch.manual_seed(0)
    vocab = Vocabulary.build([c for caps in cache.captions for c in caps], min_freq=1)
    model = ShowAndTell(len(vocab), feature_dim=cache.feature_dim, embed_dim=8, hidden_dim=16, backbone=cache.backbone)
    model.vocab = vocab
    model.save_pretrained(root / "model")
    return root, data, cache


def run(setup, tmp_path, *extra):
    root, data, _ = setup
    return evaluate.main(["--model", str(root / "model"), "--split", "validation", "--out", str(tmp_path / "e.json"),
                          *extra])


def test_cached_features_metrics_match_direct_decoding(setup, tmp_path):
    root, _, cache = setup
    result = run(setup, tmp_path, "--features", str(root / "feats"), "--beam", "1", "2", "--max-len", "6")
    assert json.loads((tmp_path / "e.json").read_text(encoding="utf-8")) == result
    assert list(result["methods"]) == ["greedy", "beam2"] and result["num_images"] == 6
    rows = cache.split("validation")
    refs = [cache.captions[r] for r in rows]
    model = ShowAndTell.from_pretrained(root / "model")
    model.precision = result["precision"]  # evaluate decodes as the app does (storyteller.precision.auto_precision)
    assert result["precision"] == auto_precision()
    feats = torch.from_numpy(np.asarray(cache.features[rows], dtype=np.float32))
    greedy = [c.text for c in greedy_search(model, feats, max_len=6)]
    beam = [c[0].text for c in beam_search(model, feats, beam_size=2, max_len=6)]
    for key, texts in (("greedy", greedy), ("beam2", beam)):
        m = result["methods"][key]
        for name, value in evaluate_captions(texts, refs).items():
            assert m[name] == pytest.approx(value), (key, name)
        assert m["mean_length"] == pytest.approx(np.mean([len(t.split()) for t in texts]))
        assert m["vocab_used"] == len({w for t in texts for w in t.split()})
        assert m["images_per_s"] > 0
    assert [ex["captions"]["greedy"] for ex in result["examples"]] == \
        [greedy[[cache.ids[r] for r in rows].index(ex["id"])] for ex in result["examples"]]


def test_live_features_equal_the_cache(setup):
    _, data, cache = setup
    images = open_captioned_images(data, "validation")
    live = evaluate.live_features(images, cache.backbone, torch.device("cpu"), batch_size=4, workers=0)
    cached = torch.from_numpy(np.asarray(cache.features[cache.split("validation")], dtype=np.float32))
    torch.testing.assert_close(live, cached, atol=2e-3, rtol=2e-3)  # the cache stores float16


def test_live_run_with_limit(setup, tmp_path):
    result = run(setup, tmp_path, "--dataset", str(setup[1]), "--beam", "1", "--limit", "2", "--examples", "1")
    assert result["num_images"] == 2 and result["features"] is None
    assert result["extraction"]["images_per_s"] > 0 and len(result["examples"]) == 1


def test_cache_from_another_backbone_is_refused(setup, tmp_path):
    root, _, cache = setup
    other = dict(cache.backbone, preprocessing=dict(cache.backbone["preprocessing"], crop=200))
    model = ShowAndTell.from_pretrained(root / "model")
    model2 = ShowAndTell(model.vocab_size, feature_dim=model.feature_dim, embed_dim=8, hidden_dim=16, backbone=other)
    model2.vocab = model.vocab
    model2.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit, match="crop|preprocessing"):
        evaluate.main(["--model", str(tmp_path / "other"), "--features", str(root / "feats"), "--out", str(tmp_path / "x.json")])


def test_report_thumbnails_seeded_examples_and_write_to_model(setup, tmp_path):
    root, data, _ = setup
    model_dir = tmp_path / "model"
    import shutil

    shutil.copytree(root / "model", model_dir)
    from storyteller.card import write_model_card

    write_model_card(model_dir)
    args = ["--model", str(model_dir), "--dataset", str(data), "--features", str(root / "feats"), "--beam", "1", "3",
            "--examples", "3", "--seed", "7", "--out", str(tmp_path / "e.json"), "--report", str(tmp_path / "r" / "eval.md")]
    result = evaluate.main(args + ["--write-to-model"])
    again = evaluate.main(args + ["--write-to-model"])
    assert [e["id"] for e in result["examples"]] == [e["id"] for e in again["examples"]]  # fixed seed
    picks = {tuple(e["id"] for e in evaluate.main(args[:-4] + ["--seed", str(s), "--out", str(tmp_path / "s.json")])["examples"])
             for s in range(4)}
    assert len(picks) > 1  # the seed does choose the images

    report = (tmp_path / "r" / "eval.md").read_text(encoding="utf-8")
    for ex in result["examples"]:
        thumb = tmp_path / "r" / ex["thumbnail"]
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and max(im.size) <= evaluate.THUMBNAIL_SIZE
        assert f"]({ex['thumbnail']})" in report
        assert ex["references"][0] in report and ex["captions"]["beam3"] in report
    assert "| greedy |" in report and "| beam 3 |" in report

    stored = json.loads((model_dir / "evaluation.json").read_text(encoding="utf-8"))["evaluations"]
    assert len(stored) == 1 and stored[0]["split"] == "validation"  # the rerun replaced, not appended
    assert all((model_dir / ex["image"]).is_file() for ex in stored[0]["examples"])
    evaluate.main(args[:-2] + ["--split", "train", "--write-to-model"])
    stored = json.loads((model_dir / "evaluation.json").read_text(encoding="utf-8"))["evaluations"]
    assert [e["split"] for e in stored] == ["validation", "train"]
    card = (model_dir / "README.md").read_text(encoding="utf-8")
    assert "split `train`" in card and "| beam 3 |" in card and "examples/" in card


def with_recommended_decoding(setup, folder, decoding):
    """A copy of the setup's model whose config.json recommends ``decoding`` (as ``train bundle`` writes it)."""
    import shutil

    shutil.copytree(setup[0] / "model", folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["extra"] = {**(config.get("extra") or {}), "decoding": decoding}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_decoding_defaults_are_the_models_recommended_ones(setup, tmp_path):
    root, _, cache = setup
    recommended = {"beam_size": 2, "alpha": 0.7, "no_repeat_ngram_size": 2, "max_len": 5}
    model_dir = with_recommended_decoding(setup, tmp_path / "bundled", recommended)
    base = ["--model", str(model_dir), "--features", str(root / "feats"), "--out", str(tmp_path / "e.json")]
    result = evaluate.main(base + ["--report", str(tmp_path / "eval.md")])
    assert list(result["methods"]) == ["greedy", "beam2"]
    assert (result["alpha"], result["no_repeat_ngram_size"], result["max_len"]) == (0.7, 2, 5)
    assert result["recommended_decoding"] == recommended
    rows = cache.split("validation")
    model = ShowAndTell.from_pretrained(model_dir)
    model.precision = result["precision"]
    feats = torch.from_numpy(np.asarray(cache.features[rows], dtype=np.float32))
    beam = [c[0].text for c in beam_search(model, feats, beam_size=2, max_len=5, alpha=0.7, no_repeat_ngram_size=2)]
    assert result["methods"]["beam2"]["bleu4"] == pytest.approx(evaluate_captions(beam, [cache.captions[r] for r in rows])["bleu4"])
    assert "max length 5, alpha 0.7, no repeated 2-grams" in (tmp_path / "eval.md").read_text(encoding="utf-8")

    # the command line still wins, setting by setting
    result = evaluate.main(base + ["--beam", "1", "--alpha", "0", "--no-repeat-ngram-size", "0"])
    assert list(result["methods"]) == ["greedy"]
    assert (result["alpha"], result["no_repeat_ngram_size"], result["max_len"]) == (0.0, 0, 5)
    # a model that recommends nothing: greedy + beam 3, alpha 0, no blocking, 20 steps
    result = run(setup, tmp_path, "--features", str(root / "feats"))
    assert list(result["methods"]) == ["greedy", "beam3"] and result["recommended_decoding"] == {}
    assert (result["alpha"], result["no_repeat_ngram_size"], result["max_len"]) == (0.0, 0, 20)


def test_out_of_range_decoding_is_refused(setup, tmp_path):
    model_dir = with_recommended_decoding(setup, tmp_path / "bad", {"max_len": 0})
    with pytest.raises(SystemExit, match="max_len must be between 1 and 100, got 0"):
        evaluate.main(["--model", str(model_dir), "--features", str(setup[0] / "feats"), "--out", str(tmp_path / "e.json")])
    with pytest.raises(SystemExit, match="alpha"):
        run(setup, tmp_path, "--features", str(setup[0] / "feats"), "--alpha", "-1")


def test_live_and_cached_evaluations_of_one_split_replace_each_other(setup, tmp_path, monkeypatch):
    root, data, _ = setup
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(root / "model", model_dir)
    monkeypatch.chdir(data.parent)  # the live run names the dataset as typed, relative to here
    common = ["--model", str(model_dir), "--split", "validation", "--beam", "1", "--limit", "2", "--examples", "1",
              "--out", str(tmp_path / "e.json"), "--write-to-model"]
    live = evaluate.main(common + ["--dataset", data.name])
    cached = evaluate.main(common + ["--features", str(root / "feats")])
    stored = json.loads((model_dir / "evaluation.json").read_text(encoding="utf-8"))["evaluations"]
    assert len(stored) == 1 and stored[0]["features"] == "feats"  # the cached run replaced the live one
    assert live["dataset"] == cached["dataset"] == data.name  # its name, never this machine's path
    assert live["model"] == cached["model"] == "model"


def test_missing_split_of_a_dataset_is_one_clear_line(setup, tmp_path):
    with pytest.raises(SystemExit, match="splits present"):
        run(setup, tmp_path, "--dataset", str(setup[1]), "--split", "test")


def test_one_decoding_loop_and_one_pixel_loader(setup, monkeypatch):
    """evaluate reads photos through train.extract's loader, and fit decodes through evaluate.decode_all."""
    root, data, cache = setup
    from train import extract, fit

    calls = []
    real_loader, real_decode = extract.make_loader, evaluate.decode_all
    monkeypatch.setattr(extract, "make_loader", lambda *a, **k: calls.append("loader") or real_loader(*a, **k))
    evaluate.live_features(open_captioned_images(data, "validation", limit_per_split=1), cache.backbone,
                           torch.device("cpu"), batch_size=4, workers=0)
    monkeypatch.setattr(fit, "decode_all", lambda *a, **k: calls.append("decode") or real_decode(*a, **k))
    model = ShowAndTell.from_pretrained(root / "model")
    feats = torch.from_numpy(np.asarray(cache.features, dtype=np.float32))
    rows = cache.split("validation")
    texts = fit.greedy_captions(model, feats, rows, max_len=6, batch_size=4)
    assert texts == [c.text for c in greedy_search(model, feats[torch.as_tensor(rows)], max_len=6)]
    assert calls == ["loader", "decode"]
    assert not hasattr(evaluate, "_Pixels") and not hasattr(evaluate, "_FirstImages")


def test_text_files_are_read_and_written_as_utf8():
    """Captions and dataset names are UTF-8 whatever the machine's locale: no text I/O without encoding=."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    missing = []
    for rel in ("train/fit.py", "train/evaluate.py", "train/report.py", "train/bundle.py", "storyteller/card.py", "app.py"):
        for node in ast.walk(ast.parse((repo / rel).read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            text_io = (isinstance(f, ast.Attribute) and f.attr in ("read_text", "write_text")) or \
                (isinstance(f, ast.Name) and f.id == "open" and not any(
                    isinstance(a, ast.Constant) and "b" in str(a.value) for a in node.args[1:2]))
            if text_io and not any(k.arg == "encoding" for k in node.keywords):
                missing.append(f"{rel}:{node.lineno}")
    assert not missing, missing


def test_an_evaluation_naming_the_dataset_by_its_path_is_replaced(setup, tmp_path):
    """evaluation.json files written before datasets were named by label must not keep a stale twin."""
    root, data, _ = setup
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(root / "model", model_dir)
    old = {"dataset": str(data.resolve()), "dataset_name": data.name, "split": "validation", "methods": {}, "examples": []}
    (model_dir / "evaluation.json").write_text(json.dumps({"evaluations": [old]}), encoding="utf-8")
    evaluate.main(["--model", str(model_dir), "--features", str(root / "feats"), "--beam", "1", "--limit", "1",
                   "--out", str(tmp_path / "e.json"), "--write-to-model"])
    text = (model_dir / "evaluation.json").read_text(encoding="utf-8")
    assert len(json.loads(text)["evaluations"]) == 1 and str(root) not in text


def test_live_features_are_the_apps_features_for_big_jpegs(tmp_path):
    """evaluate's live path decodes big JPEGs in draft mode exactly as the app (Captioner.features) does."""
    from storyteller.backbones import backbone_spec, create_backbone
    from storyteller.captioner import Captioner
    from tests.helpers_images import photo_like

    data = tmp_path / "data" / "validation"
    data.mkdir(parents=True)
    photo_like((1600, 1200), seed=3).save(data / "big.jpg", quality=92)  # >= 4x the resize: draft mode shrinks it
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "big.jpg", "captions": ["a photo"]}) + "\n",
                                         encoding="utf-8")
    spec = dict(backbone_spec("efficientnet_lite0"), weights=None)
    torch.manual_seed(0)
    live = evaluate.live_features(open_captioned_images(tmp_path / "data", "validation"), spec, torch.device("cpu"),
                                  batch_size=1, workers=0)
    torch.manual_seed(0)
    backbone = create_backbone(spec)
    vocab = Vocabulary(["a", "photo"])
    model = ShowAndTell(len(vocab), feature_dim=spec["feature_dim"], embed_dim=4, hidden_dim=8, backbone=spec)
    model.vocab = vocab
    app = Captioner(model, backbone, source="m").features([data / "big.jpg"])
    full = Captioner(model, backbone, source="m").features([data / "big.jpg"], draft_size=0)
    torch.testing.assert_close(live, app, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(live, full, atol=1e-5, rtol=1e-5)  # the draft decode really is another path


def test_stock_phrases_and_frequent_captions_on_hand_made_captions():
    captions = ["a little boy in a red shirt", "A dog runs.", "a little boy in a red shirt", "little boys play",
                "a dog runs"]
    references = [["a boy in a red shirt", "a child"], ["a dog"], ["a little boy plays", "a kid in red"], ["kids"],
                  ["a dog running", "a brown dog", "the dog runs"]]
    assert evaluate.frequent_captions(captions, 2) == [{"caption": "a little boy in a red shirt", "count": 2},
                                                        {"caption": "A dog runs.", "count": 1}]  # ties: first seen
    assert evaluate.phrase_share(captions, "Little Boy") == 2 / 5  # whole words: "little boys" does not count
    assert evaluate.phrase_share(captions, "dog runs") == 2 / 5  # the tokenizer drops case and punctuation
    assert evaluate.phrase_share([], "dog") == 0.0
    rates = evaluate.stock_phrase_rates(captions, references, ("little boy", "red shirt", "holding a camera"))
    # "backed": of the images whose caption says it, the share whose own references say it too
    # (image 0's people say "red shirt", image 2's say "little boy"; neither says both)
    assert rates["little boy"] == {"model": 2 / 5, "human": 1 / 9, "ratio": pytest.approx(3.6), "backed": 1 / 2}
    assert rates["red shirt"] == {"model": 2 / 5, "human": 1 / 9, "ratio": pytest.approx(3.6), "backed": 1 / 2}
    assert rates["holding a camera"] == {"model": 0.0, "human": 0.0, "ratio": None, "backed": None}  # never said
    elsewhere = evaluate.stock_phrase_rates(["a dog runs", "a cat"], [["a cat"], ["a dog runs"]], ("dog runs",))
    assert elsewhere["dog runs"] == {"model": 1 / 2, "human": 1 / 2, "ratio": 1.0, "backed": 0.0}  # not its photo's
    assert evaluate.parse_phrases(None) == evaluate.STOCK_PHRASES
    assert evaluate.parse_phrases("Red shirt, little  boy,,red shirt") == ("red shirt", "little boy")
    assert evaluate.parse_phrases("none") == ()


def test_evaluate_reports_frequent_captions_and_stock_phrases_against_the_references(setup, tmp_path):
    root, _, cache = setup
    rows = cache.split("validation")
    feats = torch.from_numpy(np.asarray(cache.features[rows], dtype=np.float32))
    greedy = [c.text for c in greedy_search(ShowAndTell.from_pretrained(root / "model"), feats, max_len=6)]
    said = greedy[0].split()[0]  # a word the model does say, and one phrase the references say
    result = run(setup, tmp_path, "--features", str(root / "feats"), "--beam", "1", "--max-len", "6",
                 "--stock-phrases", f"{said},red picture", "--report", str(tmp_path / "r.md"))
    m = result["methods"]["greedy"]
    assert m["top_captions"] == [{"caption": c, "count": k} for c, k in Counter(greedy).most_common(10)]
    refs = [r for row in rows for r in cache.captions[row]]
    human = sum(" red picture" in f" {r}" for r in refs) / len(refs)
    assert human == pytest.approx(1 / 6)  # 2 red images of 6, one of their 2 references each
    said_red = [i for i, g in enumerate(greedy) if "red picture" in g]
    backed = sum(any("red picture" in r for r in cache.captions[rows[i]]) for i in said_red)
    assert m["stock_phrases"]["red picture"] == {"model": len(said_red) / 6, "human": human,
                                                 "ratio": pytest.approx(len(said_red) / 6 / human),
                                                 "backed": backed / len(said_red) if said_red else None}
    model_share = sum(said in g.split() for g in greedy) / 6
    assert m["stock_phrases"][said]["model"] == model_share > 0
    report = (tmp_path / "r.md").read_text(encoding="utf-8")
    assert f"| {greedy[0]} | {Counter(greedy)[greedy[0]]} |" in report
    assert f"| red picture | {m['stock_phrases']['red picture']['model']:.2%} | {human:.2%} |" in report
    said_row = next(line for line in report.splitlines() if line.startswith(f"| {said} |"))
    assert said_row.endswith(f"| {m['stock_phrases'][said]['backed']:.0%} |")  # the word the model says: backed
    default = run(setup, tmp_path, "--features", str(root / "feats"), "--beam", "1", "--max-len", "6")
    assert list(default["methods"]["greedy"]["stock_phrases"]) == list(evaluate.STOCK_PHRASES)


def test_max_len_help_says_what_a_step_is_and_the_searches_do_it():
    """A caption cut at N steps has N words; one that ends itself (<end> is a step) at most N-1."""
    from train import fit, scst

    for parser in (evaluate.build_parser(), fit.build_parser(), scst.build_parser()):
        assert evaluate.MAX_LEN_HELP in " ".join(parser.format_help().split())
    torch.manual_seed(0)
    vocab = Vocabulary(["a", "b", "c", "d"])
    model = ShowAndTell(len(vocab), feature_dim=4, embed_dim=4, hidden_dim=8).eval()
    model.vocab = vocab
    n = 3
    feats = torch.randn(40, 4) * 3
    caps = greedy_search(model, feats, max_len=n) + [b[0] for b in beam_search(model, feats, beam_size=2, max_len=n)]
    assert {c.finished for c in caps} == {True, False}  # both kinds occur
    assert all(len(c.tokens) <= n - 1 if c.finished else len(c.tokens) == n for c in caps)
    texts = evaluate.decode_all(model, feats, 1, max_len=n, batch_size=16)
    assert max(len(t.split()) for t in texts) == n
