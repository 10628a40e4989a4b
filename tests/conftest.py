"""Shared pytest fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """One tiny random-weight HiDream checkpoint set (seed 0) shared by the whole test session."""
    from hidream_edit.tiny import ensure_tiny_checkpoints

    root: Path = tmp_path_factory.getbasetemp() / "tiny-checkpoints"
    return ensure_tiny_checkpoints(root, seed=0)


@pytest.fixture(scope="session")
def tiny_env(tiny_checkpoints) -> dict[str, str]:
    """Environment that points --tiny at the session's tiny set and keeps the hub offline."""
    return {"HIDREAM_TINY_DIR": str(tiny_checkpoints.root), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="session")
def e1_1_editor(tiny_env):
    """One E1.1 Editor on the tiny set (CPU, fp32, sdpa), shared by the session."""
    from hidream_edit.config import resolve_model_sources
    from hidream_edit.editor import Editor, EditorSettings
    from hidream_edit.spec import MODELS

    sources = resolve_model_sources(MODELS["e1.1"], tiny=True, env=tiny_env)
    return Editor.load(EditorSettings(sources=sources, device="cpu", dtype="fp32", attention="sdpa"))


@pytest.fixture(scope="session")
def e1_full_editor(tiny_env):
    """One E1-Full Editor on the tiny set with --refine-weights base, shared by the session."""
    from hidream_edit.config import resolve_model_sources
    from hidream_edit.editor import Editor, EditorSettings
    from hidream_edit.spec import MODELS

    sources = resolve_model_sources(MODELS["e1-full"], tiny=True, env=tiny_env)
    return Editor.load(EditorSettings(sources=sources, device="cpu", dtype="fp32", refine_weights="base"))
