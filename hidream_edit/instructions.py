"""Prompts in HiDream-E1-Full's "Editing Instruction / Target Image Description" form.

E1-Full was trained on prompts that pair a precise instruction with a description of the edited
image, and the pipeline encodes the text after TARGET_MARKER on its own for the refine stage.
Users rarely write that form, so `rewrite_instruction` asks an OpenAI-compatible vision-language
model (VLM) to describe the source, sharpen the request and imagine the result. HTTP goes through
the standard library only, so the NPU image needs no extra client package.
"""

from __future__ import annotations

import base64
import functools
import http.client
import io
import json
import logging
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

from PIL import Image

from hidream_edit.errors import UserError
from hidream_edit.spec import INSTRUCTION_MARKER, MAX_PROMPT_CHARS, TARGET_MARKER, is_e1_full_form
from hidream_edit.text import one_line as _one_line
from hidream_edit.text import printable

logger = logging.getLogger(__name__)

MAX_IMAGE_SIDE = 1024
"""Long side of the image sent to the VLM; more detail rarely helps a description and costs tokens."""

VLM_TIMEOUT_S = 60.0
"""Default total time for one rewrite request, every retry and backoff included."""
MAX_VLM_TIMEOUT_S = 3600.0

_MAX_RESPONSE_BYTES = 8 * 1024 * 1024
_SNIPPET_CHARS = 200
_MAX_RETRY_AFTER_S = 30.0
_PART_NAMES = ("source", "instruction", "target")
_LABEL_QUALIFIERS = frozenset({"the", "image", "description", "editing", "edit"})

SYSTEM_PROMPT = (
    "You prepare prompts for an image-editing model. You receive a source image and a user's "
    "editing request, which may be short or vague.\n"
    "Answer with exactly three lines and nothing else:\n"
    "Source: <one or two sentences describing the source image: main subject, setting, colours, "
    "lighting and style>\n"
    "Instruction: <the request rewritten as one specific, imperative editing instruction that "
    "says what to change, where, and how it should look>\n"
    "Target: <one or two sentences describing the image as it will look after the edit, written "
    "as a standalone description of that image rather than as a change>\n"
    "Rules: keep every part on its single line; start the lines with exactly 'Source:', "
    "'Instruction:' and 'Target:'; use no markdown, numbering or quotes; keep everything the "
    "request does not ask to change; if the request is ambiguous, choose its most plausible "
    "reading; write in English."
)


def _snippet(text: str) -> str:
    """A short one-line excerpt of a server's text for an error message."""
    flat = _one_line(text)
    if len(flat) > _SNIPPET_CHARS:
        return flat[:_SNIPPET_CHARS] + "..."
    return flat or "<empty>"


class InstructionRewriteError(UserError):
    """The VLM could not turn a request into an E1-Full prompt; the message is always one line."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


def format_e1_full_prompt(instruction: str, target_description: str) -> str:
    """Build E1-Full's training-time prompt form; markers inside the parts would confuse the split."""
    instruction = instruction.strip().rstrip(".").rstrip()
    description = target_description.strip()
    if not instruction:
        raise UserError("the editing instruction is empty")
    if not description:
        raise UserError("the target image description is empty")
    for name, part in (
        ("editing instruction", instruction),
        ("target image description", description),
    ):
        for marker in (INSTRUCTION_MARKER, TARGET_MARKER):
            if marker in part:
                raise UserError(f"the {name} must not contain {marker!r}")
    return f"{INSTRUCTION_MARKER} {instruction}. {TARGET_MARKER} {description}"


@dataclass(frozen=True)
class RewrittenInstruction:
    """What the VLM made of a request; `prompt` is what the E1-Full pipeline should receive."""

    source_description: str
    instruction: str
    target_description: str
    prompt: str


@dataclass(frozen=True)
class VLMSettings:
    """Where and how to ask the VLM; the caller supplies the key so this module never reads the env."""

    url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = VLM_TIMEOUT_S
    retries: int = 2
    backoff_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.url.strip():
            raise InstructionRewriteError("the VLM URL is empty")
        if not self.model.strip():
            raise InstructionRewriteError("the VLM model name is empty")
        if not 0 < self.timeout_s <= MAX_VLM_TIMEOUT_S:  # also false for nan
            raise InstructionRewriteError(
                f"the VLM timeout must be more than 0 and at most {MAX_VLM_TIMEOUT_S:g} s, got {self.timeout_s}"
            )
        if self.retries < 0:
            raise InstructionRewriteError(f"the VLM retries must be 0 or more, got {self.retries}")
        if self.backoff_s < 0:
            raise InstructionRewriteError(f"the VLM backoff must be 0 or more, got {self.backoff_s}")


def _clean_line(line: str) -> str:
    """Drop the decoration models add despite being told not to: bullets, numbering, bold."""
    text = line.strip().replace("**", "").replace("__", "")
    while True:
        before = text
        text = text.lstrip("#>-+•").strip()
        if text.startswith("* "):
            text = text[2:].strip()
        number_end = 0
        if text[:1] == "(":
            number_end = 1
        digits_end = number_end
        while digits_end < len(text) and text[digits_end].isdigit():
            digits_end += 1
        marker = text[digits_end : digits_end + 1]
        after_marker = text[digits_end + 1 : digits_end + 2]
        if digits_end > number_end and marker in (".", ")") and not after_marker.isdigit():
            text = text[digits_end + 1 :].strip()
        if text == before:
            return text


def _split_label(line: str) -> tuple[int, str] | None:
    """Recognise "Source:", "Instruction:", "Target:" (also "Target image description:" and the like)."""
    head, colon, rest = line.partition(":")
    if not colon:
        return None
    words = head.strip(" *_").lower().split()
    names = [word for word in words if word in _PART_NAMES]
    if len(names) != 1 or any(word not in _LABEL_QUALIFIERS for word in words if word not in names):
        return None
    return _PART_NAMES.index(names[0]), rest.strip(" *_")


def _unquote(text: str) -> str:
    """Remove one pair of quotes around a whole part, which would otherwise end up in the prompt."""
    text = text.strip()
    for left, right in (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("`", "`")):
        if len(text) >= 2 and text.startswith(left) and text.endswith(right):
            return text[1:-1].strip()
    return text


def parse_vlm_answer(text: str) -> tuple[str, str, str]:
    """Split a VLM answer into (source description, instruction, target description).

    Unlabelled lines are ignored (preambles, code fences, closing chatter) except right after a
    label that stands alone on its line, whose text they become. Reasoning that a model wraps in
    <think>...</think> is skipped, since it may quote the labels.
    """
    text = printable(text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    parts: list[str | None] = [None, None, None]
    current: int | None = None
    for raw_line in text.splitlines():
        line = _clean_line(raw_line)
        if not line:
            continue
        labelled = _split_label(line)
        if labelled is not None:
            index, rest = labelled
            if parts[index] is not None:
                raise InstructionRewriteError(
                    f"the VLM answer has more than one {_PART_NAMES[index]!r} line: {_snippet(text)}"
                )
            parts[index] = _unquote(rest)
            current = index
        elif current is not None and not parts[current]:
            parts[current] = _unquote(line)
    missing = [name for name, part in zip(_PART_NAMES, parts, strict=True) if not part]
    if missing:
        raise InstructionRewriteError(
            f"cannot parse the VLM answer (missing {', '.join(missing)}): {_snippet(text)}"
        )
    source, instruction, target = (part or "" for part in parts)
    return source, instruction, target


def _endpoint_url(url: str) -> str:
    """Accept a base URL (".../v1") or the full chat-completions URL."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InstructionRewriteError(f"the VLM URL must be an http(s) URL, got {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path += "/chat/completions"
    return urllib.parse.urlunsplit(parts._replace(path=path))


def _image_data_url(image: Image.Image) -> str:
    """A PNG data URL of the image, downscaled so its long side is at most MAX_IMAGE_SIDE."""
    try:
        picture = image if image.mode == "RGB" else image.convert("RGB")
        longest = max(picture.size)
        if longest > MAX_IMAGE_SIDE:
            scale = MAX_IMAGE_SIDE / longest
            size = (
                max(1, round(picture.width * scale)),
                max(1, round(picture.height * scale)),
            )
            picture = picture.resize(size, Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
    except (OSError, ValueError) as exc:
        raise InstructionRewriteError(f"cannot encode the source image for the VLM: {exc}") from exc
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class _RetryableFailure(Exception):
    """A failure worth another attempt (network, timeout, 5xx, 429); internal to the retry loop."""

    def __init__(self, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


def _retry_after_s(headers: Message | None) -> float:
    """Seconds a 429/503 asks us to wait, capped so a hostile header cannot stall the caller."""
    value = headers.get("Retry-After") if headers is not None else None
    try:
        seconds = float(value) if value is not None else 0.0
    except ValueError:
        return 0.0
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER_S)


class _DeadlineReader(io.RawIOBase):
    """A socket's raw reader on which no read outlasts the deadline, however slowly bytes trickle in."""

    def __init__(self, raw: io.RawIOBase, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._raw = raw
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        self._sock.settimeout(_remaining(self._deadline))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineSocket:
    """A connected socket whose sends and reads are all bounded by one deadline (for http.client)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def sendall(self, data: Any) -> None:
        self._sock.settimeout(_remaining(self._deadline))
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        if mode != "rb":
            raise ValueError(f"unsupported socket file mode {mode!r}")
        raw = self._sock.makefile("rb", buffering=0)  # keeps the socket open until the response is closed
        return io.BufferedReader(_DeadlineReader(raw, self._sock, self._deadline))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _remaining(deadline: float) -> float:
    """Seconds left before `deadline`; TimeoutError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


class _DeadlineConnection(http.client.HTTPConnection):
    """Connects within the remaining time and wraps the socket so every later read honours the deadline."""

    def __init__(self, *args: Any, deadline: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self) -> None:
        self.timeout = _remaining(self.deadline)
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self.deadline)  # type: ignore[assignment]


class _DeadlineHTTPConnection(_DeadlineConnection):
    pass


class _DeadlineHTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    pass


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: float) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_DeadlineHTTPConnection, deadline=self.deadline), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: float) -> None:
        super().__init__()
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        connection = functools.partial(_DeadlineHTTPSConnection, deadline=self.deadline)
        return self.do_open(connection, req, context=self._context)  # type: ignore[attr-defined]


class _NoRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Refuses every redirect: urllib would resend the key to whatever server the Location names.

    A POST cannot be redirected usefully anyway (urllib turns a 302 into a bodiless GET), so the
    user is told the URL the endpoint pointed at instead.
    """

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Message,
        newurl: str,
    ) -> urllib.request.Request | None:
        fp.close()
        raise InstructionRewriteError(
            f"VLM endpoint {req.full_url} answered HTTP {code}, a redirect to {_snippet(newurl)}; redirects are "
            "not followed, so that the request and its key go only to the configured endpoint: give its final URL"
        )


def _read_body(response: http.client.HTTPResponse, endpoint: str) -> bytes:
    """Read the body, refusing one larger than _MAX_RESPONSE_BYTES (the socket enforces the deadline)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = response.read(65536)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > _MAX_RESPONSE_BYTES:
            raise InstructionRewriteError(f"VLM endpoint {endpoint} sent more than {_MAX_RESPONSE_BYTES} bytes")
        chunks.append(chunk)


def _post_once(endpoint: str, payload: bytes, headers: dict[str, str], deadline: float, timeout_message: str) -> bytes:
    """One POST ended by `deadline` (connect, send, headers and body); sorts failures into retryable or final."""
    request = urllib.request.Request(endpoint, data=payload, headers=headers, method="POST")
    opener = urllib.request.build_opener(
        _DeadlineHTTPHandler(deadline), _DeadlineHTTPSHandler(deadline), _NoRedirectHandler()
    )
    try:
        with opener.open(request, timeout=_remaining(deadline)) as response:
            return _read_body(response, endpoint)
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read().decode("utf-8", errors="replace")
        except (OSError, http.client.HTTPException):
            body = ""
        message = f"VLM endpoint {endpoint} returned HTTP {exc.code}: {_snippet(body)}"
        if exc.code == 429 or exc.code >= 500:
            raise _RetryableFailure(message, _retry_after_s(exc.headers)) from exc
        raise InstructionRewriteError(message) from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError) or time.monotonic() >= deadline:
            raise _RetryableFailure(timeout_message) from exc
        raise _RetryableFailure(f"cannot reach VLM endpoint {endpoint}: {exc.reason}") from exc
    except TimeoutError as exc:
        raise _RetryableFailure(timeout_message) from exc
    except (OSError, http.client.HTTPException) as exc:
        if time.monotonic() >= deadline:
            raise _RetryableFailure(timeout_message) from exc
        detail = str(exc) or type(exc).__name__
        raise _RetryableFailure(f"connection to VLM endpoint {endpoint} failed: {detail}") from exc


def _post_with_retries(endpoint: str, payload: bytes, settings: VLMSettings) -> bytes:
    """POST with exponential backoff; only transient failures are retried, all within settings.timeout_s."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    deadline = time.monotonic() + settings.timeout_s
    timeout_message = f"VLM endpoint {endpoint} did not answer within {settings.timeout_s:g} s"
    attempt = 0
    while True:
        try:
            return _post_once(endpoint, payload, headers, deadline, timeout_message)
        except _RetryableFailure as failure:
            delay = max(settings.backoff_s * 2**attempt, failure.retry_after_s)
            now = time.monotonic()
            if attempt >= settings.retries or now >= deadline:
                raise InstructionRewriteError(failure.message) from failure
            if now + delay >= deadline:
                raise InstructionRewriteError(
                    f"{failure.message} (no time left to retry within the {settings.timeout_s:g} s timeout)"
                ) from failure
            attempt += 1
            logger.warning(
                "%s; retry %d of %d in %.2f s",
                failure.message,
                attempt,
                settings.retries,
                delay,
            )
            time.sleep(delay)


def _answer_text(body: bytes, endpoint: str) -> tuple[str, str | None]:
    """The first choice's message text and finish reason from a chat-completions response."""
    try:
        data: Any = json.loads(body)
    except ValueError as exc:
        raise InstructionRewriteError(
            f"VLM endpoint {endpoint} returned malformed JSON: {_snippet(body.decode('utf-8', errors='replace'))}"
        ) from exc
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise InstructionRewriteError(f"VLM response from {endpoint} has no choices: {_snippet(json.dumps(data))}")
    first = choices[0]
    message = first.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        content = "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    if not isinstance(content, str) or not content.strip():
        raise InstructionRewriteError(
            f"VLM response from {endpoint} has no answer text: {_snippet(json.dumps(first))}"
        )
    finish_reason = first.get("finish_reason")
    return content, finish_reason if isinstance(finish_reason, str) else None


def rewrite_instruction(image: Image.Image, instruction: str, settings: VLMSettings) -> RewrittenInstruction:
    """Ask the VLM to turn a loose request about `image` into an E1-Full prompt."""
    request_text = instruction.strip()
    if not request_text:
        raise InstructionRewriteError("the editing instruction is empty")
    endpoint = _endpoint_url(settings.url)
    payload = json.dumps(
        {
            "model": settings.model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": f"Editing request: {request_text}"},
                        {
                            "type": "image_url",
                            "image_url": {"url": _image_data_url(image)},
                        },
                    ],
                },
            ],
            "temperature": 0,
        }
    ).encode("utf-8")
    logger.info("refining the editing instruction with %s at %s", settings.model, endpoint)
    started = time.monotonic()
    body = _post_with_retries(endpoint, payload, settings)
    answer, finish_reason = _answer_text(body, endpoint)
    logger.debug("VLM answer after %.1f s: %s", time.monotonic() - started, printable(answer))
    try:
        source, new_instruction, target = parse_vlm_answer(answer)
    except InstructionRewriteError as exc:
        if finish_reason == "length":
            raise InstructionRewriteError(f"{exc} (the answer was cut off by the token limit)") from exc
        raise
    for name, part in (("an instruction", new_instruction), ("a target description", target)):
        if len(part) > MAX_PROMPT_CHARS:  # the VLM's fault, not the user's: a failed rewrite (fallback applies)
            raise InstructionRewriteError(
                f"the VLM answered with {name} of {len(part)} characters; the limit is {MAX_PROMPT_CHARS}"
            )
    try:
        prompt = format_e1_full_prompt(new_instruction, target)
    except UserError as exc:
        raise InstructionRewriteError(f"the VLM answer does not make an E1-Full prompt: {exc}") from exc
    return RewrittenInstruction(
        source_description=source,
        instruction=new_instruction,
        target_description=target,
        prompt=prompt,
    )


def compose_e1_full_prompt(
    instruction: str,
    image: Image.Image,
    target_description: str | None = None,
    vlm: VLMSettings | None = None,
    fallback: bool = False,
) -> str:
    """The prompt E1-Full receives: as given if already in form, else built from the parts or by the VLM.

    With a VLM failure and `fallback`, the bare instruction is used (logged); without, the error stands.
    Without either source of a description the bare instruction is returned and the editor warns.
    """
    if is_e1_full_form(instruction):
        return instruction.strip()
    if target_description is not None:
        return format_e1_full_prompt(instruction, target_description)
    if vlm is None:
        return instruction.strip()
    try:
        return rewrite_instruction(image, instruction, vlm).prompt
    except InstructionRewriteError as exc:
        if not fallback:
            raise
        logger.warning("instruction rewrite failed (%s); going on with the bare instruction", exc)
        return instruction.strip()
