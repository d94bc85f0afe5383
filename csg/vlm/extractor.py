"""The concept extractor E: image (+ caption) -> base prompt Y and causal graph (C, G)."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import NamedTuple

from PIL import Image

from ..errors import some
from ..graph import CausalGraph
from . import prompts
from .asking import DEFAULT_ATTEMPTS, ask_until_valid
from .parsing import VLMOutputError, extract_json_object
from .protocol import VLM
from .schemas import MAX_DESCRIPTION_CHARS

# Concepts the paper keeps out of the graph: they are nuisances of the photo, not of the scene.
FORBIDDEN_CONCEPT_WORDS = ("lighting", "illumination", "posture", "pose")


class Extraction(NamedTuple):
    graph: CausalGraph
    base_prompt: str  # Y: the user's caption, or the VLM's description of the scene


def _single_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def parse_description(answer: str) -> str:
    data = extract_json_object(answer)
    description = data.get("description")
    if not isinstance(description, str) or not description.strip():
        raise VLMOutputError('The object needs a non-empty string field "description".')
    description = _single_line(description)
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise VLMOutputError(f"The description has {len(description)} characters; keep it to one sentence of at most "
                             "40 words.")
    return description


def parse_graph(answer: str) -> CausalGraph:
    """The graph in an extractor answer; raises GraphError/VLMOutputError naming what to fix."""
    graph = CausalGraph.from_dict(extract_json_object(answer))
    if len(graph.concepts) < 2:
        raise VLMOutputError("The graph has fewer than 2 concepts; list about 5 concepts plus the ones they affect.")
    if not graph.relationships:
        raise VLMOutputError("The graph has no relationships; add the cause -> effect edges between the concepts.")
    banned = [c for c in graph.concepts
              if any(re.search(rf"\b{word}\b", c.name, re.IGNORECASE) for word in FORBIDDEN_CONCEPT_WORDS)]
    if banned:
        names = some([f"{c.id} ({c.name})" for c in banned])
        raise VLMOutputError(f"Concepts about lighting or posture are not allowed: {names}. Remove them and their "
                             "relationships.")
    return graph


def describe_scene(vlm: VLM, image: Image.Image, *, max_attempts: int = DEFAULT_ATTEMPTS) -> str:
    """A one-sentence, text-to-image style caption of the image: the base prompt Y.

    Args:
        vlm: the backend (``TransformersVLM``, ``OpenAICompatibleVLM``, maybe in ``CachedVLM``).
        image: the factual image.
        max_attempts: questions asked before giving up on unusable answers.

    Returns:
        The caption.

    Raises:
        VLMError: the backend failed.
        VLMOutputError: no usable answer within ``max_attempts``.
    """
    return ask_until_valid(vlm, prompts.DESCRIBE, prompts.describe_user(), [image], parse_description,
                           max_attempts=max_attempts)


def extract_graph(vlm: VLM, image: Image.Image, caption: str | None = None, *,
                  max_attempts: int = DEFAULT_ATTEMPTS) -> Extraction:
    """The causal graph of the image, and the base prompt Y it was extracted with.

    Without a caption, the VLM first describes the scene and that description becomes Y. A graph
    without a scene summary gets Y as its summary, so the manipulator always has one.

    Args:
        vlm: the backend.
        image: the factual image.
        caption: the base prompt Y; None asks the VLM for it.
        max_attempts: questions asked per stage before giving up on unusable answers.

    Returns:
        An ``Extraction``: ``graph`` and ``base_prompt``.

    Raises:
        VLMError: the backend failed.
        VLMOutputError: no valid graph within ``max_attempts``.
    """
    base_prompt = _single_line(caption) if caption and caption.strip() else describe_scene(vlm, image,
                                                                                          max_attempts=max_attempts)
    graph = ask_until_valid(vlm, prompts.EXTRACT, prompts.extract_user(base_prompt), [image], parse_graph,
                            max_attempts=max_attempts)
    if not graph.scene_summary:
        graph = replace(graph, scene_summary=base_prompt)
    return Extraction(graph, base_prompt)
