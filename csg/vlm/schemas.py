"""One JSON Schema per stage: what a backend that can constrain its decoding is held to.

Internal: not part of the public API (``csg.__all__``), so it may change without notice.

The schemas are built from the records the parsers read (``csg.graph``'s dataclasses give the field
names, which are the paper's) and from the same limits: at most ``MAX_CONCEPTS`` concepts,
``MAX_RELATIONSHIPS`` relationships, ``MAX_TEXT_CHARS`` characters a text field. A field without a
default must be a non-empty string. What a schema cannot say (the graph is acyclic, ids are known
and unique, changes reach only descendants, a proposal changes its target) is still checked by the
parsers afterwards, so a schema-valid answer can still be rejected and re-asked.

``strict_form`` gives the same schema in the subset OpenAI's ``strict`` mode accepts, or None when
the schema needs more (a map such as ``final_concept_states``).
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from ..errors import InputError
from ..graph import (
    MAX_CONCEPTS,
    MAX_RELATIONSHIPS,
    MAX_TEXT_CHARS,
    Concept,
    Intervention,
    PropagatedChange,
    Relationship,
)
from ..metrics import VERDICTS  # one list of verdicts: the schema's enum is what the metrics score

PROPOSALS = 3  # the paper's "three diverse interventions"
MAX_DESCRIPTION_CHARS = 600  # the scene description: one sentence of at most 40 words
ANSWERS = ("yes", "no")  # a judge's "present"

Schema = dict[str, Any]
ANY_OBJECT: Schema = {"type": "object"}  # what "json" mode holds an answer to

# How a backend holds an answer to its stage's schema: "auto" as tightly as the backend can (a server
# that refuses the schema gets a JSON object asked for, then plain text), "schema" and "json" that form
# only, "off" not at all (plain text; the parser repairs and the stage re-asks, as without a schema).
STRUCTURED_MODES = ("auto", "schema", "json", "off")
NOT_STRICT = ("minLength", "maxLength", "maxProperties")  # length keywords OpenAI's strict subset has none of


def text(max_length: int = MAX_TEXT_CHARS, *, required: bool = True) -> Schema:
    return {"type": "string", "minLength": 1 if required else 0, "maxLength": max_length}


def closed(properties: dict[str, Schema]) -> Schema:
    """An object with exactly these properties, all present (absent optional fields are written as "")."""
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def array(items: Schema, min_items: int, max_items: int) -> Schema:
    return {"type": "array", "items": items, "minItems": min_items, "maxItems": max_items}


def record(cls: type, **overrides: Schema) -> Schema:
    """The object a dataclass of ``csg.graph`` is read from: its text fields, non-empty unless they default."""
    return closed({f.name: overrides.get(f.name) or text(required=f.default is MISSING) for f in fields(cls)
                   if f.name in overrides or f.type == "str"})


def _intervention() -> Schema:
    states = {"type": "object", "additionalProperties": text(), "maxProperties": MAX_CONCEPTS}
    changes = array(record(PropagatedChange), 0, MAX_CONCEPTS)
    return record(Intervention, propagated_changes=changes, final_concept_states=states)  # violations are ours


def interventions(count: int) -> Schema:
    return closed({"interventions": array(_intervention(), count, count)})


DESCRIPTION = closed({"description": text(MAX_DESCRIPTION_CHARS)})
GRAPH = closed({
    "concepts": array(record(Concept), 2, MAX_CONCEPTS),  # parse_graph needs 2 concepts and an edge
    "relationships": array(record(Relationship), 1, MAX_RELATIONSHIPS),
    "scene_summary": text(),
})
PROPOSAL = interventions(PROPOSALS)
PROPAGATION = interventions(1)
JUDGEMENT = closed({
    "intervention_id": text(),
    "concept_checks": array(closed({"concept_name": text(), "expected_value": text(),
                                    "present": {"type": "string", "enum": list(ANSWERS)}}), 0, MAX_CONCEPTS),
    "verdict": {"type": "string", "enum": list(VERDICTS)},
    "reasoning": text(required=False),
})


def check_mode(mode: str) -> str:
    if mode not in STRUCTURED_MODES:
        raise InputError(f"Unknown structured-output mode {mode!r}; use one of {', '.join(STRUCTURED_MODES)}.")
    return mode


def strict_form(schema: Schema) -> Schema | None:
    """``schema`` without the keywords OpenAI's strict mode lacks, or None when an object in it is open."""
    if schema.get("type") == "object":
        if schema.get("additionalProperties") is not False or set(schema["required"]) != set(schema["properties"]):
            return None
        properties = {name: strict_form(value) for name, value in schema["properties"].items()}
        if any(value is None for value in properties.values()):
            return None
        return {**schema, "properties": properties}
    if schema.get("type") == "array":
        items = strict_form(schema["items"])
        return None if items is None else {**schema, "items": items}
    return {key: value for key, value in schema.items() if key not in NOT_STRICT}
