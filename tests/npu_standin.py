"""A stand-in `torch_npu` for tests: registers an `npu` device whose bookkeeping works.

The PrivateUse1 rename is once per process, so tests run code using it in a subprocess through
`run_standin(code, config)`. It is strict where the real torch_npu 2.13.0 is: its functions have the
real signatures (a misspelled keyword is a TypeError, a positional `scale` lands in `pse` and is
refused), memory figures are kept per device index (None means the current device, as in torch),
and moving a tensor to `npu` really happens: the tensor stays on the CPU, but in a dtype the
configured "device" cannot run (`dtype_ok`) its values become NaN, so device_utils' own dtype probe
decides. `npu_fusion_attention` computes on whatever (CPU) tensors it is given and counts its calls.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30

DEFAULTS: dict[str, Any] = {
    "import_error": None,  # e.g. "libhccl.so: cannot open shared object file: No such file or directory"
    "available": True,
    "count": 2,
    "bf16": True,  # what is_bf16_supported() says
    "dtype_ok": ["bf16", "fp16", "fp32"],  # dtypes the device computes correctly; others give NaN
    "cuda_count": 0,
    # Memory figures in bytes: one value for every card, or a list with one value per card index.
    "free": [50 * GIB, 40 * GIB],
    "total": [64 * GIB, 64 * GIB],
    "allocated": [3 * GIB, 13 * GIB],
    "reserved": [4 * GIB, 14 * GIB],
    "peak": [5 * GIB, 15 * GIB],
}
INPUT_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
DTYPE_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


def _per_card(value: Any, index: int) -> int:
    return int(value[index] if isinstance(value, list) else value)


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
        fake = _device_module(cfg)
        torch_npu = types.ModuleType("torch_npu")
        torch_npu.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
        torch_npu.__version__ = "2.13.0.standin"  # type: ignore[attr-defined]
        torch_npu.fusion_calls = 0  # type: ignore[attr-defined]
        torch_npu.npu_fusion_attention = _fusion_attention(torch_npu)  # type: ignore[attr-defined]
        torch.utils.rename_privateuse1_backend("npu")
        torch._register_device_module("npu", fake)
        sys.modules["torch_npu"] = torch_npu

    if cfg["cuda_count"]:
        torch.cuda.is_available = lambda: True
        torch.cuda.device_count = lambda: int(cfg["cuda_count"])
        torch.cuda.set_device = lambda index: None
        torch.cuda.get_device_name = lambda index=0: f"CUDA-standin-{index}"
        torch.cuda.is_bf16_supported = lambda *a, **k: True

    _emulate_device_moves(cfg)
    return fake  # type: ignore[return-value]


def _device_module(cfg: dict[str, Any]) -> Any:
    """The fake `torch.npu`: device count, current device and per-card memory, with torch's signatures."""
    fake = types.ModuleType("torch.npu")
    fake.calls = []  # type: ignore[attr-defined]
    fake.memory_asked = []  # type: ignore[attr-defined]
    state = {"current": 0}
    count = int(cfg["count"])

    def index_of(device: Any) -> int:
        """torch's rule: None is the current device; an int, "npu:N" or torch.device names a card."""
        if device is None:
            return state["current"]
        if isinstance(device, int):
            index = device
        else:
            text = str(device)
            kind, _, number = text.partition(":")
            if kind != "npu":
                raise ValueError(f"Expected a npu device, but got: {text}")
            index = int(number) if number else state["current"]
        if not 0 <= index < count:
            raise RuntimeError(f"Invalid device argument: npu:{index} (this process sees {count})")
        return index

    def record(name: str, device: Any) -> None:
        fake.calls.append((name, (index_of(device),) if device is not None else ()))  # type: ignore[attr-defined]

    def set_device(device: Any) -> None:
        index = index_of(device)
        state["current"] = index
        fake.calls.append(("set_device", (index,)))  # type: ignore[attr-defined]

    def get_device_name(device_name: Any = None) -> str:
        return f"Ascend910B-standin-{index_of(device_name)}"

    def mem_get_info(device: Any = None) -> tuple[int, int]:
        """Free / total of one card; the indexes asked for are kept in `memory_asked`."""
        index = index_of(device)
        fake.memory_asked.append(index)  # type: ignore[attr-defined]
        return _per_card(cfg["free"], index), _per_card(cfg["total"], index)

    def memory_allocated(device: Any = None) -> int:
        return _per_card(cfg["allocated"], index_of(device))

    def memory_reserved(device: Any = None) -> int:
        return _per_card(cfg["reserved"], index_of(device))

    def max_memory_allocated(device: Any = None) -> int:
        return _per_card(cfg["peak"], index_of(device))

    def reset_peak_memory_stats(device: Any = None) -> None:
        record("reset_peak_memory_stats", device)

    def synchronize(device: Any = None) -> None:
        record("synchronize", device)

    def empty_cache() -> None:
        record("empty_cache", None)

    fake.is_available = lambda: bool(cfg["available"])  # type: ignore[attr-defined]
    fake.device_count = lambda: count  # type: ignore[attr-defined]
    fake.current_device = lambda: state["current"]  # type: ignore[attr-defined]
    fake._is_in_bad_fork = lambda: False  # type: ignore[attr-defined]
    fake.is_bf16_supported = lambda: bool(cfg["bf16"])  # type: ignore[attr-defined]
    for function in (set_device, get_device_name, mem_get_info, memory_allocated, memory_reserved,
                     max_memory_allocated, reset_peak_memory_stats, synchronize, empty_cache):
        setattr(fake, function.__name__, function)
    return fake


def _fusion_attention(torch_npu: Any) -> Any:
    """npu_fusion_attention with torch_npu 2.13.0's signature; only what the project uses is computed."""
    import torch

    def npu_fusion_attention(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, head_num: int, input_layout: str,
        pse: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
        atten_mask: torch.Tensor | None = None, scale: float = 1.0, keep_prob: float = 1.0,
        pre_tockens: int = 2147483647, next_tockens: int = 2147483647, inner_precise: int = 0,
        prefix: list[int] | None = None, actual_seq_qlen: list[int] | None = None,
        actual_seq_kvlen: list[int] | None = None, sparse_mode: int = 0, gen_mask_parallel: bool = True,
        sync: bool = False,
    ) -> tuple[Any, ...]:
        for name, tensor in (("query", query), ("key", key), ("value", value)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"npu_fusion_attention: {name} must be a Tensor, got {type(tensor).__name__}")
        for name, optional in (("pse", pse), ("padding_mask", padding_mask), ("atten_mask", atten_mask)):
            if optional is not None and not isinstance(optional, torch.Tensor):
                raise TypeError(f"npu_fusion_attention: {name} must be a Tensor or None, got {optional!r}")
            if optional is not None:
                raise NotImplementedError(f"the stand-in does not implement {name}")
        if not isinstance(head_num, int) or isinstance(head_num, bool):
            raise TypeError(f"npu_fusion_attention: head_num must be an int, got {head_num!r}")
        if input_layout not in INPUT_LAYOUTS:
            raise ValueError(f"npu_fusion_attention: input_layout must be one of {INPUT_LAYOUTS}, got {input_layout!r}")
        if not isinstance(scale, float) or not isinstance(keep_prob, float):
            raise TypeError(f"npu_fusion_attention: scale and keep_prob must be floats, got {scale!r}, {keep_prob!r}")
        if input_layout not in ("BNSD", "BSND"):
            raise NotImplementedError(f"the stand-in computes BNSD and BSND only, not {input_layout}")
        if keep_prob != 1.0 or sparse_mode != 0:
            raise NotImplementedError("the stand-in computes keep_prob=1.0, sparse_mode=0 only")
        heads_axis = 1 if input_layout == "BNSD" else 2
        if query.dim() != 4 or query.shape[heads_axis] != head_num:
            shape = tuple(query.shape)
            raise RuntimeError(f"npu_fusion_attention: {input_layout} query {shape} does not have {head_num} heads")
        if input_layout == "BSND":
            query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        torch_npu.fusion_calls += 1
        weights = (query.float() @ key.float().transpose(-1, -2) * scale).softmax(-1)
        out = (weights @ value.float()).to(query.dtype)
        if input_layout == "BSND":
            out = out.transpose(1, 2)
        return out, None, None, None, 0, 0, 0

    return npu_fusion_attention


def _emulate_device_moves(cfg: dict[str, Any]) -> None:
    """`tensor.to(npu...)` (and cuda when a stand-in CUDA is configured) computes on the CPU.

    The result stays a CPU tensor; in a dtype the stand-in device cannot run (not in `dtype_ok`),
    its floating values become NaN, as a broken kernel would give. Code that never moves its tensor
    to the device therefore sees a healthy CPU result and is caught by tests expecting the NaN.
    """
    import torch

    stand_in_types = {"npu"} | ({"cuda"} if cfg["cuda_count"] else set())
    original_to = torch.Tensor.to

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is None or device.type not in stand_in_types:
            return original_to(self, *args, **kwargs)
        moved = original_to(self, device="cpu", dtype=dtype or self.dtype, non_blocking=non_blocking, copy=True)
        if moved.is_floating_point() and DTYPE_NAMES.get(str(moved.dtype)) not in cfg["dtype_ok"]:
            moved = torch.full_like(moved, float("nan"))
        return moved

    torch.Tensor.to = to  # type: ignore[method-assign]


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


def load_doctor() -> types.ModuleType:
    """The top-level doctor script, loaded once as `npu_doctor`: tests/test_npu_setup.py shadows its name."""
    if "npu_doctor" in sys.modules:
        return sys.modules["npu_doctor"]
    spec = importlib.util.spec_from_file_location("npu_doctor", REPO / "test_npu_setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["npu_doctor"] = module
    spec.loader.exec_module(module)
    return module
