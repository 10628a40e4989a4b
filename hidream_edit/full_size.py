"""The full-size run: one E1.1 edit at the real sizes with random weights, measuring speed and memory.

Why: speed and memory do not depend on the weights' values, so a pipeline built from the real configurations
(spec.REAL_CONFIGS) with random weights costs what the real one costs. A user learns before a 60 GB download
whether the card fits and how fast an edit is, and the planner's predictions meet measurements.

Each component is built on the meta device, then materialised straight on the device the memory plan gives
it, in the run dtype, with a cheap deterministic fill: no host copy, no download, no file written. The edit
runs through the same pipeline code (pipeline.py), placed by the same planner (placement.py), on a 1024 x 1024
source. Tokenizers are not needed: every text becomes 128 token ids, the length real prompts are padded to.
A plan that cannot fit refuses before anything is allocated; running out of memory is a measured outcome.

Importing this module imports no torch (config.py builds the doctor's parser from it on a machine where torch
may be broken); torch and the device layer are imported where a run needs them.
"""

from __future__ import annotations

import logging
import math
import platform
import statistics
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from hidream_edit.errors import UserError
from hidream_edit.placement import (
    COMPONENTS,
    DTYPE_BYTES,
    Dims,
    ModelSizes,
    Plan,
    gib,
    plan_for_machine,
    swiglu_width,
)
from hidream_edit.spec import (
    EDIT_BRANCHES,
    I1_SCHEDULER_CONFIG,
    KEEP_FP32_IN_FP16,
    MODELS,
    REAL_CONFIGS,
    REAL_LLAMA_LM_HEAD,
    REAL_PARAMETERS,
    SIDE_MULTIPLE,
    TEXT_ENCODERS,
    TEXT_TOKENS,
    ModelSpec,
)

if TYPE_CHECKING:
    import torch

    from device_utils import DeviceManager

logger = logging.getLogger(__name__)

SPEC: ModelSpec = MODELS["e1.1"]
TOKENS_PER_ENCODER = 128  # max_sequence_length: every prompt is padded to it
WARMUP_STEPS = 1  # edit steps run before the timed ones (kernels chosen, memory pools grown)
REFINE_BRANCHES = 2
DEFAULT_STEPS = 2
PROMPT = "make the sky a deep orange sunset"
RECORD_FORMAT = 1
# Every key of a record; fields not measured (a refused plan) are None.
RECORD_FIELDS: tuple[str, ...] = (
    "record", "format", "status", "error", "failed_in", "model", "machine", "settings", "placement",
    "placement_actions", "attention", "work", "cut", "parameters", "seconds", "memory", "working_set", "steps_done",
    "plan",
)
PHASES: tuple[str, ...] = ("build", "encode", "warm-up step", "edit step", "refine step", "decode")


@dataclass(frozen=True)
class FullSizeSettings:
    """What one full-size run does: steps per stage, blocks kept, source side, and the placement flags."""

    steps: int = DEFAULT_STEPS  # timed steps per stage (edit and refine), after WARMUP_STEPS edit steps
    blocks: int | None = None  # keep N double- and N single-stream blocks (and N Llama / T5 layers); None: all
    size: int = 1024  # side of the square source in pixels (E1.1's working size)
    offload: str = "auto"
    attention: str | None = None
    max_memory: int | None = None
    host_memory: int | None = None
    encoder_device: str | None = None
    seed: int = 3

    def check(self) -> None:
        """UserError for values no run can use."""
        if self.steps < 1:
            raise UserError(f"the full-size run needs at least 1 step per stage, got {self.steps}")
        if self.blocks is not None and self.blocks < 1:
            raise UserError(f"the full-size run needs at least 1 block, got {self.blocks}")
        largest = largest_side(SPEC)
        if self.size % SIDE_MULTIPLE or not SIDE_MULTIPLE <= self.size <= largest:
            raise UserError(f"the source side must be a multiple of {SIDE_MULTIPLE} from {SIDE_MULTIPLE} to "
                            f"{largest} pixels, got {self.size}")


def largest_side(spec: ModelSpec) -> int:
    """The side of the largest square model input (E1.1: 1024)."""
    return math.isqrt(spec.max_pixels)


# ---------------------------------------------------------------------------------------------- building


def cut_configs(
    configs: dict[str, dict[str, Any]], blocks: int | None
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """The configurations with N double- and N single-stream blocks and N Llama / T5 layers kept, and what was
    cut (None when nothing is). Each kept block reads its Llama layer, or the last one kept when it is gone."""
    if blocks is None:
        return configs, None
    transformer = dict(configs["transformer"])
    double, single = transformer["num_layers"], transformer["num_single_layers"]
    kept_double, kept_single = min(blocks, double), min(blocks, single)
    llama_layers = min(blocks, configs["llama"]["num_hidden_layers"])
    t5_layers = min(blocks, configs["t5"]["num_layers"])
    read = transformer["llama_layers"][:kept_double] + transformer["llama_layers"][double:double + kept_single]
    transformer.update(num_layers=kept_double, num_single_layers=kept_single,
                       llama_layers=[min(layer, llama_layers - 1) for layer in read])
    cut = {
        **configs,
        "transformer": transformer,
        "llama": {**configs["llama"], "num_hidden_layers": llama_layers},
        "t5": {**configs["t5"], "num_layers": t5_layers},
    }
    what = {
        "blocks": blocks,
        "double_stream_blocks": [kept_double, double],
        "single_stream_blocks": [kept_single, single],
        "llama_layers": [llama_layers, configs["llama"]["num_hidden_layers"]],
        "t5_layers": [t5_layers, configs["t5"]["num_layers"]],
        "llama_layers_read": transformer["llama_layers"],
        "note": "kept / real; seconds and memory are of the cut model, nothing is scaled up",
    }
    return cut, what


def build_on_meta(configs: dict[str, dict[str, Any]]) -> dict[str, torch.nn.Module]:
    """Every component from its configuration, parameters on the meta device (nothing allocated).

    Buffers are computed on the CPU as usual (CLIP's position ids, Llama's rotary frequencies: small, and lost
    by a plain `to_empty`). The Llama is the base model without its lm_head and with eager attention, as
    models.py loads it.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, HiDreamImageTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        LlamaConfig,
        LlamaModel,
        T5Config,
        T5EncoderModel,
    )

    with init_empty_weights(include_buffers=False):
        modules: dict[str, torch.nn.Module] = {
            "transformer": HiDreamImageTransformer2DModel(**configs["transformer"]),
            "vae": AutoencoderKL(**configs["vae"]),
            "clip_l": CLIPTextModelWithProjection(CLIPTextConfig(**configs["clip_l"])),
            "clip_g": CLIPTextModelWithProjection(CLIPTextConfig(**configs["clip_g"])),
            "t5": T5EncoderModel(T5Config(**configs["t5"])),
            "llama": LlamaModel(LlamaConfig(**configs["llama"], attn_implementation="eager")),
        }
    for name in TEXT_ENCODERS:
        modules[name].tie_weights()  # T5's embedding is shared; accelerate's context skips the tying
    return {name: modules[name].eval() for name in COMPONENTS}


def parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _keeps_fp32(component: str, name: str, dtype: str) -> bool:
    """Tensors transformers keeps in fp32 when loading in fp16 (T5's `wo`), as the real loader does."""
    return dtype == "fp16" and any(part in f".{name}" for part in KEEP_FP32_IN_FP16.get(component, ()))


def module_sizes(modules: dict[str, torch.nn.Module], dtype: str) -> ModelSizes:
    """The plan's view of the built components, counted as placement.model_sizes counts checkpoint headers:
    bytes in the run dtype, group offload's units (the transformer's ModuleList entries) and the largest tensor."""
    import torch

    def tensor_bytes(component: str, name: str, parameter: torch.Tensor) -> int:
        return parameter.numel() * (4 if _keeps_fp32(component, name, dtype) else DTYPE_BYTES[dtype])

    components = {name: sum(tensor_bytes(name, key, p) for key, p in module.named_parameters())
                  for name, module in modules.items()}
    transformer = modules["transformer"]
    blocks = [sum(p.numel() for p in entry.parameters()) * DTYPE_BYTES[dtype]
              for child in transformer.children() if isinstance(child, torch.nn.ModuleList) for entry in child]
    largest = max(tensor_bytes(name, key, p) for name, module in modules.items()
                  for key, p in module.named_parameters())
    config = transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    return ModelSizes(
        dtype=dtype,
        components=components,
        largest_block=max(blocks, default=0),
        transformer_unblocked=components["transformer"] - sum(blocks),
        largest_tensor=largest,
        sources=dict.fromkeys(COMPONENTS, "full-size build"),
        dims=Dims(width, config.num_attention_heads, swiglu_width(width),
                  modules["vae"].config.block_out_channels[0]),
    )


def _fill(tensor: torch.Tensor, name: str, generator: torch.Generator) -> None:
    """Cheap, deterministic, variance-keeping values: biases 0, norm weights 1, matrices uniform in
    +-sqrt(3 / fan_in) (activations keep their scale through the layers, so nothing overflows)."""
    if name == "bias":
        tensor.zero_()
    elif tensor.dim() == 1:
        tensor.fill_(1.0)
    else:
        bound = math.sqrt(3.0 / tensor[0].numel())
        tensor.uniform_(-bound, bound, generator=generator)


def materialize(component: str, module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                seed: int) -> None:
    """Give every meta parameter real memory on `device` in `dtype` (fp32 where the real loader keeps it),
    filled from a generator on that device, then move the buffers there. Shared parameters stay shared."""
    import torch
    generator = torch.Generator(device=device).manual_seed(seed ^ zlib.crc32(component.encode()))
    dtype_text = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    made: dict[int, torch.nn.Parameter] = {}
    for prefix, submodule in module.named_modules():
        for name, parameter in list(submodule._parameters.items()):
            if parameter is None or parameter.device.type != "meta":
                continue
            if id(parameter) not in made:
                full_name = f"{prefix}.{name}" if prefix else name
                wanted = torch.float32 if _keeps_fp32(component, full_name, dtype_text) else dtype
                tensor = torch.empty(parameter.shape, dtype=wanted, device=device)
                _fill(tensor, name, generator)
                made[id(parameter)] = torch.nn.Parameter(tensor, requires_grad=False)
            submodule._parameters[name] = made[id(parameter)]
    module.to(device)


def home_device(plan: Plan, component: str) -> torch.device:
    """Where a component is materialised: the card it lives on, else host memory (it visits the card)."""
    import torch
    cards = {card.name for card in plan.budgets.cards}
    home = plan.chosen.homes[component]
    return torch.device(home) if home in cards else torch.device("cpu")


class FixedLengthTokenizer:
    """Stands in for a tokenizer: any text becomes `length` token ids below `vocab_size` (the same ids for the
    same text), so each encoder sees an input of the real length without tokenizer files."""

    pad_token = eos_token = "<pad>"

    def __init__(self, vocab_size: int, length: int = TOKENS_PER_ENCODER) -> None:
        self.vocab_size = vocab_size
        self.length = length
        self.model_max_length = length

    def __call__(self, text: str | list[str], max_length: int | None = None, **kwargs: Any) -> SimpleNamespace:
        import torch
        texts = [text] if isinstance(text, str) else list(text)
        length = min(max_length or self.length, self.length)
        ids = torch.stack([torch.randint(0, self.vocab_size, (length,), generator=_seeded(text)) for text in texts])
        return SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))

    def batch_decode(self, ids: Any, **kwargs: Any) -> list[str]:
        return [""] * len(ids)


def _seeded(text: str) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed(zlib.crc32(text.encode()))


def assemble(modules: dict[str, torch.nn.Module]) -> Any:
    """The editing pipeline over the materialised components, with fixed-length token ids for tokenizers."""
    from diffusers import UniPCMultistepScheduler

    from hidream_edit.pipeline import HiDreamImageEditingPipeline

    def tokens(name: str) -> FixedLengthTokenizer:
        return FixedLengthTokenizer(modules[name].config.vocab_size)

    modules["transformer"].max_seq = SPEC.max_seq
    return HiDreamImageEditingPipeline(
        scheduler=UniPCMultistepScheduler(**I1_SCHEDULER_CONFIG), vae=modules["vae"],
        text_encoder=modules["clip_l"], tokenizer=tokens("clip_l"),
        text_encoder_2=modules["clip_g"], tokenizer_2=tokens("clip_g"),
        text_encoder_3=modules["t5"], tokenizer_3=tokens("t5"),
        text_encoder_4=modules["llama"], tokenizer_4=tokens("llama"),
        transformer=modules["transformer"],
    )


# ---------------------------------------------------------------------------------------------- measuring


class MemoryMeter:
    """Peak memory per phase of the run, on each card of the plan and on the host.

    Entering a phase starts a new peak window (the cards' peak statistics reset; on Linux the host's VmHWM
    too); a repeated phase (every edit step) keeps its highest figures. A phase's working set is its peak
    less what was in use when it began. The run's peak is the highest of its phases.
    """

    def __init__(self, cards: list[torch.device]) -> None:
        self.cards = cards
        self.current: str | None = None
        self.phases: dict[str, dict[str, dict[str, int]]] = {}
        self.host_windows = True
        self._starts: dict[str, int] = {}

    def enter(self, phase: str) -> None:
        from device_utils import device_memory_now, host_memory, reset_device_peak, reset_host_peak

        self.close()
        self.current = phase
        for card in self.cards:
            reset_device_peak(card)
            self._starts[str(card)] = (device_memory_now(card) or (0, 0))[0]
        self.host_windows = reset_host_peak() and self.host_windows
        self._starts["host"] = host_memory()[0]

    def close(self) -> None:
        """End the current phase, folding its peaks in."""
        from device_utils import device_memory_peak, host_peak_rss

        if self.current is None:
            return
        figures = self.phases.setdefault(self.current, {})
        for card in self.cards:
            allocated, reserved = device_memory_peak(card) or (0, 0)
            self._fold(figures, str(card), self._starts[str(card)], allocated, reserved)
        self._fold(figures, "host", self._starts["host"], host_peak_rss(), None)
        self.current = None

    @staticmethod
    def _fold(figures: dict[str, dict[str, int]], where: str, start: int, peak: int, reserved: int | None) -> None:
        seen = figures.setdefault(where, {"start": start, "peak": 0, "working_set": 0, "times": 0})
        seen["peak"] = max(seen["peak"], peak)
        seen["working_set"] = max(seen["working_set"], peak - start)
        seen["times"] += 1
        if reserved is not None:
            seen["reserved_peak"] = max(seen.get("reserved_peak", 0), reserved)

    def peak(self, where: str, key: str = "peak") -> int | None:
        values = [figures[where][key] for figures in self.phases.values() if key in figures.get(where, {})]
        return max(values) if values else None


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure of any device: torch's OutOfMemoryError, torch_npu's and the CPU allocator's errors."""
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def refine_strength_for(edit_steps: int, refine_steps: int) -> float:
    """The refine strength that makes the pipeline run `edit_steps` edit steps, then `refine_steps` refine steps."""
    from hidream_edit.pipeline import refine_start_step

    total = edit_steps + refine_steps
    strength = (refine_steps - 0.5) / total  # int(total * (1 - strength)) is edit_steps, with half a step to spare
    assert refine_start_step(total, strength) == edit_steps
    return strength


def source_image(side: int) -> Any:
    """A square gradient to edit, made in memory."""
    import numpy as np
    from PIL import Image

    ramp = np.broadcast_to(np.linspace(0, 255, side), (side, side))
    return Image.fromarray(np.stack([ramp, ramp.T, 255 - ramp], axis=-1).astype(np.uint8), "RGB")


def _phase_of_step(index: int, edit_steps: int) -> str:
    if index < WARMUP_STEPS:
        return "warm-up step"
    return "edit step" if index < edit_steps else "refine step"


@dataclass
class StepsDone:
    """Denoising steps finished so far (read after an out-of-memory too)."""

    count: int = 0


def _edit(pipe: Any, settings: FullSizeSettings, meter: MemoryMeter, done: StepsDone,
          progress: Callable[[str], None]) -> Any:
    """One E1.1 edit with the model's defaults: WARMUP_STEPS + steps edit steps, then steps refine steps."""
    import torch

    defaults = SPEC.defaults
    edit_steps = WARMUP_STEPS + settings.steps
    total = edit_steps + settings.steps

    def first_transformer_call(module: Any, args: Any) -> None:
        if meter.current == "encode":
            meter.enter(_phase_of_step(0, edit_steps))

    def after_step(pipeline: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        done.count = index + 1
        progress(f"step {index + 1} of {total} ({_phase_of_step(index, edit_steps)}) done")
        meter.enter(_phase_of_step(index + 1, edit_steps) if index + 1 < total else "decode")
        return tensors

    hook = pipe.transformer.register_forward_pre_hook(first_transformer_call)
    meter.enter("encode")
    try:
        with torch.inference_mode():
            return pipe(
                prompt=PROMPT, negative_prompt=defaults.negative, image=source_image(settings.size),
                guidance_scale=defaults.guidance, image_guidance_scale=defaults.image_guidance,
                num_inference_steps=total, generator=torch.Generator("cpu").manual_seed(settings.seed),
                refine_strength=refine_strength_for(edit_steps, settings.steps), clip_cfg_norm=defaults.clip_cfg_norm,
                callback_on_step_end=after_step,
            )
    finally:
        hook.remove()


# ---------------------------------------------------------------------------------------------- the run


def run_full_size(
    settings: FullSizeSettings,
    dm: DeviceManager,
    configs: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build, place and run one full-size E1.1 edit; returns the record (see RECORD_FIELDS).

    `configs` default to the real ones (spec.REAL_CONFIGS); tests pass scaled-down ones. status is "ok",
    "refused" (the plan cannot fit: nothing was allocated) or "out_of_memory" (with the peaks reached).
    Other errors propagate: a UserError for settings no run can use.
    """
    import torch

    from device_utils import synchronize_device
    from hidream_edit.models import place_pipeline

    settings.check()
    say = progress or (lambda text: logger.info("full-size: %s", text))
    attention = dm.resolve_attention_backend(settings.attention)
    configs, cut = cut_configs(configs or REAL_CONFIGS, settings.blocks)
    started = time.perf_counter()
    modules = build_on_meta(configs)
    sizes = module_sizes(modules, dm.dtype_name)
    plan = plan_for_machine(SPEC, sizes, dm.device_type, dm.index, settings.offload, attention,
                            settings.encoder_device, settings.max_memory, settings.host_memory)
    record = _record_base(settings, dm, plan, attention, cut, modules)
    if plan.error:
        return {**record, "status": "refused", "error": plan.error}
    if plan.warning:
        logger.warning("memory plan: %s", plan.warning)
    say(f"plan: {plan.placement}; building {gib(sizes.total)} of random weights on "
        f"{', '.join(sorted({str(home_device(plan, name)) for name in COMPONENTS}))}")
    meter = MemoryMeter([torch.device(peak.device) for peak in plan.chosen.devices])
    seconds: dict[str, Any] = {}
    done = StepsDone()
    output = pipe = None
    status, error = "ok", None
    try:
        meter.enter("build")
        for name, module in modules.items():
            materialize(name, module, home_device(plan, name), dm.dtype, settings.seed)
        pipe = assemble(modules)
        record["placement_actions"] = place_pipeline(pipe, dm, plan, attention).actions
        synchronize_device(dm.device)
        seconds["build"] = time.perf_counter() - started
        say(f"built in {seconds['build']:.1f} s; editing")
        output = _edit(pipe, settings, meter, done, say)
        synchronize_device(dm.device)
    except Exception as exc:  # an allocation failure anywhere is a measured outcome; anything else propagates
        if not is_out_of_memory(exc):
            raise
        status, error = "out_of_memory", str(exc).strip().splitlines()[0]
        record["failed_in"] = meter.current
    finally:
        meter.close()
        modules.clear()
        pipe = None
        dm.empty_cache()
    if output is not None:
        seconds.update(_seconds(output, settings))
    seconds["total"] = time.perf_counter() - started
    return {
        **record, "status": status, "error": error, "seconds": _rounded(seconds),
        "memory": _memory(meter, plan), "working_set": _working_set(meter, plan, dm),
        "steps_done": done.count,
    }


def _seconds(output: Any, settings: FullSizeSettings) -> dict[str, Any]:
    steps = output.timings["step_s"]
    edit_steps = WARMUP_STEPS + settings.steps
    edit, refine = steps[WARMUP_STEPS:edit_steps], steps[edit_steps:]
    return {
        "encode": output.timings["encode_s"],
        "warm_up_step": steps[0],
        "edit_step": statistics.median(edit),
        "refine_step": statistics.median(refine),
        "decode": output.timings["decode_s"],
        "edit_steps": edit,
        "refine_steps": refine,
    }


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    return {key: [round(v, 4) for v in value] if isinstance(value, list) else round(value, 4)
            for key, value in values.items()}


def _ratio(measured: int | None, predicted: int | None) -> float | None:
    return round(measured / predicted, 3) if measured is not None and predicted else None


def _memory(meter: MemoryMeter, plan: Plan) -> dict[str, Any]:
    predicted = plan.peaks()
    devices = []
    for card in meter.cards:
        name = str(card)
        allocated, reserved = meter.peak(name), meter.peak(name, "reserved_peak")
        devices.append({
            "device": name, "peak_allocated": allocated, "peak_reserved": reserved, "predicted": predicted.get(name),
            "ratio_allocated": _ratio(allocated, predicted.get(name)),
            "ratio_reserved": _ratio(reserved, predicted.get(name)),
            "phases": {phase: figures[name] for phase, figures in meter.phases.items() if name in figures},
        })
    host = meter.peak("host")
    note = ("the plan's host figure is a real run's loading peak, when weights pass through host memory; here "
            "the weights are made on the card, so the host stays lower" if meter.cards else
            "the CPU holds everything: weights, working set and the runtime")
    return {
        "devices": devices,
        "host": {"peak_rss": host, "predicted": predicted["host"], "ratio": _ratio(host, predicted["host"]),
                 "per_phase_windows": meter.host_windows, "note": note,
                 "phases": {phase: figures["host"] for phase, figures in meter.phases.items()}},
    }


def _working_set(meter: MemoryMeter, plan: Plan, dm: DeviceManager) -> dict[str, Any]:
    """Measured working set per phase on the edit card (the host on a CPU) beside the planner's reserve."""
    where = str(meter.cards[0]) if meter.cards else "host"
    measured = {phase: figures[where]["working_set"] for phase, figures in meter.phases.items() if where in figures}
    return {"measured_on": where if meter.cards else f"host ({dm.device})", "measured": measured,
            "predicted": plan.reserve.as_dict()}


def _record_base(settings: FullSizeSettings, dm: DeviceManager, plan: Plan, attention: str,
                 cut: dict[str, Any] | None, modules: dict[str, torch.nn.Module]) -> dict[str, Any]:
    import torch

    side_tokens = (settings.size // SIDE_MULTIPLE) ** 2
    real = {**REAL_PARAMETERS, "llama": REAL_PARAMETERS["llama"] - REAL_LLAMA_LM_HEAD}
    return {
        "record": "HiDream-E1.1 full-size run (random weights)",
        "format": RECORD_FORMAT,
        "status": None,
        "error": None,
        "failed_in": None,
        "model": SPEC.name,
        "machine": {"device": str(dm.device), "device_name": dm.device_name, "dtype": dm.dtype_name,
                    "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                    "platform": platform.platform()},
        "settings": asdict(settings),
        "placement": plan.placement,
        "placement_actions": None,
        "attention": attention,
        "work": {
            "source": [settings.size, settings.size],
            "image_tokens": {"edit": 2 * side_tokens, "refine": side_tokens, "edit_padded_to": SPEC.max_seq},
            "text_tokens_per_branch": TEXT_TOKENS,
            "tokens_per_encoder": TOKENS_PER_ENCODER,
            "branches": {"edit": EDIT_BRANCHES, "refine": REFINE_BRANCHES},
            "steps": {"warm_up": WARMUP_STEPS, "edit": settings.steps, "refine": settings.steps,
                      "total": WARMUP_STEPS + 2 * settings.steps},
        },
        "cut": cut,
        "parameters": {name: {"built": parameter_count(module), "real": real[name]}
                       for name, module in modules.items()},
        "seconds": None,
        "memory": None,
        "working_set": None,
        "steps_done": 0,
        "plan": plan.as_dict(),
    }


def summary_lines(record: dict[str, Any]) -> list[str]:
    """The record as a short table: what ran, seconds per stage, measured beside predicted peaks."""
    machine, work = record["machine"], record["work"]
    cut = record["cut"]
    size = "x".join(str(side) for side in work["source"])
    blocks = (f"; cut to {cut['double_stream_blocks'][0]} of {cut['double_stream_blocks'][1]} double- and "
              f"{cut['single_stream_blocks'][0]} of {cut['single_stream_blocks'][1]} single-stream blocks, "
              f"Llama {cut['llama_layers'][0]} of {cut['llama_layers'][1]}, T5 {cut['t5_layers'][0]} of "
              f"{cut['t5_layers'][1]} layers" if cut else "")
    lines = [f"full-size {record['model']} edit, random weights: {machine['device']} ({machine['device_name']}), "
             f"{machine['dtype']}, placement {record['placement']}, attention {record['attention']}, {size} source, "
             f"{work['steps']['warm_up']} warm-up + {work['steps']['edit']} edit + {work['steps']['refine']} refine "
             f"steps{blocks}"]
    if record["status"] == "refused":
        return [*lines, f"refused before allocating: {record['error']}"]
    seconds = record["seconds"]
    lines.append("  seconds: " + ", ".join(f"{label} {seconds[key]:.2f}" for key, label in (
        ("build", "build"), ("encode", "encode"), ("warm_up_step", "warm-up step"), ("edit_step", "per edit step"),
        ("refine_step", "per refine step"), ("decode", "decode"), ("total", "total")) if key in seconds))
    lines.append(f"  {'memory':<8} {'measured':>12} {'predicted':>12} {'ratio':>6}")
    memory = record["memory"]
    for device in memory["devices"]:
        for key, label in (("allocated", "max allocated"), ("reserved", "max reserved")):
            lines.append(_memory_line(device["device"], device[f"peak_{key}"], device["predicted"],
                                      device[f"ratio_{key}"], label))
    host = memory["host"]
    lines.append(_memory_line("host", host["peak_rss"], host["predicted"], host["ratio"], "peak RSS"))
    if record["status"] == "out_of_memory":
        lines.append(f"OUT OF MEMORY in {record['failed_in']} after {record['steps_done']} steps: {record['error']}")
    return lines


def _memory_line(where: str, measured: int | None, predicted: int | None, ratio: float | None, label: str) -> str:
    measured_text = "n/a" if measured is None else gib(measured)
    predicted_text = "n/a" if predicted is None else gib(predicted)
    ratio_text = "n/a" if ratio is None else f"{ratio:.2f}"
    return f"  {where:<8} {measured_text:>12} {predicted_text:>12} {ratio_text:>6}  {label}"
