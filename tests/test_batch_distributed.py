"""Batches across ranks with real torch.distributed (gloo on CPU): the shared item counter, torchrun runs
that must give the same files as one process and as the single-image CLI, and a rerun after a killed rank.

Every process runs one thread (torchrun sets OMP_NUM_THREADS=1; the other runs get it too), so the
outputs are byte-identical. Never more than two ranks: the test machine has two cores.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch.multiprocessing as torch_mp
from npu_standin import REPO
from PIL import Image
from torch.distributed import TCPStore

from hidream_edit.config import DistributedEnvironment
from hidream_edit.distributed import rendezvous_url
from hidream_edit.errors import UserError

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ITEMS = 6
RUN_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _claim_all(rank: int, port: int, count: int, result_file: str, attempt: int = 0) -> None:
    import torch

    from hidream_edit.batch import SharedQueue, claimed
    from hidream_edit.distributed import join_process_group

    torch.set_num_threads(1)
    group = join_process_group(DistributedEnvironment(2, rank, rank, "127.0.0.1", port, attempt), "gloo", 60.0)
    try:
        mine = list(claimed(SharedQueue(group), count))
        group.add("finished", len(mine))
        group.publish("claims", json.dumps(mine))
        if rank == 0:
            claims = [json.loads(text) for text in group.collect("claims")]
            Path(result_file).write_text(json.dumps({"claims": claims, "finished": group.add("finished", 0)}))
    finally:
        group.close()


def test_ranks_share_one_counter_so_each_item_goes_to_exactly_one_rank(tmp_path: Path) -> None:
    result_file = tmp_path / "claims.json"
    torch_mp.spawn(_claim_all, args=(free_port(), 40, str(result_file)), nprocs=2, join=True)
    result = json.loads(result_file.read_text())
    claims = result["claims"]
    assert len(claims) == 2 and sorted(claims[0] + claims[1]) == list(range(40))
    assert all(numbers == sorted(numbers) for numbers in claims) and result["finished"] == 40


def test_a_restarted_group_does_not_read_the_keys_of_the_attempt_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun --max-restarts: the agent's store (one TCPStore for all attempts) outlives the workers."""
    port = free_port()
    agent_store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # the workers connect to it as clients
    for attempt in (0, 1):
        result_file = tmp_path / f"attempt{attempt}.json"
        torch_mp.spawn(_claim_all, args=(port, 10, str(result_file), attempt), nprocs=2, join=True)
        claims = json.loads(result_file.read_text())["claims"]
        assert sorted(claims[0] + claims[1]) == list(range(10)), attempt
    del agent_store


@pytest.mark.parametrize(
    ("address", "url"),
    [
        ("10.0.0.1", "tcp://10.0.0.1:29500?rank=1&world_size=4"),
        ("node-a.cluster", "tcp://node-a.cluster:29500?rank=1&world_size=4"),
        ("fe80::1", "tcp://[fe80::1]:29500?rank=1&world_size=4"),  # unbracketed, the port would join the address
        ("[::1]", "tcp://[::1]:29500?rank=1&world_size=4"),
    ],
)
def test_the_rendezvous_url_brackets_an_ipv6_master_address(address: str, url: str) -> None:
    assert rendezvous_url(DistributedEnvironment(4, 1, 1, address, 29500)) == url


def _join_alone(queue: multiprocessing.Queue, port: int) -> None:
    from hidream_edit.distributed import join_process_group

    try:
        join_process_group(DistributedEnvironment(2, 1, 1, "127.0.0.1", port), "gloo", 2.0)
    except UserError as exc:
        queue.put(str(exc))
    else:
        queue.put("joined")


def test_a_rank_that_finds_no_group_fails_with_one_line_instead_of_hanging() -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_join_alone, args=(queue, free_port()))
    process.start()
    message = queue.get(timeout=120)
    process.join(timeout=60)
    assert message.startswith("rank 1 of 2 cannot join the gloo process group at 127.0.0.1:") and "\n" not in message


AGENT = """
import sys, time
from datetime import timedelta
from torch.distributed import TCPStore
store = TCPStore("127.0.0.1", int(sys.argv[1]), is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
print("ready", flush=True)
time.sleep(600)
"""

# A rank of a batch, cut to its store traffic: the entry script's first lines (not its main), then claims
# and the finished counter as run_batch makes them, ended as run_batch_cli ends a lost group.
RANK = """
import runpy, sys, time
runpy.run_path("inference_npu.py")
from hidream_edit.batch import SharedQueue, claimed
from hidream_edit.config import distributed_environment
from hidream_edit.distributed import join_process_group
from hidream_edit.errors import GuidanceGroupError
group = join_process_group(distributed_environment(), "gloo", 60.0)
print("joined", flush=True)
try:
    for number in claimed(SharedQueue(group), 10**9):
        time.sleep(0.05)
        group.add("finished", 1)
except GuidanceGroupError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(1)
finally:
    group.close()
"""


def test_killing_torchruns_agent_mid_batch_ends_every_rank_with_one_line(tmp_path: Path) -> None:
    """The agent hosts the store: each rank used to print a C++ frame dump and a DistNetworkError traceback."""
    port = free_port()
    base = {key: value for key, value in os.environ.items() if key != "TORCH_CPP_LOG_LEVEL"}
    agent = subprocess.Popen([sys.executable, "-c", AGENT, str(port)], stdout=subprocess.PIPE, text=True, env=base)
    ranks: list[subprocess.Popen[str]] = []
    try:
        assert agent.stdout is not None and agent.stdout.readline() == "ready\n"
        for rank in range(2):
            env = {**base, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True", "OMP_NUM_THREADS": "1"}
            ranks.append(subprocess.Popen([sys.executable, "-c", RANK], cwd=REPO, env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for process in ranks:
            assert process.stdout is not None and process.stdout.readline() == "joined\n"
        time.sleep(0.5)  # both ranks are claiming
        agent.kill()
        for rank, process in enumerate(ranks):
            _, stderr = process.communicate(timeout=120)
            assert process.returncode == 1, stderr
            assert stderr.startswith(f"error: rank {rank} lost the rendezvous store at 127.0.0.1:{port} "
                                     "(torchrun's agent or rank 0 ended): "), stderr
            assert stderr.count("\n") == 1, stderr  # no frame dump, no traceback
    finally:
        for process in [agent, *ranks]:
            if process.poll() is None:
                process.kill()
            process.wait()


# torchrun with the tiny E1-Full model


def run_env(tiny_env: dict[str, str]) -> dict[str, str]:
    keep = {key: value for key, value in os.environ.items() if key not in ("PREFERRED_DEVICE", "PREFERRED_DTYPE")}
    return {**keep, **tiny_env, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def six_edits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest of six edits (two instructions, six seeds) of six small images."""
    folder = tmp_path_factory.mktemp("six")
    lines = []
    for number in range(ITEMS):
        Image.new("RGB", (64, 48), (40 * number, 100, 200 - 20 * number)).save(folder / f"p{number}.png")
        instruction = "add a hat" if number % 2 else "make it snow"
        lines.append(json.dumps({"image": f"p{number}.png", "instruction": instruction, "seed": number}))
    (folder / "six.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def batch_command(six_edits: Path, output_dir: Path) -> list[str]:
    return ["inference_npu.py", "--tiny", "--manifest", str(six_edits / "six.jsonl"), "--output-dir", str(output_dir),
            "--steps", "2"]


def torchrun(arguments: list[str]) -> list[str]:
    return [TORCHRUN, "--standalone", "--nproc-per-node", "2", "--monitor-interval", "0.5", *arguments]


@pytest.fixture(scope="module")
def one_process(six_edits: Path, tiny_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The six edits as a batch in one process: the reference for the runs across ranks."""
    output_dir = tmp_path_factory.mktemp("one-process")
    command = [sys.executable, *batch_command(six_edits, output_dir)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=run_env(tiny_env),
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    return output_dir


def output_images(output_dir: Path) -> dict[str, bytes]:
    return {f"p{number}.png": (output_dir / f"p{number}.png").read_bytes() for number in range(ITEMS)}


def test_two_ranks_give_the_files_of_one_process_and_of_the_single_image_cli(
    six_edits: Path, one_process: Path, tiny_env: dict[str, str], tmp_path: Path
) -> None:
    output_dir = tmp_path / "two-ranks"
    done = subprocess.run(torchrun(batch_command(six_edits, output_dir)), capture_output=True, text=True, cwd=REPO,
                          env=run_env(tiny_env), timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"batch: {ITEMS} done, 0 failed, 0 skipped of {ITEMS} on 2 ranks in ")
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["counts"] == {"ok": ITEMS, "failed": 0, "skipped": 0}
    assert [item["index"] for item in summary["items"]] == list(range(ITEMS))
    assert {item["rank"] for item in summary["items"]} <= {0, 1}
    assert output_images(output_dir) == output_images(one_process)

    single = tmp_path / "single.png"
    command = [sys.executable, "inference_npu.py", "--tiny", "--image", str(six_edits / "p3.png"), "--instruction",
               "add a hat", "--seed", "3", "--steps", "2", "--output", str(single)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=run_env(tiny_env),
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert single.read_bytes() == (output_dir / "p3.png").read_bytes()


def finished_outputs(output_dir: Path) -> dict[str, tuple[int, int]]:
    """Outputs whose metadata JSON is written (the JSON comes last), with inode and mtime."""
    found = {}
    for number in range(ITEMS):
        image = output_dir / f"p{number}.png"
        if Path(f"{image}.json").exists():
            found[image.name] = (image.stat().st_ino, image.stat().st_mtime_ns)
    return found


def rank_process(torchrun_pid: int, rank: str) -> psutil.Process:
    for child in psutil.Process(torchrun_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == rank:
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with RANK={rank} under torchrun")


def test_a_rerun_after_a_killed_rank_finishes_only_the_missing_items(
    six_edits: Path, one_process: Path, tiny_env: dict[str, str], tmp_path: Path
) -> None:
    output_dir = tmp_path / "killed"
    command = torchrun(batch_command(six_edits, output_dir))
    run = subprocess.Popen(command, cwd=REPO, env=run_env(tiny_env), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while len(finished_outputs(output_dir)) < 2:  # wait for two finished items, then kill rank 1
            assert run.poll() is None and time.monotonic() < deadline, "the run ended before two items were done"
            time.sleep(0.2)
        rank_process(run.pid, "1").send_signal(signal.SIGKILL)
        assert run.wait(timeout=300) != 0  # torchrun stops the other rank and reports the failure
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    before = finished_outputs(output_dir)
    assert 2 <= len(before) < ITEMS

    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=run_env(tiny_env),
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["counts"] == {"ok": ITEMS - len(before), "failed": 0, "skipped": len(before)}
    skipped = {Path(item["output"]).name for item in summary["items"] if item["status"] == "skipped"}
    assert skipped == set(before)
    assert {name: finished_outputs(output_dir)[name] for name in before} == before  # not redone, not rewritten
    assert output_images(output_dir) == output_images(one_process)
