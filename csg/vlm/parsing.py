"""Pull the JSON answer out of whatever a VLM wrote around it.

Models wrap their JSON in reasoning (``<think>…</think>``), code fences, and prose, and sometimes
leave trailing commas. We look inside code fences first, then take the first balanced ``{…}`` or
``[…]`` that parses and does not lie wholly inside the leading reasoning (a draft there is not the
answer). Anything else is a ``VLMOutputError`` quoting the text.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

from ..errors import VLMError

QUOTE_LIMIT = 600  # characters of a bad answer shown in an error message
MAX_STARTS = 400  # opening brackets tried before giving up; keeps a pathological answer linear-ish

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
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


def reasoning_end(text: str) -> int | None:
    """Where the reasoning a model writes before its answer ends (0 when there is none).

    Reasoning is a leading ``<think>…</think>`` block (or several), or everything up to the first
    ``</think>`` when the opening tag was part of the prompt. None means a leading ``<think>``
    never closes: the answer was cut off inside its reasoning.
    """
    lowered = text.lower()
    position = 0
    while True:
        start = len(lowered) - len(lowered[position:].lstrip())
        end = lowered.find(_THINK_CLOSE, start)
        if lowered.startswith(_THINK_OPEN, start):
            if end < 0:
                return None
        elif end < 0 or _THINK_OPEN in lowered[start:end]:
            return position
        position = end + len(_THINK_CLOSE)


def _json_characters(text: str, start: int = 0) -> Iterator[tuple[int, str, bool]]:
    """(index, character, quoted) for ``text[start:]``; quoted is True inside a JSON string, its
    quotes and escapes included, so brackets and commas in quoted text are never taken as syntax."""
    in_string = escaped = False
    for i in range(start, len(text)):
        ch = text[i]
        quoted = in_string or ch == '"'
        if escaped:
            escaped = False
        elif in_string and ch == "\\":
            escaped = True
        elif ch == '"':
            in_string = not in_string
        yield i, ch, quoted


def _balanced_end(text: str, start: int) -> int | None:
    """Index just past the bracket that closes ``text[start]``, or None when it never closes cleanly."""
    stack: list[str] = []
    for i, ch, quoted in _json_characters(text, start):
        if quoted:
            continue
        if ch in _CLOSER:
            stack.append(_CLOSER[ch])
        elif ch in "}]":
            if not stack or stack.pop() != ch:
                return None
            if not stack:
                return i + 1
    return None


def _drop_trailing_commas(candidate: str) -> str:
    """Remove commas that directly precede a closing bracket, leaving string contents alone."""
    return "".join(ch for i, ch, quoted in _json_characters(candidate)
                   if quoted or ch != "," or not _BEFORE_CLOSER.match(candidate, i + 1))


def _loads(candidate: str) -> Any:
    """json.loads that tolerates raw newlines in strings and trailing commas; raises ValueError."""
    try:
        return json.loads(candidate, strict=False)
    except ValueError:
        return json.loads(_drop_trailing_commas(candidate), strict=False)


def _regions(text: str) -> Iterator[tuple[int, str]]:
    """(offset, text) of where to look, best first: inside code fences, then the whole answer."""
    for match in _FENCE.finditer(text):
        yield match.start(1), match.group(1)
    yield 0, text


def _is_structured(value: Any) -> bool:
    return isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value))


def extract_json(text: str) -> Any:
    """The first JSON object, or array of objects, in a model's answer that parses.

    A footnote like "[1]" in the prose parses as an array too, so arrays without objects count only
    when nothing better is found. Raises ``VLMOutputError`` (quoting the answer) when there is none.
    """
    if not isinstance(text, str):
        raise VLMOutputError(f"The model's answer is not text but {type(text).__name__}.", output=repr(text))
    answer_start = reasoning_end(text)
    if answer_start is None:
        raise VLMOutputError(
            "The answer holds only reasoning (<think>) and no JSON; it was probably cut off by the token limit. "
            "Raise max_tokens or turn the model's thinking mode off.", output=text)
    fallback: list[Any] = []
    tried = 0
    for offset, region in _regions(text):
        for match in re.finditer(r"[{\[]", region):
            tried += 1
            if tried > MAX_STARTS:
                break
            end = _balanced_end(region, match.start())
            if end is None or offset + end <= answer_start:  # a draft inside the reasoning is not the answer
                continue
            try:
                value = _loads(region[match.start():end])
            except (ValueError, RecursionError):
                continue
            if _is_structured(value):
                return value
            fallback.append(value)
    if fallback:
        return fallback[0]
    raise VLMOutputError("The answer contains no valid JSON object.", output=text)


def extract_json_object(text: str) -> dict:
    """Like ``extract_json`` but the answer must be a JSON object."""
    value = extract_json(text)
    if not isinstance(value, dict):
        raise VLMOutputError(f"Expected one JSON object, got a JSON {type(value).__name__}.", output=text)
    return value
