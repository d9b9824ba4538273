"""storyteller.photo_library and `caption --out`: which files a folder gives (extensions, hidden, symlink loops,
order), one record per file with errors for the bad ones, exit status, CSV and JSONL read back, resuming after
a cut-short last line and after a real SIGKILL, --overwrite, refusing a file that is not ours, and that the
records' captions are `caption --json`'s."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storyteller.__main__ import main
from storyteller.images import ImageError
from storyteller.photo_library import (RECORD_FIELDS, LibraryError, RecordFile, caption_folder, find_images, read_records,
                                       to_record, walk_inputs)
from storyteller.vocab import SPECIAL_TOKENS
from tests.helpers_images import photo_like, write_bad_inputs
from tests.helpers_models import save_test_model

REPO = Path(__file__).resolve().parents[1]
FAST = ["--precision", "fp32", "--max-len", "6"]  # fp32: the same numbers on every CPU


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_test_model(tmp_path_factory.mktemp("library") / "tiny")


@pytest.fixture(scope="module")
def captioner(model_dir):
    from storyteller.captioner import load

    return load(str(model_dir), precision="fp32")


def make_library(root: Path, n: int = 4, bad: bool = True) -> Path:
    """root/ with n small photos in two subfolders and (``bad``) three unusable files; returns root."""
    for i in range(n):
        sub = root / ("a" if i % 2 == 0 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        photo_like((96 + 8 * i, 72), seed=i).save(sub / f"p{i}.jpg", quality=85)
    if bad:
        files = write_bad_inputs(root / "bad")
        files["bomb_20000x20000.png"].unlink()  # three bad files: text as .jpg, an empty .png, a truncated .jpg
    return root


def clean(text: str) -> bool:
    return bool(text.strip()) and not any(t in text for t in SPECIAL_TOKENS)


@pytest.fixture
def caption_out(model_dir):
    """caption_out(root, out, *options) -> exit status of `caption root --out out` with the tiny model."""
    def run(root: Path, out: Path, *extra: str) -> int:
        return main(["caption", "--model", str(model_dir), *FAST, "--batch-size", "2", str(root), "--out", str(out),
                     *extra])
    return run


def same_records(a: list[dict], b: list[dict]) -> bool:
    """Equal records, the log-probabilities to rounding (batches of other photos may round the last digit)."""
    def key(r: dict) -> tuple:
        return r["image"], r.get("greedy"), r.get("beam"), r.get("warnings"), r.get("error")
    return ([key(r) for r in a] == [key(r) for r in b]
            and all(abs((r.get("beam_log_prob") or 0) - (q.get("beam_log_prob") or 0)) < 1e-3 for r, q in zip(a, b)))


# -- walking ------------------------------------------------------------------------------------------

def test_walk_takes_images_by_extension_skips_hidden_in_a_stable_order(tmp_path):
    names = ["sub/z.png", "b.JPG", ".hid/x.jpg", "sub/.h.jpg", "a.jpeg", "notes.txt", "Sub2/y.WebP",
             "a b/e.gif", "sub/deeper/q.TIFF", "sub/raw.cr2", ".dot.png"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    photos = find_images([tmp_path])
    expected = ["Sub2/y.WebP", "a b/e.gif", "a.jpeg", "b.JPG", "sub/deeper/q.TIFF", "sub/z.png"]
    assert [p.name for p in photos] == expected
    assert all(Path(p.path) == tmp_path / p.name and p.error is None for p in photos)
    assert find_images([str(tmp_path)]) == photos  # the same order every time, str or Path
    # a file named on the command line is taken whatever its extension, named as given
    given = str(tmp_path / "notes.txt")
    assert [(p.name, p.path) for p in find_images([given])] == [(given, given)]


def test_symlink_loops_and_aliases_are_walked_once(tmp_path):
    (tmp_path / "sub").mkdir()
    photo_like((40, 30)).save(tmp_path / "sub" / "p.jpg")
    (tmp_path / "sub" / "loop").symlink_to("..")  # a loop back to the root
    (tmp_path / "sub" / "self").symlink_to(".")
    (tmp_path / "zz_alias").symlink_to("sub")  # a second way into sub
    (tmp_path / "dangling.jpg").symlink_to("nowhere.jpg")
    names = [p.name for p in find_images([tmp_path])]
    assert names == ["dangling.jpg", "sub/p.jpg"]  # loops end, sub's photo once, a dangling link kept (it errors)


def test_unlistable_folder_and_name_clashes(tmp_path, monkeypatch):
    (tmp_path / "x" / "locked").mkdir(parents=True)
    (tmp_path / "x" / "locked" / "p.jpg").write_bytes(b"x")
    (tmp_path / "x" / "q.jpg").write_bytes(b"x")
    scandir = os.scandir

    def no_permission(path):  # as a folder without read permission answers (root reads any, so fake it)
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return scandir(path)

    monkeypatch.setattr(os, "scandir", no_permission)
    listed = walk_inputs([tmp_path / "x"])
    monkeypatch.undo()
    assert [(p.name, p.error) for p in listed] == [("locked/", "cannot list the folder: Permission denied"),
                                                   ("q.jpg", None)]
    assert listed[0].path == os.path.join(tmp_path / "x", "locked")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "p.jpg").write_bytes(b"y")
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "p.jpg").write_bytes(b"z")
    assert [p.name for p in find_images([tmp_path / "y", tmp_path / "y"])] == ["p.jpg"]  # the same file once
    with pytest.raises(LibraryError, match="both be recorded as 'p.jpg'"):
        find_images([tmp_path / "y", tmp_path / "z"])


# -- records, errors, exit status -------------------------------------------------------------------------

def test_records_errors_and_exit_status(tmp_path, capsys, caption_out):
    root = make_library(tmp_path / "lib")
    out = tmp_path / "captions.jsonl"
    assert caption_out(root, out) == 1  # some files are not images
    err = capsys.readouterr().err
    assert "3 of 7 files could not be captioned" in err and "4 captioned, 3 errors" in err and "Traceback" not in err
    recs = read_records(out)
    assert [r["image"] for r in recs] == ["a/p0.jpg", "a/p2.jpg", "b/p1.jpg", "b/p3.jpg", "bad/empty.png",
                                          "bad/not_an_image.jpg", "bad/truncated.jpg"]
    for r in recs[:4]:
        assert set(r) == {"image", "greedy", "beam", "beam_log_prob", "confidence", "needs_review", "warnings"}
        assert r["confidence"] is None and r["needs_review"] is False  # the test model has no calibration
        assert clean(r["beam"]) and clean(r["greedy"]) and r["beam_log_prob"] < 0 and r["warnings"] == []
    errors = {r["image"]: r["error"] for r in recs[4:]}
    assert set(recs[4]) == {"image", "error"}
    assert "empty" in errors["bad/empty.png"] and "not an image" in errors["bad/not_an_image.jpg"]
    assert "truncated" in errors["bad/truncated.jpg"] and all("\n" not in e for e in errors.values())
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 7 and all(json.loads(line) == r for line, r in zip(lines, recs))  # one object a line

    good = make_library(tmp_path / "good", n=3, bad=False)
    assert caption_out(good, tmp_path / "good.jsonl", "--workers", "0") == 0
    assert len(read_records(tmp_path / "good.jsonl")) == 3


def test_model_that_cannot_load_exits_2_and_writes_nothing(tmp_path, capsys):
    root = make_library(tmp_path / "lib", n=1, bad=False)
    out = tmp_path / "c.jsonl"
    assert main(["caption", "--model", str(tmp_path / "nope"), str(root), "--out", str(out)]) == 2
    assert "no model folder" in capsys.readouterr().err and not out.exists()


def test_csv_and_jsonl_hold_the_same_records(tmp_path, capsys, caption_out):
    root = make_library(tmp_path / "lib", n=2)
    from PIL import Image

    Image.new("RGB", (20, 20), (9, 9, 9)).save(root / 'tiny, "flat" café.png')  # two warnings; a name to quote
    assert caption_out(root, tmp_path / "c.jsonl") == 1
    assert caption_out(root, tmp_path / "c.csv") == 1
    capsys.readouterr()
    from_jsonl, from_csv = read_records(tmp_path / "c.jsonl"), read_records(tmp_path / "c.csv")
    assert from_csv == from_jsonl and len(from_csv) == 6
    tiny = next(r for r in from_csv if r["image"].startswith("tiny"))
    assert len(tiny["warnings"]) == 2 and tiny["image"] == 'tiny, "flat" café.png'
    raw = (tmp_path / "c.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf" + ",".join(RECORD_FIELDS).encode() + b"\r\n")  # BOM: spreadsheets read UTF-8
    with open(tmp_path / "c.csv", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))  # what any CSV reader sees
    assert [r["image"] for r in rows] == [r["image"] for r in from_jsonl]
    assert rows[0]["beam"] == from_jsonl[0]["beam"] and float(rows[0]["beam_log_prob"]) == from_jsonl[0]["beam_log_prob"]
    empty = next(r for r in rows if r["image"] == "bad/empty.png")
    assert empty["error"] and not empty["beam"] and not empty["warnings"]


# -- resuming -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_resume_after_a_cut_short_last_line(tmp_path, capsys, caption_out, suffix):
    root = make_library(tmp_path / "lib", n=5)
    out = tmp_path / f"c{suffix}"
    assert caption_out(root, out) == 1
    full = read_records(out)
    data = out.read_bytes()
    lines = data.splitlines(keepends=True)
    kept = b"".join(lines[:4])  # (CSV: the header and 3 records; JSONL: 4 records) ...
    out.write_bytes(kept + lines[4][: len(lines[4]) // 2])  # ... and half of the next, as a kill leaves it
    assert len(read_records(out)) == (3 if suffix == ".csv" else 4)
    capsys.readouterr()
    assert caption_out(root, out) == 1
    err = capsys.readouterr().err
    assert f"{3 if suffix == '.csv' else 4} already in" in err and "3 of 8 files could not be captioned" in err
    again = read_records(out)
    assert sorted(r["image"] for r in again) == sorted(r["image"] for r in full)  # each file exactly once
    assert same_records(sorted(again, key=lambda r: r["image"]), sorted(full, key=lambda r: r["image"]))
    assert out.read_bytes().startswith(kept)  # the finished records were kept, not rewritten
    assert caption_out(root, out) == 1 and read_records(out) == again  # a finished run: nothing more to do
    assert "nothing to do, all 8 files are already in" in capsys.readouterr().err


def test_resume_after_sigkill(tmp_path, model_dir):
    """A real process killed mid-run, then the same command: every file ends with exactly one record."""
    root = tmp_path / "lib"
    root.mkdir()
    for i in range(80):
        photo_like((48, 40), seed=i).save(root / f"p{i:03d}.jpg", quality=80)
    out = tmp_path / "c.jsonl"
    cmd = [sys.executable, "-m", "storyteller", "caption", "--model", str(model_dir), *FAST, "--batch-size", "2",
           "--workers", "0", "--threads", "1", str(root), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 6:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done_before = len(read_records(out))
    assert 6 <= done_before < 80
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"{done_before} already in" in run.stderr
    names = [r["image"] for r in read_records(out)]
    assert sorted(names) == [f"p{i:03d}.jpg" for i in range(80)]  # each file once
    assert out.read_bytes().endswith(b"\n") and out.read_bytes().count(b"\n") == 80  # no half line left


def test_overwrite_starts_over(tmp_path, capsys, caption_out):
    root = make_library(tmp_path / "lib", n=2, bad=False)
    out = tmp_path / "c.jsonl"
    assert caption_out(root, out) == 0
    first = read_records(out)
    out.write_bytes(out.read_bytes() + b'{"image": "gone.jpg", "beam": "x"}\n')
    capsys.readouterr()
    assert caption_out(root, out, "--overwrite") == 0
    assert "0 already in" in capsys.readouterr().err
    assert read_records(out) == first  # the stale record is gone, each file once


@pytest.mark.parametrize("name, content", [("notes.jsonl", b"my own notes\nline two\n"),
                                           ("data.jsonl", b'{"id": 1}\n'),
                                           ("one.jsonl", b"hello"),
                                           ("sheet.csv", b"name,amount\r\nrent,900\r\n"),
                                           ("latin1.csv", "caf\xe9".encode("latin-1")),
                                           # our header, then a row no cut of ours leaves ("x" after a closing quote)
                                           ("broken.csv", (",".join(RECORD_FIELDS) + '\r\n"a.jpg"x,,,,,,,e\r\n'
                                                           'b.jpg,,,,,,,e\r\n').encode())])
def test_a_file_that_is_not_ours_is_refused_and_left_alone(tmp_path, capsys, caption_out, name, content):
    root = make_library(tmp_path / "lib", n=1, bad=False)
    out = tmp_path / name
    out.write_bytes(content)
    for extra in ([], ["--overwrite"]):
        assert caption_out(root, out, *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "not a caption-records file" in err and len(err.splitlines()) == 1
        assert out.read_bytes() == content


def test_usage_errors(tmp_path, capsys, caption_out):
    root = make_library(tmp_path / "lib", n=1, bad=False)
    assert caption_out(root, tmp_path / "c.txt") == 2
    assert ".jsonl or .csv" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert caption_out(tmp_path / "empty", tmp_path / "e.jsonl") == 0
    assert "no image files in" in capsys.readouterr().err and not (tmp_path / "e.jsonl").exists()
    for bad in (["--overwrite"], ["--workers", "1"], ["--out", "x.jsonl", "--json"], ["--out", "x.csv", "--n-best", "2"],
                ["--out", "x.csv", "--workers", "-1"]):
        with pytest.raises(SystemExit) as e:
            main(["caption", *bad, str(root)])
        assert e.value.code == 2


# -- the same captions as `caption --json`; the Python API; printed output for folders ----------------------

def test_records_equal_caption_json_on_the_same_files(tmp_path, capsys, caption_out, model_dir):
    root = make_library(tmp_path / "lib", n=5, bad=False)
    out = tmp_path / "c.jsonl"
    assert caption_out(root, out, "--batch-size", "3") == 0
    records = {r["image"]: r for r in read_records(out)}
    capsys.readouterr()
    files = [str(root / name) for name in records]
    assert main(["caption", "--model", str(model_dir), *FAST, "--json", *files]) == 0
    alone = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(alone) == 5
    for rec, name in zip(alone, records):
        assert rec["beam"] == records[name]["beam"] and rec["greedy"] == records[name]["greedy"]
        assert rec["beam_log_prob"] == pytest.approx(records[name]["beam_log_prob"], abs=1e-3)


def test_caption_folder_api(tmp_path, captioner):
    root = make_library(tmp_path / "lib", n=3)
    results = list(caption_folder(root, captioner, batch_size=2, workers=1))
    assert [name for name, _ in results] == [p.name for p in find_images([root])]
    ok = {name: r for name, r in results if not isinstance(r, ImageError)}
    assert len(ok) == 3 and all(clean(r.best.text) and r.greedy is not None for r in ok.values())
    assert sum(isinstance(r, ImageError) for _, r in results) == 3
    direct = captioner.caption([root / "a" / "p0.jpg"])[0]
    assert ok["a/p0.jpg"].best.text == direct.best.text  # the same decoding as Captioner.caption
    rest = list(caption_folder([root], captioner, skip={"a/p0.jpg", "a/p2.jpg"}, workers=0))
    assert [name for name, _ in rest] == [name for name, _ in results if name not in {"a/p0.jpg", "a/p2.jpg"}]


def test_record_file_refuses_writing_before_open_and_keeps_partial_header_safe(tmp_path):
    out = tmp_path / "c.csv"
    out.write_bytes(b"\xef\xbb\xbfimage,gre")  # a kill while the header was being written
    rf = RecordFile(out)
    assert rf.records == [] and rf.done == {}
    with pytest.raises(RuntimeError):
        rf.write([{"image": "x.jpg", "error": "e"}])
    with rf:
        rf.write([{"image": "x.jpg", "error": "e"}])
    assert read_records(out) == [{"image": "x.jpg", "error": "e"}]


def test_printed_output_walks_folders_too(tmp_path, capsys, model_dir):
    root = make_library(tmp_path / "lib", n=2, bad=False)
    assert main(["caption", "--model", str(model_dir), *FAST, str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(root / "a" / "p0.jpg"), str(root / "b" / "p1.jpg")]
    (tmp_path / "empty").mkdir()
    assert main(["caption", "--model", str(model_dir), *FAST, str(tmp_path / "empty")]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"{tmp_path / 'empty'}\tno image files (.bmp .gif")


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file name that is not UTF-8 (Linux allows it)")
def test_a_csv_rerun_does_not_caption_a_file_name_that_is_not_utf8_again(model_dir, tmp_path):
    """The CSV stores such a name with \\x escapes: a rerun must find it done, not add a record each time."""
    lib = tmp_path / "lib"
    lib.mkdir()
    for name in (b"plain.jpg", b"z\xff.jpg"):
        photo_like(size=(64, 48)).save(os.path.join(os.fsencode(lib), name), format="JPEG")
    out = tmp_path / "alt.csv"
    args = ["caption", str(lib), "--out", str(out), "--model", str(model_dir), *FAST]
    assert main(args) == 0
    assert main(args) == 0  # the same command again: nothing left to do
    assert len(read_records(out)) == 2


def test_a_full_disk_is_one_line_and_the_finished_batches_stay(model_dir, tmp_path, monkeypatch, capsys):
    import errno

    lib = tmp_path / "lib"
    lib.mkdir()
    photo_like(size=(64, 48)).save(lib / "a.jpg", format="JPEG")
    opened = RecordFile.open

    class Full:
        """The real file, but every write finds the disk full (closing it is real too)."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    def open_full(self):
        opened(self)
        self._file = Full(self._file)
        return self

    monkeypatch.setattr(RecordFile, "open", open_full)
    assert main(["caption", str(lib), "--out", str(tmp_path / "alt.jsonl"), "--model", str(model_dir), *FAST]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "rerun the same command" in err and "Traceback" not in err


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and SIGXFSZ as Linux has them")
def test_a_real_size_limit_is_one_line_exit_2_and_the_finished_batches_stay(model_dir, tmp_path):
    """A real file at a real size limit (RLIMIT_FSIZE, as a full disk): the write that crosses it fails, and
    closing the file afterwards must not raise a second time (a traceback and exit 1)."""
    lib = tmp_path / "lib"
    lib.mkdir()
    for i in range(3):
        photo_like(size=(64, 48), seed=i).save(lib / f"p{i}.jpg", format="JPEG")
    full = tmp_path / "full.jsonl"
    args = ["caption", str(lib), "--model", str(model_dir), *FAST, "--batch-size", "1", "--workers", "0"]
    assert main([*args, "--out", str(full)]) == 0
    first = full.read_bytes().split(b"\n")[0] + b"\n"
    limit = len(first) + 20  # the first batch fits, the second crosses the limit halfway through a record
    child = ("import resource, runpy, signal, sys\n"
             "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a kill\n"
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))\n"
             "sys.argv = ['storyteller', *sys.argv[1:]]\n"
             "runpy.run_module('storyteller', run_name='__main__')\n")
    out = tmp_path / "c.jsonl"
    run = subprocess.run([sys.executable, "-c", child, *args, "--threads", "1", "--out", str(out)], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    err = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(err) == 1 and err[0].startswith("error: cannot write"), run.stderr[-2000:]
    assert "rerun the same command" in err[0]
    assert out.read_bytes() == first  # the finished batch stays, whole; nothing of the failed one
    rerun = main([*args, "--out", str(out)])
    assert rerun == 0 and out.read_bytes() == full.read_bytes()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_each_batch_is_in_the_file_when_write_returns(tmp_path, suffix):
    """A kill after a batch keeps it: its records are readable before the file is closed (no buffer holds them)."""
    out = tmp_path / f"c{suffix}"
    batches = [[{"image": "a.jpg", "error": "e"}], [{"image": "b.jpg", "error": "f"}, {"image": "c.jpg", "error": "g"}]]
    with RecordFile(out) as rf:
        for n, batch in enumerate(batches, 1):
            rf.write(batch)
            assert read_records(out) == [r for b in batches[:n] for r in b]


def test_a_csv_cut_inside_a_name_with_a_newline_resumes_at_every_offset(tmp_path):
    """A file name may hold a newline (Linux allows it); the CSV quotes it, so the last complete record ends at
    the last newline outside quotes, not at the last newline: a cut anywhere resumes, and --overwrite works."""
    records = [{"image": "a.jpg", "error": "e"},
               {"image": "new\nline \"q\"\r\n.jpg", "greedy": "a dog", "beam": "a dog runs", "beam_log_prob": -1.5,
                "confidence": None, "needs_review": False, "warnings": ["small"]},
               {"image": "c.jpg", "error": "f"}]
    full = tmp_path / "full.csv"
    ends = []  # the file's size after each record
    with RecordFile(full) as rf:
        for r in records:
            rf.write([r])
            ends.append(full.stat().st_size)
    data = full.read_bytes()
    assert read_records(full) == records and data.count(b"\n") == 6  # header, 3 records, 2 newlines in the name
    out = tmp_path / "c.csv"
    for cut in range(len(data)):
        out.write_bytes(data[:cut])
        rf = RecordFile(out)
        assert rf.records == records[:sum(cut >= e for e in ends)], cut
        with rf:
            rf.write([r for r in records if r["image"] not in rf.done])
        assert read_records(out) == records, cut  # resumed: each record once, in order
        out.write_bytes(data[:cut])
        with RecordFile(out, overwrite=True) as rf:
            rf.write(records)
        assert out.read_bytes() == data, cut


@pytest.mark.skipif(sys.platform == "win32", reason="needs a file name with a newline")
def test_caption_resumes_a_csv_cut_inside_a_name_with_a_newline(model_dir, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    for name in ("a.jpg", "new\nline.jpg", "z.jpg"):
        photo_like(size=(64, 48)).save(lib / name, format="JPEG")
    out = tmp_path / "c.csv"
    args = ["caption", str(lib), "--out", str(out), "--model", str(model_dir), *FAST, "--batch-size", "1"]
    assert main(args) == 0
    full, data = read_records(out), out.read_bytes()
    out.write_bytes(data[:data.index(b"line.jpg") + 2])  # cut just after the name's newline
    assert main(args) == 0
    assert sorted(r["image"] for r in read_records(out)) == sorted(r["image"] for r in full)
    assert same_records(sorted(read_records(out), key=lambda r: r["image"]), sorted(full, key=lambda r: r["image"]))


def test_the_record_holds_the_beam_captions_log_prob_not_its_score(tmp_path, captioner):
    """With alpha != 0 the beam caption's score (length-normalised) is not its log-probability: the record
    keeps the log-probability, as its name says."""
    root = make_library(tmp_path / "lib", n=2, bad=False)
    results = dict(caption_folder(root, captioner, workers=0, alpha=0.9, max_len=6))
    assert len(results) == 2
    for name, result in results.items():
        best = result.beam[0]
        assert abs(best.score - best.log_prob) > 1e-3  # the two differ here
        assert to_record(name, result)["beam_log_prob"] == round(best.log_prob, 4)
