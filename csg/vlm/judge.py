"""VLM effectiveness (paper Fig. 6): does the counterfactual show every value the intervention set?

The checklist is the set E that CSG edits: the target and each changed descendant, with the value
phrase it should now show. The VLM answers yes/no per item and gives a verdict, read into
``csg.metrics.Judgement``, whose score is the fraction of items answered yes
(``csg.metrics.vlm_effectiveness`` averages it over images).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from PIL import Image

from ..graph import CausalGraph, Intervention, check_intervention
from ..metrics import ConceptCheck, Judgement
from . import prompts
from .asking import DEFAULT_ATTEMPTS, ask_until_valid
from .parsing import VLMOutputError, extract_json_object
from .protocol import VLM
from .schemas import VERDICTS


def checklist(intervention: Intervention, graph: CausalGraph) -> list[tuple[str, str]]:
    """(concept name, expected value phrase) for every concept the intervention changes."""
    return [(term.concept_name, term.prompt) for term in intervention.edit_concepts(graph)]


def _yes(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("yes", "no"):
        return value.strip().lower() == "yes"
    raise VLMOutputError(f'The check for "{name}" has present={value!r:.60}; answer "yes" or "no".')


def parse_judgement(intervention_id: str, items: list[tuple[str, str]], answer: str) -> Judgement:
    """Our checklist with the VLM's yes/no per item (matched by concept name, else by position)."""
    data = extract_json_object(answer)
    verdict = data.get("verdict")
    if not isinstance(verdict, str) or verdict.strip().lower() not in VERDICTS:
        raise VLMOutputError(f'"verdict" must be one of {", ".join(VERDICTS)}, got {verdict!r:.60}.')
    checks = data.get("concept_checks")
    if not isinstance(checks, list) or not all(isinstance(c, Mapping) for c in checks):
        raise VLMOutputError('"concept_checks" must be a list of '
                             '{"concept_name", "expected_value", "present"} objects.')
    by_name = {str(c.get("concept_name", "")).strip().lower(): c for c in checks}
    results = []
    for position, (name, value) in enumerate(items):
        check = by_name.get(name.strip().lower())
        if check is None and len(checks) == len(items):
            check = checks[position]
        if check is None:
            raise VLMOutputError(f'No answer for the checklist line "{name}: {value}"; answer every line, in order.')
        results.append(ConceptCheck(name, value, _yes(check.get("present"), name)))
    reasoning = data.get("reasoning")
    return Judgement(intervention_id, tuple(results), verdict.strip().lower(),
                     reasoning.strip() if isinstance(reasoning, str) else "")


def preservation_checklist(intervention: Intervention, graph: CausalGraph) -> list[tuple[str, str]]:
    """(concept name, current value) for every non-descendant of the target: what must not change."""
    return [(graph.concept(c).name, graph.concept(c).current_value)
            for c in graph.non_descendants(intervention.target_concept_id)]


def judge_counterfactual(vlm: VLM, image: Image.Image, intervention: Intervention, graph: CausalGraph, *,
                         max_attempts: int = DEFAULT_ATTEMPTS) -> Judgement:
    """Ask the VLM whether ``image`` (the counterfactual) shows each value the intervention set.

    Args:
        vlm: the backend.
        image: the counterfactual image.
        intervention: the intervention it was made with.
        graph: the graph it acts on; it decides which concepts changed.
        max_attempts: questions asked before giving up on unusable answers.

    Returns:
        The ``Judgement``: per changed concept whether it is shown, and the verdict.

    Raises:
        GraphError: the intervention does not fit the graph.
        VLMError: the backend failed.
        VLMOutputError: no valid answer within ``max_attempts``.
    """
    intervention = check_intervention(graph, intervention)
    return _judge(vlm, image, intervention, graph, checklist(intervention, graph), max_attempts)


def judge_preservation(vlm: VLM, image: Image.Image, intervention: Intervention, graph: CausalGraph, *,
                       max_attempts: int = DEFAULT_ATTEMPTS) -> Judgement | None:
    """The same judge, asked whether every non-descendant of the target kept its current value
    (``csg.metrics.preservation_score``). None when the target has no non-descendants."""
    intervention = check_intervention(graph, intervention)
    items = preservation_checklist(intervention, graph)
    return _judge(vlm, image, intervention, graph, items, max_attempts) if items else None


def _judge(vlm: VLM, image: Image.Image, intervention: Intervention, graph: CausalGraph, items: list[tuple[str, str]],
           max_attempts: int) -> Judgement:
    target = graph.concept(intervention.target_concept_id)
    user = prompts.judge_user(intervention.id, intervention.generation_prompt or graph.scene_summary,
                              intervention.target_concept_name or target.name,
                              intervention.original_value or target.current_value, intervention.new_value, items)
    return ask_until_valid(vlm, prompts.JUDGE, user, [image],
                           lambda answer: parse_judgement(intervention.id, items, answer), max_attempts=max_attempts)
