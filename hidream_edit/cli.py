"""The editing command lines: inference_e1_1_npu.py (E1.1) and inference_npu.py (E1-Full).

The flags themselves are defined once in config.py (shared with the web UI and the doctor); this module
builds the edit parser, checks what can be checked before loading, runs the edit and prints the outcome.
A user mistake ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from device_utils import host_rss_label
from hidream_edit.config import (
    EXIT_USER_ERROR,
    OneLineArgumentParser,
    add_batch_arguments,
    add_cache_arguments,
    add_distributed_arguments,
    add_edit_arguments,
    add_model_arguments,
    add_plan_arguments,
    add_rewrite_arguments,
    cli_error_line,
    configure_logging,
    distributed_environment,
    edit_request_from_args,
    editor_settings_from_args,
    environment,
    model_spec,
    plan_dtype,
    vlm_api_key,
)
from hidream_edit.distributed import CardGroup
from hidream_edit.editor import (
    USER_ERRORS,
    EditCancelled,
    Editor,
    check_can_create,
    check_output_path,
    check_prompt_text,
    device_manager_for,
    resolve_request,
)
from hidream_edit.errors import GuidanceGroupError, UserError
from hidream_edit.spec import ModelSpec
from hidream_edit.tensor_parallel import ParallelLayout, check_tensor_split, join_layout
from hidream_edit.tensor_split import check_refine_weights, tensor_share
from hidream_edit.text import LINE_CHARS, shown

logger = logging.getLogger("hidream_edit")

def build_edit_parser(spec: ModelSpec) -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        description=f"Edit an image with {spec.title} following a text instruction, on Ascend NPU, CUDA or CPU.",
        epilog="Examples: %(prog)s --tiny --image in.png --instruction 'make the sky blue' --output out.png; "
        "%(prog)s --tiny --manifest edits.jsonl --output-dir results (also under torchrun --nproc-per-node N)",
    )
    parser.add_argument("--image", help="input image (one edit; or use --input-dir / --manifest; not with --plan)")
    parser.add_argument("--instruction", help="what to change, in words (with --input-dir: for every image)")
    parser.add_argument("--output", help="output image; its extension picks the format")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--verbose", action="store_true", help="log details (INFO)")
    if spec.prompt_form:
        group = parser.add_argument_group(f"{spec.title} prompt")
        group.add_argument("--keep-aspect", action="store_true",
                           help="keep the aspect ratio: resize the whole image to about 768x768 pixels "
                                "(sides multiples of 16) instead of stretching it to 768x768")
        group.add_argument("--target-description", help="describe the edited image; builds E1-Full's prompt form")
        add_rewrite_arguments(parser, spec)
    add_batch_arguments(parser)
    add_distributed_arguments(parser)
    add_edit_arguments(parser, spec)
    add_cache_arguments(parser)
    add_model_arguments(parser, spec)
    add_plan_arguments(parser)
    return parser


def edit_mode(args: argparse.Namespace, parser: argparse.ArgumentParser, spec: ModelSpec) -> str:
    """The run's form from the flags given: single, folder or manifest; a wrong mix is one line, exit 2."""
    given = {flag for flag in ("image", "instruction", "output") if getattr(args, flag) is not None}
    if args.input_dir is not None and args.manifest is not None:
        parser.error("use --input-dir or --manifest, not both")
    if args.input_dir is None and args.manifest is None:
        if args.output_dir is not None or args.recursive:
            parser.error("--output-dir and --recursive are for batches (--input-dir or --manifest)")
        missing = [f"--{flag}" for flag in ("image", "instruction", "output") if flag not in given]
        if missing:
            parser.error(
                f"missing {', '.join(missing)}: give --image, --instruction and --output for one edit, "
                "or --input-dir (with --instruction) or --manifest, with --output-dir, for a batch"
            )
        return "single"
    for flag in ("image", "output"):
        if flag in given:
            parser.error(f"--{flag} is for one edit; a batch reads --input-dir or --manifest and writes --output-dir")
    if args.output_dir is None:
        parser.error("a batch needs --output-dir")
    if spec.prompt_form and args.rewrite_instruction:
        parser.error("--rewrite-instruction works on one image; for a batch put the prompts into a --manifest")
    if args.input_dir is not None:
        if args.instruction is None:
            parser.error("--input-dir needs --instruction (the one edit applied to every image)")
        return "folder"
    if args.instruction is not None or args.recursive:
        parser.error("--instruction and --recursive are not used with --manifest (each line has its own edit)")
    if spec.prompt_form and args.target_description is not None:
        parser.error("--target-description is not used with --manifest; give each line a 'target_description'")
    return "manifest"


def run_plan(args: argparse.Namespace, spec: ModelSpec, env: Mapping[str, str]) -> int:
    """--plan: print the memory plan for this machine or a --plan-host one; reads headers, never weights.
    With --tensor-parallel K: the plan of a group of K cards (the first from --device on)."""
    from hidream_edit.host_layout import host_dict, host_summary, plan_host
    from hidream_edit.models import sizes_on_disk
    from hidream_edit.placement import Budgets, described_budgets, machine_budgets, plan_for_machine, plan_placement
    from hidream_edit.tensor_split import member_budgets, plan_tensor_group

    settings = editor_settings_from_args(args, spec, env)
    tp = args.tensor_parallel
    check_refine_weights(settings.refine_weights, tp)
    local_i1 = Path(settings.sources.i1) if Path(settings.sources.i1).is_dir() else None  # else the real model's
    attention = settings.attention or "sdpa"
    budgets: Budgets | None = None
    if args.plan_host:
        dtype = plan_dtype(args, env)
        budgets = described_budgets(args.plan_host, args.device, settings.max_memory, settings.host_memory)
    else:
        from device_utils import DeviceManager

        dm = DeviceManager(
            settings.device, settings.dtype, device_origin=settings.device_origin, dtype_origin=settings.dtype_origin
        )
        attention, dtype = dm.resolve_attention_backend(settings.attention), dm.dtype_name
    sizes = tensor_share(sizes_on_disk(settings.sources, dtype, settings.refine_weights), local_i1, tp)
    choice = (settings.offload, attention, settings.encoder_device)
    if tp > 1:
        if budgets is None:
            budgets = machine_budgets(dm.device_type, dm.index, settings.max_memory, settings.host_memory)
        group = plan_tensor_group(spec, sizes, member_budgets(budgets, tp), *choice)
        print(json.dumps(group.as_dict(), indent=2) if args.json else group.summary())
        if group.error:
            raise UserError(group.error)
        return 0
    if budgets is not None:
        plan = plan_placement(spec, sizes, budgets, *choice)
    else:
        plan = plan_for_machine(spec, sizes, dm.device_type, dm.index, *choice, settings.max_memory,
                                settings.host_memory)
        budgets = machine_budgets(dm.device_type, dm.index, settings.max_memory, settings.host_memory)
    host = None
    if budgets.cards and args.cfg_parallel == 1:  # the whole host's layouts, unless one was asked for
        host = plan_host(spec, sizes, budgets, attention, local_i1)
    extra = ("--dtype", dtype) if args.dtype else ()
    if args.json:
        print(json.dumps({**plan.as_dict(), "host_layouts": host and host_dict(host, spec.script, extra)}, indent=2))
    else:
        print(plan.summary() if host is None else f"{plan.summary()}\n\n{host_summary(host, spec.script, extra)}")
    return 0


def _check_prompts(args: argparse.Namespace) -> None:
    """Fail before asking a VLM or loading a model if a prompt is too long or not UTF-8."""
    check_prompt_text("instruction", args.instruction)
    check_prompt_text("negative prompt", args.negative)
    check_prompt_text("target description", getattr(args, "target_description", None))


def _instruction_for(args: argparse.Namespace, spec: ModelSpec, env: Mapping[str, str]) -> str:
    """The prompt to edit with; for E1-Full possibly built from a target description or by a VLM."""
    if not spec.prompt_form:
        return args.instruction
    from hidream_edit.images import open_image
    from hidream_edit.instructions import VLMSettings, compose_e1_full_prompt

    vlm = None
    if args.rewrite_instruction:
        if not args.vlm_url or not args.vlm_model:
            raise UserError("--rewrite-instruction needs --vlm-url and --vlm-model")
        vlm = VLMSettings(args.vlm_url, args.vlm_model, vlm_api_key(env), timeout_s=args.vlm_timeout)
    image = open_image(args.image) if vlm is not None else None
    return compose_e1_full_prompt(args.instruction, image, args.target_description, vlm, args.rewrite_fallback)


def prompt_metadata(args: argparse.Namespace, model: str, prompt: str) -> dict[str, Any]:
    """How the CLI built an E1-Full prompt, for the metadata JSON: the flags and the outcome, never the key."""
    from hidream_edit.spec import MODELS, is_e1_full_form

    if not MODELS[model].prompt_form:
        return {}
    vlm = None
    if args.rewrite_instruction:
        if is_e1_full_form(args.instruction):
            outcome = "not asked: the instruction is already in the E1-Full form"
        elif args.target_description is not None:
            outcome = "not asked: --target-description given"
        elif prompt == args.instruction.strip():
            outcome = "failed: went on with the bare instruction"
        else:
            outcome = "rewritten"
        vlm = {"url": args.vlm_url, "model": args.vlm_model, "timeout_s": args.vlm_timeout,
               "fallback": args.rewrite_fallback, "outcome": outcome}
    return {"instruction_given": args.instruction, "target_description": args.target_description, "vlm": vlm}


def out_of_memory_hint(exc: BaseException) -> str:
    """One line for a device OOM (torch.OutOfMemoryError or torch_npu's RuntimeError) with what to try."""
    first = str(exc).strip().splitlines()[0][:160]
    return (
        f"out of device memory ({first}); the memory plan (--plan) underestimated this edit: try a slower "
        "placement (--offload model, group or sequential) or --vae-tiling"
    )


def cache_summary(cache: dict[str, Any]) -> str:
    """', dbcache cached 9 of 28 steps' for the summary line; nothing with the cache off."""
    if cache.get("mode", "off") == "off":
        return ""
    return f", {cache['mode']} cached {cache['cached_steps']} of {cache['steps']} steps"


def summary_line(result_metadata: dict[str, Any], image_path: Path) -> str:
    t = result_metadata["timings"]
    memory = result_metadata["memory"]
    width, height = result_metadata["source_size"]
    steps = t["step_s"]
    per_step = sum(steps) / len(steps) if steps else 0.0
    cached = cache_summary(result_metadata.get("cache", {}))
    device_peak = (
        f"peak device memory {memory['peak'] / 2**30:.2f} GiB" if memory.get("peak") is not None else "no device memory"
    )
    return (
        f"saved {shown(image_path)} ({width}x{height}) on {result_metadata['device']} {result_metadata['dtype']}: "
        f"load {t['load_s']:.1f}s, encode {t['encode_s']:.1f}s, "
        f"{len(steps)} steps {sum(steps):.1f}s ({per_step:.2f}s/step){cached}, "
        f"decode {t['decode_s']:.1f}s; "
        f"{device_peak}, {host_rss_label(bool(memory.get('host_rss_is_peak')))} {memory['host_rss'] / 2**30:.2f} GiB"
    )


def run_edit_cli(argv: list[str] | None, model: str, env: Mapping[str, str] | None = None) -> int:
    """Parse, load, edit, save, print a summary. Exit 0 ok, 2 user mistake, 130 interrupted."""
    from tqdm import tqdm

    from hidream_edit.editor import save_result
    from hidream_edit.images import model_input_size, open_image

    env = environment(env)
    spec = model_spec(model)
    parser = build_edit_parser(spec)
    args = parser.parse_args(argv)
    if args.plan:
        try:
            return run_plan(args, spec, env)
        except USER_ERRORS as exc:
            print(f"error: {cli_error_line(exc, spec)}", file=sys.stderr)
            return EXIT_USER_ERROR
    if args.plan_host or args.json:
        parser.error("--plan-host and --json go with --plan")
    mode = edit_mode(args, parser, spec)
    configure_logging(args.verbose)
    if mode != "single":
        return run_batch_cli(args, spec, mode, env)
    output = Path(args.output).expanduser()
    group: CardGroup | None = None
    try:
        dist_env = distributed_environment(env)
        layout = ParallelLayout(dist_env.world_size, args.cfg_parallel, args.tensor_parallel)
        layout.check("one edit")
        leader = dist_env.rank % layout.group_size == 0
        if leader:
            check_output_path(output, args.overwrite)
            check_can_create(output)
        _check_prompts(args)
        source = open_image(args.image)
        model_input_size(spec.resize, source.width, source.height, getattr(args, "keep_aspect", False))
        settings = editor_settings_from_args(args, spec, env)
        check_tensor_split(settings.sources, settings.refine_weights, layout.tp, settings.fuse_lora)
        started = time.perf_counter()
        guidance, tensor = None, None
        if dist_env.enabled:  # then the group is every process (checked above)
            group, tensor = join_layout(device_manager_for(settings), dist_env, layout, args.dist_timeout)
            guidance = group.guidance
        if group is not None and group.edit is not None:  # the leader builds the prompt (maybe asking a VLM)
            instruction = group.edit.agree("instruction", lambda: _instruction_for(args, spec, env))
        else:
            instruction = _instruction_for(args, spec, env)
        request = edit_request_from_args(args, args.image, instruction)
        resolve_request(request, spec, settings.fuse_lora)
        editor = Editor.load(settings, group.dm if group is not None else None, tensor)
        if guidance is not None:
            editor.use_guidance_group(guidance)
        with tqdm(total=args.steps, desc="denoising", unit="step", file=sys.stderr, disable=not leader) as bar:
            result = editor.edit(request, on_step=lambda done, total: bar.update(done - bar.n))
        if not editor.writes_outputs:
            logger.info("rank %d: shared the denoising; the group's leader saves", dist_env.rank)
            return 0
        result.metadata.update(prompt_metadata(args, model, instruction))
        image_path, _ = save_result(result, output, overwrite=args.overwrite)
    except GuidanceGroupError as exc:
        print(f"error: {shown(exc, LINE_CHARS)}", file=sys.stderr)
        return 1
    except USER_ERRORS as exc:
        print(f"error: {cli_error_line(exc, spec)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except EditCancelled as exc:
        print(f"cancelled: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted; nothing was saved", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if "out of memory" not in str(exc).lower():
            raise
        print(f"error: {out_of_memory_hint(exc)}", file=sys.stderr)
        return 1
    finally:
        if group is not None:
            group.close()
    print(summary_line(result.metadata, image_path))
    logger.info("total %.1f s", time.perf_counter() - started)
    return 0


def run_batch_cli(args: argparse.Namespace, spec: ModelSpec, mode: str, env: Mapping[str, str]) -> int:
    """A folder or manifest batch: check everything, then edit (this rank's share under torchrun).

    Exit 0 every item ok or skipped, 1 some failed, 2 a mistake found before loading, 130 interrupted.
    """
    from hidream_edit.batch import BatchError, e1_full_prompt, folder_items, manifest_items, run_batch

    rank = 0
    try:
        dist_env = distributed_environment(env)
        rank = dist_env.rank
        layout = ParallelLayout(dist_env.world_size, args.cfg_parallel, args.tensor_parallel)
        layout.check(None)
        settings = editor_settings_from_args(args, spec, env)
        check_tensor_split(settings.sources, settings.refine_weights, layout.tp, settings.fuse_lora)
        output_dir = Path(args.output_dir).expanduser()
        template = edit_request_from_args(args, "", args.instruction or "")
        if mode == "folder":
            if spec.prompt_form:
                template = replace(template, instruction=e1_full_prompt(args.instruction, args.target_description))
            input_dir = Path(args.input_dir).expanduser()
            items = folder_items(input_dir, output_dir, args.recursive, template, spec, settings.fuse_lora)
            source = {"input_dir": str(input_dir), "recursive": args.recursive}
        else:
            manifest = Path(args.manifest).expanduser()
            items = manifest_items(manifest, output_dir, template, spec, settings.fuse_lora)
            source = {"manifest": str(manifest)}
        return run_batch(items, settings, output_dir, args.overwrite, source, dist_env, args.dist_timeout,
                         layout=layout)
    except GuidanceGroupError as exc:
        print(f"error: {shown(exc, LINE_CHARS)}; finished outputs are kept, rerun the same command to do the rest",
              file=sys.stderr)
        return 1
    except BatchError as exc:
        if rank == 0:
            for line in exc.lines():
                print(f"error: {shown(line, LINE_CHARS)}", file=sys.stderr)
        else:
            print(f"error: rank {rank}: the batch is invalid (rank 0 lists the problems)", file=sys.stderr)
        return EXIT_USER_ERROR
    except USER_ERRORS as exc:
        print(f"error: {cli_error_line(exc, spec)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; finished outputs are kept, rerun the same command to do the rest", file=sys.stderr)
        return 130
