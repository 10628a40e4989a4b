"""Mutation testing for this project: plant one plausible bug at a time and see whether the tests notice.

Mutants are generated from the syntax tree of each target file (flipped comparisons and arithmetic,
swapped booleans, dropped `not`/minus, `and`/`or` swapped, off-by-one constants, a dropped keyword
argument, a removed call statement; never in docstrings, log calls, `metavar=`, `indent=` or `round()`'s
digits, which only change text for a reader, nor `zip`'s `strict=`, an assertion no right code can trip),
a deterministic sample per file. Each mutant is applied to a scratch copy of the repository and that file's
test subset runs there (its listed fast tests, then every test anywhere that names what the file defines);
a failing run "kills" the mutant, a passing run means the suite would let that bug through ("survived").

    .venv/bin/python tools/mutate.py                      # the default sample (see TARGETS)
    .venv/bin/python tools/mutate.py --per-file 20 --seed 3 hidream_edit/pipeline.py
    .venv/bin/python tools/mutate.py --list               # only show the sampled mutants
    .venv/bin/python tools/mutate.py --rerun OLD.json     # only the survivors of an earlier --json run

`make mutate` runs the default sample. It is slow (a test subset per mutant) and not part of `make test`.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _in(file: str, names: list[str]) -> list[str]:
    return [f"tests/{file}::{name}" for name in names]


# target file -> the fast tests that should catch a bug in it, fastest and most telling first (pytest -x
# stops at the first failure). Whole files or `file::test` ids; entries another branch has not added yet
# are left out (--list names them). No browser tests, no full-size tiny edits (about 15 s per step) and no
# torchrun runs of the whole CLI: they are slow, and each subset runs once per mutant.
PIPELINE_UNIT_TESTS = ["test_refine_start_step", "test_edit_text_batches_and_llama_batch_axis",
                       "test_width_concat_crop_and_negation", "test_guidance_without_norm_clipping",
                       "test_guidance_with_norm_clipping", "test_refine_guidance"]
MODEL_LOADING_TESTS = [
    "tests/test_downloads.py::test_a_mix_of_local_paths_and_hub_ids_is_planned_before_any_download",
    "tests/test_placement_run.py::test_nothing_fits_refuses_before_downloading",
    "tests/test_algo_weights.py::test_only_base_tensors_that_differ_are_kept_for_the_refine_stage",
    "tests/test_placement_run.py::test_what_the_plan_reads_straight_onto_the_card_reaches_the_loaders",
    "tests/test_plumbing.py::test_model_sources_flags_win_over_environment_over_hub_ids",
    "tests/test_plumbing.py::test_hub_ids_go_to_the_hub_cache_and_paths_stay_paths",
    "tests/test_plumbing.py::test_llama_folder_needs_one_of_the_tokenizer_files",
    "tests/test_plumbing.py::test_flags_end_to_end_through_the_real_loader",
    "tests/test_plumbing.py::test_fuse_lora_merges_the_adapter_at_load",
    "tests/test_plumbing.py::test_mismatched_e1_1_checkpoint_names_three_keys_and_counts_the_rest",
    "tests/test_plumbing.py::test_missing_model_files_list_six_and_count_the_rest",
    "tests/test_e1_1.py::test_e1_1_loading_holds_one_copy_of_the_transformer",
    "tests/test_e1_1.py::test_e1_1_bf16_load_casts_every_float_tensor",
    "tests/test_tensor_parallel.py::test_a_split_over_one_rank_loads_what_a_whole_load_does",
    "tests/test_e1_1.py::test_incomplete_model_directory_lists_what_is_missing",
    "tests/test_e1_1.py::test_each_i1_part_missing_its_config_or_weights_is_named",
    "tests/test_full_size.py::test_the_doctor_runs_a_full_size_edit_and_writes_only_its_record",
    "tests/test_e1_1.py::test_a_bf16_pipeline_holds_every_component_in_bf16",
    "tests/test_e1_1.py::test_e1_1_needs_only_the_i1_transformer_config_not_its_weights",
    "tests/test_placement_run.py::test_encoders_keep_the_transformer_and_move_each_encoder_once_per_encode",
    "tests/test_e1_full.py::test_lora_changes_output_and_base_refine_restores_i1",
    "tests/test_e1_full.py::test_adapters_disabled_only_during_refine_steps",
    "tests/test_e1_full.py::test_bad_lora_files_name_their_keys",
    "tests/test_e1_full.py::test_fused_and_unfused_agree_without_refine",
    "tests/test_plumbing.py::test_e1_full_takes_the_folder_its_download_makes_as_well_as_the_file",
    *_in("test_algo_weights.py", ["test_a_failed_swap_rolls_back_every_tensor",
                                  "test_a_failed_swap_back_keeps_the_refine_weights_whole",
                                  "test_a_swap_that_cannot_be_undone_refuses_every_later_use",
                                  "test_e1_full_switch_keeps_adapters_on_when_the_swap_fails"]),
]
PLACEMENT_RUN_TESTS = ["test_nothing_fits_refuses_before_downloading", "test_nothing_fits_refuses_before_loading",
                       "test_plan_reads_headers_only_and_needs_no_image",
                       "test_what_the_plan_reads_straight_onto_the_card_reaches_the_loaders",
                       "test_plan_text_for_e1_full_names_placement_and_rejections",
                       "test_plan_on_the_standin_npu_uses_a_second_card_for_the_encoders",
                       "test_plan_on_the_standin_asks_only_the_edit_card_when_it_is_enough",
                       "test_every_placement_gives_the_pixels_of_none",
                       "test_encoders_keep_the_transformer_and_move_each_encoder_once_per_encode",
                       "test_group_offload_hooks_are_on_the_transformer_blocks",
                       "test_model_offload_hooks_every_component"]
GUIDANCE_UNIT_TESTS = ["test_branches_are_shared_in_contiguous_runs_with_the_remainder_first",
                       "test_the_groups_buffers_are_made_on_its_card_not_on_torchs_default_device",
                       "test_settle_is_told_whether_this_ranks_share_failed",
                       "test_device_work_queued_by_the_share_counts_as_compute_not_as_waiting",
                       "test_launches_that_cannot_form_groups_are_refused", "test_launches_that_form_groups_pass"]
GUIDANCE_GROUP_TESTS = ["test_four_ranks_form_two_groups_that_gather_apart_and_split_the_items",
                        "test_a_rank_that_fails_mid_edit_stops_its_whole_group_at_once",
                        "test_stop_on_the_leader_stops_every_rank_at_the_same_step_and_the_group_goes_on",
                        "test_a_hung_rank_ends_the_others_within_the_collective_timeout"]
RANK_STORE_TESTS = ["test_a_rank_that_finds_no_group_fails_with_one_line_instead_of_hanging",
                    "test_rank_0_waits_the_groups_timeout_for_results_that_never_come",
                    "test_ranks_share_one_counter_so_each_item_goes_to_exactly_one_rank",
                    "test_a_restarted_group_does_not_read_the_keys_of_the_attempt_before",
                    "test_a_collective_a_rank_never_joins_fails_after_the_groups_timeout"]
CONFIG_TESTS = [
    "tests/test_config.py",
    "tests/test_hardening_cli.py",
    "tests/test_batch.py::test_distributed_environment",
    "tests/test_batch.py::test_wrong_flag_combinations_are_one_line_exit_2",
    "tests/test_placement_run.py::test_plan_flag_mistakes_are_one_line",
    "tests/test_plumbing.py::test_model_sources_flags_win_over_environment_over_hub_ids",
    "tests/test_plumbing.py::test_unknown_choices_are_refused_before_loading",
    "tests/test_plumbing.py::test_each_flag_changes_exactly_its_setting",
    "tests/test_plumbing.py::test_defaults_reach_the_boundaries",
    "tests/test_plumbing.py::test_every_flag_has_help_and_the_progress_bar_counts_to_the_steps",
    "tests/test_plumbing.py::test_verbose_sets_our_log_level",
    "tests/test_step_cache.py::test_bad_cache_flags_are_one_line_before_loading",
    "tests/test_full_size.py::test_bad_values_are_one_line_errors",
    "tests/test_batch.py::test_folder_batch_through_the_cli_matches_single_image_edits",
    "tests/test_web_service.py::test_command_line",
    "tests/test_web_service.py::test_a_server_started_without_flags_has_the_library_defaults",
    "tests/test_e1_1.py::test_cli_user_mistakes_are_one_line_exit_2",
]
ATTENTION_TESTS = ["test_sdpa_and_math_match_diffusers_processor", "test_attention_env_and_errors",
                   "test_npu_fused_attention_runs_the_fused_kernel"]
# the one-process tests of the split and the group's plan (the spawned groups take minutes per mutant)
TENSOR_SPLIT_TESTS = ["test_the_degree_must_divide_the_heads", "test_the_plan_splits_every_projection_of_every_block",
                      "test_a_lora_layer_is_sliced_with_its_base",
                      "test_a_split_over_one_rank_loads_what_a_whole_load_does",
                      "test_each_card_of_a_group_plans_its_share_and_the_encoders_it_holds",
                      "test_a_group_places_encoders_by_the_room_each_card_has_left",
                      "test_a_group_too_small_for_its_encoders_resident_lets_them_visit_or_refuses",
                      "test_plan_for_a_group_too_small_refuses_with_one_line",
                      "test_a_rank_missing_from_the_group_plan_is_one_line",
                      "test_an_encoder_runs_on_its_owner_alone_and_the_others_receive_its_embeddings",
                      "test_a_head_split_rms_norm_normalises_each_slice_as_the_whole_vector"]
TARGETS: dict[str, list[str]] = {
    "hidream_edit/pipeline.py": ["tests/test_edit_loop.py", *_in("test_pipeline.py", PIPELINE_UNIT_TESTS)],
    "hidream_edit/editor.py": ["tests/test_save_atomic.py", "tests/test_save_signals.py", "tests/test_hardening_cli.py",
                               "tests/test_plumbing.py",
                               "tests/test_batch.py::test_prompt_cache_keeps_the_most_recent_entries",
                               "tests/test_e1_1.py::test_save_is_atomic_and_never_overwrites",
                               "tests/test_e1_1.py::test_the_device_report_reads_memory_without_logging",
                               "tests/test_e1_1.py::test_the_layout_names_each_kind_of_group_a_process_edits_with"],
    "hidream_edit/models.py": MODEL_LOADING_TESTS,
    "hidream_edit/images.py": ["tests/test_images.py"],
    "device_utils.py": ["tests/test_device_utils.py",
                        "tests/test_placement.py::test_math_workspace_is_what_the_kernel_allocates"],
    "hidream_edit/cli.py": ["tests/test_plumbing.py", "tests/test_e1_1.py::test_cli_user_mistakes_are_one_line_exit_2",
                            "tests/test_e1_1.py::test_device_out_of_memory_is_one_line_with_the_fix"],
    "hidream_edit/placement.py": ["tests/test_placement.py", *_in("test_placement_run.py", PLACEMENT_RUN_TESTS)],
    "hidream_edit/batch.py": ["tests/test_batch.py", "tests/test_batch_hardening.py",
                              *_in("test_batch_distributed.py", RANK_STORE_TESTS[2:3]),
                              *_in("test_guidance_parallel.py", GUIDANCE_GROUP_TESTS[:1]),
                              "tests/test_guidance_parallel.py::"
                              "test_torchrun_batch_with_cfg_parallel_2_writes_the_one_process_files"],
    "hidream_edit/guidance_parallel.py": [*_in("test_guidance_parallel.py", GUIDANCE_UNIT_TESTS),
                                          "tests/test_group_jobs.py",
                                          *_in("test_guidance_parallel.py", GUIDANCE_GROUP_TESTS)],
    "hidream_edit/distributed.py": [*_in("test_batch_distributed.py", [
                                        "test_a_rank_that_cannot_form_its_guidance_group_leaves_the_process_group",
                                        "test_a_member_names_its_own_rank_and_its_groups_leader_when_agreement_fails",
                                        *RANK_STORE_TESTS]),
                                    *_in("test_guidance_parallel.py", GUIDANCE_GROUP_TESTS[:1])],
    "hidream_edit/group_jobs.py": ["tests/test_group_jobs.py"],
    "hidream_edit/config.py": CONFIG_TESTS,
    "hidream_edit/web/service.py": ["tests/test_web_service.py"],
    "hidream_edit/attention.py": _in("test_device_utils.py", ATTENTION_TESTS),
    "hidream_edit/instructions.py": ["tests/test_instructions.py",
                                     "tests/test_plumbing.py::test_rewrite_instruction_flags_reach_the_vlm_client"],
    "hidream_edit/host_layout.py": ["tests/test_host_layout.py"],
    "hidream_edit/tensor_split.py": _in("test_tensor_parallel.py", TENSOR_SPLIT_TESTS),
}
# the layout rules (tests/test_layout.py) read every product file: under a second, run first for each target
EVERY_FILE = ["tests/test_layout.py"]
# After a target's own subset come the tests anywhere that name what it defines (naming_tests), except the
# browser tests and these spawned process groups (40 s or more each).
NAMING_TESTS_LEFT_OUT = {"test_web_browser.py", "test_a_group_gives_the_image_and_metadata_of_one_process",
                         "test_each_rank_reads_only_its_slices_of_the_transformer_files",
                         "test_the_planned_command_for_two_cards_writes_the_single_process_image_under_torchrun"}
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", ".venv-*", "results", "__pycache__", ".pytest_cache",
                                     ".ruff_cache", "mutants")
SWAPS: dict[type, type] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.And: ast.Or, ast.Or: ast.And,
}
QUIET_CALLS = ("logger.", "logging.", "print(", "warn_once(", "warnings.warn(")
LOG_CALLS = ("logger.", "logging.")
# keyword arguments that only change text for a reader (argparse's metavar names a value in --help, json's
# indent lays out the same document), skipped like docstrings: dropping one is not a bug in what the program does
TEXT_KEYWORDS = ("metavar", "indent")


@dataclass(frozen=True)
class Mutant:
    """One planted bug: replace source[start:end] of `path` with `replacement`."""

    path: str
    line: int
    start: int
    end: int
    original: str
    replacement: str
    kind: str

    def describe(self) -> str:
        if self.kind.startswith("drop") and self.kind != "drop call":
            return f"{self.path}:{self.line} [{self.kind}] in {_short(self.original)}"
        return f"{self.path}:{self.line} [{self.kind}] {_short(self.original)} -> {_short(self.replacement)}"


def _short(text: str, limit: int = 90) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 3] + "...")


def _offsets(source: str) -> list[int]:
    """Character offset of the start of each line (1-based line numbers index it at line - 1)."""
    starts, total = [], 0
    for line in source.splitlines(keepends=True):
        starts.append(total)
        total += len(line)
    return starts + [total]


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _inside_fstring_or_annotation(tree: ast.AST) -> set[int]:
    """Nodes not worth mutating: parts of f-strings and of type annotations."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        parts: list[ast.AST] = []
        if isinstance(node, ast.JoinedStr):
            parts = [node]
        elif isinstance(node, (ast.arg, ast.AnnAssign)) and getattr(node, "annotation", None) is not None:
            parts = [node.annotation]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            parts = [node.returns]
        for part in parts:
            skip.update(id(child) for child in ast.walk(part))
    return skip


def _for_readers_only(tree: ast.AST) -> set[int]:
    """Arguments of logger/logging calls and `round()`'s digits: they only change what a reader sees."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        parts: list[ast.AST] = []
        if isinstance(node, ast.Call) and ast.unparse(node.func).startswith(LOG_CALLS):
            parts = [*node.args, *node.keywords]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "round":
            parts = [*node.args[1:], *node.keywords]
        for part in parts:
            skip.update(id(child) for child in ast.walk(part))
    return skip


def _is_zip_strict(call: ast.Call, keyword: ast.keyword) -> bool:
    """`zip(..., strict=True)` only asserts what the code already guarantees; without it nothing changes
    while the code is right, so no test can tell (an equivalent mutant, skipped)."""
    return isinstance(call.func, ast.Name) and call.func.id == "zip" and keyword.arg == "strict"


def generate(path: str, source: str) -> Iterator[Mutant]:
    """Every mutant this tool knows how to make in one file, in source order."""
    tree = ast.parse(source)
    offsets = _offsets(source)
    skip = _docstring_nodes(tree) | _inside_fstring_or_annotation(tree) | _for_readers_only(tree)

    def span(node: ast.AST) -> tuple[int, int]:
        return (offsets[node.lineno - 1] + node.col_offset, offsets[node.end_lineno - 1] + node.end_col_offset)

    def mutant(node: ast.AST, replacement: str, kind: str) -> Mutant:
        start, end = span(node)
        return Mutant(path, node.lineno, start, end, source[start:end], replacement, kind)

    for node in ast.walk(tree):
        if id(node) in skip or not hasattr(node, "lineno"):
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in SWAPS:
            yield mutant(node, f"({ast.unparse(ast.BinOp(node.left, SWAPS[type(node.op)](), node.right))})", "arith")
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in SWAPS:
            flipped = ast.Compare(node.left, [SWAPS[type(node.ops[0])]()], node.comparators)
            yield mutant(node, f"({ast.unparse(flipped)})", "compare")
        elif isinstance(node, ast.BoolOp):
            yield mutant(node, f"({ast.unparse(ast.BoolOp(SWAPS[type(node.op)](), node.values))})", "boolop")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            yield mutant(node, f"({ast.unparse(node.operand)})", "unary")
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            yield mutant(node, str(not node.value), "bool")
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float) and id(node) not in skip:
            yield mutant(node, repr(node.value + 1), "number")
        elif isinstance(node, ast.Call) and node.keywords and not ast.unparse(node.func).startswith(LOG_CALLS):
            for index, keyword in enumerate(node.keywords):
                if keyword.arg is None or keyword.arg in TEXT_KEYWORDS or _is_zip_strict(node, keyword):
                    continue
                kept = [k for i, k in enumerate(node.keywords) if i != index]
                call = ast.Call(node.func, node.args, kept)
                yield mutant(node, ast.unparse(call), f"drop {keyword.arg}=")
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            text = ast.get_source_segment(source, node) or ""
            if not text.startswith(QUIET_CALLS) and text != "sys.exit(main())":
                yield mutant(node, "pass", "drop call")


def apply(source: str, mutant: Mutant) -> str:
    return source[: mutant.start] + mutant.replacement + source[mutant.end :]


def sample(paths: list[str], per_file: int, seed: int) -> list[Mutant]:
    """A deterministic sample of valid mutants, `per_file` from each file."""
    chosen: list[Mutant] = []
    for path in paths:
        source = (REPO / path).read_text()
        valid = []
        for candidate in generate(path, source):
            try:
                compile(apply(source, candidate), path, "exec")
            except SyntaxError:
                continue
            valid.append(candidate)
        random.Random(f"{seed}:{path}").shuffle(valid)
        chosen.extend(sorted(valid[:per_file], key=lambda m: m.line))
    return chosen


def survivors_of(results_path: Path) -> tuple[list[Mutant], list[str]]:
    """The survivors recorded in an earlier --json file, found again in today's source by their text.

    Offsets and line numbers move when a file is edited, so each is matched by kind, original and
    replacement, taking the one nearest its old line. Returns those found and a line for each one gone.
    """
    found: list[Mutant] = []
    gone: list[str] = []
    for entry in json.loads(results_path.read_text()):
        if entry["status"] != "survived":
            continue
        old = Mutant(**{key: entry[key] for key in Mutant.__dataclass_fields__})
        matches = [m for m in generate(old.path, (REPO / old.path).read_text())
                   if (m.kind, m.original, m.replacement) == (old.kind, old.original, old.replacement)]
        if matches:
            found.append(min(matches, key=lambda m: abs(m.line - old.line)))
        else:
            gone.append(f"{old.describe()}: no longer in the source")
    return found, gone


def _exists(test: str) -> bool:
    """A test file, or a `file::test` id whose file defines that test function."""
    file, _, name = test.partition("::")
    if not (REPO / file).is_file():
        return False
    return not name or f"def {name}(" in (REPO / file).read_text()


def _public_names(path: str) -> set[str]:
    """The functions, classes and UPPER_CASE constants a module defines at its top level, `_private` ones left out."""
    names: set[str] = set()
    for node in ast.parse((REPO / path).read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper())
    return {name for name in names if not name.startswith("_")}


def naming_tests(path: str) -> list[str]:
    """Every test function, in any test file, whose body names something `path` defines (its tests by what
    they call, wherever they live), except NAMING_TESTS_LEFT_OUT."""
    names = _public_names(path)
    found: list[str] = []
    for file in sorted((REPO / "tests").glob("test_*.py")):
        if file.name in NAMING_TESTS_LEFT_OUT:
            continue
        for node in ast.parse(file.read_text()).body:
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
                continue
            if node.name in NAMING_TESTS_LEFT_OUT:
                continue
            used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            used |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            if used & names:
                found.append(f"tests/{file.name}::{node.name}")
    return found


def _tests_for(path: str) -> list[str]:
    """EVERY_FILE's tests, the target's subset (the files and test ids that exist here: another branch's may
    not, yet), then the naming tests not already in it."""
    if path not in TARGETS:
        return []
    chosen = [test for test in (*EVERY_FILE, *TARGETS[path]) if _exists(test)]
    whole_files = {test for test in chosen if "::" not in test}
    extra = [test for test in naming_tests(path) if test not in chosen and test.split("::")[0] not in whole_files]
    return chosen + extra


def run_tests(workdir: Path, tests: list[str], env: dict[str, str], timeout_s: float) -> tuple[str, float, str]:
    """('killed' (a test failed or it timed out), 'survived' (all passed) or 'error' (nothing ran), seconds,
    the end of pytest's report: which test failed)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "killed (timeout)", time.monotonic() - started, f"timed out after {timeout_s:.0f} s"
    seconds = time.monotonic() - started
    report = "\n".join(done.stdout.strip().splitlines()[-3:])
    if done.returncode == 0:
        return "survived", seconds, report
    if done.returncode == 1:
        return "killed", seconds, report
    return f"error (pytest exit {done.returncode})", seconds, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Mutation testing: does the suite notice planted bugs?")
    parser.add_argument("files", nargs="*", help=f"files to mutate (default: {', '.join(TARGETS)})")
    parser.add_argument("--per-file", type=int, default=8, help="mutants sampled per file (default 8)")
    parser.add_argument("--seed", type=int, default=1, help="sampling seed (default 1)")
    parser.add_argument("--list", action="store_true", help="print the sampled mutants and exit")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--rerun", type=Path, metavar="OLD_JSON",
                        help="run only the survivors of an earlier --json file (after tests were added)")
    args = parser.parse_args(argv)
    rerun: list[Mutant] = []
    if args.rerun:
        rerun, gone = survivors_of(args.rerun)
        for line in gone:
            print(f"gone: {line}", file=sys.stderr)
    files = sorted({m.path for m in rerun}) if args.rerun else args.files or list(TARGETS)
    for path in files:
        if not _tests_for(path):
            parser.error(f"{path}: no test subset for it in TARGETS")
        missing = [test for test in TARGETS[path] if not _exists(test)]
        if missing:  # a renamed test would otherwise drop out of the subset unnoticed
            print(f"{path}: left out of its subset, not in this checkout: {', '.join(missing)}", file=sys.stderr)
    mutants = rerun if args.rerun else sample(files, args.per_file, args.seed)
    if args.list:
        print("\n".join(m.describe() for m in mutants))
        return 0

    scratch = Path(tempfile.mkdtemp(prefix="hidream-mutate-"))
    workdir = scratch / "repo"
    shutil.copytree(REPO, workdir, ignore=COPY_IGNORE)
    env = {**os.environ, "HIDREAM_TINY_DIR": str(scratch / "tiny"), "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    results: list[dict] = []
    try:
        baseline: dict[str, float] = {}
        for path in files:
            status, seconds, report = run_tests(workdir, _tests_for(path), env, timeout_s=1800)
            if status != "survived":
                print(f"the unmutated tests for {path} do not pass ({status}); fix that first:\n{report}",
                      file=sys.stderr)
                return 2
            baseline[path] = seconds
            print(f"baseline {path}: {seconds:.0f} s", flush=True)
        for number, mutant in enumerate(mutants, 1):
            target = workdir / mutant.path
            original = target.read_text()
            target.write_text(apply(original, mutant))
            try:
                status, seconds, _ = run_tests(workdir, _tests_for(mutant.path), env, 3 * baseline[mutant.path] + 60)
            finally:
                target.write_text(original)
            results.append({**asdict(mutant), "status": status, "seconds": round(seconds, 1)})
            print(f"{number:3d}/{len(mutants)} {status:16s} {mutant.describe()}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    killed = sum(r["status"].startswith("killed") for r in results)
    survivors = [r for r in results if r["status"] == "survived"]
    print(f"\n{killed} of {len(results)} mutants killed ({100 * killed / max(len(results), 1):.0f}%), "
          f"{len(survivors)} survived")
    for mutant in (m for m, r in zip(mutants, results, strict=False) if r["status"] == "survived"):
        print(f"  survived: {mutant.describe()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
