"""Shared pytest fixtures, the CI guard plugin and the environment every test run starts from."""

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ("ci_required",)

# Every run, whole suite or one file, starts from the same environment: the hub is offline (everything
# is local; an accidental download fails fast instead of waiting on the network) and the user's device
# and model settings are not inherited: every HIDREAM_* variable (a new one included, e.g. the tiny
# folder or the web login) and the device variables. Set here, before any test module imports
# huggingface_hub.
TEST_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
USER_SETTINGS = ("PREFERRED_DEVICE", "PREFERRED_DTYPE", "LOCAL_RANK")
USER_SETTING_PREFIX = "HIDREAM_"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.update(TEST_ENVIRONMENT)
    for name in [name for name in os.environ if name in USER_SETTINGS or name.startswith(USER_SETTING_PREFIX)]:
        del os.environ[name]


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


@pytest.fixture()
def closed_port() -> Iterator[int]:
    """A local port that refuses connections for the whole test: bound by us, never listening.

    Closing a probe socket and reusing its number would race with any other process taking the port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
