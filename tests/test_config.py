"""config.py: flags + environment -> settings; flags win, the environment is read only here."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from device_utils import preferences_from
from hidream_edit.cli import build_edit_parser, run_edit_cli
from hidream_edit.config import (
    DEFAULT_DIST_TIMEOUT_S,
    default_tiny_dir,
    dist_timeout_seconds,
    distributed_environment,
    editor_settings_from_args,
    hub_offline,
    plan_dtype,
    resolve_model_sources,
    source_side_argument,
    tensor_parallel_degree,
    vlm_api_key,
    vlm_timeout_seconds,
)
from hidream_edit.editor import EditRequest, resolve_request
from hidream_edit.errors import UserError
from hidream_edit.spec import I1_HUB_ID, LLAMA_HUB_ID, MODELS

E1_FULL = MODELS["e1-full"]
BASE = ["--image", "x.png", "--instruction", "i", "--output", "o.png"]


def test_old_rewrite_flag_names_still_work_with_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    old = build_edit_parser(E1_FULL).parse_args([*BASE, "--refine-instruction", "--refine-fallback"])
    assert old.rewrite_instruction is True and old.rewrite_fallback is True
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [
        "warning: --refine-instruction is deprecated; use --rewrite-instruction",
        "warning: --refine-fallback is deprecated; use --rewrite-fallback",
    ]
    new = build_edit_parser(E1_FULL).parse_args([*BASE, "--rewrite-instruction"])
    assert new.rewrite_instruction is True and new.rewrite_fallback is False
    assert capsys.readouterr().err == ""


def test_rewrite_flags_exist_only_for_models_with_a_prompt_form() -> None:
    with pytest.raises(SystemExit):
        build_edit_parser(MODELS["e1.1"]).parse_args([*BASE, "--rewrite-instruction"])


def test_device_preferences_say_where_they_came_from() -> None:
    env = {"PREFERRED_DEVICE": "npu:1", "PREFERRED_DTYPE": "fp16"}
    from_env = preferences_from(env)
    assert (from_env.device, from_env.device_origin, from_env.dtype, from_env.dtype_origin) == (
        "npu:1", "PREFERRED_DEVICE", "fp16", "PREFERRED_DTYPE"
    )
    flags = preferences_from(env, "cpu", "fp32")
    assert (flags.device, flags.device_origin) == ("cpu", "--device")
    assert (flags.dtype, flags.dtype_origin) == ("fp32", "--dtype")
    assert preferences_from({}).device is None and preferences_from({}).dtype is None


def test_model_sources_flags_win_over_environment_then_hub_ids() -> None:
    env = {"HIDREAM_LLAMA_PATH": "/env/llama", "HIDREAM_E1_FULL_PATH": "/env/lora", "HF_HUB_OFFLINE": "yes"}
    sources = resolve_model_sources(E1_FULL, llama_path="/flag/llama", env=env)
    assert (sources.llama, sources.i1, sources.edit, sources.offline) == ("/flag/llama", I1_HUB_ID, "/env/lora", True)
    plain = resolve_model_sources(MODELS["e1.1"], env={})
    assert (plain.llama, plain.edit, plain.offline) == (LLAMA_HUB_ID, MODELS["e1.1"].edit_hub_id, False)
    with pytest.raises(UserError, match="--tiny uses the built-in tiny checkpoints; drop --lora-path"):
        resolve_model_sources(E1_FULL, edit_path="/x", tiny=True, env={})


def test_editor_settings_from_flags_and_environment(tiny_env: dict[str, str]) -> None:
    env = {**tiny_env, "PREFERRED_DEVICE": "cpu", "HIDREAM_ATTENTION": "math"}
    args = build_edit_parser(MODELS["e1.1"]).parse_args([*BASE, "--tiny", "--dtype", "fp32", "--rng", "cpu"])
    settings = editor_settings_from_args(args, MODELS["e1.1"], env)
    assert (settings.device, settings.device_origin) == ("cpu", "PREFERRED_DEVICE")
    assert (settings.dtype, settings.dtype_origin) == ("fp32", "--dtype")
    assert settings.attention == "math" and settings.rng == "cpu" and settings.sources.tiny
    args = build_edit_parser(MODELS["e1.1"]).parse_args([*BASE, "--tiny", "--attention", "sdpa"])
    assert editor_settings_from_args(args, MODELS["e1.1"], env).attention == "sdpa"


def test_model_path_variables_reach_the_editor_settings_and_flags_win() -> None:
    """The command line hands its environment on: HIDREAM_*_PATH fill in where no path flag is given."""
    env = {"HIDREAM_LLAMA_PATH": "/env/llama", "HIDREAM_I1_PATH": "/env/i1", "HIDREAM_E1_PATH": "/env/e1"}
    args = build_edit_parser(MODELS["e1.1"]).parse_args([*BASE, "--i1-path", "/flag/i1"])
    sources = editor_settings_from_args(args, MODELS["e1.1"], env).sources
    assert (sources.llama, sources.i1, sources.edit) == ("/env/llama", "/flag/i1", "/env/e1")


def test_fuse_lora_reaches_the_editor_settings_only_for_lora_models() -> None:
    """--fuse-lora is a switch of the LoRA model alone; set, it must reach the loader's settings."""
    e1_full = build_edit_parser(E1_FULL)
    fused = e1_full.parse_args([*BASE, "--fuse-lora", "--refine-strength", "0"])
    assert editor_settings_from_args(fused, E1_FULL, {}).fuse_lora is True
    assert editor_settings_from_args(e1_full.parse_args(BASE), E1_FULL, {}).fuse_lora is False
    with pytest.raises(SystemExit):
        build_edit_parser(MODELS["e1.1"]).parse_args([*BASE, "--fuse-lora"])


def test_the_tiny_set_is_offline_without_hf_hub_offline(tiny_env: dict[str, str]) -> None:
    """The tiny checkpoints are local folders: nothing about them may be looked up on the hub."""
    sources = resolve_model_sources(MODELS["e1.1"], tiny=True, env={"HIDREAM_TINY_DIR": tiny_env["HIDREAM_TINY_DIR"]})
    assert sources.tiny is True and sources.offline is True


def test_tiny_dir_and_offline_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_tiny_dir({"HIDREAM_TINY_DIR": str(tmp_path)}) == tmp_path
    assert default_tiny_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "hidream-e1-npu" / "tiny"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # neither variable: the user's ~/.cache
    assert default_tiny_dir({}) == tmp_path / "home" / ".cache" / "hidream-e1-npu" / "tiny"
    values = ("1", "true", "ON", "0", "")
    assert [hub_offline({"HF_HUB_OFFLINE": v}) for v in values] == [True, True, True, False, False]


def test_the_vlm_key_comes_from_the_environment_and_an_empty_one_is_none() -> None:
    """An empty OPENAI_API_KEY must not be sent as a key: the endpoint would refuse it instead of ignoring it."""
    assert vlm_api_key({"OPENAI_API_KEY": "sk-1"}) == "sk-1"
    assert vlm_api_key({"OPENAI_API_KEY": ""}) is None and vlm_api_key({}) is None


def test_the_plan_dtype_is_the_flag_then_the_variable_then_bf16() -> None:
    """--plan describes a host it may not run on: auto (or nothing) plans in bf16, what a 910B runs."""
    parser = build_edit_parser(MODELS["e1.1"])
    flag, no_flag = parser.parse_args([*BASE, "--dtype", "fp32"]), parser.parse_args(BASE)
    assert plan_dtype(flag, {"PREFERRED_DTYPE": "fp16"}) == "fp32"
    assert plan_dtype(no_flag, {"PREFERRED_DTYPE": " FP16 "}) == "fp16"
    assert plan_dtype(no_flag, {"PREFERRED_DTYPE": "auto"}) == plan_dtype(no_flag, {}) == "bf16"


def test_library_errors_name_no_flags_and_the_cli_adds_them() -> None:
    from hidream_edit.config import cli_error_line
    from hidream_edit.errors import ModelFilesError, NonFiniteError, UserError

    exists = UserError("out.png already exists", fix="output_exists")
    assert "--" not in str(exists)
    assert cli_error_line(exists, E1_FULL) == "out.png already exists; choose another --output or pass --overwrite"
    assert cli_error_line(ModelFilesError("edit weights: /x does not exist", role="edit"), E1_FULL) == (
        "edit weights: /x does not exist; check --lora-path (or try --tiny)"
    )
    non_finite = NonFiniteError("the VAE decode", "bf16")
    assert "--" not in str(non_finite) and cli_error_line(non_finite, E1_FULL).endswith("; rerun with --dtype fp32")
    assert cli_error_line(UserError("plain"), E1_FULL) == "plain"


def test_a_bad_attention_variable_is_named(tiny_env: dict[str, str], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    args = build_edit_parser(MODELS["e1.1"]).parse_args(BASE)
    assert editor_settings_from_args(args, MODELS["e1.1"], {"HIDREAM_ATTENTION": " Math "}).attention == "math"
    with pytest.raises(UserError) as error:
        editor_settings_from_args(args, MODELS["e1.1"], {"HIDREAM_ATTENTION": "garbage"})
    assert str(error.value) == (
        "HIDREAM_ATTENTION='garbage' is not an attention kernel; use one of: sdpa, math, npu_fused")
    # the command line stops on it before loading, with that one line
    source = tmp_path / "in.png"
    Image.new("RGB", (32, 32)).save(source)
    argv = ["--tiny", "--image", str(source), "--instruction", "x", "--output", str(tmp_path / "out.png")]
    assert run_edit_cli(argv, "e1.1", {**tiny_env, "HIDREAM_ATTENTION": "garbage"}) == 2
    assert capsys.readouterr().err == f"error: {error.value}\n"
    assert not (tmp_path / "out.png").exists()


TORCHRUN_ENV = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"MASTER_PORT": None}, "WORLD_SIZE=2 needs MASTER_ADDR and MASTER_PORT (start with torchrun)"),
        ({"MASTER_PORT": " "}, "WORLD_SIZE=2 needs MASTER_ADDR and MASTER_PORT (start with torchrun)"),
        ({"MASTER_ADDR": None}, "WORLD_SIZE=2 needs MASTER_ADDR and MASTER_PORT (start with torchrun)"),
        ({"MASTER_PORT": "0"}, "MASTER_PORT=0 is out of range: a port is between 1 and 65535"),
        ({"MASTER_PORT": "99999"}, "MASTER_PORT=99999 is out of range: a port is between 1 and 65535"),
        ({"MASTER_PORT": "-1"}, "MASTER_PORT='-1' is not a non-negative integer"),
        ({"MASTER_PORT": "２９５００"}, "MASTER_PORT='２９５００' is not a non-negative integer"),
        ({"MASTER_PORT": "9" * 5000}, f"MASTER_PORT={'9' * 40!r} is not a non-negative integer"),
    ],
)
def test_master_port_missing_or_out_of_range_says_which(change: dict[str, str | None], message: str) -> None:
    env = {key: value for key, value in {**TORCHRUN_ENV, **change}.items() if value is not None}
    with pytest.raises(UserError) as error:
        distributed_environment(env)
    assert str(error.value) == message


def test_the_port_range_ends_are_accepted() -> None:
    for port in (1, 65535):
        assert distributed_environment({**TORCHRUN_ENV, "MASTER_PORT": str(port)}).master_port == port


def test_one_process_and_the_torchrun_variables_that_may_be_left_unset() -> None:
    """Without torchrun this is rank 0 of 1; LOCAL_RANK and the restart count default to 0, RANK does not."""
    single = distributed_environment({})
    assert (single.world_size, single.rank, single.local_rank, single.master_addr, single.master_port,
            single.attempt) == (1, 0, 0, None, None, 0)
    first_try = distributed_environment(TORCHRUN_ENV)  # no LOCAL_RANK, no TORCHELASTIC_RESTART_COUNT
    assert (first_try.rank, first_try.local_rank, first_try.attempt) == (0, 0, 0)
    with pytest.raises(UserError, match="WORLD_SIZE=2 needs RANK between 0 and 1"):
        distributed_environment({name: value for name, value in TORCHRUN_ENV.items() if name != "RANK"})


def test_the_longest_number_python_reads_is_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    """The digit cap only keeps int() from raising: up to it, and with no cap at all, a number is read."""
    longest = "1" * sys.get_int_max_str_digits()
    assert distributed_environment({**TORCHRUN_ENV, "LOCAL_RANK": longest}).local_rank == int(longest)
    monkeypatch.setattr(sys, "get_int_max_str_digits", lambda: 0)  # python -X int_max_str_digits=0: no cap
    assert distributed_environment({**TORCHRUN_ENV, "LOCAL_RANK": "3"}).local_rank == 3


def test_parallel_flags_default_to_one_process_and_are_numbers() -> None:
    """The layout compares these with process counts: "2" is not 2, and a default above 1 needs torchrun."""
    parser = build_edit_parser(MODELS["e1.1"])
    default = parser.parse_args(BASE)
    assert (default.cfg_parallel, default.tensor_parallel) == (1, 1)
    asked = parser.parse_args([*BASE, "--cfg-parallel", "3", "--tensor-parallel", "2"])
    assert (asked.cfg_parallel, asked.tensor_parallel) == (3, 2)


def test_dist_timeout_is_above_zero_and_defaults_to_half_an_hour(capsys: pytest.CaptureFixture[str]) -> None:
    """Real loading takes minutes: a short default would end healthy runs while a rank still loads."""
    parser = build_edit_parser(MODELS["e1.1"])
    assert DEFAULT_DIST_TIMEOUT_S == 1800.0
    assert parser.parse_args(BASE).dist_timeout == 1800.0
    assert parser.parse_args([*BASE, "--dist-timeout", "0.5"]).dist_timeout == 0.5
    for bad in ("0", "-3", "nan", "inf", "soon"):
        with pytest.raises(SystemExit) as stop:
            parser.parse_args([*BASE, "--dist-timeout", bad])
        assert stop.value.code == 2
        assert "--dist-timeout must be" in capsys.readouterr().err


def _unwritable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A read-only folder; as root (who writes anyway) the build's first write fails as it would for a user."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        def refuse(*args: object, **kwargs: object) -> str:
            raise PermissionError(errno.EACCES, "Permission denied", str(folder / ".tiny.building-x"))

        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    return folder


@pytest.mark.parametrize("where", ["read-only", "under a file"])
def test_an_unwritable_tiny_folder_is_one_line_naming_it_and_the_variable(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if where == "read-only":
        folder = _unwritable_folder(tmp_path, monkeypatch) / "tiny"
        reason = f"Permission denied: {folder.parent}/.tiny.building-"
    else:
        (tmp_path / "a-file").write_text("x")
        folder = tmp_path / "a-file" / "sub" / "tiny"
        reason = f"Not a directory: {tmp_path / 'a-file' / 'sub'}"
    with pytest.raises(UserError) as error:
        resolve_model_sources(MODELS["e1.1"], tiny=True, env={"HIDREAM_TINY_DIR": str(folder)})
    message = str(error.value)
    assert message.startswith(f"cannot build the tiny checkpoints in {folder}: {reason}"), message
    assert message.endswith("; set HIDREAM_TINY_DIR to a writable folder of their own") and "\n" not in message
    argv = ["--tiny", "--image", "in.png", "--instruction", "x", "--output", str(tmp_path / "out.png"), "--plan"]
    assert run_edit_cli(argv, "e1.1", {"HIDREAM_TINY_DIR": str(folder)}) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_a_tiny_folder_error_without_a_file_name_is_the_errors_own_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk names no file: the message must not read "...: None"."""
    full_disk = OSError(errno.ENOSPC, "No space left on device")

    def fail(folder: Path) -> None:
        raise full_disk

    monkeypatch.setattr("hidream_edit.tiny.ensure_tiny_checkpoints", fail)
    with pytest.raises(UserError) as error:
        resolve_model_sources(MODELS["e1.1"], tiny=True, env={"HIDREAM_TINY_DIR": str(tmp_path)})
    assert str(error.value) == (f"cannot build the tiny checkpoints in {tmp_path}: {full_disk}; "
                                "set HIDREAM_TINY_DIR to a writable folder of their own")


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_flag_says_what_it_does(model: str) -> None:
    """--help is the CLIs' manual: a flag without a help text (dropped in an edit) is a flag nobody finds."""
    parser = build_edit_parser(MODELS[model])
    silent = [action.option_strings for action in parser._actions if action.option_strings and not action.help]
    assert silent == []


def test_only_the_models_with_a_keep_aspect_flag_keep_the_aspect(tmp_path: Path) -> None:
    from hidream_edit.config import edit_request_from_args

    image = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(image)
    e1_1 = build_edit_parser(MODELS["e1.1"]).parse_args(["--image", str(image), "--instruction", "x"])
    assert edit_request_from_args(e1_1, image, "x").keep_aspect is False
    e1_full = build_edit_parser(MODELS["e1-full"]).parse_args(["--image", str(image), "--instruction", "x",
                                                               "--keep-aspect"])
    assert edit_request_from_args(e1_full, image, "x").keep_aspect is True


def test_every_per_edit_flag_reaches_the_edit_request(tmp_path: Path) -> None:
    """A flag parsed but not passed on is silently ignored: each one, set away from its default, arrives."""
    from hidream_edit.config import edit_request_from_args

    image = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(image)
    args = build_edit_parser(MODELS["e1.1"]).parse_args([
        "--image", str(image), "--instruction", "x", "--negative", "blurry", "--steps", "7", "--guidance", "2.5",
        "--image-guidance", "1.5", "--refine-strength", "0.25", "--no-clip-cfg-norm", "--seed", "9",
        "--cache", "dbcache", "--cache-threshold", "0.3", "--cache-warmup", "4", "--cache-max-skip", "2",
    ])
    request = edit_request_from_args(args, image, "x")
    assert (request.negative, request.steps, request.guidance, request.image_guidance, request.refine_strength,
            request.clip_cfg_norm, request.seed) == ("blurry", 7, 2.5, 1.5, 0.25, False, 9)
    assert (request.cache, request.cache_threshold, request.cache_warmup, request.cache_max_skip) == (
        "dbcache", 0.3, 4, 2)


def test_every_full_size_flag_reaches_the_run_settings() -> None:
    """Each --full-size flag, away from its default, arrives in FullSizeSettings; the attention variable
    fills in only where --attention is not given."""
    from hidream_edit.config import add_full_size_arguments, full_size_settings_from_args

    parser = argparse.ArgumentParser()
    add_full_size_arguments(parser)  # the doctor's --full-size flags
    args = parser.parse_args([
        "--full-size", "--steps", "3", "--blocks", "2", "--size", "512", "--offload", "split", "--attention", "math",
        "--max-memory", "30GiB", "--host-memory", "100GiB", "--encoder-device", "npu:1",
    ])
    settings = full_size_settings_from_args(args, {"HIDREAM_ATTENTION": "sdpa"})
    assert (settings.steps, settings.blocks, settings.size, settings.offload, settings.attention) == (
        3, 2, 512, "split", "math")
    assert (settings.max_memory, settings.host_memory, settings.encoder_device) == (30 * 2**30, 100 * 2**30, "npu:1")
    defaults = full_size_settings_from_args(parser.parse_args(["--full-size"]), {"HIDREAM_ATTENTION": "sdpa"})
    assert (defaults.steps, defaults.blocks, defaults.size, defaults.attention) == (2, None, 1024, "sdpa")


def test_number_flags_take_the_ends_of_their_ranges() -> None:
    """Half a second is a timeout and one process a degree: the lower bounds are open or 1, not off by one."""
    import argparse

    assert dist_timeout_seconds("0.5") == 0.5 and vlm_timeout_seconds("0.5") == 0.5
    assert vlm_timeout_seconds("3600") == 3600.0 and tensor_parallel_degree("1") == 1
    for parse, text in ((dist_timeout_seconds, "0"), (vlm_timeout_seconds, "3600.5"), (tensor_parallel_degree, "0")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_full_size_counts_and_side_take_the_ends_of_their_ranges() -> None:
    """One step, one block and the 16-pixel side are the smallest runs; 1024 the largest side; 24 (not a multiple
    of 16) and 1040 (past 1024) are refused."""
    from hidream_edit.config import add_full_size_arguments

    parser = argparse.ArgumentParser()
    add_full_size_arguments(parser)
    smallest = parser.parse_args(["--full-size", "--steps", "1", "--blocks", "1", "--size", "16"])
    assert (smallest.steps, smallest.blocks, smallest.size) == (1, 1, 16)
    assert parser.parse_args(["--full-size", "--size", "1024"]).size == 1024
    for bad in ("0", "24", "1040"):
        with pytest.raises(argparse.ArgumentTypeError, match="--size must be a multiple of 16 from 16 to 1024"):
            source_side_argument(bad)


def test_cache_flags_take_the_ends_of_their_ranges() -> None:
    """0 is a real setting for each (threshold 0 caches nothing, 0 warm-up steps, 0: no skip limit)."""
    from hidream_edit.step_cache import MAX_COUNT, MAX_THRESHOLD

    parser = build_edit_parser(MODELS["e1.1"])
    for threshold, steps in ((0.0, 0), (MAX_THRESHOLD, MAX_COUNT)):
        args = parser.parse_args([*BASE, "--cache", "dbcache", "--cache-threshold", f"{threshold:g}",
                                  "--cache-warmup", str(steps), "--cache-max-skip", str(steps)])
        assert (args.cache_threshold, args.cache_warmup, args.cache_max_skip) == (threshold, steps, steps)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_a_command_line_without_edit_flags_asks_what_an_empty_library_request_asks(model: str) -> None:
    """The CLI's defaults and the library's (None: the model's default) must be one edit, step cache included."""
    from hidream_edit.config import edit_request_from_args

    spec = MODELS[model]
    args = build_edit_parser(spec).parse_args(BASE)
    from_cli = resolve_request(edit_request_from_args(args, "x.png", "make it blue"), spec)
    assert from_cli == resolve_request(EditRequest("x.png", "make it blue"), spec)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_the_progress_bar_knows_the_default_step_count(model: str) -> None:
    """The CLI's denoising bar is sized from --steps before the editor fills its defaults: without a number
    there it shows no total and no percentage."""
    assert build_edit_parser(MODELS[model]).parse_args(BASE).steps == MODELS[model].defaults.steps


def test_an_unknown_web_model_is_argparses_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped --model must be refused with the choices, not end in a traceback."""
    from hidream_edit.web.command_line import parse_command_line

    with pytest.raises(SystemExit) as exited:
        parse_command_line(["--model", "e2", "--results-dir", str(tmp_path / "r")], {})
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "argument --model: invalid choice: 'e2'" in err and err.count("\n") == 1


def test_a_log_line_reads_level_logger_and_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our warnings go to the user's terminal: one readable line each, "LEVEL logger: message"."""
    import logging

    from hidream_edit.config import configure_logging

    monkeypatch.setattr(logging.root, "handlers", [])  # as in a fresh process (pytest's handlers come back after)
    configure_logging(verbose=False)
    record = logging.LogRecord("hidream_edit.cli", logging.WARNING, __file__, 1, "the host is slow", None, None)
    assert [handler.format(record) for handler in logging.root.handlers] == [
        "WARNING hidream_edit.cli: the host is slow"]
