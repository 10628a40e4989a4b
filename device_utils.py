"""Device layer for diffusion pipelines on Ascend NPU, CUDA and CPU.

Scripts import this module instead of hard-coding "cuda". It picks the device (NPU > CUDA > CPU, or what
PREFERRED_DEVICE asks for), the dtype the device really runs, generators, memory figures, safetensors
loading, offload modes, and which device-generic attention kernels (sdpa, math, npu_fused) this device
can run. It knows no model: installing a kernel into a model's attention modules is the model code's job.

Importing it initialises no device, configures no logging and imports no diffusers. It sets
TORCH_DEVICE_BACKEND_AUTOLOAD=0 (unless already set) before importing torch, because with torch_npu
installed but CANN not sourced a plain `import torch` fails; torch_npu is then imported explicitly by
detection, where its failure can be reported with the fix.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import math
import os
import platform
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

import torch  # noqa: E402  (must come after the autoload switch above)

logger = logging.getLogger("device_utils")

DEVICE_TYPES = ("npu", "cuda", "cpu")
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """bf16 / fp16 / fp32 as the dtype flags spell them; other dtypes by torch's own name."""
    return {value: name for name, value in DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))

ATTENTION_BACKENDS = ("sdpa", "math", "npu_fused")
MATH_ATTENTION_BUDGET_BYTES = 1 << 30
"""Memory for one query chunk of the explicit (math) attention: fp32 scores and their softmax."""
MEMORY_MODES = ("none", "model", "sequential")
DISTRIBUTED_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
CANN_FIX = "source the CANN set_env.sh (e.g. source /usr/local/Ascend/ascend-toolkit/set_env.sh)"

_DEVICE_SPEC = re.compile(r"^(auto|npu|cuda|cpu)(?::(\d+))?$")
_warned: set[str] = set()


class DeviceError(RuntimeError):
    """A device, dtype or backend was asked for that this machine cannot provide."""


class CheckpointError(RuntimeError):
    """A safetensors checkpoint is missing, incomplete or corrupt."""


def warn_once(message: str) -> None:
    """Log a warning the first time a message is seen in this process."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _cann_cause(exc: BaseException) -> str:
    """Turn a torch_npu import failure into a short cause, naming a missing shared library if any."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    missing = re.search(r"(lib[\w.+-]+\.so[\w.]*)", text)
    if missing:
        return f"{missing.group(1)} not found"
    return text


_PIP_NAMES = {"attr": "attrs", "yaml": "pyyaml", "google": "protobuf", "absl": "absl-py", "pkg_resources": "setuptools"}
"""pip package for an import name where they differ, for the modules torch_npu and CANN's Python parts import."""
_CANN_MODULES = frozenset({"acl", "te", "tbe", "hccl", "op_gen", "op_compile_tool", "auto_tune", "schedule_search"})
"""Python modules that come with CANN (on PYTHONPATH after set_env.sh), not from pip."""


@functools.cache
def _load_torch_npu() -> str | None:
    """Import torch_npu once; on failure return the cause and block any later import of it.

    transformers and diffusers import torch_npu on their own whenever the package is installed; with
    CANN missing that import raises deep inside model loading. Setting sys.modules["torch_npu"] to
    None makes their availability checks (importlib.util.find_spec) answer "not available" instead.
    """
    try:
        import torch_npu  # noqa: F401
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing == "torch_npu":
            return "torch_npu is not installed; pip install torch-npu matching your torch and CANN"
        if missing and missing not in _CANN_MODULES:
            package = _PIP_NAMES.get(missing, missing)
            cause = f"torch_npu cannot load: the Python package {package!r} is missing; pip install {package}"
        else:
            cause = f"torch_npu cannot load: {_cann_cause(exc)}; {CANN_FIX}"
    except (ImportError, OSError, RuntimeError) as exc:
        cause = f"torch_npu cannot load: {_cann_cause(exc)}; {CANN_FIX}"
    else:
        return None
    for name in [m for m in sys.modules if m == "torch_npu" or m.startswith("torch_npu.")]:
        del sys.modules[name]
    sys.modules["torch_npu"] = None  # type: ignore[assignment]
    return cause


def npu_status() -> tuple[bool, str | None]:
    """Whether an NPU is usable, and if not, why (with the fix). Imports torch_npu on first call.

    Front ends call this before importing diffusers or transformers (see _load_torch_npu).
    """
    cause = _load_torch_npu()
    if cause is not None:
        return False, cause
    module = getattr(torch, "npu", None)
    if module is None:
        return False, "torch_npu imported but registered no torch.npu module; reinstall torch-npu"
    try:
        available = bool(module.is_available())
    except RuntimeError as exc:
        return False, f"torch.npu.is_available() failed: {_cann_cause(exc)}; {CANN_FIX}"
    if not available:
        return False, "torch_npu loaded but no NPU is visible; check `npu-smi info` and ASCEND_RT_VISIBLE_DEVICES"
    return True, None


def cuda_status() -> tuple[bool, str | None]:
    """Whether a CUDA device is usable, and if not, why."""
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible to this torch build"
    return True, None


def device_count(device_type: str) -> int:
    """Number of devices of a type visible to this process (visible-devices variables already applied)."""
    if device_type == "cpu":
        return 1
    return int(torch.get_device_module(device_type).device_count())


def parse_device_spec(spec: str) -> tuple[str, int | None]:
    """Split `npu:1` into ("npu", 1); reject anything outside auto|npu[:N]|cuda[:N]|cpu."""
    match = _DEVICE_SPEC.match(spec.strip().lower())
    if not match or (match.group(1) in ("auto", "cpu") and match.group(2) is not None):
        raise DeviceError(f"unknown device {spec!r}; use one of: auto, npu, npu:N, cuda, cuda:N, cpu")
    index = match.group(2)
    return match.group(1), int(index) if index is not None else None


def _dtype_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Run a tiny matmul + softmax in `dtype` on `device` and check the result is finite."""
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(16, 16, generator=generator).to(device=device, dtype=dtype)
        out = torch.softmax(a @ a.T / 4.0, dim=-1) @ a
        return bool(torch.isfinite(out.float()).all().item())
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        logger.debug("dtype probe %s on %s failed: %s", dtype, device, exc)
        return False


@dataclass(frozen=True)
class MemoryStats:
    """Memory figures in bytes; device figures are None where the device has none (CPU)."""

    device: str
    device_name: str
    allocated: int | None
    reserved: int | None
    peak: int | None
    free: int | None
    total: int | None
    host_rss: int
    host_total: int
    host_rss_is_peak: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        def gib(value: int | None) -> str:
            return "n/a" if value is None else f"{value / 2**30:.2f} GiB"

        device_part = (
            f"allocated {gib(self.allocated)}, reserved {gib(self.reserved)}, peak {gib(self.peak)}, "
            f"free {gib(self.free)} of {gib(self.total)}"
            if self.total is not None
            else "no device memory (host only)"
        )
        return (
            f"{self.device} ({self.device_name}): {device_part}; "
            f"{host_rss_label(self.host_rss_is_peak)} {gib(self.host_rss)} of {gib(self.host_total)}"
        )


def host_rss_label(is_peak: bool) -> str:
    """How to name the host RSS figure: without psutil it is the process's peak (ru_maxrss), not now."""
    return "host peak RSS" if is_peak else "host RSS"


def host_rss_is_peak() -> bool:
    """Whether host_memory() reports the peak RSS because psutil is not installed."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        return True
    return False


def host_memory() -> tuple[int, int]:
    """(RSS of this process, total host memory) in bytes; the RSS is the peak without psutil."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss), int(psutil.virtual_memory().total)
    except ImportError:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return int(rss), int(total)


def host_available_memory() -> int:
    """Host memory a new allocation can take without swapping (psutil's `available`), else the total."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return host_memory()[1]


def device_memory(device_type: str, index: int) -> tuple[int, int] | None:
    """(free, total) bytes of one accelerator as its runtime reports them; None for the CPU."""
    if device_type == "cpu":
        return None
    free, total = torch.get_device_module(device_type).mem_get_info(index)
    return int(free), int(total)


_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_host_peak() -> bool:
    """Start a new host peak-RSS window (Linux: writing 5 to /proc/self/clear_refs resets VmHWM).

    False where the system has no such reset: `host_peak_rss` then reports the peak since the process began.
    """
    try:
        _PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def host_peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM (since the last `reset_host_peak`), else ru_maxrss."""
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def device_memory_now(device: torch.device) -> tuple[int, int] | None:
    """(allocated, reserved) bytes on one accelerator now; None for the CPU."""
    if device.type == "cpu":
        return None
    module = torch.get_device_module(device.type)
    return int(module.memory_allocated(device)), int(module.memory_reserved(device))


def device_memory_peak(device: torch.device) -> tuple[int, int] | None:
    """(max allocated, max reserved) bytes on one accelerator since its last reset; None for the CPU."""
    if device.type == "cpu":
        return None
    module = torch.get_device_module(device.type)
    return int(module.max_memory_allocated(device)), int(module.max_memory_reserved(device))


def reset_device_peak(device: torch.device) -> None:
    """Start a new peak window on one accelerator (its max allocated and max reserved)."""
    if device.type != "cpu":
        torch.get_device_module(device.type).reset_peak_memory_stats(device)


def synchronize_device(device: torch.device) -> None:
    """Wait for the work queued on one accelerator, so a clock read afterwards includes it."""
    if device.type != "cpu":
        torch.get_device_module(device.type).synchronize(device)


class DeviceManager:
    """Chooses and describes the compute device; one instance per process is typical.

    `preferred_device`: auto (None), npu, npu:N, cuda, cuda:N, cpu. `preferred_dtype`: auto (None), bf16,
    fp16, fp32. A device or dtype asked for by name that cannot be used raises DeviceError naming where the
    request came from (`device_origin` / `dtype_origin`, e.g. "--device" or "PREFERRED_DEVICE"); auto mode
    falls back with one warning naming the cause. The manager reads no environment variable except
    LOCAL_RANK (torchrun's contract); the PREFERRED_DEVICE / PREFERRED_DTYPE conventions are resolved by
    the caller (`preferences_from(environ)` does it for scripts that use this module alone).
    """

    def __init__(
        self,
        preferred_device: str | None = None,
        preferred_dtype: str | None = None,
        *,
        device_origin: str = "preferred_device",
        dtype_origin: str = "preferred_dtype",
    ) -> None:
        spec = (preferred_device or "").strip() or "auto"
        try:
            device_type, explicit_index = parse_device_spec(spec)
        except DeviceError as exc:
            raise DeviceError(f"{device_origin}={spec}: {exc}") from None
        if device_type == "auto":
            device_type = self._detect()
        else:
            self._require(device_type, f"{device_origin}={spec}")
        index = self._choose_index(device_type, explicit_index, f"{device_origin}={spec}")
        self.device: torch.device = torch.device(device_type, index) if device_type != "cpu" else torch.device("cpu")
        self.device_type: str = device_type
        if device_type != "cpu":
            torch.get_device_module(device_type).set_device(index)
        dtype_name = (preferred_dtype or "").strip().lower() or "auto"
        self.dtype: torch.dtype = self._choose_dtype(dtype_name, f"{dtype_origin}={dtype_name}")
        logger.info("using %s (%s), dtype %s", self.device, self.device_name, self.dtype_name)

    @staticmethod
    def _detect() -> str:
        npu_ok, npu_reason = npu_status()
        if npu_ok:
            return "npu"
        if npu_reason and not npu_reason.startswith("torch_npu is not installed"):
            warn_once(f"NPU not used: {npu_reason}")
        else:
            logger.info("NPU not used: %s", npu_reason)
        if cuda_status()[0]:
            return "cuda"
        return "cpu"

    @staticmethod
    def _require(device_type: str, asked: str) -> None:
        ok, reason = {"npu": npu_status, "cuda": cuda_status}.get(device_type, lambda: (True, None))()
        if not ok:
            raise DeviceError(f"{asked}, but {reason}")

    @staticmethod
    def _choose_index(device_type: str, explicit: int | None, asked: str) -> int:
        """Explicit `:N` wins, then LOCAL_RANK (torchrun), then 0; visible-devices variables never are."""
        if device_type == "cpu":
            return 0
        index = explicit
        if index is None:
            local_rank = os.environ.get("LOCAL_RANK")
            if local_rank is not None:
                if not local_rank.strip().isdigit():
                    raise DeviceError(f"LOCAL_RANK={local_rank!r} is not a non-negative integer")
                index = int(local_rank)
                asked = f"LOCAL_RANK={local_rank}"
            else:
                index = 0
        count = device_count(device_type)
        if index >= count:
            present = ", ".join(f"{device_type}:{i}" for i in range(count)) or "none"
            raise DeviceError(
                f"{asked} selects {device_type}:{index}, but this process sees {count} "
                f"{device_type.upper()} device(s): {present}"
            )
        return index

    def _choose_dtype(self, name: str, asked: str) -> torch.dtype:
        if name != "auto":
            if name not in DTYPES:
                raise DeviceError(f"unknown dtype {name!r} ({asked}); use one of: auto, bf16, fp16, fp32")
            dtype = DTYPES[name]
            if dtype is torch.bfloat16 and self.device_type != "cpu" and not self._bf16_supported():
                raise DeviceError(f"{asked}, but {self.device} does not support bf16; use fp16 or fp32")
            if not _dtype_works(self.device, dtype):
                raise DeviceError(f"{asked}, but a test op in {name} fails or gives NaN on {self.device}")
            return dtype
        if self.device_type == "cpu":
            return torch.float32
        if self._bf16_supported() and _dtype_works(self.device, torch.bfloat16):
            return torch.bfloat16
        if _dtype_works(self.device, torch.float16):
            warn_once(f"{self.device} does not run bf16 correctly; using fp16 (watch for NaN in VAE decodes)")
            return torch.float16
        warn_once(f"{self.device} runs neither bf16 nor fp16 correctly; using fp32")
        return torch.float32

    def _bf16_supported(self) -> bool:
        check = getattr(self.device_module, "is_bf16_supported", None)
        try:
            return bool(check()) if check is not None else False
        except (RuntimeError, TypeError):
            return False

    @property
    def device_module(self) -> Any:
        """torch.npu / torch.cuda for accelerators, torch.cpu for the CPU."""
        return torch.get_device_module(self.device_type)

    @property
    def index(self) -> int:
        return self.device.index or 0

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def device_name(self) -> str:
        if self.device_type == "cpu":
            return platform.processor() or platform.machine() or "cpu"
        try:
            return str(self.device_module.get_device_name(self.index))
        except (RuntimeError, AttributeError):
            return self.device_type.upper()

    @property
    def distributed_backend(self) -> str:
        """The torch.distributed backend for this device: hccl on NPU, nccl on CUDA, gloo on CPU."""
        return DISTRIBUTED_BACKENDS[self.device_type]

    def create_generator(self, seed: int, on: str = "device") -> torch.Generator:
        """A seeded generator; on="cpu" gives the same initial noise on every device type."""
        if on not in ("device", "cpu"):
            raise DeviceError(f"unknown generator placement {on!r}; use 'device' or 'cpu'")
        if on == "cpu" or self.device_type == "cpu":
            return torch.Generator("cpu").manual_seed(seed)
        try:
            return torch.Generator(self.device).manual_seed(seed)
        except (RuntimeError, TypeError) as exc:
            warn_once(
                f"cannot create a generator on {self.device} ({_cann_cause(exc)}); using a CPU generator, "
                "so the random stream differs from a device generator with the same seed"
            )
            return torch.Generator("cpu").manual_seed(seed)

    def memory_stats(self, log: bool = True) -> MemoryStats:
        """Device and host memory figures for the chosen device; also logged at INFO."""
        rss, host_total = host_memory()
        allocated = reserved = peak = free = total = None
        if self.device_type != "cpu":
            module = self.device_module
            allocated = int(module.memory_allocated(self.index))
            reserved = int(module.memory_reserved(self.index))
            peak = int(module.max_memory_allocated(self.index))
            free, total = (int(v) for v in module.mem_get_info(self.index))
        stats = MemoryStats(
            str(self.device), self.device_name, allocated, reserved, peak, free, total, rss, host_total,
            host_rss_is_peak=host_rss_is_peak(),
        )
        if log:
            logger.info("memory: %s", stats.summary())
        return stats

    def reset_peak_memory_stats(self) -> None:
        if self.device_type != "cpu":
            self.device_module.reset_peak_memory_stats(self.index)

    def empty_cache(self) -> None:
        """Free cached device memory (and Python garbage, which may hold device tensors)."""
        gc.collect()
        if self.device_type != "cpu":
            self.device_module.empty_cache()

    def synchronize(self) -> None:
        synchronize_device(self.device)

    def load_safetensors(self, path: str | Path, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """Load a .safetensors file, a sharded set (directory or *.index.json), to CPU or `device`."""
        return load_safetensors(path, device)

    def set_memory_efficient_mode(
        self, pipe: Any, mode: str = "none", vae_tiling: bool = False, vae_slicing: bool = False
    ) -> list[str]:
        """Place a diffusers pipeline on this device with a real memory mode; returns what was done."""
        if mode not in MEMORY_MODES:
            raise DeviceError(f"unknown offload mode {mode!r}; use one of: {', '.join(MEMORY_MODES)}")
        actions: list[str] = []
        if mode == "none" or self.device_type == "cpu":
            if mode != "none":
                actions.append(f"offload '{mode}' skipped: the device is the CPU, nothing to offload to")
            pipe.to(self.device)
            actions.append(f"all components on {self.device}")
        elif mode == "model":
            pipe.enable_model_cpu_offload(device=self.device)
            actions.append(f"model CPU offload onto {self.device}")
        else:
            pipe.enable_sequential_cpu_offload(device=self.device)
            actions.append(f"sequential CPU offload onto {self.device}")
        vae = getattr(pipe, "vae", None)
        if vae_tiling and vae is not None:
            vae.enable_tiling()
            actions.append("VAE tiling")
        if vae_slicing and vae is not None:
            vae.enable_slicing()
            actions.append("VAE slicing")
        for action in actions:
            logger.info("memory mode: %s", action)
        return actions

    def resolve_attention_backend(self, backend: str | None = None) -> str:
        """The attention kernel to use, checked against this device: the argument, else sdpa."""
        name = (backend or "sdpa").strip().lower()
        if name not in ATTENTION_BACKENDS:
            raise DeviceError(f"unknown attention backend {name!r}; use one of: {', '.join(ATTENTION_BACKENDS)}")
        if name == "npu_fused":
            if self.device_type != "npu":
                raise DeviceError(f"attention backend npu_fused needs an NPU, but the device is {self.device}")
            import torch_npu

            if not hasattr(torch_npu, "npu_fusion_attention"):
                raise DeviceError("attention backend npu_fused: this torch_npu has no npu_fusion_attention")
        return name

    def report(self) -> dict[str, Any]:
        """Everything the device report shows, as plain data."""
        return {
            "device": str(self.device),
            "device_name": self.device_name,
            "dtype": self.dtype_name,
            "attention": self.resolve_attention_backend(),
            "distributed_backend": self.distributed_backend,
            "device_count": device_count(self.device_type),
            "torch": torch.__version__,
            "memory": self.memory_stats(log=False).as_dict(),
        }


def sdpa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """torch's fused scaled-dot-product attention; [B, H, S, D] in and out."""
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)


def math_attention_chunk_rows(query_shape: Sequence[int], key_length: int, budget_bytes: int) -> int:
    """Query rows per chunk of `math_attention`: its fp32 scores and their softmax fit `budget_bytes`."""
    bytes_per_row = 2 * 4 * key_length * math.prod(query_shape[:-2])
    return max(1, min(query_shape[-2], budget_bytes // max(1, bytes_per_row)))


def math_attention_workspace(
    query_shape: Sequence[int], key_length: int, input_bytes: int, budget_bytes: int = MATH_ATTENTION_BUDGET_BYTES
) -> int:
    """Peak bytes `math_attention` allocates besides its inputs and output; the memory plan reserves this.

    One chunk's fp32 scores and softmax (or the previous chunk's scores while the next is computed), the
    chunk's fp32 query copy or result, and fp32 copies of key and value unless the inputs are fp32 already.
    """
    batch_heads, head_dim = math.prod(query_shape[:-2]), query_shape[-1]
    rows = math_attention_chunk_rows(query_shape, key_length, budget_bytes)
    chunk = rows * (2 * 4 * key_length + 4 * head_dim) * batch_heads
    copies = 0 if input_bytes == 4 else 2 * 4 * key_length * head_dim * batch_heads
    return chunk + copies


def math_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, budget_bytes: int = MATH_ATTENTION_BUDGET_BYTES
) -> torch.Tensor:
    """Explicit softmax(QK^T / sqrt(d)) V in fp32: the portable fallback for any device.

    Query rows are independent, so they are processed in chunks whose scores fit `budget_bytes`:
    the full score matrix of a large image would need many GB; the result is the same.
    """
    scale = 1.0 / math.sqrt(query.shape[-1])
    key_t = key.float().transpose(-1, -2)
    value_f = value.float()
    rows = math_attention_chunk_rows(query.shape, key.shape[-2], budget_bytes)
    out = torch.empty((*query.shape[:-1], value.shape[-1]), dtype=query.dtype, device=query.device)
    for start in range(0, query.shape[-2], rows):
        scores = torch.matmul(query[..., start : start + rows, :].float(), key_t).mul_(scale)
        out[..., start : start + rows, :] = torch.matmul(scores.softmax(dim=-1), value_f)
    return out


def npu_fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """torch_npu.npu_fusion_attention in BNSD layout (NPU only)."""
    import torch_npu

    result = torch_npu.npu_fusion_attention(
        query,
        key,
        value,
        query.shape[1],
        input_layout="BNSD",
        scale=1.0 / math.sqrt(query.shape[-1]),
        keep_prob=1.0,
    )
    return result[0]


ATTENTION_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sdpa": sdpa_attention,
    "math": math_attention,
    "npu_fused": npu_fused_attention,
}


def _shard_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The files of a checkpoint and, for a sharded one, its index's weight map."""
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(f"{path}: several index files ({', '.join(p.name for p in indexes)}); pass one")
        if indexes:
            return _shard_files(indexes[0])
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no .safetensors files or index.json in this directory")
        return files, None
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: not a valid safetensors index ({exc})") from exc
        shards = sorted({path.parent / name for name in weight_map.values()})
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise CheckpointError(f"{path}: missing shard(s): {', '.join(missing)}")
        return shards, weight_map
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: expected a .safetensors file, a *.index.json or a directory")
    return [path], None


def load_safetensors(
    path: str | Path,
    device: str | torch.device | None = None,
    slices: Mapping[str, tuple[int, int, int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Load one .safetensors file or a sharded set (a directory or a *.index.json).

    Tensors go to CPU by default or straight to `device`. `slices` maps a key to (dim, start, stop):
    only that part of the tensor is read (a tensor-parallel rank's share). A missing shard, a corrupt or
    truncated file, a key stored twice, or a key the index lists but its shard lacks raises CheckpointError.
    """
    from safetensors import safe_open

    files, weight_map = _shard_files(Path(path))
    target = str(device) if device is not None else "cpu"
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=target) as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                    if key in origin:
                        raise CheckpointError(f"{file}: key {key!r} is also stored in {origin[key].name}")
                    if slices is not None and key in slices:
                        dim, start, stop = slices[key]
                        state[key] = handle.get_slice(key)[(*[slice(None)] * dim, slice(start, stop))]
                    else:
                        state[key] = handle.get_tensor(key)
                    origin[key] = file
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{file}: cannot read safetensors file ({_cann_cause(exc)})") from exc
    if weight_map is not None:
        absent = [key for key, shard in weight_map.items() if origin.get(key, Path()).name != shard]
        if absent:
            raise CheckpointError(
                f"{files[0].parent}: {len(absent)} key(s) listed in the index are not in their shard, "
                f"e.g. {', '.join(absent[:3])}"
            )
    return state


ENV_DEVICE = "PREFERRED_DEVICE"
ENV_DTYPE = "PREFERRED_DTYPE"


@dataclass(frozen=True)
class DevicePreferences:
    """What a user asked for and where it came from, ready for `DeviceManager(**prefs.arguments())`."""

    device: str | None = None
    dtype: str | None = None
    device_origin: str = "preferred_device"
    dtype_origin: str = "preferred_dtype"

    def arguments(self) -> dict[str, Any]:
        return {
            "preferred_device": self.device,
            "preferred_dtype": self.dtype,
            "device_origin": self.device_origin,
            "dtype_origin": self.dtype_origin,
        }


def preferences_from(
    environ: Mapping[str, str], device: str | None = None, dtype: str | None = None
) -> DevicePreferences:
    """Flags win over PREFERRED_DEVICE / PREFERRED_DTYPE in `environ`; the origin names which one was used."""
    device_origin, device_value = ("--device", device) if device else (ENV_DEVICE, environ.get(ENV_DEVICE) or None)
    dtype_origin, dtype_value = ("--dtype", dtype) if dtype else (ENV_DTYPE, environ.get(ENV_DTYPE) or None)
    return DevicePreferences(device_value, dtype_value, device_origin, dtype_origin)


def _format_report(report: dict[str, Any]) -> str:
    stats = MemoryStats(**report["memory"])
    return "\n".join(
        [
            f"device:              {report['device']} ({report['device_name']})",
            f"devices visible:     {report['device_count']}",
            f"dtype:               {report['dtype']}",
            f"attention backend:   {report['attention']}",
            f"distributed backend: {report['distributed_backend']}",
            f"torch:               {report['torch']}",
            f"memory:              {stats.summary()}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Print the device report; exit 2 with one line if the requested device cannot be used.

    As a command line this module is an entry script, so here (and only here) it reads the environment.
    """
    import argparse

    environ = os.environ
    parser = argparse.ArgumentParser(description="Report the compute device, dtype and memory this machine offers.")
    parser.add_argument("--device", help=f"auto, npu, npu:N, cuda, cuda:N or cpu (default: {ENV_DEVICE} or auto)")
    parser.add_argument("--dtype", help=f"auto, bf16, fp16 or fp32 (default: {ENV_DTYPE} or auto)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = DeviceManager(**preferences_from(environ, args.device, args.dtype).arguments()).report()
    except DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else _format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
