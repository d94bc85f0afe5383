"""The semantic causal model: concepts, the DAG between them, and interventions on it.

Field names follow the JSON schemas of the paper's extractor and manipulator prompts, so a VLM
answer round-trips through ``from_dict``/``to_dict`` unchanged.

Size limits keep hostile or runaway input from stalling the pack or flooding a VLM prompt: a graph
holds at most ``MAX_CONCEPTS`` concepts and ``MAX_RELATIONSHIPS`` relationships, and every text field
at most ``MAX_TEXT_CHARS`` characters. The paper's graphs have about 20 concepts.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import NAME_LIMIT, NAMED_IDS, GraphError, InputError, brief, quote, some
from .files import MAX_JSON_DEPTH, json_depth, read_json

MAX_CONCEPTS = 100  # concepts in one graph; the paper's graphs have about 20
MAX_RELATIONSHIPS = 500  # relationships (edges) in one graph: five per concept on average at the most
MAX_TEXT_CHARS = 1000  # one id, name, value, description or reason; a value is a CLIP prompt (77 tokens, ~300 chars)
FROM_FINAL_STATES = "given only in final_concept_states"  # reason of a change recovered from there


def _shown(text: str) -> str:
    """An id or value from the input, quoted and shortened for an error message."""
    return quote(text, NAME_LIMIT)


def _quotable(value: Any) -> bool:
    """A JSON string or number, which a message may quote. Never the repr of a container: input
    nested hundreds deep would overflow the stack, and a large one would flood the message."""
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    """What a wrong value is, for an error message: a string or number shortened, else its type."""
    return f"{type(value).__name__} {_shown(str(value))}" if _quotable(value) else type(value).__name__


def _named(kind: str, data: Any, key: str) -> str:
    """How a message names a record: "concept 'c1'" when it has a quotable id, else "a concept"."""
    value = data.get(key) if isinstance(data, Mapping) else None
    if _quotable(value):
        return f"{kind} {_shown(str(value))}"
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def parse_json(text: str | bytes, what: str) -> Any:
    """json.loads that fails with a GraphError, whatever is wrong with the text (``what`` names it)."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise GraphError(f"The {what} JSON is not UTF-8 text ({exc.reason} at byte {exc.start:,}). "
                             "Save the file as UTF-8.") from None
    if not isinstance(text, str):
        raise GraphError(f"The {what} must be JSON text, got {type(text).__name__}.")
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise GraphError(f"The {what} JSON is nested too deeply ({depth:,} levels; at most {MAX_JSON_DEPTH} are "
                         "allowed, and a graph needs 4). Fix the brackets.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise GraphError(f"The {what} is not valid JSON ({exc.msg}: line {exc.lineno}, column {exc.colno}). "
                         "Fix the JSON syntax.") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise GraphError(f"The {what} JSON cannot be read: {str(exc).split(';')[0]}. Shorten that value.") from None


def _require_str(data: Mapping[str, Any], key: str, where: str, *, allow_empty: bool = False) -> str:
    if not isinstance(data, Mapping):
        raise GraphError(f"{where} must be a JSON object, got {_kind(data)}.")
    if key not in data:
        raise GraphError(f"{where} is missing the field '{key}'. Add it as a string.")
    value = data[key]
    if value is None:
        raise GraphError(f"{where} field '{key}' is null. It must be a string.")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise GraphError(f"{where} field '{key}' must be a string, got {type(value).__name__}.")
    value = _bounded(value.strip(), f"{where} field '{key}'")
    if not value and not allow_empty:
        raise GraphError(f"{where} field '{key}' is empty. Give it a non-empty string.")
    return value


def _bounded(text: str, what: str) -> str:
    if len(text) > MAX_TEXT_CHARS:
        raise GraphError(f"{what} has {len(text):,} characters, more than the {MAX_TEXT_CHARS:,} allowed. "
                         "Shorten it: a value is a phrase for the image model (77 tokens at most), a description a "
                         "sentence or two.")
    return text


def _optional_str(data: Mapping[str, Any], key: str, where: str) -> str:
    """An optional string field; absent and JSON null both read as "" (VLMs often write null)."""
    if data.get(key) is None:
        return ""
    return _require_str(data, key, where, allow_empty=True)


def _require_list(data: Mapping[str, Any], key: str, where: str) -> list:
    if not isinstance(data, Mapping):
        raise GraphError(f"{where} must be a JSON object, got {type(data).__name__}.")
    value = data.get(key, [])
    if value is None:
        return []
    if not isinstance(value, list):
        raise GraphError(f"{where} field '{key}' must be a list, got {type(value).__name__}.")
    return value


@dataclass(frozen=True)
class Concept:
    """One concept of the graph: a high-level property of the scene and its current value.

    Args:
        id: unique within the graph, e.g. "c1".
        name: e.g. "hair color".
        current_value: e.g. "blond".
        description: optional.

    Raises:
        GraphError: from ``from_dict``, for a missing or non-string field.
    """

    id: str
    name: str
    current_value: str
    description: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Concept:
        where = _named("concept", data, "id")
        return cls(
            id=_require_str(data, "id", where),
            name=_require_str(data, "name", where),
            current_value=_require_str(data, "current_value", where),
            description=_optional_str(data, "description", where),
        )

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "current_value": self.current_value, "description": self.description}


@dataclass(frozen=True)
class Relationship:
    """A cause -> effect edge of the graph.

    Args:
        id: unique within the graph, e.g. "r1".
        cause_id: the cause's concept id.
        effect_id: the effect's concept id.
        description: optional.

    Raises:
        GraphError: from ``from_dict``, for a missing or non-string field.
    """

    id: str
    cause_id: str
    effect_id: str
    description: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Relationship:
        where = _named("relationship", data, "id")
        return cls(
            id=_require_str(data, "id", where),
            cause_id=_require_str(data, "cause_id", where),
            effect_id=_require_str(data, "effect_id", where),
            description=_optional_str(data, "description", where),
        )

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "cause_id": self.cause_id, "effect_id": self.effect_id, "description": self.description}


@dataclass(frozen=True)
class CausalGraph:
    """Concepts C and the DAG G over them. Construction validates; an invalid graph cannot exist.

    Build one with ``CausalGraph.from_dict`` (the extractor's JSON) or ``from_json``.

    Args:
        concepts: the concepts, ids unique.
        relationships: cause -> effect edges between them, without cycles.
        scene_summary: a caption of the scene; the default source prompt.

    Raises:
        GraphError: a duplicate id, an edge to an unknown concept, a cycle, or a size limit exceeded
            (the message names the offending item).
    """

    concepts: tuple[Concept, ...]
    relationships: tuple[Relationship, ...] = ()
    scene_summary: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "concepts", tuple(self.concepts))
        object.__setattr__(self, "relationships", tuple(self.relationships))
        self._validate()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any) -> CausalGraph:
        if not isinstance(data, Mapping):
            raise GraphError("A causal graph must be a JSON object with 'concepts' and 'relationships', "
                             f"got {type(data).__name__}.")
        concepts = [Concept.from_dict(c) for c in _require_list(data, "concepts", "the graph")]
        relationships = [Relationship.from_dict(r) for r in _require_list(data, "relationships", "the graph")]
        summary = data.get("scene_summary") or ""
        if not isinstance(summary, str):
            raise GraphError("The graph field 'scene_summary' must be a string.")
        return cls(tuple(concepts), tuple(relationships), _bounded(summary.strip(), "The graph field 'scene_summary'"))

    @classmethod
    def from_json(cls, text: str | bytes) -> CausalGraph:
        return cls.from_dict(parse_json(text, "graph"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "concepts": [c.to_dict() for c in self.concepts],
            "relationships": [r.to_dict() for r in self.relationships],
            "scene_summary": self.scene_summary,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    # -- validation ---------------------------------------------------------------------------

    def _validate(self) -> None:
        if not self.concepts:
            raise GraphError("The graph has no concepts. Extract or write at least one concept.")
        if len(self.concepts) > MAX_CONCEPTS:
            raise GraphError(f"The graph has {len(self.concepts):,} concepts, more than the {MAX_CONCEPTS} allowed. "
                             "Keep the concepts that matter to the edits (the paper uses about 20).")
        if len(self.relationships) > MAX_RELATIONSHIPS:
            raise GraphError(f"The graph has {len(self.relationships):,} relationships, more than the "
                             f"{MAX_RELATIONSHIPS} allowed. Keep the direct causes only.")
        seen: set[str] = set()
        for c in self.concepts:
            if c.id in seen:
                raise GraphError(f"Duplicate concept id {_shown(c.id)}. Give every concept a unique id (c1, c2, ...).")
            seen.add(c.id)
        names: dict[str, str] = {}
        for c in self.concepts:
            key = c.name.strip().lower()
            if key in names:
                raise GraphError(
                    f"Concepts {_shown(names[key])} and {_shown(c.id)} share the name {_shown(c.name)}. Give every "
                    "concept a distinct name so it can be named in an intervention."
                )
            names[key] = c.id
        seen_edges: set[str] = set()
        for r in self.relationships:
            if r.id in seen_edges:
                raise GraphError(f"Duplicate relationship id {_shown(r.id)}. Give every relationship a unique id "
                                 "(r1, r2, ...).")
            seen_edges.add(r.id)
            for end, cid in (("cause_id", r.cause_id), ("effect_id", r.effect_id)):
                if cid not in seen:
                    raise GraphError(
                        f"Relationship {_shown(r.id)} has {end} {_shown(cid)}, which is not a concept id. "
                        f"Known ids: {some(self.ids)}. Fix the id or remove the relationship."
                    )
            if r.cause_id == r.effect_id:
                raise GraphError(f"Relationship {_shown(r.id)} is a self-loop on {_shown(r.cause_id)}. "
                                 "A concept cannot cause itself; remove it.")
        cycle = self.find_cycle()
        if cycle:
            raise GraphError(
                f"The relationships contain a cycle: {_path(cycle)}. A causal graph must be acyclic; "
                "remove or reverse one of these edges."
            )

    def find_cycle(self) -> list[str]:
        """Ids along one directed cycle, first id repeated at the end; empty when acyclic."""
        children = self._children
        state: dict[str, int] = {}  # 1 = on the stack, 2 = finished
        for root in (c.id for c in self.concepts):
            if root in state:
                continue
            stack: list[tuple[str, Iterable[str]]] = [(root, iter(children[root]))]
            path = [root]
            state[root] = 1
            while stack:
                node, it = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    state[node] = 2
                    stack.pop()
                    path.pop()
                elif state.get(nxt) == 1:
                    return path[path.index(nxt):] + [nxt]
                elif nxt not in state:
                    state[nxt] = 1
                    stack.append((nxt, iter(children[nxt])))
                    path.append(nxt)
        return []

    # -- queries ------------------------------------------------------------------------------
    # The graph is immutable, so its indexes are computed once. Every query is linear in the size
    # of the graph (topological order: up to a log factor).

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.concepts]

    @cached_property
    def _by_id(self) -> dict[str, Concept]:
        return {c.id: c for c in self.concepts}

    def concept(self, concept_id: str) -> Concept:
        found = self._by_id.get(concept_id)
        if found is None:
            raise GraphError(f"Unknown concept id {_shown(concept_id)}. Known ids: {some(self.ids)}.")
        return found

    def find_concept(self, key: str) -> Concept:
        """A concept by id or by (case-insensitive) name, for user-typed interventions."""
        key_norm = key.strip().lower()
        for c in self.concepts:
            if c.id.lower() == key_norm or c.name.strip().lower() == key_norm:
                return c
        names = some([f"{c.id} ({c.name})" for c in self.concepts])
        raise GraphError(f"No concept has the id or name {_shown(key)}. Choose one of: {names}.")

    @cached_property
    def _children(self) -> dict[str, list[str]]:
        """Each concept's distinct children, in declaration order of the edges."""
        children: dict[str, dict[str, None]] = {c.id: {} for c in self.concepts}
        for r in self.relationships:
            if r.cause_id in children:
                children[r.cause_id][r.effect_id] = None
        return {cid: list(kids) for cid, kids in children.items()}

    def children(self, concept_id: str) -> list[str]:
        self.concept(concept_id)
        return list(self._children[concept_id])

    def parents(self, concept_id: str) -> list[str]:
        self.concept(concept_id)
        return list(dict.fromkeys(r.cause_id for r in self.relationships if r.effect_id == concept_id))

    @cached_property
    def _topological_order(self) -> tuple[str, ...]:
        """Kahn's algorithm, the ready concept declared first going next, so the result is deterministic."""
        children = self._children
        indegree = {cid: 0 for cid in self.ids}
        for kids in children.values():
            for k in kids:
                indegree[k] += 1
        position = {cid: i for i, cid in enumerate(self.ids)}
        ready = [position[cid] for cid in self.ids if indegree[cid] == 0]  # a heap of declaration positions
        order: list[str] = []
        while ready:
            node = self.concepts[heapq.heappop(ready)].id
            order.append(node)
            for k in children[node]:
                indegree[k] -= 1
                if indegree[k] == 0:
                    heapq.heappush(ready, position[k])
        return tuple(order)

    def topological_order(self) -> list[str]:
        return list(self._topological_order)

    def descendants(self, concept_id: str) -> list[str]:
        """Strict descendants De(C_i), in topological order."""
        self.concept(concept_id)
        children = self._children
        found: set[str] = set()
        frontier = [concept_id]
        while frontier:
            for k in children[frontier.pop()]:
                if k not in found:
                    found.add(k)
                    frontier.append(k)
        return [cid for cid in self._topological_order if cid in found]

    def non_descendants(self, concept_id: str) -> list[str]:
        """ND(C_i): every concept that is neither C_i nor one of its descendants."""
        excluded = set(self.descendants(concept_id)) | {concept_id}
        return [cid for cid in self.ids if cid not in excluded]


def _path(cycle: list[str]) -> str:
    """A cycle for an error message. Any of its edges may be the one to remove, so it is shown whole
    up to twice NAMED_IDS concepts; a longer one shows its first few ids and how many it passes."""
    if len(cycle) <= 2 * NAMED_IDS + 1:
        return " -> ".join(brief(cid) for cid in cycle)
    head = " -> ".join(brief(cid) for cid in cycle[:NAMED_IDS])
    return f"{head} -> ... -> {brief(cycle[-1])} ({len(cycle) - 1:,} concepts)"


@dataclass(frozen=True)
class PropagatedChange:
    """How one descendant of the target changes under the intervention.

    Args:
        concept_id: the descendant's id.
        concept_name: its name.
        original_value: its value before.
        new_value: its value after.
        reason: why it changes (the VLM's words, or where the change came from).

    Raises:
        GraphError: from ``from_dict``, for a missing or non-string field.
    """

    concept_id: str
    concept_name: str
    original_value: str
    new_value: str
    reason: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PropagatedChange:
        where = _named("propagated change", data, "concept_id")
        return cls(
            concept_id=_require_str(data, "concept_id", where),
            concept_name=_optional_str(data, "concept_name", where),
            original_value=_optional_str(data, "original_value", where),
            new_value=_require_str(data, "new_value", where),
            reason=_optional_str(data, "reason", where),
        )

    def to_dict(self) -> dict[str, str]:
        return {
            "concept_id": self.concept_id,
            "concept_name": self.concept_name,
            "original_value": self.original_value,
            "new_value": self.new_value,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class CausalViolation:
    """A change the VLM proposed that the graph forbids; kept so the user can see what was dropped."""

    concept_id: str
    new_value: str
    problem: str

    def to_dict(self) -> dict[str, str]:
        return {"concept_id": self.concept_id, "new_value": self.new_value, "problem": self.problem}


@dataclass(frozen=True)
class EditConcept:
    """One guidance term of CSG: a changed concept and the prompts that steer it."""

    concept_id: str
    concept_name: str
    prompt: str  # the new value phrase, e.g. "black hair"
    original_prompt: str  # the current value phrase, used when guiding away from the original
    is_target: bool


@dataclass(frozen=True)
class Intervention:
    """do(target = new_value) and the changes it propagates to the target's descendants.

    Build one with ``Intervention.from_dict`` (the manipulator's JSON), ``manual_intervention`` or a
    VLM stage; ``check_intervention`` enforces the graph's causal semantics on it.

    Args:
        id: the intervention's id.
        target_concept_id: the intervened concept.
        target_concept_name: its name.
        intervention_description: what the intervention does, in words.
        original_value: the target's value before.
        new_value: the target's value after.
        propagated_changes: the descendants' changes.
        final_concept_states: concept id -> the value phrase each changed concept is guided toward.
        generation_prompt: the scene with the changed values (the full-prompt baselines' target).
        violations: the changes ``check_intervention`` stripped, with their reasons.

    Raises:
        GraphError: from ``from_dict``, for a malformed field.
    """

    id: str
    target_concept_id: str
    target_concept_name: str
    intervention_description: str
    original_value: str
    new_value: str
    propagated_changes: tuple[PropagatedChange, ...] = ()
    final_concept_states: Mapping[str, str] = field(default_factory=dict, hash=False)
    generation_prompt: str = ""
    violations: tuple[CausalViolation, ...] = ()

    @classmethod
    def from_dict(cls, data: Any) -> Intervention:
        if not isinstance(data, Mapping):
            raise GraphError(f"An intervention must be a JSON object, got {type(data).__name__}.")
        where = _named("intervention", data, "id")
        states = data.get("final_concept_states") or {}
        if not isinstance(states, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in states.items()):
            raise GraphError(f"{where}: 'final_concept_states' must map concept ids to value strings.")
        violations = tuple(
            CausalViolation(_require_str(v, "concept_id", where), _require_str(v, "new_value", where, allow_empty=True),
                            _require_str(v, "problem", where))
            for v in _require_list(data, "violations", where)
        )
        return cls(
            id=_require_str(data, "id", where),
            target_concept_id=_require_str(data, "target_concept_id", where),
            target_concept_name=_optional_str(data, "target_concept_name", where),
            intervention_description=(
                _optional_str(data, "intervention_description", where)
            ),
            original_value=_optional_str(data, "original_value", where),
            new_value=_require_str(data, "new_value", where),
            propagated_changes=tuple(PropagatedChange.from_dict(p)
                                     for p in _require_list(data, "propagated_changes", where)),
            final_concept_states={_bounded(k.strip(), f"{where}: a final_concept_states key"):
                                  _bounded(v.strip(), f"{where}: final_concept_states[{_shown(k.strip())}]")
                                  for k, v in states.items()},
            generation_prompt=_optional_str(data, "generation_prompt", where),
            violations=violations,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Intervention:
        return cls.from_dict(parse_json(text, "intervention"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "target_concept_id": self.target_concept_id,
            "target_concept_name": self.target_concept_name,
            "intervention_description": self.intervention_description,
            "original_value": self.original_value,
            "new_value": self.new_value,
            "propagated_changes": [p.to_dict() for p in self.propagated_changes],
            "final_concept_states": dict(self.final_concept_states),
            "generation_prompt": self.generation_prompt,
        }
        if self.violations:
            out["violations"] = [v.to_dict() for v in self.violations]
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def edit_concepts(self, graph: CausalGraph) -> list[EditConcept]:
        """The set E that CSG guides: the target, then each changed descendant in causal order.

        The prompt of each term is the value phrase from ``final_concept_states`` when the VLM
        wrote one ("black hair"), else the bare new value. When nothing downstream changes this is
        the target alone, which is the paper's fallback.
        """
        order = {cid: i for i, cid in enumerate(graph.topological_order())}
        target = graph.concept(self.target_concept_id)
        terms = [EditConcept(target.id, target.name, self.final_concept_states.get(target.id, self.new_value),
                             target.current_value, True)]
        for change in sorted(self.propagated_changes, key=lambda p: order.get(p.concept_id, len(order))):
            concept = graph.concept(change.concept_id)
            terms.append(EditConcept(concept.id, concept.name,
                                     self.final_concept_states.get(concept.id, change.new_value),
                                     change.original_value or concept.current_value, False))
        return terms


def no_change(concept: Concept, new_value: str) -> str | None:
    """Why do(C_i = new_value) changes nothing, or None when it changes C_i.

    The one rule for every path to an intervention (VLM proposals and propagation, --do, hand-written
    JSON): the new value must differ from the current one, ignoring case and surrounding spaces. An
    intervention that changes nothing would edit with whatever value phrase is left over.
    """
    if new_value.strip().lower() != concept.current_value.strip().lower():
        return None
    return (f"{concept.id} ({brief(concept.name)}) already is {_shown(concept.current_value)}, so this changes "
            "nothing. Choose a different value.")


def _target(graph: CausalGraph, intervention: Intervention) -> Concept:
    """The concept an intervention sets, by id or else by name; a GraphError when it is not in the graph."""
    try:
        return graph.concept(intervention.target_concept_id)
    except GraphError:
        try:
            return graph.find_concept(intervention.target_concept_id)
        except GraphError:
            raise GraphError(
                f"Intervention {_shown(intervention.id)} targets {_shown(intervention.target_concept_id)}, "
                f"which is not in the graph. Choose one of: {some([f'{c.id} ({c.name})' for c in graph.concepts])}."
            ) from None


def check_intervention(graph: CausalGraph, intervention: Intervention) -> Intervention:
    """Enforce the causal semantics of do(C_i = c') on whatever the VLM proposed.

    A change to a non-descendant of the target, to the target itself, to an unknown concept, or a
    duplicate change, is stripped and recorded in ``violations``. A descendant whose new value is
    given only in ``final_concept_states`` becomes a propagated change (reason ``FROM_FINAL_STATES``);
    a final state of any other concept is stripped and recorded. ``final_concept_states`` keeps only
    the target and the changes. Linear in the size of the intervention.

    Args:
        graph: the causal graph the intervention acts on.
        intervention: the intervention as proposed or written.

    Returns:
        The checked intervention.

    Raises:
        GraphError: the target itself is unusable: not in the graph, or set to the value it already
            has (``no_change``).
    """
    target = _target(graph, intervention)
    unchanged = no_change(target, intervention.new_value)
    if unchanged:
        raise GraphError(f"Intervention {_shown(intervention.id)}: {unchanged}")
    descendants = set(graph.descendants(target.id))
    kept: dict[str, PropagatedChange] = {}
    violations = list(intervention.violations)
    for change in intervention.propagated_changes:
        cid = change.concept_id
        if cid not in graph._by_id:
            problem = f"{_shown(cid)} is not a concept in the graph"
        elif cid == target.id:
            problem = "the target's own value is set by the intervention, not propagated"
        elif cid not in descendants:
            problem = (f"{_shown(cid)} ({brief(graph.concept(cid).name)}) is not a descendant of the target "
                       f"{_shown(target.id)}, so it must keep its value")
        elif cid in kept:
            problem = f"{_shown(cid)} was changed twice; the first change is kept"
        else:
            concept = graph.concept(cid)
            kept[cid] = replace(change, concept_name=change.concept_name or concept.name,
                                original_value=change.original_value or concept.current_value)
            continue
        violations.append(CausalViolation(cid, change.new_value, problem))
    flagged = {v.concept_id for v in violations}
    states = {}
    for cid, value in intervention.final_concept_states.items():
        if cid in descendants and cid not in kept and no_change(graph.concept(cid), value) is None:
            concept = graph.concept(cid)  # a descendant's change the VLM wrote in one place only
            kept[cid] = PropagatedChange(cid, concept.name, concept.current_value, value, FROM_FINAL_STATES)
        if cid == target.id or cid in kept:
            states[cid] = value
        elif cid not in flagged:
            violations.append(CausalViolation(cid, value,
                                              f"final state for {_shown(cid)}, which the intervention does not change"))
            flagged.add(cid)
    return replace(
        intervention,
        target_concept_id=target.id,
        target_concept_name=intervention.target_concept_name or target.name,
        original_value=intervention.original_value or target.current_value,
        propagated_changes=tuple(kept.values()),
        final_concept_states=states,
        violations=tuple(violations),
    )


# -- the hand-written files (--graph-json, --intervention-json, a dataset's graph column) ---------------


def read_graph(path: str | Path) -> CausalGraph:
    """The causal graph in a hand-written graph file (``--graph-json``, a dataset's graph column)."""
    try:
        return CausalGraph.from_dict(read_json(path, "graph file"))
    except GraphError as exc:
        raise InputError(f"The graph file {path}: {exc}") from exc


def read_interventions(path: str | Path) -> list[Intervention]:
    """The interventions in a hand-written intervention file: one intervention object, or the proposal
    stage's ``{"interventions": [...]}``."""
    data = read_json(path, "intervention file")
    try:
        if isinstance(data, dict) and "interventions" in data:
            items = data["interventions"]
            if not isinstance(items, list) or not items:
                raise InputError(f'In the intervention file {path}, "interventions" must be a non-empty list of '
                                 "intervention objects.")
            return [Intervention.from_dict(item) for item in items]
        if isinstance(data, dict):
            return [Intervention.from_dict(data)]
    except GraphError as exc:
        raise InputError(f"The intervention file {path}: {exc}") from exc
    raise InputError(f"The intervention file {path} holds a JSON {type(data).__name__}; expected one intervention "
                     '({"id": ..., "target_concept_id": ..., "new_value": ...}) or {"interventions": [...]} '
                     "(see csg/examples/portrait_intervention.json).")
