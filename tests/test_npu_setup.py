"""The environment doctor (test_npu_setup.py): each check's PASS and FAIL/WARN paths, on CPU.

NPU-present paths run through the stand-in torch_npu in subprocesses; environment, PATH and loader
lookups are monkeypatched; model folders are fakes in tmp_path.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from npu_standin import REPO, load_doctor, run_standin

import device_utils

LIBHCCL = "libhccl.so: cannot open shared object file: No such file or directory"
# Settings the test session puts into this process's environment (conftest sets HF_HUB_OFFLINE) that a
# user's plain run of the doctor would not have.
USER_SETTINGS = (
    "PREFERRED_DEVICE",
    "PREFERRED_DTYPE",
    "LOCAL_RANK",
    "HIDREAM_ATTENTION",
    "HF_HUB_OFFLINE",
    "HIDREAM_LLAMA_PATH",
    "HIDREAM_I1_PATH",
    "HIDREAM_E1_PATH",
    "HIDREAM_E1_FULL_PATH",
)


doctor = load_doctor()

# Code run in stand-in subprocesses: load the doctor, run checks, print them as JSON.
STANDIN_PRELUDE = (
    "import json, torch, test_npu_setup as doctor\n"
    "def dump(*checks):\n"
    "    print(json.dumps([c.as_dict() for c in checks]))\n"
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)


def versions(monkeypatch: pytest.MonkeyPatch, **installed: str | None) -> None:
    """Make package_version report these versions (dashes spelled as underscores); others as really installed."""
    real = doctor.package_version
    table = {name.replace("_", "-"): version for name, version in installed.items()}
    monkeypatch.setattr(doctor, "package_version", lambda name: table[name] if name in table else real(name))


def by_name(checks: list[Any]) -> dict[str, Any]:
    return {check.name: check for check in checks}


def standin_checks(code: str, config: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> dict:
    result = run_standin(STANDIN_PRELUDE + textwrap.dedent(code), config, env)
    assert result.returncode == 0, result.stderr
    return {c["name"]: c for c in json.loads(result.stdout.strip().splitlines()[-1])}


# ---------------------------------------------------------------------------------------------- versions


def test_python_check(monkeypatch: pytest.MonkeyPatch) -> None:
    assert doctor.check_python().status == "PASS"
    monkeypatch.setattr(doctor, "MIN_PYTHON", (99, 0))
    check = doctor.check_python()
    assert check.status == "FAIL" and "99.0" in check.fix


def test_torch_check(monkeypatch: pytest.MonkeyPatch) -> None:
    assert doctor.check_torch().status == "PASS"
    versions(monkeypatch, torch=None, torch_npu="2.13.0")
    check = doctor.check_torch()
    assert check.status == "FAIL" and check.fix == "pip install torch==2.13.0"


@pytest.mark.parametrize(
    "torch_version,npu_version,status,text",
    [
        ("2.13.0+cpu", "2.13.0", "PASS", "matches"),
        ("2.13.0+cpu", None, "WARN", "pip install torch-npu==2.13.0"),
        ("2.12.1", "2.13.0", "FAIL", "pip install torch==2.13.0"),
        ("2.1.1", "2.1.0.post8", "WARN", "pip install torch==2.1.0"),
        ("2.6.0", "2.6.0rc1", "PASS", "matches"),
    ],
)
def test_torch_npu_version_match(
    torch_version: str, npu_version: str | None, status: str, text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    versions(monkeypatch, torch=torch_version, torch_npu=npu_version)
    check = doctor.check_torch_npu_version()
    assert check.status == status, check
    assert text in check.detail + check.fix


def test_versions_are_read_from_metadata_not_imports() -> None:
    assert doctor.package_version("torch") == torch.__version__
    assert doctor.package_version("no-such-package-xyz") is None


# ---------------------------------------------------------------------------------------------- CANN


@pytest.fixture
def no_default_cann(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ignore any CANN installed in the default places of the machine running the tests."""
    monkeypatch.setattr(doctor, "SET_ENV_CANDIDATES", ())


def fake_toolkit(root: Path) -> tuple[Path, Path]:
    """A CANN-like layout: <root>/ascend-toolkit/set_env.sh and the `latest` dir the variables point at."""
    latest = root / "ascend-toolkit" / "latest"
    latest.mkdir(parents=True)
    set_env = root / "ascend-toolkit" / "set_env.sh"
    set_env.write_text("export ASCEND_TOOLKIT_HOME=...\n")
    return latest, set_env


@pytest.mark.usefixtures("no_default_cann")
def test_cann_env_missing_is_warn_without_torch_npu_and_fail_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    versions(monkeypatch, torch_npu=None)
    check = doctor.check_cann_env({})
    assert check.status == "WARN" and "are not set" in check.detail
    assert check.fix.startswith("source /usr/local/Ascend/ascend-toolkit/set_env.sh")
    versions(monkeypatch, torch_npu="2.13.0")
    assert doctor.check_cann_env({}).status == "FAIL"


@pytest.mark.usefixtures("no_default_cann")
def test_cann_env_found_names_its_set_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    versions(monkeypatch, torch_npu="2.13.0")
    latest, set_env = fake_toolkit(tmp_path)
    env = {"ASCEND_TOOLKIT_HOME": str(latest), "ASCEND_HOME_PATH": str(latest)}
    check = doctor.check_cann_env(env)
    assert check.status == "PASS" and str(set_env) in check.detail
    assert doctor.cann_fix(env) == f"source {set_env}"


@pytest.mark.usefixtures("no_default_cann")
def test_cann_env_pointing_nowhere_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    versions(monkeypatch, torch_npu="2.13.0")
    check = doctor.check_cann_env({"ASCEND_HOME_PATH": str(tmp_path / "gone")})
    assert check.status == "FAIL" and "does not exist" in check.detail
    latest, _ = fake_toolkit(tmp_path)
    (tmp_path / "ascend-toolkit" / "set_env.sh").unlink()
    assert doctor.check_cann_env({"ASCEND_HOME_PATH": str(latest)}).status == "WARN"


def test_cann_libraries_on_ld_library_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor.ctypes.util, "find_library", lambda name: None)
    for name in ("libascendcl.so", "libhccl.so"):
        (tmp_path / name).write_bytes(b"\x7fELF")
    check = doctor.check_cann_libraries({"LD_LIBRARY_PATH": f"/nonexistent:{tmp_path}"})
    assert check.status == "PASS" and str(tmp_path / "libhccl.so") in check.detail


@pytest.mark.usefixtures("no_default_cann")
def test_cann_libraries_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def find_library(name: str) -> str | None:
        asked.append(name)
        return "libhccl.so" if name == "hccl" else None

    monkeypatch.setattr(doctor.ctypes.util, "find_library", find_library)
    versions(monkeypatch, torch_npu="2.13.0")
    check = doctor.check_cann_libraries({})
    assert sorted(asked) == ["ascendcl", "hccl"]
    assert check.status == "FAIL" and check.detail.endswith(": libascendcl.so")
    assert "set_env.sh" in check.fix
    versions(monkeypatch, torch_npu=None)
    assert doctor.check_cann_libraries({}).status == "WARN"


NPU_SMI_TABLE = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 23.0.6                   Version: 23.0.6                                               |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     910B3               | OK            | 93.4        36                0    / 0             |
"""


def fake_tool(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_npu_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    assert doctor.check_npu_smi().status == "WARN"
    (tmp_path / "table.txt").write_text(NPU_SMI_TABLE)
    tool = fake_tool(tmp_path / "npu-smi", f'[ "$1" = info ] && cat {tmp_path / "table.txt"}\n')
    monkeypatch.setattr(doctor.shutil, "which", lambda name: str(tool))
    check = doctor.check_npu_smi()
    assert check.status == "PASS" and "npu-smi 23.0.6 Version: 23.0.6" in check.detail
    assert "---" not in check.detail and "===" not in check.detail


def test_npu_smi_failing_or_hanging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = fake_tool(tmp_path / "npu-smi", 'echo "dcmi module initialize failed. ret is -8005" >&2\nexit 1\n')
    monkeypatch.setattr(doctor.shutil, "which", lambda name: str(tool))
    check = doctor.check_npu_smi()
    assert check.status == "FAIL" and "dcmi module initialize failed" in check.detail
    fake_tool(tool, "sleep 5\n")
    check = doctor.check_npu_smi(timeout=0.5)
    assert check.status == "FAIL" and "did not finish" in check.detail


def fake_torch_npu(root: Path, body: str, entry_point: bool = False) -> dict[str, str]:
    """A torch_npu package (and optionally its torch.backends entry point) on a PYTHONPATH for subprocesses."""
    package = root / "torch_npu"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(body)
    if entry_point:
        info = root / "torch_npu-2.13.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.13.0\n")
        (info / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    return {**os.environ, "PYTHONPATH": str(root)}


def test_torch_npu_import_probe_reports_exact_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    versions(monkeypatch, torch_npu="2.13.0")
    latest, set_env = fake_toolkit(tmp_path / "cann")
    env = fake_torch_npu(tmp_path / "site", f"raise ImportError({LIBHCCL!r})\n")
    env["ASCEND_HOME_PATH"] = str(latest)
    check = doctor.check_torch_npu_import(env)
    assert check.status == "FAIL"
    assert check.detail == f"`import torch; import torch_npu` fails: ImportError: {LIBHCCL}"
    assert check.fix == f"source {set_env}"


def test_torch_npu_import_probe_passes_or_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    versions(monkeypatch, torch_npu=None)
    assert doctor.check_torch_npu_import().detail.startswith("skipped")
    versions(monkeypatch, torch_npu="2.13.0")
    env = fake_torch_npu(tmp_path, "__version__ = '2.13.0'\n")
    check = doctor.check_torch_npu_import(env)
    assert check.status == "PASS" and "2.13.0" in check.detail


def test_torch_autoload_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch calls the torch.backends entry point on `import torch`; a failing one kills the import."""
    versions(monkeypatch, torch_npu="2.13.0")
    env = fake_torch_npu(tmp_path / "bad", f"raise ImportError({LIBHCCL!r})\n", entry_point=True)
    env[doctor.AUTOLOAD_VAR] = "0"  # the probe must drop it: it checks what scripts without it see
    check = doctor.check_torch_autoload(env)
    assert check.status == "FAIL"
    assert "RuntimeError: Failed to load the backend extension: torch_npu" in check.detail
    assert "set_env.sh" in check.fix
    env = fake_torch_npu(tmp_path / "good", "def _autoload():\n    pass\n", entry_point=True)
    assert doctor.check_torch_autoload(env).status == "PASS"


# ---------------------------------------------------------------------------------------------- devices


def test_devices_on_this_cpu_machine() -> None:
    npu = doctor.check_npu_devices()
    assert npu.status == "WARN" and "torch_npu is not installed" in npu.detail
    cuda = doctor.check_cuda_devices()
    assert (cuda.status, cuda.detail) == ("WARN", "none: no CUDA device is visible to this torch build")
    choice, dm = doctor.check_device_choice()
    assert choice.status == "PASS" and choice.detail.startswith("cpu (") and "fp32" in choice.detail
    assert dm.device == torch.device("cpu")


def test_cuda_devices_present_are_listed_and_a_broken_query_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    checks = standin_checks("dump(doctor.check_cuda_devices())\n", {"available": False, "cuda_count": 2})
    assert checks["CUDA devices"]["status"] == "PASS"
    assert checks["CUDA devices"]["detail"] == "2 visible: CUDA-standin-0, CUDA-standin-1"

    def broken(*args: object) -> int:
        raise RuntimeError("CUDA driver initialization failed\nmore")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", broken)
    check = doctor.check_cuda_devices()
    assert check.status == "FAIL" and check.detail.endswith("cannot be queried: CUDA driver initialization failed")
    assert "nvidia-smi" in check.fix


def test_device_choice_errors_are_fail() -> None:
    check, dm = doctor.check_device_choice("cuda")
    assert dm is None and check.status == "FAIL" and "no CUDA device" in check.detail
    check, _ = doctor.check_device_choice("npu")
    assert check.status == "FAIL" and "torch_npu is not installed" in check.detail


def test_devices_with_standin_npu() -> None:
    checks = standin_checks(
        """
        choice, dm = doctor.check_device_choice()
        import device_utils
        device_utils.host_available_memory = lambda: 512 * 2**30
        dump(doctor.check_npu_devices(), doctor.check_cuda_devices(), choice, doctor.check_memory_plan(dm)[0],
             *doctor.check_attention(torch.device("cpu"), torch.float32, npu=True))
        assert sys.modules["torch_npu"].fusion_calls == 1
        """,
        env={"ASCEND_RT_VISIBLE_DEVICES": "4,5"},
    )
    assert checks["NPU devices"]["status"] == "PASS"
    assert checks["NPU devices"]["detail"] == "2 visible (ASCEND_RT_VISIBLE_DEVICES=4,5): Ascend910B-standin-0, " + (
        "Ascend910B-standin-1"
    )
    assert checks["device choice"]["detail"].startswith("npu:0 (Ascend910B-standin-0), bf16")
    plan = checks["memory plan"]
    assert plan["status"] == "PASS" and plan["detail"].startswith("e1.1 in bf16, attention sdpa: --offload auto uses")
    assert "split (npu:0 needs 37.6 GiB of 50.0 GiB; npu:1 needs 25.4 GiB of 40.0 GiB;" in plan["detail"]
    assert checks["attention npu_fused"]["status"] == "PASS"
    assert "max diff to math" in checks["attention npu_fused"]["detail"]


def test_standin_dtype_choice_and_errors() -> None:
    fp16_only = {"bf16": False, "dtype_ok": ["fp16", "fp32"], "free": 30 * 2**30, "total": 32 * 2**30}
    code = (
        "import device_utils\ndevice_utils.host_available_memory = lambda: 512 * 2**30\n"
        "choice, dm = doctor.check_device_choice()\ndump(choice, doctor.check_memory_plan(dm)[0])\n"
    )
    checks = standin_checks(code, fp16_only)
    assert ", fp16 [" in checks["device choice"]["detail"]
    plan = checks["memory plan"]
    assert plan["status"] == "WARN" and "e1.1 in fp16" in plan["detail"]
    assert "--offload auto uses group" in plan["detail"]
    assert plan["fix"].startswith("slower than resident weights (none: npu:0 needs")
    checks = standin_checks("dump(doctor.check_device_choice()[0])\n", fp16_only, {"PREFERRED_DTYPE": "bf16"})
    failed = checks["device choice"]
    assert failed["status"] == "FAIL" and "does not support bf16" in failed["detail"]
    assert "PREFERRED_DTYPE=auto" in failed["fix"]


def test_standin_npu_without_cann() -> None:
    checks = standin_checks(
        "dump(doctor.check_npu_devices(), doctor.check_device_choice()[0])\n",
        {"import_error": LIBHCCL},
        {"PREFERRED_DEVICE": "npu"},
    )
    assert checks["NPU devices"]["status"] == "FAIL" and "libhccl.so not found" in checks["NPU devices"]["detail"]
    assert "set_env.sh" in checks["NPU devices"]["fix"]
    choice = checks["device choice"]
    assert choice["status"] == "FAIL" and choice["detail"].startswith("PREFERRED_DEVICE=npu, but torch_npu cannot load")
    assert "set_env.sh" in choice["fix"]


# ---------------------------------------------------------------------------------------------- precision


def test_precision_on_cpu() -> None:
    checks = by_name(doctor.check_precision(torch.device("cpu"), torch.float32))
    assert [c.status for c in checks.values()] == ["PASS", "PASS", "PASS"]
    assert "(chosen dtype)" in checks["precision fp32"].detail
    assert "matmul max rel err" in checks["precision bf16"].detail


def test_precision_nan_fails_chosen_dtype_and_warns_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "softmax", lambda x, dim: torch.full_like(x, float("nan")))
    checks = by_name(doctor.check_precision(torch.device("cpu"), torch.bfloat16))
    assert checks["precision bf16"].status == "FAIL" and "NaN or inf" in checks["precision bf16"].detail
    assert checks["precision fp32"].status == "WARN" and checks["precision fp16"].status == "WARN"


def test_precision_error_above_tolerance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(doctor.TOLERANCE, "fp16", 1e-9)
    checks = by_name(doctor.check_precision(torch.device("cpu"), torch.float32))
    assert checks["precision fp16"].status == "WARN" and "above 1e-09" in checks["precision fp16"].detail
    assert checks["precision fp32"].status == "PASS"


# ---------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_on_cpu(dtype: torch.dtype) -> None:
    checks = by_name(doctor.check_attention(torch.device("cpu"), dtype))
    assert checks["attention sdpa"].status == "PASS" and "(configured)" in checks["attention sdpa"].detail
    assert checks["attention math"].status == "PASS"
    assert checks["attention npu_fused"].detail.startswith("skipped: needs an NPU")


def test_attention_disagreeing_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(device_utils.ATTENTION_FUNCTIONS, "sdpa", lambda q, k, v: torch.zeros_like(q))
    checks = by_name(doctor.check_attention(torch.device("cpu"), torch.float32))
    assert checks["attention sdpa"].status == "FAIL" and "above" in checks["attention sdpa"].detail
    monkeypatch.setenv("HIDREAM_ATTENTION", "math")
    checks = by_name(doctor.check_attention(torch.device("cpu"), torch.float32))
    assert checks["attention sdpa"].status == "WARN"


def test_attention_failing_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("EZ9999: aclnnFlashAttentionScore failed")

    monkeypatch.setitem(device_utils.ATTENTION_FUNCTIONS, "npu_fused", broken)
    checks = by_name(doctor.check_attention(torch.device("cpu"), torch.float32, npu=True))
    assert checks["attention npu_fused"].status == "WARN" and "EZ9999" in checks["attention npu_fused"].detail
    monkeypatch.setenv("HIDREAM_ATTENTION", "npu_fused")
    checks = by_name(doctor.check_attention(torch.device("cpu"), torch.float32, npu=True))
    assert checks["attention npu_fused"].status == "FAIL"


def test_a_bad_attention_variable_fails_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIDREAM_ATTENTION", "garbage")
    checks = by_name(doctor.check_attention(torch.device("cpu"), torch.float32))
    assert checks["attention setting"].status == "FAIL"
    assert checks["attention setting"].detail.startswith("HIDREAM_ATTENTION='garbage' is not an attention kernel")
    assert checks["attention sdpa"].status == "PASS"  # the kernels are still checked, sdpa as the configured one


# ---------------------------------------------------------------------------------------------- packages


def test_packages_installed_here() -> None:
    checks = by_name(doctor.check_packages())
    assert {c.status for c in checks.values()} == {"PASS"}
    assert "HiDreamImagePipeline" in checks["package diffusers"].detail
    assert set(checks) == {f"package {name}" for name, _ in doctor.PACKAGES}


def test_packages_missing_old_or_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    versions(monkeypatch, gradio=None, peft=None, transformers="4.40.0")
    monkeypatch.setattr(doctor, "hidream_import_error", lambda: f"ImportError: {LIBHCCL}")
    checks = by_name(doctor.check_packages())
    assert checks["package gradio"].status == "WARN"
    assert checks["package peft"].status == "FAIL" and checks["package peft"].fix.startswith("pip install 'peft>=")
    assert checks["package transformers"].status == "FAIL" and "older than" in checks["package transformers"].detail
    diffusers = checks["package diffusers"]
    assert diffusers.status == "FAIL" and LIBHCCL in diffusers.detail and "set_env.sh" in diffusers.fix


def test_root_cause_of_wrapped_import_error() -> None:
    try:
        try:
            raise ImportError(LIBHCCL)
        except ImportError as inner:
            raise RuntimeError("Failed to import diffusers.pipelines.x because of the following error") from inner
    except RuntimeError as outer:
        assert str(doctor.root_cause(outer)) == LIBHCCL


# ---------------------------------------------------------------------------------------------- models


def write(path: Path, data: bytes | str = b"\0" * 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def sharded(folder: Path, stem: str, shards: int) -> list[Path]:
    names = [f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    write(
        folder / f"{stem}.safetensors.index.json", json.dumps({"weight_map": {f"w{i}": n for i, n in enumerate(names)}})
    )
    for name in names:
        write(folder / name, b"\0" * 1000)
    return [folder / name for name in names]


def fake_model_folders(root: Path) -> dict[str, Path]:
    """Llama, I1 and E1.1 folders in the hub layout, with placeholder weight files."""
    llama, i1, e1 = root / "llama", root / "i1", root / "e1"
    write(llama / "config.json", "{}")
    write(llama / "tokenizer.json", "{}")
    sharded(llama, "model", 2)
    write(i1 / "model_index.json", "{}")
    write(i1 / "scheduler" / "scheduler_config.json", "{}")
    write(i1 / "transformer" / "config.json", "{}")
    for part in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        write(i1 / part / "config.json", "{}")
        write(i1 / part / "model.safetensors", b"\0" * 500)
    for part in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        (i1 / part).mkdir(parents=True)
    sharded(e1 / "transformer", "diffusion_pytorch_model", 3)
    return {"llama": llama, "i1": i1, "e1": e1}


@pytest.fixture
def no_hub_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub ids are never in the local cache, whatever this machine's cache holds; no network either."""
    import huggingface_hub

    def snapshot_download(repo_id: str, **kwargs: Any) -> str:
        assert kwargs.get("local_files_only"), "the doctor must not download"
        raise FileNotFoundError(f"{repo_id} is not in the local cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def model_checks(folders: dict[str, Path], **env: str) -> dict[str, Any]:
    checks, _ = doctor.check_models(
        "e1.1", str(folders["llama"]), str(folders["i1"]), str(folders["e1"]), tiny=False, env=env
    )
    return by_name(checks)


def test_complete_model_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folders = fake_model_folders(tmp_path)
    monkeypatch.setattr(doctor, "EXPECTED_WEIGHT_BYTES", {("e1.1", "llama"): 1500, ("e1.1", "edit"): 10_000})
    checks = model_checks(folders)
    assert checks["model files"].status == "PASS" and checks["model files"].detail.endswith("complete")
    assert checks["model size llama"].status == "PASS" and "2.0 kB of weights" in checks["model size llama"].detail
    assert checks["model size i1"].detail.startswith("2.0 kB") and "no reference size" in checks["model size i1"].detail
    edit = checks["model size edit"]
    assert edit.status == "WARN" and "3.0 kB" in edit.detail and "truncated" in edit.fix


def test_real_size_expectations_flag_small_folders(tmp_path: Path) -> None:
    checks = model_checks(fake_model_folders(tmp_path))
    assert checks["model size llama"].status == "WARN" and "expected about 16 GB" in checks["model size llama"].detail
    assert "expected about 34 GB" in checks["model size edit"].detail


def test_missing_shard_fails(tmp_path: Path) -> None:
    folders = fake_model_folders(tmp_path)
    (folders["e1"] / "transformer" / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    check = model_checks(folders)["model files"]
    assert check.status == "FAIL" and "diffusion_pytorch_model-00002-of-00003.safetensors" in check.detail
    assert "--*-path" in check.fix


@pytest.mark.usefixtures("no_hub_cache")
def test_hub_ids_not_downloaded_warn_or_fail_offline(tmp_path: Path) -> None:
    folders = fake_model_folders(tmp_path)
    checks, sources = doctor.check_models("e1.1", llama_path=str(folders["llama"]), env={})
    check = by_name(checks)["model files"]
    assert check.status == "WARN" and "HiDream-ai/HiDream-I1-Full, HiDream-ai/HiDream-E1-1" in check.detail
    assert sources.i1 == "HiDream-ai/HiDream-I1-Full" and set(by_name(checks)) == {"model files", "model size llama"}
    checks, _ = doctor.check_models("e1.1", env={"HF_HUB_OFFLINE": "1"})
    assert by_name(checks)["model files"].status == "FAIL"
    assert by_name(checks)["model files"].fix.startswith("hf download <id>")


@pytest.mark.usefixtures("no_hub_cache")
def test_env_variables_choose_folders(tmp_path: Path) -> None:
    folders = fake_model_folders(tmp_path)
    env = {
        "HIDREAM_LLAMA_PATH": str(folders["llama"]),
        "HIDREAM_I1_PATH": str(folders["i1"]),
        "HIDREAM_E1_PATH": str(folders["e1"]),
    }
    checks, sources = doctor.check_models("e1.1", env=env)
    assert by_name(checks)["model files"].status == "PASS" and sources.edit == str(folders["e1"])


def test_tiny_models(tiny_checkpoints: Any) -> None:
    env = {"HIDREAM_TINY_DIR": str(tiny_checkpoints.root)}
    for model in ("e1.1", "e1-full"):
        checks = by_name(doctor.check_models(model, tiny=True, env=env)[0])
        assert checks["model files"].status == "PASS" and "(tiny)" in checks["model files"].detail
        assert {c.status for c in checks.values()} == {"PASS"} and "tiny set" in checks["model size edit"].detail


def test_an_unwritable_tiny_folder_fails_naming_it_and_the_variable(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    folder = tmp_path / "a-file" / "tiny"
    checks, sources = doctor.check_models("e1.1", tiny=True, env={"HIDREAM_TINY_DIR": str(folder)})
    assert sources is None and checks[0].status == "FAIL"
    assert checks[0].detail.startswith(f"cannot build the tiny checkpoints in {folder}: ")
    assert "HIDREAM_TINY_DIR" in checks[0].detail


def test_model_flag_errors_fail() -> None:
    checks, sources = doctor.check_models("e1.1", llama_path="/x", tiny=True, env={})
    assert sources is None and checks[0].status == "FAIL" and "--llama-path" in checks[0].detail


def test_check_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    timeouts: list[float] = []

    class FakeApi:
        def model_info(self, repo_id: str, timeout: float) -> Any:
            timeouts.append(timeout)
            if repo_id.startswith("meta-llama/"):
                raise PermissionError("401 Client Error: gated repo")
            return types.SimpleNamespace(sha="0123456789abcdef")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    sources = types.SimpleNamespace(
        llama="meta-llama/Llama-3.1-8B-Instruct", i1="HiDream-ai/HiDream-I1-Full", edit=str(REPO)
    )
    checks = by_name(doctor.check_hub(sources))
    assert checks["hub llama"].status == "WARN" and "gated repo" in checks["hub llama"].detail
    assert checks["hub i1"].status == "PASS" and "0123456789ab" in checks["hub i1"].detail
    assert "hub edit" not in checks and timeouts == [10.0, 10.0]
    assert "`hf auth login`" in checks["hub llama"].fix


@pytest.mark.parametrize("command", [["download", "--help"], ["auth", "login", "--help"]])
def test_the_hub_commands_the_fixes_name_exist(command: list[str]) -> None:
    """huggingface_hub 1.x ships only the `hf` CLI; `huggingface-cli download` / `login` no longer exist."""
    hf = Path(sys.executable).parent / "hf"
    result = subprocess.run([str(hf), *command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------- memory


def described_plan(host: str, host_memory: int = 512 * 2**30) -> Any:
    from hidream_edit.models import table_sizes
    from hidream_edit.placement import described_budgets, plan_placement
    from hidream_edit.spec import MODELS

    spec = MODELS["e1.1"]
    sizes = table_sizes(spec, "bf16")
    return plan_placement(spec, sizes, described_budgets(host, host_memory=host_memory))


def test_memory_plan_check_statuses() -> None:
    """The doctor shows the loader's plan: full speed PASS, offloading WARN, nothing fits FAIL."""
    big = doctor.memory_plan_check(described_plan("1x64GiB"))
    assert big.status == "PASS" and "--offload auto uses none (npu:0 needs 62.0 GiB of 64.0 GiB" in big.detail
    card = doctor.memory_plan_check(described_plan("1x48GiB"))
    assert card.status == "WARN" and "uses model" in card.detail
    assert "encoders: npu:0 needs 51.6 GiB of 48.0 GiB" in card.fix
    small = doctor.memory_plan_check(described_plan("1x4GiB"))
    assert small.status == "FAIL" and "does not fit" in small.detail
    host = doctor.memory_plan_check(described_plan("1x64GiB", host_memory=8 * 2**30))
    assert host.status == "FAIL" and "at least 13.6 GiB of host memory" in host.detail


def test_memory_plan_on_the_cpu(tiny_env: dict[str, str]) -> None:
    from hidream_edit.config import resolve_model_sources
    from hidream_edit.spec import MODELS

    dm = device_utils.DeviceManager("cpu", "fp32")
    tiny = resolve_model_sources(MODELS["e1.1"], tiny=True, env=tiny_env)
    check, plan = doctor.check_memory_plan(dm, "e1.1", tiny)
    assert check.status == "PASS" and check.detail.endswith("fits (CPU runs are slow)")
    assert plan.sizes.sources["transformer"] == "headers"
    real, _ = doctor.check_memory_plan(dm, "e1.1")
    assert real.status in ("PASS", "WARN")
    assert real.status == "PASS" or ("does not fit: on the CPU" in real.detail and "--tiny" in real.fix)
    assert doctor.check_memory_plan(None)[0].status == "WARN"


# ---------------------------------------------------------------------------------------------- smoke


def test_smoke_edit_runs_the_cli() -> None:
    check = doctor.check_smoke()
    assert check.status == "PASS", check
    assert check.detail.startswith("2-step tiny edit in ") and "saved " in check.detail
    assert check.data == {"placement": "none", "device": "cpu", "predicted_peak_bytes": None,
                          "measured_peak_bytes": None}
    assert "data" in check.as_dict() and "data" not in doctor.Check("x", "PASS", "y").as_dict()


def test_smoke_edit_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "fake_cli.py"
    script.write_text("import sys\nprint('error: --tiny checkpoints are broken', file=sys.stderr)\nsys.exit(2)\n")
    monkeypatch.setattr(doctor, "SMOKE_SCRIPT", str(script))
    check = doctor.check_smoke()
    assert check.status == "FAIL" and check.detail.startswith("exit 2 after ")
    assert check.detail.endswith("error: --tiny checkpoints are broken")
    monkeypatch.setattr(doctor, "SMOKE_SCRIPT", str(tmp_path / "missing.py"))
    assert "not found" in doctor.check_smoke().detail


# ---------------------------------------------------------------------------------------------- output


def test_human_output_is_aligned_one_line_per_check(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    checks = [doctor.Check("python", "PASS", "3.11.7"), doctor.Check("CANN libraries", "FAIL", "missing", "source x")]
    monkeypatch.setattr(doctor, "run_checks", lambda args: checks)
    assert doctor.main([]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "PASS  python          3.11.7",
        "FAIL  CANN libraries  missing  -> fix: source x",
        "1 passed, 0 warnings, 1 failed",
    ]
    monkeypatch.setattr(doctor, "run_checks", lambda args: checks[:1])
    assert doctor.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"name": "python", "status": "PASS", "detail": "3.11.7", "fix": ""}]


def test_script_on_this_cpu_machine() -> None:
    """The one real run: exit 0 on a CPU-only machine, the missing NPU a WARN, JSON of the documented shape."""
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    result = subprocess.run(
        [sys.executable, str(REPO / "test_npu_setup.py"), "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    checks = json.loads(result.stdout)
    print("\n".join(f"{c['status']} {c['name']}: {c['detail']}" for c in checks))
    assert result.returncode == 0, [c for c in checks if c["status"] == "FAIL"]
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in checks)
    assert all(c["status"] in ("PASS", "WARN", "FAIL") and isinstance(c["detail"], str) for c in checks)
    statuses = {c["name"]: c["status"] for c in checks}
    assert statuses["NPU devices"] == "WARN" and statuses["device choice"] == "PASS"
    assert "smoke edit" not in statuses and not any(name.startswith("hub ") for name in statuses)
