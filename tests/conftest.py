"""Shared fixtures.

Real DBC files written by other projects live outside the repository, in the
read-only ``shared/corpus`` folder beside the checkout (CI places ``shared/``
there too).  They are never copied into the repo; tests that need them take
the ``corpus`` fixture, which skips with a clear reason only when the folder is
truly absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The shared corpus folder of real-world DBC files (skips when it is absent)."""
    if not CORPUS.is_dir():
        pytest.skip(f"shared corpus folder {CORPUS} is absent (expected beside the checkout, as in CI)")
    return CORPUS


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root (shipped DBCs in dbc/, maps in dbc/maps/, configs in gateway/configs/)."""
    return REPO
