"""JSON extraction from model text, and the validators behind it, including property-based fuzzing:
whatever the input, only our own typed errors (CSGError subclasses) may come out."""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csg.errors import CSGError
from csg.graph import CausalGraph, Intervention, check_intervention
from csg.vlm import VLMOutputError, extract_json
from csg.vlm.extractor import parse_description, parse_graph
from csg.vlm.judge import parse_judgement
from csg.vlm.manipulator import parse_proposals, parse_propagation

# CSG_FUZZ_EXAMPLES=5000 runs a deeper search than the quick default.
FUZZ = settings(max_examples=int(os.environ.get("CSG_FUZZ_EXAMPLES", 200)), deadline=None, suppress_health_check=[HealthCheck.too_slow])

OBJ = {"concepts": [{"id": "c1", "name": "hair {color}", "current_value": "brown \"dark\""}], "n": [1, 2.5, None, True]}
TEXT = json.dumps(OBJ)


@pytest.mark.parametrize("answer", [
    TEXT,
    f"```json\n{TEXT}\n```",
    f"```\n{TEXT}\n```",
    f"Sure! Here is the graph:\n```json\n{TEXT}\n```\nLet me know if you need more.",
    f"Here you go: {TEXT} Hope this helps.",
    f"<think>The user wants JSON like {{\"a\": 1}}. Let me think.</think>\n{TEXT}",
    f"I should list the concepts {{maybe}}... </think>\n\n{TEXT}",  # opening tag was in the prompt
    f"<THINK>draft {{\"concepts\": []}}</THINK>{TEXT}",
    f"Note [1]: braces {{ in prose }} come first. {TEXT}",
    '{"concepts": [{"id": "c1", "name": "hair {color}", "current_value": "brown \\"dark\\"",},], "n": [1, 2.5, null, true,],}',
    "{\n" + TEXT[1:-1].replace(", ", ",\n  ") + ",\n}",
])
def test_finds_the_object(answer):
    assert extract_json(answer) == OBJ


def test_raw_newlines_inside_strings_are_tolerated():
    assert extract_json('{"a": "line one\nline two"}') == {"a": "line one\nline two"}


def test_a_top_level_array_and_the_first_of_two_objects():
    assert extract_json('[{"id": 1}, {"id": 2}]') == [{"id": 1}, {"id": 2}]
    assert extract_json('{"first": 1} and {"second": 2}') == {"first": 1}


def test_a_draft_inside_the_reasoning_is_not_the_answer_but_tags_inside_strings_are_data():
    assert extract_json('<think>maybe {"draft": 1}</think> final: {"real": 2}') == {"real": 2}
    assert extract_json('{"</think>": {"inner": 1}}') == {"</think>": {"inner": 1}}
    assert extract_json('{"note": "<think> is a tag"}') == {"note": "<think> is a tag"}


def test_commas_inside_strings_are_kept():
    assert extract_json('{"a": "x, ]", "b": [1,],}') == {"a": "x, ]", "b": [1]}


@pytest.mark.parametrize("answer, fragment", [
    ("no json here", "no valid JSON"),
    ("", "no valid JSON"),
    ('{"a": 1', "cut off, probably by the token limit"),
    ("<think>I will write {\"a\": 1} once I am done thinking and", "only reasoning"),
    ("```json\n{'single': 'quotes'}\n```", "no valid JSON"),
])
def test_failures_are_typed_and_quote_the_answer(answer, fragment):
    with pytest.raises(VLMOutputError, match=fragment) as caught:
        extract_json(answer)
    assert caught.value.output == answer
    assert repr(answer[:20])[1:-1] in str(caught.value)


def test_long_answers_are_quoted_truncated():
    answer = "x" * 5000
    with pytest.raises(VLMOutputError) as caught:
        extract_json(answer)
    assert len(str(caught.value)) < 1000 and "characters left out" in str(caught.value)


# -- property-based ----------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=20)
json_objects = st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=5)
prose = st.text(alphabet=st.characters(exclude_characters="{}[]`<>", exclude_categories=("Cs",)), max_size=40)


@FUZZ
@given(st.text(max_size=300))
def test_fuzz_arbitrary_text_raises_only_typed_errors(text):
    try:
        extract_json(text)
    except VLMOutputError:
        pass


@FUZZ
@given(st.text(alphabet='{}[]",:\\ \nabc01tnrue<>/think`', max_size=200))
def test_fuzz_bracket_soup_raises_only_typed_errors(text):
    try:
        extract_json(text)
    except VLMOutputError:
        pass


@FUZZ
@given(json_objects, prose, prose, st.sampled_from(["plain", "fence", "think", "indent"]), st.text(max_size=40))
def test_fuzz_embedded_objects_come_back_unchanged(obj, before, after, wrapping, thought):
    body = json.dumps(obj, indent=2 if wrapping == "indent" else None, ensure_ascii=False)
    if wrapping == "fence":
        body = f"```json\n{body}\n```"
    elif wrapping == "think":
        body = f"<think>{thought.replace('<', '')}</think>{body}"
    assert extract_json(f"{before} {body} {after}") == obj


# The graph validator on arbitrary JSON-like data, and on data shaped almost like a graph.
field_values = json_scalars | st.lists(json_scalars, max_size=2) | st.dictionaries(st.text(max_size=4), json_scalars, max_size=2)
ids = st.sampled_from(["c1", "c2", "c3", "r1", "", " ", "C1", "c1 "]) | field_values
concept_like = st.fixed_dictionaries({}, optional={"id": ids, "name": st.sampled_from(["age", "Age", "hair"]) | field_values,
                                                   "current_value": field_values, "description": field_values})
relationship_like = st.fixed_dictionaries({}, optional={"id": ids, "cause_id": ids, "effect_id": ids, "description": field_values})
graph_like = st.fixed_dictionaries({}, optional={
    "concepts": st.lists(concept_like | field_values, max_size=4) | field_values,
    "relationships": st.lists(relationship_like | field_values, max_size=4) | field_values,
    "scene_summary": field_values,
})


@FUZZ
@given(json_values | graph_like)
def test_fuzz_graph_validator_raises_only_typed_errors(data):
    try:
        graph = CausalGraph.from_dict(data)
    except CSGError:
        return
    assert CausalGraph.from_dict(graph.to_dict()) == graph  # what validates also round-trips


GRAPH = CausalGraph.from_dict({
    "concepts": [{"id": "c1", "name": "age", "current_value": "young"},
                 {"id": "c2", "name": "hair color", "current_value": "brown"},
                 {"id": "c3", "name": "background", "current_value": "park"}],
    "relationships": [{"id": "r1", "cause_id": "c1", "effect_id": "c2"}],
    "scene_summary": "a person in a park",
})
change_like = st.fixed_dictionaries({}, optional={"concept_id": ids, "concept_name": field_values,
                                                  "original_value": field_values, "new_value": field_values, "reason": field_values})
intervention_like = st.fixed_dictionaries({}, optional={
    "id": ids, "target_concept_id": ids | st.sampled_from(["age", "hair color"]), "target_concept_name": field_values,
    "new_value": field_values, "original_value": field_values, "intervention_description": field_values,
    "propagated_changes": st.lists(change_like | field_values, max_size=3) | field_values,
    "final_concept_states": st.dictionaries(ids.filter(lambda x: isinstance(x, str)), field_values, max_size=3) | field_values,
    "generation_prompt": field_values, "violations": st.lists(field_values, max_size=2) | field_values,
})


@FUZZ
@given(json_values | intervention_like)
def test_fuzz_intervention_and_check_raise_only_typed_errors(data):
    try:
        checked = check_intervention(GRAPH, Intervention.from_dict(data))
    except CSGError:
        return
    descendants = set(GRAPH.descendants(checked.target_concept_id))
    assert all(p.concept_id in descendants for p in checked.propagated_changes)


@FUZZ
@given(json_values | graph_like | intervention_like | st.fixed_dictionaries({"interventions": st.lists(intervention_like, max_size=4)}))
def test_fuzz_stage_validators_raise_only_typed_errors(data):
    answer = json.dumps(data)
    for parse in (parse_description, parse_graph, lambda a: parse_proposals(GRAPH, a),
                  lambda a: parse_propagation(GRAPH, GRAPH.concept("c1"), "old", a),
                  lambda a: parse_judgement("i1", [("age", "old age")], a)):
        try:
            parse(answer)
        except CSGError:
            pass
