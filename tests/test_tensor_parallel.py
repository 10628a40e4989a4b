"""Tensor parallel (--tensor-parallel K) with real torch.distributed: gloo on CPU, the tiny set, one thread
per process.

A split transformer must give the edits of one process: each rank multiplies by slices of the weights and
the row-parallel outputs and the q/k norms' sums of squares are all-reduced, which adds in another order
than one process does, so pixels may differ by 1/255, never more. The tiny set has 2 heads (K = 2); K = 4
is checked on a 4-head variant of the tiny transformer (same dimensions, `attention_head_dim` 16 x 4 heads)
at the level of one forward pass. Few launches: one 2-rank and one 4-rank spawn run every scenario and
keep their results for several tests; one torchrun launch checks the command line.
"""

from __future__ import annotations

import json
import multiprocessing
import pickle
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch.multiprocessing as torch_mp
from npu_standin import REPO
from PIL import Image
from test_batch_distributed import TORCHRUN, free_port, run_env
from test_guidance_parallel import (
    EDITS,
    MEASURED,
    RUN_TIMEOUT_S,
    _clis,
    _edit_all,
    _editors,
    _stop_then_edit,
    _without_measurements,
    serve_one_edit,
)

from hidream_edit.cli import run_edit_cli
from hidream_edit.config import DistributedEnvironment
from hidream_edit.errors import UserError
from hidream_edit.placement import ENCODER_ATTRIBUTES
from hidream_edit.spec import TEXT_ENCODERS
from hidream_edit.tensor_parallel import ParallelLayout
from hidream_edit.tensor_split import BLOCK_PLAN, check_head_split

# the tiny model needs little, but the plan checks what is free now, and parallel tests share this machine
HOST_MEMORY = 64 * 2**30
# the 4-rank run: --cfg-parallel 2 --tensor-parallel 2 on these edits (guidance on: 3 branches over 2
# guidance ranks; off: one branch, the second guidance rank idle)
COMBINED_EDITS = ("e1.1 edit+refine", "e1.1 guidance off")


@pytest.mark.parametrize(
    "world,cfg,tp,single,message",
    [
        (1, 1, 2, True, "--tensor-parallel 2 runs under torchrun: torchrun --nproc-per-node 2"),
        (3, 1, 2, False, "--tensor-parallel 2 needs a number of processes that is a multiple of 2, got 3"),
        (4, 1, 2, True, "one edit needs --cfg-parallel x --tensor-parallel equal to the number of processes (4)"),
        (4, 2, 4, False, "--tensor-parallel 4 --cfg-parallel 2 needs a number of processes that is a multiple of 8"),
        (4, 4, 2, True, "--cfg-parallel must be 1, 2 or 3"),
    ],
)
def test_layouts_that_cannot_form_are_refused(world: int, cfg: int, tp: int, single: bool, message: str) -> None:
    with pytest.raises(UserError) as error:
        ParallelLayout(world, cfg, tp).check("one edit" if single else None)
    assert str(error.value).startswith(message)


def test_a_layout_is_data_parallel_replicas_of_guidance_times_tensor_groups() -> None:
    layout = ParallelLayout(12, 3, 2)
    layout.check(None)
    assert (layout.dp, layout.cfg, layout.tp, layout.group_size) == (2, 3, 2, 6)
    ParallelLayout(4, 2, 2).check("one edit")


def test_the_degree_must_divide_the_heads() -> None:
    check_head_split(20, 4)
    with pytest.raises(UserError, match=r"^--tensor-parallel 3 must divide the transformer's 20 attention heads "
                                        r"\(use one of 2, 4, 5, 10, 20\)$"):
        check_head_split(20, 3)


def test_the_plan_splits_every_projection_of_every_block() -> None:
    """Every attention projection, q/k norm and SwiGLU linear of the blocks is in the plan; nothing else."""
    from diffusers import HiDreamImageTransformer2DModel

    from hidream_edit.tensor_split import _plan_for
    from hidream_edit.tiny import TRANSFORMER_DIMS

    transformer = HiDreamImageTransformer2DModel(**TRANSFORMER_DIMS)
    plan = _plan_for(transformer)
    wanted = {name for name, _ in transformer.named_modules()
              if name.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t",
                                             "to_out_t", "w1", "w2", "w3", "q_rms_norm", "k_rms_norm",
                                             "q_rms_norm_t", "k_rms_norm_t"}}
    assert set(plan) == wanted
    experts = TRANSFORMER_DIMS["num_routed_experts"]  # "experts.*" patterns match each expert
    assert len([name for name in plan if name.startswith("double_stream_blocks.0.")]) == len(BLOCK_PLAN) + 3 * (
        experts - 1)


def test_a_degree_that_does_not_divide_the_heads_is_one_line_before_loading(
    tiny_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tiny set has 2 heads: K = 3 (under a 3-process launch) is refused from the config, no weights read."""
    source = tmp_path / "in.png"
    Image.new("RGB", (32, 32)).save(source)
    env = {**tiny_env, "WORLD_SIZE": "3", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    code = run_edit_cli(["--tiny", "--image", str(source), "--instruction", "x", "--output",
                         str(tmp_path / "out.png"), "--tensor-parallel", "3"], "e1.1", env)
    assert code == 2
    err = capsys.readouterr().err
    assert err.strip() == ("error: --tensor-parallel 3 must divide the transformer's 2 attention heads "
                           "(use one of 2)")
    assert not (tmp_path / "out.png").exists()


def test_refining_with_base_weights_is_refused_with_tensor_parallel(
    tiny_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.png"
    Image.new("RGB", (32, 32)).save(source)
    env = {**tiny_env, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    code = run_edit_cli(["--tiny", "--image", str(source), "--instruction", "x", "--output", str(tmp_path / "o.png"),
                         "--tensor-parallel", "2", "--refine-weights", "base"], "e1.1", env)
    assert code == 2
    assert capsys.readouterr().err.startswith("error: refining with the base weights swaps whole tensors")


def test_fusing_the_lora_is_refused_with_tensor_parallel(
    tiny_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.png"
    Image.new("RGB", (32, 32)).save(source)
    env = {**tiny_env, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    code = run_edit_cli(["--tiny", "--image", str(source), "--instruction", "x", "--output", str(tmp_path / "o.png"),
                         "--tensor-parallel", "2", "--fuse-lora", "--refine-strength", "0"], "e1-full", env)
    assert code == 2
    assert capsys.readouterr().err == ("error: --fuse-lora cannot merge a LoRA that a tensor-parallel split holds in "
                                       "slices; leave it off with --tensor-parallel (the LoRA then runs unfused)\n")
    assert not (tmp_path / "o.png").exists()


# --- real process groups ---------------------------------------------------------------------------


def _join(rank: int, world: int, port: int, cfg: int, tp: int, timeout_s: float = 120.0) -> Any:
    from device_utils import DeviceManager
    from hidream_edit.tensor_parallel import join_layout

    env = DistributedEnvironment(world, rank, rank, "127.0.0.1", port)
    return join_layout(DeviceManager("cpu", "fp32"), env, ParallelLayout(world, cfg, tp), timeout_s)


def _e1_1_editor(tiny_root: str, group: Any, tensor: Any) -> Any:
    from hidream_edit.config import resolve_model_sources
    from hidream_edit.editor import Editor, EditorSettings
    from hidream_edit.spec import MODELS

    env = {"HIDREAM_TINY_DIR": tiny_root, "HF_HUB_OFFLINE": "1"}
    settings = EditorSettings(resolve_model_sources(MODELS["e1.1"], tiny=True, env=env), device="cpu", dtype="fp32",
                              attention="sdpa", host_memory=HOST_MEMORY)
    return Editor.load(settings, group.dm, tensor)


def _split_counts(transformer: Any, tp: int) -> dict[str, int]:
    """Elements this rank holds of the split weights (local shards), of the whole split weights, and of the rest."""
    from torch.distributed.tensor import DTensor

    from hidream_edit.tensor_split import HeadSplitRMSNorm

    counts = {"split_local": 0, "split_whole": 0, "replicated": 0, "shards": 0, "storage": 0}
    norms = {id(p) for m in transformer.modules() if isinstance(m, HeadSplitRMSNorm) for p in m.parameters()}
    for parameter in transformer.parameters():
        if isinstance(parameter, DTensor) and parameter.placements[0].is_shard():
            counts["split_local"] += parameter.to_local().numel()
            counts["shards"] += parameter.to_local().numel()
            counts["storage"] += parameter.to_local().untyped_storage().nbytes() // parameter.element_size()
            counts["split_whole"] += parameter.numel()
        elif id(parameter) in norms:
            counts["split_local"] += parameter.numel()
            counts["split_whole"] += parameter.numel() * tp
        else:
            counts["replicated"] += parameter.numel()
    return counts


def _tp_edits(rank: int, world: int, cfg: int, tp: int, port: int, tiny_root: str, image: str, names: tuple[str, ...],
              result_file: str) -> None:
    """Every edit of `names` in a layout of cfg x tp ranks; rank 0 writes the images, every rank its counts
    and the bytes it read from each weights file or folder the loader read (`model folder/name`, in order)."""
    import torch

    from hidream_edit import models
    from hidream_edit.config import resolve_model_sources
    from hidream_edit.editor import Editor, EditorSettings, EditRequest
    from hidream_edit.spec import MODELS

    torch.set_num_threads(1)
    read: list[tuple[str, int]] = []
    whole_read = models.load_safetensors

    def counting_read(path: Any, *args: Any) -> dict[str, Any]:
        state = whole_read(path, *args)
        read.append((f"{Path(path).parent.name}/{Path(path).name}",
                     sum(tensor.numel() * tensor.element_size() for tensor in state.values())))
        return state

    models.load_safetensors = counting_read
    group, tensor = _join(rank, world, port, cfg, tp)
    try:
        env = {"HIDREAM_TINY_DIR": tiny_root, "HF_HUB_OFFLINE": "1"}
        editors = {
            model: Editor.load(EditorSettings(resolve_model_sources(MODELS[model], tiny=True, env=env), device="cpu",
                                              dtype="fp32", attention="sdpa", host_memory=HOST_MEMORY), group.dm,
                               tensor)
            for model in sorted({EDITS[name][0] for name in names})
        }
        for editor in editors.values():
            if group.guidance is not None:
                editor.use_guidance_group(group.guidance)
        results = {}
        for name in names:
            model, fields = EDITS[name]
            result = editors[model].edit(EditRequest(image=image, steps=2, **fields))
            if result.image is not None:
                results[name] = (np.asarray(result.image), result.metadata)
        counts = {model: _split_counts(editor.loaded.pipe.transformer, tp) for model, editor in editors.items()}
        held = {model: [name for name, attribute in ENCODER_ATTRIBUTES.items()
                        if getattr(editor.loaded.pipe, attribute) is not None] for model, editor in editors.items()}
        # Stop asked on rank 0 alone (the web UI's server) stops every rank at the same step
        outcome = _stop_then_edit(editors["e1.1"], rank, image)
        stop = {"first": outcome["first"], "second_decoded": outcome["second"] is not None}
        Path(f"{result_file}.{rank}.json").write_text(json.dumps(
            {"counts": counts, "writes": sorted(results), "tp_ranks": tensor.ranks, "read": read, "stop": stop,
             "held": held, "layout": editors["e1.1"].layout() if "e1.1" in editors else None,
             "edit_group": [group.edit.ranks, group.edit.leader]}))
        if rank == 0:
            Path(result_file).write_bytes(pickle.dumps(results))
        if world == 4:
            Path(f"{result_file}.{rank}.four_heads.json").write_text(json.dumps(_four_heads_split_four_ways(rank)))
    finally:
        group.close()


def _four_heads_split_four_ways(rank: int) -> dict[str, float]:
    """K = 4 on a 4-head tiny transformer: one forward pass split over the 4 ranks equals the same pass whole."""
    import torch
    from diffusers import HiDreamImageTransformer2DModel

    from device_utils import DeviceManager
    from hidream_edit.attention import install_attention
    from hidream_edit.tensor_split import parallelize_transformer
    from hidream_edit.tiny import TRANSFORMER_DIMS

    torch.manual_seed(0)
    transformer = HiDreamImageTransformer2DModel(**{**TRANSFORMER_DIMS, "num_attention_heads": 4}).eval()
    install_attention(transformer, DeviceManager("cpu", "fp32"), "sdpa")
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(3, 16, 8, 16, generator=generator),
        "timesteps": torch.full((3,), 500.0),
        "encoder_hidden_states_t5": torch.randn(3, 10, TRANSFORMER_DIMS["caption_channels"][0], generator=generator),
        "encoder_hidden_states_llama3": torch.randn(2, 3, 10, TRANSFORMER_DIMS["caption_channels"][1],
                                                    generator=generator),
        "pooled_embeds": torch.randn(3, TRANSFORMER_DIMS["text_emb_dim"], generator=generator),
    }
    with torch.inference_mode():
        whole = transformer(**inputs, return_dict=False)[0]
        mesh = ParallelLayout(4, 1, 4).mesh("cpu", 120.0)
        parallelize_transformer(transformer, mesh["tp"])
        split = transformer(**inputs, return_dict=False)[0]
    return {"difference": float((split - whole).abs().max()), "scale": float(whole.abs().max()),
            "heads": transformer.double_stream_blocks[0].block.attn1.heads}


def _run_layout(world: int, cfg: int, tp: int, names: tuple[str, ...], tiny_root: str, image: Path,
                result_file: Path) -> dict[str, Any]:
    torch_mp.spawn(_tp_edits, args=(world, cfg, tp, free_port(), tiny_root, str(image), names, str(result_file)),
                   nprocs=world)
    ranks = [json.loads(Path(f"{result_file}.{rank}.json").read_text()) for rank in range(world)]
    extra = {}
    if world == 4:
        extra = {"four_heads": [json.loads(Path(f"{result_file}.{r}.four_heads.json").read_text()) for r in range(4)]}
    return {"images": pickle.loads(result_file.read_bytes()), "ranks": ranks, **extra}


@pytest.fixture(scope="module")
def source_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("source") / "source.png"
    ramp = np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint8)
    Image.fromarray(ramp).save(path)
    return path


def _one_process_edits(tiny_root: str, image: str, result_file: str) -> None:
    """Every edit of EDITS in one process and one thread: the reference for the split."""
    import torch

    torch.set_num_threads(1)
    Path(result_file).write_bytes(pickle.dumps(_edit_all(_editors(tiny_root), image, list(EDITS))))


@pytest.fixture(scope="module")
def one_process_started(
    tiny_checkpoints: Any, source_image: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, Path]]:
    """The one-process reference, started in a fresh process of its own so that it runs beside the first
    spawned group (one thread each) instead of before it."""
    result_file = tmp_path_factory.mktemp("one") / "r.pkl"
    process = multiprocessing.get_context("spawn").Process(
        target=_one_process_edits, args=(str(tiny_checkpoints.root), str(source_image), str(result_file)))
    process.start()
    yield process, result_file
    process.kill()


@pytest.fixture(scope="module")
def one_process(one_process_started: tuple[Any, Path]) -> dict:
    process, result_file = one_process_started
    process.join(timeout=RUN_TIMEOUT_S)
    assert process.exitcode == 0
    return pickle.loads(result_file.read_bytes())


@pytest.fixture(scope="module")
def two_ranks(
    tiny_checkpoints: Any, source_image: Path, tmp_path_factory: pytest.TempPathFactory, one_process_started: Any
) -> dict:
    """--tensor-parallel 2: every edit of EDITS (both models, refine on and off, guidance off)."""
    return _run_layout(2, 1, 2, tuple(EDITS), str(tiny_checkpoints.root), source_image,
                       tmp_path_factory.mktemp("tp2") / "r.pkl")


@pytest.fixture(scope="module")
def four_ranks(tiny_checkpoints: Any, source_image: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """--cfg-parallel 2 --tensor-parallel 2 on 4 ranks, then K = 4 on the 4-head transformer."""
    return _run_layout(4, 2, 2, COMBINED_EDITS, str(tiny_checkpoints.root), source_image,
                       tmp_path_factory.mktemp("cfg2tp2") / "r.pkl")


def _assert_same_edits(group: dict[str, Any], one_process: dict, names: tuple[str, ...]) -> None:
    assert set(group) == set(names)
    for name, (pixels, metadata) in group.items():
        reference_pixels, reference_metadata = one_process[name]
        difference = np.abs(pixels.astype(int) - reference_pixels.astype(int)).max()
        assert difference <= 1, (name, difference)
        # the plan is this rank's: its share of the transformer, so a smaller predicted peak
        plan, reference_plan = metadata["placement"], reference_metadata["placement"]
        assert plan["name"] == reference_plan["name"], name
        assert plan["predicted_peak_bytes"]["host"] < reference_plan["predicted_peak_bytes"]["host"], name
        assert ({k: v for k, v in _without_measurements(metadata).items() if k != "placement"}
                == {k: v for k, v in _without_measurements(reference_metadata).items() if k != "placement"}), name


def test_tensor_parallel_2_gives_the_images_and_metadata_of_one_process(two_ranks: dict, one_process: dict) -> None:
    _assert_same_edits(two_ranks["images"], one_process, tuple(EDITS))
    for _, metadata in two_ranks["images"].values():
        assert metadata["timings"]["tensor_parallel"] == {"size": 2, "ranks": [0, 1]}
    assert [rank["writes"] for rank in two_ranks["ranks"]] == [sorted(EDITS), []]  # only the first rank decodes


def test_stop_asked_on_the_first_rank_stops_the_pair_at_the_same_step_and_the_pair_goes_on(two_ranks: dict) -> None:
    """Only the serving rank is asked (the web UI's Stop); each step the pair agrees, so neither waits out the
    timeout in an all-reduce the other never reaches, and the next edit works."""
    stops = [rank["stop"] for rank in two_ranks["ranks"]]
    assert [stop["first"] for stop in stops] == ["stopped after step 2 of 4"] * 2
    assert [stop["second_decoded"] for stop in stops] == [True, False]


@pytest.mark.parametrize("model", ["e1.1", "e1-full"])
def test_each_rank_holds_a_kth_of_the_split_weights(two_ranks: dict, model: str) -> None:
    for rank in two_ranks["ranks"]:
        counts = rank["counts"][model]
        assert counts["split_local"] * 2 == counts["split_whole"]
        assert counts["storage"] == counts["shards"]  # no slice keeps the whole tensor alive
        assert counts["split_whole"] > 0.8 * (counts["split_whole"] + counts["replicated"])  # most of the model


def _share(path: Path, slices: dict[str, tuple[int, int, int]]) -> int:
    """Bytes of a rank's share of a weights file or folder for K = 2: the split tensors' halves, the rest whole."""
    from device_utils import load_safetensors

    size = {key: tensor.numel() * tensor.element_size() for key, tensor in load_safetensors(path).items()}
    assert set(slices) & set(size)
    return sum(size[key] // 2 if key in slices else size[key] for key in size)


def test_each_rank_reads_only_its_slices_of_the_transformer_files(two_ranks: dict, tiny_checkpoints: Any) -> None:
    """What a rank reads is its share, E1-Full first (I1's transformer, then the LoRA file: lora_B under a
    column-parallel base, lora_A under a row-parallel one, and the full tensors of split modules), then E1.1."""
    from device_utils import load_safetensors
    from hidream_edit.models import _meta_i1_transformer, lora_config
    from hidream_edit.spec import E1_FULL_LORA
    from hidream_edit.tensor_split import shard_slices

    meta = _meta_i1_transformer(tiny_checkpoints.i1)
    split = shard_slices(meta, 2, 0)
    meta.add_adapter(lora_config(E1_FULL_LORA))
    lora_split = shard_slices(meta, 2, 0)
    lora_file = tiny_checkpoints.e1_full_lora
    split_in_lora_file = set(lora_split) & set(load_safetensors(lora_file))
    for part in (".lora_A.", ".lora_B.", ".base_layer.", "q_rms_norm."):
        assert any(part in key for key in split_in_lora_file), part
    expected = [
        ["HiDream-I1-Full/transformer", _share(tiny_checkpoints.i1 / "transformer", split)],
        [f"HiDream-E1-Full/{lora_file.name}", _share(lora_file, lora_split)],
        ["HiDream-E1-1/transformer", _share(tiny_checkpoints.e1_1 / "transformer", split)],
    ]
    for rank in two_ranks["ranks"]:
        assert rank["read"] == expected


def test_a_split_over_one_rank_loads_what_a_whole_load_does(tiny_checkpoints: Any, tmp_path: Path) -> None:
    """The split loading path in one process (a mesh of one): the split tensors become DTensors holding the
    whole values, everything else is assigned as without a split, and nothing is left on the meta device."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from hidream_edit import models

    whole = models.load_e1_1_transformer(tiny_checkpoints.i1, tiny_checkpoints.e1_1, torch.float32, "cpu")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        split = models.load_e1_1_transformer(tiny_checkpoints.i1, tiny_checkpoints.e1_1, torch.float32, "cpu",
                                             split=mesh)
        values = {key: value.full_tensor() if hasattr(value, "full_tensor") else value
                  for key, value in split.state_dict().items()}
    finally:
        dist.destroy_process_group()
    expected = whole.state_dict()
    assert sorted(values) == sorted(expected) and not any(value.is_meta for value in values.values())
    assert all(torch.equal(values[key], expected[key]) for key in expected)
    assert any(hasattr(value, "full_tensor") for value in split.state_dict().values())


def test_a_lora_file_lacking_tensors_loads_split_over_one_rank_as_whole(tiny_checkpoints: Any, tmp_path: Path) -> None:
    """A missing LoRA tensor is made as zeros of this rank's shape: a whole one (a column-parallel layer's
    lora_A) as well as a split one (its lora_B), and the split load holds what a whole load of the file does."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh

    from device_utils import load_safetensors
    from hidream_edit import models

    state = load_safetensors(tiny_checkpoints.e1_full_lora)
    dropped = {k for k in state if (".to_q." in k and ".lora_A." in k) or (".to_k." in k and ".lora_B." in k)}
    assert dropped
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in state.items() if k not in dropped}, str(partial))
    whole, _ = models.load_e1_full_transformer(tiny_checkpoints.i1, partial, torch.float32, "edit", "cpu")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        split, _ = models.load_e1_full_transformer(tiny_checkpoints.i1, partial, torch.float32, "edit", "cpu",
                                                   split=init_device_mesh("cpu", (1,)))
        values = {key: value.full_tensor() if hasattr(value, "full_tensor") else value
                  for key, value in split.state_dict().items()}
    finally:
        dist.destroy_process_group()
    expected = whole.state_dict()
    assert sorted(values) == sorted(expected) and all(torch.equal(values[k], expected[k]) for k in expected)
    assert not any(values[key].any() for key in dropped)


def test_a_lora_layer_is_sliced_with_its_base() -> None:
    """Column-parallel base: its weight, bias and lora_B split on dim 0, lora_A whole; row-parallel base: its
    weight and lora_A split on dim 1, its bias and lora_B whole; keyed by PEFT's names (`.base_layer.`)."""
    import torch
    from diffusers import HiDreamImageTransformer2DModel

    from hidream_edit.models import lora_config
    from hidream_edit.spec import E1_FULL_LORA
    from hidream_edit.tensor_split import shard_slices
    from hidream_edit.tiny import TRANSFORMER_DIMS

    with torch.device("meta"):
        transformer = HiDreamImageTransformer2DModel(**TRANSFORMER_DIMS)
    before = shard_slices(transformer, 2, 1)
    transformer.add_adapter(lora_config(E1_FULL_LORA))
    after = shard_slices(transformer, 2, 1)
    q, out = "double_stream_blocks.0.block.attn1.to_q", "double_stream_blocks.0.block.attn1.to_out"
    rows = transformer.get_submodule(f"{q}.base_layer").out_features // 2
    columns = transformer.get_submodule(f"{out}.base_layer").in_features // 2
    assert {key: value for key, value in after.items() if key.startswith(f"{q}.")} == {
        f"{q}.base_layer.weight": (0, rows, 2 * rows), f"{q}.base_layer.bias": (0, rows, 2 * rows),
        f"{q}.lora_B.default.weight": (0, rows, 2 * rows)}
    assert {key: value for key, value in after.items() if key.startswith(f"{out}.")} == {
        f"{out}.base_layer.weight": (1, columns, 2 * columns),
        f"{out}.lora_A.default.weight": (1, columns, 2 * columns)}
    assert {key.replace(".base_layer.", "."): value for key, value in after.items() if ".lora_" not in key} == before
    assert not [key for key in after if key.startswith("final_layer.")]  # a LoRA target that stays whole


@pytest.mark.parametrize("model", ["e1.1", "e1-full"])
def test_each_text_encoder_is_loaded_by_one_rank_of_a_group_which_shares_its_embeddings(
    two_ranks: dict, four_ranks: dict, model: str
) -> None:
    """The group's edits equal one process's (the tests above), yet no rank loads all four encoders: the
    embeddings of the others reach it from the rank that holds them."""
    pair = [rank["held"][model] for rank in two_ranks["ranks"]]
    assert sorted(pair[0] + pair[1]) == sorted(TEXT_ENCODERS) and all(pair)
    # the web UI's device panel reports the same (Editor.layout)
    assert [rank["layout"] for rank in two_ranks["ranks"]] == [
        {"cfg_parallel": 1, "guidance_ranks": None, "tensor_parallel": 2, "tensor_ranks": [0, 1],
         "text_encoders_here": [rank["held"]["e1.1"] for rank in two_ranks["ranks"]][member]} for member in (0, 1)]
    if model == "e1.1":  # cfg 2 x tp 2: each tensor-parallel pair holds the four once
        quad = [rank["held"][model] for rank in four_ranks["ranks"]]
        assert sorted(quad[0] + quad[1]) == sorted(quad[2] + quad[3]) == sorted(TEXT_ENCODERS)


def test_cfg_parallel_2_with_tensor_parallel_2_on_four_ranks_gives_one_process(
    four_ranks: dict, one_process: dict
) -> None:
    _assert_same_edits(four_ranks["images"], one_process, COMBINED_EDITS)
    metadata = four_ranks["images"]["e1.1 edit+refine"][1]
    assert metadata["timings"]["tensor_parallel"] == {"size": 2, "ranks": [0, 1]}
    assert [r["rank"] for r in metadata["timings"]["cfg_parallel"]["ranks"]] == [0, 2]  # the mesh's cfg dimension
    assert [rank["tp_ranks"] for rank in four_ranks["ranks"]] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    # one edit group of all 4 ranks (cfg x tp): rank 0 leads it (claims batch items, saves)
    assert [rank["edit_group"] for rank in four_ranks["ranks"]] == [[[0, 1, 2, 3], member == 0] for member in range(4)]
    # Stop on rank 0 reaches its tensor-parallel pair, then both guidance pairs in the same step's gather
    stops = [rank["stop"] for rank in four_ranks["ranks"]]
    assert [stop["first"] for stop in stops] == ["stopped at denoising step 2 of 4"] * 4
    assert [stop["second_decoded"] for stop in stops] == [True, False, False, False]
    assert [bool(rank["writes"]) for rank in four_ranks["ranks"]] == [True, False, False, False]


def test_tensor_parallel_4_on_a_four_head_transformer_equals_the_whole_forward(four_ranks: dict) -> None:
    for result in four_ranks["four_heads"]:
        assert result["heads"] == 1
        assert result["difference"] <= 1e-5 * max(1.0, result["scale"])


def test_the_planned_command_for_two_cards_writes_the_single_process_image_under_torchrun(
    tiny_env: dict[str, str], source_image: Path, tmp_path: Path, one_process: dict
) -> None:
    """`--plan --plan-host 2x64GiB` prints a torchrun command with --tensor-parallel 2 for the fastest edit; that
    command, with the tiny set's flags added and its placeholders filled, gives the one-process image."""
    from hidream_edit.host_layout import command as planned_command
    from hidream_edit.host_layout import plan_host
    from hidream_edit.models import table_sizes
    from hidream_edit.placement import described_budgets
    from hidream_edit.spec import MODELS

    model, fields = EDITS["e1.1 edit+refine"]
    output = tmp_path / "tp" / "out.png"
    output.parent.mkdir()
    spec = MODELS["e1.1"]
    host = plan_host(spec, table_sizes(spec, "bf16"), described_budgets("2x64GiB"))
    words = shlex.split(planned_command(host.latency, spec.script, "latency"))
    assert words[:5] == ["torchrun", "--standalone", "--nproc-per-node", "2", "inference_e1_1_npu.py"]
    values = {"--image": str(source_image), "--instruction": fields["instruction"], "--output": str(output)}
    planned = [values.get(words[i - 1], word) for i, word in enumerate(words) if i >= 5]
    assert "--tensor-parallel" in planned
    command = [TORCHRUN, *words[1:4], "--monitor-interval", "0.5", words[4], *planned,
               "--tiny", "--steps", "2", "--refine-strength", str(fields["refine_strength"]),
               "--seed", str(fields["seed"]), "--host-memory", "64GiB"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=run_env(tiny_env),
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("saved ") == 1  # one rank saves
    assert sorted(path.name for path in output.parent.iterdir()) == ["out.png", "out.png.json"]
    reference_pixels, reference_metadata = one_process["e1.1 edit+refine"]
    assert np.abs(np.asarray(Image.open(output), dtype=int) - reference_pixels.astype(int)).max() <= 1
    metadata = json.loads(Path(f"{output}.json").read_text())
    assert metadata["timings"]["tensor_parallel"]["size"] == 2
    ignore = (*MEASURED, "output", "placement")
    assert {k: v for k, v in metadata.items() if k in reference_metadata and k not in ignore} == {
        k: v for k, v in reference_metadata.items() if k not in ignore
    }


# --- the memory plan of a tensor-parallel group --------------------------------------------------------


@pytest.mark.parametrize("tp,host", [(4, "8x32GiB"), (2, "8x64GiB"), (4, "8x64GiB")])
def test_each_card_of_a_group_plans_its_share_and_the_encoders_it_holds(tp: int, host: str) -> None:
    """K = 4 on 32 GiB cards and K = 2 or 4 on 64 GiB cards: every card keeps its share of the transformer and
    the encoders it holds resident (nothing visits from host memory), each encoder is on exactly one card,
    the largest on the card with the most room, and every peak is under its card."""
    from hidream_edit.models import table_sizes
    from hidream_edit.placement import described_budgets
    from hidream_edit.spec import MODELS
    from hidream_edit.tensor_split import member_budgets, plan_tensor_group, tensor_share

    sizes = table_sizes(MODELS["e1.1"], "bf16")
    share = tensor_share(sizes, None, tp)
    whole, split = sizes.components["transformer"], share.components["transformer"]
    assert whole / tp < split < whole / tp + 0.2 * whole  # its slices plus the 18% that stays whole
    group = plan_tensor_group(MODELS["e1.1"], share, member_budgets(described_budgets(host), tp))
    assert group.error is None
    spread = ({"llama": 0, "t5": 1, "clip_g": 2, "clip_l": 3} if tp == 4
              else {"llama": 0, "t5": 1, "clip_g": 1, "clip_l": 1})  # each to the card with the most room left
    assert group.owners == spread
    held = [group.held_by(member) for member in range(tp)]
    assert sorted(sum(held, ())) == sorted(TEXT_ENCODERS)
    for member, plan in enumerate(group.plans):
        assert plan.placement == "none" and plan.fits
        (card,) = plan.chosen.devices
        assert card.device == f"npu:{member}" and card.peak_bytes <= card.budget_bytes
        assert set(card.components) == {"transformer", "vae", *held[member]}
        assert card.peak_bytes == (share.components["transformer"] + share.components["vae"] + plan.reserve.total
                                   + sum(share.components[name] for name in held[member]))
        for name in TEXT_ENCODERS:  # the plan shows where each encoder lives, with its full size
            assert plan.chosen.homes[name].startswith(f"npu:{group.owners[name]}")
            assert plan.sizes.components[name] == sizes.components[name]
    # each encoder is loaded once for the group: no rank keeps the others' in host memory
    assert max(plan.chosen.host.peak_bytes for plan in group.plans) < sizes.encoders


def test_a_group_places_encoders_by_the_room_each_card_has_left() -> None:
    """The largest encoder goes to the card with the most room left, not to the group's first card."""
    from dataclasses import replace

    from hidream_edit.models import table_sizes
    from hidream_edit.placement import GIB, described_budgets
    from hidream_edit.spec import MODELS
    from hidream_edit.tensor_split import member_budgets, plan_tensor_group, tensor_share

    share = tensor_share(table_sizes(MODELS["e1.1"], "bf16"), None, 2)
    members = member_budgets(described_budgets("2x64GiB"), 2)
    members[0] = replace(members[0], cards=(replace(members[0].edit, free=40 * GIB),))
    group = plan_tensor_group(MODELS["e1.1"], share, members)
    assert group.owners["llama"] == 1  # equal cards give it to card 0 (the test above)
    assert group.error is None and [plan.placement for plan in group.plans] == ["none", "none"]


def test_a_group_too_small_for_its_encoders_resident_lets_them_visit_or_refuses() -> None:
    """K = 2 on 32 GiB cards: the share (18.8 GiB) and the Llama (14.0 GiB) do not fit one card even visiting,
    so the group refuses before loading, naming the card; E1-Full's smaller share lets the T5 visit."""
    from hidream_edit.models import table_sizes
    from hidream_edit.placement import described_budgets
    from hidream_edit.spec import MODELS
    from hidream_edit.tensor_split import member_budgets, plan_tensor_group, tensor_share

    for model in ("e1.1", "e1-full"):
        share = tensor_share(table_sizes(MODELS[model], "bf16"), None, 2)
        group = plan_tensor_group(MODELS[model], share, member_budgets(described_budgets("8x32GiB"), 2))
        assert group.error is not None and group.error.startswith(
            "with --tensor-parallel each card keeps its share of the transformer resident, but card 1 of the group "
            "only fits the 'model' plan")
    assert group.plans[1].placement == "encoders"  # E1-Full: card 2 holds the T5 and CLIPs visiting


def test_plan_for_a_group_too_small_refuses_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = run_edit_cli(["--plan", "--plan-host", "8x32GiB", "--tensor-parallel", "2"], "e1.1",
                        {"HF_HUB_OFFLINE": "1"})
    assert code == 2
    captured = capsys.readouterr()
    assert "tensor parallel 2: the plan of each card of a group" in captured.out
    assert captured.err.startswith("error: with --tensor-parallel each card keeps its share of the transformer")
    assert captured.err.count("\n") == 1


@pytest.mark.parametrize("member", [0, 1])
def test_an_encoder_runs_on_its_owner_alone_and_the_others_receive_its_embeddings(
    member: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SharedEncoders' protocol on one rank (the collectives are played by fakes that act as the group): the
    owner encodes and sends shape and dtype, then the tensor, both from itself; another member only receives,
    into a tensor of that shape and dtype."""
    import torch

    from hidream_edit import tensor_split

    embedding = torch.arange(6, dtype=torch.bfloat16).reshape(1, 2, 3)
    sent: list[tuple[str, int]] = []

    def broadcast_object_list(header: list[Any], group: Any, group_src: int, device: Any) -> None:
        sent.append(("header", group_src))
        if header[0] is None:  # a receiver: the owner's header arrives
            header[0] = (tuple(embedding.shape), embedding.dtype)

    def broadcast(tensor: Any, group: Any, group_src: int) -> None:
        sent.append(("tensor", group_src))
        tensor.copy_(embedding)

    class Mesh:
        def get_group(self) -> str:
            return "tp"

        def get_local_rank(self) -> int:
            return member

    monkeypatch.setattr(tensor_split.dist, "broadcast_object_list", broadcast_object_list)
    monkeypatch.setattr(tensor_split.dist, "broadcast", broadcast)
    encoded: list[str] = []
    shared = tensor_split.SharedEncoders({"t5": 0, "llama": 1}, Mesh())
    for name in ("t5", "llama"):
        result = shared.share(name, lambda name=name: encoded.append(name) or embedding.clone(), torch.device("cpu"))
        assert torch.equal(result, embedding) and result.dtype == torch.bfloat16
    assert encoded == [["t5"], ["llama"]][member]
    assert sent == [("header", 0), ("tensor", 0), ("header", 1), ("tensor", 1)]


@pytest.mark.parametrize("with_weight", [True, False])
def test_a_head_split_rms_norm_normalises_each_slice_as_the_whole_vector(
    with_weight: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each member holds half the width; the all-reduce (a fake that adds the other half's sum of squares)
    makes the two halves together equal the whole norm, weight included."""
    import torch

    from hidream_edit import tensor_split

    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(8, eps=1e-6, elementwise_affine=with_weight)
    if with_weight:
        torch.nn.init.uniform_(norm.weight, 0.5, 2.0)
    x = torch.randn(3, 5, 8) * 3
    halves = x.chunk(2, dim=-1)
    outputs = []
    for member in (0, 1):
        other = halves[1 - member].float().pow(2).sum(dim=-1, keepdim=True)
        monkeypatch.setattr(tensor_split.dist, "all_reduce", lambda tensor, group, other=other: tensor.add_(other))
        split = tensor_split.HeadSplitRMSNorm(norm, "tp", member, 2)
        outputs.append(split(halves[member]))
    torch.testing.assert_close(torch.cat(outputs, dim=-1), norm(x))


def test_a_rank_missing_from_the_group_plan_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The group's ranks exchange their cards' budgets while loading; a rank that failed before (or hangs)
    leaves the others in that exchange until the timeout, which then ends each of them with one line."""
    import torch

    from hidream_edit import tensor_split
    from hidream_edit.errors import GuidanceGroupError
    from hidream_edit.placement import described_budgets

    class Mesh:
        mesh = torch.tensor([2, 3])

        def size(self) -> int:
            return 2

        def get_group(self) -> None:
            return None

    def timed_out(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 6000ms\n"
                           "Exception raised from recvFromRemote")

    monkeypatch.setattr(tensor_split.dist, "all_gather_object", timed_out)
    monkeypatch.setattr(tensor_split.dist, "get_rank", lambda: 2)
    with pytest.raises(GuidanceGroupError) as raised:
        tensor_split.gather_budgets(described_budgets("2x64GiB"), Mesh())
    message = str(raised.value)
    assert message.startswith("rank 2 could not plan with its tensor-parallel group (ranks [2, 3]): ")
    assert "Timed out waiting 6000ms" in message and "--dist-timeout" in message and "\n" not in message


# --- failures and hangs ----------------------------------------------------------------------------------


def _failing_tensor_rank(rank: int, port: int, tiny_root: str, image: str, mode: str, queue: Any) -> None:
    """Rank 1 fails (raises) or hangs in its second forward; every rank reports how its edit ended."""
    import torch

    from hidream_edit.editor import EditRequest
    from hidream_edit.errors import GuidanceGroupError

    torch.set_num_threads(1)
    group, tensor = _join(rank, 2, port, 1, 2, timeout_s=6.0)
    editor = _e1_1_editor(tiny_root, group, tensor)
    pipe = editor.loaded.pipe
    calls = []
    predict = pipe._predict

    def broken_predict(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            queue.put(("broke", mode, time.time()))
            if mode == "raise":
                raise RuntimeError("injected failure")
            time.sleep(60)  # killed by the test once rank 0 has given up on it (after 6 s)
        return predict(*args, **kwargs)

    if rank == 1:
        pipe._predict = broken_predict
    try:
        editor.edit(EditRequest(image=image, instruction="make it snow", steps=3, refine_strength=0.0))
        queue.put((rank, "finished", time.time()))
    except GuidanceGroupError as exc:
        queue.put((rank, str(exc), time.time()))
    finally:
        group.close()


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_a_rank_that_fails_or_hangs_ends_its_tensor_parallel_group_within_the_timeout(
    mode: str, tiny_checkpoints: Any, source_image: Path
) -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_failing_tensor_rank,
                                 args=(rank, port, str(tiny_checkpoints.root), str(source_image), mode, queue))
                 for rank in (0, 1)]
    for process in processes:
        process.start()
    outcomes = {}
    waited_for = {0, "broke"} if mode == "hang" else {0, 1, "broke"}  # a hung rank 1 never reports
    while not waited_for <= outcomes.keys():
        who, message, when = queue.get(timeout=RUN_TIMEOUT_S)
        outcomes[who] = (message, when)
    if mode == "hang":
        processes[1].kill()  # still asleep in its step: rank 0 ended without it
    for process in processes:
        process.join(timeout=60)
    message, ended = outcomes[0]
    assert message.startswith("rank 0 stopped with its tensor-parallel group (ranks [0, 1]): "), message
    assert "--dist-timeout 6 s" in message and "nothing was saved" in message and "\n" not in message
    assert ended - outcomes["broke"][1] < 6 + 15  # the timeout and at most one slow step
    if mode == "raise":
        assert outcomes[1][0].startswith("rank 1 stopped with its tensor-parallel group (ranks [0, 1]): injected")
    else:
        assert 1 not in outcomes


# --- batches and the web UI ---------------------------------------------------------------------------

BATCH_EDITS = ("e1.1 edit+refine", "e1.1 edit only", "e1.1 guidance off")  # manifest lines a, b, c


def _manifest_of(names: tuple[str, ...], image: Path, path: Path) -> Path:
    lines = []
    for number, name in enumerate(names):
        model, fields = EDITS[name]
        assert model == "e1.1"
        lines.append(json.dumps({"image": str(image), **fields, "output": f"{'abc'[number]}.png"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_torchrun_batches_with_tensor_parallel_2_write_the_one_process_files(
    tiny_env: dict[str, str], source_image: Path, tmp_path: Path, one_process: dict
) -> None:
    """4 ranks as 2 tensor-parallel pairs (dp 2 x tp 2) that split the items: every item's image (within 1/255 of
    one process) and metadata, and one summary. (One pair alone is the single-edit torchrun test's layout.)"""
    manifest = _manifest_of(BATCH_EDITS, source_image, tmp_path / "m.jsonl")
    batch = ["inference_e1_1_npu.py", "--tiny", "--manifest", str(manifest), "--steps", "2", "--tensor-parallel", "2",
             "--host-memory", "64GiB"]
    runs = {"dp2tp2": 4}
    done = _clis([([*batch, "--output-dir", str(tmp_path / name)], processes) for name, processes in runs.items()],
                 tiny_env)
    for (name, processes), run in zip(runs.items(), done, strict=True):
        assert run.returncode == 0, (name, run.stderr)
        assert run.stdout.count("batch: 3 done, 0 failed, 0 skipped of 3") == 1, run.stdout
        folder = tmp_path / name
        assert sorted(path.name for path in folder.iterdir()) == sorted(
            [*(f"{letter}.png" for letter in "abc"), *(f"{letter}.png.json" for letter in "abc"), "summary.json"])
        summary = json.loads((folder / "summary.json").read_text())
        assert (summary["world_size"], summary["cfg_parallel"], summary["tensor_parallel"]) == (processes, 1, 2)
        assert summary["counts"] == {"ok": 3, "failed": 0, "skipped": 0} and summary["lost_ranks"] == []
        leaders = {item["rank"] for item in summary["items"]}
        assert leaders <= set(range(0, processes, 2)), name  # only a pair's first rank saves and records
        for letter, edit in zip("abc", BATCH_EDITS, strict=True):
            reference_pixels, reference_metadata = one_process[edit]
            pixels = np.asarray(Image.open(folder / f"{letter}.png"), dtype=int)
            assert np.abs(pixels - reference_pixels.astype(int)).max() <= 1, (name, edit)
            metadata = json.loads((folder / f"{letter}.png.json").read_text())
            assert metadata["timings"]["tensor_parallel"]["size"] == 2
            ignore = (*MEASURED, "output", "output_sha256", "placement")  # pixels may differ by 1 (checked above)
            assert {k: v for k, v in metadata.items() if k in reference_metadata and k not in ignore} == {
                k: v for k, v in reference_metadata.items() if k not in ignore}, (name, edit)
    four = json.loads((tmp_path / "dp2tp2" / "summary.json").read_text())
    assert {item["rank"] for item in four["items"]} <= {0, 2}


def test_a_batch_whose_processes_do_not_form_tensor_parallel_groups_is_one_line(
    tiny_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """torchrun --nproc-per-node 3 ... --tensor-parallel 2: each rank refuses on its own before joining or
    loading, so each rank's command line runs here with the variables torchrun gives it."""
    from hidream_edit import tensor_parallel
    from hidream_edit.editor import Editor

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("joined or loaded before refusing")

    monkeypatch.setattr(Editor, "load", staticmethod(never))
    monkeypatch.setattr(tensor_parallel, "join_layout", never)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    for rank in ("0", "2"):
        env = {**tiny_env, "WORLD_SIZE": "3", "RANK": rank, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": "1"}
        assert run_edit_cli(["--tiny", "--input-dir", str(folder), "--instruction", "x", "--output-dir",
                             str(tmp_path / "out"), "--tensor-parallel", "2"], "e1.1", env) == 2
        assert capsys.readouterr().err == ("error: --tensor-parallel 2 needs a number of processes that is a multiple "
                                           "of 2, got 3\n")
    assert not (tmp_path / "out").exists()


def test_the_web_ui_serves_edits_with_a_tensor_parallel_pair(
    e1_1_editor: Any, tiny_env: dict[str, str], source_image: Path, tmp_path: Path
) -> None:
    """torchrun --nproc-per-node 2 gradio_demo_npu.py --tensor-parallel 2: rank 0 serves, rank 1 follows its edits
    with the other half of the transformer."""
    metadata = serve_one_edit(["--tensor-parallel", "2", "--host-memory", "64GiB"], 2, e1_1_editor, tiny_env,
                              source_image, tmp_path / "results")
    assert metadata["timings"]["tensor_parallel"] == {"size": 2, "ranks": [0, 1]}
