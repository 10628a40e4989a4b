"""Tests for E1-Full prompt helpers and VLM instruction refinement against a real local HTTP server."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image

from hidream_edit.errors import UserError
from hidream_edit.instructions import (
    INSTRUCTION_MARKER,
    SYSTEM_PROMPT,
    TARGET_MARKER,
    InstructionRefinementError,
    RefinedInstruction,
    VLMSettings,
    format_e1_full_prompt,
    is_e1_full_form,
    parse_vlm_answer,
    refine_instruction,
    refine_prompt_from,
)

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
            self.end_headers()
            self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: Any) -> None:
        """Keep test output quiet."""


@pytest.fixture
def vlm() -> Iterator[FakeVLM]:
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


def assert_one_line(error: pytest.ExceptionInfo[InstructionRefinementError]) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


# --- prompt helpers ---------------------------------------------------------------------------


def test_refine_prompt_from_takes_text_after_marker() -> None:
    assert refine_prompt_from(GOOD_PROMPT) == "A deep blue car parked on a quiet street at noon."
    assert refine_prompt_from("Target Image Description:\n  a cat  ") == "a cat"


@pytest.mark.parametrize(
    "prompt",
    ["make it blue", "Editing Instruction: x. Target Image Description:   ", ""],
)
def test_refine_prompt_from_none_without_text(prompt: str) -> None:
    assert refine_prompt_from(prompt) is None


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
    "bold": f"**Source:** {SOURCE_TEXT}\n**Instruction**: {INSTRUCTION_TEXT}\n- **Target:** {TARGET_TEXT}",
    "chatter": f"Here is my answer:\n```\n{GOOD_ANSWER}\n```\nLet me know if you need anything else.",
    "label-alone": f'Source:\n{SOURCE_TEXT}\nInstruction:\n"{INSTRUCTION_TEXT}"\nTarget:\n{TARGET_TEXT}',
    "long-labels": (
        f"Source image description: {SOURCE_TEXT}\n"
        f"Editing instruction: {INSTRUCTION_TEXT}\n"
        f"Target image description: {TARGET_TEXT}"
    ),
    "think": f"<think>Source: maybe a truck?\nTarget: no idea</think>\n{GOOD_ANSWER}",
}


@pytest.mark.parametrize("answer", list(ANSWER_VARIANTS.values()), ids=list(ANSWER_VARIANTS))
def test_parse_vlm_answer_variants(answer: str) -> None:
    assert parse_vlm_answer(answer) == EXPECTED_PARTS


def test_parse_vlm_answer_keeps_decimal_numbers() -> None:
    answer = f"Source:\n3.5 inch floppy disks on a desk.\nInstruction: {INSTRUCTION_TEXT}\nTarget: {TARGET_TEXT}"
    assert parse_vlm_answer(answer)[0] == "3.5 inch floppy disks on a desk."


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
        ("Source: a car\nInstruction: make it blue\nTarget:   ", "target"),
    ],
)
def test_parse_vlm_answer_rejects_missing_parts(answer: str, missing: str) -> None:
    with pytest.raises(InstructionRefinementError, match=f"missing {missing}") as error:
        parse_vlm_answer(answer)
    assert_one_line(error)


def test_parse_vlm_answer_rejects_duplicate_part() -> None:
    with pytest.raises(InstructionRefinementError, match="more than one 'target'"):
        parse_vlm_answer(GOOD_ANSWER + "\nTarget: something else")


# --- settings --------------------------------------------------------------------------------


def test_settings_hide_key_and_validate() -> None:
    settings = VLMSettings(url="http://x/v1", model="m", api_key="sk-secret")
    assert "sk-secret" not in repr(settings)
    for bad, message in (
        ({"timeout_s": 0}, "timeout must be positive, got 0"),
        ({"retries": -1}, "retries must be 0 or more, got -1"),
        ({"backoff_s": -1.0}, "backoff must be 0 or more, got -1.0"),
        ({"url": " "}, "the VLM URL is empty"),
        ({"model": ""}, "the VLM model name is empty"),
    ):
        values: dict[str, Any] = {"url": "http://x/v1", "model": "m"}
        values.update(bad)
        with pytest.raises(InstructionRefinementError, match=message):
            VLMSettings(**values)


def test_non_http_url_is_rejected(image: Image.Image) -> None:
    with pytest.raises(InstructionRefinementError, match="http"):
        refine_instruction(image, "make it blue", VLMSettings(url="ftp://host/v1", model="m"))


# --- refine_instruction against a real server --------------------------------------------------


def test_good_answer_gives_refined_instruction(vlm: FakeVLM, image: Image.Image) -> None:
    vlm.replies = [Reply(body=chat_body(GOOD_ANSWER))]
    refined = refine_instruction(image, "make the car blue", vlm.settings())
    assert refined == RefinedInstruction(*EXPECTED_PARTS, prompt=GOOD_PROMPT)
    assert is_e1_full_form(refined.prompt)
    assert refine_prompt_from(refined.prompt) == EXPECTED_PARTS[2]
    assert len(vlm.requests) == 1


@pytest.mark.parametrize(
    ("size", "sent_size"),
    [((2048, 1024), (1024, 512)), ((600, 1800), (341, 1024)), ((300, 200), (300, 200))],
)
def test_request_carries_model_system_prompt_and_png(
    vlm: FakeVLM, size: tuple[int, int], sent_size: tuple[int, int]
) -> None:
    source = Image.new("RGBA", size, (10, 200, 30, 255))
    refine_instruction(source, "  make the car blue ", vlm.settings(model="qwen-vl"))
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
    refine_instruction(image, "make the car blue", vlm.settings(api_key="sk-test-123"))
    assert vlm.requests[0].headers["authorization"] == "Bearer sk-test-123"


def test_full_chat_completions_url_is_used_as_is(vlm: FakeVLM, image: Image.Image) -> None:
    refine_instruction(image, "make the car blue", vlm.settings(url=vlm.url + "/chat/completions/"))
    assert vlm.requests[0].path == "/v1/chat/completions"


def test_content_as_list_of_parts(vlm: FakeVLM, image: Image.Image) -> None:
    vlm.replies = [Reply(body=chat_body([{"type": "text", "text": GOOD_ANSWER}]))]
    assert refine_instruction(image, "make the car blue", vlm.settings()).prompt == GOOD_PROMPT


def test_unparseable_answer_is_an_error_and_not_retried(vlm: FakeVLM, image: Image.Image) -> None:
    vlm.replies = [Reply(body=chat_body("Sure! The car would look great in blue."))]
    with pytest.raises(InstructionRefinementError, match="cannot parse the VLM answer") as error:
        refine_instruction(image, "make the car blue", vlm.settings())
    assert "look great in blue" in assert_one_line(error)
    assert len(vlm.requests) == 1


def test_truncated_answer_mentions_token_limit(vlm: FakeVLM, image: Image.Image) -> None:
    vlm.replies = [Reply(body=chat_body("Source: a red car\nInstruction: make", finish_reason="length"))]
    with pytest.raises(InstructionRefinementError, match="token limit"):
        refine_instruction(image, "make the car blue", vlm.settings())


def test_non_json_body_is_an_error(vlm: FakeVLM, image: Image.Image) -> None:
    vlm.replies = [Reply(body=b"<html>\n<body>gateway says hi</body>\n</html>")]
    with pytest.raises(InstructionRefinementError, match="malformed JSON") as error:
        refine_instruction(image, "make the car blue", vlm.settings())
    assert "gateway says hi" in assert_one_line(error)
    assert len(vlm.requests) == 1


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
    with pytest.raises(InstructionRefinementError, match="no choices|no answer text") as error:
        refine_instruction(image, "make the car blue", vlm.settings())
    assert_one_line(error)


def test_http_500_is_retried_then_fails(vlm: FakeVLM, image: Image.Image) -> None:
    vlm.replies = [Reply(status=500, body=b'{"error": "CUDA out of memory"}')]
    with pytest.raises(InstructionRefinementError, match="HTTP 500") as error:
        refine_instruction(image, "make the car blue", vlm.settings(retries=2))
    assert "CUDA out of memory" in assert_one_line(error)
    assert len(vlm.requests) == 3


def test_http_429_is_retried_and_can_recover(vlm: FakeVLM, image: Image.Image) -> None:
    vlm.replies = [
        Reply(status=429, body=b"slow down"),
        Reply(body=chat_body(GOOD_ANSWER)),
    ]
    refined = refine_instruction(image, "make the car blue", vlm.settings(retries=1))
    assert refined.prompt == GOOD_PROMPT
    assert len(vlm.requests) == 2


def test_http_400_is_not_retried(vlm: FakeVLM, image: Image.Image) -> None:
    vlm.replies = [Reply(status=400, body=b'{"error": "unknown model test-vlm"}')]
    with pytest.raises(InstructionRefinementError, match="HTTP 400") as error:
        refine_instruction(image, "make the car blue", vlm.settings(retries=3))
    assert "unknown model" in assert_one_line(error)
    assert len(vlm.requests) == 1


def test_timeout_is_retried_then_reported(vlm: FakeVLM, image: Image.Image) -> None:
    vlm.replies = [Reply(body=chat_body(GOOD_ANSWER), delay_s=3.0)]
    with pytest.raises(InstructionRefinementError, match=r"within 0\.3 s") as error:
        refine_instruction(image, "make the car blue", vlm.settings(timeout_s=0.3, retries=1))
    assert vlm.url in assert_one_line(error)
    assert len(vlm.requests) == 2


def test_unreachable_endpoint_names_the_url(image: Image.Image, closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}/v1"
    settings = VLMSettings(url=url, model="m", timeout_s=2.0, retries=1, backoff_s=0.01)
    with pytest.raises(InstructionRefinementError, match="cannot reach") as error:
        refine_instruction(image, "make the car blue", settings)
    assert url in assert_one_line(error)


def test_empty_instruction_sends_nothing(vlm: FakeVLM, image: Image.Image) -> None:
    with pytest.raises(InstructionRefinementError, match="empty"):
        refine_instruction(image, "   ", vlm.settings())
    assert vlm.requests == []


def test_vlm_answer_with_marker_is_rejected(vlm: FakeVLM, image: Image.Image) -> None:
    answer = "Source: a car\nInstruction: make it blue\nTarget: Target Image Description: a blue car"
    vlm.replies = [Reply(body=chat_body(answer))]
    with pytest.raises(InstructionRefinementError, match="must not contain"):
        refine_instruction(image, "make the car blue", vlm.settings())
