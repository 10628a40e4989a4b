"""The REAL torch_npu (2.13.0, matching torch 2.13.0) installed on a machine without CANN.

Why: the stand-in shows our logic, not what the real package does. Installed without CANN, the real
torch_npu makes a plain `import torch` fail (backend autoload) and `import torch_npu` fail on libhccl.so;
the doctor and the device report must still run and name the cause and the fix.

torch-npu goes into a cached virtualenv beside the project's: created with this interpreter, with a
.pth file pointing at the project venv's site-packages, and `pip install --no-deps torch-npu==2.13.0`.
Without network the tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from npu_standin import REPO

TORCH_NPU_VERSION = "2.13.0"
PTH_NAME = "hidream-project-venv.pth"
# Variables a user would not have but the pytest process may (device_utils sets the autoload one on
# import, conftest sets HF_HUB_OFFLINE).
SCRUBBED = (
    "PREFERRED_DEVICE",
    "PREFERRED_DTYPE",
    "LOCAL_RANK",
    "HIDREAM_ATTENTION",
    "TORCH_DEVICE_BACKEND_AUTOLOAD",
    "HF_HUB_OFFLINE",
)


def venv_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "hidream-e1-npu" / "torch-npu-venv"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def project_site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


def _venv_site_packages(venv: Path) -> Path:
    found = sorted((venv / "lib").glob("python3*/site-packages"))
    if not found:
        raise RuntimeError(f"{venv}: no lib/python3*/site-packages")
    return found[0]


def _is_ready(venv: Path) -> bool:
    """The cached venv has torch-npu at the wanted version and sees this project venv's packages."""
    python = venv_python(venv)
    if not python.exists():
        return False
    try:
        pth = (_venv_site_packages(venv) / PTH_NAME).read_text().strip()
    except (OSError, RuntimeError):
        return False
    if pth != project_site_packages():
        return False
    probe = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('torch-npu'), m.version('torch'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return probe.returncode == 0 and probe.stdout.split()[:1] == [TORCH_NPU_VERSION]


def _build(venv: Path) -> None:
    """Create the venv beside its final place and rename it in, so a half-built one is never used."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{venv.name}.building-", dir=venv.parent))
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", "--clear", str(tmp)], check=True, capture_output=True, timeout=300
        )
        (_venv_site_packages(tmp) / PTH_NAME).write_text(project_site_packages() + "\n")
        pip = subprocess.run(
            [
                str(venv_python(tmp)),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--no-deps",
                f"torch-npu=={TORCH_NPU_VERSION}",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if pip.returncode != 0:
            lines = [line.strip() for line in (pip.stderr or pip.stdout).splitlines() if line.strip()]
            errors = [line for line in lines if line.startswith("ERROR")] or lines or ["no output"]
            raise RuntimeError(f"pip install torch-npu=={TORCH_NPU_VERSION} failed: {errors[-1]}")
        old = None
        if venv.exists():
            old = venv.with_name(f".{venv.name}.old-{uuid.uuid4().hex}")
            os.rename(venv, old)
        os.rename(tmp, venv)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def real_torch_npu_python() -> Iterator[Path]:
    """An interpreter with the project's packages plus the real torch-npu; skips if it cannot be installed."""
    venv = venv_dir()
    if not _is_ready(venv):
        started = time.perf_counter()
        try:
            _build(venv)
        except (subprocess.SubprocessError, OSError, RuntimeError) as exc:
            reason = f"cannot install the real torch-npu=={TORCH_NPU_VERSION}: {exc}"
            print(reason)
            pytest.skip(reason)
        print(f"installed torch-npu=={TORCH_NPU_VERSION} into {venv} in {time.perf_counter() - started:.1f}s")
    yield venv_python(venv)


def run_with_real_torch_npu(
    python: Path, args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run `python ARGS...` in the repo with the real-torch_npu interpreter.

    The environment is this one without the device variables and without TORCH_DEVICE_BACKEND_AUTOLOAD
    (so torch's autoload is on, as for a user), plus `env`.
    """
    full_env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    full_env.update(env or {})
    return subprocess.run([str(python), *args], capture_output=True, text=True, env=full_env, cwd=REPO, timeout=timeout)


def stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_doctor_names_missing_cann_libraries(real_torch_npu_python: Path) -> None:
    result = run_with_real_torch_npu(real_torch_npu_python, ["test_npu_setup.py", "--json"])
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    for name, check in checks.items():
        print(f"{check['status']} {name}: {check['detail']}")
    assert result.returncode == 1
    assert checks["torch_npu"]["status"] == "PASS" and checks["torch_npu"]["detail"].startswith(TORCH_NPU_VERSION)
    libraries = checks["CANN libraries"]
    assert (
        libraries["status"] == "FAIL"
        and "libascendcl.so" in libraries["detail"]
        and "libhccl.so" in libraries["detail"]
    )
    probe = checks["torch_npu import"]
    assert probe["status"] == "FAIL"
    assert "ImportError: libhccl.so: cannot open shared object file" in probe["detail"]
    assert "set_env.sh" in probe["fix"]
    assert "Failed to load the backend extension: torch_npu" in checks["torch autoload"]["detail"]
    assert checks["device choice"]["status"] == "PASS" and checks["device choice"]["detail"].startswith("cpu")


def test_plain_import_torch_fails_with_the_autoload_message(real_torch_npu_python: Path) -> None:
    result = run_with_real_torch_npu(real_torch_npu_python, ["-c", "import torch"])
    print(stderr_lines(result)[-1])
    assert result.returncode != 0
    assert stderr_lines(result)[-1] == (
        "RuntimeError: Failed to load the backend extension: torch_npu. "
        "You can disable extension auto-loading with TORCH_DEVICE_BACKEND_AUTOLOAD=0."
    )
    assert "libhccl.so: cannot open shared object file" in result.stderr


def test_device_report_auto_runs_on_cpu_with_one_warning(real_torch_npu_python: Path) -> None:
    result = run_with_real_torch_npu(real_torch_npu_python, ["device_utils.py"], {"PREFERRED_DEVICE": "auto"})
    print(result.stderr)
    assert result.returncode == 0, result.stderr
    assert "device:              cpu" in result.stdout
    warnings = [line for line in stderr_lines(result) if "WARNING" in line]
    assert len(warnings) == 1 and len(stderr_lines(result)) == 1
    assert "libhccl.so not found" in warnings[0] and "set_env.sh" in warnings[0]


def test_device_report_npu_exits_2_with_one_line(real_torch_npu_python: Path) -> None:
    result = run_with_real_torch_npu(real_torch_npu_python, ["device_utils.py"], {"PREFERRED_DEVICE": "npu"})
    print(result.stderr)
    assert result.returncode == 2
    lines = stderr_lines(result)
    assert len(lines) == 1 and "set_env.sh" in lines[0] and lines[0].startswith("error: PREFERRED_DEVICE=npu")
    assert result.stdout == ""


def cli_args(tmp_path: Path, name: str) -> list[str]:
    source = tmp_path / "in.png"
    if not source.exists():
        from PIL import Image

        Image.new("RGB", (64, 48), (10, 120, 200)).save(source)
    return ["inference_e1_1_npu.py", "--tiny", "--image", str(source), "--instruction", "make it red",
            "--steps", "1", "--output", str(tmp_path / name)]


def test_cli_tiny_auto_runs_on_cpu_with_one_warning(
    real_torch_npu_python: Path, tiny_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**tiny_env, "PREFERRED_DEVICE": "auto"}
    result = run_with_real_torch_npu(real_torch_npu_python, cli_args(tmp_path, "auto.png"), env)
    print(result.stderr)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"saved {tmp_path / 'auto.png'}") and " on cpu fp32" in result.stdout
    warnings = [line for line in stderr_lines(result) if line.startswith("WARNING")]
    assert len(warnings) == 1 and "libhccl.so not found" in warnings[0] and "Traceback" not in result.stderr


def test_cli_tiny_npu_exits_2_with_the_fix(real_torch_npu_python: Path, tiny_env: dict[str, str], tmp_path: Path):
    env = {**tiny_env, "PREFERRED_DEVICE": "npu"}
    result = run_with_real_torch_npu(real_torch_npu_python, cli_args(tmp_path, "npu.png"), env)
    print(result.stderr)
    errors = [line for line in stderr_lines(result) if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr
    assert "PREFERRED_DEVICE=npu, but torch_npu cannot load: libhccl.so not found" in errors[0]
    assert "set_env.sh" in errors[0] and not (tmp_path / "npu.png").exists()
