"""What we ask the VLM at each stage, and with which sampling settings.

Internal: not part of the public API (``csg.__all__``), so it may change without notice.

The stages and the JSON shapes follow the paper (Figures 2, 3 and 6; field names as in
``csg.graph``); the wording is ours. Every stage asks for one JSON object and nothing else, and
each keeps its sampling parameters next to its prompt so a reader sees both at once.

A user prompt longer than ``MAX_PROMPT_CHARS`` is refused before the VLM is asked: it would not fit
a typical VLM context next to the image and the answer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InputError
from ..graph import CausalGraph, Concept
from . import schemas
from .schemas import Schema

MAX_PROMPT_CHARS = 60_000  # about 15,000 tokens; a graph of 20 concepts and 30 relationships needs 9,000


def _fits(prompt: str, stage: str, fix: str) -> str:
    """``prompt`` when it is within MAX_PROMPT_CHARS, else an InputError saying what to shorten."""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"The {stage} prompt would have {len(prompt):,} characters, more than the "
                         f"{MAX_PROMPT_CHARS:,} a VLM prompt may have. {fix}")
    return prompt


_SHORTER_GRAPH = "Use fewer concepts and relationships, or shorter descriptions, scene summary and caption."


@dataclass(frozen=True)
class Stage:
    """One question to the VLM: its name (for errors), system prompt, sampling settings, and the JSON Schema
    a backend that can constrain its decoding holds the answer to."""

    name: str
    system: str
    temperature: float
    max_tokens: int
    schema: Schema | None = None


JSON_ONLY = (
    "Answer with one valid JSON object and nothing else: no markdown, no code fences, no comments, "
    "no text before or after the object."
)

# -- 1. scene description: the base prompt Y when the user gives no caption -------------------------

DESCRIBE = Stage(
    name="scene description",
    system="You write captions for a text-to-image model. " + JSON_ONLY,
    temperature=0.1,
    max_tokens=256,
    schema=schemas.DESCRIPTION,
)


def describe_user() -> str:
    return (
        "Write one caption for this image, as a prompt that would let a text-to-image model draw it again: "
        "a single sentence of at most 40 words naming the main subject, its most visible attributes, "
        "the setting and the kind of picture (photo, painting, ...).\n"
        'Return exactly: {"description": "<the caption>"}'
    )


# -- 2. concepts and causal graph (paper Fig. 2; temperature 0.1, 2,048 tokens) ----------------------

EXTRACT = Stage(
    name="concept extraction",
    system=(
        "You analyse photographs as a specialist in causal inference and visual scene understanding: you name "
        "the scene's high-level variables and decide which of them cause which. " + JSON_ONLY
    ),
    temperature=0.1,
    max_tokens=2048,
    schema=schemas.GRAPH,
)

GRAPH_SCHEMA = """{
  "concepts": [{"id": "c1", "name": "...", "current_value": "...", "description": "..."}],
  "relationships": [{"id": "r1", "cause_id": "c1", "effect_id": "c2", "description": "..."}],
  "scene_summary": "..."
}"""


def extract_user(context: str) -> str:
    return _fits(f"""Look closely at the image. This text describes it:
<context>
{context}
</context>

Step A, concepts. Choose about 5 high-level variables of the main subject or scene that the image shows
or clearly implies (things like age, gender, season, weather). Then, for each of them, imagine setting it
to another value and add the 2 or 3 further variables that would change as a direct consequence. Leave
out anything about lighting, posture or pose. For every concept give:
- id: c1, c2, ... (unique)
- name: a short label of 2 to 5 words (unique)
- current_value: what the image shows now, in 1 to 3 words
- description: one sentence

Step B, causes. Add a directed edge A -> B only where A plausibly causes B. The edges must form a
directed acyclic graph (no cycles, no self-loops). For every edge give:
- id: r1, r2, ... (unique)
- cause_id: the id of the cause
- effect_id: the id of the effect
- description: one sentence on how the cause shapes the effect

Also write scene_summary: one sentence about the whole scene. Be brief and do not explain your answer.
Return exactly this JSON object:
{GRAPH_SCHEMA}""", "concept extraction", "Give a shorter caption.")


# -- 3. three diverse interventions (paper Fig. 3; temperature 0.2, 3,072 tokens) --------------------

MANIPULATOR_SYSTEM = (
    "You reason about visual scenes: given a scene and the causal links between its concepts, you work out "
    "what else in the picture must change when one concept is set to a new value. " + JSON_ONLY
)

PROPOSE = Stage(name="intervention proposal", system=MANIPULATOR_SYSTEM, temperature=0.2, max_tokens=3072,
                schema=schemas.PROPOSAL)

INTERVENTION_SCHEMA = """{
  "interventions": [
    {
      "id": "intervention_1",
      "target_concept_id": "...",
      "target_concept_name": "...",
      "intervention_description": "...",
      "original_value": "...",
      "new_value": "...",
      "propagated_changes": [
        {"concept_id": "...", "concept_name": "...", "original_value": "...", "new_value": "...", "reason": "..."}
      ],
      "final_concept_states": {"c1": "value phrase", "c2": "value phrase"},
      "generation_prompt": "..."
    }
  ]
}"""


def _graph_block(graph: CausalGraph) -> str:
    concepts = json.dumps([c.to_dict() for c in graph.concepts], indent=1, ensure_ascii=False)
    relationships = json.dumps([r.to_dict() for r in graph.relationships], indent=1, ensure_ascii=False)
    return (
        f"<scene_summary>\n{graph.scene_summary}\n</scene_summary>\n"
        f"<concepts>\n{concepts}\n</concepts>\n"
        f"<relationships>\n{relationships}\n</relationships>"
    )


VALUE_PHRASE_RULE = (
    "A value phrase joins the concept and its new value in 1 to 3 plain, unambiguous words, e.g. "
    '"black hair" or "wet road".'
)


def propose_user(graph: CausalGraph, base_prompt: str) -> str:
    return _fits(f"""The image comes with its scene summary, its concepts, and the causal relationships between them
(cause_id -> effect_id):
{_graph_block(graph)}

1. Propose 3 interventions. Each sets a DIFFERENT concept to a new value, realistic and physically
   possible, and the three should lead to clearly different pictures. Choose one target whose change
   reaches many other concepts, one that reaches only a few, and one that reaches none.
2. For each intervention, follow the relationships downstream and list in propagated_changes every
   concept whose value would differ as a result, with its new value and the reason. Only concepts
   reachable from the target through the relationships may change; list only the ones that do change.
3. In final_concept_states, map the id of the target and of every changed concept to its value phrase.
   {VALUE_PHRASE_RULE}
4. Write generation_prompt: the reference prompt below, edited so it describes the changed scene.
<reference_prompt>
{base_prompt}
</reference_prompt>

Return exactly this JSON object with three interventions:
{INTERVENTION_SCHEMA}""", "intervention proposal", _SHORTER_GRAPH)


# -- 4. a user-named intervention: the VLM only propagates it ----------------------------------------

PROPAGATE = Stage(name="intervention propagation", system=MANIPULATOR_SYSTEM, temperature=0.2, max_tokens=3072,
                  schema=schemas.PROPAGATION)


def _concept_lines(concepts: Sequence[Concept]) -> str:
    return "\n".join(f"- {c.id} ({c.name}): {c.current_value}" for c in concepts) or "- (none)"


def propagate_user(graph: CausalGraph, base_prompt: str, target: Concept, new_value: str) -> str:
    descendants = [graph.concept(cid) for cid in graph.descendants(target.id)]
    fixed = [graph.concept(cid) for cid in graph.non_descendants(target.id)]
    return _fits(f"""The image comes with its scene summary, its concepts, and the causal relationships between them
(cause_id -> effect_id):
{_graph_block(graph)}

The user sets {target.id} ({target.name}) from "{target.current_value}" to "{new_value}". Do not
question or alter this choice; your job is to work out its consequences.

These concepts lie downstream of {target.id} and MAY change (list only those that really would):
{_concept_lines(descendants)}
These concepts are not downstream and MUST keep their current values (never list them):
{_concept_lines(fixed)}

1. In propagated_changes, list each downstream concept whose value would differ, with its new value
   and the reason.
2. In final_concept_states, map {target.id} and every changed concept to its value phrase.
   {VALUE_PHRASE_RULE}
3. Write generation_prompt: the reference prompt below, edited so it describes the changed scene.
<reference_prompt>
{base_prompt}
</reference_prompt>

Return exactly this JSON object with ONE intervention whose target_concept_id is "{target.id}" and whose
new_value is "{new_value}":
{INTERVENTION_SCHEMA}""", "intervention propagation", _SHORTER_GRAPH + " Give a shorter new value.")


# -- 5. effectiveness judge (paper Fig. 6) -------------------------------------------------------

JUDGE = Stage(
    name="effectiveness judge",
    system="You inspect images and answer plain questions about what they show. " + JSON_ONLY,
    temperature=0.1,
    max_tokens=1024,
    schema=schemas.JUDGEMENT,
)

JUDGE_SCHEMA = """{
  "intervention_id": "...",
  "concept_checks": [{"concept_name": "...", "expected_value": "...", "present": "yes|no"}],
  "verdict": "success|partial|failure",
  "reasoning": "..."
}"""


def judge_user(intervention_id: str, generation_prompt: str, target_name: str, original_value: str,
               new_value: str, checklist: Sequence[tuple[str, str]]) -> str:
    items = "\n".join(f"- {name}: {value}" for name, value in checklist)
    return _fits(f"""This image was generated from the prompt:
<prompt>
{generation_prompt}
</prompt>
It was made by changing one thing: {target_name}: {original_value} -> {new_value}.

Each checklist line names a concept and the value it should now show:
<checklist>
{items}
</checklist>

1. For every checklist line, in the same order, set present to "yes" when the image clearly shows that
   value and to "no" otherwise. Copy concept_name and expected_value from the line.
2. Verdict: "success" when every line is "yes"; "partial" when most are "yes" but not all; "failure"
   when the changed concept itself is not visible or most lines are "no".
3. reasoning: one or two sentences that justify the verdict.

Return exactly this JSON object, with intervention_id "{intervention_id}":
{JUDGE_SCHEMA}""", "effectiveness judge", "Shorten the generation prompt and the value phrases.")


# -- retries ----------------------------------------------------------------------------------------


def correction_user(problem: str) -> str:
    """The follow-up turn after an unusable answer: what was wrong and what to send instead."""
    return (
        f"That answer could not be used: {problem}\n"
        "Answer the same request again, fixing this. " + JSON_ONLY
    )
