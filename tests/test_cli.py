"""python -m storyteller: plain and JSON output, a bad file gets its own error line while the others are
still captioned, exit status, and loading a cached Hub repo offline (a real subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from storyteller.__main__ import main
from storyteller.vocab import SPECIAL_TOKENS
from tests.helpers_images import photo_like, write_bad_inputs
from tests.helpers_models import put_in_hub_cache, save_test_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_test_model(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("photos")
    paths = []
    for i, size in enumerate([(500, 333), (333, 500), (640, 480)]):
        paths.append(d / f"photo{i}.jpg")
        photo_like(size, seed=i).save(paths[-1], quality=90)
    return paths


def clean(text: str) -> bool:
    return bool(text.strip()) and not any(t in text for t in SPECIAL_TOKENS)


def test_plain_output_one_line_per_image(model_dir, photos, capsys):
    assert main(["caption", "--model", str(model_dir), "--beam", "3", "--max-len", "8", *map(str, photos)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 3 and err == ""
    for line, path in zip(lines, photos):
        image, beam, greedy = line.split("\t")
        assert image == str(path) and clean(beam) and clean(greedy)
        assert len(beam.split()) <= 8


def test_json_output_and_a_bad_file_in_the_middle(model_dir, photos, tmp_path, capsys):
    bad = write_bad_inputs(tmp_path)
    args = [str(photos[0]), str(bad["truncated.jpg"]), str(photos[1]), str(bad["bomb_20000x20000.png"]),
            str(tmp_path / "missing.jpg"), str(photos[2])]
    status = main(["caption", "--model", str(model_dir), "--json", "--beam", "4", "--n-best", "2",
                   "--batch-size", "2", *args])
    assert status == 1  # not all succeeded
    out, _ = capsys.readouterr()
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in recs] == args  # input order kept across batches and errors
    ok = [r for r in recs if "error" not in r]
    errors = {r["image"]: r["error"] for r in recs if "error" in r}
    assert len(ok) == 3 and len(errors) == 3
    assert "truncated" in errors[str(bad["truncated.jpg"])]
    assert "megapixels" in errors[str(bad["bomb_20000x20000.png"])]
    assert "no such image file" in errors[str(tmp_path / "missing.jpg")]
    for r in ok:
        assert r["beam_size"] == 4 and clean(r["beam"]) and clean(r["greedy"])
        assert r["beam_log_prob"] < 0 and r["greedy_log_prob"] < 0
        assert len(r["n_best"]) == 2 and r["n_best"][0]["caption"] == r["beam"]
        assert {"preprocess", "backbone", "search", "total"} <= set(r["batch_timings_ms"])
        assert "timings_ms" not in r  # the batch's times are labelled as the batch's
    # --batch-size 2, errors flush the batch: photo0 alone, photo1 alone, photo2 alone
    assert [r["batch_images"] for r in ok] == [1, 1, 1]


def test_json_timings_are_labelled_as_the_batchs(model_dir, photos, capsys):
    assert main(["caption", "--model", str(model_dir), "--json", "--max-len", "5", "--batch-size", "3",
                 *map(str, photos)]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["batch_images"] for r in recs] == [3, 3, 3]
    assert recs[0]["batch_timings_ms"] == recs[1]["batch_timings_ms"] == recs[2]["batch_timings_ms"]
    assert recs[0]["batch_timings_ms"]["total"] > 0 and all(r["warnings"] == [] for r in recs)


def test_max_len_help_says_it_counts_decoder_steps(capsys):
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "a caption cut at N steps has N words (no <end>); one that ends itself has at most N-1 words" in help_text


def test_tiny_and_flat_photos_are_captioned_with_a_warning(model_dir, tmp_path, capsys):
    from PIL import Image

    tiny, flat = tmp_path / "tiny.png", tmp_path / "flat.png"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(tiny)
    Image.new("RGB", (300, 200), (90, 120, 200)).save(flat)
    assert main(["caption", "--model", str(model_dir), "--max-len", "5", str(tiny), str(flat)]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2
    assert f"{tiny}\twarning: The photo is only 1x1 pixels" in err and f"{flat}\twarning: The photo is nearly one flat" in err
    assert main(["caption", "--model", str(model_dir), "--json", "--max-len", "5", str(tiny)]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert clean(rec["beam"]) and any("1x1 pixels" in w for w in rec["warnings"])


@pytest.mark.parametrize("damage, words", [("lfs", "git lfs pull"), ("truncate", "truncated"), ("garbage", "not a safetensors")])
def test_broken_weights_exit_2_with_what_to_do(model_dir, photos, tmp_path, capsys, damage, words):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    if damage == "lfs":
        weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + f"\nsize {len(data)}\n")
    elif damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes(b"\x00" * 1000)
    assert main(["caption", "--model", str(broken), str(photos[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_plain_mode_errors_go_to_stderr(model_dir, photos, tmp_path, capsys):
    bad = write_bad_inputs(tmp_path)["not_an_image.jpg"]
    assert main(["caption", "--model", str(model_dir), "--max-len", "5", str(bad), str(photos[0])]) == 1
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and out.startswith(str(photos[0]))
    assert err.startswith(f"{bad}\terror: ") and "not an image" in err


def test_unreadable_files_get_an_error_line_and_the_run_goes_on(model_dir, photos, tmp_path, capsys):
    """OSError while reading one file (here a name too long for the file system and, on Linux,
    /proc/self/mem, which stat() calls a file but read() fails with EIO) must not abort the run. (A folder
    is walked for its image files: tests/test_photo_library.py.)"""
    too_long = str(tmp_path / ("x" * 300 + ".jpg"))
    unreadable = [too_long] + (["/proc/self/mem"] if os.path.isfile("/proc/self/mem") else [])
    args = [str(photos[0]), *unreadable, str(photos[1])]
    assert main(["caption", "--model", str(model_dir), "--json", "--max-len", "5", *args]) == 1
    out, err = capsys.readouterr()
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in recs] == args and "Traceback" not in err
    errors = {r["image"]: r["error"] for r in recs if "error" in r}
    assert set(errors) == set(unreadable)
    assert "cannot read" in errors[too_long]
    if "/proc/self/mem" in errors:
        assert "cannot read /proc/self/mem" in errors["/proc/self/mem"]
    assert all(clean(r["beam"]) for r in recs if "error" not in r)


def test_model_errors_exit_2_with_a_message(tmp_path, photos, capsys, monkeypatch):
    assert main(["caption", "--model", str(tmp_path / "nope"), str(photos[0])]) == 2
    assert "no model folder" in capsys.readouterr().err
    import storyteller.loading as loading

    monkeypatch.delenv("STORYTELLER_MODEL", raising=False)
    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", tmp_path / "models" / "flickr8k-lite0-ensemble")
    assert main(["caption", str(photos[0])]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "STORYTELLER_MODEL" in err


def test_bad_arguments_are_usage_errors(model_dir, photos):
    for bad in (["--beam", "0"], ["--max-len", "0"], ["--beam", "2", "--n-best", "3"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit) as e:
            main(["caption", "--model", str(model_dir), *bad, str(photos[0])])
        assert e.value.code == 2


def test_info(model_dir, capsys):
    assert main(["info", "--model", str(model_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backbone"] == "efficientnet_lite0" and info["metrics"]["bleu4"] == 0.123


def test_subprocess_offline_hub_repo_from_the_cache(model_dir, photos, tmp_path):
    """The real entry point in a fresh process, loading a Hub repo id from the cache with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    put_in_hub_cache(model_dir, cache, "someone/tiny-captioner")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    env.pop("STORYTELLER_MODEL", None)
    run = subprocess.run([sys.executable, "-m", "storyteller", "caption", "--model", "someone/tiny-captioner",
                          "--json", "--max-len", "6", str(photos[0])],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert run.returncode == 0, run.stderr
    rec = json.loads(run.stdout)
    assert rec["image"] == str(photos[0]) and clean(rec["beam"])
    run = subprocess.run([sys.executable, "-m", "storyteller", "caption", "--model", "someone/not-cached", str(photos[0])],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert run.returncode == 2 and "HF_HUB_OFFLINE" in run.stderr and "Traceback" not in run.stderr


def test_attention_pictures_one_per_photo_at_its_aspect_ratio(tmp_path, photos, capsys):
    from PIL import Image

    att_model = save_test_model(tmp_path / "att", attention=True)
    out = tmp_path / "maps"
    twin = tmp_path / "other" / photos[0].name  # same file name in another folder: its own picture
    twin.parent.mkdir()
    twin.write_bytes(photos[0].read_bytes())
    assert main(["caption", "--model", str(att_model), "--attention", str(out), "--json",
                 *map(str, photos), str(twin)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    pictures = sorted(out.iterdir())
    assert len(pictures) == len(photos) + 1 == len(records)
    for path in photos:
        pic = Image.open(out / f"{path.name}.attention.png")
        words = next(r["beam"] for r in records if r["image"] == str(path)).split()
        cols = min(5, len(words))
        panel_h = round(200 * Image.open(path).height / Image.open(path).width)  # the photo's own aspect ratio
        rows = -(-len(words) // cols)
        assert pic.width == cols * 206 + 6 and pic.height > rows * panel_h
    assert (out / f"{photos[0].name}.2.attention.png").is_file()


def test_attention_pictures_need_an_attention_model(model_dir, photos, tmp_path, capsys):
    assert main(["caption", "--model", str(model_dir), "--attention", str(tmp_path / "maps"), str(photos[0])]) == 2
    err = capsys.readouterr().err
    assert "pooled" in err and "attention" in err and "Traceback" not in err
    assert not (tmp_path / "maps").exists()
