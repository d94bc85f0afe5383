"""Pull the JSON answer out of whatever a VLM wrote around it.

Models wrap their JSON in reasoning (``<think>…</think>``), code fences, and prose, and sometimes
leave trailing commas. We remove the reasoning, look inside code fences first, then take the first
balanced ``{…}`` or ``[…]`` that parses. Anything else is a ``VLMOutputError`` quoting the text.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

from ..errors import VLMError

QUOTE_LIMIT = 600  # characters of a bad answer shown in an error message
MAX_STARTS = 400  # opening brackets tried before giving up; keeps a pathological answer linear-ish

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)
_CLOSER = {"{": "}", "[": "]"}
_BEFORE_CLOSER = re.compile(r"\s*[}\]]")


class VLMOutputError(VLMError):
    """The model answered, but not with something we can use.

    ``problem`` says what is wrong (short enough to feed back to the model), ``output`` holds the full
    answer, ``stage`` names the question. The message quotes the answer, truncated.
    """

    def __init__(self, problem: str, output: str | None = None, stage: str = ""):
        self.problem = problem
        self.output = output
        self.stage = stage
        super().__init__(problem if output is None else f"{problem} Answer: {quote(output)}")


def quote(text: str, limit: int = QUOTE_LIMIT) -> str:
    """A bad answer shortened for an error message: its head and tail around an ellipsis."""
    text = text if isinstance(text, str) else repr(text)
    if len(text) <= limit:
        return repr(text)
    half = limit // 2
    return repr(text[:half]) + f" ... ({len(text) - 2 * half} characters left out) ... " + repr(text[-half:])


def strip_reasoning(text: str) -> str:
    """Drop ``<think>`` blocks: closed ones, a leading one whose opening tag was in the prompt (only
    ``</think>`` appears), and a trailing one cut off by the token limit (only ``<think>``)."""
    text = _THINK_BLOCK.sub("", text)
    lowered = text.lower()
    if "</think>" in lowered:
        text = text[lowered.rindex("</think>") + len("</think>"):]
        lowered = text.lower()
    if "<think>" in lowered:
        text = text[:lowered.index("<think>")]
    return text


def _balanced_end(text: str, start: int) -> int | None:
    """Index just past the bracket that closes ``text[start]``, or None when it never closes cleanly."""
    stack: list[str] = []
    in_string = escaped = False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in _CLOSER:
            stack.append(_CLOSER[ch])
        elif ch in "}]":
            if not stack or stack.pop() != ch:
                return None
            if not stack:
                return i + 1
    return None


def _drop_trailing_commas(candidate: str) -> str:
    """Remove commas that directly precede a closing bracket, leaving string contents alone."""
    out: list[str] = []
    in_string = escaped = False
    for i, ch in enumerate(candidate):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "," and _BEFORE_CLOSER.match(candidate, i + 1):
            continue
        out.append(ch)
    return "".join(out)


def _loads(candidate: str) -> Any:
    """json.loads that tolerates raw newlines in strings and trailing commas; raises ValueError."""
    try:
        return json.loads(candidate, strict=False)
    except ValueError:
        return json.loads(_drop_trailing_commas(candidate), strict=False)


def _regions(text: str) -> Iterator[str]:
    """Where to look, best first: the insides of code fences, then the whole text."""
    for match in _FENCE.finditer(text):
        yield match.group(1)
    yield text


def extract_json(text: str) -> Any:
    """The first balanced JSON object or array in a model's answer that parses.

    Raises ``VLMOutputError`` (quoting the answer) when there is none.
    """
    if not isinstance(text, str):
        raise VLMOutputError(f"The model's answer is not text but {type(text).__name__}.", output=repr(text))
    body = strip_reasoning(text)
    if not body.strip() and text.strip():
        raise VLMOutputError(
            "The answer holds only reasoning (<think>) and no JSON; it was probably cut off by the token limit. "
            "Raise max_tokens or turn the model's thinking mode off.", output=text)
    tried = 0
    for region in _regions(body):
        for match in re.finditer(r"[{\[]", region):
            tried += 1
            if tried > MAX_STARTS:
                break
            end = _balanced_end(region, match.start())
            if end is None:
                continue
            try:
                return _loads(region[match.start():end])
            except (ValueError, RecursionError):
                continue
    raise VLMOutputError("The answer contains no valid JSON object.", output=text)


def extract_json_object(text: str) -> dict:
    """Like ``extract_json`` but the answer must be a JSON object."""
    value = extract_json(text)
    if not isinstance(value, dict):
        raise VLMOutputError(f"Expected one JSON object, got a JSON {type(value).__name__}.", output=text)
    return value
