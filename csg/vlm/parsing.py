"""Pull the JSON answer out of whatever a VLM wrote around it.

Internal: not part of the public API (``csg.__all__``), so it may change without notice.

Models wrap their JSON in reasoning (``<think>…</think>``), code fences, and prose, and sometimes
leave trailing commas. We look inside code fences first, then take the first balanced ``{…}`` or
``[…]`` that parses and does not lie wholly inside the leading reasoning (a draft there is not the
answer). When the answer's own JSON is broken we say how (cut off by the token limit, comments,
nested too deep, or the syntax error itself) rather than take a fragment from inside it: that
message goes back to the model as its correction. Every failure is a ``VLMOutputError`` quoting
the text.

Hostile answers stay cheap: an answer longer than ``MAX_REPLY_CHARS`` is refused unread, one pass
over the text finds every bracket pair, and JSON nested deeper than ``MAX_JSON_DEPTH`` is never
parsed, so the work is linear in the answer's length.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from ..errors import VLMError, quote
from ..files import MAX_JSON_DEPTH

MAX_REPLY_CHARS = 200_000  # about 50,000 tokens; no stage asks for more than 3,072

_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)
_LEADING_THINK = re.compile(r"\s*<think>", re.IGNORECASE)
_END_THINK = re.compile(r"</think>", re.IGNORECASE)

_STRING = r'"[^"\\]*(?:\\[\s\S][^"\\]*)*'  # a JSON string without its closing quote
_OPENER = re.compile(r"[{\[]")
_TOKEN = re.compile(_STRING + r'(")?|[{}\[\]]')  # group 1: the string's closing quote, if it has one
_TRAILING_COMMA = re.compile("(" + _STRING + '"?)|,(?=\\s*[}\\]])')  # group 1: a string, kept as it is
_COMMENT = re.compile("(?:" + _STRING + '"?)|(//|/\\*)')  # group 1: a comment outside the strings
_SPACE_AND_COMMENTS = re.compile(r"\s*(?://[^\n]*\n\s*|/\*(?:[^*]|\*(?!/))*\*/\s*)*")
_CLOSING = {"{": "}", "[": "]"}
_FIRST_INSIDE = {"{": '"}', "[": '{["]'}  # what follows the opening bracket of JSON we asked for
_LOOKAHEAD = 200  # characters after an opening bracket read to tell JSON from prose


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


def reasoning_end(text: str) -> int | None:
    """Where the reasoning a model writes before its answer ends (0 when there is none).

    Reasoning ends at the last ``</think>``, whether or not its ``<think>`` is in the text (the
    opening tag may have been part of the prompt) and whatever prose came before it. None means a
    ``<think>`` block opens the text, or follows the last ``</think>``, and never closes: the answer
    was cut off inside its reasoning.
    """
    end = 0
    for closing in _END_THINK.finditer(text):
        end = closing.end()
    return None if _LEADING_THINK.match(text, end) else end


class _Span(NamedTuple):
    """A bracket and where its JSON ends: just past the matching closer, at a closer that does not
    match it (broken JSON), or at the end of the text when it never closes (``cut_off``)."""

    start: int
    end: int
    depth: int  # bracket levels, 1 for a flat [...] or {...}
    cut_off: bool


def _deepest(levels: list[int]) -> int:
    """Bracket levels under the outermost of the still open brackets, given each one's deepest closed child."""
    deepest = 0
    for level in reversed(levels):
        deepest = max(level, deepest + 1)
    return deepest


def _spans(text: str, start: int, stop: int) -> Iterator[_Span]:
    """Every bracket pair in ``text[start:stop]``, found in one pass.

    Quotes count from an outermost bracket on, so quotes in the prose between brackets do not
    matter, and inside the brackets a bracket in a string is data. A closer that does not match
    ends the open brackets as one broken span; brackets open at ``stop`` end as one cut-off span.
    """
    opened: list[int] = []  # positions of the open brackets, outermost first
    levels: list[int] = []  # for each, the bracket levels found in it so far
    position = start
    while True:
        if not opened:
            match = _OPENER.search(text, position, stop)
            if match is None:
                return
            opened.append(match.start())
            levels.append(1)
            position = match.end()
            continue
        match = _TOKEN.search(text, position, stop)
        if match is None or (match.group()[0] == '"' and match.group(1) is None):
            yield _Span(opened[0], stop, _deepest(levels), True)  # the text ends inside the brackets
            return
        position = match.end()
        token = match.group()
        if token[0] == '"':
            continue
        if token in _CLOSING:  # an opening bracket
            opened.append(match.start())
            levels.append(1)
        elif token != _CLOSING[text[opened[-1]]]:
            yield _Span(opened[0], position, _deepest(levels), False)  # broken: parsing it says where
            opened.clear()
            levels.clear()
        else:
            depth = levels.pop()
            yield _Span(opened.pop(), position, depth, False)
            if levels:
                levels[-1] = max(levels[-1], depth + 1)


def _looks_like_json(text: str, span: _Span) -> bool:
    """Whether a bracket opens the kind of JSON we asked for (``{"``, ``[{``, ...), comments allowed,
    rather than prose such as "{maybe}" or a footnote "[1]". A bracket that the text ends right
    after could open either, and is taken as JSON."""
    window = text[span.start + 1:span.start + 1 + _LOOKAHEAD]
    first = window[_SPACE_AND_COMMENTS.match(window).end():][:1]
    return not first or first in _FIRST_INSIDE[text[span.start]]


def _drop_trailing_commas(candidate: str) -> str:
    """Remove commas that directly precede a closing bracket, leaving string contents alone."""
    return _TRAILING_COMMA.sub(lambda match: match.group(1) or "", candidate)


def _loads(candidate: str) -> Any:
    """json.loads that tolerates raw newlines in strings and trailing commas; raises ValueError."""
    try:
        return json.loads(candidate, strict=False)
    except json.JSONDecodeError as exc:
        if candidate[exc.pos:exc.pos + 1] not in ("}", "]"):  # not where a trailing comma fails
            raise
        try:
            return json.loads(_drop_trailing_commas(candidate), strict=False)
        except ValueError:
            raise exc from None


def _syntax_problem(candidate: str, exc: ValueError) -> str:
    if any(match.group(1) for match in _COMMENT.finditer(candidate)):
        return "The JSON has comments (// or /* */), and JSON allows none. Remove every comment."
    if isinstance(exc, json.JSONDecodeError):
        return (f"The JSON does not parse: {exc.msg} at line {exc.lineno}, column {exc.colno} of the object. "
                "Fix the syntax.")
    return f"The JSON does not parse: {exc}."


def _is_structured(value: Any) -> bool:
    return isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value))


class _Search:
    """The first JSON object in an answer's bracket spans, and what is wrong when there is none."""

    def __init__(self, text: str, answer_start: int):
        self.text = text
        self.answer_start = answer_start
        self.broken_until = 0  # spans starting before this lie inside broken JSON: fragments, not the answer
        self.problem = ""  # what is wrong with the first broken JSON
        self.fallback: list[Any] = []  # arrays without objects, e.g. a footnote "[1]"

    def first(self, spans: Iterable[_Span]) -> Any:
        """The first structured value among ``spans`` by position (outer before inner), else None."""
        for span in sorted(set(spans), key=lambda s: (s.start, -s.end)):
            if span.start < self.broken_until or span.end <= self.answer_start:
                continue  # inside broken JSON, or a draft inside the reasoning
            if span.depth > MAX_JSON_DEPTH:  # not parsed; when it never closes, the answer may lie inside
                self._broken(span, f"The JSON is nested {span.depth:,} levels deep, more than the {MAX_JSON_DEPTH} "
                                   "allowed. Write the requested object, which needs 5 levels at most.",
                             block=not span.cut_off)
                continue
            if span.cut_off and span.end == len(self.text):
                self._broken(span, f"The answer ends inside its JSON (the {self.text[span.start]!r} at character "
                                   f"{span.start:,} is never closed): it was cut off, probably by the token limit. "
                                   "Raise max_tokens, or answer more briefly.")
                continue
            candidate = self.text[span.start:span.end]
            try:
                value = _loads(candidate)
            except ValueError as exc:
                self._broken(span, _syntax_problem(candidate, exc))
                continue
            if _is_structured(value):
                return value
            self.fallback.append(value)
        return None

    def _broken(self, span: _Span, problem: str, *, block: bool = True) -> None:
        """Remember the first broken JSON of the kind we asked for, and (``block``) skip the fragments
        inside it. Prose in brackets, and a draft the reasoning leaves unfinished, are no answer to judge."""
        if (self.problem and not block) or (span.cut_off and span.start < self.answer_start):
            return
        if _looks_like_json(self.text, span):
            self.problem = self.problem or problem
            if block:
                self.broken_until = span.end

    def give_up(self) -> Any:
        """The best non-structured value, else a VLMOutputError saying what is wrong."""
        if self.problem:
            raise VLMOutputError(self.problem, output=self.text)
        if self.fallback:
            return self.fallback[0]
        raise VLMOutputError("The answer contains no valid JSON object.", output=self.text)


def extract_json(text: str) -> Any:
    """The first JSON object, or array of objects, in a model's answer that parses.

    A footnote like "[1]" in the prose parses as an array too, so arrays without objects count only
    when nothing better is found. Raises ``VLMOutputError`` (quoting the answer) when there is none,
    naming what is wrong when the answer's JSON is broken.
    """
    if not isinstance(text, str):
        raise VLMOutputError(f"The model's answer is not text but {type(text).__name__}.")
    if len(text) > MAX_REPLY_CHARS:
        raise VLMOutputError(f"The answer has {len(text):,} characters, more than the {MAX_REPLY_CHARS:,} an answer "
                             "may have. Answer with the requested JSON object alone.", output=text)
    answer_start = reasoning_end(text)
    if answer_start is None:
        raise VLMOutputError(
            "The answer holds only reasoning (<think>) and no JSON: the token budget went to thinking. To fix it, "
            "raise max_tokens or use an instruct model (or turn the model's thinking mode off).", output=text)
    search = _Search(text, answer_start)
    for fence in _FENCE.finditer(text):
        found = search.first(_spans(text, fence.start(1), fence.end(1)))
        if found is not None:
            return found
    if search.problem:  # the answer in a code fence is broken: say how, rather than take JSON from the prose
        return search.give_up()
    # The reasoning may leave a quote open, so the answer after it is also read from a fresh start.
    whole = [*_spans(text, 0, len(text)), *(_spans(text, answer_start, len(text)) if answer_start else ())]
    found = search.first(whole)
    return found if found is not None else search.give_up()


def extract_json_object(text: str) -> dict:
    """Like ``extract_json`` but the answer must be a JSON object."""
    value = extract_json(text)
    if not isinstance(value, dict):
        raise VLMOutputError(f"Expected one JSON object, got a JSON {type(value).__name__}.", output=text)
    return value
