"""Step caching (--cache): what it skips, that it changes nothing at threshold 0, that every edit starts clean,
and that a guidance group decides as one process does.

On the tiny random set the first block's residual changes 40-50% between steps, so realistic thresholds cache
nothing: tests force caching with a large threshold, or pick one between the tiny model's measured differences.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as torch_mp
from PIL import Image
from test_batch_distributed import free_port

from hidream_edit.editor import EditRequest
from hidream_edit.errors import EditCancelled, GuidanceGroupError, UserError
from hidream_edit.step_cache import CacheSettings, StepCache

STEPS = 4  # refine strength 0.5: steps 0-1 edit, 2-3 refine
BASE: dict[str, Any] = {"instruction": "make the sky purple", "steps": STEPS, "refine_strength": 0.5, "seed": 1}
FORCED: dict[str, Any] = {"cache": "dbcache", "cache_threshold": 10.0, "cache_warmup": 1}
# Between the tiny set's differences at steps 1 (0.436) and 3 (0.487) of BASE: one step cached, one computed.
MIDDLE: dict[str, Any] = {"cache": "dbcache", "cache_threshold": 0.46, "cache_warmup": 1}
BLOCKS = 2  # the tiny transformer: one double-stream and one single-stream block


@pytest.fixture(scope="module")
def source() -> Image.Image:
    return Image.fromarray(np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint8))


def _edit(editor: Any, source: Image.Image, **fields: Any) -> tuple[np.ndarray, dict[str, Any]]:
    result = editor.edit(EditRequest(image=source, **{**BASE, **fields}))
    return np.asarray(result.image), result.metadata


@pytest.fixture(scope="module")
def uncached(e1_1_editor: Any, source: Image.Image) -> tuple[np.ndarray, dict[str, Any]]:
    return _edit(e1_1_editor, source)


@pytest.fixture(scope="module")
def forced(e1_1_editor: Any, source: Image.Image) -> tuple[np.ndarray, dict[str, Any], int]:
    """A forced edit, with the attention calls of the transformer's blocks counted independently."""
    calls: list[int] = []
    transformer = e1_1_editor.loaded.pipe.transformer
    wrappers = [*transformer.double_stream_blocks, *transformer.single_stream_blocks]
    handles = [wrapper.block.attn1.register_forward_hook(lambda *_: calls.append(1)) for wrapper in wrappers]
    try:
        pixels, metadata = _edit(e1_1_editor, source, **FORCED)
    finally:
        for handle in handles:
            handle.remove()
    return pixels, metadata, len(calls)


# --- the policy alone, on stand-in blocks ------------------------------------------------------------------


class FakeBlocks:
    """Three blocks in a row that add 1, 10 and 100 times (step + 1): hooks see real tensors, nothing else."""

    def __init__(self, settings: CacheSettings, sums: list[torch.Tensor] | None = None) -> None:
        self.cache = StepCache()
        self.ran: list[str] = []
        sum_across = None
        if sums is not None:
            def sum_across(values: torch.Tensor, where: str) -> torch.Tensor:
                sums.append(values)
                return values
        self.cache.begin_edit(settings, sum_across)

    def step(self, stage: str, step: int) -> torch.Tensor:
        self.cache.begin_step(stage, step, f"step {step}")
        hidden = torch.zeros(1, 2, 1)
        blocks = (("head", 1.0, self.cache.head_forward), ("middle", 10.0, self.cache.middle_forward),
                  ("tail", 100.0, self.cache.tail_forward))
        for name, scale, forward in blocks:
            def block(hidden_states: torch.Tensor, name: str = name, scale: float = scale) -> torch.Tensor:
                self.ran.append(name)
                return hidden_states + scale * (step + 1)

            hidden = forward(block, (), {"hidden_states": hidden})
        return hidden


def test_a_cached_step_adds_the_last_computed_residual_and_taylorseer_extrapolates_it() -> None:
    db = FakeBlocks(CacheSettings("dbcache", threshold=1e6, warmup=2))
    taylor = FakeBlocks(CacheSettings("taylorseer", threshold=1e6, warmup=2))
    for step in range(3):
        db_out, taylor_out = db.step("edit", step), taylor.step("edit", step)
    # step 2 (0-based) is cached: the first block ran (adds 3), the others' 110 * (step + 1) is estimated
    assert db.ran[-1] == taylor.ran[-1] == "head"
    assert float(db_out[0, 0, 0]) == 3 + 110 * 2  # the residual of the last computed step, as it was
    assert float(taylor_out[0, 0, 0]) == 3 + 110 * 3  # 220 + (220 - 110) per step: the true value here
    assert db.cache.record()["per_stage"]["edit"]["cached"] == [2]


def test_max_skip_caps_consecutive_cached_steps_and_each_stage_starts_computed() -> None:
    blocks = FakeBlocks(CacheSettings("dbcache", threshold=1e6, warmup=0, max_skip=1))
    for step in range(5):
        blocks.step("edit", step)
    for step in range(5, 7):
        blocks.step("refine", step)
    record = blocks.cache.record()
    assert record["per_stage"]["edit"]["cached"] == [1, 3]  # never two in a row
    assert record["per_stage"]["refine"]["cached"] == [6]  # its first step computed: no residual from the edit stage
    assert (record["steps"], record["cached_steps"], record["computed_steps"]) == (7, 3, 4)
    assert record["block_forwards"] == 3 * 4 + 1 * 3 == blocks.ran.count("head") + blocks.ran.count("middle") * 2


def test_the_decision_sums_numerator_and_denominator_before_dividing() -> None:
    sums: list[torch.Tensor] = []
    blocks = FakeBlocks(CacheSettings("dbcache", threshold=0.5, warmup=1), sums)
    blocks.step("edit", 0)
    blocks.step("edit", 1)
    (sent,) = sums  # only a step after the warm-up asks: [sum |r - r_prev|, sum |r_prev|, failed ranks]
    assert sent.tolist() == [2.0, 2.0, 0.0]  # first block residual 1 -> 2 on two tokens
    assert blocks.cache.record()["per_stage"]["edit"]["diffs"] == {"1": 1.0}


def test_a_rank_without_a_share_joins_the_sum_and_decides_the_same() -> None:
    sums: list[torch.Tensor] = []

    def sum_across(values: torch.Tensor, where: str) -> torch.Tensor:
        sums.append(values)
        return values + torch.tensor([1.0, 4.0, 0.0], dtype=values.dtype)  # another rank's share

    idle = StepCache()
    idle.begin_edit(CacheSettings("dbcache", threshold=0.5, warmup=1), sum_across)
    idle.begin_step("edit", 0, "step 1")
    idle.settle(failed=False)  # warm-up: no sum
    idle.begin_step("edit", 1, "step 2")
    idle.settle(failed=False)
    assert [values.tolist() for values in sums] == [[0.0, 0.0, 0.0]]
    assert idle.record()["per_stage"]["edit"]["cached"] == [1]  # 1 / 4 below 0.5


@pytest.mark.parametrize(
    "values,message",
    [
        (("sometimes", 0.1, 1, 0), "unknown step cache 'sometimes'; use one of: off, dbcache, taylorseer"),
        (("dbcache", -0.1, 1, 0), "the cache threshold must be a number from 0 to 1e+06, got -0.1"),
        (("dbcache", float("nan"), 1, 0), "the cache threshold must be a number from 0 to 1e+06, got nan"),
        (("dbcache", 0.1, -1, 0), "the cache warm-up must be a whole number of steps from 0 to 1000, got -1"),
        (("dbcache", 0.1, 1, -2), "the cache max-skip must be a whole number of steps from 0 to 1000, got -2"),
    ],
)
def test_bad_cache_values_in_a_request_are_refused_in_words(values: tuple[Any, ...], message: str) -> None:
    from hidream_edit.editor import resolve_request
    from hidream_edit.spec import MODELS

    mode, threshold, warmup, max_skip = values
    request = EditRequest(image="x.png", instruction="x", cache=mode, cache_threshold=threshold, cache_warmup=warmup,
                          cache_max_skip=max_skip)
    with pytest.raises(UserError) as error:
        resolve_request(request, MODELS["e1.1"])
    assert str(error.value) == message


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--cache", "sometimes"], "argument --cache: invalid choice: 'sometimes'"),
        (["--cache-threshold", "-1"], "--cache-threshold must be from 0 to 1e+06, got '-1'"),
        (["--cache-threshold", "nan"], "--cache-threshold must be from 0 to 1e+06, got 'nan'"),
        (["--cache-warmup", "-1"], "--cache-warmup must be from 0 to 1000 steps, got '-1'"),
        (["--cache-max-skip", "-1"], "--cache-max-skip must be from 0 to 1000 steps, got '-1'"),
        (["--cache-max-skip", "two"], "--cache-max-skip must be a whole number of steps, got 'two'"),
    ],
)
def test_bad_cache_flags_are_one_line_before_loading(
    flags: list[str], named: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hidream_edit import cli
    from hidream_edit.web.command_line import parse_command_line

    monkeypatch.setattr(cli.Editor, "load", lambda *a, **k: pytest.fail("loaded a model"))
    edit = ["--tiny", "--image", "in.png", "--instruction", "x", "--output", str(tmp_path / "o.png")]
    for run in (lambda: cli.run_edit_cli([*edit, *flags], "e1.1"), lambda: parse_command_line(flags, {})):
        with pytest.raises(SystemExit) as exited:
            run()
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and named in err, err


def test_resume_reruns_an_output_made_with_other_cache_settings(tmp_path: Path) -> None:
    from hidream_edit.batch import BatchItem, RunContext, expected_metadata, file_sha256, metadata_path, output_state
    from hidream_edit.editor import resolve_request
    from hidream_edit.spec import MODELS

    image, output = tmp_path / "in.png", tmp_path / "out.png"
    Image.new("RGB", (8, 8)).save(image)
    Image.new("RGB", (8, 8)).save(output)
    context = RunContext("e1.1", {}, "device", "edit", False, "fp32")

    def item(**cache: Any) -> BatchItem:
        return BatchItem(0, "in.png", resolve_request(EditRequest(image=image, instruction="x", **cache),
                                                      MODELS["e1.1"]), output)

    saved = expected_metadata(item(), context, file_sha256(image))
    saved["cache"] = {**saved["cache"], "steps": 28, "cached_steps": 0, "per_stage": {}}  # as an edit records it
    saved["output_sha256"] = file_sha256(output)
    metadata_path(output).write_text(json.dumps(saved))
    assert output_state(item(), context).kind == "done"
    state = output_state(item(**FORCED), context)
    assert state.kind == "different" and state.reason.startswith('cache was {"mode": "off"')
    del saved["cache"]  # made before step caching existed: uncached
    metadata_path(output).write_text(json.dumps(saved))
    assert output_state(item(), context).kind == "done"


# --- real edits on the tiny set -------------------------------------------------------------------------


@pytest.mark.parametrize("warmup", [STEPS, 1])
def test_threshold_zero_gives_the_pixels_of_the_cache_off(
    warmup: int, e1_1_editor: Any, source: Image.Image, uncached: tuple[np.ndarray, dict[str, Any]]
) -> None:
    pixels, metadata = _edit(e1_1_editor, source, cache="dbcache", cache_threshold=0.0, cache_warmup=warmup)
    assert np.array_equal(pixels, uncached[0])
    assert metadata["cache"]["cached_steps"] == 0 and metadata["cache"]["block_forwards"] == STEPS * BLOCKS
    decided = [step for stage in metadata["cache"]["per_stage"].values() for step in stage["diffs"]]
    assert decided == ([] if warmup == STEPS else ["1", "3"])  # after the warm-up every step measures its change


def test_a_forced_cache_skips_blocks_in_each_stage_and_records_it(
    forced: tuple[np.ndarray, dict[str, Any], int], uncached: tuple[np.ndarray, dict[str, Any]]
) -> None:
    pixels, metadata, attention_calls = forced
    cache = metadata["cache"]
    assert {key: cache[key] for key in ("mode", "threshold", "warmup", "max_skip")} == {
        "mode": "dbcache", "threshold": 10.0, "warmup": 1, "max_skip": 0}
    assert cache["per_stage"]["edit"]["cached"] == [1] and cache["per_stage"]["refine"]["cached"] == [3]
    assert (cache["steps"], cache["computed_steps"], cache["cached_steps"]) == (4, 2, 2)
    # steps 0 and 2 (each stage's first) ran both blocks, steps 1 and 3 the first block only
    assert attention_calls == cache["block_forwards"] == 2 * BLOCKS + 2 * 1
    assert uncached[1]["cache"]["block_forwards"] == STEPS * BLOCKS
    assert not metadata["non_finite_output"] and pixels.shape == uncached[0].shape
    assert uncached[1]["cache"] == {"mode": "off", "threshold": None, "warmup": None, "max_skip": None, "steps": 4,
                                    "computed_steps": 4, "cached_steps": 0, "block_forwards": 8, "per_stage": {
                                        "edit": {"steps": 2, "computed_steps": 2, "cached_steps": 0, "cached": [],
                                                 "block_forwards": 4, "diffs": {}},
                                        "refine": {"steps": 2, "computed_steps": 2, "cached_steps": 0, "cached": [],
                                                   "block_forwards": 4, "diffs": {}}}}


def test_every_edit_starts_clean_also_after_a_stop_or_an_error(
    e1_1_editor: Any, source: Image.Image, forced: tuple[np.ndarray, dict[str, Any], int]
) -> None:
    request = EditRequest(image=source, **BASE, **FORCED)
    done_steps: list[int] = []
    with pytest.raises(EditCancelled):  # stopped after the cached step 2, the edit stage's buffers full
        e1_1_editor.edit(request, on_step=lambda done, total: done_steps.append(done),
                         should_stop=lambda: len(done_steps) == 2)

    def fail_in_the_refine_stage(done: int, total: int) -> None:
        if done == 3:
            raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        e1_1_editor.edit(request, on_step=fail_in_the_refine_stage)
    again = e1_1_editor.edit(request)
    assert np.array_equal(np.asarray(again.image), forced[0])  # also the same as the first edit of the module
    assert again.metadata["cache"] == forced[1]["cache"]


@pytest.mark.parametrize(("offload", "attention"), [("group", "math"), ("encoders", "sdpa"), ("model", "math")])
def test_caching_skips_the_same_steps_under_every_placement_and_kernel(
    offload: str, attention: str, tiny_env: dict[str, str], source: Image.Image,
    forced: tuple[np.ndarray, dict[str, Any], int],
) -> None:
    """Offload hooks (group offload streams the blocks the cache skips) and the math kernel change nothing of
    what is cached; the pixels match the resident sdpa edit up to the kernels' rounding."""
    from hidream_edit.config import resolve_model_sources
    from hidream_edit.editor import Editor, EditorSettings
    from hidream_edit.spec import MODELS

    sources = resolve_model_sources(MODELS["e1.1"], tiny=True, env=tiny_env)
    editor = Editor.load(EditorSettings(sources=sources, device="cpu", dtype="fp32", attention=attention,
                                        offload=offload))
    pixels, metadata = _edit(editor, source, **FORCED)
    assert metadata["placement"]["name"] == offload
    record = {key: value for key, value in metadata["cache"].items() if key != "per_stage"}
    assert record == {key: value for key, value in forced[1]["cache"].items() if key != "per_stage"}
    assert np.abs(pixels.astype(int) - forced[0].astype(int)).max() <= 1


def test_caching_works_with_e1_full_lora_and_base_refine_weights(e1_full_editor: Any, source: Image.Image) -> None:
    prompt = "Editing Instruction: add a hat. Target Image Description: a cat in a hat"
    result = e1_full_editor.edit(EditRequest(image=source, **{**BASE, "instruction": prompt}, **FORCED))
    cache = result.metadata["cache"]
    assert cache["per_stage"]["edit"]["cached"] == [1] and cache["per_stage"]["refine"]["cached"] == [3]
    assert not result.metadata["non_finite_output"]


def test_the_command_line_reports_cached_steps(tiny_env: dict[str, str], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from hidream_edit.cli import run_edit_cli

    image, output = tmp_path / "in.png", tmp_path / "out.png"
    Image.new("RGB", (64, 48), "teal").save(image)
    code = run_edit_cli(["--tiny", "--image", str(image), "--instruction", "x", "--output", str(output), "--steps",
                         "2", "--refine-strength", "0", "--cache", "taylorseer", "--cache-threshold", "10",
                         "--cache-warmup", "0", "--device", "cpu"], "e1.1", env=tiny_env)
    assert code == 0
    out = capsys.readouterr().out
    assert re.search(r"2 steps [\d.]+s \([\d.]+s/step\), taylorseer cached 1 of 2 steps, decode ", out), out
    saved = json.loads(Path(f"{output}.json").read_text())["cache"]
    assert (saved["mode"], saved["cached_steps"], saved["steps"]) == ("taylorseer", 1, 2)


def test_the_web_ui_edits_with_its_cache_settings_and_shows_them(
    e1_1_editor: Any, tmp_path: Path, source: Image.Image
) -> None:
    from hidream_edit.web.service import EditParams, WebEditor, WebSettings

    web = WebEditor(e1_1_editor, WebSettings(results_dir=tmp_path, cache=CacheSettings("dbcache", 0.08, 8)))
    assert "**Step cache** dbcache (threshold 0.08, warm-up 8, no max-skip) by default" in web.device_panel()
    source.save(tmp_path / "in.png")
    params = EditParams(steps=2, seed=3, refine_strength=0.0, cache_threshold=10, cache_warmup=1)
    outcome = web.edit(tmp_path / "in.png", "make it red", params)
    assert ", dbcache cached 1 of 2 steps. Saved " in outcome.status, outcome.status
    assert "dbcache cached 1 of 2 steps" in web.device_panel()
    refused = web.edit(tmp_path / "in.png", "make it red", EditParams(steps=2, cache_warmup=-1))
    assert refused.status == "Error: the cache warm-up must be a whole number of steps from 0 to 1000, got -1"


# --- guidance groups ------------------------------------------------------------------------------------

# name -> request fields; each group size runs all of them in one launch
GROUP_EDITS: dict[str, dict[str, Any]] = {
    "forced": FORCED,
    "middle": MIDDLE,
    "guidance off, forced": {**FORCED, "guidance": 1.0},
}


def _group_worker(rank: int, size: int, port: int, tiny_root: str, image: str, result_file: str) -> None:
    """Every GROUP_EDITS edit in a group of `size`, then an edit in which rank 1 fails before it decides."""
    from test_guidance_parallel import _editors, _join

    torch.set_num_threads(1)
    editor = _editors(tiny_root, ("e1.1",))["e1.1"]
    group = _join(rank, size, port, 120.0)
    editor.use_guidance_group(group.guidance)
    outcome: dict[str, Any] = {}
    try:
        for name, fields in GROUP_EDITS.items():
            result = editor.edit(EditRequest(image=image, **{**BASE, **fields}))
            outcome[name] = (None if result.image is None else np.asarray(result.image), result.metadata["cache"])
        head = editor.loaded.pipe.transformer.double_stream_blocks[0].block
        if rank == 1:  # the first block of step 2 (a decision step) raises before the decision's sum
            original, calls = head.forward, []

            def failing(*args: Any, **kwargs: Any) -> Any:
                calls.append(1)
                if len(calls) == 2:
                    raise RuntimeError("injected failure")
                return original(*args, **kwargs)

            head.forward = failing
        try:
            editor.edit(EditRequest(image=image, **{**BASE, **FORCED}))
            outcome["failure"] = "finished"
        except GuidanceGroupError as exc:
            outcome["failure"] = str(exc)
        Path(f"{result_file}.{rank}").write_bytes(pickle.dumps(outcome))
    finally:
        group.close()


@pytest.fixture(scope="module")
def one_process(e1_1_editor: Any, source_path: Path) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """The reference: each GROUP_EDITS edit's pixels and cache record in this process."""
    edits = {name: _edit(e1_1_editor, Image.open(source_path), **fields) for name, fields in GROUP_EDITS.items()}
    return {name: (pixels, metadata["cache"]) for name, (pixels, metadata) in edits.items()}


@pytest.fixture(scope="module")
def source_path(source: Image.Image, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("source") / "source.png"
    source.save(path)
    return path


@pytest.mark.parametrize("size", [2, 3])
def test_a_guidance_group_caches_the_steps_one_process_caches(
    size: int, one_process: dict[str, tuple[np.ndarray, dict[str, Any]]], tiny_checkpoints: Any, source_path: Path,
    tmp_path: Path,
) -> None:
    middle = one_process["middle"][1]["per_stage"]
    assert middle["edit"]["cached"] == [1] and middle["refine"]["cached"] == []  # the threshold splits the steps
    result_file = tmp_path / "group.pkl"
    torch_mp.spawn(_group_worker, args=(size, free_port(), str(tiny_checkpoints.root), str(source_path),
                                        str(result_file)), nprocs=size)
    ranks = [pickle.loads(Path(f"{result_file}.{rank}").read_bytes()) for rank in range(size)]
    for name, (reference_pixels, reference_cache) in one_process.items():
        pixels, cache = ranks[0][name]
        assert np.abs(pixels.astype(int) - reference_pixels.astype(int)).max() <= 1, name
        for rank in ranks:
            assert rank[name][0] is None or rank is ranks[0]  # only the leader decodes
            stages = rank[name][1]["per_stage"]
            assert {stage: stages[stage]["cached"] for stage in stages} == {
                stage: reference_cache["per_stage"][stage]["cached"] for stage in reference_cache["per_stage"]}, name
        assert cache["block_forwards"] == reference_cache["block_forwards"], name  # the leader always has a share
    assert ranks[1]["failure"].startswith("rank 1 failed at denoising step 2 of 4: injected failure")
    for rank in (ranks[0], *ranks[2:]):
        assert rank["failure"].startswith("rank 1 of the guidance group"), rank["failure"]
