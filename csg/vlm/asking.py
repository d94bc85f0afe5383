"""Ask, check, and ask again with the problem spelled out: the bounded retry loop of every stage.

Internal: not part of the public API (``csg.__all__``), so it may change without notice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from PIL import Image

from ..errors import GraphError, InputError
from .parsing import VLMOutputError
from .prompts import Stage, correction_user
from .protocol import VLM, Turn, image_for_vlm

log = logging.getLogger("csg.vlm")

T = TypeVar("T")
DEFAULT_ATTEMPTS = 3
REPLAYED_ANSWER_CHARS = 8_000  # of a rejected answer sent back; a 200,000-character one would fill the context


def replayed_answer(answer: str) -> str:
    """A rejected answer as the model sees it again: whole when short, else its head and a note of the cut."""
    if len(answer) <= REPLAYED_ANSWER_CHARS:
        return answer
    return f"{answer[:REPLAYED_ANSWER_CHARS]}\n[... {len(answer) - REPLAYED_ANSWER_CHARS:,} more characters left out]"


def ask_until_valid(vlm: VLM, stage: Stage, user: str, images: Sequence[Image.Image],
                    validate: Callable[[str], T], *, max_attempts: int = DEFAULT_ATTEMPTS) -> T:
    """The first answer that ``validate`` accepts, after at most ``max_attempts`` questions.

    ``validate`` turns the answer text into a result or raises ``VLMOutputError``/``GraphError``. The
    stage's JSON Schema goes with every question; a backend that constrains its decoding to it answers
    in that shape at once, and ``validate`` still checks what no schema can say.
    After a rejected answer the conversation grows by that answer and a user turn naming the
    problem, so the model can correct itself. Errors of the backend itself (server down, weights
    missing) are not retried here; they propagate at once.

    A backend may offer two optional methods, as ``CachedVLM`` does: ``forget`` (the question whose
    answer was rejected) and ``remember`` (the first question, with the corrected answer accepted
    later), so that a cache replays only accepted answers and a rerun asks nothing.
    """
    if max_attempts < 1:
        raise InputError(f"max_attempts must be at least 1, got {max_attempts}.")
    pictures = [image_for_vlm(image) for image in images]
    question = [Turn("user", user)]
    turns = question
    problem, answer = "", ""
    for attempt in range(1, max_attempts + 1):
        answer = vlm.generate(stage.system, turns, pictures, temperature=stage.temperature, max_tokens=stage.max_tokens,
                              schema=stage.schema)
        try:
            result = validate(answer)
        except (VLMOutputError, GraphError) as exc:
            problem = exc.problem if isinstance(exc, VLMOutputError) else str(exc)
            log.warning("%s: attempt %d of %d unusable: %s", stage.name, attempt, max_attempts, problem)
            forget = getattr(vlm, "forget", None)
            if forget is not None:  # a cache must not replay an answer we rejected
                forget(stage.system, turns, pictures, temperature=stage.temperature, max_tokens=stage.max_tokens,
                       schema=stage.schema)
            turns = [*turns, Turn("assistant", replayed_answer(answer)), Turn("user", correction_user(problem))]
            continue
        remember = getattr(vlm, "remember", None)
        if attempt > 1 and remember is not None:  # a rerun of the question gets the accepted answer at once
            remember(stage.system, question, pictures, temperature=stage.temperature, max_tokens=stage.max_tokens,
                     schema=stage.schema, answer=answer)
        return result
    raise VLMOutputError(
        f"The VLM gave no usable {stage.name} answer in {max_attempts} attempt(s). Last problem: {problem} "
        "Try a larger or instruction-tuned model, allow more attempts, or write the JSON by hand "
        "(see csg/examples/).", output=answer, stage=stage.name)
