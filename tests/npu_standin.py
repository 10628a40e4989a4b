"""A stand-in `torch_npu` for tests: registers an `npu` device whose bookkeeping works.

The PrivateUse1 rename is once per process, so tests run code using it in a subprocess through
`run_standin(code, config)`. Tensors cannot live on the stand-in device; its `npu_fusion_attention`
computes on whatever (CPU) tensors it is given and counts its calls.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

DEFAULTS: dict[str, Any] = {
    "import_error": None,  # e.g. "libhccl.so: cannot open shared object file: No such file or directory"
    "available": True,
    "count": 2,
    "bf16": True,  # what is_bf16_supported() says
    "dtype_ok": ["bf16", "fp16", "fp32"],  # what the tiny probe op reports as finite
    "cuda_count": 0,
    "free": 50 * 2**30,
    "total": 64 * 2**30,
    "allocated": 3 * 2**30,
    "reserved": 4 * 2**30,
    "peak": 5 * 2**30,
}


def install(config: dict[str, Any] | None = None) -> types.SimpleNamespace:
    """Install the stand-in into this process; returns the fake `torch.npu` module (it records calls)."""
    import torch

    cfg = {**DEFAULTS, **(config or {})}
    if cfg["import_error"]:
        message = cfg["import_error"]

        class FailingFinder:
            def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
                if name == "torch_npu":
                    raise ImportError(message)
                return None

        sys.meta_path.insert(0, FailingFinder())
        fake = None
    else:
        fake = types.ModuleType("torch.npu")
        fake.calls = []  # type: ignore[attr-defined]

        def record(name: str, result: Any = None) -> Any:
            def method(*args: Any, **kwargs: Any) -> Any:
                fake.calls.append((name, args))  # type: ignore[attr-defined]
                return result

            return method

        fake.is_available = lambda: bool(cfg["available"])  # type: ignore[attr-defined]
        fake.device_count = lambda: int(cfg["count"])  # type: ignore[attr-defined]
        fake.current_device = lambda: 0  # type: ignore[attr-defined]
        fake._is_in_bad_fork = lambda: False  # type: ignore[attr-defined]
        fake.set_device = record("set_device")  # type: ignore[attr-defined]
        fake.get_device_name = lambda index=0: f"Ascend910B-standin-{index}"  # type: ignore[attr-defined]
        fake.is_bf16_supported = lambda: bool(cfg["bf16"])  # type: ignore[attr-defined]
        def mem_get_info(index: int = 0) -> tuple[int, int]:
            """`free` / `total` may be lists: one value per device index; asked indexes go to `memory_asked`."""
            fake.memory_asked.append(index)  # type: ignore[attr-defined]
            free, total = cfg["free"], cfg["total"]
            return (free[index] if isinstance(free, list) else free, total[index] if isinstance(total, list) else total)

        fake.memory_asked = []  # type: ignore[attr-defined]
        fake.mem_get_info = mem_get_info  # type: ignore[attr-defined]
        fake.memory_allocated = lambda index=0: cfg["allocated"]  # type: ignore[attr-defined]
        fake.memory_reserved = lambda index=0: cfg["reserved"]  # type: ignore[attr-defined]
        fake.max_memory_allocated = lambda index=0: cfg["peak"]  # type: ignore[attr-defined]
        fake.reset_peak_memory_stats = record("reset_peak_memory_stats")  # type: ignore[attr-defined]
        fake.empty_cache = record("empty_cache")  # type: ignore[attr-defined]
        fake.synchronize = record("synchronize")  # type: ignore[attr-defined]

        torch_npu = types.ModuleType("torch_npu")
        torch_npu.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
        torch_npu.__version__ = "2.13.0.standin"  # type: ignore[attr-defined]
        torch_npu.fusion_calls = 0  # type: ignore[attr-defined]

        def npu_fusion_attention(query, key, value, head_num, input_layout, scale=1.0, keep_prob=1.0, **kw):  # noqa: ANN001
            assert input_layout == "BNSD" and query.shape[1] == head_num and keep_prob == 1.0
            torch_npu.fusion_calls += 1  # type: ignore[attr-defined]
            weights = (query.float() @ key.float().transpose(-1, -2) * scale).softmax(-1)
            return ((weights @ value.float()).to(query.dtype), None, None, None, 0, 0, 0)

        torch_npu.npu_fusion_attention = npu_fusion_attention  # type: ignore[attr-defined]
        torch.utils.rename_privateuse1_backend("npu")
        torch._register_device_module("npu", fake)
        sys.modules["torch_npu"] = torch_npu

    if cfg["cuda_count"]:
        torch.cuda.is_available = lambda: True
        torch.cuda.device_count = lambda: int(cfg["cuda_count"])
        torch.cuda.set_device = lambda index: None
        torch.cuda.get_device_name = lambda index=0: f"CUDA-standin-{index}"
        torch.cuda.is_bf16_supported = lambda *a, **k: True

    import device_utils

    real_probe = device_utils._dtype_works

    def probe(device: Any, dtype: Any) -> bool:
        if str(device).startswith(("npu", "cuda")):
            return {v: k for k, v in device_utils.DTYPES.items()}[dtype] in cfg["dtype_ok"]
        return real_probe(device, dtype)

    device_utils._dtype_works = probe
    return fake  # type: ignore[return-value]


def run_standin(
    code: str, config: dict[str, Any] | None = None, env: dict[str, str] | None = None, timeout: int = 180
) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter after installing the stand-in with `config`."""
    prelude = (
        "import sys, json\n"
        f"sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
        "import npu_standin\n"
        f"npu = npu_standin.install(json.loads({json.dumps(json.dumps(config or {}))}))\n"
    )
    full_env = {k: v for k, v in os.environ.items() if k not in ("PREFERRED_DEVICE", "PREFERRED_DTYPE", "LOCAL_RANK")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )
