"""Tests for E1-Full prompt helpers and the VLM instruction rewrite against a real local HTTP server."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image

from hidream_edit.errors import UserError
from hidream_edit.instructions import (
    MAX_VLM_TIMEOUT_S,
    SYSTEM_PROMPT,
    InstructionRewriteError,
    RewrittenInstruction,
    VLMSettings,
    _DeadlineSocket,
    compose_e1_full_prompt,
    format_e1_full_prompt,
    parse_vlm_answer,
    rewrite_instruction,
)
from hidream_edit.spec import INSTRUCTION_MARKER, MAX_PROMPT_CHARS, TARGET_MARKER, is_e1_full_form, refine_prompt_from

GOOD_ANSWER = (
    "Source: A red car parked on a quiet street at noon.\n"
    "Instruction: Change the colour of the car from red to deep blue.\n"
    "Target: A deep blue car parked on a quiet street at noon."
)
GOOD_PROMPT = (
    "Editing Instruction: Change the colour of the car from red to deep blue. "
    "Target Image Description: A deep blue car parked on a quiet street at noon."
)


def chat_body(content: Any, finish_reason: str = "stop") -> bytes:
    """A minimal chat-completions response carrying `content` as the first choice's message."""
    return json.dumps(
        {
            "id": "test",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish_reason,
                }
            ],
        }
    ).encode("utf-8")


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeVLM:
    """Scripted replies (the last one repeats) and every request received."""

    url: str = ""
    replies: list[Reply] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, request: Recorded) -> Reply:
        with self.lock:
            self.requests.append(request)
            if len(self.replies) > 1:
                return self.replies.pop(0)
            return self.replies[0] if self.replies else Reply(body=chat_body(GOOD_ANSWER))

    def settings(self, **overrides: Any) -> VLMSettings:
        values: dict[str, Any] = {
            "url": self.url,
            "model": "test-vlm",
            "timeout_s": 5.0,
            "backoff_s": 0.01,
        }
        values.update(overrides)
        return VLMSettings(**values)


class _FakeServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeVLM


class _Handler(BaseHTTPRequestHandler):
    server: _FakeServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        headers = {key.lower(): value for key, value in self.headers.items()}
        reply = self.server.fake.take(Recorded(self.path, headers, body))
        if reply.delay_s:
            self.server.fake.release.wait(reply.delay_s)
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: Any) -> None:
        """Keep test output quiet."""


@contextlib.contextmanager
def serving() -> Iterator[FakeVLM]:
    """A FakeVLM on its own local port, for as long as the block runs."""
    fake = FakeVLM()
    server = _FakeServer(("127.0.0.1", 0), _Handler)
    server.fake = fake
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield fake
    finally:
        fake.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def vlm() -> Iterator[FakeVLM]:
    with serving() as fake:
        yield fake


@pytest.fixture
def other_vlm() -> Iterator[FakeVLM]:
    """A second server: another origin (same host, another port) that a redirect may point at."""
    with serving() as fake:
        yield fake


@pytest.fixture
def image() -> Image.Image:
    return Image.new("RGB", (64, 48), (200, 30, 30))


def decode_png(data_url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    raw = base64.b64decode(data_url[len(prefix) :])
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    picture = Image.open(io.BytesIO(raw))
    picture.load()
    return picture


def assert_one_line(error: pytest.ExceptionInfo[InstructionRewriteError]) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


# --- prompt helpers ---------------------------------------------------------------------------


def test_refine_prompt_from_takes_text_after_marker() -> None:
    assert refine_prompt_from(GOOD_PROMPT) == "A deep blue car parked on a quiet street at noon."
    assert refine_prompt_from("Target Image Description:\n  a cat  ") == "a cat"


@pytest.mark.parametrize("prompt", ["make it blue", "target image description: a cat", ""])
def test_refine_prompt_from_none_without_marker(prompt: str) -> None:
    assert refine_prompt_from(prompt) is None


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("Editing Instruction: x. Target Image Description:   ", ""),
        ("Editing Instruction: x. Target Image Description:", ""),
        ("Target Image Description: a cat Target Image Description: a dog", "a cat"),
        ("x Target Image Description:Target Image Description: a dog", ""),
    ],
)
def test_refine_prompt_from_edge_cases_as_upstream(prompt: str, expected: str) -> None:
    assert refine_prompt_from(prompt) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD_PROMPT, True),
        ("Editing Instruction: a Target Image Description: b", True),
        ("Target Image Description: b. Editing Instruction: a", False),
        ("Editing Instruction: a", False),
        ("Target Image Description: b", False),
        ("editing instruction: a. target image description: b", False),
        ("", False),
    ],
)
def test_is_e1_full_form(text: str, expected: bool) -> None:
    assert is_e1_full_form(text) is expected


def test_format_e1_full_prompt_basic_and_round_trip() -> None:
    prompt = format_e1_full_prompt("Make the sky pink", "A beach under a pink sky.")
    assert prompt == "Editing Instruction: Make the sky pink. Target Image Description: A beach under a pink sky."
    assert is_e1_full_form(prompt)
    assert refine_prompt_from(prompt) == "A beach under a pink sky."


@pytest.mark.parametrize(
    "instruction",
    ["Make the sky pink.", "  Make the sky pink. \n", "Make the sky pink..."],
)
def test_format_e1_full_prompt_strips_and_keeps_one_period(instruction: str) -> None:
    prompt = format_e1_full_prompt(instruction, "  A beach.  ")
    assert prompt == "Editing Instruction: Make the sky pink. Target Image Description: A beach."


@pytest.mark.parametrize(
    ("instruction", "description"),
    [
        ("", "a beach"),
        ("   ", "a beach"),
        ("...", "a beach"),
        ("make it pink", ""),
        ("make it pink", " \n "),
    ],
)
def test_format_e1_full_prompt_rejects_empty_parts(instruction: str, description: str) -> None:
    with pytest.raises(UserError, match="empty"):
        format_e1_full_prompt(instruction, description)


@pytest.mark.parametrize(
    ("instruction", "description"),
    [
        (f"make it pink {TARGET_MARKER} x", "a beach"),
        ("make it pink", f"{INSTRUCTION_MARKER} a beach"),
    ],
)
def test_format_e1_full_prompt_rejects_markers_inside_parts(instruction: str, description: str) -> None:
    with pytest.raises(UserError, match="must not contain"):
        format_e1_full_prompt(instruction, description)


# --- parse_vlm_answer --------------------------------------------------------------------------

EXPECTED_PARTS = (
    "A red car parked on a quiet street at noon.",
    "Change the colour of the car from red to deep blue.",
    "A deep blue car parked on a quiet street at noon.",
)


SOURCE_TEXT, INSTRUCTION_TEXT, TARGET_TEXT = EXPECTED_PARTS
ANSWER_VARIANTS = {
    "plain": GOOD_ANSWER,
    "case": f"SOURCE: {SOURCE_TEXT}\ninstruction: {INSTRUCTION_TEXT}\nTaRgEt: {TARGET_TEXT}",
    "blank-lines": "\n\n" + GOOD_ANSWER.replace("\n", "\n\n   \n") + "\n\n",
    "numbered": f"1. Source: {SOURCE_TEXT}\n2) Instruction: {INSTRUCTION_TEXT}\n(3) Target: {TARGET_TEXT}",
    "numbered, no space": f"1.Source: {SOURCE_TEXT}\n2)Instruction: {INSTRUCTION_TEXT}\n(3)Target: {TARGET_TEXT}",
    "bold": f"**Source:** {SOURCE_TEXT}\n**Instruction**: {INSTRUCTION_TEXT}\n- **Target:** {TARGET_TEXT}",
    "chatter": f"Here is my answer:\n```\n{GOOD_ANSWER}\n```\nLet me know if you need anything else.",
    "label-alone": f'Source:\n{SOURCE_TEXT}\nInstruction:\n"{INSTRUCTION_TEXT}"\nTarget:\n{TARGET_TEXT}',
    "long-labels": (
        f"Source image description: {SOURCE_TEXT}\n"
        f"Editing instruction: {INSTRUCTION_TEXT}\n"
        f"Target image description: {TARGET_TEXT}"
    ),
    "think": f"<think>Source: maybe a truck?\nTarget: no idea</think>\n{GOOD_ANSWER}",
    "think-twice": f"<think>a truck?</think>\nSource: a truck\n<think>no, a car</think>\n{GOOD_ANSWER}",
    "chatter-naming-a-label": f"Here is the target I suggest:\n{GOOD_ANSWER}\nMy instruction: keep it simple.",
    "star-bullets": f"* Source: {SOURCE_TEXT}\n* Instruction: {INSTRUCTION_TEXT}\n* Target: {TARGET_TEXT}",
    "numbers-alone": f"1\nSource: {SOURCE_TEXT}\n2\nInstruction: {INSTRUCTION_TEXT}\n(3\nTarget: {TARGET_TEXT}",
}


@pytest.mark.parametrize("answer", list(ANSWER_VARIANTS.values()), ids=list(ANSWER_VARIANTS))
def test_parse_vlm_answer_variants(answer: str) -> None:
    assert parse_vlm_answer(answer) == EXPECTED_PARTS


def test_parse_vlm_answer_keeps_decimal_numbers() -> None:
    answer = f"Source:\n3.5 inch floppy disks on a desk.\nInstruction: {INSTRUCTION_TEXT}\nTarget: {TARGET_TEXT}"
    assert parse_vlm_answer(answer)[0] == "3.5 inch floppy disks on a desk."


@pytest.mark.parametrize("source", [".NET logo on a laptop screen.", "...and a dog asleep on the sofa.", ") sign."])
def test_parse_vlm_answer_keeps_leading_punctuation_without_a_number(source: str) -> None:
    """Only a number followed by "." or ")" is list numbering; a dot or bracket alone belongs to the text."""
    answer = f"Source:\n{source}\nInstruction: {INSTRUCTION_TEXT}\nTarget: {TARGET_TEXT}"
    assert parse_vlm_answer(answer)[0] == source


def test_parse_vlm_answer_keeps_colons_inside_text() -> None:
    answer = "Source: A sign reading: OPEN.\nInstruction: Change the sign to read: CLOSED.\nTarget: A sign: CLOSED."
    assert parse_vlm_answer(answer) == (
        "A sign reading: OPEN.",
        "Change the sign to read: CLOSED.",
        "A sign: CLOSED.",
    )


@pytest.mark.parametrize(
    ("answer", "missing"),
    [
        ("", "source, instruction, target"),
        ("I cannot help with that.", "source, instruction, target"),
        ("Source: a car\nInstruction: make it blue", "target"),
        ("Source: a car\nInstruction:\nTarget: a blue car", "instruction"),
        ('Source: a car\nInstruction: ""\nTarget: a blue car', "instruction"),
        ("Source: a car\nInstruction: make it blue\nTarget:   ", "target"),
        ('Source: a car\nInstruction: make it blue\nTarget: ""', "target"),  # quotes around nothing
    ],
)
def test_parse_vlm_answer_rejects_missing_parts(answer: str, missing: str) -> None:
    with pytest.raises(InstructionRewriteError, match=f"missing {missing}") as error:
        parse_vlm_answer(answer)
    assert_one_line(error)


def test_parse_vlm_answer_rejects_duplicate_part() -> None:
    with pytest.raises(InstructionRewriteError, match="more than one 'target'"):
        parse_vlm_answer(GOOD_ANSWER + "\nTarget: something else")


# --- settings --------------------------------------------------------------------------------


def test_settings_hide_key_and_validate() -> None:
    settings = VLMSettings(url="http://x/v1", model="m", api_key="sk-secret")
    assert "sk-secret" not in repr(settings)
    timeout = "the VLM timeout must be more than 0 and at most"
    for bad, message in (
        ({"timeout_s": 0}, timeout),
        ({"timeout_s": float("inf")}, timeout),
        ({"timeout_s": float("nan")}, timeout),
        ({"timeout_s": -1.0}, timeout),
        ({"timeout_s": 1e9}, timeout),
        ({"timeout_s": 3600.5}, timeout),  # an hour at most, as README_NPU.md says
        ({"retries": -1}, "retries must be 0 or more, got -1"),
        ({"backoff_s": -1.0}, "backoff must be 0 or more, got -1.0"),
        ({"url": " "}, "the VLM URL is empty"),
        ({"model": ""}, "the VLM model name is empty"),
    ):
        values: dict[str, Any] = {"url": "http://x/v1", "model": "m"}
        values.update(bad)
        with pytest.raises(InstructionRewriteError, match=message):
            VLMSettings(**values)
    edges = VLMSettings(url="http://x/v1", model="m", timeout_s=MAX_VLM_TIMEOUT_S, retries=0, backoff_s=0.0)
    assert (edges.timeout_s, edges.retries, edges.backoff_s) == (MAX_VLM_TIMEOUT_S, 0, 0.0)  # no retry, no wait


def test_settings_defaults_are_the_documented_ones() -> None:
    """README_NPU.md promises a 60 s budget with two retries after 1 s and 2 s when no flag is given."""
    settings = VLMSettings(url="http://x/v1", model="m")
    assert (settings.timeout_s, settings.retries, settings.backoff_s) == (60.0, 2, 1.0)
    assert settings.api_key is None


def test_settings_and_results_cannot_be_changed_after_their_checks() -> None:
    """Settings are validated once, at construction: a later assignment would slip past that check."""
    settings = VLMSettings(url="http://x/v1", model="m")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.timeout_s = -1.0  # type: ignore[misc]
    rewritten = RewrittenInstruction(*EXPECTED_PARTS, prompt=GOOD_PROMPT)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rewritten.prompt = "make it blue"  # type: ignore[misc]
    assert rewritten.prompt == GOOD_PROMPT


def test_a_rewrite_error_message_is_always_one_line() -> None:
    """Callers print it as one line (and log it on fallback), whatever text it was built from."""
    error = InstructionRewriteError("cannot encode the source image:\n  broken\x1b[2J  PNG\r\n")
    assert str(error) == "cannot encode the source image: broken PNG"
    assert isinstance(error, UserError)


def test_non_http_url_is_rejected(image: Image.Image) -> None:
    with pytest.raises(InstructionRewriteError, match="http"):
        rewrite_instruction(image, "make it blue", VLMSettings(url="ftp://host/v1", model="m"))


# --- rewrite_instruction against a real server --------------------------------------------------


def test_good_answer_gives_refined_instruction(vlm: FakeVLM, image: Image.Image) -> None:
    vlm.replies = [Reply(body=chat_body(GOOD_ANSWER))]
    rewritten = rewrite_instruction(image, "make the car blue", vlm.settings())
    assert rewritten == RewrittenInstruction(*EXPECTED_PARTS, prompt=GOOD_PROMPT)
    assert is_e1_full_form(rewritten.prompt)
    assert refine_prompt_from(rewritten.prompt) == EXPECTED_PARTS[2]
    assert len(vlm.requests) == 1


@pytest.mark.parametrize(
    ("size", "sent_size"),
    [((2048, 1024), (1024, 512)), ((600, 1800), (341, 1024)), ((300, 200), (300, 200)), ((4096, 2), (1024, 1)),
     ((2, 4096), (1, 1024))],
)
def test_request_carries_model_system_prompt_and_png(
    vlm: FakeVLM, size: tuple[int, int], sent_size: tuple[int, int]
) -> None:
    source = Image.new("RGBA", size, (10, 200, 30, 255))
    rewrite_instruction(source, "  make the car blue ", vlm.settings(model="qwen-vl"))
    (request,) = vlm.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["content-type"] == "application/json"
    assert "authorization" not in request.headers
    body = request.json()
    assert body["model"] == "qwen-vl"
    assert body["temperature"] == 0
    system, user = body["messages"]
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    assert user["role"] == "user"
    text_part, image_part = user["content"]
    assert text_part["type"] == "text" and "make the car blue" in text_part["text"]
    assert image_part["type"] == "image_url"
    sent = decode_png(image_part["image_url"]["url"])
    assert sent.size == sent_size
    assert sent.mode == "RGB"


def test_authorization_header_when_key_set(vlm: FakeVLM, image: Image.Image) -> None:
    rewrite_instruction(image, "make the car blue", vlm.settings(api_key="sk-test-123"))
    assert vlm.requests[0].headers["authorization"] == "Bearer sk-test-123"


def test_full_chat_completions_url_is_used_as_is(vlm: FakeVLM, image: Image.Image) -> None:
    rewrite_instruction(image, "make the car blue", vlm.settings(url=vlm.url + "/chat/completions/"))
    assert vlm.requests[0].path == "/v1/chat/completions"


def test_content_as_list_of_parts(vlm: FakeVLM, image: Image.Image) -> None:
    vlm.replies = [Reply(body=chat_body([{"type": "text", "text": GOOD_ANSWER}]))]
    assert rewrite_instruction(image, "make the car blue", vlm.settings()).prompt == GOOD_PROMPT


def test_only_the_text_parts_of_a_list_answer_are_read(vlm: FakeVLM, image: Image.Image) -> None:
    """Reasoning, images and refusals that some servers add as parts are neither the answer nor an error."""
    parts = [
        {"type": "reasoning", "text": "Source: maybe a truck?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}},
        {"type": "text", "text": GOOD_ANSWER},
        {"type": "refusal", "refusal": "none"},
    ]
    vlm.replies = [Reply(body=chat_body(parts))]
    assert rewrite_instruction(image, "make the car blue", vlm.settings()).prompt == GOOD_PROMPT


def test_unparseable_answer_is_an_error_and_not_retried(vlm: FakeVLM, image: Image.Image) -> None:
    vlm.replies = [Reply(body=chat_body("Sure! The car would look great in blue."))]
    with pytest.raises(InstructionRewriteError, match="cannot parse the VLM answer") as error:
        rewrite_instruction(image, "make the car blue", vlm.settings())
    assert "look great in blue" in assert_one_line(error)
    assert len(vlm.requests) == 1


def test_truncated_answer_mentions_token_limit(vlm: FakeVLM, image: Image.Image) -> None:
    vlm.replies = [Reply(body=chat_body("Source: a red car\nInstruction: make", finish_reason="length"))]
    with pytest.raises(InstructionRewriteError, match="token limit"):
        rewrite_instruction(image, "make the car blue", vlm.settings())


def test_non_json_body_is_an_error(vlm: FakeVLM, image: Image.Image) -> None:
    vlm.replies = [Reply(body=b"<html>\n<body>gateway says hi</body>\n</html>")]
    with pytest.raises(InstructionRewriteError, match="malformed JSON") as error:
        rewrite_instruction(image, "make the car blue", vlm.settings())
    assert "gateway says hi" in assert_one_line(error)
    assert len(vlm.requests) == 1


def test_server_text_is_quoted_whole_up_to_200_characters_then_cut(vlm: FakeVLM, image: Image.Image) -> None:
    vlm.replies = [Reply(body=b"<" * 200), Reply(body=b"<" * 200 + b"!")]
    with pytest.raises(InstructionRewriteError) as whole:
        rewrite_instruction(image, "make the car blue", vlm.settings())
    assert str(whole.value).endswith("malformed JSON: " + "<" * 200)
    with pytest.raises(InstructionRewriteError) as cut:
        rewrite_instruction(image, "make the car blue", vlm.settings())
    assert str(cut.value).endswith("malformed JSON: " + "<" * 200 + "...")


@pytest.mark.parametrize(
    "payload",
    [
        {"error": {"message": "model not loaded"}},
        {"choices": []},
        {"choices": [{"message": {}}]},
        [1, 2],
    ],
)
def test_missing_choices_or_content_is_an_error(vlm: FakeVLM, image: Image.Image, payload: Any) -> None:
    vlm.replies = [Reply(body=json.dumps(payload).encode())]
    with pytest.raises(InstructionRewriteError, match="no choices|no answer text") as error:
        rewrite_instruction(image, "make the car blue", vlm.settings())
    assert_one_line(error)


def test_http_500_is_retried_then_fails(vlm: FakeVLM, image: Image.Image, monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr("hidream_edit.instructions.time.sleep", waits.append)
    vlm.replies = [Reply(status=500, body=b'{"error": "CUDA out of memory"}')]
    with pytest.raises(InstructionRewriteError, match="HTTP 500") as error:
        rewrite_instruction(image, "make the car blue", vlm.settings(retries=2, backoff_s=0.25))
    assert "CUDA out of memory" in assert_one_line(error)
    assert len(vlm.requests) == 3
    assert waits == [0.25, 0.5]  # the backoff doubles from one retry to the next
    # the defaults README_NPU.md states: two retries, after 1 s and then 2 s
    waits.clear()
    defaults = VLMSettings(vlm.url, "test-vlm", timeout_s=5.0)
    with pytest.raises(InstructionRewriteError, match="HTTP 500"):
        rewrite_instruction(image, "make the car blue", defaults)
    assert waits == [1.0, 2.0]


def test_http_429_is_retried_and_can_recover(vlm: FakeVLM, image: Image.Image) -> None:
    vlm.replies = [
        Reply(status=429, body=b"slow down"),
        Reply(body=chat_body(GOOD_ANSWER)),
    ]
    rewritten = rewrite_instruction(image, "make the car blue", vlm.settings(retries=1))
    assert rewritten.prompt == GOOD_PROMPT
    assert len(vlm.requests) == 2


def test_an_error_body_that_is_not_utf8_is_still_quoted(vlm: FakeVLM, image: Image.Image) -> None:
    """A gateway's error page in another encoding must not turn a clean failure into a crash."""
    vlm.replies = [Reply(status=400, body=b"\xff\xfe bad gateway \xe9t\xe9")]
    with pytest.raises(InstructionRewriteError, match="HTTP 400") as error:
        rewrite_instruction(image, "make the car blue", vlm.settings())
    assert "bad gateway" in assert_one_line(error)


def test_http_400_is_not_retried(vlm: FakeVLM, image: Image.Image) -> None:
    vlm.replies = [Reply(status=400, body=b'{"error": "unknown model test-vlm"}')]
    with pytest.raises(InstructionRewriteError, match="HTTP 400") as error:
        rewrite_instruction(image, "make the car blue", vlm.settings(retries=3))
    assert "unknown model" in assert_one_line(error)
    assert len(vlm.requests) == 1


def test_a_hung_server_uses_up_the_whole_timeout_once(vlm: FakeVLM, image: Image.Image) -> None:
    """The timeout bounds the whole call: no retry starts after it has run out."""
    vlm.replies = [Reply(body=chat_body(GOOD_ANSWER), delay_s=30.0)]
    with pytest.raises(InstructionRewriteError, match=r"within 0\.3 s$") as error:
        rewrite_instruction(image, "make the car blue", vlm.settings(timeout_s=0.3, retries=1))
    assert vlm.url in assert_one_line(error)
    assert len(vlm.requests) == 1


@pytest.mark.parametrize(
    ("retry_after", "wait_s"),
    [
        ("3600", 30.0),  # a server asking for an hour cannot stall the caller: cut to the documented 30 s
        ("2", 2.0),  # a longer pause than the backoff is honoured
        ("-5", 0.25),  # nonsense is ignored: the backoff applies
        ("0", 0.25),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.25),  # the HTTP-date form is not understood, so not waited for
    ],
)
def test_retry_after_is_honoured_within_bounds(
    vlm: FakeVLM, image: Image.Image, monkeypatch: pytest.MonkeyPatch, retry_after: str, wait_s: float
) -> None:
    waits: list[float] = []
    monkeypatch.setattr("hidream_edit.instructions.time.sleep", waits.append)
    busy = Reply(status=503, body=b"busy", headers={"Retry-After": retry_after})
    vlm.replies = [busy, Reply(body=chat_body(GOOD_ANSWER))]
    rewritten = rewrite_instruction(image, "make the car blue", vlm.settings(timeout_s=60.0, retries=1, backoff_s=0.25))
    assert rewritten.prompt == GOOD_PROMPT
    assert waits == [wait_s]


def test_a_network_failure_is_retried_after_the_backoff(
    image: Image.Image, closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No server asked for a pause, so the retries wait the configured backoff and nothing longer."""
    waits: list[float] = []
    monkeypatch.setattr("hidream_edit.instructions.time.sleep", waits.append)
    url = f"http://127.0.0.1:{closed_port}/v1"
    settings = VLMSettings(url=url, model="m", timeout_s=5.0, retries=2, backoff_s=0.25)
    with pytest.raises(InstructionRewriteError, match="cannot reach"):
        rewrite_instruction(image, "make the car blue", settings)
    assert waits == [0.25, 0.5]


def test_a_retry_that_would_end_after_the_timeout_is_not_started(vlm: FakeVLM, image: Image.Image) -> None:
    vlm.replies = [Reply(status=503, body=b"busy", headers={"Retry-After": "20"})]
    with pytest.raises(InstructionRewriteError, match=r"HTTP 503: busy \(no time left to retry within the 5 s"):
        rewrite_instruction(image, "make the car blue", vlm.settings(timeout_s=5.0, retries=3))
    assert len(vlm.requests) == 1


@dataclass
class DripServer:
    """Accepts a request, then sends its answer one byte at a time, 20 bytes a second, for `drip_s`."""

    mode: str  # "headers": the status line and headers never end; "body": a long body trickles
    drip_s: float = 6.0
    url: str = ""
    connections: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def serve(self, listener: socket.socket) -> None:
        while not self.stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.drip, args=(connection,), daemon=True).start()

    def drip(self, connection: socket.socket) -> None:
        with connection:
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                received += chunk
            if self.mode == "headers":
                connection.sendall(b"HTTP/1.1 200 OK\r\n")
                answer = b"X-Slow: " + b"z" * 10_000
            else:
                connection.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10000\r\n\r\n"
                )
                answer = b" " * 10_000
            ends = time.monotonic() + self.drip_s
            for byte in answer:
                if self.stop.wait(0.05) or time.monotonic() > ends:
                    return
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    return


@pytest.fixture(params=["headers", "body"])
def drip_server(request: pytest.FixtureRequest) -> Iterator[DripServer]:
    server = DripServer(mode=request.param)
    listener = socket.create_server(("127.0.0.1", 0))
    server.url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    thread = threading.Thread(target=server.serve, args=(listener,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (closing alone would not: the join would time out)
        listener.close()
        thread.join(timeout=5)
    assert not thread.is_alive()


def test_a_server_that_drips_its_answer_cannot_outlast_the_timeout(drip_server: DripServer, image: Image.Image):
    """Each byte arrives well within any per-read timeout; only a deadline for the whole call stops it.

    Without one the call lasts drip_s per attempt (18 s here); the bound below leaves 2 s for a busy machine.
    """
    settings = VLMSettings(url=drip_server.url, model="m", timeout_s=1.0, retries=2, backoff_s=0.01)
    started = time.monotonic()
    with pytest.raises(InstructionRewriteError, match=r"did not answer within 1 s") as error:
        rewrite_instruction(image, "make the car blue", settings)
    assert time.monotonic() - started < settings.timeout_s + 2.0
    assert drip_server.url in assert_one_line(error)
    assert drip_server.connections == 1


def test_server_text_loses_terminal_escapes_and_control_characters(
    vlm: FakeVLM, image: Image.Image, caplog: pytest.LogCaptureFixture
) -> None:
    hostile = "\x1b[2J\x1b]0;owned\x07\x1b[31mred\x1b[0m alert\x07 \x9b1Ahidden\u202egnp.exe \x00nul"
    vlm.replies = [Reply(status=500, body=hostile.encode()), Reply(status=400, body=hostile.encode())]
    with pytest.raises(InstructionRewriteError) as error:
        rewrite_instruction(image, "make the car blue", vlm.settings(retries=1))
    texts = [assert_one_line(error), *(record.getMessage() for record in caplog.records)]
    assert len(texts) == 2
    for text in texts:
        assert "red alert hiddengnp.exe nul" in text
        assert not any(char in text for char in "\x1b\x07\x9b\u202e\x00"), repr(text)
        assert "owned" not in text


def test_answer_parts_lose_control_characters() -> None:
    answer = "Source: a \x1b[1mred\x1b[0m car\nInstruction: make it\x07 blue\nTarget: a \x1b]2;x\x07blue car"
    assert parse_vlm_answer(answer) == ("a red car", "make it blue", "a blue car")


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_unreachable_endpoint_names_the_url(image: Image.Image, closed_port: int, scheme: str) -> None:
    url = f"{scheme}://127.0.0.1:{closed_port}/v1"
    settings = VLMSettings(url=url, model="m", timeout_s=2.0, retries=1, backoff_s=0.01)
    with pytest.raises(InstructionRewriteError, match="cannot reach") as error:
        rewrite_instruction(image, "make the car blue", settings)
    assert url in assert_one_line(error)


def test_a_connection_failure_without_a_message_is_named_by_its_type(
    vlm: FakeVLM, image: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hidream_edit import instructions

    def reset(response: Any, endpoint: str) -> bytes:
        raise ConnectionResetError()  # str() is empty

    monkeypatch.setattr(instructions, "_read_body", reset)
    settings = VLMSettings(url=vlm.url, model="m", timeout_s=5.0, retries=1, backoff_s=0.01)
    with pytest.raises(InstructionRewriteError) as error:
        rewrite_instruction(image, "make the car blue", settings)
    assert f"connection to VLM endpoint {vlm.url}" in assert_one_line(error)
    assert "failed: ConnectionResetError" in str(error.value)


def test_empty_instruction_sends_nothing(vlm: FakeVLM, image: Image.Image) -> None:
    with pytest.raises(InstructionRewriteError, match="empty"):
        rewrite_instruction(image, "   ", vlm.settings())
    assert vlm.requests == []


def test_vlm_answer_with_marker_is_rejected(vlm: FakeVLM, image: Image.Image) -> None:
    answer = "Source: a car\nInstruction: make it blue\nTarget: Target Image Description: a blue car"
    vlm.replies = [Reply(body=chat_body(answer))]
    with pytest.raises(InstructionRewriteError, match="must not contain"):
        rewrite_instruction(image, "make the car blue", vlm.settings())


# --- what a hostile or broken endpoint cannot do ------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_refused_so_the_key_never_reaches_another_server(
    vlm: FakeVLM, other_vlm: FakeVLM, image: Image.Image, status: int
) -> None:
    """An endpoint answering 302 to another port once received the key there and used that server's answer."""
    elsewhere = other_vlm.url + "/chat/completions"
    vlm.replies = [Reply(status=status, headers={"Location": elsewhere})]
    settings = vlm.settings(api_key="sk-secret-key", retries=2)
    with pytest.raises(InstructionRewriteError, match=f"answered HTTP {status}, a redirect to ") as error:
        rewrite_instruction(image, "make the car blue", settings)
    assert elsewhere in assert_one_line(error) and "sk-secret" not in str(error.value)
    assert other_vlm.requests == []
    assert len(vlm.requests) == 1  # not retried: a redirect is the endpoint's answer, not a transient failure
    # a failed rewrite like any other: an error unless asked to fall back to the bare instruction
    with pytest.raises(InstructionRewriteError, match="a redirect to "):
        compose_e1_full_prompt("make the car blue", image, vlm=settings)
    assert compose_e1_full_prompt("make the car blue", image, vlm=settings, fallback=True) == "make the car blue"
    assert other_vlm.requests == []


def test_a_refused_redirect_hangs_up_at_once(image: Image.Image) -> None:
    """The refused answer's connection must end with the error, not whenever its traceback is collected:
    a keep-alive endpoint would otherwise hold one open connection per failed rewrite."""
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    hung_up = threading.Event()

    def answer_with_a_redirect() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.settimeout(5)
            received = b""
            while b"\r\n\r\n" not in received:
                received += connection.recv(65536)
            head, _, body = received.partition(b"\r\n\r\n")
            (length,) = [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
            while len(body) < int(length.split(b":")[1]):
                body += connection.recv(65536)
            connection.sendall(
                b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:9/v1/chat/completions\r\n"
                b"Content-Length: 0\r\nConnection: keep-alive\r\n\r\n"
            )
            connection.settimeout(2)
            with contextlib.suppress(OSError):
                if connection.recv(1) == b"":
                    hung_up.set()

    thread = threading.Thread(target=answer_with_a_redirect, daemon=True)
    thread.start()
    with listener:
        with pytest.raises(InstructionRewriteError, match="a redirect to ") as error:
            rewrite_instruction(image, "make the car blue", VLMSettings(url=url, model="m", timeout_s=5.0))
        thread.join(timeout=5)
    assert hung_up.is_set(), "the connection stayed open after the redirect was refused"
    assert error.value  # the traceback, and whatever it references, is still alive here


@pytest.mark.parametrize("part", ["Instruction", "Target"])
def test_an_overlong_answer_is_a_failed_rewrite_not_the_users_mistake(
    vlm: FakeVLM, image: Image.Image, part: str
) -> None:
    """A 26,000-character answer once ended with "the instruction is 25999 characters long", ignoring the fallback."""
    parts = {"Source": "a car", "Instruction": "make it blue", "Target": "a blue car"}
    parts[part] = "very " * 5200
    vlm.replies = [Reply(body=chat_body("\n".join(f"{label}: {text}" for label, text in parts.items())))]
    name = "an instruction" if part == "Instruction" else "a target description"
    with pytest.raises(InstructionRewriteError) as error:
        rewrite_instruction(image, "make it blue", vlm.settings())
    assert str(error.value) == f"the VLM answered with {name} of 25999 characters; the limit is {MAX_PROMPT_CHARS}"
    assert compose_e1_full_prompt("make it blue", image, vlm=vlm.settings(), fallback=True) == "make it blue"
    parts[part] = "x" * MAX_PROMPT_CHARS  # the limit itself is allowed
    vlm.replies = [Reply(body=chat_body("\n".join(f"{label}: {text}" for label, text in parts.items())))]
    assert parts[part] in rewrite_instruction(image, "make it blue", vlm.settings()).prompt


def test_a_body_over_the_size_cap_is_refused_whatever_its_chunks(vlm: FakeVLM, image: Image.Image) -> None:
    """The cap counts the whole body: 9 MiB arrives in many reads, each far below the 8 MiB cap."""
    vlm.replies = [Reply(body=chat_body(GOOD_ANSWER + " " * (9 * 2**20)))]
    with pytest.raises(InstructionRewriteError, match=r"sent more than 8388608 bytes$") as error:
        rewrite_instruction(image, "make the car blue", vlm.settings())
    assert vlm.url in assert_one_line(error)
    at_the_cap = chat_body(GOOD_ANSWER)
    vlm.replies = [Reply(body=at_the_cap + b" " * (8 * 2**20 - len(at_the_cap)))]  # exactly the cap: taken
    assert rewrite_instruction(image, "make the car blue", vlm.settings()).prompt


def test_closing_a_finished_answer_hangs_up_at_once() -> None:
    """http.client closes the answer's file, then the socket: the connection must end then, not when the
    file object is garbage-collected (a VLM server would keep one connection per finished rewrite)."""
    ours, peer = socket.socketpair()
    with peer:
        wrapped = _DeadlineSocket(ours, time.monotonic() + 5)
        answer = wrapped.makefile("rb")
        peer.sendall(b"hello")
        assert answer.read(5) == b"hello"
        answer.close()
        assert answer.closed
        wrapped.close()
        peer.settimeout(2)
        assert peer.recv(1) == b""  # `answer` is still referenced here
