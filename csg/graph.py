"""The semantic causal model: concepts, the DAG between them, and interventions on it.

Field names follow the JSON schemas of the paper's extractor and manipulator prompts, so a VLM
answer round-trips through ``from_dict``/``to_dict`` unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from .errors import GraphError


def _require_str(data: Mapping[str, Any], key: str, where: str, *, allow_empty: bool = False) -> str:
    if not isinstance(data, Mapping):
        raise GraphError(f"{where} must be a JSON object, got {type(data).__name__}: {data!r:.200}")
    if key not in data:
        raise GraphError(f"{where} is missing the field '{key}'. Add it as a string.")
    value = data[key]
    if value is None:
        raise GraphError(f"{where} field '{key}' is null. It must be a string.")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise GraphError(f"{where} field '{key}' must be a string, got {type(value).__name__}.")
    value = value.strip()
    if not value and not allow_empty:
        raise GraphError(f"{where} field '{key}' is empty. Give it a non-empty string.")
    return value


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
    id: str
    name: str
    current_value: str
    description: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Concept":
        where = f"concept {data.get('id', '?')!r}" if isinstance(data, Mapping) else "a concept"
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
    id: str
    cause_id: str
    effect_id: str
    description: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Relationship":
        where = f"relationship {data.get('id', '?')!r}" if isinstance(data, Mapping) else "a relationship"
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
    """Concepts C and the DAG G over them. Construction validates; an invalid graph cannot exist."""

    concepts: tuple[Concept, ...]
    relationships: tuple[Relationship, ...] = ()
    scene_summary: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "concepts", tuple(self.concepts))
        object.__setattr__(self, "relationships", tuple(self.relationships))
        self._validate()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any) -> "CausalGraph":
        if not isinstance(data, Mapping):
            raise GraphError(f"A causal graph must be a JSON object with 'concepts' and 'relationships', got {type(data).__name__}.")
        concepts = [Concept.from_dict(c) for c in _require_list(data, "concepts", "the graph")]
        relationships = [Relationship.from_dict(r) for r in _require_list(data, "relationships", "the graph")]
        summary = data.get("scene_summary") or ""
        if not isinstance(summary, str):
            raise GraphError("The graph field 'scene_summary' must be a string.")
        return cls(tuple(concepts), tuple(relationships), summary.strip())

    @classmethod
    def from_json(cls, text: str) -> "CausalGraph":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GraphError(f"The graph is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}). Fix the JSON syntax.") from None
        return cls.from_dict(data)

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
        seen: set[str] = set()
        for c in self.concepts:
            if c.id in seen:
                raise GraphError(f"Duplicate concept id '{c.id}'. Give every concept a unique id (c1, c2, ...).")
            seen.add(c.id)
        names: dict[str, str] = {}
        for c in self.concepts:
            key = c.name.strip().lower()
            if key in names:
                raise GraphError(
                    f"Concepts '{names[key]}' and '{c.id}' share the name '{c.name}'. Give every concept a distinct name "
                    "so it can be named in an intervention."
                )
            names[key] = c.id
        seen_edges: set[str] = set()
        for r in self.relationships:
            if r.id in seen_edges:
                raise GraphError(f"Duplicate relationship id '{r.id}'. Give every relationship a unique id (r1, r2, ...).")
            seen_edges.add(r.id)
            for end, cid in (("cause_id", r.cause_id), ("effect_id", r.effect_id)):
                if cid not in seen:
                    raise GraphError(
                        f"Relationship '{r.id}' has {end} '{cid}', which is not a concept id. "
                        f"Known ids: {', '.join(sorted(seen))}. Fix the id or remove the relationship."
                    )
            if r.cause_id == r.effect_id:
                raise GraphError(f"Relationship '{r.id}' is a self-loop on '{r.cause_id}'. A concept cannot cause itself; remove it.")
        cycle = self.find_cycle()
        if cycle:
            raise GraphError(
                f"The relationships contain a cycle: {' -> '.join(cycle)}. A causal graph must be acyclic; "
                "remove or reverse one of these edges."
            )

    def find_cycle(self) -> list[str]:
        """Ids along one directed cycle, first id repeated at the end; empty when acyclic."""
        children = self._children_map()
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

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.concepts]

    def concept(self, concept_id: str) -> Concept:
        for c in self.concepts:
            if c.id == concept_id:
                return c
        raise GraphError(f"Unknown concept id '{concept_id}'. Known ids: {', '.join(self.ids)}.")

    def find_concept(self, key: str) -> Concept:
        """A concept by id or by (case-insensitive) name, for user-typed interventions."""
        key_norm = key.strip().lower()
        for c in self.concepts:
            if c.id.lower() == key_norm or c.name.strip().lower() == key_norm:
                return c
        names = ", ".join(f"{c.id} ({c.name})" for c in self.concepts)
        raise GraphError(f"No concept has the id or name '{key}'. Choose one of: {names}.")

    def _children_map(self) -> dict[str, list[str]]:
        children: dict[str, list[str]] = {c.id: [] for c in self.concepts}
        for r in self.relationships:
            if r.cause_id in children and r.effect_id not in children[r.cause_id]:
                children[r.cause_id].append(r.effect_id)
        return children

    def children(self, concept_id: str) -> list[str]:
        self.concept(concept_id)
        return list(self._children_map()[concept_id])

    def parents(self, concept_id: str) -> list[str]:
        self.concept(concept_id)
        return list(dict.fromkeys(r.cause_id for r in self.relationships if r.effect_id == concept_id))

    def topological_order(self) -> list[str]:
        """Kahn's algorithm, ties broken by declaration order so the result is deterministic."""
        children = self._children_map()
        indegree = {cid: 0 for cid in self.ids}
        for kids in children.values():
            for k in kids:
                indegree[k] += 1
        position = {cid: i for i, cid in enumerate(self.ids)}
        ready = [cid for cid in self.ids if indegree[cid] == 0]
        order: list[str] = []
        while ready:
            node = ready.pop(0)
            order.append(node)
            for k in children[node]:
                indegree[k] -= 1
                if indegree[k] == 0:
                    ready.append(k)
            ready.sort(key=position.__getitem__)
        return order

    def descendants(self, concept_id: str) -> list[str]:
        """Strict descendants De(C_i), in topological order."""
        self.concept(concept_id)
        children = self._children_map()
        found: set[str] = set()
        frontier = [concept_id]
        while frontier:
            for k in children[frontier.pop()]:
                if k not in found:
                    found.add(k)
                    frontier.append(k)
        return [cid for cid in self.topological_order() if cid in found]

    def non_descendants(self, concept_id: str) -> list[str]:
        """ND(C_i): every concept that is neither C_i nor one of its descendants."""
        excluded = set(self.descendants(concept_id)) | {concept_id}
        return [cid for cid in self.ids if cid not in excluded]


@dataclass(frozen=True)
class PropagatedChange:
    concept_id: str
    concept_name: str
    original_value: str
    new_value: str
    reason: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PropagatedChange":
        where = f"propagated change {data.get('concept_id', '?')!r}" if isinstance(data, Mapping) else "a propagated change"
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
    def from_dict(cls, data: Any) -> "Intervention":
        if not isinstance(data, Mapping):
            raise GraphError(f"An intervention must be a JSON object, got {type(data).__name__}.")
        where = f"intervention {data.get('id', '?')!r}"
        states = data.get("final_concept_states") or {}
        if not isinstance(states, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in states.items()):
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
            propagated_changes=tuple(PropagatedChange.from_dict(p) for p in _require_list(data, "propagated_changes", where)),
            final_concept_states={k.strip(): v.strip() for k, v in states.items()},
            generation_prompt=_optional_str(data, "generation_prompt", where),
            violations=violations,
        )

    @classmethod
    def from_json(cls, text: str) -> "Intervention":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GraphError(f"The intervention is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}). Fix the JSON syntax.") from None
        return cls.from_dict(data)

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
            terms.append(EditConcept(concept.id, concept.name, self.final_concept_states.get(concept.id, change.new_value),
                                     change.original_value or concept.current_value, False))
        return terms


def check_intervention(graph: CausalGraph, intervention: Intervention) -> Intervention:
    """Enforce the causal semantics of do(C_i = c') on whatever the VLM proposed.

    A change to a non-descendant of the target, to the target itself, to an unknown concept, or a
    duplicate change, is stripped and recorded in ``violations``. ``final_concept_states`` keeps
    only the target and the surviving changes. Raises only when the target itself is unusable.
    """
    try:
        target = graph.concept(intervention.target_concept_id)
    except GraphError:
        try:
            target = graph.find_concept(intervention.target_concept_id)
        except GraphError:
            raise GraphError(
                f"Intervention '{intervention.id}' targets '{intervention.target_concept_id}', which is not in the graph. "
                f"Choose one of: {', '.join(f'{c.id} ({c.name})' for c in graph.concepts)}."
            ) from None
    descendants = set(graph.descendants(target.id))
    kept: list[PropagatedChange] = []
    violations = list(intervention.violations)
    for change in intervention.propagated_changes:
        cid = change.concept_id
        if cid not in graph.ids:
            problem = f"'{cid}' is not a concept in the graph"
        elif cid == target.id:
            problem = "the target's own value is set by the intervention, not propagated"
        elif cid not in descendants:
            problem = f"'{cid}' ({graph.concept(cid).name}) is not a descendant of the target '{target.id}', so it must keep its value"
        elif any(k.concept_id == cid for k in kept):
            problem = f"'{cid}' was changed twice; the first change is kept"
        else:
            kept.append(replace(change, concept_name=change.concept_name or graph.concept(cid).name,
                                original_value=change.original_value or graph.concept(cid).current_value))
            continue
        violations.append(CausalViolation(cid, change.new_value, problem))
    allowed = {target.id} | {k.concept_id for k in kept}
    states = {}
    for cid, value in intervention.final_concept_states.items():
        if cid in allowed:
            states[cid] = value
        elif not any(v.concept_id == cid for v in violations):
            violations.append(CausalViolation(cid, value, f"final state for '{cid}', which the intervention does not change"))
    return replace(
        intervention,
        target_concept_id=target.id,
        target_concept_name=intervention.target_concept_name or target.name,
        original_value=intervention.original_value or target.current_value,
        propagated_changes=tuple(kept),
        final_concept_states=states,
        violations=tuple(violations),
    )
