"""Shared pytest fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """One tiny random-weight HiDream checkpoint set (seed 0) shared by the whole test session."""
    from hidream_edit.tiny import ensure_tiny_checkpoints

    root: Path = tmp_path_factory.getbasetemp() / "tiny-checkpoints"
    return ensure_tiny_checkpoints(root, seed=0)
