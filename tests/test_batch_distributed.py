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
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from npu_standin import REPO
from PIL import Image
from torch.distributed import TCPStore

from hidream_edit.config import DistributedEnvironment
from hidream_edit.distributed import rendezvous_url
from hidream_edit.errors import GuidanceGroupError, UserError

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ITEMS = 6
RUN_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _claim_all(rank: int, port: int, count: int, attempt: int = 0) -> dict | None:
    """Claim items until none are left; rank 0 returns every rank's claims and the finished count."""
    from hidream_edit.batch import SharedQueue, claimed
    from hidream_edit.distributed import join_process_group

    group = join_process_group(DistributedEnvironment(2, rank, rank, "127.0.0.1", port, attempt), "gloo", 60.0)
    try:
        mine = list(claimed(SharedQueue(group), count))
        group.add("finished", len(mine))
        group.publish("claims", json.dumps(mine))
        if rank == 0:
            return {"claims": [json.loads(text) for text in group.collect("claims")],
                    "finished": group.add("finished", 0)}
        return None
    finally:
        group.close()


def _restarted(rank: int, agent_port: int) -> list[dict | None]:
    """Two attempts on the store of torchrun's agent, which outlives the workers (--max-restarts)."""
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"  # the workers connect to it as clients
    try:
        return [_claim_all(rank, agent_port, 10, attempt) for attempt in (0, 1)]
    finally:
        del os.environ["TORCHELASTIC_USE_AGENT_STORE"]


def _join_alone(port: int) -> str:
    from hidream_edit.distributed import join_process_group

    try:
        join_process_group(DistributedEnvironment(2, 1, 1, "127.0.0.1", port), "gloo", 2.0)
    except UserError as exc:
        return str(exc)
    return "joined"


def _stalled(rank: int, port: int, folder: str) -> dict | None:
    """Rank 1 joins, then never takes part in a collective: rank 0's must fail after the group's timeout."""
    import torch
    import torch.distributed as dist

    from hidream_edit.distributed import join_process_group

    group = join_process_group(DistributedEnvironment(2, rank, rank, "127.0.0.1", port), "gloo", 2.0)
    try:
        if rank == 1:
            ends = time.monotonic() + 60
            while not Path(folder, "stalled.0.json").exists() and time.monotonic() < ends:
                time.sleep(0.1)
            return None
        started = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1))
        except RuntimeError as exc:
            return {"waited_s": time.monotonic() - started, "error": str(exc).splitlines()[0]}
        return {"waited_s": time.monotonic() - started, "error": None}
    finally:
        group.close()


def _coordination(rank: int, ports: dict[str, int], folder: str) -> None:
    """Every store-coordination scenario in one spawn of two ranks; each result to `<scenario>.<rank>.json`.

    First rank 1 alone tries a group that nobody else joins; then both claim items, then restart.
    """
    import torch

    torch.set_num_threads(1)
    scenarios = {"alone": lambda: _join_alone(ports["alone"]) if rank == 1 else None,
                 "claims": lambda: _claim_all(rank, ports["claims"], 40),
                 "restarted": lambda: _restarted(rank, ports["agent"]),
                 "stalled": lambda: _stalled(rank, ports["stalled"], folder)}
    for name, run in scenarios.items():
        try:
            result = {"result": run()}
        except Exception:  # recorded for the scenario's test; this rank takes part in nothing more
            Path(folder, f"{name}.{rank}.json").write_text(json.dumps({"error": traceback.format_exc()}))
            return
        Path(folder, f"{name}.{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def coordination(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the scenarios' results; the agent's store lives here, in the test process, as torchrun's."""
    folder = tmp_path_factory.mktemp("coordination")
    ports = {name: free_port() for name in ("alone", "claims", "agent", "stalled")}
    agent_store = TCPStore("127.0.0.1", ports["agent"], is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=60))
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_coordination, args=(rank, ports, str(folder))) for rank in (0, 1)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=RUN_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join()
    del agent_store
    return folder


def scenario_result(folder: Path, name: str, rank: int) -> Any:
    path = folder / f"{name}.{rank}.json"
    assert path.exists(), f"rank {rank} never finished the scenario {name!r}"
    recorded = json.loads(path.read_text())
    assert "error" not in recorded, f"rank {rank} failed in the scenario {name!r}:\n{recorded['error']}"
    return recorded["result"]


def test_rank_0_waits_the_groups_timeout_for_results_that_never_come() -> None:
    """A rank that never hands its results over ends rank 0's wait after --dist-timeout with one line,
    not after the store's own (longer) timeout with its error."""
    from torch.distributed import HashStore

    from hidream_edit.distributed import RankGroup

    store = HashStore()
    store.set_timeout(timedelta(seconds=3))
    group = RankGroup(DistributedEnvironment(2, 0, 0, "127.0.0.1", 29500), store, timedelta(seconds=0.5), "gloo")
    group.publish("records", "[]")
    with pytest.raises(UserError, match=r"^rank 0 waited 0.5 s for the other ranks' results \("):
        group.collect("records")
    RankGroup(DistributedEnvironment(2, 1, 1, "127.0.0.1", 29500), store, timedelta(seconds=0.5), "gloo").publish(
        "records", '["one"]')
    assert group.collect("records") == ["[]", '["one"]']


def test_ranks_share_one_counter_so_each_item_goes_to_exactly_one_rank(coordination: Path) -> None:
    result = scenario_result(coordination, "claims", 0)
    claims = result["claims"]
    assert len(claims) == 2 and sorted(claims[0] + claims[1]) == list(range(40))
    assert all(numbers == sorted(numbers) for numbers in claims) and result["finished"] == 40


def test_a_restarted_group_does_not_read_the_keys_of_the_attempt_before(coordination: Path) -> None:
    """torchrun --max-restarts: the agent's store (one TCPStore for all attempts) outlives the workers."""
    for attempt, result in enumerate(scenario_result(coordination, "restarted", 0)):
        claims = result["claims"]
        assert sorted(claims[0] + claims[1]) == list(range(10)), attempt


def test_a_collective_a_rank_never_joins_fails_after_the_groups_timeout(coordination: Path) -> None:
    """--dist-timeout bounds every collective, not only the rendezvous: torch's own default is 30 minutes."""
    result = scenario_result(coordination, "stalled", 0)
    assert result["error"] is not None and 1.5 < result["waited_s"] < 30, result


def test_a_rank_that_finds_no_group_fails_with_one_line_instead_of_hanging(coordination: Path) -> None:
    message = scenario_result(coordination, "alone", 1)
    assert message.startswith("rank 1 of 2 cannot join the gloo process group at 127.0.0.1:") and "\n" not in message


@pytest.mark.parametrize("failure", [RuntimeError("timed out waiting for rank 1"), ValueError("ranks out of order")],
                         ids=["store timeout", "any other error"])
def test_a_rank_that_cannot_form_its_guidance_group_leaves_the_process_group(
    failure: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank left in the default group keeps its store connection and gloo threads: torchrun would wait on it."""
    import torch.distributed as dist

    from device_utils import DeviceManager
    from hidream_edit import guidance_parallel
    from hidream_edit.distributed import CardGroup

    def form_nothing(*args: Any, **kwargs: Any) -> None:
        raise failure

    monkeypatch.setattr(guidance_parallel, "form_guidance_group", form_nothing)
    env = DistributedEnvironment(1, 0, 0, "127.0.0.1", free_port())
    try:
        with pytest.raises(Exception) as raised:
            CardGroup.join(DeviceManager("cpu", "fp32"), env, 2, 30.0)
        still_joined = dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert not still_joined
    if isinstance(failure, RuntimeError):
        assert isinstance(raised.value, GuidanceGroupError) and str(raised.value) == (
            "rank 0 cannot form its guidance group of 2: timed out waiting for rank 1; see --dist-timeout")
    else:
        assert raised.value is failure


def test_closing_a_card_group_leaves_the_process_group() -> None:
    """What every front end does last: a rank still in the default group keeps torchrun waiting on it."""
    import torch.distributed as dist

    from device_utils import DeviceManager
    from hidream_edit.distributed import CardGroup

    group = CardGroup.join(DeviceManager("cpu", "fp32"), DistributedEnvironment(1, 0, 0, "127.0.0.1", free_port()),
                           1, 30.0)
    try:
        assert dist.is_initialized() and group.guidance is None and group.edit is None
        group.close()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_member_names_its_own_rank_and_its_groups_leader_when_agreement_fails() -> None:
    """Ranks 2 and 3 are the second group of two: a member's messages say which two processes to look at."""
    import torch.distributed as dist

    from hidream_edit.distributed import EditGroup

    store = dist.HashStore()
    member = EditGroup.consecutive(3, 2, store, 0.2)
    with pytest.raises(GuidanceGroupError, match=r"^rank 3 waited 0.2 s for the next item from rank 2 \("):
        member.agree("next item", lambda: "never asked")

    def unreadable() -> str:
        raise ValueError("manifest line 4 is not JSON")

    with pytest.raises(ValueError):
        EditGroup.consecutive(2, 2, store, 0.2).agree("prompt", unreadable)
    with pytest.raises(GuidanceGroupError) as stopped:
        member.agree("prompt", lambda: "never asked")
    assert str(stopped.value) == ("rank 2 (the group's leader) stopped before the edit: "
                                  "manifest line 4 is not JSON")


def test_a_member_gives_up_on_its_leader_after_the_groups_timeout_not_the_stores() -> None:
    """--dist-timeout bounds a member's wait for what its leader decides: the rendezvous store's own
    timeout (torchrun sets minutes) would keep a member of a dead leader waiting that long. A leader
    that answers only later finds the member gone."""
    import threading

    import torch.distributed as dist

    from hidream_edit.distributed import EditGroup

    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=10))
    leader, member = (EditGroup.consecutive(rank, 2, store, 0.2) for rank in (0, 1))
    late_answer = threading.Timer(3.0, leader.agree, args=("next item", lambda: "7"))
    late_answer.start()
    try:
        with pytest.raises(GuidanceGroupError, match=r"^rank 1 waited 0.2 s for the next item from rank 0 \("):
            member.agree("next item", lambda: "never asked")
    finally:
        late_answer.cancel()
        late_answer.join()


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
    """The six edits as a batch in one process, the reference for the runs across ranks, and beside its
    folder `single.png`: item p3 by the single-image CLI. The two run at once, each on one core."""
    output_dir = tmp_path_factory.mktemp("one-process") / "batch"
    single = [sys.executable, "inference_npu.py", "--tiny", "--image", str(six_edits / "p3.png"), "--instruction",
              "add a hat", "--seed", "3", "--steps", "2", "--output", str(output_dir.parent / "single.png")]
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                env=run_env(tiny_env))
               for command in ([sys.executable, *batch_command(six_edits, output_dir)], single)]
    for process in running:
        _, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
        assert process.returncode == 0, stderr
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
    assert (one_process.parent / "single.png").read_bytes() == (output_dir / "p3.png").read_bytes()


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
