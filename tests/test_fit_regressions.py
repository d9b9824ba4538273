"""`fit --resume` keeps the early-stopping state: a run killed while its patience counter is running
stops at the same epoch as an uninterrupted run, and resuming a run that already stopped trains no
more epochs. (The bit-identical resume test stops before any epoch fails to improve, so a resume
that reset ``bad_epochs`` / ``stopped`` to 0 / False would pass it.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_fit import fit_args, make_cache
from train import fit

# A learning rate far too high for validation loss to keep improving: epochs stop improving early,
# so patience counts. Seeded, so the pattern is the same on every run.
EARLY = ("--epochs", "10", "--patience", "2", "--select", "val_loss", "--lr", "5.0")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("fitreg") / "cache")


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


def test_resume_keeps_the_patience_counter_and_the_stopped_flag(cache, tmp_path):
    straight = tmp_path / "straight"
    fit.main(fit_args(cache, straight, *EARLY))
    h = history(straight)
    assert len(h) < 10, "the setting must stop early for this test to mean anything"
    # an epoch after which the counter is running (it did not improve) but the run went on
    kill_at = next(r["epoch"] for r in h if r["best_epoch"] < r["epoch"] < len(h))
    resumed = tmp_path / "resumed"
    fit.main(fit_args(cache, resumed, *EARLY, "--stop-after-epochs", str(kill_at)))
    ckpt = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == kill_at and ckpt["bad_epochs"] >= 1 and not ckpt["stopped"]
    fit.main(fit_args(cache, resumed, *EARLY, "--resume"))
    assert [r["epoch"] for r in history(resumed)] == [r["epoch"] for r in h]  # stopped at the same epoch
    assert [r["val_loss"] for r in history(resumed)] == [r["val_loss"] for r in h]
    done = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert done["stopped"] and done["bad_epochs"] == 2
    # resuming a run that already stopped early trains nothing more
    fit.main(fit_args(cache, resumed, *EARLY, "--resume"))
    assert len(history(resumed)) == len(h)
    assert torch.load(resumed / "checkpoint.pt", weights_only=True)["epoch"] == len(h)
