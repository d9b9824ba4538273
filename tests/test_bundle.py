import json

import pytest
import torch
from safetensors.torch import load_file

from helpers_models import save_test_model
from storyteller.captioner import load
from storyteller.decoders import ShowAndTell
from train.bundle import bundle
from train.__main__ import main as train_main


def test_bundle_halves_weights_keeps_the_model_and_records_decoding(tmp_path):
    src = save_test_model(tmp_path / "src", pretrained_backbone=False)
    (src / "loss_curve.png").write_bytes(b"\x89PNG fake")
    out = bundle(src, tmp_path / "out", {"beam_size": 3, "alpha": 0.5, "no_repeat_ngram_size": 3, "max_len": 16})
    assert {"config.json", "model.safetensors", "vocab.json", "README.md", "loss_curve.png"} <= {p.name for p in out.iterdir()}
    weights = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.float16 for t in weights.values())
    a, b = ShowAndTell.from_pretrained(src), ShowAndTell.from_pretrained(out)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v.half().float())
    assert b.vocab == a.vocab
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert cfg["extra"]["decoding"] == {"beam_size": 3, "alpha": 0.5, "no_repeat_ngram_size": 3, "max_len": 16}
    # the captioner picks the recommended decoding up as its defaults
    assert load(str(out)).decoding["beam_size"] == 3
    assert (out / "model.safetensors").stat().st_size < 0.6 * (src / "model.safetensors").stat().st_size


def test_bundle_refuses_a_non_empty_target_and_a_broken_source(tmp_path):
    src = save_test_model(tmp_path / "src", pretrained_backbone=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me", encoding="utf-8")
    with pytest.raises(FileExistsError):
        bundle(src, tmp_path / "busy", {})
    assert (tmp_path / "busy" / "x").read_text(encoding="utf-8") == "keep me"
    (src / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError):
        train_main(["bundle", "--model", str(src), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("decoding, message", [
    ({"beam_size": 0}, "beam_size must be >= 1"), ({"beam_size": 2.5}, "beam_size must be a whole number"),
    ({"max_len": 0}, "max_len must be between 1 and 100"), ({"max_len": 101}, "max_len must be between 1 and 100"),
    ({"alpha": -0.1}, "alpha must be >= 0"), ({"alpha": float("nan")}, "alpha must be a finite number"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be >= 0"), ({"beam": 3}, "unknown decoding settings"),
])
def test_bundle_refuses_bad_decoding_settings(tmp_path, decoding, message):
    src = save_test_model(tmp_path / "src", pretrained_backbone=False)
    with pytest.raises(ValueError, match=message):
        bundle(src, tmp_path / "out", decoding)
    assert not (tmp_path / "out").exists()


def test_bundle_cli_refuses_bad_decoding_settings_in_one_line(tmp_path, capsys):
    src = save_test_model(tmp_path / "src", pretrained_backbone=False)
    with pytest.raises(SystemExit) as e:
        train_main(["bundle", "--model", str(src), "--out", str(tmp_path / "out"), "--max-len", "101"])
    assert e.value.code == 2 and "max_len must be between 1 and 100, got 101" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bundle_writes_atomically_through_fileio():
    """No hand-rolled temp-file-and-rename left in the writers: they go through storyteller.fileio."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    for rel in ("train/bundle.py", "train/report.py", "train/evaluate.py"):
        text = (repo / rel).read_text(encoding="utf-8")
        assert "os.replace" not in text and '".tmp"' not in text, rel


def test_bad_endings_mean_the_same_in_bundle_evaluate_and_scst(tmp_path):
    """``standard`` names storyteller.decoding_settings.BAD_ENDINGS everywhere, ``none`` turns the rule off, and a
    list is words; one parser (storyteller.decoding_settings.parse_bad_endings) behind every command."""
    import argparse

    from storyteller.decoding_settings import BAD_ENDINGS
    from train import evaluate, scst

    src = save_test_model(tmp_path / "src", pretrained_backbone=False)
    for spec, words in (("standard", list(BAD_ENDINGS)), ("none", []), ("with, A", ["with", "a"])):
        out = tmp_path / spec.replace(",", "").replace(" ", "")
        train_main(["bundle", "--model", str(src), "--out", str(out), "--bad-endings", spec])
        assert json.loads((out / "config.json").read_text(encoding="utf-8"))["extra"]["decoding"].get("bad_endings") == words
        given = argparse.Namespace(alpha=None, no_repeat_ngram_size=None, max_len=None, min_len=None, beam=None,
                                   bad_endings=spec)
        assert evaluate.decoding_settings(given, {})["bad_endings"] == words
        scst_args = scst.build_parser().parse_args(["--init", "m", "--features", "f", "--out", "o", "--bad-endings", spec])
        model = ShowAndTell.from_pretrained(src)
        assert scst.validation_decoding(scst_args, model)["bad_endings"] == [w for w in words if w in model.vocab.stoi]
    assert scst.build_parser().get_default("bad_endings") == "standard"  # scst's default: the standard list
    assert evaluate.build_parser().get_default("bad_endings") is None  # evaluate's and bundle's: the model's own


def test_weights_over_the_shard_size_are_written_in_shards_that_load_as_one(tmp_path):
    """Big weights go out as model-0000i-of-0000N.safetensors plus the Hub's index (no file too big for a
    repository); they load exactly as the single file does, through load_decoder, load and hub_upload's list."""
    import hub_upload
    from storyteller.captioner import ModelLoadError
    from storyteller.decoders import load_decoder

    src = save_test_model(tmp_path / "src", pretrained_backbone=False)
    decoding = {"beam_size": 2, "alpha": 0.5, "no_repeat_ngram_size": 3, "max_len": 8}
    one = bundle(src, tmp_path / "one", decoding)
    size = (one / "model.safetensors").stat().st_size
    sharded = bundle(src, tmp_path / "sharded", decoding, max_shard_bytes=size // 3)
    shards = sorted(p.name for p in sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text(encoding="utf-8"))
    held = {s: [k for k, f in index["weight_map"].items() if f == s] for s in shards}
    # over the limit only where one tensor alone is bigger (a tensor is never split)
    assert all((sharded / s).stat().st_size <= size // 3 + 4096 or len(held[s]) == 1 for s in shards)
    assert sorted(set(index["weight_map"].values())) == shards
    a, b = load_decoder(one), load_decoder(sharded)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    from PIL import Image

    photo = Image.new("RGB", (64, 48), (90, 120, 30))
    assert load(str(sharded)).caption([photo])[0].beam[0].text == load(str(one)).caption([photo])[0].beam[0].text
    keep, _ = hub_upload.model_files(sharded)
    assert {"model.safetensors.index.json", *shards} <= set(keep) and "model.safetensors" not in keep
    (sharded / shards[1]).unlink()
    with pytest.raises(ModelLoadError, match=shards[1]):
        load(str(sharded))
