"""Small random-weight Show-and-Tell models in the Hub layout, for tests that need a model folder.

    save_test_model(tmp_path / "model")            # efficientnet_lite0 spec (real offline ImageNet CNN)
    put_in_hub_cache(model_dir, cache, "me/model") # the same files as a cached Hub snapshot (offline loads)

The decoder has random weights (seeded), so captions are random word salad, but every code path
(backbone from config, preprocessing, greedy, beam, vocab) is the real one.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from storyteller.backbones import backbone_spec
from storyteller.decoders import ShowAttendTell
from storyteller.decoders import ShowAndTell
from storyteller.vocab import Vocabulary

WORDS = ("a dog runs through the grass man in red shirt is riding bike on street two children play "
         "water beach black white brown girl boy jumps over rock near woman sits bench snow").split()
SPECIAL = ("<pad>", "<start>", "<end>", "<unk>")


def save_test_model(folder: Path, backbone: str = "efficientnet_lite0", seed: int = 0, pretrained_backbone: bool = True,
                    extra: dict[str, Any] | None = None, hidden_dim: int = 32, attention: bool = False) -> Path:
    """Write a small random decoder (``config.json``, ``model.safetensors``, ``vocab.json``) to ``folder``.

    Args:
        folder: where to write (created).
        backbone: a name from ``list_backbones()``; its spec goes into ``config.json``.
        seed: decoder weight seed.
        pretrained_backbone: False stores ``"weights": null`` (random CNN, no weight file needed).
        extra: ``config["extra"]`` (e.g. metrics for the app's model panel).
        hidden_dim: LSTM size (small keeps tests fast).
        attention: write a Show-Attend-Tell decoder (reads the backbone's feature grid) instead.
    """
    spec = backbone_spec(backbone)
    if not pretrained_backbone:
        spec = {**spec, "weights": None}
    vocab = Vocabulary(list(dict.fromkeys(WORDS)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        extra = extra if extra is not None else {"dataset": "test", "metrics": {"bleu4": 0.123, "cider": 0.456, "split": "validation"}}
        if attention:
            model = ShowAttendTell(vocab_size=len(vocab), feature_dim=spec["feature_dim"], embed_dim=16,
                                   hidden_dim=hidden_dim, attention_dim=16, grid=[7, 7], backbone=spec, extra=extra)
        else:
            model = ShowAndTell(vocab_size=len(vocab), feature_dim=spec["feature_dim"], embed_dim=16,
                                hidden_dim=hidden_dim, num_layers=1, backbone=spec, extra=extra)
    model.vocab = vocab
    model.save_pretrained(folder)
    return Path(folder)


def put_in_hub_cache(model_dir: Path, cache_dir: Path, repo_id: str, revision: str = "main",
                     commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay ``model_dir``'s files out as huggingface_hub's cache does for ``repo_id`` at ``revision``.

    Returns the snapshot folder. With ``HF_HUB_CACHE=cache_dir`` and ``HF_HUB_OFFLINE=1``,
    ``snapshot_download(repo_id)`` then returns it without any network call.
    """
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snap
