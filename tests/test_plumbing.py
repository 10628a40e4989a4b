"""Settings plumbing: each CLI flag reaches the loader, the device manager or the pipeline call.

Most tests replace the two boundaries, `load_pipeline` and the pipeline call, with recorders and run
the real CLI and Editor in between, so a flag dropped or crossed anywhere on the way is caught without
a denoising run. Each test compares everything that reaches the boundaries with a run without the flag:
the flag must change exactly what it is for. One test per model then loads the real tiny model with
all the flags and checks what the loader really did.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from device_utils import DeviceManager
from hidream_edit import editor as editor_module
from hidream_edit.cli import run_edit_cli
from hidream_edit.config import resolve_model_sources
from hidream_edit.editor import MAX_STEPS, Editor, EditorSettings, EditRequest, resolve_request
from hidream_edit.errors import EditCancelled, UserError
from hidream_edit.guidance_parallel import GuidanceGroup, form_guidance_group
from hidream_edit.images import resize_for_e1_1, resize_for_e1_full
from hidream_edit.models import LoadedPipeline, ModelSources, SameWeights
from hidream_edit.pipeline import EditOutput, HiDreamImageEditingPipeline
from hidream_edit.spec import MODELS

PATH_FLAGS = {"e1.1": ["--llama-path", "L", "--i1-path", "I", "--e1-path", "E"],
              "e1-full": ["--llama-path", "L", "--i1-path", "I", "--lora-path", "F"]}


@dataclass
class Boundary:
    """What crossed the recorded boundaries during one run."""

    loads: list[dict[str, Any]] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    generators: list[tuple[int, str]] = field(default_factory=list)


class RecordingPipe:
    """Takes the pipeline call's arguments and returns a blank image of the model input's size."""

    guidance_group: GuidanceGroup | None = None  # set by Editor.use_guidance_group

    def __init__(self, boundary: Boundary) -> None:
        self.boundary = boundary

    def __call__(self, **kwargs: Any) -> EditOutput:
        self.boundary.calls.append(kwargs)
        steps = kwargs["num_inference_steps"]
        for index in range(steps):  # as the pipeline does in each step: share the branches, then the callback
            if self.guidance_group is not None:
                self.guidance_group.predictions(3, lambda start, stop: torch.zeros(stop - start, 1), (1,),
                                                torch.float32, f"step {index + 1}")
            kwargs["callback_on_step_end"](self, index, torch.tensor(999 - index), {"latents": torch.zeros(1)})
        timings = {"encode_s": 0.0, "step_s": [0.0] * steps, "decode_s": 0.0}
        return EditOutput([Image.new("RGB", kwargs["image"].size)], timings, False, steps)


@pytest.fixture()
def boundary(monkeypatch: pytest.MonkeyPatch) -> Boundary:
    recorded = Boundary()

    def load_pipeline(sources: ModelSources, dm: DeviceManager, **kwargs: Any) -> LoadedPipeline:
        recorded.loads.append({"sources": sources, "device": str(dm.device), "dtype": dm.dtype, **kwargs})
        attention = kwargs["attention"] or "sdpa"
        return LoadedPipeline(RecordingPipe(recorded), SameWeights(), attention, ["recorded"], sources,
                              lora_fused=kwargs["fuse_lora"])

    real_create = DeviceManager.create_generator

    def create_generator(self: DeviceManager, seed: int, on: str = "device") -> torch.Generator:
        recorded.generators.append((seed, on))
        return real_create(self, seed, on)

    monkeypatch.setattr(editor_module, "load_pipeline", load_pipeline)
    monkeypatch.setattr(DeviceManager, "create_generator", create_generator)
    for name in ("PREFERRED_DEVICE", "PREFERRED_DTYPE", "HIDREAM_ATTENTION", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return recorded


def stripes() -> Image.Image:
    """200x100: green outer quarters, red and blue in the middle (stretching and cropping differ)."""
    image = Image.new("RGB", (200, 100), (0, 255, 0))
    image.paste((255, 0, 0), (50, 0, 100, 100))
    image.paste((0, 0, 255), (100, 0, 150, 100))
    return image


def run_cli(model: str, flags: list[str], tmp_path: Path, boundary: Boundary, name: str = "out.png") -> dict[str, Any]:
    """Run the CLI with `flags`; return everything that reached the boundaries, plus the saved metadata."""
    source = tmp_path / "source.png"
    if not source.exists():
        stripes().save(source)
    output = tmp_path / name
    argv = ["--image", str(source), "--instruction", "make it blue", "--output", str(output), *PATH_FLAGS[model],
            *flags]
    assert run_edit_cli(argv, model, env={}) == 0
    (load,) = boundary.loads[-1:]
    call = boundary.calls[-1]
    view = {key: value for key, value in load.items() if key != "sources"}
    skipped = ("image", "callback_on_step_end", "generator", "refine_switch")
    view.update({key: value for key, value in call.items() if key not in skipped})
    view["refine_switch"] = call["refine_switch"].name
    view["image"] = np.asarray(call["image"]).tobytes()
    view["image_size"] = call["image"].size
    view["generator_seed"], view["generator_on"] = boundary.generators[-1]
    view["generator"] = call["generator"].initial_seed()
    view["metadata"] = json.loads(Path(f"{output}.json").read_text())
    saved = Image.open(output)
    assert saved.size == (200, 100) and saved.format == "PNG"  # the result, back at the source size
    return view


BASE_VIEWS: dict[str, dict[str, Any]] = {}


def base_view(model: str, tmp_path: Path, boundary: Boundary) -> dict[str, Any]:
    """The run without flags, once per model (it is deterministic; the flag tests compare against it)."""
    if model not in BASE_VIEWS:
        BASE_VIEWS[model] = run_cli(model, [], tmp_path, boundary, "base.png")
    return BASE_VIEWS[model]


def changed(base: dict[str, Any], flagged: dict[str, Any]) -> dict[str, Any]:
    """The boundary values a flag changed (the metadata is compared separately)."""
    return {key: flagged[key] for key in base if key != "metadata" and base[key] != flagged[key]}


FLAG_EFFECTS: list[tuple[str, list[str], dict[str, Any]]] = [
    ("attention", ["--attention", "math"], {"attention": "math"}),
    ("offload", ["--offload", "model"], {"offload": "model"}),
    ("offload", ["--offload", "sequential"], {"offload": "sequential"}),
    ("vae tiling", ["--vae-tiling"], {"vae_tiling": True}),
    ("rng", ["--rng", "cpu"], {"generator_on": "cpu"}),
    ("clip cfg norm", ["--no-clip-cfg-norm"], {"clip_cfg_norm": False}),
    ("refine weights", ["--refine-weights", "base"], {"refine_weights": "base"}),
    ("dtype", ["--dtype", "fp16"], {"dtype": torch.float16}),
    ("seed", ["--seed", "9"], {"generator_seed": 9, "generator": 9}),
    ("steps", ["--steps", "5"], {"num_inference_steps": 5}),
    ("guidance", ["--guidance", "2.5"], {"guidance_scale": 2.5}),
    ("image guidance", ["--image-guidance", "1.25"], {"image_guidance_scale": 1.25}),
    ("refine strength", ["--refine-strength", "0.2"], {"refine_strength": 0.2}),
    ("negative", ["--negative", "ugly"], {"negative_prompt": "ugly"}),
    ("max memory", ["--max-memory", "7GiB"], {"max_memory": 7 << 30}),
    ("host memory", ["--host-memory", "9GiB"], {"host_memory": 9 << 30}),
    ("encoder device", ["--offload", "split", "--encoder-device", "cpu"],
     {"offload": "split", "encoder_device": "cpu"}),
]


@pytest.mark.parametrize("model", ["e1.1", "e1-full"])
def test_defaults_reach_the_boundaries(model: str, boundary: Boundary, tmp_path: Path) -> None:
    view = run_cli(model, [], tmp_path, boundary)
    defaults = {"e1.1": ("low quality, blurry, distorted", 3.0, 1.5), "e1-full": ("low resolution, blur", 5.0, 4.0)}
    assert (view["negative_prompt"], view["guidance_scale"], view["image_guidance_scale"]) == defaults[model]
    assert (view["num_inference_steps"], view["refine_strength"], view["clip_cfg_norm"]) == (28, 0.3, True)
    assert (view["attention"], view["offload"], view["vae_tiling"], view["refine_weights"]) == (None, "auto", False,
                                                                                                "edit")
    assert (view["device"], view["dtype"], view["fuse_lora"]) == ("cpu", torch.float32, False)
    assert (view["generator_seed"], view["generator_on"], view["generator"]) == (3, "device", 3)
    assert view["prompt"] == "make it blue" and view["refine_switch"] == "edit"
    source = stripes()
    expected = resize_for_e1_1(source) if model == "e1.1" else resize_for_e1_full(source)
    assert view["image"] == np.asarray(expected).tobytes() and view["image_size"] == expected.size
    sources = boundary.loads[-1]["sources"]
    edit = "E" if model == "e1.1" else "F"
    assert (sources.model, sources.llama, sources.i1, sources.edit) == (model, "L", "I", edit)


@pytest.mark.parametrize("model", ["e1.1", "e1-full"])
def test_a_library_users_settings_default_to_the_command_lines(model: str) -> None:
    """EditorSettings(sources) loads as the CLI does with no flags (the web UI and benchmarks build it directly)."""
    from dataclasses import asdict

    from hidream_edit.cli import build_edit_parser
    from hidream_edit.config import editor_settings_from_args

    spec = MODELS[model]
    args = build_edit_parser(spec).parse_args(["--tiny", "--image", "a.png", "--instruction", "x", "--output", "o.png"])
    from_cli = asdict(editor_settings_from_args(args, spec, {}))
    library = asdict(EditorSettings(ModelSources(**from_cli["sources"])))
    labels = ("device_origin", "dtype_origin")  # where a device came from, only for messages
    assert {k: v for k, v in library.items() if k not in labels} == {k: v for k, v in from_cli.items()
                                                                     if k not in labels}


@pytest.mark.parametrize("model", ["e1.1", "e1-full"])
def test_a_library_users_sources_are_the_command_lines_for_the_same_paths(model: str) -> None:
    """ModelSources(model, llama, i1, edit) is what the paths flags give without --tiny or HF_HUB_OFFLINE:
    the real models, and hub ids fetched when missing."""
    from hidream_edit.cli import build_edit_parser
    from hidream_edit.config import editor_settings_from_args

    spec = MODELS[model]
    args = build_edit_parser(spec).parse_args(["--image", "a.png", "--instruction", "x", "--output", "o.png",
                                               *PATH_FLAGS[model]])
    from_cli = editor_settings_from_args(args, spec, {}).sources
    assert ModelSources(model, from_cli.llama, from_cli.i1, from_cli.edit) == from_cli
    assert (from_cli.tiny, from_cli.offline) == (False, False)


def test_e1_full_takes_the_folder_its_download_makes_as_well_as_the_file(tiny_checkpoints: Any,
                                                                         tmp_path: Path) -> None:
    """`hf download ... --local-dir /models/HiDream-E1-Full` makes a folder: it is read as the LoRA file in it."""
    from hidream_edit.models import check_model_files, sizes_on_disk

    def sources(edit: Path) -> ModelSources:
        return ModelSources("e1-full", str(tiny_checkpoints.llama), str(tiny_checkpoints.i1), str(edit), tiny=True,
                            offline=True)

    folder, file = tiny_checkpoints.e1_full, tiny_checkpoints.e1_full_lora
    assert file.parent == folder and check_model_files(sources(folder)) == []
    assert sizes_on_disk(sources(folder), "fp32", "base") == sizes_on_disk(sources(file), "fp32", "base")
    empty = tmp_path / "HiDream-E1-Full"
    empty.mkdir()
    assert check_model_files(sources(empty)) == [str(empty / file.name)]


def test_every_loading_setting_reaches_the_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def load_pipeline(sources: ModelSources, dm: DeviceManager, **kwargs: Any) -> None:
        seen.update(kwargs, sources=sources)
        raise UserError("recorded")

    monkeypatch.setattr(editor_module, "load_pipeline", load_pipeline)
    settings = EditorSettings(ModelSources("e1.1", "L", "I", "E"), offload="group", attention="math",
                              refine_weights="base", fuse_lora=True, vae_tiling=True, max_memory=7 << 30,
                              host_memory=9 << 30, encoder_device="npu:1")
    with pytest.raises(UserError, match="recorded"):
        Editor.load(settings, DeviceManager("cpu", "fp32"))
    assert seen == {"sources": settings.sources, "offload": "group", "attention": "math", "refine_weights": "base",
                    "fuse_lora": True, "vae_tiling": True, "max_memory": 7 << 30, "host_memory": 9 << 30,
                    "encoder_device": "npu:1", "tensor_mesh": None}


@pytest.mark.parametrize("field", ["instruction", "negative"])
def test_an_over_long_prompt_is_refused_by_the_editor_as_well_as_the_command_line(field: str) -> None:
    """The web UI and library users reach the Editor without the CLI's own check: it refuses each prompt."""
    from hidream_edit.spec import MAX_PROMPT_CHARS

    request = EditRequest(image="in.png", **{"instruction": "make it red", field: "x" * (MAX_PROMPT_CHARS + 1)})
    with pytest.raises(UserError, match=f"{'negative prompt' if field == 'negative' else 'instruction'} is "):
        resolve_request(request, MODELS["e1.1"])
    resolve_request(replace(request, **{field: "x" * MAX_PROMPT_CHARS}), MODELS["e1.1"])


def test_the_load_time_reported_is_the_time_loading_took(monkeypatch: pytest.MonkeyPatch) -> None:
    import time
    from types import SimpleNamespace

    def slow_load(sources: ModelSources, dm: DeviceManager, **kwargs: Any) -> Any:
        time.sleep(0.05)
        return SimpleNamespace(pipe=SimpleNamespace())

    monkeypatch.setattr(editor_module, "load_pipeline", slow_load)
    started = time.perf_counter()
    editor = Editor.load(EditorSettings(ModelSources("e1.1", "L", "I", "E")), DeviceManager("cpu", "fp32"))
    assert 0.05 <= editor.load_s <= time.perf_counter() - started


@pytest.mark.parametrize("model", ["e1.1", "e1-full"])
@pytest.mark.parametrize("what,flags,effect", FLAG_EFFECTS, ids=[" ".join(f[1]) for f in FLAG_EFFECTS])
def test_each_flag_changes_exactly_its_setting(
    model: str, what: str, flags: list[str], effect: dict[str, Any], boundary: Boundary, tmp_path: Path
) -> None:
    base = base_view(model, tmp_path, boundary)
    flagged = run_cli(model, flags, tmp_path, boundary, "flagged.png")
    assert changed(base, flagged) == effect, what


@pytest.mark.parametrize("what,flags,metadata", [
    ("rng", ["--rng", "cpu"], {"rng": "cpu", "generator_device": "cpu"}),
    ("clip cfg norm", ["--no-clip-cfg-norm"], {"clip_cfg_norm": False}),
    ("offload", ["--offload", "model"], {"offload": "model"}),
    ("attention", ["--attention", "math"], {"attention": "math"}),
])
def test_flags_are_recorded_in_the_metadata(what: str, flags: list[str], metadata: dict[str, Any],
                                            boundary: Boundary, tmp_path: Path) -> None:
    recorded = run_cli("e1.1", flags, tmp_path, boundary)["metadata"]
    assert {key: recorded[key] for key in metadata} == metadata, what


def test_keep_aspect_keeps_the_whole_picture_instead_of_stretching(boundary: Boundary, tmp_path: Path) -> None:
    base = base_view("e1-full", tmp_path, boundary)
    kept = run_cli("e1-full", ["--keep-aspect"], tmp_path, boundary, "kept.png")
    expected = resize_for_e1_full(stripes(), keep_aspect=True)
    assert changed(base, kept) == {"image": np.asarray(expected).tobytes(), "image_size": (1072, 528)}
    assert kept["metadata"]["keep_aspect"] is True and kept["metadata"]["model_input_size"] == [1072, 528]
    assert base["metadata"]["model_input_size"] == [768, 768]
    # 2:1 kept and nothing cut off: the green outer quarters are still there at both ends
    pixels = np.asarray(Image.frombytes("RGB", (1072, 528), kept["image"]))
    assert pixels[264, 10].tolist() == [0, 255, 0] and pixels[264, 1060].tolist() == [0, 255, 0]


def test_fuse_lora_reaches_the_loader_without_a_refine_stage(boundary: Boundary, tmp_path: Path) -> None:
    base = run_cli("e1-full", ["--refine-strength", "0"], tmp_path, boundary, "base.png")
    fused = run_cli("e1-full", ["--fuse-lora", "--refine-strength", "0"], tmp_path, boundary, "fused.png")
    assert changed(base, fused) == {"fuse_lora": True} and fused["metadata"]["lora_fused"] is True


def test_fuse_lora_with_a_refine_stage_is_refused_before_loading(
    boundary: Boundary, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "source.png"
    stripes().save(source)
    argv = ["--image", str(source), "--instruction", "x", "--output", str(tmp_path / "o.png"), *PATH_FLAGS["e1-full"],
            "--fuse-lora"]
    assert run_edit_cli(argv, "e1-full", env={}) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: a fused LoRA cannot run the refine stage (it runs without the LoRA); set the refine strength "
        "to 0; --refine-strength 0, or drop --fuse-lora\n"
    )
    assert boundary.loads == [] and not (tmp_path / "o.png").exists()


def test_target_description_and_vlm_flags_shape_the_e1_full_prompt(
    boundary: Boundary, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    view = run_cli("e1-full", ["--target-description", "a blue car"], tmp_path, boundary)
    assert view["prompt"] == "Editing Instruction: make it blue. Target Image Description: a blue car"
    capsys.readouterr()
    source = tmp_path / "source.png"
    for given in (["--vlm-url", "http://127.0.0.1:1/v1"], ["--vlm-model", "m"], []):
        argv = ["--image", str(source), "--instruction", "x", "--output", str(tmp_path / "o.png"),
                *PATH_FLAGS["e1-full"], "--rewrite-instruction", *given]
        assert run_edit_cli(argv, "e1-full", env={}) == 2
        assert capsys.readouterr().err == "error: --rewrite-instruction needs --vlm-url and --vlm-model\n"
    assert len(boundary.loads) == 1


@pytest.mark.parametrize("model", ["e1.1", "e1-full"])
def test_resolve_request_accepts_the_edges_and_refuses_just_beyond(model: str) -> None:
    request = EditRequest(stripes(), "  x  ")
    edges = {"steps": (1, MAX_STEPS), "guidance": (0.0, 50.0), "image_guidance": (0.0, 50.0),
             "refine_strength": (0.0, 1.0), "seed": (0, 2**63 - 1)}
    for name, (low, high) in edges.items():
        for value in (low, high):
            assert getattr(resolve_request(replace(request, **{name: value}), MODELS[model]), name) == value
    beyond = {"steps": (0, MAX_STEPS + 1), "guidance": (-0.01, 50.01), "image_guidance": (-0.01, 50.01),
              "refine_strength": (-0.01, 1.01), "seed": (-1, 2**63)}
    messages = {"steps": "steps must be between 1 and 1000", "guidance": "guidance must be between 0 and 50",
                "image_guidance": "image guidance must be between 0 and 50",
                "refine_strength": "refine strength must be between 0 and 1",
                "seed": "seed must be between 0"}
    for name, values in beyond.items():
        for value in values:
            with pytest.raises(UserError, match=f"^{messages[name]}"):
                resolve_request(replace(request, **{name: value}), MODELS[model])
    assert resolve_request(request, MODELS[model]).instruction == "x"
    with pytest.raises(UserError, match="^the instruction is empty$"):
        resolve_request(replace(request, instruction="   "), MODELS[model])
    assert resolve_request(replace(request, refine_strength=0.0), MODELS[model], lora_fused=True).refine_strength == 0.0


@pytest.mark.parametrize("drop,extra", [(5, True), (5, False), (0, True), (3, False)],
                         ids=["both", "missing only", "unexpected only", "three missing"])
def test_mismatched_e1_1_checkpoint_names_three_keys_and_counts_the_rest(
    drop: int, extra: bool, tiny_checkpoints: Any, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    from device_utils import load_safetensors
    from hidream_edit.errors import ModelFilesError
    from hidream_edit.models import load_e1_1_transformer

    state = load_safetensors(tiny_checkpoints.e1_1 / "transformer")
    dropped = sorted(state)[:drop]
    kept = {key: value for key, value in state.items() if key not in dropped}
    if extra:
        kept["extra.weight"] = torch.zeros(1)
    (tmp_path / "transformer").mkdir()
    save_file(kept, str(tmp_path / "transformer" / "model.safetensors"))
    with pytest.raises(ModelFilesError) as error:
        load_e1_1_transformer(tiny_checkpoints.i1, tmp_path, torch.float32)
    missing = ", ".join(dropped[:3]) + {0: "none", 3: "", 5: " (and 2 more)"}[drop]  # three are named, no count
    assert str(error.value).endswith(f"missing {missing}; unexpected {'extra.weight' if extra else 'none'}")


def test_hub_ids_go_to_the_hub_cache_and_paths_stay_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    from hidream_edit.errors import ModelFilesError
    from hidream_edit.models import locate

    fetched: list[tuple[str, bool, Any]] = []

    def snapshot_download(repo_id: str, local_files_only: bool = False, allow_patterns: Any = None) -> str:
        fetched.append((repo_id, local_files_only, allow_patterns))
        return str(tmp_path / "cache" / repo_id)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert locate("org/model", "i1", True, ("a/*",)) == tmp_path / "cache" / "org" / "model"
    assert locate("org/model", "i1", False) == tmp_path / "cache" / "org" / "model"
    assert fetched == [("org/model", True, ["a/*"]), ("org/model", False, None)]
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert locate("org/model", "i1", True) == Path("org/model")  # an existing folder wins
    for local in ("./missing", "missing", "a/b/c", "~/missing-model-dir"):
        with pytest.raises(ModelFilesError, match="does not exist") as error:
            locate(local, "i1", True)
        assert error.value.role == "i1"
    assert len(fetched) == 2


def test_missing_model_files_list_six_and_count_the_rest() -> None:
    from hidream_edit import models

    for count, tail in ((6, "f5"), (7, "f5; and 1 more")):
        with pytest.raises(models.ModelFilesError) as error:
            models._raise_if_incomplete([f"f{n}" for n in range(count)])
        assert str(error.value) == f"model files missing or incomplete: f0; f1; f2; f3; f4; {tail}"


def test_hub_ids_are_named_as_such_unless_the_cache_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The quick check (before loading) does not look into the HF cache; the doctor asks it (locate_hub)."""
    from hidream_edit import models

    asked: list[str] = []

    def locate(source: str, role: str, offline: bool = False) -> Path:
        asked.append(role)
        raise models.ModelFilesError(f"{role}: {source} is not in the HF cache")

    monkeypatch.setattr(models, "locate", locate)
    hub = resolve_model_sources(MODELS["e1.1"], env={})
    assert models.check_model_files(hub) == [
        f"{role}: {source} is a hub id; it is fetched at load time unless HF_HUB_OFFLINE=1"
        for role, source in (("llama", hub.llama), ("i1", hub.i1), ("edit", hub.edit))
    ] and asked == []
    assert len(models.check_model_files(hub, locate_hub=True)) == 3 and asked == ["llama", "i1", "edit"]


def test_the_cache_check_never_downloads_and_names_each_source_it_cannot_get(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The doctor's check (locate_hub) only asks the local HF cache: a check must never start a download of
    tens of GB. A source not there is one line naming the model and the hub's first line, tied to its flag."""
    import huggingface_hub

    from hidream_edit import models
    from hidream_edit.errors import ModelFilesError

    asked: list[tuple[str, bool]] = []

    def snapshot_download(repo_id: str, local_files_only: bool = False, allow_patterns: Any = None) -> str:
        asked.append((repo_id, local_files_only))
        raise FileNotFoundError("not in the local cache\nsee the hub documentation")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    hub = resolve_model_sources(MODELS["e1.1"], env={})
    assert models.check_model_files(hub, locate_hub=True) == [
        f"{name}: cannot get {source} (not in the local cache)"
        for name, source in (("Llama-3.1-8B-Instruct", hub.llama), ("HiDream-I1-Full", hub.i1),
                             ("edit weights", hub.edit))
    ]
    assert asked == [(hub.llama, True), (hub.i1, True), (hub.edit, True)]
    with pytest.raises(ModelFilesError) as error:
        models.locate(hub.i1, "i1", offline=False)
    assert error.value.role == "i1" and asked[-1] == (hub.i1, False)


@pytest.mark.parametrize("tokenizer_files,ok", [(["tokenizer.json"], True), (["tokenizer.model"], True), ([], False)])
def test_llama_folder_needs_one_of_the_tokenizer_files(tokenizer_files: list[str], ok: bool, tmp_path: Path) -> None:
    from hidream_edit.models import check_model_files

    llama = tmp_path / "llama"
    llama.mkdir()
    for name in ["config.json", "model.safetensors", *tokenizer_files]:
        (llama / name).write_text("{}")
    problems = check_model_files(ModelSources("e1.1", str(llama), str(tmp_path / "nope-i1"), str(tmp_path / "nope")))
    llama_problems = [p for p in problems if str(llama) in p]
    assert llama_problems == ([] if ok else [str(llama / "tokenizer.json")])


def test_every_flag_has_help_and_the_progress_bar_counts_to_the_steps(
    boundary: Boundary, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from npu_standin import load_doctor

    from hidream_edit.cli import build_edit_parser
    from hidream_edit.web.command_line import build_parser as build_web_parser

    parsers = {"doctor (with --full-size's flags)": load_doctor().build_parser()}
    for model in ("e1.1", "e1-full"):
        parsers[f"{model} CLI"] = build_edit_parser(MODELS[model])
        parsers[f"{model} web UI"] = build_web_parser(model)
    for name, parser in parsers.items():
        undocumented = [a.dest for a in parser._actions if not a.help]
        assert undocumented == [], name
    capsys.readouterr()
    run_cli("e1.1", ["--steps", "3"], tmp_path, boundary)
    assert "denoising: 100%" in capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]


def test_model_sources_flags_win_over_environment_over_hub_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"HIDREAM_LLAMA_PATH": "/env/llama", "HIDREAM_I1_PATH": "/env/i1", "HIDREAM_E1_PATH": "/env/e1",
           "HIDREAM_E1_FULL_PATH": "/env/lora"}
    hub = resolve_model_sources(MODELS["e1.1"], env={})
    assert (hub.llama, hub.i1, hub.edit) == ("meta-llama/Llama-3.1-8B-Instruct", "HiDream-ai/HiDream-I1-Full",
                                             "HiDream-ai/HiDream-E1-1")
    assert hub.offline is False
    assert ModelSources(hub.model, hub.llama, hub.i1, hub.edit) == hub  # a library user's sources too: not offline
    assert resolve_model_sources(MODELS["e1-full"], env={"HF_HUB_OFFLINE": "1"}).edit == "HiDream-ai/HiDream-E1-Full"
    assert resolve_model_sources(MODELS["e1-full"], env={"HF_HUB_OFFLINE": "1"}).offline is True
    from_env = resolve_model_sources(MODELS["e1.1"], env=env)
    assert (from_env.llama, from_env.i1, from_env.edit) == ("/env/llama", "/env/i1", "/env/e1")
    assert resolve_model_sources(MODELS["e1-full"], env=env).edit == "/env/lora"
    e1_full, e1_1 = MODELS["e1-full"], MODELS["e1.1"]
    flags = resolve_model_sources(e1_full, llama_path="/f/llama", i1_path="/f/i1", edit_path="/f/lora", env=env)
    assert (flags.llama, flags.i1, flags.edit) == ("/f/llama", "/f/i1", "/f/lora")
    for name, value in env.items():  # env=None reads the process environment
        monkeypatch.setenv(name, value)
    assert resolve_model_sources(e1_1).edit == "/env/e1" and resolve_model_sources(e1_1, env={}).edit != "/env/e1"


def test_summary_line_and_out_of_memory_hint() -> None:
    from hidream_edit.cli import out_of_memory_hint, summary_line

    metadata = {"timings": {"load_s": 12.34, "encode_s": 1.25, "step_s": [2.0, 4.0], "decode_s": 0.5},
                "memory": {"peak": 3 * 2**30, "host_rss": 2**29}, "source_size": [640, 480], "device": "npu:1",
                "dtype": "bf16"}
    assert summary_line(metadata, Path("out.png")) == (
        "saved out.png (640x480) on npu:1 bf16: load 12.3s, encode 1.2s, 2 steps 6.0s (3.00s/step), decode 0.5s; "
        "peak device memory 3.00 GiB, host RSS 0.50 GiB"
    )
    cpu = dict(metadata, memory={"peak": None, "host_rss": 2**30}, timings=dict(metadata["timings"], step_s=[]))
    assert "0 steps 0.0s (0.00s/step)" in summary_line(cpu, Path("o.png"))
    assert "; no device memory, host RSS 1.00 GiB" in summary_line(cpu, Path("o.png"))
    hint = out_of_memory_hint(RuntimeError("NPU out of memory. Tried to allocate 2.00 GiB\ntraceback lines"))
    assert hint == ("out of device memory (NPU out of memory. Tried to allocate 2.00 GiB); the memory plan (--plan) "
                    "underestimated this edit: try a slower placement (--offload model, group or sequential) or "
                    "--vae-tiling")


@pytest.mark.parametrize("verbose,level", [(False, "WARNING"), (True, "INFO")])
def test_verbose_sets_our_log_level(verbose: bool, level: str, boundary: Boundary, tmp_path: Path) -> None:
    import logging

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):  # as in a fresh process: an earlier test set them
        library.enable_progress_bar()
        library.set_verbosity_warning()
    run_cli("e1.1", ["--verbose"] if verbose else [], tmp_path, boundary)
    for name in ("hidream_edit", "device_utils"):
        assert logging.getLevelName(logging.getLogger(name).level) == level
    # the libraries stay quiet either way: their warnings and bars would break the one-line contract
    assert diffusers_logging.get_verbosity() == transformers_logging.get_verbosity() == logging.ERROR
    assert not diffusers_logging.is_progress_bar_enabled() and not transformers_logging.is_progress_bar_enabled()


def test_overwrite_flag_reaches_the_saver(boundary: Boundary, tmp_path: Path) -> None:
    (tmp_path / "taken.png").write_bytes(b"keep")
    source = tmp_path / "source.png"
    stripes().save(source)
    argv = ["--image", str(source), "--instruction", "x", "--output", str(tmp_path / "taken.png"), *PATH_FLAGS["e1.1"]]
    assert run_edit_cli(argv, "e1.1", env={}) == 2 and (tmp_path / "taken.png").read_bytes() == b"keep"
    assert boundary.loads == []  # refused before loading
    assert run_edit_cli([*argv, "--overwrite"], "e1.1", env={}) == 0
    assert Image.open(tmp_path / "taken.png").size == (200, 100)


# ---------------------------------------------------------------- inside the Editor


def recording_editor(model: str, boundary: Boundary, **settings: Any) -> Editor:
    sources = ModelSources(model, "L", "I", "E")
    return Editor.load(EditorSettings(sources=sources, device="cpu", **settings))


@pytest.mark.parametrize("model", ["e1.1", "e1-full"])
def test_editor_fills_every_unset_request_field_with_the_models_default(model: str, boundary: Boundary) -> None:
    """The web UI and library callers leave fields unset (None); the pipeline must get the model's defaults."""
    d = MODELS[model].defaults
    result = recording_editor(model, boundary).edit(EditRequest(stripes(), "  make it blue "))
    call = boundary.calls[-1]
    assert (call["prompt"], call["negative_prompt"]) == ("make it blue", d.negative)
    assert (call["num_inference_steps"], call["guidance_scale"], call["image_guidance_scale"]) == (
        d.steps, d.guidance, d.image_guidance)
    assert (call["refine_strength"], call["clip_cfg_norm"]) == (d.refine_strength, d.clip_cfg_norm)
    assert boundary.generators[-1] == (d.seed, "device")
    assert (result.metadata["negative"], result.metadata["seed"]) == (d.negative, d.seed)
    stretched = resize_for_e1_1(stripes()) if model == "e1.1" else resize_for_e1_full(stripes())
    assert call["image"].size == stretched.size and result.metadata["keep_aspect"] is False  # keep-aspect is opt-in


@pytest.mark.parametrize("model", ["e1.1", "e1-full"])
def test_the_step_cache_a_request_asks_for_reaches_the_pipeline_with_its_defaults(
    model: str, boundary: Boundary
) -> None:
    """Unset cache fields mean: off, or the documented threshold and warm-up with no max-skip limit."""
    from hidream_edit.step_cache import DEFAULT_THRESHOLD, DEFAULT_WARMUP, CacheSettings

    editor = recording_editor(model, boundary)
    asked = {
        (): CacheSettings("off", DEFAULT_THRESHOLD, DEFAULT_WARMUP, 0),
        (("cache", "dbcache"),): CacheSettings("dbcache", DEFAULT_THRESHOLD, DEFAULT_WARMUP, 0),
        (("cache", "taylorseer"), ("cache_threshold", 0.2), ("cache_warmup", 3), ("cache_max_skip", 2)):
            CacheSettings("taylorseer", 0.2, 3, 2),
    }
    for fields, expected in asked.items():
        request = EditRequest(stripes(), "x", steps=1, refine_strength=0.0, **dict(fields))
        editor.edit(request)
        assert boundary.calls[-1]["cache"] == expected == request.cache_settings, fields


@pytest.mark.parametrize("setting", [{"refine_weights": "base"}, {"fuse_lora": True}])
def test_a_library_load_split_over_ranks_refuses_what_a_split_cannot_hold_before_loading(
    setting: dict[str, Any], boundary: Boundary
) -> None:
    """The web UI loads through Editor.load, not the CLI: it must refuse these before reading any weights."""
    from types import SimpleNamespace

    split = SimpleNamespace(size=2, mesh=None)
    settings = EditorSettings(ModelSources("e1-full", "L", "I", "E"), device="cpu", **setting)
    with pytest.raises(UserError, match="^refining with the base weights|^--fuse-lora cannot merge"):
        Editor.load(settings, tensor=split)  # type: ignore[arg-type]
    assert boundary.loads == []


def test_an_edit_records_the_time_it_took_and_reads_memory_without_logging(
    boundary: Boundary, caplog: pytest.LogCaptureFixture
) -> None:
    """The front ends print their own memory summary; the edit's total is its own duration, not a clock value."""
    import logging
    import time

    editor = recording_editor("e1.1", boundary)
    started = time.perf_counter()
    with caplog.at_level(logging.DEBUG, logger="device_utils"):
        metadata = editor.edit(EditRequest(stripes(), "x", steps=1)).metadata
    assert 0 <= metadata["timings"]["total_s"] <= time.perf_counter() - started + 1e-4
    assert not [record for record in caplog.records if record.getMessage().startswith("memory: ")]


@pytest.mark.parametrize("flag,value", [("--offload", "disk"), ("--attention", "flash"), ("--rng", "gpu"),
                                        ("--refine-weights", "i1"), ("--dtype", "fp8")])
def test_unknown_choices_are_refused_before_loading(
    flag: str, value: str, boundary: Boundary, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "source.png"
    stripes().save(source)
    argv = ["--image", str(source), "--instruction", "x", "--output", str(tmp_path / "o.png"), *PATH_FLAGS["e1.1"],
            flag, value]
    with pytest.raises(SystemExit) as exit_:
        run_edit_cli(argv, "e1.1", env={})
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {flag}: invalid choice: '{value}'" in err and err.count("\n") == 1
    assert boundary.loads == []


def test_editor_rng_cpu_draws_on_the_cpu(boundary: Boundary) -> None:
    for rng in ("device", "cpu"):
        result = recording_editor("e1.1", boundary, rng=rng).edit(EditRequest(stripes(), "x", seed=5, steps=1))
        assert boundary.generators[-1] == (5, rng)
        assert result.metadata["rng"] == rng and result.metadata["generator_device"] == "cpu"
    with pytest.raises(UserError, match="unknown rng placement 'gpu'; use device or cpu"):
        recording_editor("e1.1", boundary, rng="gpu")


def test_editor_keep_aspect_sets_the_model_input(boundary: Boundary) -> None:
    editor = recording_editor("e1-full", boundary)
    for keep_aspect in (False, True):
        result = editor.edit(EditRequest(stripes(), "x", steps=1, refine_strength=0.0, keep_aspect=keep_aspect))
        expected = resize_for_e1_full(stripes(), keep_aspect=keep_aspect)
        assert np.array_equal(np.asarray(boundary.calls[-1]["image"]), np.asarray(expected))
        assert result.image.size == (200, 100) and result.metadata["keep_aspect"] is keep_aspect
    e1_1 = recording_editor("e1.1", boundary)  # E1.1 has its own resize rule; keep_aspect does not apply
    e1_1.edit(EditRequest(stripes(), "x", steps=1, keep_aspect=True))
    assert np.array_equal(np.asarray(boundary.calls[-1]["image"]), np.asarray(resize_for_e1_1(stripes())))


def test_editor_reports_progress_and_stops_between_steps(boundary: Boundary) -> None:
    from hidream_edit.editor import EditCancelled

    editor = recording_editor("e1.1", boundary)
    progress: list[tuple[int, int]] = []
    editor.edit(EditRequest(stripes(), "x", steps=3), on_step=lambda done, total: progress.append((done, total)))
    assert progress == [(1, 3), (2, 3), (3, 3)]
    asked: list[int] = []
    with pytest.raises(EditCancelled, match="^stopped after step 2 of 3$"):
        editor.edit(EditRequest(stripes(), "x", steps=3), should_stop=lambda: asked.append(1) or len(asked) == 2)
    assert len(asked) == 2 and editor.edit(EditRequest(stripes(), "x", steps=2)).metadata["steps"] == 2


@pytest.fixture()
def group_of_one() -> Iterator[GuidanceGroup]:
    """A guidance group of this process alone, in a one-rank gloo world: the real gather, no other process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield form_guidance_group(0, 1, 1, torch.device("cpu"), 30.0)
    finally:
        dist.destroy_process_group()


def test_each_edit_gives_the_guidance_group_its_stop_and_its_own_timings(
    boundary: Boundary, group_of_one: GuidanceGroup
) -> None:
    """Under --cfg-parallel the group, not the step callback, stops the ranks: it must get each edit's stop."""
    editor = recording_editor("e1.1", boundary)
    editor.use_guidance_group(group_of_one)
    asked: list[int] = []
    with pytest.raises(EditCancelled, match="^stopped at step 2$"):
        editor.edit(EditRequest(stripes(), "x", steps=3), should_stop=lambda: asked.append(1) or len(asked) == 2)
    assert len(asked) == 2
    metadata = editor.edit(EditRequest(stripes(), "x", steps=2)).metadata  # the old stop is not asked again
    assert len(asked) == 2
    (rank,) = metadata["timings"]["cfg_parallel"]["ranks"]
    assert [step["branches"] for step in rank["steps"]] == [[0, 3], [0, 3]]  # this edit's two steps only


def test_the_device_peak_an_edit_records_is_its_own_not_the_loads(boundary: Boundary) -> None:
    """Loading peaks far above an edit; a peak kept from it would make every edit look as large as the load."""
    gib = 1 << 30
    card = {"in_use": 0, "peak": 0}  # a card's allocator: bytes in use now and the peak since the last reset

    def use(size: int) -> None:
        card.update(in_use=size, peak=max(card["peak"], size))

    dm = DeviceManager("cpu", "fp32")
    real_stats = dm.memory_stats
    dm.reset_peak_memory_stats = lambda: card.update(peak=card["in_use"])  # type: ignore[method-assign]
    dm.memory_stats = lambda log=True: replace(real_stats(log=False), peak=card["peak"])  # type: ignore[method-assign]
    editor = Editor.load(EditorSettings(ModelSources("e1.1", "L", "I", "E")), dm)
    use(10 * gib)  # the load's peak...
    use(2 * gib)  # ...and what stays resident
    result = editor.edit(EditRequest(stripes(), "x", steps=2), on_step=lambda done, total: use((2 + done) * gib))
    assert result.metadata["memory"]["peak"] == 4 * gib


def test_the_edit_time_includes_work_still_queued_on_the_device(boundary: Boundary) -> None:
    """An accelerator returns before its queued kernels finish: the total is read after waiting for them."""
    import time

    dm = DeviceManager("cpu", "fp32")
    dm.synchronize = lambda: time.sleep(0.05)  # type: ignore[method-assign]  # the queue drains in 50 ms
    editor = Editor.load(EditorSettings(ModelSources("e1.1", "L", "I", "E")), dm)
    assert editor.edit(EditRequest(stripes(), "x", steps=1)).metadata["timings"]["total_s"] >= 0.05


def test_a_leader_announces_each_edit_with_the_resolved_request_and_the_model_input(boundary: Boundary) -> None:
    """The web UI's waiting members run what is announced: the same filled-in request and the same input."""
    editor = recording_editor("e1-full", boundary)
    announced: list[tuple[EditRequest, Image.Image, tuple[int, int]]] = []
    editor.announce_edits(lambda request, model_input, size: announced.append((request, model_input, size)))
    editor.edit(EditRequest(stripes(), "  make it blue ", steps=1, refine_strength=0.0))
    ((request, model_input, size),) = announced
    defaults = MODELS["e1-full"].defaults
    assert (request.instruction, request.seed, request.negative) == ("make it blue", defaults.seed, defaults.negative)
    assert model_input is boundary.calls[-1]["image"] and size == (200, 100)


@pytest.mark.parametrize("kind", ["guidance", "tensor"])
@pytest.mark.parametrize("leader", [True, False])
def test_only_the_rank_that_saves_has_the_image_decoded(kind: str, leader: bool, boundary: Boundary) -> None:
    """A guidance group's other ranks and a tensor-parallel group's later ranks only help denoise: decoding
    there would cost a VAE pass and its memory for an image nobody saves."""
    import contextlib
    from types import SimpleNamespace

    editor = recording_editor("e1.1", boundary)
    if kind == "guidance":
        editor.guidance_group = SimpleNamespace(  # type: ignore[assignment]
            leader=leader, begin_edit=lambda should_stop: None, finish_edit=lambda: {})
    else:
        editor.tensor_group = SimpleNamespace(  # type: ignore[assignment]
            leader=leader, size=2, ranks=[0, 1], collectives=contextlib.nullcontext,
            agreed_stop=lambda should_stop, device: should_stop)
    result = editor.edit(EditRequest(stripes(), "x", steps=1))
    assert boundary.calls[-1]["output_type"] == ("pil" if leader else "latent")
    assert editor.writes_outputs is leader and (result.image is not None) is leader


def test_rewrite_instruction_flags_reach_the_vlm_client(
    boundary: Boundary, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hidream_edit import instructions

    asked: list[tuple[Any, ...]] = []

    def refine(image: Image.Image, instruction: str, settings: Any) -> Any:
        asked.append((image.size, instruction, settings))
        if settings.model == "broken":
            raise instructions.InstructionRewriteError("the VLM said no")
        return instructions.RewrittenInstruction("a", "b", "c", "Editing Instruction: b. Target Image Description: c")

    monkeypatch.setattr(instructions, "rewrite_instruction", refine)
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")  # the CLI reads the key from the env it is given
    source = tmp_path / "source.png"
    stripes().save(source)

    def argv(vlm_model: str, output: str, *extra: str) -> list[str]:
        return ["--image", str(source), "--instruction", "make it blue", *PATH_FLAGS["e1-full"], "--output",
                str(tmp_path / output), "--rewrite-instruction", "--vlm-url", "http://vlm/v1", "--vlm-model", vlm_model,
                "--vlm-timeout", "7.5", *extra]

    assert run_edit_cli(argv("m", "a.png"), "e1-full", env={"OPENAI_API_KEY": "k"}) == 0
    size, instruction, settings = asked[-1]
    assert (size, instruction) == ((200, 100), "make it blue")
    assert (settings.url, settings.model, settings.api_key, settings.timeout_s) == ("http://vlm/v1", "m", "k", 7.5)
    assert boundary.calls[-1]["prompt"] == "Editing Instruction: b. Target Image Description: c"
    assert run_edit_cli(argv("broken", "b.png"), "e1-full", env={}) == 2 and len(boundary.calls) == 1
    assert run_edit_cli(argv("broken", "c.png", "--rewrite-fallback"), "e1-full", env={}) == 0
    assert boundary.calls[-1]["prompt"] == "make it blue" and asked[-1][2].api_key is None


def test_editor_refuses_a_refine_stage_with_a_fused_lora(boundary: Boundary) -> None:
    editor = recording_editor("e1-full", boundary, fuse_lora=True)
    assert boundary.loads[-1]["fuse_lora"] is True
    with pytest.raises(UserError, match="a fused LoRA cannot run the refine stage"):
        editor.edit(EditRequest(stripes(), "x", steps=1, refine_strength=0.3))
    assert boundary.calls == []
    editor.edit(EditRequest(stripes(), "x", steps=1, refine_strength=0.0))
    assert boundary.calls[-1]["refine_strength"] == 0.0


@pytest.mark.parametrize("setting,named", [
    ({"device": "tpu", "device_origin": "PREFERRED_DEVICE"}, "PREFERRED_DEVICE=tpu"),
    ({"dtype": "fp7", "dtype_origin": "--dtype"}, "--dtype=fp7"),
])
def test_a_bad_device_or_dtype_is_refused_naming_where_it_was_set(
    setting: dict[str, str], named: str, boundary: Boundary
) -> None:
    """The web UI and the doctor build EditorSettings themselves: the message must name their flag or variable."""
    from device_utils import DeviceError

    with pytest.raises(DeviceError, match=re.escape(named)):
        Editor.load(EditorSettings(ModelSources("e1.1", "L", "I", "E"), **{"device": "cpu", **setting}))
    assert boundary.loads == []


def test_editor_passes_loading_settings_to_the_loader(boundary: Boundary) -> None:
    recording_editor("e1.1", boundary, dtype="fp16", attention="math", offload="model", refine_weights="base",
                     vae_tiling=True)
    load = boundary.loads[-1]
    assert (load["dtype"], load["attention"], load["offload"]) == (torch.float16, "math", "model")
    assert (load["refine_weights"], load["vae_tiling"], load["fuse_lora"]) == ("base", True, False)


# ---------------------------------------------------------------- end to end through the real loader


def test_fuse_lora_merges_the_adapter_at_load(tiny_env: dict[str, str]) -> None:
    sources = resolve_model_sources(MODELS["e1-full"], tiny=True, env=tiny_env)
    for fuse in (False, True):
        editor = Editor.load(EditorSettings(sources=sources, device="cpu", fuse_lora=fuse))
        layers = [m for m in editor.loaded.pipe.transformer.modules() if hasattr(m, "merged") and hasattr(m, "lora_A")]
        assert layers and {layer.merged for layer in layers} == {fuse} and editor.loaded.lora_fused is fuse


def test_the_loader_refuses_to_fuse_a_lora_split_over_ranks() -> None:
    """A library caller passing a tensor-parallel mesh gets the one-line refusal before any file is looked for:
    PEFT's merge would fail on the slices only after minutes of loading."""
    from hidream_edit.models import load_pipeline

    class TwoRanks:
        def size(self) -> int:
            return 2

    with pytest.raises(UserError, match="^--fuse-lora cannot merge a LoRA that a tensor-parallel split holds"):
        load_pipeline(ModelSources("e1-full", "L", "I", "F"), DeviceManager("cpu", "fp32"), fuse_lora=True,
                      tensor_mesh=TwoRanks())


def test_e1_full_loads_from_the_folder_its_download_makes(tiny_checkpoints: Any) -> None:
    """The folder `hf download --local-dir` makes loads its LoRA file; a library call without settings loads
    untiled, and the result says how the VAE runs and what the memory plan was (the metadata records them)."""
    from device_utils import load_safetensors
    from hidream_edit.models import load_pipeline

    sources = ModelSources("e1-full", str(tiny_checkpoints.llama), str(tiny_checkpoints.i1),
                           str(tiny_checkpoints.e1_full))
    loaded = load_pipeline(sources, DeviceManager("cpu", "fp32"))
    lora = load_safetensors(tiny_checkpoints.e1_full_lora)
    transformer = loaded.pipe.transformer
    assert lora and all(torch.equal(transformer.get_parameter(key).detach(), value) for key, value in lora.items())
    assert loaded.pipe.vae.use_tiling is False and "VAE tiling" not in loaded.memory_actions
    assert loaded.vae_dtype == "fp32" and loaded.plan is not None and loaded.plan.placement == "none"


@pytest.mark.parametrize("model", ["e1.1", "e1-full"])
def test_flags_end_to_end_through_the_real_loader(
    model: str, tiny_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real tiny model loaded with every loading flag; only the denoising call itself is recorded."""
    loaded: list[Editor] = []
    calls: list[dict[str, Any]] = []
    real_load = Editor.load.__func__  # type: ignore[attr-defined]

    def load(cls: type[Editor], settings: EditorSettings, dm: Any = None, tensor: Any = None) -> Editor:
        loaded.append(real_load(cls, settings, dm, tensor))
        return loaded[-1]

    def call(self: HiDreamImageEditingPipeline, **kwargs: Any) -> EditOutput:
        calls.append(kwargs)
        return RecordingPipe(Boundary())(**kwargs)

    monkeypatch.setattr(Editor, "load", classmethod(load))
    monkeypatch.setattr(HiDreamImageEditingPipeline, "__call__", call)
    source = tmp_path / "source.png"
    stripes().save(source)
    output = tmp_path / "out.png"
    flags = ["--tiny", "--image", str(source), "--instruction", "x", "--output", str(output), "--attention", "math",
             "--offload", "model", "--vae-tiling", "--rng", "cpu", "--no-clip-cfg-norm", "--refine-weights", "base",
             "--steps", "1"]
    if model == "e1-full":
        flags += ["--keep-aspect"]
    assert run_edit_cli(flags, model, env=tiny_env) == 0
    (editor,) = loaded
    pipe = editor.loaded.pipe
    processors = [m.processor for m in pipe.transformer.modules() if type(m).__name__ == "HiDreamAttention"]
    assert processors and {p.backend for p in processors} == {"math"}
    assert pipe.vae.use_tiling is True and editor.loaded.refine_switch.name == "base"
    assert type(pipe.text_encoder_4).__name__ == "LlamaModel" and pipe.text_encoder_4.dtype == torch.float32
    assert pipe.text_encoder_4.config._attn_implementation == "eager"  # docs/ARCHITECTURE.md 3.5
    assert pipe.tokenizer_4 is not None and pipe.tokenizer_4.name_or_path == editor.settings.sources.llama
    assert pipe._progress_bar_config == {"disable": True}  # the front ends draw their own progress
    check_base_refine_weights(editor)
    metadata = json.loads(Path(f"{output}.json").read_text())
    assert metadata["memory_actions"][0] == "model CPU offload onto cpu"  # placements run on the CPU too
    assert metadata["memory_actions"][-1] == "VAE tiling"
    timings = metadata["timings"]
    seconds = [timings[key] for key in ("load_s", "encode_s", "decode_s", "total_s")] + timings["step_s"]
    assert len(seconds) == 5 and all(value == round(value, 4) for value in seconds)  # to 0.1 ms, as README_NPU says
    assert (metadata["attention"], metadata["offload"], metadata["rng"]) == ("math", "model", "cpu")
    (call_kwargs,) = calls
    assert call_kwargs["clip_cfg_norm"] is False and call_kwargs["refine_switch"] is editor.loaded.refine_switch
    expected = resize_for_e1_1(stripes()) if model == "e1.1" else resize_for_e1_full(stripes(), keep_aspect=True)
    assert np.array_equal(np.asarray(call_kwargs["image"]), np.asarray(expected))


def check_base_refine_weights(editor: Editor) -> None:
    """--refine-weights base: the refine switch puts I1's values in, and the edit values back after."""
    from device_utils import load_safetensors

    switch = editor.loaded.refine_switch
    transformer = editor.loaded.pipe.transformer
    sources = editor.settings.sources
    # keyed as the transformer names them: E1-Full's LoRA layers hold I1's tensors as `.base_layer.`
    files = load_safetensors(Path(sources.i1) / "transformer")
    i1 = {key: files[key.replace(".base_layer.", ".")] for key in transformer.state_dict() if ".lora_" not in key}
    if sources.model == "e1.1":
        swapped, edit_values = switch.stash, load_safetensors(Path(sources.edit) / "transformer")
    else:
        swapped, edit_values = switch.swap.stash, load_safetensors(sources.edit)
    keys = sorted(swapped)
    assert keys and all(not torch.equal(i1[key], edit_values[key]) for key in keys)
    switch.use_refine()
    try:
        assert all(torch.equal(transformer.get_parameter(key).detach(), i1[key]) for key in keys)
    finally:
        switch.use_edit()
    assert all(torch.equal(transformer.get_parameter(key).detach(), edit_values[key]) for key in keys)
