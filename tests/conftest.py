"""Shared fixtures. Real photos live in ../shared/data (beside the checkout); tests that need them skip
cleanly where that folder is absent (a user's fresh clone)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STORYTELLER_SHARED_DATA", REPO.parent / "shared" / "data"))
FLICKR8K = SHARED_DATA / "flickr8k"
FLICKR8K_FULLRES = SHARED_DATA / "flickr8k-fullres"


@pytest.fixture(scope="session")
def flickr8k_dir() -> Path:
    """../shared/data/flickr8k (imagefolder with train/ and validation/), or skip."""
    if not (FLICKR8K / "validation" / "metadata.jsonl").is_file():
        pytest.skip(f"real Flickr8k data not found at {FLICKR8K} (only present beside the team's checkout)")
    return FLICKR8K


@pytest.fixture(scope="session")
def fullres_dir() -> Path:
    """../shared/data/flickr8k-fullres/validation (original-resolution photos), or skip."""
    d = FLICKR8K_FULLRES / "validation"
    if not (d / "metadata.jsonl").is_file():
        pytest.skip(f"full-resolution Flickr8k photos not found at {d}")
    return d
