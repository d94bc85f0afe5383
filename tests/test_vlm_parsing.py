"""JSON extraction from model text, and the validators behind it, including property-based fuzzing:
whatever the input, only our own typed errors (CSGError subclasses) may come out."""

import json
import os
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from csg.errors import CSGError
from csg.graph import CausalGraph, Intervention, check_intervention
from csg.vlm import VLMOutputError, extract_json
from csg.vlm.extractor import parse_description, parse_graph
from csg.vlm.judge import parse_judgement
from csg.vlm.manipulator import parse_propagation, parse_proposals
from csg.vlm.parsing import MAX_JSON_DEPTH, MAX_REPLY_CHARS, extract_json_object

# CSG_FUZZ_EXAMPLES=5000 runs a deeper search than the quick default.
FUZZ = settings(max_examples=int(os.environ.get("CSG_FUZZ_EXAMPLES", 200)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

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
    '{"concepts": [{"id": "c1", "name": "hair {color}", "current_value": "brown \\"dark\\"",},], '
    '"n": [1, 2.5, null, true,],}',
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


# -- broken JSON is diagnosed, not mined for fragments --------------------------------------------------

@pytest.mark.parametrize("answer", [
    TEXT[:-1],
    TEXT[:len(TEXT) // 2],
    f"```json\n{TEXT[:40]}",
    f"<think>a draft {{\"concepts\": [</think>\n{TEXT[:60]}",
])
def test_an_answer_cut_off_by_the_token_limit_says_so(answer):
    with pytest.raises(VLMOutputError, match="cut off, probably by the token limit. Raise max_tokens"):
        extract_json(answer)


@pytest.mark.parametrize("answer", [
    '{\n  // the concepts\n  "concepts": [{"id": "c1"}]\n}',
    '{"concepts": [{"id": "c1"} /* the only one */]}',
    '```json\n{"a": 1, // why\n "b": [{"c": 2}]}\n```',
])
def test_comments_are_named_as_the_problem(answer):
    with pytest.raises(VLMOutputError, match=r"comments \(// or /\* \*/\), and JSON allows none"):
        extract_json(answer)


def test_a_broken_answer_in_a_code_fence_is_reported_not_replaced_by_json_from_the_prose():
    with pytest.raises(VLMOutputError, match="does not parse: Expecting ':' delimiter"):
        extract_json('For example {"a": 1}. The answer:\n```json\n{"concepts" [{"id": "c1"}]}\n```')


def test_slashes_inside_strings_are_data():
    assert extract_json('{"url": "http://x/*y*/", "a": [{"b": 1}]}') == {"url": "http://x/*y*/", "a": [{"b": 1}]}


def test_a_syntax_error_is_quoted_instead_of_a_fragment():
    with pytest.raises(VLMOutputError, match="does not parse: Expecting ',' delimiter at line 1, column 28"):
        extract_json('{"concepts": [{"id": "c1"} {"id": "c2"}]}')


@pytest.mark.parametrize("answer, depth", [
    ("[" * 100_000 + "]" * 100_000, "100,000"),
    ("[" * 100_000, "100,000"),
    ('{"a": ' * 50 + "1" + "}" * 50, "50"),
], ids=["closed", "open", "objects"])
def test_deeply_nested_json_is_a_typed_error(answer, depth):
    with pytest.raises(VLMOutputError, match=f"nested {depth} levels deep, more than the {MAX_JSON_DEPTH} allowed"):
        extract_json(answer)


@pytest.mark.parametrize("noise", [
    "<think>" + "[" * 1000 + "</think>",
    "<think>" + '{"' * 1000 + "</think>",  # the reasoning leaves a quote open
    "[1] " * 1000,
    "[" * 1000 + "\n",
], ids=["brackets in reasoning", "open quote in reasoning", "footnotes", "open brackets"])
def test_a_valid_answer_after_a_thousand_brackets_is_found(noise):
    assert extract_json(noise + TEXT) == OBJ


def test_an_answer_over_the_size_limit_is_refused_unread():
    with pytest.raises(VLMOutputError, match=f"{MAX_REPLY_CHARS + 1:,} characters, more than the {MAX_REPLY_CHARS:,}"):
        extract_json(TEXT + " " * (MAX_REPLY_CHARS + 1 - len(TEXT)))
    assert extract_json(TEXT + " " * (MAX_REPLY_CHARS - len(TEXT))) == OBJ


GRAPH_TEXT = json.dumps({
    "concepts": [{"id": "c1", "name": "age", "current_value": "young"},
                 {"id": "c2", "name": "hair", "current_value": "brown"}],
    "relationships": [{"id": "r1", "cause_id": "c1", "effect_id": "c2"}],
}, indent=2)


@pytest.mark.parametrize("answer, fragment", [
    (GRAPH_TEXT[:-30], "cut off"),  # used to be "The graph has no concepts" (a concept object was taken)
    (GRAPH_TEXT.replace('"concepts": [', '"concepts": [ // people first\n'),
     "comments"),  # used to be "got a JSON list"
])
def test_the_stages_pass_the_diagnosis_on(answer, fragment):
    for parse in (parse_graph, parse_description, lambda a: parse_proposals(GRAPH, a),
                  lambda a: parse_judgement("i1", [("age", "old age")], a)):
        with pytest.raises(VLMOutputError, match=fragment):
            parse(answer)


# -- property-based ----------------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-10**12, 10**12)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: (st.lists(inner, max_size=4)
                                                        | st.dictionaries(st.text(max_size=8), inner, max_size=4)),
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


@FUZZ
@given(json_objects, st.data())
def test_fuzz_a_cut_off_object_is_reported_as_cut_off_never_as_a_fragment(obj, data):
    text = json.dumps(obj, indent=data.draw(st.sampled_from([None, 2])))
    assume("</think>" not in text.lower())  # a stray one ends the reasoning; what comes before is a draft
    cut = data.draw(st.integers(2, len(text) - 1))
    with pytest.raises(VLMOutputError, match="cut off, probably by the token limit"):
        extract_json(text[:cut])


@FUZZ
@given(json_objects, st.sampled_from(["// a note\n", "/* a note */"]))
def test_fuzz_a_comment_in_an_object_is_reported_as_a_comment(obj, comment):
    with pytest.raises(VLMOutputError, match="JSON allows none"):
        extract_json("{" + comment + json.dumps(obj)[1:])


# The graph validator on arbitrary JSON-like data, and on data shaped almost like a graph.
field_values = (json_scalars | st.lists(json_scalars, max_size=2)
                | st.dictionaries(st.text(max_size=4), json_scalars, max_size=2))
ids = st.sampled_from(["c1", "c2", "c3", "r1", "", " ", "C1", "c1 "]) | field_values
concept_like = st.fixed_dictionaries({}, optional={"id": ids,
                                                   "name": st.sampled_from(["age", "Age", "hair"]) | field_values,
                                                   "current_value": field_values, "description": field_values})
relationship_like = st.fixed_dictionaries({}, optional={"id": ids, "cause_id": ids, "effect_id": ids,
                                                        "description": field_values})
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
                                                  "original_value": field_values, "new_value": field_values,
                                                  "reason": field_values})
intervention_like = st.fixed_dictionaries({}, optional={
    "id": ids, "target_concept_id": ids | st.sampled_from(["age", "hair color"]), "target_concept_name": field_values,
    "new_value": field_values, "original_value": field_values, "intervention_description": field_values,
    "propagated_changes": st.lists(change_like | field_values, max_size=3) | field_values,
    "final_concept_states": (st.dictionaries(ids.filter(lambda x: isinstance(x, str)), field_values, max_size=3)
                             | field_values),
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
@given(json_values | graph_like | intervention_like
       | st.fixed_dictionaries({"interventions": st.lists(intervention_like, max_size=4)}))
def test_fuzz_stage_validators_raise_only_typed_errors(data):
    answer = json.dumps(data)
    for parse in (parse_description, parse_graph, lambda a: parse_proposals(GRAPH, a),
                  lambda a: parse_propagation(GRAPH, GRAPH.concept("c1"), "old", a),
                  lambda a: parse_judgement("i1", [("age", "old age")], a)):
        try:
            parse(answer)
        except CSGError:
            pass


# -- hostile input at the boundary: only typed errors, in time linear in the input ---------------------

CHUNKS = st.sampled_from(["{", "[", "]", "}", '"', "\\", '\\"', "<think>", "</think>", "```", "//", "/*", ",", ":",
                          '{"a": ', "[{", "1", " ", "\n", "é", "\ud800"])
repeated = st.lists(st.tuples(CHUNKS, st.integers(1, 3000)), max_size=5).map(
    lambda parts: "".join(c * k for c, k in parts))
hostile_text = st.text(max_size=300) | repeated | st.binary(max_size=300).map(lambda b: b.decode("utf-8", "replace"))


def readers():
    """Every entry point that text from outside reaches, by name."""
    return {
        "extract_json": extract_json,
        "extract_json_object": extract_json_object,
        "parse_description": parse_description,
        "parse_graph": parse_graph,
        "parse_proposals": lambda text: parse_proposals(GRAPH, text),
        "parse_propagation": lambda text: parse_propagation(GRAPH, GRAPH.concept("c1"), "old", text),
        "parse_judgement": lambda text: parse_judgement("i1", [("age", "old age")], text),
        "CausalGraph.from_json": CausalGraph.from_json,
        "check_intervention": lambda text: check_intervention(GRAPH, Intervention.from_json(text)),
    }


@FUZZ
@given(hostile_text | st.binary(max_size=300))
def test_fuzz_every_reader_raises_only_typed_errors(text):
    for read in readers().values():
        try:
            read(text)
        except CSGError:
            pass


def changes(n):
    """An intervention answer of about n characters whose propagated changes all name one concept."""
    change = json.dumps({"concept_id": "c2", "new_value": "grey", "reason": "age"})
    item = {"id": "i1", "target_concept_id": "c1", "new_value": "old", "propagated_changes": "@"}
    frame = json.dumps({"interventions": [item]})
    count = (n - len(frame)) // (len(change) + 2)
    return frame.replace('"@"', "[" + ", ".join([change] * count) + "]")


HOSTILE = {  # answers of about n characters made to be slow to read
    "open braces": lambda n: "{" * n,
    "open brackets": lambda n: "[" * n,
    "deep nesting": lambda n: "[" * (n // 2) + "]" * (n // 2),
    "brace pairs": lambda n: "{x}" * (n // 3),
    "quoted braces": lambda n: '{"' * (n // 2),
    "quotes": lambda n: '"' * n,
    "escapes": lambda n: '{"a": "' + '\\"' * ((n - 7) // 2),
    "backslashes": lambda n: "{" + "\\" * (n - 1),
    "think tags": lambda n: "<think>{</think>" * ((n - 8) // 16) + '{"a": 1}',
    "open think tags": lambda n: "</think><think>[" * (n // 16),
    "nested objects": lambda n: ('{"a": [' * 30 + "x" + "]}" * 30) * (n // 271),
    "comments": lambda n: "{" + "// c\n" * ((n - 2) // 5) + "}",
    "fences": lambda n: "```json\n{" * (n // 9),
    "many changes": changes,
}


def seconds(read, text):
    start = time.perf_counter()
    try:
        read(text)
    except CSGError:
        pass
    return time.perf_counter() - start


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_reading_a_hostile_answer_takes_linear_time(kind):
    """Up to the size limit the time grows with the length (10 times the text, at most 15 times the
    time, plus slack for a busy machine) and stays in seconds (100 kB of "{" took 8 s with a bracket
    budget); past the limit the answer is refused unread."""
    make = HOSTILE[kind]
    small, large = make(MAX_REPLY_CHARS // 10), make(MAX_REPLY_CHARS)
    assert MAX_REPLY_CHARS * 0.9 < len(large) <= MAX_REPLY_CHARS
    for name in (["extract_json", "parse_graph", "parse_proposals"] if kind == "many changes" else ["extract_json"]):
        read = readers()[name]
        fast, slow = min(seconds(read, small) for _ in range(2)), seconds(read, large)
        assert slow <= 15 * fast + 1.0 and slow < 5.0, (name, fast, slow)
        assert seconds(read, make(1_000_000)) < 0.5  # over the limit


JSON_HOSTILE = {  # graph or intervention JSON of about n characters
    "open brackets": lambda n: "[" * n,
    "deep nesting": lambda n: "[" * (n // 2) + "]" * (n // 2),
    "quotes": lambda n: '"' * n,
    "long string": lambda n: json.dumps({"concepts": [{"id": "c1", "name": "a", "current_value": "x" * n}]}),
    "many concepts": lambda n: json.dumps({"concepts": [{"id": f"c{i}", "name": f"n{i}", "current_value": "v"}
                                                        for i in range(n // 50)]}),
    "many changes": lambda n: json.dumps(json.loads(changes(n))["interventions"][0]),
    "many final states": lambda n: json.dumps({"id": "i1", "target_concept_id": "c1", "new_value": "old",
                                               "final_concept_states": {f"c{i}": "v" for i in range(n // 14)}}),
}


@pytest.mark.parametrize("kind", sorted(JSON_HOSTILE))
def test_reading_hostile_graph_and_intervention_json_takes_linear_time(kind):
    make = JSON_HOSTILE[kind]
    small, large = make(100_000), make(1_000_000)
    for name in ("CausalGraph.from_json", "check_intervention"):
        read = readers()[name]
        fast, slow = min(seconds(read, small) for _ in range(2)), seconds(read, large)
        assert slow <= 15 * fast + 1.0, (name, fast, slow)
