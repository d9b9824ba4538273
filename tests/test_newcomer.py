"""The newcomer's smaller findings (issue 33, item 6), each where it could come back."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from storyteller.captioner import ModelLoadError, load, resolve_model_dir
from tests.helpers_models import save_test_model
from tests.helpers_server import REPO

EXAMPLE = sorted((REPO / "examples").glob("*.jpg"))[0]


def test_attention_figure_takes_a_path_like_every_other_entry_point(tmp_path):
    captioner = load(save_test_model(tmp_path / "att", attention=True))
    best = captioner.caption([str(EXAMPLE)], beam_size=2, max_len=4)[0].best
    from_path = captioner.attention_figure(str(EXAMPLE), best, panel_width=64)
    from_pil = captioner.attention_figure(captioner.load_image(str(EXAMPLE)), best, panel_width=64)
    assert from_path.size == from_pil.size and from_path.tobytes() == from_pil.tobytes()


def test_info_of_an_ensemble_prints_no_null_sizes(tmp_path):
    from train import ensemble

    members = [save_test_model(tmp_path / "p", pretrained_backbone=False),
               save_test_model(tmp_path / "a", attention=True, pretrained_backbone=False)]
    folder = ensemble.main(["--models", *map(str, members), "--out", str(tmp_path / "e")])
    run = subprocess.run([sys.executable, "-m", "storyteller", "info", "--model", str(folder)], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    for key in ("embed_dim", "hidden_dim", "num_layers"):
        assert key not in info, info  # an ensemble's sizes are its members'
        assert all(m.get(key) for m in info["members"]), info["members"]


def test_a_local_model_path_is_not_called_the_hub_cache(tmp_path):
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(REPO / "app.py"), "--model", "./no-such-model"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 1 and "no model folder" in run.stderr
    assert "Hub cache" not in run.stdout + run.stderr, run.stdout


@pytest.mark.parametrize("offline", ["1", None])
def test_the_offline_hint_asks_for_hf_hub_offline_only_when_it_is_not_set(monkeypatch, tmp_path, offline):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(*a, **k):  # the network is not there, whatever the setting
        from huggingface_hub.errors import LocalEntryNotFoundError

        raise LocalEntryNotFoundError("no connection and nothing cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(ModelLoadError) as e:
        resolve_model_dir("someone/some-model")
    message = str(e.value)
    assert "hf download someone/some-model" in message
    if offline:
        assert "set HF_HUB_OFFLINE=1" not in message and "HF_HUB_OFFLINE is set" in message
    else:
        assert "set HF_HUB_OFFLINE=1" in message
