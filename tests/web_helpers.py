"""Stand-ins shared by the web tests: an editor without a model, a fake VLM endpoint, small images."""

from __future__ import annotations

import contextlib
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from PIL import Image

from hidream_edit.instructions import VLMSettings
from hidream_edit.spec import MODELS


def png(path: Path, size: tuple[int, int] = (48, 32), color: tuple[int, int, int] = (30, 120, 200)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def png_bytes(size: tuple[int, int] = (40, 40), color: tuple[int, int, int] = (200, 50, 50)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def stub_editor(model: str) -> SimpleNamespace:
    report = {"device": "cpu", "device_name": "x86_64", "dtype": "fp32", "attention": "sdpa", "offload": "none",
              "memory": {"allocated": None, "reserved": None, "peak": None, "free": None, "total": None,
                         "host_rss": 2**30, "host_total": 2**34}}
    return SimpleNamespace(
        defaults=MODELS[model].defaults,
        settings=SimpleNamespace(model=model, spec=MODELS[model], sources=SimpleNamespace(tiny=True)),
        device_report=lambda: report, last_metadata=None, load_s=1.5,
    )


GOOD_ANSWER = (
    "Source: A red square on white.\n"
    "Instruction: Paint the square deep blue.\n"
    "Target: A deep blue square on white."
)
GOOD_PROMPT = "Editing Instruction: Paint the square deep blue. Target Image Description: A deep blue square on white."


class FakeVLM(ThreadingHTTPServer):
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that answers every request with (status, body)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ChatHandler)
        self.reply: tuple[int, bytes] = (200, _chat(GOOD_ANSWER))
        self.requests: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def settings(self, **overrides: Any) -> VLMSettings:
        return VLMSettings(self.url, "test-vlm", "sk-test", **{"timeout_s": 5.0, "retries": 0, **overrides})


def _chat(content: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}]}).encode()


class _ChatHandler(BaseHTTPRequestHandler):
    server: FakeVLM

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                     **json.loads(body)})
        status, reply = self.server.reply
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        """Quiet."""


@contextlib.contextmanager
def running_fake_vlm() -> Iterator[FakeVLM]:
    server = FakeVLM()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
