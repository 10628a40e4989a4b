"""Hub downloads fetch exactly what a run loads: the spec's allow patterns against a fake hub.

The fake `snapshot_download` serves the tiny set as if it were the hub: it copies only the files that
match the patterns asked for into a fresh snapshot folder. A run that then loads and edits proves the
patterns cover every file the loader opens; the recorded patterns and copied files prove nothing more
(I1's transformer weights, Llama's `original/` folder) was fetched.
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from hidream_edit.editor import Editor, EditorSettings, EditRequest
from hidream_edit.errors import UserError
from hidream_edit.models import ModelSources
from hidream_edit.spec import I1_HUB_ID, LLAMA_HUB_ID, MODELS


class FakeHub:
    """Repos by id, served by copying the files that match `allow_patterns`; `downloads` lists the calls
    that were not cache look-ups (`local_files_only` false)."""

    def __init__(self, repos: dict[str, Path], cache: Path) -> None:
        self.repos = repos
        self.cache = cache
        self.fetched: dict[str, list[str]] = {}
        self.downloads: list[str] = []

    def snapshot_download(
        self, repo_id: str, allow_patterns: Any = None, local_files_only: bool = False, **_: Any
    ) -> str:
        if not local_files_only:
            self.downloads.append(repo_id)
        source = self.repos[repo_id]
        target = self.cache / repo_id.replace("/", "--")
        files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
        chosen = [f for f in files if allow_patterns is None or any(fnmatch.fnmatch(f, pat) for pat in allow_patterns)]
        for name in chosen:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)
        self.fetched[repo_id] = chosen
        return str(target)


@pytest.fixture
def hub(tiny_checkpoints: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    llama = tmp_path / "llama-repo"
    shutil.copytree(tiny_checkpoints.llama, llama)
    (llama / "original").mkdir()
    (llama / "original" / "consolidated.00.pth").write_bytes(b"meta's own runtime weights")
    e1_full = tmp_path / "e1-full-repo"
    e1_full.mkdir()
    shutil.copy2(tiny_checkpoints.e1_full_lora, e1_full / MODELS["e1-full"].lora.file)
    (e1_full / "README.md").write_text("model card")
    repos = {
        LLAMA_HUB_ID: llama,
        I1_HUB_ID: tiny_checkpoints.i1,
        MODELS["e1.1"].edit_hub_id: tiny_checkpoints.e1_1,
        MODELS["e1-full"].edit_hub_id: e1_full,
    }
    fake = FakeHub(repos, tmp_path / "cache")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def hub_sources(model: str) -> ModelSources:
    return ModelSources(model, LLAMA_HUB_ID, I1_HUB_ID, MODELS[model].edit_hub_id, offline=False)


def edit_once(settings: EditorSettings, tmp_path: Path) -> Image.Image:
    source = tmp_path / "in.png"
    Image.new("RGB", (64, 48), (200, 40, 90)).save(source)
    editor = Editor.load(settings)
    return editor.edit(EditRequest(image=source, instruction="make it blue", steps=2)).image


@pytest.mark.parametrize("refine_weights", ["edit", "base"])
def test_e1_1_downloads_only_what_it_loads(hub: FakeHub, tmp_path: Path, refine_weights: str) -> None:
    settings = EditorSettings(sources=hub_sources("e1.1"), device="cpu", dtype="fp32", refine_weights=refine_weights)
    assert edit_once(settings, tmp_path).size == (64, 48)
    i1_files = hub.fetched[I1_HUB_ID]
    i1_weights = [f for f in i1_files if f.startswith("transformer/") and f != "transformer/config.json"]
    if refine_weights == "edit":
        assert i1_weights == []  # E1.1 needs only I1's transformer config
    else:
        assert i1_weights and any(f.endswith(".safetensors") for f in i1_weights)
    assert "transformer/config.json" in i1_files and "vae/config.json" in i1_files
    assert not any(f.startswith("original/") for f in hub.fetched[LLAMA_HUB_ID])
    assert "tokenizer.json" in hub.fetched[LLAMA_HUB_ID]
    e1_files = hub.fetched[MODELS["e1.1"].edit_hub_id]
    assert e1_files and all(f.startswith("transformer/") for f in e1_files)


def test_e1_full_downloads_its_lora_file_only(hub: FakeHub, tmp_path: Path) -> None:
    settings = EditorSettings(sources=hub_sources("e1-full"), device="cpu", dtype="fp32")
    assert edit_once(settings, tmp_path).size == (64, 48)
    assert hub.fetched[MODELS["e1-full"].edit_hub_id] == [MODELS["e1-full"].lora.file]
    assert any(f.startswith("transformer/") and f.endswith(".safetensors") for f in hub.fetched[I1_HUB_ID])


def test_a_mix_of_local_paths_and_hub_ids_is_planned_before_any_download(
    hub: FakeHub, tiny_checkpoints: Any
) -> None:
    """One hub id among local paths is enough to plan first: a plan that cannot fit downloads nothing."""
    sources = ModelSources("e1.1", str(tiny_checkpoints.llama), I1_HUB_ID, MODELS["e1.1"].edit_hub_id, offline=False)
    settings = EditorSettings(sources=sources, device="cpu", dtype="fp32", host_memory=2**30)
    with pytest.raises(UserError, match="HiDream-E1.1 in fp32 does not fit: on the CPU"):
        Editor.load(settings)
    assert hub.downloads == []
