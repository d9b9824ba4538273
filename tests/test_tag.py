"""python -m storyteller tag: captions into XMP sidecars or embedded metadata, never over a person's words,
never damaging a photo. exiftool (an independent reader) checks what we wrote where it is installed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storyteller.__main__ import main
from storyteller.tagging import ALT_TEXT_MAX, alt_text_of

REPO = Path(__file__).resolve().parents[1]
EXIFTOOL = shutil.which("exiftool")
needs_exiftool = pytest.mark.skipif(EXIFTOOL is None, reason="exiftool is not installed (Debian: "
                                    "libimage-exiftool-perl; .ci/run installs it): embedded writes are not checked")
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "tif": "TIFF"}


def make_photos(folder: Path, names: list[str], seed: int = 0) -> dict[str, Path]:
    """Tiny noisy photos, one per name, in the format of its extension."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for name in names:
        pixels = (rng.random((24, 32, 3)) * 255).astype("uint8")
        path = folder / name
        Image.fromarray(pixels).save(path, FORMATS[path.suffix[1:]])
        out[name] = path
    return out


def write_records(path: Path, captions: dict[str, str], confidence: dict[str, float | None] | None = None) -> Path:
    lines = []
    for name, text in captions.items():
        rec = {"image": name, "greedy": text, "beam": text, "beam_log_prob": -1.0, "warnings": []}
        if confidence is not None:
            rec["confidence"] = confidence.get(name)
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def exif_read(*paths: Path) -> dict[str, dict]:
    """exiftool's view of the files, by file name: group:tag -> value."""
    out = subprocess.run([EXIFTOOL, "-j", "-G1", "-a", "-XMP-dc:Description", "-XMP-iptcCore:AltTextAccessibility",
                          "-EXIF:ImageDescription", *map(str, paths)], capture_output=True, text=True, check=True)
    return {Path(r["SourceFile"]).name: r for r in json.loads(out.stdout)}


def pixels(path: Path) -> bytes:
    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def tag(*args: str | Path) -> int:
    return main(["tag", *map(str, args)])


def test_alt_text_within_iptc_length():
    short = "a dog runs on the beach"
    assert alt_text_of(short) == short
    long = " ".join(["word"] * 100)
    cut = alt_text_of(long)
    assert len(cut) <= ALT_TEXT_MAX and cut.endswith("\u2026") and long.startswith(cut[:-1])


@needs_exiftool
def test_embed_every_format_keeps_image_data_and_human_words(tmp_path, capsys):
    photos = make_photos(tmp_path / "p", ["a.jpg", "b.png", "c.webp", "d.tif", "human.jpg"])
    human = photos["human.jpg"]
    subprocess.run([EXIFTOOL, "-q", "-overwrite_original", "-XMP-dc:Description=My cat Tom on the sofa", str(human)],
                   check=True)
    before = {n: (p.read_bytes(), pixels(p)) for n, p in photos.items()}
    captions = {n: f"caption of {n}" for n in photos}
    records = write_records(tmp_path / "captions.jsonl", captions)
    assert tag(records, "--root", tmp_path / "p", "--embed") == 0
    out = capsys.readouterr()
    seen = exif_read(*photos.values())
    for name, path in photos.items():
        if name == "human.jpg":
            continue
        assert seen[name]["XMP-dc:Description"] == captions[name]
        assert seen[name]["XMP-iptcCore:AltTextAccessibility"] == captions[name]
        assert pixels(path) == before[name][1]
    assert seen["a.jpg"]["IFD0:ImageDescription"] == captions["a.jpg"]
    old, new = before["a.jpg"][0], photos["a.jpg"].read_bytes()
    assert new != old and new[new.index(b"\xff\xda"):] == old[old.index(b"\xff\xda"):]  # the compressed scan as it was
    assert human.read_bytes() == before["human.jpg"][0]
    assert "skipped\thuman.jpg\thas a description we did not write" in out.out
    assert "4 written" in out.err and "1 skipped" in out.err and "0 failed" in out.err
    assert not [p for p in (tmp_path / "p").iterdir() if p.name.startswith(".")]  # no temporary file left


@needs_exiftool
def test_sidecar_mode_changes_no_photo_byte(tmp_path, capsys):
    photos = make_photos(tmp_path / "p", ["a.jpg", "b.png"])
    before = snapshot(tmp_path / "p")
    records = write_records(tmp_path / "c.jsonl", {"a.jpg": "a red bus", "b.png": "two dogs play"})
    assert tag(records, "--root", tmp_path / "p") == 0
    for name, data in before.items():
        assert (tmp_path / "p" / name).read_bytes() == data
    seen = exif_read(tmp_path / "p" / "a.jpg.xmp", tmp_path / "p" / "b.png.xmp")
    assert seen["a.jpg.xmp"]["XMP-dc:Description"] == "a red bus"
    assert seen["b.png.xmp"]["XMP-iptcCore:AltTextAccessibility"] == "two dogs play"
    assert tag(records, "--root", tmp_path / "p", "--sidecar-name", "stem") == 0
    assert exif_read(tmp_path / "p" / "a.xmp")["a.xmp"]["XMP-dc:Description"] == "a red bus"
    assert photos["a.jpg"].read_bytes() == before["a.jpg"]


@needs_exiftool
def test_dry_run_changes_no_byte(tmp_path, capsys):
    make_photos(tmp_path / "p", ["a.jpg", "b.webp"])
    records = write_records(tmp_path / "c.jsonl", {"a.jpg": "a red bus", "b.webp": "a cat"})
    before = snapshot(tmp_path / "p")
    for extra in ([], ["--embed"]):
        assert tag(records, "--root", tmp_path / "p", "--dry-run", *extra) == 0
        out = capsys.readouterr()
        assert snapshot(tmp_path / "p") == before
        assert out.out.count("would-write\t") == 2 and "nothing was changed" in out.err


@needs_exiftool
def test_rerun_replaces_only_our_unedited_text(tmp_path, capsys):
    photos = make_photos(tmp_path / "p", ["a.jpg", "b.jpg"])
    root = tmp_path / "p"
    assert tag(write_records(tmp_path / "1.jsonl", {"a.jpg": "first a", "b.jpg": "first b"}), "--root", root,
               "--embed") == 0
    subprocess.run([EXIFTOOL, "-q", "-overwrite_original", "-XMP-dc:Description=Grandma's garden, 1998",
                    str(photos["b.jpg"])], check=True)  # a person edits our caption of b in a photo manager
    capsys.readouterr()
    assert tag(write_records(tmp_path / "2.jsonl", {"a.jpg": "second a", "b.jpg": "second b"}), "--root", root,
               "--embed") == 0
    out = capsys.readouterr().out
    seen = exif_read(*photos.values())
    assert seen["a.jpg"]["XMP-dc:Description"] == "second a"  # ours, unedited: replaced
    assert seen["b.jpg"]["XMP-dc:Description"] == "Grandma's garden, 1998"  # theirs now
    assert "b.jpg\tour caption in b.jpg was edited by a person" in out
    assert tag(tmp_path / "2.jsonl", "--root", root, "--embed") == 0
    assert "already tagged with this caption" in capsys.readouterr().out


@needs_exiftool
def test_read_only_file_is_one_line_and_the_run_goes_on(tmp_path, capsys):
    photos = make_photos(tmp_path / "p", ["a.jpg", "b.jpg", "c.jpg"])
    photos["b.jpg"].chmod(0o444)
    before = photos["b.jpg"].read_bytes()
    records = write_records(tmp_path / "c.jsonl", {n: f"caption {n}" for n in photos})
    assert tag(records, "--root", tmp_path / "p", "--embed") == 1  # some photo failed
    out = capsys.readouterr()
    failed = [line for line in out.out.splitlines() if line.startswith("failed")]
    assert failed == ["failed\tb.jpg\tb.jpg is read-only; it is left as it is (make it writable to tag it)"]
    assert photos["b.jpg"].read_bytes() == before
    seen = exif_read(photos["a.jpg"], photos["c.jpg"])
    assert seen["c.jpg"]["XMP-dc:Description"] == "caption c.jpg" and "1 failed" in out.err


def test_full_disk_is_one_line_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    make_photos(tmp_path / "p", ["a.jpg", "b.jpg"])
    import storyteller.tagging as tagging

    real = tagging.Tagger._write_sidecar

    def full(self, path, fields):
        if path.name.startswith("a."):
            raise OSError(28, "No space left on device")
        return real(self, path, fields)

    monkeypatch.setattr(tagging.Tagger, "_write_sidecar", full)
    records = write_records(tmp_path / "c.jsonl", {"a.jpg": "one", "b.jpg": "two"})
    assert tag(records, "--root", tmp_path / "p") == 1
    out = capsys.readouterr().out
    assert "failed\ta.jpg\tthe disk is full" in out and "written\tb.jpg" in out
    assert (tmp_path / "p" / "b.jpg.xmp").exists() and not (tmp_path / "p" / "a.jpg.xmp").exists()


def test_min_confidence_writes_only_sure_captions(tmp_path, capsys):
    make_photos(tmp_path / "p", ["a.jpg", "b.jpg", "c.jpg"])
    caps = {"a.jpg": "sure", "b.jpg": "unsure", "c.jpg": "unknown"}
    records = write_records(tmp_path / "c.jsonl", caps, {"a.jpg": 0.9, "b.jpg": 0.2, "c.jpg": None})
    assert tag(records, "--root", tmp_path / "p", "--min-confidence", "0.6") == 0
    out = capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "p").glob("*.xmp")) == ["a.jpg.xmp"]
    assert "review\tb.jpg\tconfidence 0.20 < 0.6: unsure" in out.out
    assert "review\tc.jpg\tconfidence unknown: unknown" in out.out
    assert "Confidence>0.900<" in (tmp_path / "p" / "a.jpg.xmp").read_text(encoding="utf-8")
    # records without any confidence: one line, nothing written
    bare = write_records(tmp_path / "bare.jsonl", {"b.jpg": "x"})
    assert tag(bare, "--root", tmp_path / "p", "--min-confidence", "0.5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gives no confidence for any caption" in err[0]
    assert not (tmp_path / "p" / "b.jpg.xmp").exists()


def test_edited_csv_column_and_bad_inputs(tmp_path, capsys):
    make_photos(tmp_path / "p", ["a.jpg"])
    csv_file = tmp_path / "c.csv"
    csv_file.write_text("image;beam;alt\r\na.jpg;a dog;Rex, our dog, asleep\r\n", encoding="utf-8-sig")
    assert tag(csv_file, "--root", tmp_path / "p", "--column", "alt") == 0
    sidecar = (tmp_path / "p" / "a.jpg.xmp").read_text(encoding="utf-8")
    assert "Rex, our dog, asleep" in sidecar and "Reviewed>True<" in sidecar
    capsys.readouterr()
    # the model's text never replaces a reviewed caption
    write_records(tmp_path / "m.jsonl", {"a.jpg": "a dog"})
    assert tag(tmp_path / "m.jsonl", "--root", tmp_path / "p") == 0
    assert "reviewed by a person" in capsys.readouterr().out
    assert tag(csv_file, "--root", tmp_path / "p", "--column", "nope") == 2
    assert "has no column 'nope'" in capsys.readouterr().err
    # search options are checked as caption checks them, before a model is loaded
    for option, value in (("--max-len", "0"), ("--alpha", "nan"), ("--beam", "0")):
        assert tag(tmp_path / "p", option, value) == 2
        assert f"{option} must be" in capsys.readouterr().err


def test_foreign_sidecar_is_kept(tmp_path, capsys, monkeypatch):
    """A darktable-like sidecar holds other metadata: exiftool adds to it; without exiftool it is skipped."""
    make_photos(tmp_path / "p", ["a.jpg"])
    sidecar = tmp_path / "p" / "a.jpg.xmp"
    foreign = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
               '<rdf:Description rdf:about="" xmlns:darktable="http://darktable.sf.net/" darktable:xmp_version="5"/>'
               '</rdf:RDF></x:xmpmeta>')
    sidecar.write_text(foreign, encoding="utf-8")
    records = write_records(tmp_path / "c.jsonl", {"a.jpg": "a dog"})
    monkeypatch.setenv("STORYTELLER_EXIFTOOL", "")
    assert tag(records, "--root", tmp_path / "p") == 0
    assert "holds other programs' metadata" in capsys.readouterr().out and sidecar.read_text() == foreign
    if EXIFTOOL is None:
        pytest.skip("exiftool is not installed: adding to another program's sidecar is not checked")
    monkeypatch.delenv("STORYTELLER_EXIFTOOL")
    assert tag(records, "--root", tmp_path / "p") == 0
    text = sidecar.read_text(encoding="utf-8")
    assert "xmp_version" in text and exif_read(sidecar)["a.jpg.xmp"]["XMP-dc:Description"] == "a dog"


def test_embed_without_exiftool_is_one_clear_line(tmp_path, capsys, monkeypatch):
    make_photos(tmp_path / "p", ["a.jpg"])
    records = write_records(tmp_path / "c.jsonl", {"a.jpg": "a dog"})
    monkeypatch.setenv("STORYTELLER_EXIFTOOL", "")
    before = snapshot(tmp_path / "p")
    assert tag(records, "--root", tmp_path / "p", "--embed") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exiftool" in err[0] and "leave out --embed" in err[0]
    assert snapshot(tmp_path / "p") == before
    assert tag(records, "--root", tmp_path / "p") == 0  # sidecars need no exiftool
    assert "<rdf:li xml:lang=\"x-default\">a dog</rdf:li>" in (tmp_path / "p" / "a.jpg.xmp").read_text()


@needs_exiftool
def test_folder_mode_captions_then_tags_and_rerun_skips(tmp_path, capsys):
    from helpers_models import save_test_model

    model = save_test_model(tmp_path / "model", pretrained_backbone=False)
    photos = make_photos(tmp_path / "p", ["a.jpg", "b.png"])
    assert tag(tmp_path / "p", "--model", model, "--embed", "--workers", "0") == 0
    seen = exif_read(*photos.values())
    assert all(seen[n].get("XMP-dc:Description") for n in photos)
    capsys.readouterr()
    assert tag(tmp_path / "p", "--model", model, "--embed", "--workers", "0") == 0
    assert capsys.readouterr().out.count("already tagged by this model") == 2


@needs_exiftool
def test_kill_9_mid_run_then_rerun_tags_every_file_once(tmp_path):
    names = [f"{i:02d}.{'jpg' if i % 3 else 'png'}" for i in range(24)]
    photos = make_photos(tmp_path / "p", names)
    originals = {n: pixels(p) for n, p in photos.items()}
    records = write_records(tmp_path / "c.jsonl", {n: f"photo {n} of a dog" for n in names})
    cmd = [sys.executable, "-m", "storyteller", "tag", str(records), "--root", str(tmp_path / "p"), "--embed"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    written = 0
    for line in proc.stdout:
        written += line.startswith("written")
        if written == 5:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.count("already tagged with this caption") >= 5
    seen = exif_read(*photos.values())
    for name, path in photos.items():
        assert pixels(path) == originals[name]  # a valid image, pixels as before
        assert seen[name]["XMP-dc:Description"] == f"photo {name} of a dog"
        assert path.read_bytes().count(b"<dc:description>") == 1  # tagged exactly once
    assert not [p for p in (tmp_path / "p").iterdir() if p.name.startswith(".")]
