"""hub_upload.py: validation refuses broken folders, --dry-run lists and changes nothing, and the real path
calls HfApi with the right arguments (HfApi methods replaced by recorders; the Hub is offline)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from gradio_client import Client, handle_file

import hub_upload
from hub_upload import PENDING_COMMIT, SPACE_MODEL_FILE
from tests.helpers_models import put_in_hub_cache, save_test_model
from tests.helpers_server import REPO, running_app

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"  # the commit the recorded model upload "makes"


@pytest.fixture(scope="module")
def good_model(tmp_path_factory) -> Path:
    return save_test_model(tmp_path_factory.mktemp("upload") / "tiny-lite0")


@pytest.fixture
def model_dir(good_model, tmp_path) -> Path:
    d = tmp_path / "tiny-lite0"
    shutil.copytree(good_model, d)
    return d


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Record HfApi calls instead of making them; any other Hub call fails (offline mode)."""
    import huggingface_hub
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake_token")
    calls: list[tuple[str, tuple, dict]] = []

    def recorder(name):
        def method(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            if name == "upload_folder":  # keep a copy: the staging folder is deleted afterwards
                snap = tmp_path / f"uploaded-{len(calls)}"
                shutil.copytree(kwargs["folder_path"], snap)
                kwargs["_snapshot"] = snap
                return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{COMMIT}",
                                       oid=COMMIT)
            return SimpleNamespace(repo_id=args[0] if args else kwargs.get("repo_id"))
        return method

    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, recorder(name))
    return calls


def test_dry_run_lists_the_files_and_changes_nothing(model_dir, hub, capsys):
    (model_dir / "checkpoint.pt").write_bytes(b"pickled optimizer state")
    (model_dir / "notes.txt").write_text("scratch")
    before = sorted(p.name for p in model_dir.iterdir())
    assert hub_upload.main([str(model_dir), "--repo-id", "me/tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == ["config.json", "model.safetensors", "vocab.json", "README.md"]
    card_kib = float(next(line for line in out.splitlines() if line.startswith("  README.md")).split("(")[1].split()[0])
    assert card_kib > 1.5  # the rendered model card, not the mixin's stub README that save_pretrained wrote
    assert "left out of the upload: checkpoint.pt, notes.txt" in out and "dry run: nothing uploaded" in out
    assert sorted(p.name for p in model_dir.iterdir()) == before  # no README.md written
    assert hub == []  # no Hub call at all


def test_dry_run_with_a_space_prints_its_model_reference_and_bundles_nothing(model_dir, hub, capsys):
    (model_dir / "evaluation.json").write_text(json.dumps({"evaluations": []}))
    assert hub_upload.main([str(model_dir), "--repo-id", "me/tiny", "--space-id", "me/storyteller", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"Space model reference ({SPACE_MODEL_FILE}): me/tiny@{PENDING_COMMIT}" in out
    res = hub_upload.publish(model_dir, "me/tiny", dry_run=True, space_id="me/storyteller", log=lambda *a: None)
    assert res["model_files"] == ["config.json", "model.safetensors", "vocab.json", "evaluation.json", "README.md"]
    assert res["space_model"] == f"me/tiny@{PENDING_COMMIT}"
    space = set(res["space_files"])
    for f in ("app.py", "requirements.txt", "README.md", SPACE_MODEL_FILE, "storyteller/captioner.py",
              "storyteller/images.py", "storyteller/scoring.py"):
        assert f in space, f
    assert not any(f.endswith((".safetensors", "vocab.json", "config.json")) for f in space), space  # no weights
    assert any(f.startswith("examples/") and f.endswith(".jpg") for f in space)
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in space)
    assert hub == []


def test_bundle_puts_the_model_in_the_space(model_dir, hub):
    res = hub_upload.publish(model_dir, "me/tiny", dry_run=True, space_id="me/storyteller", bundle=True,
                             log=lambda *a: None)
    assert res["space_model"] == "models/tiny-lite0"
    for f in ("config.json", "model.safetensors", "vocab.json", "README.md"):
        assert f"models/tiny-lite0/{f}" in res["space_files"], f


def test_bundle_without_a_space_is_a_usage_error(model_dir, hub):
    with pytest.raises(SystemExit) as e:
        hub_upload.main([str(model_dir), "--repo-id", "me/tiny", "--bundle", "--dry-run"])
    assert e.value.code == 2 and hub == []


@pytest.mark.parametrize("attention", [False, True])
def test_the_space_readme_fits_the_model(tmp_path, attention):
    from huggingface_hub.repocard import metadata_load

    folder = save_test_model(tmp_path / "m", attention=attention)
    files, ref = hub_upload.stage_space(folder, "me/m", "me/space", tmp_path / "space", COMMIT)
    readme = (tmp_path / "space" / "README.md").read_text(encoding="utf-8")
    assert ref == f"me/m@{COMMIT}" and ref in readme and SPACE_MODEL_FILE in readme
    meta = metadata_load(tmp_path / "space" / "README.md")
    assert meta["models"] == ["me/m"] and len(meta["short_description"]) <= 60
    if attention:
        assert "grid of features" in readme and "one feature vector" not in readme and "show-attend-tell" in meta["tags"]
    else:
        assert "one feature vector" in readme and "grid" not in readme and "show-and-tell" in meta["tags"]


def test_the_space_readme_of_an_ensemble_says_what_it_is(tmp_path):
    from huggingface_hub.repocard import metadata_load

    from train import ensemble

    members = [save_test_model(tmp_path / "p", pretrained_backbone=False),
               save_test_model(tmp_path / "a", attention=True, pretrained_backbone=False)]
    folder = ensemble.main(["--models", *map(str, members), "--out", str(tmp_path / "e")])
    hub_upload.stage_space(folder, "me/e", "me/space", tmp_path / "space", COMMIT)
    readme = (tmp_path / "space" / "README.md").read_text(encoding="utf-8")
    meta = metadata_load(tmp_path / "space" / "README.md")
    assert "decoded as one" in readme and "looks over the grid" in readme and "the page shows where" in readme
    assert {"ensemble", "show-attend-tell"} <= set(meta["tags"]) and len(meta["short_description"]) <= 60


@pytest.mark.parametrize("breakage", ["missing vocab", "weights mismatch", "not a folder"])
def test_a_broken_folder_is_refused_before_any_upload(model_dir, hub, capsys, breakage):
    if breakage == "missing vocab":
        (model_dir / "vocab.json").unlink()
    elif breakage == "weights mismatch":
        cfg = json.loads((model_dir / "config.json").read_text())
        cfg["hidden_dim"] = 64
        (model_dir / "config.json").write_text(json.dumps(cfg))
    else:
        model_dir = model_dir / "nope"
    assert hub_upload.main([str(model_dir), "--repo-id", "me/tiny"]) == 1
    err = capsys.readouterr().err
    assert "refusing to upload" in err and "Traceback" not in err
    assert hub == []


def test_no_token_is_refused_with_how_to_log_in(model_dir, hub, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert hub_upload.main([str(model_dir), "--repo-id", "me/tiny"]) == 1
    assert "HF_TOKEN" in capsys.readouterr().err and hub == []


def test_upload_calls(model_dir, hub):
    res = hub_upload.publish(model_dir, "me/tiny", private=True, revision="v1", commit_message="first",
                             log=lambda *a: None)
    names = [c[0] for c in hub]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    _, args, kw = hub[0]
    assert args == ("me/tiny",) and kw == {"repo_type": "model", "private": True, "exist_ok": True}
    _, args, kw = hub[1]
    assert args == ("me/tiny",) and kw == {"branch": "v1", "repo_type": "model", "exist_ok": True}
    _, _, kw = hub[2]
    assert kw["repo_id"] == "me/tiny" and kw["repo_type"] == "model" and kw["revision"] == "v1"
    assert kw["folder_path"] == str(model_dir) and kw["commit_message"] == "first"
    assert kw["allow_patterns"] == ["config.json", "model.safetensors", "vocab.json", "README.md"]
    card = (model_dir / "README.md").read_text()  # the model card was written before the upload
    assert card.startswith("---") and "me/tiny" in card and "image-to-text" in card
    assert res["model_commit"] == f"https://huggingface.co/me/tiny/commit/{COMMIT}"


def test_upload_with_space_pins_the_model_commit_and_the_staged_space_serves_it_from_the_hub_cache(
        model_dir, hub, tmp_path, monkeypatch):
    from huggingface_hub.repocard import metadata_load

    res = hub_upload.publish(model_dir, "me/tiny", space_id="me/storyteller", log=lambda *a: None)
    assert [c[0] for c in hub] == ["create_repo", "upload_folder", "create_repo", "upload_folder"]
    assert hub[0][2]["private"] is None and hub[1][2]["revision"] is None
    _, args, kw = hub[2]
    assert args == ("me/storyteller",) and kw == {"repo_type": "space", "space_sdk": "gradio", "private": None,
                                                  "exist_ok": True, "space_hardware": "zero-a10g"}
    kw = hub[3][2]
    assert kw["repo_id"] == "me/storyteller" and kw["repo_type"] == "space"
    space = kw["_snapshot"]
    assert (space / SPACE_MODEL_FILE).read_text().splitlines()[-1] == f"me/tiny@{COMMIT}" == res["space_model"]
    assert not list(space.rglob("*.safetensors"))  # nothing bundled: the Space downloads the model
    meta = metadata_load(space / "README.md")
    import gradio

    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["sdk_version"] == gradio.__version__
    assert meta["models"] == ["me/tiny"] and len(meta["short_description"]) <= 60
    assert res["space_commit"].startswith("https://huggingface.co/me/storyteller")
    # the pushed Space, run as a Space runs it (`python app.py`, no --model), offline, against a Hub cache
    # that holds the model at the pinned commit: it serves that model
    cache = tmp_path / "hub-cache"
    put_in_hub_cache(model_dir, cache, "me/tiny", commit=COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with running_app(None, tmp_path / "space.log", app_dir=space) as url:
        client = Client(url, verbose=False, download_files=False)
        photo = sorted((space / "examples").glob("*.jpg"))[0]
        out = client.predict(handle_file(str(photo)), api_name="/caption_json")
        assert out["beam"]["text"].strip() and out["model"]["label"] == "me/tiny" and out["model"]["revision"] == COMMIT
    log = (tmp_path / "space.log").read_text()
    assert f"loading the model me/tiny at revision {COMMIT}" in log


def test_card_thumbnails_and_curves_are_uploaded(model_dir, hub, capsys):
    (model_dir / "examples").mkdir()
    (model_dir / "examples" / "img1.jpg").write_bytes(b"\xff\xd8 thumb")
    (model_dir / "metric_curve.png").write_bytes(b"\x89PNG curve")
    assert hub_upload.main([str(model_dir), "--repo-id", "me/tiny", "--dry-run"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert "examples/img1.jpg" in listed and "metric_curve.png" in listed
    res = hub_upload.publish(model_dir, "me/tiny", dry_run=True, space_id="me/space", bundle=True, log=lambda *a: None)
    assert "models/tiny-lite0/examples/img1.jpg" in res["space_files"]
    hub_upload.publish(model_dir, "me/tiny", log=lambda *a: None)
    assert "examples/img1.jpg" in hub[-1][2]["allow_patterns"]


@pytest.mark.parametrize("hardware", ["zerogpu", "cpu"])
def test_the_space_is_staged_for_its_hardware(tmp_path, good_model, hardware):
    from huggingface_hub.repocard import metadata_load

    hub_upload.stage_space(good_model, "me/m", "me/space", tmp_path / "space", COMMIT, hardware=hardware)
    meta = metadata_load(tmp_path / "space" / "README.md")
    reqs = [line.split("#")[0].strip() for line in (tmp_path / "space" / "requirements.txt").read_text().splitlines()]
    reqs = [r for r in reqs if r]
    if hardware == "zerogpu":
        assert meta["python_version"] in ("3.10", "3.12") and meta["suggested_hardware"] == "zero-a10g"
        assert "spaces" in reqs and "torch>=2.8,<2.12" in reqs and "torchvision>=0.23,<0.27" in reqs
        from packaging.specifiers import SpecifierSet

        torch_spec = SpecifierSet(next(r for r in reqs if r.startswith("torch>")).removeprefix("torch"))
        assert all(v in torch_spec for v in ("2.8.0", "2.11.0")) and "2.12.0" not in torch_spec
    else:
        assert meta["suggested_hardware"] == "cpu-basic" and "spaces" not in reqs
        assert (tmp_path / "space" / "requirements.txt").read_text() == (REPO / "requirements.txt").read_text()
    # the rest of the requirements are the repository's
    theirs = {r.split("#")[0].strip() for r in (REPO / "requirements.txt").read_text().splitlines()} - {""}
    assert {r for r in theirs if not r.startswith(("torch>", "torchvision>"))} <= set(reqs)


def test_the_staged_zerogpu_space_serves_on_a_cpu_machine(tmp_path, good_model):
    """Its app imports and serves here (the `spaces` decorator, where installed, does nothing off ZeroGPU)."""
    files, ref = hub_upload.stage_space(good_model, "me/m", "me/space", tmp_path / "space", COMMIT, bundle=True,
                                        hardware="zerogpu")
    with running_app(None, tmp_path / "space.log", app_dir=tmp_path / "space") as url:
        out = Client(url, verbose=False, download_files=False).predict(
            handle_file(str(sorted((tmp_path / "space" / "examples").glob("*.jpg"))[0])), api_name="/caption_json")
    assert out["beam"]["text"].strip()


def test_unknown_hardware_is_a_usage_error(model_dir, hub):
    with pytest.raises(SystemExit) as e:
        hub_upload.main([str(model_dir), "--repo-id", "me/tiny", "--space-id", "me/s", "--hardware", "tpu", "--dry-run"])
    assert e.value.code == 2 and hub == []
