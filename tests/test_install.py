"""`pip install .` into a fresh virtual environment gives a `storyteller` command and a `storyteller.load()` that
caption a photo from another directory, with the default model shipped inside the package.

The environment reuses this one's installed dependencies (a ``.pth`` line to its site-packages) and builds without
isolation, so no network is needed; it skips where setuptools (the build backend) is missing here."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers_server import REPO

DEFAULT = REPO / "models" / "flickr8k-lite0-ensemble"
EXAMPLE = sorted((REPO / "examples").glob("*.jpg"))[0]
SOURCES = ("pyproject.toml", "requirements.txt", "README.md", "LICENSE", "storyteller", "train")


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="setuptools (the build backend) is not installed here")
    if not (DEFAULT / "config.json").is_file():
        pytest.skip("the default model is not in this checkout")
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy: building in place would leave build/ and *.egg-info in the checkout
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    shutil.copytree(DEFAULT, src / "models" / DEFAULT.name, ignore=shutil.ignore_patterns("examples"))
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # this environment's packages (torch, gradio, ...) after the new one's own: no download
    (site / "zz-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                          "--no-build-isolation", "--no-index", "--quiet", str(src)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return env_dir


def test_the_installed_command_captions_from_another_directory(venv, tmp_path):
    run = subprocess.run([str(venv / "bin" / "storyteller"), "caption", "--json", str(EXAMPLE)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.splitlines()[0])
    from storyteller.captioner import load

    assert out["beam"] == load(DEFAULT)(str(EXAMPLE))  # the packaged files: the checkout's caption


def test_the_installed_load_uses_the_packaged_model_and_gives_the_checkouts_captions(venv, tmp_path):
    code = ("import json, sys, storyteller; c = storyteller.load(); "
            "print(json.dumps({'file': storyteller.__file__, 'model': c.model_dir.as_posix(), "
            "'caption': c(sys.argv[1])}))")
    run = subprocess.run([str(venv / "bin" / "python"), "-c", code, str(EXAMPLE)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(venv)) and "/_models/flickr8k-lite0-ensemble" in got["model"]
    from storyteller.captioner import load

    assert got["caption"] == load(DEFAULT)(str(EXAMPLE))  # the same files: the same caption
