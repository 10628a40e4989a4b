"""DeviceManager: real behaviour on CPU, NPU/CUDA branches through the stand-in in subprocesses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from npu_standin import REPO, run_standin
from safetensors.torch import save_file

import device_utils
from device_utils import CheckpointError, DeviceError, DeviceManager, load_safetensors, preferences_from
from hidream_edit.attention import install_attention

# Stand-in subprocesses read PREFERRED_DEVICE / PREFERRED_DTYPE the way the entry scripts do.
PRELUDE = (
    "import os\nimport device_utils\n"
    "def from_env():\n    return device_utils.DeviceManager(**device_utils.preferences_from(os.environ).arguments())\n"
)
LIBHCCL = "libhccl.so: cannot open shared object file: No such file or directory"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PREFERRED_DEVICE", "PREFERRED_DTYPE", "LOCAL_RANK", "HIDREAM_ATTENTION"):
        monkeypatch.delenv(name, raising=False)


def ok(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


# ---------------------------------------------------------------- CPU, for real


def test_cpu_defaults() -> None:
    dm = DeviceManager()
    assert dm.device == torch.device("cpu") and dm.device_type == "cpu"
    assert dm.dtype is torch.float32
    assert dm.distributed_backend == "gloo"


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_cpu_dtype_choices(name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    assert DeviceManager("cpu", name).dtype is dtype
    monkeypatch.setenv("PREFERRED_DTYPE", name)
    assert DeviceManager(**preferences_from(os.environ).arguments()).dtype is dtype


@pytest.mark.parametrize("spec", ["gpu", "npu:x", "cpu:1", "npu:-1", "cuda::0"])
def test_invalid_device_values_list_accepted(spec: str) -> None:
    with pytest.raises(DeviceError, match=f"PREFERRED_DEVICE={spec}.*auto, npu, npu:N, cuda, cuda:N, cpu"):
        DeviceManager(**preferences_from({"PREFERRED_DEVICE": spec}).arguments())


def test_a_blank_device_request_means_auto() -> None:
    assert DeviceManager("  ").device == torch.device("cpu")


def test_invalid_dtype_is_an_error() -> None:
    with pytest.raises(DeviceError, match="auto, bf16, fp16, fp32"):
        DeviceManager("cpu", "fp8")


def test_unavailable_named_devices_are_errors_not_fallbacks() -> None:
    with pytest.raises(DeviceError, match="preferred_device=npu, but torch_npu is not installed"):
        DeviceManager("npu")
    with pytest.raises(DeviceError, match="cuda:1, but no CUDA device"):
        DeviceManager("cuda:1")


def test_probe_detects_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    assert device_utils._dtype_works(torch.device("cpu"), torch.float16)
    monkeypatch.setattr(torch, "softmax", lambda x, dim: torch.full_like(x, float("nan")))
    assert not device_utils._dtype_works(torch.device("cpu"), torch.float32)
    with pytest.raises(DeviceError, match="gives NaN"):
        DeviceManager("cpu", "fp32")


def test_generators_reproduce_and_cpu_generator_matches_device() -> None:
    dm = DeviceManager()
    a = torch.randn(4, generator=dm.create_generator(7))
    b = torch.randn(4, generator=dm.create_generator(7, on="cpu"))
    c = torch.randn(4, generator=dm.create_generator(8))
    assert torch.equal(a, torch.randn(4, generator=torch.Generator().manual_seed(7))) and torch.equal(a, b)
    assert torch.equal(c, torch.randn(4, generator=torch.Generator().manual_seed(8)))
    with pytest.raises(DeviceError, match="unknown generator placement 'gpu'"):
        dm.create_generator(1, on="gpu")


def test_cpu_memory_stats_are_host_figures(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="device_utils")
    stats = DeviceManager().memory_stats()
    assert stats.allocated is None and stats.total is None
    assert 0 < stats.host_rss < stats.host_total
    assert re.search(r"memory: cpu \(.+\): no device memory \(host only\); host RSS \d+\.\d\d GiB of \d+\.\d\d GiB",
                     caplog.text)
    gib = 2**30
    device = device_utils.MemoryStats("npu:1", "x", 3 * gib, 4 * gib, 5 * gib, 50 * gib, 64 * gib, gib, 2 * gib)
    assert device.summary() == ("npu:1 (x): allocated 3.00 GiB, reserved 4.00 GiB, peak 5.00 GiB, free 50.00 GiB of "
                                "64.00 GiB; host RSS 1.00 GiB of 2.00 GiB")


def test_cpu_cache_and_sync_calls_touch_no_device_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU these are no-ops (torch.cpu has no such calls); empty_cache still collects garbage."""
    calls: list[str] = []
    recorder = type("Recorder", (), {"__getattr__": lambda self, name: lambda *a: calls.append(name)})()
    monkeypatch.setattr(DeviceManager, "device_module", property(lambda self: recorder))
    monkeypatch.setattr(device_utils.gc, "collect", lambda: calls.append("gc.collect") or 0)
    dm = DeviceManager()
    dm.empty_cache()
    dm.synchronize()
    dm.reset_peak_memory_stats()
    assert calls == ["gc.collect"]


class RecordingPipe:
    """Stands in for a diffusers pipeline: records which placement calls were made."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        outer = self

        class Vae:
            def enable_tiling(self) -> None:
                outer.calls.append(("vae", "tiling"))

            def enable_slicing(self) -> None:
                outer.calls.append(("vae", "slicing"))

        self.vae = Vae()

    def to(self, device: torch.device) -> None:
        self.calls.append(("to", str(device)))

    def enable_model_cpu_offload(self, device: torch.device) -> None:
        self.calls.append(("model", str(device)))

    def enable_sequential_cpu_offload(self, device: torch.device) -> None:
        self.calls.append(("sequential", str(device)))


def test_memory_mode_on_cpu_says_offload_is_skipped() -> None:
    pipe = RecordingPipe()
    actions = DeviceManager().set_memory_efficient_mode(pipe, "model", vae_tiling=True, vae_slicing=True)
    assert pipe.calls == [("to", "cpu"), ("vae", "tiling"), ("vae", "slicing")]
    assert "skipped" in actions[0] and "VAE tiling" in actions
    with pytest.raises(DeviceError, match="none, model, sequential"):
        DeviceManager().set_memory_efficient_mode(pipe, "disk")


# ---------------------------------------------------------------- safetensors


def test_load_single_sharded_and_index(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(tmp_path / "one.safetensors"))
    assert set(load_safetensors(tmp_path / "one.safetensors")) == {"a", "b"}
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    save_file({"a": torch.ones(2)}, str(shard_dir / "m-00001-of-00002.safetensors"))
    save_file({"b": torch.arange(3.0)}, str(shard_dir / "m-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "m-00001-of-00002.safetensors", "b": "m-00002-of-00002.safetensors"}}
    (shard_dir / "m.safetensors.index.json").write_text(json.dumps(index))
    for source in (shard_dir, shard_dir / "m.safetensors.index.json"):
        state = DeviceManager().load_safetensors(source, device="cpu")
        assert torch.equal(state["b"], torch.arange(3.0)) and state["a"].device.type == "cpu"


def make_shards(tmp_path: Path) -> Path:
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.ones(2)}, str(tmp_path / "s2.safetensors"))
    index = tmp_path / "x.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    return index


def test_missing_shard_is_named(tmp_path: Path) -> None:
    index = make_shards(tmp_path)
    (tmp_path / "s2.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shard.*s2.safetensors"):
        load_safetensors(index)


def test_truncated_file_is_named(tmp_path: Path) -> None:
    index = make_shards(tmp_path)
    data = (tmp_path / "s2.safetensors").read_bytes()
    (tmp_path / "s2.safetensors").write_bytes(data[: len(data) - 5])
    with pytest.raises(CheckpointError, match="s2.safetensors: cannot read"):
        load_safetensors(index)
    (tmp_path / "s2.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="s2.safetensors"):
        load_safetensors(tmp_path / "s2.safetensors")


def test_duplicate_and_unlisted_keys(tmp_path: Path) -> None:
    index = make_shards(tmp_path)
    save_file({"b": torch.ones(2), "a": torch.ones(2)}, str(tmp_path / "s2.safetensors"))
    with pytest.raises(CheckpointError, match="key 'a' is also stored in s1.safetensors"):
        load_safetensors(index)
    save_file({"c": torch.ones(2)}, str(tmp_path / "s2.safetensors"))
    with pytest.raises(CheckpointError, match="not in their shard, e.g. b"):
        load_safetensors(index)


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="file not found"):
        load_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="no .safetensors files"):
        load_safetensors(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="expected a .safetensors file"):
        load_safetensors(tmp_path / "w.bin")


# ---------------------------------------------------------------- attention


def small_transformer(head_dim: int = 8) -> torch.nn.Module:
    """HiDream's shape in small; rope covers 8 channels of each head, so a head_dim of 16 leaves half unrotated."""
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    return HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=head_dim,
        num_attention_heads=2,
        caption_channels=[8, 12],
        text_emb_dim=6,
        num_routed_experts=2,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(16, 16),
        llama_layers=[0, 1],
    ).eval()


def transformer_inputs(width: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(2, 4, 8, width, generator=generator),
        "timesteps": torch.tensor([500.0, 500.0]),
        "encoder_hidden_states_t5": torch.randn(2, 5, 8, generator=generator),
        "encoder_hidden_states_llama3": torch.randn(2, 2, 5, 12, generator=generator),
        "pooled_embeds": torch.randn(2, 6, generator=generator),
    }


@pytest.mark.parametrize(("width", "head_dim"), [(8, 8), (16, 8), (8, 16)])  # non-square latents; partial rope
def test_sdpa_and_math_match_diffusers_processor(width: int, head_dim: int, monkeypatch: pytest.MonkeyPatch) -> None:
    transformer = small_transformer(head_dim)
    inputs = transformer_inputs(width)
    with torch.no_grad():
        reference = transformer(**inputs).sample
        dm = DeviceManager()
        assert install_attention(transformer, dm, "sdpa") == "sdpa"
        sdpa_out = transformer(**inputs).sample
        install_attention(transformer, dm, "math")

        def forbidden(*args: object, **kwargs: object) -> None:
            raise AssertionError("F.scaled_dot_product_attention must not run with the math backend")

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", forbidden)
        math_out = transformer(**inputs).sample
    processors = [m.processor for m in transformer.modules() if type(m).__name__ == "HiDreamAttention"]
    assert len(processors) == 2 and all(p.backend == "math" and p.calls == 1 for p in processors)
    torch.testing.assert_close(sdpa_out, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(math_out, sdpa_out, rtol=1e-4, atol=1e-4)


def qkv(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = ((2, 3, 37, 16), (2, 3, 29, 16), (2, 3, 29, 16))  # [B, H, S, D]; 37 query rows, 29 keys
    return tuple(torch.randn(*shape, generator=generator).mul(3.0).to(dtype) for shape in shapes)  # type: ignore[return-value]


@pytest.mark.parametrize("rows", [1, 5, 36])
def test_math_attention_in_query_chunks_equals_unchunked_and_sdpa(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    query, key, value = qkv()
    row_bytes = 2 * 4 * 29 * 2 * 3  # scores and softmax in fp32, per query row, over B*H
    budget = rows * row_bytes + row_bytes // 2
    assert device_utils.math_attention_chunk_rows(query.shape, 29, budget) == rows
    whole = device_utils.math_attention(query, key, value, budget_bytes=1 << 40)
    score_rows: list[int] = []
    matmul = torch.matmul

    def recording_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        result = matmul(a, b)
        if result.shape[-1] == 29:  # a score matrix
            score_rows.append(result.shape[-2])
        return result

    monkeypatch.setattr(torch, "matmul", recording_matmul)
    chunked = device_utils.math_attention(query, key, value, budget_bytes=budget)
    monkeypatch.undo()
    assert max(score_rows) == rows and sum(score_rows) == 37 and len(score_rows) == -(-37 // rows)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, device_utils.sdpa_attention(query, key, value), rtol=1e-5, atol=1e-5)


def test_math_attention_chunk_rows_at_e1_1_size_fits_the_budget() -> None:
    query_shape = torch.Size((3, 20, 8192 + 256, 128))
    rows = device_utils.math_attention_chunk_rows(query_shape, 8192 + 256, device_utils.MATH_ATTENTION_BUDGET_BYTES)
    assert 1 <= rows < 8192 + 256
    assert 2 * 4 * rows * (8192 + 256) * 3 * 20 <= device_utils.MATH_ATTENTION_BUDGET_BYTES
    assert device_utils.math_attention_chunk_rows(query_shape, 8192 + 256, 1) == 1  # never zero rows


def test_math_attention_keeps_the_input_dtype() -> None:
    query, key, value = qkv(torch.bfloat16)
    out = device_utils.math_attention(query, key, value, budget_bytes=2 * 4 * 29 * 6 * 4)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 37, 16)
    reference = device_utils.math_attention(query.float(), key.float(), value.float())
    torch.testing.assert_close(out.float(), reference, rtol=1e-2, atol=1e-2)


def test_attention_env_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    dm = DeviceManager()
    assert dm.resolve_attention_backend() == "sdpa"
    assert install_attention(small_transformer(), dm) == "sdpa"
    assert install_attention(small_transformer(), dm, "math") == "math"
    with pytest.raises(DeviceError, match="needs an NPU"):
        dm.resolve_attention_backend("npu_fused")
    with pytest.raises(DeviceError, match="sdpa, math, npu_fused"):
        dm.resolve_attention_backend("flash")
    with pytest.raises(DeviceError, match="no HiDream attention modules"):
        install_attention(torch.nn.Linear(2, 2), dm, "sdpa")


# ---------------------------------------------------------------- import and CLI


def test_import_is_silent_and_touches_nothing() -> None:
    code = (
        "import logging, sys\n"
        "import device_utils\n"
        "assert 'diffusers' not in sys.modules and not logging.getLogger().handlers\n"
        "print(npu.calls)\n"
    )
    result = run_standin(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]" and result.stderr == ""
    check = "import sys, device_utils; assert not {'diffusers', 'torch_npu'} & set(sys.modules)"
    plain = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=REPO)
    assert plain.returncode == 0 and plain.stdout == "" and plain.stderr == ""


def test_cli_report_and_impossible_device() -> None:
    report = subprocess.run([sys.executable, "device_utils.py"], capture_output=True, text=True, cwd=REPO)
    assert report.returncode == 0
    assert "device:" in report.stdout and "dtype:" in report.stdout and "attention backend:   sdpa" in report.stdout
    as_json = subprocess.run([sys.executable, "device_utils.py", "--json"], capture_output=True, text=True, cwd=REPO)
    assert json.loads(as_json.stdout)["device"] == "cpu"
    env = {"PREFERRED_DEVICE": "npu", "PATH": "/usr/bin:/bin"}
    bad = subprocess.run([sys.executable, "device_utils.py"], capture_output=True, text=True, cwd=REPO, env=env)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "PREFERRED_DEVICE=npu" in bad.stderr and "torch_npu" in bad.stderr


# ---------------------------------------------------------------- NPU / CUDA branches (stand-in)


def test_detection_prefers_npu_and_selects_it() -> None:
    code = PRELUDE + "dm = from_env()\nprint(dm.device, dm.dtype_name, dm.distributed_backend)"
    out = ok(run_standin(code, {"cuda_count": 1}))
    assert out == ["npu:0", "bf16", "hccl"]


def test_detection_order_falls_back_to_cuda_then_cpu() -> None:
    code = PRELUDE + "print(from_env().device)"
    assert ok(run_standin(code, {"available": False, "cuda_count": 2})) == ["cuda:0"]
    assert ok(run_standin(code, {"available": False})) == ["cpu"]


def test_cann_missing_auto_warns_once_and_named_request_fails() -> None:
    code = PRELUDE + "from_env(); print(from_env().device)"
    result = run_standin(code, {"import_error": LIBHCCL})
    assert ok(result) == ["cpu"]
    assert result.stderr.count("libhccl.so not found") == 1 and "set_env.sh" in result.stderr
    code = PRELUDE + ("try:\n    from_env()\nexcept device_utils.DeviceError as e:\n    print(e)")
    env = {"PREFERRED_DEVICE": "npu"}
    message = run_standin(code, {"import_error": LIBHCCL}, env).stdout.strip()
    assert message == (
        "PREFERRED_DEVICE=npu, but torch_npu cannot load: libhccl.so not found; "
        "source the CANN set_env.sh (e.g. source /usr/local/Ascend/ascend-toolkit/set_env.sh)"
    )
    cli = run_standin(PRELUDE + "sys.exit(device_utils.main([]))", {"import_error": LIBHCCL}, env)
    assert cli.returncode == 2 and cli.stderr.strip().startswith("error: PREFERRED_DEVICE=npu, but torch_npu")


@pytest.mark.parametrize(
    ("failing_import", "expected"),
    [
        ("import decorator_is_missing_here", "the Python package 'decorator_is_missing_here' is missing; "
                                              "pip install decorator_is_missing_here"),
        ("raise ModuleNotFoundError(\"No module named 'attr'\", name='attr')",
         "the Python package 'attrs' is missing; pip install attrs"),
        ("raise ModuleNotFoundError(\"No module named 'yaml.loader'\", name='yaml.loader')", "pip install pyyaml"),
        ("raise ModuleNotFoundError(\"No module named 'tbe'\", name='tbe')", "source the CANN set_env.sh"),
    ],
    ids=["decorator", "attrs", "pyyaml", "cann-module"],
)
def test_a_missing_python_dependency_of_torch_npu_is_named_as_such(
    failing_import: str, expected: str, tmp_path: Path
) -> None:
    package = tmp_path / "torch_npu"
    package.mkdir()
    (package / "__init__.py").write_text(failing_import + "\n")
    code = "import sys, device_utils\nprint(device_utils.npu_status()[1])\nprint(sys.modules['torch_npu'] is None)\n"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tmp_path}:{REPO}"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    cause, blocked = done.stdout.splitlines()
    assert cause.startswith("torch_npu cannot load: ") and expected in cause
    assert ("CANN" in cause) == ("tbe" in failing_import)
    assert blocked == "True"  # later imports (transformers, diffusers) see torch_npu as unavailable


def test_host_rss_is_labelled_as_the_peak_without_psutil(monkeypatch: pytest.MonkeyPatch) -> None:
    with_psutil = DeviceManager("cpu").memory_stats(log=False)
    assert with_psutil.host_rss_is_peak is False and "; host RSS " in with_psutil.summary()
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now raises ImportError
    without = DeviceManager("cpu").memory_stats(log=False)
    assert without.host_rss_is_peak is True and without.as_dict()["host_rss_is_peak"] is True
    assert "; host peak RSS " in without.summary()
    assert without.host_rss >= with_psutil.host_rss // 2  # ru_maxrss: the peak, not 0 or pages


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"PREFERRED_DEVICE": "npu:1"}, "npu:1"),
        ({"LOCAL_RANK": "1"}, "npu:1"),
        ({"LOCAL_RANK": "1", "PREFERRED_DEVICE": "npu:0"}, "npu:0"),
        ({"ASCEND_RT_VISIBLE_DEVICES": "5,6"}, "npu:0"),
        ({"CUDA_VISIBLE_DEVICES": "3"}, "npu:0"),
    ],
)
def test_device_index_rules(env: dict[str, str], expected: str) -> None:
    code = PRELUDE + "dm = from_env(); print(dm.device, npu.calls[-1][1][0])"
    assert ok(run_standin(code, env=env)) == [expected, expected[-1]]


@pytest.mark.parametrize(
    "env,message",
    [
        ({"PREFERRED_DEVICE": "npu:7"}, "npu:7 selects npu:7, but this process sees 2 NPU device(s): npu:0, npu:1"),
        ({"LOCAL_RANK": "3"}, "LOCAL_RANK=3 selects npu:3"),
        ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not a non-negative integer"),
        ({"PREFERRED_DEVICE": "cuda"}, "PREFERRED_DEVICE=cuda, but no CUDA device"),
    ],
)
def test_device_index_errors(env: dict[str, str], message: str) -> None:
    code = PRELUDE + "try:\n    from_env()\nexcept device_utils.DeviceError as e:\n    print(e)"
    assert message in run_standin(code, env=env).stdout


def test_npu_without_visible_devices() -> None:
    code = PRELUDE + "try:\n    device_utils.DeviceManager('npu')\nexcept device_utils.DeviceError as e:\n    print(e)"
    assert "no NPU is visible" in run_standin(code, {"available": False}).stdout


@pytest.mark.parametrize(
    "config,env,expected",
    [
        ({"bf16": False}, {}, "fp16"),
        ({"dtype_ok": ["fp16", "fp32"]}, {}, "fp16"),
        ({"dtype_ok": ["fp32"]}, {}, "fp32"),
        ({}, {"PREFERRED_DTYPE": "fp32"}, "fp32"),
        ({}, {"PREFERRED_DTYPE": "fp16"}, "fp16"),
    ],
)
def test_npu_dtype_choice(config: dict[str, object], env: dict[str, str], expected: str) -> None:
    code = PRELUDE + "print(from_env().dtype_name)"
    assert ok(run_standin(code, config, env)) == [expected]


def test_npu_dtype_requests_it_cannot_run() -> None:
    code = PRELUDE + "try:\n    from_env()\nexcept device_utils.DeviceError as e:\n    print(e)"
    out = run_standin(code, {"bf16": False}, {"PREFERRED_DTYPE": "bf16"}).stdout
    assert "PREFERRED_DTYPE=bf16, but npu:0 does not support bf16" in out
    out = run_standin(code, {"dtype_ok": ["fp32"]}, {"PREFERRED_DTYPE": "fp16"}).stdout
    assert "PREFERRED_DTYPE=fp16, but a test op in fp16 fails or gives NaN on npu:0" in out


@pytest.mark.parametrize("spec,env", [("npu:1", {}), (None, {"LOCAL_RANK": "1"})])
def test_npu_memory_and_cache_calls_use_the_chosen_card(spec: str | None, env: dict[str, str]) -> None:
    """The stand-in keeps figures per card (card 1 differs from card 0 in each), so reading card 0 is caught."""
    code = PRELUDE + (
        f"dm = device_utils.DeviceManager({spec!r})\n"
        "npu.set_device(0)  # the current device must not matter: every call names the chosen card\n"
        "s = dm.memory_stats()\n"
        "dm.empty_cache(); dm.synchronize(); dm.reset_peak_memory_stats()\n"
        "print(json.dumps([s.as_dict(), [c for c in npu.calls]]))"
    )
    result = run_standin(code, env=env)
    assert result.returncode == 0, result.stderr
    stats, calls = json.loads(result.stdout)
    assert stats["allocated"] == 13 * 2**30 and stats["reserved"] == 14 * 2**30 and stats["peak"] == 15 * 2**30
    assert (stats["free"], stats["total"]) == (40 * 2**30, 64 * 2**30)
    assert stats["device"] == "npu:1" and stats["device_name"] == "Ascend910B-standin-1" and stats["host_rss"] > 0
    assert calls == [["set_device", [1]], ["set_device", [0]], ["empty_cache", []], ["synchronize", [1]],
                     ["reset_peak_memory_stats", [1]]]


def test_standin_memory_getters_follow_the_device_index() -> None:
    code = (
        "print(npu.memory_allocated(0), npu.memory_allocated('npu:1'), npu.memory_allocated())\n"
        "npu.set_device(1)\n"
        "print(npu.memory_allocated(), npu.mem_get_info()[0], npu.get_device_name())\n"
        "try:\n    npu.memory_allocated(2)\nexcept RuntimeError as e:\n    print('refused', e)\n"
    )
    lines = ok(run_standin(code))
    gib = 2**30
    assert lines[:6] == [str(3 * gib), str(13 * gib), str(3 * gib), str(13 * gib), str(40 * gib),
                         "Ascend910B-standin-1"]
    assert lines[6:8] == ["refused", "Invalid"]


def test_standin_fusion_attention_has_the_real_signature() -> None:
    """torch_npu 2.13.0: (query, key, value, head_num, input_layout, pse=None, ..., scale=1., keep_prob=1., ...)."""
    code = (
        "import torch\n"
        "fa = sys.modules['torch_npu'].npu_fusion_attention\n"
        "q = torch.randn(1, 2, 4, 8)\n"
        "out = fa(q, q, q, 2, 'BNSD', scale=0.5, keep_prob=1.0)[0]\n"
        "ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, scale=0.5)\n"
        "print(bool(torch.allclose(out, ref, atol=1e-6)))\n"
        "for call in (lambda: fa(q, q, q, 2, 'BNSD', 0.5), lambda: fa(q, q, q, 2, 'BNSD', scales=0.5),\n"
        "             lambda: fa(q, q, q, 2, 'BSND', scale=0.5), lambda: fa(q, q, q, 2, 'NSD', scale=0.5)):\n"
        "    try:\n        call()\n        print('accepted')\n"
        "    except (TypeError, ValueError, RuntimeError) as e:\n        print(type(e).__name__)\n"
    )
    assert ok(run_standin(code)) == ["True", "TypeError", "TypeError", "RuntimeError", "ValueError"]


def test_standin_device_moves_compute_on_cpu_and_broken_dtypes_give_nan() -> None:
    code = (
        "import torch\n"
        "x = torch.ones(2)\n"
        "print(x.to('npu:1', torch.float16).tolist(), x.to('npu', torch.bfloat16).isnan().all().item())\n"
        "print(x.to(torch.bfloat16).tolist())\n"
    )
    assert ok(run_standin(code, {"dtype_ok": ["fp16", "fp32"]})) == ["[1.0,", "1.0]", "True", "[1.0,", "1.0]"]


def test_npu_generator_falls_back_with_one_warning() -> None:
    code = PRELUDE + (
        "dm = from_env()\n"
        "g1 = dm.create_generator(3); g2 = dm.create_generator(4)\n"
        "print(g1.device, dm.create_generator(3, on='cpu').device)"
    )
    result = run_standin(code)
    assert ok(result) == ["cpu", "cpu"]
    assert result.stderr.count("random stream differs") == 1


def test_npu_memory_modes_target_the_npu() -> None:
    code = (
        "from test_device_utils import RecordingPipe\n"
        "dm = device_utils.DeviceManager('npu:1')\n"
        "for mode in ('none', 'model', 'sequential'):\n"
        "    pipe = RecordingPipe(); dm.set_memory_efficient_mode(pipe, mode); print(*pipe.calls[0], sep=',')"
    )
    assert ok(run_standin(PRELUDE + code)) == ["to,npu:1", "model,npu:1", "sequential,npu:1"]


def test_npu_fused_attention_runs_the_fused_kernel() -> None:
    code = PRELUDE + (
        "import torch\n"
        "from test_device_utils import small_transformer, transformer_inputs\n"
        "from hidream_edit.attention import install_attention\n"
        "dm = from_env()\n"
        "t = small_transformer(); inputs = transformer_inputs(16)\n"
        "with torch.no_grad():\n"
        "    ref = t(**inputs).sample\n"
        "    print(install_attention(t, dm, 'npu_fused'))\n"
        "    out = t(**inputs).sample\n"
        "print(sys.modules['torch_npu'].fusion_calls, bool(torch.allclose(ref, out, atol=1e-4)))"
    )
    assert ok(run_standin(code, env={"PYTHONPATH": str(REPO / "tests")})) == ["npu_fused", "2", "True"]
