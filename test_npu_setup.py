"""The environment doctor: can this machine run HiDream-E1 on Ascend NPU (or CUDA / CPU)?

    python test_npu_setup.py                 # all checks, one line each
    python test_npu_setup.py --smoke         # plus a timed two-step edit with the tiny model
    python test_npu_setup.py --json          # machine-readable list of {name, status, detail, fix}
    python test_npu_setup.py --full-size --json run.json   # E1.1 at the real sizes, random weights: speed, memory

Why: on an Ascend host most failures are environmental (torch / torch_npu mismatch, CANN not sourced,
no visible NPU, a dtype the card cannot run, incomplete weights, too little device memory). Each check
here is a small function returning a `Check` with PASS / WARN / FAIL and a one-line fix, so every one
can be tested alone. The exit code is 0 only when nothing FAILed; a missing NPU on a CPU-only machine
is a WARN. Nothing here touches the network unless --check-hub is given.
"""

from __future__ import annotations

import argparse
import ctypes.util
import functools
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # `import torch` must survive a missing CANN

from hidream_edit.config import (  # noqa: E402  (after the autoload switch)
    ENV_ATTENTION,
    ENV_DEVICE,
    ENV_DTYPE,
    EXIT_USER_ERROR,
    FULL_SIZE_ONLY,
    OneLineArgumentParser,
    add_device_arguments,
    add_full_size_arguments,
    add_model_choice_argument,
    add_model_source_arguments,
    attention_from_env,
    edit_path_from_args,
    environment,
    full_size_settings_from_args,
    model_spec,
)
from hidream_edit.errors import UserError  # noqa: E402
from hidream_edit.full_size import SPEC as FULL_SIZE_SPEC  # noqa: E402
from hidream_edit.spec import MODELS, REAL_PARAMETERS, ModelSpec  # noqa: E402

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parent
AUTOLOAD_VAR = "TORCH_DEVICE_BACKEND_AUTOLOAD"
PASS, WARN, FAIL = "PASS", "WARN", "FAIL"

CANN_HOME_VARS = ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME")
CANN_LIBRARIES = ("libascendcl.so", "libhccl.so")
DEFAULT_SET_ENV = "/usr/local/Ascend/ascend-toolkit/set_env.sh"
SET_ENV_CANDIDATES: tuple[Path, ...] = (
    Path(DEFAULT_SET_ENV),
    Path("/usr/local/Ascend/cann/set_env.sh"),
    Path.home() / "Ascend" / "ascend-toolkit" / "set_env.sh",
)
MIN_PYTHON = (3, 11)

# Relative matmul error, absolute softmax / attention error allowed per dtype against fp32. fp32 allows
# for NPUs that run fp32 matmuls in HF32.
TOLERANCE = {"fp32": 2e-3, "fp16": 5e-3, "bf16": 3e-2}

# (distribution name, required); missing optional packages are a WARN.
PACKAGES: tuple[tuple[str, bool], ...] = (
    ("diffusers", True),
    ("transformers", True),
    ("peft", True),
    ("safetensors", True),
    ("accelerate", True),
    ("pillow", True),
    ("gradio", False),
)

# Parameters of the full pipeline (the spec's real sizes, docs/ARCHITECTURE.md section 5).
COMPONENT_PARAMS: dict[str, float] = {
    "transformer": REAL_PARAMETERS["transformer"],
    "llama": REAL_PARAMETERS["llama"],
    "t5": REAL_PARAMETERS["t5"],
    "clips": REAL_PARAMETERS["clip_l"] + REAL_PARAMETERS["clip_g"] + REAL_PARAMETERS["vae"],
}


def expected_weight_bytes(spec: ModelSpec, role: str) -> float | None:
    """Weight bytes on disk (bf16) a model folder should at least roughly hold; None where unknown (a LoRA)."""
    if role == "llama":
        return 2 * COMPONENT_PARAMS["llama"]
    if role == "i1":
        encoders = COMPONENT_PARAMS["t5"] + COMPONENT_PARAMS["clips"]
        with_transformer = spec.needs_i1_transformer_weights(base_refine_weights=False)
        return 2 * (encoders + (COMPONENT_PARAMS["transformer"] if with_transformer else 0))
    return None if spec.uses_lora else 2 * COMPONENT_PARAMS["transformer"]


# Below 90% of these looks truncated.
EXPECTED_WEIGHT_BYTES: dict[tuple[str, str], float] = {
    (name, role): expected
    for name, spec in MODELS.items()
    for role in ("llama", "i1", "edit")
    if (expected := expected_weight_bytes(spec, role)) is not None
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SMOKE_SCRIPT = "inference_e1_1_npu.py"


@dataclass(frozen=True)
class Check:
    """One diagnosis: what was checked, its status, what was seen and how to fix it."""

    name: str
    status: str
    detail: str
    fix: str = ""
    data: dict[str, Any] | None = None  # measurements for --json (the smoke edit's predicted and measured peaks)

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        if self.data is None:
            del values["data"]
        return values


# ---------------------------------------------------------------------------------------------- helpers


def package_version(name: str) -> str | None:
    """Installed version of a distribution, read from metadata so it works even if the import fails."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_npu_installed() -> bool:
    return package_version("torch-npu") is not None


@functools.cache
def load_device_utils() -> ModuleType:
    """device_utils, imported with backend autoload off so a missing CANN cannot kill this process."""
    import device_utils

    return device_utils


def torch_import_error() -> str | None:
    """Why torch (through device_utils) cannot be imported in this process, or None."""
    try:
        load_device_utils()
    except Exception as exc:  # any import-time failure of torch must become a report, not a crash
        return f"{type(exc).__name__}: {first_line(exc)}"
    return None


def first_line(value: object) -> str:
    text = str(value).strip()
    return text.splitlines()[0] if text else ""


def release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as 2.13.0+cpu, 2.1.0.post8 or 2.6.0rc1."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if not match:
        return ()
    return tuple(int(part) for part in match.groups() if part is not None)


def find_set_env(env: Mapping[str, str] | None = None) -> Path | None:
    """The CANN set_env.sh: under ASCEND_HOME_PATH / ASCEND_TOOLKIT_HOME (or their parents), else a default."""
    env = environment(env)
    candidates: list[Path] = []
    for var in CANN_HOME_VARS:
        if env.get(var):
            home = Path(env[var]).expanduser()
            candidates += [home / "set_env.sh", home.parent / "set_env.sh", home.parent.parent / "set_env.sh"]
    for candidate in [*candidates, *SET_ENV_CANDIDATES]:
        if candidate.is_file():
            return candidate
    return None


def cann_fix(env: Mapping[str, str] | None = None) -> str:
    found = find_set_env(env)
    if found is not None:
        return f"source {found}"
    return f"source {DEFAULT_SET_ENV} (install the CANN toolkit first if it is not there)"


def last_error_line(stderr: str) -> str:
    """The final exception line of a traceback (or the last non-empty line)."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b", line):
            return line
    return lines[-1] if lines else ""


def gib(value: float) -> str:
    return f"{value / 2**30:.1f} GiB"


def human_bytes(value: float) -> str:
    """Decimal units, as model cards state sizes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{int(value)} B"


# ---------------------------------------------------------------------------------------------- versions


def check_python() -> Check:
    version = ".".join(str(part) for part in sys.version_info[:3])
    if sys.version_info[:2] < MIN_PYTHON:
        wanted = ".".join(str(part) for part in MIN_PYTHON)
        return Check("python", FAIL, f"{version} ({sys.executable})", f"use Python {wanted} or newer")
    return Check("python", PASS, f"{version} ({sys.executable})")


def check_torch() -> Check:
    version = package_version("torch")
    if version is None:
        npu = package_version("torch-npu")
        wanted = f"torch=={'.'.join(map(str, release(npu)))}" if npu else "torch"
        return Check("torch", FAIL, "not installed", f"pip install {wanted}")
    error = torch_import_error()
    if error:
        return Check("torch", FAIL, f"{version} installed but cannot be imported: {error}", "reinstall torch")
    return Check("torch", PASS, version)


def check_torch_npu_version() -> Check:
    """torch_npu X.Y only works with torch X.Y (it pins torch exactly)."""
    torch_version = package_version("torch")
    npu_version = package_version("torch-npu")
    if npu_version is None:
        wanted = ".".join(map(str, release(torch_version)[:3])) if torch_version else "<your torch version>"
        return Check(
            "torch_npu",
            WARN,
            "not installed (needed only on Ascend NPUs)",
            f"on an Ascend host: pip install torch-npu=={wanted}",
        )
    if torch_version is None:
        return Check(
            "torch_npu", FAIL, f"{npu_version}, but torch is not installed", f"pip install torch=={npu_version}"
        )
    torch_release, npu_release = release(torch_version), release(npu_version)
    pinned = ".".join(map(str, npu_release))
    if torch_release[:2] != npu_release[:2]:
        return Check(
            "torch_npu",
            FAIL,
            f"torch_npu {npu_version} needs torch {'.'.join(map(str, npu_release[:2]))}, but torch is {torch_version}",
            f"pip install torch=={pinned} (or the torch-npu release built for torch {torch_version})",
        )
    if torch_release != npu_release:
        return Check(
            "torch_npu",
            WARN,
            f"torch_npu {npu_version} was built for torch {pinned}, torch is {torch_version}",
            f"pip install torch=={pinned}",
        )
    return Check("torch_npu", PASS, f"{npu_version} matches torch {torch_version}")


# ---------------------------------------------------------------------------------------------- CANN


def check_cann_env(env: Mapping[str, str] | None = None) -> Check:
    """ASCEND_HOME_PATH / ASCEND_TOOLKIT_HOME are what CANN's set_env.sh exports."""
    env = environment(env)
    missing_status = FAIL if torch_npu_installed() else WARN
    found = {var: env[var] for var in CANN_HOME_VARS if env.get(var)}
    set_env = find_set_env(env)
    if not found:
        seen = f"; {set_env} exists" if set_env else "; no set_env.sh in the usual places"
        return Check(
            "CANN environment", missing_status, f"{' and '.join(CANN_HOME_VARS)} are not set{seen}", cann_fix(env)
        )
    absent = [f"{var}={value}" for var, value in found.items() if not Path(value).expanduser().is_dir()]
    if absent:
        return Check("CANN environment", missing_status, f"{', '.join(absent)} does not exist", cann_fix(env))
    listed = ", ".join(f"{var}={value}" for var, value in found.items())
    if set_env is None:
        return Check("CANN environment", WARN, f"{listed}; no set_env.sh found under it", cann_fix(env))
    return Check("CANN environment", PASS, f"{listed}; {set_env}")


def find_library(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """Where the loader would find lib<x>.so: an LD_LIBRARY_PATH directory, else ctypes.util.find_library."""
    env = environment(env)
    for directory in (env.get("LD_LIBRARY_PATH") or "").split(os.pathsep):
        if directory and (Path(directory) / name).is_file():
            return str(Path(directory) / name)
    stem = name.removeprefix("lib").split(".so")[0]
    return ctypes.util.find_library(stem)


def check_cann_libraries(env: Mapping[str, str] | None = None) -> Check:
    found = {name: find_library(name, env) for name in CANN_LIBRARIES}
    missing = [name for name, where in found.items() if where is None]
    if missing:
        status = FAIL if torch_npu_installed() else WARN
        detail = f"not found on LD_LIBRARY_PATH or by the loader: {', '.join(missing)}"
        return Check("CANN libraries", status, detail, cann_fix(env))
    return Check("CANN libraries", PASS, "; ".join(f"{name}: {where}" for name, where in found.items()))


def check_npu_smi(timeout: float = 15.0) -> Check:
    """npu-smi comes with the Ascend driver; `npu-smi info` failing means the driver or card is unwell."""
    path = shutil.which("npu-smi")
    if path is None:
        return Check(
            "npu-smi",
            WARN,
            "not found on PATH (Ascend driver not installed or not mounted)",
            "install the Ascend driver, or add /usr/local/sbin to PATH",
        )
    try:
        result = subprocess.run([path, "info"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Check("npu-smi", FAIL, f"`{path} info` did not finish in {timeout:.0f}s", "check the Ascend driver")
    except OSError as exc:
        return Check("npu-smi", FAIL, f"`{path} info` cannot run: {exc}", "check the Ascend driver")
    lines = [" ".join(line.strip("|+ ").split()) for line in result.stdout.splitlines()]
    lines = [line for line in lines if line and not set(line) <= set("-=+| ")]
    summary = " / ".join(lines[:3]) or "(no output)"
    if result.returncode != 0:
        error = last_error_line(result.stderr) or summary
        return Check("npu-smi", FAIL, f"`npu-smi info` exit {result.returncode}: {error}", "check the Ascend driver")
    return Check("npu-smi", PASS, f"{path}: {summary}")


def _probe(code: str, env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess[str] | str:
    """Run `code` in a fresh interpreter; returns the result or, on timeout, a description."""
    try:
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=dict(env), timeout=timeout, cwd=REPO
        )
    except subprocess.TimeoutExpired:
        return f"did not finish in {timeout:.0f}s"


def _cann_or_reinstall_fix(error: str, env: Mapping[str, str]) -> str:
    if ".so" in error or "backend extension" in error or "CANN" in error or "ascend" in error.lower():
        return cann_fix(env)
    torch_version = package_version("torch") or "your torch"
    return f"reinstall torch-npu matching torch {torch_version}"


def check_torch_npu_import(env: Mapping[str, str] | None = None, timeout: float = 180.0) -> Check:
    """`import torch; import torch_npu` in a fresh process with autoload off: the exact CANN error, if any."""
    env = dict(environment(env))
    if not torch_npu_installed():
        return Check("torch_npu import", PASS, "skipped: torch_npu is not installed")
    env[AUTOLOAD_VAR] = "0"
    result = _probe("import torch, torch_npu; print(torch_npu.__version__)", env, timeout)
    if isinstance(result, str):
        return Check("torch_npu import", FAIL, f"`import torch_npu` {result}", "check the Ascend driver and CANN")
    if result.returncode != 0:
        error = last_error_line(result.stderr)
        return Check(
            "torch_npu import",
            FAIL,
            f"`import torch; import torch_npu` fails: {error}",
            _cann_or_reinstall_fix(error, env),
        )
    return Check("torch_npu import", PASS, f"torch_npu {result.stdout.strip()} imports")


def check_torch_autoload(env: Mapping[str, str] | None = None, timeout: float = 180.0) -> Check:
    """A plain `import torch` (autoload on, as in any script not using device_utils) must survive torch_npu."""
    env = {k: v for k, v in (environment(env)).items() if k != AUTOLOAD_VAR}
    if not torch_npu_installed():
        return Check("torch autoload", PASS, "skipped: torch_npu is not installed")
    result = _probe("import torch", env, timeout)
    if isinstance(result, str):
        return Check("torch autoload", FAIL, f"plain `import torch` {result}", "check the Ascend driver and CANN")
    if result.returncode != 0:
        error = last_error_line(result.stderr)
        return Check("torch autoload", FAIL, f"plain `import torch` fails: {error}", _cann_or_reinstall_fix(error, env))
    return Check("torch autoload", PASS, "plain `import torch` loads torch_npu")


# ---------------------------------------------------------------------------------------------- devices


def _no_torch(name: str) -> Check:
    return Check(name, FAIL, f"skipped: torch cannot be imported ({torch_import_error()})", "fix the torch check first")


def check_npu_devices() -> Check:
    if torch_import_error():
        return _no_torch("NPU devices")
    du = load_device_utils()
    ok, reason = du.npu_status()
    if not ok:
        reason = reason or "unknown reason"
        if reason.startswith("torch_npu is not installed"):
            return Check("NPU devices", WARN, "none: torch_npu is not installed", "none on a CPU or CUDA machine")
        fix = cann_fix() if "set_env" in reason else "check `npu-smi info` and ASCEND_RT_VISIBLE_DEVICES"
        return Check("NPU devices", FAIL, f"none usable: {reason}", fix)
    import torch

    count = du.device_count("npu")
    names = sorted({str(torch.npu.get_device_name(i)) for i in range(count)})
    visible = environment().get("ASCEND_RT_VISIBLE_DEVICES")
    shown = f" (ASCEND_RT_VISIBLE_DEVICES={visible})" if visible is not None else ""
    return Check("NPU devices", PASS, f"{count} visible{shown}: {', '.join(names)}")


def check_cuda_devices() -> Check:
    if torch_import_error():
        return _no_torch("CUDA devices")
    du = load_device_utils()
    ok, reason = du.cuda_status()
    if not ok:
        return Check("CUDA devices", WARN, f"none: {reason}", "none needed on an NPU or CPU machine")
    import torch

    try:
        count = du.device_count("cuda")
        names = sorted({str(torch.cuda.get_device_name(i)) for i in range(count)})
    except RuntimeError as exc:
        return Check("CUDA devices", FAIL, f"CUDA is available but cannot be queried: {first_line(exc)}",
                     "check the NVIDIA driver with `nvidia-smi` and CUDA_VISIBLE_DEVICES")
    return Check("CUDA devices", PASS, f"{count} visible: {', '.join(names)}")


def check_device_choice(device: str | None = None, dtype: str | None = None) -> tuple[Check, Any]:
    """What DeviceManager picks for these settings (or PREFERRED_DEVICE / PREFERRED_DTYPE); also returns it."""
    if torch_import_error():
        return _no_torch("device choice"), None
    du = load_device_utils()
    env = environment()
    asked_device = f"--device {device}" if device else f"{ENV_DEVICE}={env.get(ENV_DEVICE) or 'auto'}"
    asked_dtype = f"--dtype {dtype}" if dtype else f"{ENV_DTYPE}={env.get(ENV_DTYPE) or 'auto'}"
    try:
        dm = du.DeviceManager(**du.preferences_from(env, device, dtype).arguments())
    except du.DeviceError as exc:
        message = str(exc)
        if "set_env" in message:
            fix = cann_fix()
        elif "dtype" in message or "bf16" in message or "fp16" in message:
            fix = "set PREFERRED_DTYPE=auto (or --dtype auto) to pick what the device runs"
        else:
            fix = "set PREFERRED_DEVICE=auto (or --device auto), or name a device the checks above list"
        return Check("device choice", FAIL, message, fix), None
    detail = f"{dm.device} ({dm.device_name}), {dm.dtype_name} [{asked_device}, {asked_dtype}]"
    return Check("device choice", PASS, detail), dm


def dtype_name(dtype: torch.dtype) -> str:
    return load_device_utils().dtype_name(dtype)


def precision_errors(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(max relative matmul error, max absolute softmax error) of `dtype` on `device` against fp32 on CPU.

    Raises ValueError if the result holds NaN or inf.
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(64, 64, generator=generator)
    b = torch.randn(64, 64, generator=generator)
    matmul = (a.to(device, dtype) @ b.to(device, dtype)).float().cpu()
    softmax = torch.softmax(a.to(device, dtype) * 4.0, dim=-1).float().cpu()
    if not (torch.isfinite(matmul).all() and torch.isfinite(softmax).all()):
        raise ValueError("result holds NaN or inf")
    reference = a @ b
    matmul_error = ((matmul - reference).abs().max() / reference.abs().max()).item()
    softmax_error = (softmax - torch.softmax(a * 4.0, dim=-1)).abs().max().item()
    return float(matmul_error), float(softmax_error)


def check_precision(device: torch.device, chosen: torch.dtype) -> list[Check]:
    """fp32, fp16 and bf16 matmul + softmax on the device; only the chosen dtype failing is a FAIL."""
    du = load_device_utils()
    checks: list[Check] = []
    for name in reversed(list(du.DTYPES)):  # fp32 first: the reference the others are judged against
        dtype = du.DTYPES[name]
        is_chosen = dtype is chosen
        label = f"precision {name}"
        bad = FAIL if is_chosen else WARN
        suffix = " (chosen dtype)" if is_chosen else ""
        fix = "set PREFERRED_DTYPE to a dtype that passes" if is_chosen else f"do not use {name} on this device"
        try:
            matmul_error, softmax_error = precision_errors(device, dtype)
        except (RuntimeError, TypeError, NotImplementedError, ValueError) as exc:
            checks.append(Check(label, bad, f"fails on {device}: {first_line(exc)}{suffix}", fix))
            continue
        detail = f"matmul max rel err {matmul_error:.1e}, softmax max err {softmax_error:.1e} on {device}{suffix}"
        if max(matmul_error, softmax_error) > TOLERANCE[name]:
            checks.append(Check(label, bad, f"{detail}: above {TOLERANCE[name]:.0e}", fix))
        else:
            checks.append(Check(label, PASS, detail))
    return checks


def check_attention(device: torch.device, dtype: torch.dtype, npu: bool | None = None) -> list[Check]:
    """Which attention kernels run on the device and agree with `math` on random q/k/v.

    `npu` says whether an NPU (torch_npu) is present; by default, whether `device` is one. The configured
    backend (HIDREAM_ATTENTION, default sdpa) or math failing is a FAIL; another backend failing a WARN.
    """
    import torch

    du = load_device_utils()
    npu = device.type == "npu" if npu is None else npu
    checks: list[Check] = []
    try:
        configured = attention_from_env() or "sdpa"
    except UserError as exc:
        checks.append(Check("attention setting", FAIL, str(exc), f"unset {ENV_ATTENTION} or give it a kernel's name"))
        configured = "sdpa"
    name_of = dtype_name(dtype)
    tolerance = TOLERANCE[name_of]
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 64, 32, generator=generator).to(device, dtype) for _ in range(3))
    try:
        reference = du.ATTENTION_FUNCTIONS["math"](q, k, v).float().cpu()
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        reference = None
        reference_error = first_line(exc)
    for name in du.ATTENTION_BACKENDS:
        label = f"attention {name}"
        bad = FAIL if name in (configured, "math") else WARN
        fix = "set HIDREAM_ATTENTION (or --attention) to a backend that passes"
        if name == "npu_fused" and not npu:
            checks.append(Check(label, PASS, f"skipped: needs an NPU (device is {device})"))
            continue
        if reference is None:
            checks.append(Check(label, bad, f"math reference fails on {device}: {reference_error}", fix))
            continue
        try:
            out = du.ATTENTION_FUNCTIONS[name](q, k, v).float().cpu()
        except (RuntimeError, TypeError, NotImplementedError, AttributeError, ImportError) as exc:
            checks.append(Check(label, bad, f"fails on {device} in {name_of}: {first_line(exc)}", fix))
            continue
        if not bool(torch.isfinite(out).all()):
            checks.append(Check(label, bad, f"NaN or inf on {device} in {name_of}", fix))
            continue
        error = float((out - reference).abs().max().item())
        detail = f"runs on {device} in {name_of}, max diff to math {error:.1e}"
        if name == configured:
            detail += " (configured)"
        if error > tolerance:
            checks.append(Check(label, bad, f"{detail}: above {tolerance:.0e}", fix))
        else:
            checks.append(Check(label, PASS, detail))
    return checks


# ---------------------------------------------------------------------------------------------- packages


def required_minimums(path: Path = REPO / "requirements_npu.txt") -> dict[str, str]:
    """`name>=version` lines of requirements_npu.txt, keyed by lower-case name."""
    minimums: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return minimums
    for line in lines:
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*>=\s*([\w.]+)", line)
        if match:
            minimums[match.group(1).lower()] = match.group(2)
    return minimums


def _older(version: str, minimum: str) -> bool:
    try:
        from packaging.version import Version

        return Version(version) < Version(minimum)
    except Exception:  # an unparsable version cannot be compared; do not guess
        return False


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain: lazy importers wrap the real error (e.g. a missing CANN library)."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    return exc


def hidream_import_error() -> str | None:
    """Why diffusers' HiDream classes cannot be imported (the root cause), or None."""
    try:
        from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel  # noqa: F401
    except Exception as exc:  # ImportError, or the RuntimeError diffusers' lazy import wraps it in
        cause = root_cause(exc)
        return f"{type(cause).__name__}: {first_line(cause)}"
    return None


def check_packages() -> list[Check]:
    minimums = required_minimums()
    checks: list[Check] = []
    for name, required in PACKAGES:
        label = f"package {name}"
        bad = FAIL if required else WARN
        minimum = minimums.get(name)
        wanted = f"{name}>={minimum}" if minimum else name
        version = package_version(name)
        if version is None:
            checks.append(Check(label, bad, "not installed", f"pip install '{wanted}'"))
            continue
        if minimum and _older(version, minimum):
            checks.append(Check(label, bad, f"{version} is older than {minimum}", f"pip install -U '{wanted}'"))
            continue
        if name == "diffusers":
            error = hidream_import_error()
            if error:
                # transformers imports torch_npu whenever it is installed, so a missing CANN breaks this too.
                fix = cann_fix() if ".so" in error else f"pip install -U '{wanted}'"
                checks.append(Check(label, FAIL, f"{version}: the HiDream classes do not import: {error}", fix))
                continue
            version += " (HiDreamImagePipeline, HiDreamImageTransformer2DModel import)"
        checks.append(Check(label, PASS, version))
    return checks


# ---------------------------------------------------------------------------------------------- models


def cached_hub_snapshot(repo_id: str) -> Path | None:
    """The local HF-cache snapshot of a hub repo, without any network access."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or no huggingface_hub: either way not on disk
        return None


def local_location(source: str) -> Path | None:
    """A source's files on disk: the path itself, or a hub id's cached snapshot."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    from hidream_edit.models import is_hub_id

    return cached_hub_snapshot(source) if is_hub_id(source) else None


def weight_bytes(path: Path) -> int:
    """Total size of the weight files in a folder (recursively), or of a single weight file."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def check_model_sizes(sources: Any) -> list[Check]:
    """'Sizes plausible': weight bytes per folder found on disk, against the real model's size."""
    checks: list[Check] = []
    for role in ("llama", "i1", "edit"):
        source = getattr(sources, role)
        location = local_location(source)
        if location is None:
            continue
        size = weight_bytes(location)
        label = f"model size {role}"
        detail = f"{human_bytes(size)} of weights in {location}"
        expected = EXPECTED_WEIGHT_BYTES.get((sources.model, role))
        if sources.tiny or expected is None:
            note = "tiny set" if sources.tiny else "no reference size"
            checks.append(Check(label, PASS, f"{detail} ({note})"))
        elif size < 0.9 * expected:
            checks.append(
                Check(
                    label,
                    WARN,
                    f"{detail}; expected about {expected / 1e9:.0f} GB or more",
                    "re-download the model; a shard may be truncated or missing",
                )
            )
        else:
            checks.append(Check(label, PASS, f"{detail} (plausible: about {expected / 1e9:.0f} GB expected)"))
    return checks


def check_models(
    model: str = "e1.1",
    llama_path: str | None = None,
    i1_path: str | None = None,
    edit_path: str | None = None,
    tiny: bool = False,
    env: Mapping[str, str] | None = None,
) -> tuple[list[Check], Any]:
    """Model folders complete? Hub ids not yet downloaded are a WARN (fetched at first load) unless offline."""
    try:
        from hidream_edit.config import resolve_model_sources
        from hidream_edit.errors import UserError
        from hidream_edit.models import check_model_files, is_hub_id
    except Exception as exc:  # a broken project install must show up as a check, not a crash
        return [
            Check(
                "model files",
                FAIL,
                f"hidream_edit.models cannot be imported: {first_line(exc)}",
                "run from the project checkout with its requirements installed",
            )
        ], None
    try:
        sources = resolve_model_sources(model_spec(model), llama_path, i1_path, edit_path, tiny=tiny, env=env)
    except UserError as exc:
        return [Check("model files", FAIL, str(exc), "fix the model flags or HIDREAM_*_PATH variables")], None
    problems = check_model_files(sources, locate_hub=True)
    roles = {role: getattr(sources, role) for role in ("llama", "i1", "edit")}
    not_downloaded = [s for s in roles.values() if local_location(s) is None and is_hub_id(s)]
    local_problems = [p for p in problems if not any(s in p for s in not_downloaded)]
    described = f"{sources.model}{' (tiny)' if sources.tiny else ''}: " + ", ".join(
        f"{r}={s}" for r, s in roles.items()
    )
    if local_problems:
        listed = "; ".join(local_problems[:4]) + (
            f"; and {len(local_problems) - 4} more" if len(local_problems) > 4 else ""
        )
        check = Check(
            "model files",
            FAIL,
            f"{described}; incomplete: {listed}",
            "re-download the missing files or point the --*-path flags at complete folders",
        )
    elif not_downloaded:
        status = FAIL if sources.offline else WARN
        why = "HF_HUB_OFFLINE is set" if sources.offline else "the first run downloads them"
        check = Check(
            "model files",
            status,
            f"{described}; not downloaded ({why}): {', '.join(not_downloaded)}",
            "hf download <id>, or pass --llama-path/--i1-path/--e1-path (or --lora-path) DIR; --tiny to try",
        )
    else:
        check = Check("model files", PASS, f"{described}; complete")
    return [check, *check_model_sizes(sources)], sources


def check_hub(sources: Any, timeout: float = 10.0) -> list[Check]:
    """With --check-hub only: can each hub id be reached? Failures are WARN (gated repos need a token)."""
    checks: list[Check] = []
    for role in ("llama", "i1", "edit"):
        source = getattr(sources, role)
        if Path(source).expanduser().exists() or len(source.split("/")) != 2:
            continue
        try:
            from huggingface_hub import HfApi

            info = HfApi().model_info(source, timeout=timeout)
        except Exception as exc:  # network, auth and hub errors all mean "not reachable now"
            checks.append(
                Check(
                    f"hub {role}",
                    WARN,
                    f"{source}: {type(exc).__name__}: {first_line(exc)}",
                    "check the network, HF_ENDPOINT, and `hf auth login` for gated repos",
                )
            )
            continue
        checks.append(Check(f"hub {role}", PASS, f"{source} reachable (revision {str(info.sha)[:12]})"))
    return checks


# ---------------------------------------------------------------------------------------------- memory


FULL_SPEED = ("none", "split", "encoders")  # placements that move nothing per denoising step


def memory_plan_check(plan: Any) -> Check:
    """A memory plan as a check: PASS at full speed, WARN when only offloading fits (or on a CPU), FAIL when
    nothing fits a card (loading would refuse)."""
    title = f"{plan.model} in {plan.dtype}, attention {plan.attention}"
    peaks = "; ".join(peak.describe() for peak in (*plan.chosen.devices, plan.chosen.host))
    if not plan.chosen.devices:
        if plan.fits:
            return Check("memory plan", PASS, f"{title} on the CPU: {peaks}: fits (CPU runs are slow)")
        return Check("memory plan", WARN, f"{title} on the CPU: {plan.error}", "run on an NPU, or try with --tiny")
    if not plan.fits:
        return Check("memory plan", FAIL, f"{title}: {plan.error}", "see `--plan` of the CLIs for the numbers")
    detail = f"{title}: --offload auto uses {plan.placement} ({peaks})"
    if plan.placement in FULL_SPEED:
        return Check("memory plan", PASS, detail)
    faster = "; ".join(f"{c.placement}: {c.why_not()}" for c in plan.rejected if c.placement in FULL_SPEED)
    return Check("memory plan", WARN, detail, f"slower than resident weights ({faster}); more free memory helps")


def check_memory_plan(dm: Any, model: str = "e1.1", sources: Any = None) -> tuple[Check, Any]:
    """The loader's own memory plan (hidream_edit.placement) for this machine; returns (check, plan)."""
    if dm is None:
        return Check("memory plan", WARN, "skipped: no device was chosen", "fix the device choice first"), None
    try:
        from hidream_edit.errors import UserError
        from hidream_edit.models import sizes_on_disk, table_sizes
        from hidream_edit.placement import plan_for_machine

        spec = model_spec(model)
        sizes = sizes_on_disk(sources, dm.dtype_name) if sources is not None else table_sizes(spec, dm.dtype_name)
        plan = plan_for_machine(spec, sizes, dm.device_type, dm.index, "auto", dm.resolve_attention_backend())
    except (UserError, load_device_utils().DeviceError) as exc:
        return Check("memory plan", FAIL, str(exc), "fix the model files or flags above"), None
    return memory_plan_check(plan), plan


# ---------------------------------------------------------------------------------------------- smoke


def write_test_image(path: Path) -> Path:
    """A small gradient PNG to edit."""
    from PIL import Image

    image = Image.new("RGB", (64, 48))
    image.putdata([(x * 4, y * 5, 128) for y in range(48) for x in range(64)])
    image.save(path)
    return path


def smoke_calibration(output: Path) -> dict[str, Any] | None:
    """The memory planner's predicted device peak next to the measured one (max_memory_allocated), from the
    edit's metadata: on a real card this tells how good the reserve formula is. None when unreadable."""
    try:
        metadata = json.loads(output.with_suffix(output.suffix + ".json").read_text())
        placement = metadata["placement"]
        predicted = {device: peak for device, peak in placement["predicted_peak_bytes"].items() if device != "host"}
        return {
            "placement": placement["name"],
            "device": metadata["device"],
            "predicted_peak_bytes": predicted.get(metadata["device"]),
            "measured_peak_bytes": metadata["memory"]["peak"],
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_smoke(device: str | None = None, dtype: str | None = None, timeout: float = 1800.0) -> Check:
    """A timed two-step edit with the tiny model through the real CLI, in a fresh process."""
    script = REPO / SMOKE_SCRIPT
    if not script.is_file():
        return Check("smoke edit", FAIL, f"{script} not found", "run from a complete project checkout")
    with tempfile.TemporaryDirectory(prefix="hidream-doctor-") as tmp:
        try:
            image = write_test_image(Path(tmp) / "in.png")
        except Exception as exc:  # no Pillow or an unwritable temp dir
            return Check("smoke edit", FAIL, f"cannot write a test image: {first_line(exc)}", "pip install pillow")
        output = Path(tmp) / "out.png"
        command = [
            sys.executable,
            str(script),
            "--tiny",
            "--steps",
            "2",
            "--image",
            str(image),
            "--instruction",
            "make it blue",
            "--output",
            str(output),
        ]
        if device:
            command += ["--device", device]
        if dtype:
            command += ["--dtype", dtype]
        started = time.perf_counter()
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        except subprocess.TimeoutExpired:
            return Check(
                "smoke edit", FAIL, f"did not finish in {timeout:.0f}s", "run the command by hand with --verbose"
            )
        elapsed = time.perf_counter() - started
        if result.returncode == 0 and output.is_file():
            summary = first_line(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "")
            calibration = smoke_calibration(output)
            return Check("smoke edit", PASS, f"2-step tiny edit in {elapsed:.1f}s: {summary}", data=calibration)
        error = last_error_line(result.stderr) or "no output image"
        return Check(
            "smoke edit",
            FAIL,
            f"exit {result.returncode} after {elapsed:.1f}s: {error}",
            f"run `python {SMOKE_SCRIPT} --tiny --steps 2 --verbose ...` and read the error",
        )


# ---------------------------------------------------------------------------------------------- full size


def full_size_check(record: dict[str, Any]) -> Check:
    """A full-size run's record as a check: PASS when the edit ran, FAIL when the plan refused or memory ran out."""
    label = "full-size run"
    if record["status"] == "refused":
        return Check(label, FAIL, f"refused before allocating: {record['error']}",
                     "more free memory, --offload with a lighter placement, or --blocks N to run part of the model")
    seconds = record["seconds"]
    where = record["memory"]["devices"][:1] or [record["memory"]["host"]]
    peak = where[0].get("peak_reserved", where[0].get("peak_rss"))
    ratio = where[0].get("ratio_reserved", where[0].get("ratio"))
    measured = f"peak {gib(peak)} ({ratio:.2f} of predicted)" if peak is not None and ratio is not None else "peak n/a"
    if record["status"] == "out_of_memory":
        return Check(label, FAIL, f"out of memory in {record['failed_in']} after {record['steps_done']} steps, "
                     f"{measured}: {record['error']}", "a lighter --offload placement, or --max-memory to plan lower")
    cut = " (cut: --blocks)" if record["cut"] else ""
    return Check(label, PASS, f"{record['placement']}, {record['machine']['dtype']}{cut}: "
                 f"{seconds['edit_step']:.2f} s per edit step, {seconds['refine_step']:.2f} s per refine step, "
                 f"{measured}")


def run_full_size_check(args: argparse.Namespace) -> int:
    """--full-size: build, run and measure (hidream_edit.full_size); print the table, write the record."""
    from device_utils import DeviceError, DeviceManager, preferences_from
    from hidream_edit.config import configure_logging
    from hidream_edit.editor import check_new_file, write_new_json
    from hidream_edit.errors import UserError
    from hidream_edit.full_size import run_full_size, summary_lines

    configure_logging(verbose=False)
    try:
        path = check_new_file(args.json) if args.json not in (None, "-") else None
        settings = full_size_settings_from_args(args)
        settings.check()
        dm = DeviceManager(**preferences_from(environment(), args.device, args.dtype).arguments())
        record = run_full_size(settings, dm, progress=lambda text: print(f"full-size: {text}", file=sys.stderr,
                                                                       flush=True))
        if path is not None:
            write_new_json(path, record)
    except (UserError, DeviceError) as exc:
        print(f"test_npu_setup.py: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    check = full_size_check(record)
    if args.json == "-":
        print(json.dumps(record, indent=2))
    else:
        print("\n".join(summary_lines(record)))
        if check.status != PASS:
            print(f"fix: {check.fix}")
        if path is not None:
            print(f"record written to {path}")
    return exit_code([check])


# ---------------------------------------------------------------------------------------------- driver


def run_checks(args: argparse.Namespace) -> list[Check]:
    checks = [
        check_python(),
        check_torch(),
        check_torch_npu_version(),
        check_cann_env(),
        check_cann_libraries(),
        check_npu_smi(),
        check_torch_npu_import(),
        check_torch_autoload(),
        check_npu_devices(),
        check_cuda_devices(),
    ]
    choice, dm = check_device_choice(args.device, args.dtype)
    checks.append(choice)
    if dm is not None:
        checks += check_precision(dm.device, dm.dtype)
        checks += check_attention(dm.device, dm.dtype)
    checks += check_packages()
    spec = model_spec(args.model)
    model_checks, sources = check_models(
        args.model, args.llama_path, args.i1_path, edit_path_from_args(args, spec), tiny=args.tiny
    )
    checks += model_checks
    if args.check_hub and sources is not None:
        checks += check_hub(sources)
    checks.append(check_memory_plan(dm, args.model, sources)[0])
    if args.smoke:
        checks.append(check_smoke(args.device, args.dtype))
    return checks


def format_checks(checks: Sequence[Check]) -> str:
    """One aligned line per check, then a count."""
    width = max((len(check.name) for check in checks), default=0)
    lines = []
    for check in checks:
        line = f"{check.status}  {check.name:<{width}}  {check.detail}"
        if check.fix and check.status != PASS:
            line += f"  -> fix: {check.fix}"
        lines.append(line)
    counts = {status: sum(1 for c in checks if c.status == status) for status in (PASS, WARN, FAIL)}
    lines.append(f"{counts[PASS]} passed, {counts[WARN]} warnings, {counts[FAIL]} failed")
    return "\n".join(lines)


def exit_code(checks: Sequence[Check]) -> int:
    return 1 if any(check.status == FAIL for check in checks) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        description="Check that this machine can run HiDream-E1 (Ascend NPU, CUDA or CPU). Exit 0: nothing failed."
    )
    add_model_choice_argument(parser, "model to check (default e1.1)")
    add_model_source_arguments(parser, None)
    add_device_arguments(parser)
    parser.add_argument("--check-hub", action="store_true", help="also ask the model hub about hub ids (network)")
    parser.add_argument("--smoke", action="store_true", help="run a timed two-step tiny edit through the CLI")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="print a JSON list of {name, status, detail, fix}; with --full-size the run's record, "
                             "written to PATH (a new file) when given")
    add_full_size_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.full_size:
        given = [f"--{name.replace('_', '-')}" for name, unset in FULL_SIZE_ONLY.items()
                 if getattr(args, name) != unset]
        if args.json not in (None, "-"):
            given.append("--json PATH")
        if given:
            parser.error(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --full-size")
    elif MODELS[args.model] is not FULL_SIZE_SPEC or args.smoke or args.check_hub:
        parser.error(f"--full-size runs {FULL_SIZE_SPEC.title} alone: drop --model, --smoke and --check-hub")
    if args.full_size:
        return run_full_size_check(args)
    # The checks report device fallbacks themselves; the library's own warnings would repeat them.
    logging.getLogger("device_utils").setLevel(logging.ERROR)
    checks = run_checks(args)
    if args.json:
        print(json.dumps([check.as_dict() for check in checks], indent=2))
    else:
        print(format_checks(checks))
    return exit_code(checks)


if __name__ == "__main__":
    sys.exit(main())
