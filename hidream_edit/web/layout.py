"""The web editor's gradio layer: components, event wiring and serving; what the buttons do is in service.py.

`build_app` lays out one Blocks app over a loaded Editor and `launch` serves it with the safety
settings; `main` is gradio_demo_npu.py (parse, load the model once, build, serve).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import gradio as gr

from hidream_edit.config import (
    EXIT_USER_ERROR,
    DistributedEnvironment,
    distributed_environment,
    environment,
    model_spec,
)
from hidream_edit.editor import MAX_STEPS, USER_ERRORS, Editor, EditorSettings, device_manager_for
from hidream_edit.errors import GuidanceGroupError
from hidream_edit.step_cache import CACHE_MODES
from hidream_edit.tensor_parallel import ParallelLayout, check_tensor_split, join_layout
from hidream_edit.web.command_line import editor_settings_from_args, parse_command_line, start_logging
from hidream_edit.web.service import (
    BATCH_JOBS,
    EDIT_JOBS,
    LOOPBACK_HOSTS,
    EditParams,
    ProgressFn,
    WebEditor,
    WebSettings,
    run_cancellable,
    stop_key,
)

CSS = """
#status textarea, #batch-status textarea {font-weight: 600}
#device-panel {font-size: 0.9em}
"""


def _progress_adapter(progress: Any) -> ProgressFn:
    def report(fraction: float, desc: str) -> None:
        progress(max(0.0, min(1.0, fraction)), desc=desc)

    return report


def _settings_panel(web: WebEditor, prefix: str) -> list[gr.components.Component]:
    """The advanced settings (defaults as the CLI's), returned in EditParams order."""
    d = web.editor.defaults
    with gr.Accordion("Advanced settings", open=False):
        negative = gr.Textbox(d.negative, label="Negative instruction", elem_id=f"{prefix}-negative")
        with gr.Row():
            steps = gr.Slider(1, min(MAX_STEPS, 100), value=d.steps, step=1, label="Steps", elem_id=f"{prefix}-steps")
            guidance = gr.Slider(0, 20, value=d.guidance, step=0.1, label="Guidance", elem_id=f"{prefix}-guidance")
            image_guidance = gr.Slider(0, 20, value=d.image_guidance, step=0.1, label="Image guidance",
                                       elem_id=f"{prefix}-image-guidance")
        with gr.Row():
            refine = gr.Slider(0, 1, value=d.refine_strength, step=0.05, label="Refine strength",
                               elem_id=f"{prefix}-refine")
            clip = gr.Checkbox(d.clip_cfg_norm, label="Norm-clipped guidance (clip_cfg_norm)", elem_id=f"{prefix}-clip")
        with gr.Row():
            seed = gr.Number(d.seed, label="Seed", precision=0, minimum=0, elem_id=f"{prefix}-seed")
            random_seed = gr.Checkbox(False, label="Random seed", elem_id=f"{prefix}-random-seed")
        if web.spec.prompt_form:
            target = gr.Textbox("", label="Target image description (builds E1-Full's prompt form)",
                                elem_id=f"{prefix}-target")
            keep_aspect = gr.Checkbox(False, label="Keep aspect ratio (instead of stretching to a square)",
                                      elem_id=f"{prefix}-keep-aspect")
        else:
            target = gr.State(None)
            keep_aspect = gr.State(False)
        if web.spec.prompt_form and web.settings.vlm is not None:
            rewrite = gr.Checkbox(False, label=f"Rewrite the instruction with {web.settings.vlm.model} "
                                               "(used when no target description is given)",
                                  elem_id=f"{prefix}-rewrite")
        else:
            rewrite = gr.State(False)
        cache = web.settings.cache
        with gr.Row():
            cache_mode = gr.Dropdown(list(CACHE_MODES), value=cache.mode, label="Step cache (faster, changes pixels)",
                                     elem_id=f"{prefix}-cache")
            cache_threshold = gr.Number(cache.threshold, label="Cache threshold", minimum=0,
                                        elem_id=f"{prefix}-cache-threshold")
            cache_warmup = gr.Number(cache.warmup, label="Cache warm-up steps", precision=0, minimum=0,
                                     elem_id=f"{prefix}-cache-warmup")
            cache_max_skip = gr.Number(cache.max_skip, label="Most cached steps in a row (0: no limit)",
                                       precision=0, minimum=0, elem_id=f"{prefix}-cache-max-skip")
    return [negative, steps, guidance, image_guidance, refine, clip, seed, random_seed, target, keep_aspect, rewrite,
            cache_mode, cache_threshold, cache_warmup, cache_max_skip]


def build_app(editor: Editor, settings: WebSettings) -> gr.Blocks:
    """The Blocks app with its queue configured; `launch(demo, settings)` serves it."""
    # Only the files the app writes become downloadable, one by one (never the whole results dir).
    web = WebEditor(editor, settings, publish=gr.set_static_paths)
    title = web.spec.title
    tiny_note = " — **tiny random-weight test model: results are noise**" if editor.settings.sources.tiny else ""
    shows_prompt = web.spec.prompt_form

    def submitted() -> float:
        return time.monotonic()

    def stop_edit(request: gr.Request) -> str:
        web.stops.request(stop_key(request.session_hash, EDIT_JOBS))
        return "Stop requested: the edit stops after the current step."

    def stop_batch(request: gr.Request) -> str:
        web.stops.request(stop_key(request.session_hash, BATCH_JOBS))
        return "Stop requested: the batch stops after the current step."

    def stop_session(request: gr.Request) -> None:
        web.stop_session(request.session_hash)

    async def run_edit(
        source, instruction, negative, steps, guidance, image_guidance, refine, clip, seed, random_seed, target,
        keep_aspect, rewrite, cache, cache_threshold, cache_warmup, cache_max_skip, submitted_at,
        request: gr.Request, progress=gr.Progress(),  # noqa: B008
    ):
        params = EditParams(negative, steps, guidance, image_guidance, refine, clip, seed, random_seed, target,
                            keep_aspect, rewrite, cache, cache_threshold, cache_warmup, cache_max_skip)
        should_stop = web.stops.checker(stop_key(request.session_hash, EDIT_JOBS), submitted_at)
        report = _progress_adapter(progress)
        outcome = await run_cancellable(lambda stop: web.edit(source, instruction, params, stop, report), should_stop)
        seed_update = outcome.seed if outcome.seed is not None else gr.update()
        path = str(outcome.image_path) if outcome.image_path else None
        values = [path, outcome.files, outcome.status, seed_update]
        if shows_prompt:
            values.append(outcome.prompt if outcome.prompt is not None else gr.update())
        return tuple(values)

    async def run_batch(
        files, instructions, negative, steps, guidance, image_guidance, refine, clip, seed, random_seed, target,
        keep_aspect, rewrite, cache, cache_threshold, cache_warmup, cache_max_skip, submitted_at,
        request: gr.Request, progress=gr.Progress(),  # noqa: B008
    ):
        params = EditParams(negative, steps, guidance, image_guidance, refine, clip, seed, random_seed, target,
                            keep_aspect, rewrite, cache, cache_threshold, cache_warmup, cache_max_skip)
        should_stop = web.stops.checker(stop_key(request.session_hash, BATCH_JOBS), submitted_at)
        report = _progress_adapter(progress)
        outcome = await run_cancellable(lambda stop: web.batch(files, instructions, params, stop, report),
                                        should_stop)
        zip_file = str(outcome.zip_path) if outcome.zip_path else None
        return outcome.gallery, zip_file, outcome.status, outcome.errors_text

    with gr.Blocks(title=f"{title} editor", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"## {title} image editor{tiny_note}")
        with gr.Accordion("Device", open=True):
            panel = gr.Markdown(web.device_panel(), elem_id="device-panel")
        with gr.Tabs():
            with gr.Tab("Edit", id="edit"):
                with gr.Row(equal_height=True):
                    with gr.Column():
                        # A file, not gr.Image: gradio would decode the upload itself and turn a bad one into
                        # its generic error; the app opens it with its own checks and says what is wrong.
                        source = gr.File(label="Source image", file_count="single", type="filepath", height=110,
                                         elem_id="source")
                        preview = gr.Image(label="Source", type="pil", interactive=False, height=300,
                                           buttons=["fullscreen"], elem_id="source-preview")
                    result = gr.Image(label="Result", type="filepath", format="png", interactive=False, height=420,
                                      buttons=["download", "fullscreen"], elem_id="result")
                instruction = gr.Textbox(label="Instruction", placeholder="e.g. make the sky purple", lines=2,
                                         elem_id="instruction")
                edit_settings = _settings_panel(web, "edit")
                with gr.Row():
                    edit_button = gr.Button("Edit", variant="primary", elem_id="edit-button")
                    edit_stop = gr.Button("Stop", variant="stop", elem_id="edit-stop")
                status = gr.Textbox(label="Status", interactive=False, elem_id="status")
                prompt = (gr.Textbox(label="Prompt sent to the model", interactive=False, elem_id="edit-prompt")
                          if shows_prompt else None)
                downloads = gr.File(label="Download result and metadata", file_count="multiple", interactive=False,
                                    height=140, elem_id="downloads")
            with gr.Tab("Batch", id="batch"):
                batch_files = gr.File(
                    label=f"Images or one zip (up to {settings.max_batch} images)",
                    file_count="multiple",
                    elem_id="batch-files",
                )
                batch_instructions = gr.Textbox(
                    label="Instruction (one line for all images, or one line per image in upload order)",
                    lines=3, elem_id="batch-instructions",
                )
                batch_settings = _settings_panel(web, "batch")
                with gr.Row():
                    batch_button = gr.Button("Run batch", variant="primary", elem_id="batch-button")
                    batch_stop = gr.Button("Stop", variant="stop", elem_id="batch-stop")
                batch_status = gr.Textbox(label="Status", interactive=False, elem_id="batch-status")
                gallery = gr.Gallery(label="Results", columns=4, height=360, elem_id="batch-gallery")
                batch_zip = gr.File(label="All results (zip)", interactive=False, elem_id="batch-zip")
                batch_errors = gr.Textbox(label="Problems", interactive=False, lines=3, elem_id="batch-errors")

        # Decoding an upload for the preview is bounded work, but not free: one at a time.
        source.change(web.preview, inputs=source, outputs=[preview, status], concurrency_id="preview",
                      concurrency_limit=1, show_progress="minimal", api_visibility="private")
        edit_submitted = gr.State(None)
        batch_submitted = gr.State(None)
        # Recording the submit time needs no queue: a Stop pressed while the job waits still counts.
        edit_button.click(submitted, outputs=edit_submitted, queue=False, api_visibility="private").then(
            run_edit,
            inputs=[source, instruction, *edit_settings, edit_submitted],
            outputs=[result, downloads, status, edit_settings[6], *([prompt] if prompt is not None else [])],
            show_progress_on=result,
            concurrency_id="device",
            concurrency_limit=settings.concurrency,
            api_name="edit",
        )
        edit_stop.click(stop_edit, outputs=status, queue=False, api_visibility="private")
        batch_button.click(submitted, outputs=batch_submitted, queue=False, api_visibility="private").then(
            run_batch,
            inputs=[batch_files, batch_instructions, *batch_settings, batch_submitted],
            outputs=[gallery, batch_zip, batch_status, batch_errors],
            show_progress_on=gallery,
            concurrency_id="device",
            concurrency_limit=settings.concurrency,
            api_name="batch",
        )
        batch_stop.click(stop_batch, outputs=batch_status, queue=False,
                         api_visibility="private")
        timer = gr.Timer(settings.refresh_s)
        timer.tick(web.device_panel, outputs=panel, queue=False, show_progress="hidden", api_visibility="private")
        # Closing or reloading the tab ends its session: its jobs stop at the next step and save nothing.
        demo.unload(stop_session)

    demo.queue(default_concurrency_limit=settings.concurrency, max_size=settings.max_queue)
    demo.web_editor = web  # for tests and for launch()
    return demo


def launch(demo: gr.Blocks, settings: WebSettings, *, block: bool = True) -> None:
    """Serve the app with the safety settings (bind address, auth, upload limit; no directory is served)."""
    demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        auth=[settings.auth] if settings.auth else None,
        auth_message="HiDream editor: sign in" if settings.auth else None,
        max_file_size=settings.max_upload_bytes,
        show_error=False,
        ssr_mode=False,
        mcp_server=False,
        quiet=False,
        prevent_thread_lock=not block,
        css=CSS,
    )


def serve_with_edit_group(
    editor_settings: EditorSettings, settings: WebSettings, dist_env: DistributedEnvironment, layout: ParallelLayout,
    timeout_s: float,
) -> int:
    """Under torchrun with --cfg-parallel C and/or --tensor-parallel K (C x K processes, one edit group):
    rank 0 serves the page, the other ranks follow its edits."""
    from hidream_edit.group_jobs import GroupJobs, follow_leader

    group, tensor = join_layout(device_manager_for(editor_settings), dist_env, layout, timeout_s)
    try:
        edit = group.edit
        assert edit is not None  # C x K == world size > 1, checked by the caller
        jobs = GroupJobs(group.ranks.store, edit)
        if dist_env.rank == 0:
            print(f"loading {editor_settings.spec.title} on {layout.group_size} ranks...", file=sys.stderr,
                  flush=True)
        editor = Editor.load(editor_settings, group.dm, tensor)
        if group.guidance is not None:
            editor.use_guidance_group(group.guidance)
        if not edit.leader:
            follow_leader(editor, jobs)
            return 0
        editor.announce_edits(jobs.announce)
        try:
            launch(build_app(editor, settings), settings)
        finally:
            jobs.close()
        return 0
    finally:
        group.close()


def main(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Parse, load the model once, build and serve. Exit 2 on a user mistake (one line), 130 on Ctrl-C."""
    env = environment(env)
    settings = None
    try:
        model, args, settings = parse_command_line(argv, env)
        start_logging(args.verbose)
        editor_settings = editor_settings_from_args(args, env)
        if settings.host not in LOOPBACK_HOSTS and settings.auth is None:
            print(f"warning: serving on {settings.host} without --auth: anyone who can reach it can use the device",
                  file=sys.stderr)
        dist_env = distributed_environment(env)
        layout = ParallelLayout(dist_env.world_size, args.cfg_parallel, args.tensor_parallel)
        layout.check("the web UI")
        check_tensor_split(editor_settings.sources, editor_settings.refine_weights, layout.tp,
                           editor_settings.fuse_lora)
        if dist_env.enabled:
            return serve_with_edit_group(editor_settings, settings, dist_env, layout, args.dist_timeout)
        print(f"loading {model_spec(model).title}...", file=sys.stderr, flush=True)
        editor = Editor.load(editor_settings)
        demo = build_app(editor, settings)
        launch(demo, settings)
    except GuidanceGroupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # the port is taken or the address cannot be bound
        print(f"error: cannot serve on {settings.host}:{settings.port}: {exc}" if settings else f"error: {exc}",
              file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130
    return 0
