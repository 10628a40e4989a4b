"""fp16 devices (Atlas 300I/310P): the VAE runs in fp32, and a NaN/inf step stops the edit with one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import HiDreamImageTransformer2DModel
from PIL import Image

from hidream_edit.cli import run_edit_cli
from hidream_edit.config import resolve_model_sources
from hidream_edit.editor import Editor, EditorSettings, EditRequest
from hidream_edit.errors import NonFiniteError
from hidream_edit.spec import MODELS

FP16_REMEDY = "bf16 (where the device supports it) or fp32 avoids the overflow"
FP16_FIX = "rerun with --dtype bf16 where the device supports it, else --dtype fp32"


@pytest.fixture(scope="module")
def fp16_editor(tiny_env: dict[str, str]) -> Editor:
    """The tiny E1.1 on a CPU DeviceManager whose dtype is fp16 (the CPU runs fp16 ops)."""
    sources = resolve_model_sources(MODELS["e1.1"], tiny=True, env=tiny_env)
    return Editor.load(EditorSettings(sources=sources, device="cpu", dtype="fp16"))


def request(steps: int) -> EditRequest:
    return EditRequest(Image.new("RGB", (64, 48), (30, 120, 200)), "make it green", steps=steps, refine_strength=0.5)


def nan_from_call(first_bad_call: int, calls: list[int]) -> Any:
    """A stand-in forward (output shaped like its input): finite, then NaN from call `first_bad_call` (1-based) on."""

    def forward(hidden_states: torch.Tensor, **_: Any) -> tuple[torch.Tensor]:
        calls.append(1)
        if len(calls) >= first_bad_call:
            return (torch.full_like(hidden_states, float("nan")),)
        return (0.5 * hidden_states,)

    return forward


def test_fp16_device_runs_the_vae_in_fp32_and_records_it(fp16_editor: Editor) -> None:
    pipe = fp16_editor.loaded.pipe
    assert pipe.transformer.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16
    assert pipe.vae.dtype == torch.float32
    result = fp16_editor.edit(request(steps=1))
    assert result.metadata["dtype"] == "fp16" and result.metadata["vae_dtype"] == "fp32"
    assert result.image.size == (64, 48) and result.metadata["non_finite_output"] is False


def test_a_non_finite_step_stops_the_edit_naming_step_and_dtype(
    fp16_editor: Editor, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(fp16_editor.loaded.pipe.transformer, "forward", nan_from_call(2, calls))
    steps_seen: list[int] = []
    with pytest.raises(NonFiniteError) as error:
        fp16_editor.edit(request(steps=4), on_step=lambda done, total: steps_seen.append(done))
    assert str(error.value) == f"denoising step 2 of 4 produced NaN/inf in fp16; nothing was saved; {FP16_REMEDY}"
    assert len(calls) == 2 and steps_seen == [1]  # stopped at the bad step, before reporting it done


def test_a_non_finite_decode_is_an_error_not_a_black_image(e1_1_editor: Editor, monkeypatch: pytest.MonkeyPatch):
    vae = e1_1_editor.loaded.pipe.vae
    decode = vae.decode
    monkeypatch.setattr(vae, "decode", lambda *a, **k: (torch.full_like(decode(*a, **k)[0], float("inf")),))
    with pytest.raises(NonFiniteError, match=r"^the VAE decode produced NaN/inf in fp32; nothing was saved; check"):
        e1_1_editor.edit(request(steps=1))


def test_cli_says_it_in_one_line_and_saves_nothing(
    tiny_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[int] = []
    fake = nan_from_call(1, calls)
    monkeypatch.setattr(HiDreamImageTransformer2DModel, "forward", lambda self, **kwargs: fake(**kwargs))
    source, output = tmp_path / "in.png", tmp_path / "out.png"
    Image.new("RGB", (64, 48)).save(source)
    argv = ["--tiny", "--image", str(source), "--instruction", "make it green", "--output", str(output),
            "--steps", "2", "--dtype", "fp16"]
    assert run_edit_cli(argv, "e1.1", env=tiny_env) == 2
    err = capsys.readouterr().err
    assert err.endswith(
        f"error: denoising step 1 of 2 produced NaN/inf in fp16; nothing was saved; {FP16_REMEDY}; {FP16_FIX}\n"
    )
    assert "Traceback" not in err and err.count("error:") == 1 and len(calls) == 1
    assert not output.exists() and not Path(f"{output}.json").exists() and sorted(tmp_path.iterdir()) == [source]
