"""The web editor in a real browser: `gradio_demo_npu.py --tiny` on a free localhost port, driven by
Playwright in Debian's Chromium (apt-get install chromium; pip install playwright, no browser download).

One server for the module, started with auth (so signing in is tested too), a queue of one waiting job
(so "busy" can be provoked), a 1 MiB upload limit and a 1 s device panel refresh. Every test opens its
own pages, compares the results folder before and after itself and leaves the device idle, so the tests
do not depend on their order; they wait on what the page has committed (a value both halves of a slider
show, a status line, the device panel), never for a fixed time, and every wait has the same generous bound
(a loaded two-core machine can take many seconds per step). On failure a screenshot of every open page is
saved in the test's tmp dir.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
REPO = Path(__file__).resolve().parent.parent
USER, PASSWORD = "tester", "pw:for-tests"
START_TIMEOUT_S = 180
EDIT_TIMEOUT_MS = 150_000
PAGE_TIMEOUT_MS = 60_000  # anything the page shows without an edit running: a bound for a loaded machine
LONG_EDIT_STEPS = 100  # the Steps slider's maximum

if not CHROMIUM.exists():
    print(f"\nskipping the browser tests: {CHROMIUM} is missing (apt-get install -y chromium)", file=sys.stderr)
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install -y chromium)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _start_server(command: list[str], root: Path, env: dict[str, str], log_path: Path) -> subprocess.Popen | None:
    """Start the server and wait until it answers; None if its port was taken meanwhile (choose another)."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{command[command.index('--port') + 1]}"
    deadline = time.monotonic() + START_TIMEOUT_S
    # the answer must be ours: a server another test left on a port found free would also answer 200
    while _status(url + "/") != 200 or "Running on local URL" not in log_path.read_text(errors="replace"):
        if process.poll() is not None:
            if process.returncode == 2 and "cannot serve on" in log_path.read_text():
                return None
            pytest.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"the server was not up after {START_TIMEOUT_S} s:\n{log_path.read_text()}")
        time.sleep(0.5)  # polling for start-up, not a wait for correctness
    return process


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("web-server")
    results = root / "results"
    log_path = root / "server.log"
    env = {
        **os.environ,
        "HIDREAM_TINY_DIR": str(tiny_checkpoints.root),
        "HIDREAM_GRADIO_AUTH": f"{USER}:{PASSWORD}",
        "GRADIO_TEMP_DIR": str(root / "gradio-cache"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",  # gradio's "Running on" line reaches the log when it is printed
    }
    for _ in range(5):  # a port found free can be taken before the server binds it
        port = _free_port()
        command = [sys.executable, str(REPO / "gradio_demo_npu.py"), "--tiny", "--port", str(port), "--results-dir",
                   str(results), "--max-queue", "1", "--refresh", "1", "--max-upload-mb", "1"]
        process = _start_server(command, root, env, log_path)
        if process is not None:
            break
    else:
        pytest.fail(f"no free port to serve on after 5 tries:\n{log_path.read_text()}")
    try:
        yield {"url": f"http://127.0.0.1:{port}", "results": results, "log": log_path, "root": root}
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser(server: dict) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        outside: list[str] = []
        context.on("request", lambda request: outside.append(request.url)
                   if not request.url.startswith((server["url"], "data:", "blob:")) else None)
        page = context.new_page()
        page.goto(server["url"])
        page.locator("input[type=text]").fill(USER)
        page.locator("input[type=password]").fill(PASSWORD)
        page.get_by_role("button", name="Login").click()
        page.wait_for_selector("#device-panel")
        page.close()
        yield context
        assert outside == [], f"the page contacted other hosts: {outside}"
        browser.close()


@contextlib.contextmanager
def screenshots_on_failure(context, tmp_path: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        for index, page in enumerate(context.pages):
            with contextlib.suppress(Exception):
                page.screenshot(path=str(tmp_path / f"failure-page{index}.png"), full_page=True)
        print(f"\nscreenshots in {tmp_path}", file=sys.stderr)
        raise


def _open_app(context, url: str):
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#device-panel")
    return page


def _set_slider(page, elem_id: str, value: float) -> None:
    """Type into a slider's number box until the slider has committed the value.

    The range half of a gradio slider follows the component's value (what an event sends), not the
    keystrokes: when both halves show one value, that value is committed. A freshly opened accordion
    mounts its contents asynchronously and the initial value can land after (and over) a value typed
    too soon; then both halves agree on that other value, and the value is typed again.
    """
    box = page.locator(f"#{elem_id} input[type=number]")
    box.wait_for(state="visible")
    committed = """(id) => {
        const box = document.querySelector(`#${id} input[type=number]`);
        const range = document.querySelector(`#${id} input[type=range]`);
        return box && range && box.value !== '' && box.value === range.value ? [Number(range.value)] : null;
    }"""
    page.wait_for_function(committed, arg=elem_id)  # mounted, showing its initial value
    for _ in range(5):
        box.fill(str(value))
        box.blur()
        if page.wait_for_function(committed, arg=elem_id).json_value() == [value]:
            return
    raise AssertionError(f"could not set #{elem_id} to {value}")


def _prepare_edit(page, image: Path, instruction: str) -> None:
    page.locator("#source input[type=file]").set_input_files(str(image))
    page.wait_for_selector("#source-preview img")  # the app opened the upload with its own checks
    page.locator("#instruction textarea").fill(instruction)
    page.get_by_text("Advanced settings", exact=True).first.click()  # the panel mentions it too


def _click_edit(page, steps: int) -> None:
    """Set the steps right before clicking, well after the accordion was opened (see _set_slider)."""
    page.bring_to_front()
    _set_slider(page, "edit-steps", steps)
    page.locator("#edit-button").click()


def _wait_for_value(page, selector: str, prefix: str, timeout: int = EDIT_TIMEOUT_MS) -> str:
    page.wait_for_function(
        "([selector, prefix]) => document.querySelector(selector)?.value.startsWith(prefix)",
        arg=[selector, prefix],
        timeout=timeout,
    )
    return page.locator(selector).input_value()


def _wait_for_panel_step(page, total: int, after: int = 0, timeout: int = EDIT_TIMEOUT_MS) -> int:
    """Wait until the device panel shows a step of a running `total`-step edit beyond `after`; return it."""
    handle = page.wait_for_function(
        """([total, after]) => {
            const match = document.querySelector('#device-panel')?.innerText.match(/step (\\d+) of (\\d+)/);
            return match && Number(match[2]) === total && Number(match[1]) > after ? Number(match[1]) : null;
        }""",
        arg=[total, after],
        timeout=timeout,
        polling=100,
    )
    return int(handle.json_value())


def _wait_for_queue_position(page, timeout: int = PAGE_TIMEOUT_MS) -> None:
    """Wait until gradio shows that this page's job waits in the queue (its progress text says 'queue')."""
    page.wait_for_function(
        "document.querySelector('#result')?.innerText.toLowerCase().includes('queue')", timeout=timeout, polling=100
    )


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = []
    for name, size, color in (("sky.png", (96, 64), (40, 120, 220)), ("grass.png", (64, 64), (40, 200, 60))):
        Image.new("RGB", size, color).save(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def test_the_app_needs_a_login(server: dict) -> None:
    assert _status(server["url"] + "/config") == 401
    assert _status(server["url"] + "/gradio_api/info") == 401


def _new_files(server: dict, before: set[Path]) -> list[Path]:
    return sorted(set(server["results"].rglob("*")) - before)


def test_edit_in_the_browser(server: dict, browser, images: list[Path], tmp_path: Path) -> None:
    page = _open_app(browser, server["url"])
    with screenshots_on_failure(browser, tmp_path):
        panel = page.locator("#device-panel")
        assert "Device cpu" in panel.inner_text() and "dtype fp32" in panel.inner_text()
        before = set(server["results"].rglob("*"))
        _prepare_edit(page, images[0], "make the sky purple")
        assert _wait_for_value(page, "#status textarea", "sky.png") == "sky.png: 96x64 pixels, ready to edit"
        # settings typed in the page reach the edit (the metadata records what the pipeline got)
        page.locator("#edit-negative textarea").fill("browser negative")
        page.locator("#edit-seed input").fill("7")
        _set_slider(page, "edit-guidance", 2.5)
        _click_edit(page, steps=2)
        page.wait_for_selector("#result img", timeout=EDIT_TIMEOUT_MS)
        status = _wait_for_value(page, "#status textarea", "Done in ")
        assert "seed 7" in status and "2 steps in" in status

        links = {link.inner_text().strip(): link.get_attribute("href") for link in page.locator("#downloads a").all()}
        json_url = next(href for href in links.values() if href and ".json" in href)
        metadata = json.loads(page.request.get(json_url).body())
        assert metadata["instruction"] == "make the sky purple" and metadata["steps"] == 2
        assert metadata["negative"] == "browser negative" and metadata["guidance"] == 2.5 and metadata["seed"] == 7
        saved = [path.name for path in _new_files(server, before)]
        assert len(saved) == 2 and saved[0].endswith("-sky.png") and saved[1].endswith("-sky.png.json")

        # the panel refreshes by itself and now shows the edit's timings
        page.wait_for_function("document.querySelector('#device-panel').innerText.includes('Last edit 2 steps in')")
        assert "Device cpu" in panel.inner_text()
        page.screenshot(path=str(tmp_path / "edit.png"), full_page=True)
    page.close()


def test_a_bad_upload_gets_the_apps_one_line_reason(server: dict, browser, tmp_path: Path) -> None:
    notes = tmp_path / "notes.png"
    notes.write_text("not an image at all")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (15_000, 15_000)).save(bomb)  # about 30 kB on disk, 225 M pixels
    assert bomb.stat().st_size < 1024 * 1024
    page = _open_app(browser, server["url"])
    with screenshots_on_failure(browser, tmp_path):
        before = set(server["results"].rglob("*"))
        page.locator("#source input[type=file]").set_input_files(str(notes))
        assert _wait_for_value(page, "#status textarea", "Error") == "Error: notes.png: not a recognised image file"
        page.locator("#instruction textarea").fill("make it red")
        page.locator("#edit-stop").click()  # changes the status line, so the edit's answer is seen arriving
        _wait_for_value(page, "#status textarea", "Stop requested")
        page.locator("#edit-button").click()  # the edit says the same, not gradio's generic error
        assert _wait_for_value(page, "#status textarea", "Error") == "Error: notes.png: not a recognised image file"
        fresh = _open_app(browser, server["url"])  # an upload box that holds a file takes no other
        fresh.locator("#source input[type=file]").set_input_files(str(bomb))
        status = _wait_for_value(fresh, "#status textarea", "Error: bomb.png")
        assert status.startswith("Error: bomb.png: image is too large to open safely"), status
        assert fresh.locator("#source-preview img").count() == 0
        assert _new_files(server, before) == []
    for opened in (page, fresh):
        opened.close()


def test_closing_the_tab_stops_the_edit_and_saves_nothing(server: dict, browser, images: list[Path],
                                                         tmp_path: Path) -> None:
    closing, watching = _open_app(browser, server["url"]), _open_app(browser, server["url"])
    with screenshots_on_failure(browser, tmp_path):
        before = set(server["results"].rglob("*"))
        _prepare_edit(closing, images[1], "make it gold")
        _click_edit(closing, steps=LONG_EDIT_STEPS)
        _wait_for_panel_step(closing, LONG_EDIT_STEPS)
        # The watching page must have seen the edit run: a panel not yet refreshed still says idle.
        watching.wait_for_function("document.querySelector('#device-panel').innerText.includes('Now editing')")
        closing.close()
        # The edit ends at its next step: the device goes idle without finishing (a finished edit would
        # show as the last edit, with its 100 steps) and nothing is saved.
        watching.wait_for_function("document.querySelector('#device-panel').innerText.includes('Now idle')",
                                   timeout=EDIT_TIMEOUT_MS)
        assert f"Last edit {LONG_EDIT_STEPS} steps" not in watching.locator("#device-panel").inner_text()
        assert _new_files(server, before) == []
    watching.close()


def test_an_upload_over_the_limit_is_refused_with_a_message(server: dict, browser, tmp_path: Path) -> None:
    noise = Image.effect_noise((1200, 1200), 100).convert("RGB")  # noise hardly compresses: about 3 MB as PNG
    noise.save(tmp_path / "noise.png")
    assert (tmp_path / "noise.png").stat().st_size > 1024 * 1024
    page = _open_app(browser, server["url"])
    with screenshots_on_failure(browser, tmp_path):
        page.locator("#source input[type=file]").set_input_files(str(tmp_path / "noise.png"))
        page.get_by_text('File(s) exceed the maximum allowed size of 1.0 Mb: "noise.png"').wait_for()
    page.close()


def test_batch_in_the_browser(server: dict, browser, images: list[Path], tmp_path: Path) -> None:
    page = _open_app(browser, server["url"])
    with screenshots_on_failure(browser, tmp_path):
        page.get_by_role("tab", name="Batch").click()
        page.get_by_text("Advanced settings", exact=True).last.click()
        page.locator("#batch-files input[type=file]").set_input_files([str(p) for p in images])
        page.wait_for_function("document.querySelector('#batch-files').innerText.includes('grass')")
        page.locator("#batch-instructions textarea").fill("make it red\nmake it blue")
        _set_slider(page, "batch-steps", 1)
        page.locator("#batch-button").click()
        status = _wait_for_value(page, "#batch-status textarea", "Batch ")
        assert status.startswith("Batch 2 of 2 images edited"), status
        assert page.locator("#batch-errors textarea").input_value() == ""
        page.wait_for_function("document.querySelectorAll('#batch-gallery img').length >= 2")
        captions = page.locator("#batch-gallery").inner_text()
        assert "sky.png: make it red" in captions and "grass.png: make it blue" in captions

        zip_url = page.locator("#batch-zip a").first.get_attribute("href")
        with zipfile.ZipFile(io.BytesIO(page.request.get(zip_url).body())) as archive:
            names = sorted(name.split("/", 1)[1] for name in archive.namelist())
            summary = json.loads(next(archive.read(n) for n in archive.namelist() if n.endswith("summary.json")))
        assert names == ["001-sky.png", "001-sky.png.json", "002-grass.png", "002-grass.png.json", "summary.json"]
        assert [entry["instruction"] for entry in summary] == ["make it red", "make it blue"]
        assert all(len(entry["timings"]["step_s"]) == 1 for entry in summary)
        page.screenshot(path=str(tmp_path / "batch.png"), full_page=True)
    page.close()


def test_full_queue_says_busy_and_stop_cancels(server: dict, browser, images: list[Path], tmp_path: Path) -> None:
    """One edit runs (the panel follows its steps), one waits (the queue holds one), a third is told the app is
    busy; Stop ends both and nothing is saved."""
    running, waiting, refused = (_open_app(browser, server["url"]) for _ in range(3))
    with screenshots_on_failure(browser, tmp_path):
        for page in (running, waiting, refused):
            _prepare_edit(page, images[1], "make it gold")
        before = set(server["results"].rglob("*"))
        # The longest edit the UI allows, so it is still running whatever the CPU speed (Stop ends it).
        _click_edit(running, steps=LONG_EDIT_STEPS)
        # The panel refreshes once a second and shows the step reached then: any step number proves
        # it updates during the edit (waiting for "step 1" raced the timer and failed on fast runs).
        _wait_for_panel_step(running, LONG_EDIT_STEPS)
        _click_edit(waiting, steps=LONG_EDIT_STEPS)
        waiting.wait_for_function("document.querySelector('#device-panel').innerText.includes('Now editing')")
        _wait_for_queue_position(waiting)
        _click_edit(refused, steps=LONG_EDIT_STEPS)
        refused.get_by_text("This application is currently busy. Please try again.").wait_for()
        first_seen = _wait_for_panel_step(running, LONG_EDIT_STEPS)
        assert _wait_for_panel_step(running, LONG_EDIT_STEPS, after=first_seen) > first_seen  # still live

        waiting.locator("#edit-stop").click()
        running.locator("#edit-stop").click()
        status = _wait_for_value(running, "#status textarea", "Stopped")
        assert status.startswith("Stopped after step "), status
        assert status.endswith(f" of {LONG_EDIT_STEPS}; nothing was saved."), status
        assert _wait_for_value(waiting, "#status textarea", "Stopped") == (
            "Stopped before it started; nothing was saved."
        )
        assert _new_files(server, before) == []  # nothing saved
        assert "Traceback" not in server["log"].read_text()
    for page in (running, waiting, refused):
        page.close()
