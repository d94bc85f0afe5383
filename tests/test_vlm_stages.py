"""Extractor -> manipulator -> judge, end to end through the real HTTP backend, parsing, retries,
the answer cache and check_intervention, with hand-written answers for two scenes."""

import json
from pathlib import Path

import pytest
from PIL import Image

from csg.errors import GraphError, InputError
from csg.graph import CausalGraph
from csg.vlm import (
    CachedVLM,
    OpenAICompatibleVLM,
    VLMOutputError,
    extract_graph,
    judge_counterfactual,
    manual_intervention,
    propagate_intervention,
    propose_interventions,
)
from csg.vlm.manipulator import parse_proposals
from tests.vlm_server import VLMServer, completion

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "vlm"
SCENES = sorted(p.stem for p in FIXTURES.glob("*.json"))


def load_scene(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def scene_image(scene: dict) -> Image.Image:
    if scene["image"]:
        return Image.open(ROOT / scene["image"])
    # A stand-in street: gray road under a darker sky; the server never looks at the pixels.
    image = Image.new("RGB", (96, 64), (90, 90, 100))
    image.paste((60, 60, 70), (0, 0, 96, 24))
    return image


def wrap(answer: dict, wrapping: str) -> str:
    """Answers as real models write them: reasoning first, or prose around a code fence."""
    text = json.dumps(answer, indent=2)
    if wrapping == "think":
        return f"<think>The user wants JSON. A first draft: {{\"concepts\": []}}. Now the real one.</think>\n{text}"
    return f"Here is the requested JSON:\n```json\n{text}\n```\nI hope this helps."


def stage_of(request) -> str:
    """Which question a request asks, from the first user message."""
    first_user = next(m for m in request.messages if m["role"] == "user")
    text = first_user["content"] if isinstance(first_user["content"], str) else first_user["content"][-1]["text"]
    for marker, stage in (("Write one caption", "description"), ("Step A, concepts", "extraction"),
                          ("Propose 3 interventions", "proposals"), ("The user sets", "propagation"),
                          ("<checklist>", "judgement")):
        if marker in text:
            return stage
    raise AssertionError(f"unrecognised request: {text[:200]}")


def scene_server(scene: dict, judge=None) -> VLMServer:
    """The scene's answers per stage; ``judge(request) -> answer text`` replaces its one fixed judgement."""
    def respond(request):
        stage = stage_of(request)
        if stage == "judgement" and judge is not None:
            return completion(judge(request))
        answer = scene["propagation"]["answer"] if stage == "propagation" else scene[stage]
        return completion(wrap(answer, scene["wrapping"]))
    return VLMServer(respond)


def backend(server, cache_dir=None):
    vlm = OpenAICompatibleVLM(server.base_url, "fixture-vlm", backoff=0.01)
    return CachedVLM(vlm, cache_dir) if cache_dir else vlm


def run_pipeline(vlm, scene):
    image = scene_image(scene)
    extraction = extract_graph(vlm, image, caption=scene["caption"])
    proposals = propose_interventions(vlm, image, extraction.graph, extraction.base_prompt)
    user = scene["propagation"]
    propagated = propagate_intervention(vlm, image, extraction.graph, user["target"], user["new_value"],
                                        base_prompt=extraction.base_prompt)
    judgement = judge_counterfactual(vlm, image, propagated, extraction.graph)
    return extraction, proposals, propagated, judgement


def non_descendant_changes(graph: CausalGraph, answer: dict) -> set[str]:
    target = graph.find_concept(answer["target_concept_id"]).id
    allowed = set(graph.descendants(target))
    return {c["concept_id"] for c in answer["propagated_changes"] if c["concept_id"] not in allowed}


@pytest.mark.parametrize("name", SCENES)
def test_scene_end_to_end(name, tmp_path):
    scene = load_scene(name)
    with scene_server(scene) as server:
        extraction, proposals, propagated, judgement = run_pipeline(backend(server, tmp_path / "cache"), scene)
    graph = extraction.graph
    stages = [stage_of(r) for r in server.requests]

    # E: the graph as the VLM wrote it; the base prompt is the caption or the VLM's description.
    assert graph == CausalGraph.from_dict(scene["extraction"])
    if scene["caption"]:
        assert extraction.base_prompt == scene["caption"] and "description" not in stages
    else:
        assert extraction.base_prompt == scene["description"]["description"]
    assert all(r.image_urls()[0].startswith("data:image/png;base64,") for r in server.requests)
    assert {r.body["temperature"] for r in server.requests if stage_of(r) == "extraction"} == {0.1}
    assert {r.body["max_tokens"] for r in server.requests if stage_of(r) == "extraction"} == {2048}
    assert {(r.body["temperature"], r.body["max_tokens"])
            for r in server.requests if stage_of(r) == "proposals"} == {(0.2, 3072)}

    # M, proposals: three targets, each one different; changes outside De(target) are stripped and recorded.
    assert len(proposals) == 3 and len({p.target_concept_id for p in proposals}) == 3
    stripped_any = False
    for proposal, answer in zip(proposals, scene["proposals"]["interventions"]):
        forbidden = non_descendant_changes(graph, answer)
        stripped_any |= bool(forbidden)
        assert {v.concept_id for v in proposal.violations} == forbidden
        descendants = set(graph.descendants(proposal.target_concept_id))
        assert all(p.concept_id in descendants for p in proposal.propagated_changes)
        assert set(proposal.final_concept_states) <= {proposal.target_concept_id} | descendants
        assert proposal.edit_concepts(graph)[0].is_target
    assert stripped_any, "each fixture carries one causal violation"
    proposer_text = next(r for r in server.requests if stage_of(r) == "proposals").text()
    assert extraction.base_prompt in proposer_text

    # M, user-directed: the user's target and value win; only descendants may change.
    user = scene["propagation"]
    target = graph.find_concept(user["target"])
    assert propagated.target_concept_id == target.id and propagated.new_value == user["new_value"]
    assert user["new_value"] in propagated.final_concept_states[target.id]
    assert ({v.concept_id for v in propagated.violations}
            == non_descendant_changes(graph, user["answer"]["interventions"][0]))
    propagation_text = next(r for r in server.requests if stage_of(r) == "propagation").text()
    for cid in graph.descendants(target.id):
        assert f"- {cid} ({graph.concept(cid).name})" in propagation_text

    # Judge: our checklist (the edited concepts' value phrases), the VLM's yes/no, score = share of yes.
    judge_text = next(r for r in server.requests if stage_of(r) == "judgement").text()
    for term in propagated.edit_concepts(graph):
        assert f"- {term.concept_name}: {term.prompt}" in judge_text
    checks = scene["judgement"]["concept_checks"]
    assert judgement.verdict == scene["judgement"]["verdict"]
    assert judgement.score == pytest.approx(sum(c["present"] == "yes" for c in checks) / len(checks))
    assert ([c.concept_name for c in judgement.concept_checks]
            == [t.concept_name for t in propagated.edit_concepts(graph)])


def test_the_cache_answers_the_second_run_and_rewrites_a_corrupt_entry(tmp_path):
    scene = load_scene("portrait")
    cache = tmp_path / "cache"
    with scene_server(scene) as server:  # one server: its URL is part of the backend identity, so of the key
        expected = run_pipeline(backend(server, cache), scene)
        entries = sorted(cache.rglob("*.json"))
        assert len(entries) == len(server.requests) == 5

        assert run_pipeline(backend(server, cache), scene) == expected
        assert len(server.requests) == 5  # nothing asked twice

        entries[0].write_text("{ this is not json")
        assert run_pipeline(backend(server, cache), scene) == expected
        assert len(server.requests) == 6  # only the corrupt entry was asked again
    assert json.loads(entries[0].read_text())["answer"]  # rewritten, readable again
    assert not list(cache.rglob(".tmp-*"))  # no temp files left behind


def test_a_bad_answer_is_fed_back_and_the_retry_used(tmp_path):
    scene = load_scene("portrait")
    cyclic = json.loads(json.dumps(scene["extraction"]))
    cyclic["relationships"].append({"id": "r9", "cause_id": "c2", "effect_id": "c1", "description": "loop"})
    answers = iter([json.dumps(cyclic), json.dumps(scene["extraction"])])
    with VLMServer(lambda request: completion(next(answers))) as server:
        extraction = extract_graph(backend(server, tmp_path / "cache"), scene_image(scene), caption="a portrait")
        assert len(server.requests) == 2
        # The corrected answer was stored as the answer to the first question: a rerun asks nothing.
        assert extract_graph(backend(server, tmp_path / "cache"), scene_image(scene),
                             caption="a portrait") == extraction
        assert len(server.requests) == 2
    assert extraction.graph == CausalGraph.from_dict(scene["extraction"])
    retry = server.requests[1].messages
    assert [m["role"] for m in retry] == ["system", "user", "assistant", "user"]
    assert retry[2]["content"] == json.dumps(cyclic)
    assert "cycle" in retry[3]["content"] and "c1 -> c2 -> c1" in retry[3]["content"]



@pytest.mark.parametrize("spoil, told", [
    (lambda text: text[:len(text) // 2], "cut off, probably by the token limit. Raise max_tokens"),
    (lambda text: text.replace('"concepts": [', '"concepts": [ // the people first\n', 1), "JSON allows none"),
], ids=["cut off", "comment"])
def test_the_correction_names_what_is_really_wrong(spoil, told):
    """A cut-off answer used to come back as "The graph has no concepts", a commented one as "got a JSON list"."""
    scene = load_scene("portrait")
    good = json.dumps(scene["extraction"], indent=2)
    answers = iter([spoil(good), good])
    with VLMServer(lambda request: completion(next(answers))) as server:
        extraction = extract_graph(backend(server), scene_image(scene), caption="a portrait")
    assert extraction.graph == CausalGraph.from_dict(scene["extraction"])
    assert told in server.requests[1].messages[-1]["content"]


def test_a_long_rejected_answer_goes_back_to_the_model_cut_short():
    """A rejected answer is replayed so the model can correct it; a huge one is cut, not sent back whole."""
    from csg.vlm.asking import REPLAYED_ANSWER_CHARS

    scene = load_scene("portrait")
    rambling = "Let me think about this scene. " * 6_000  # ~180,000 characters, no JSON
    answers = iter([rambling, json.dumps(scene["extraction"])])
    with VLMServer(lambda request: completion(next(answers))) as server:
        extract_graph(backend(server), scene_image(scene), caption="a portrait")
    replayed = server.requests[1].messages[-2]
    assert replayed["role"] == "assistant"
    assert replayed["content"].startswith(rambling[:REPLAYED_ANSWER_CHARS])
    assert len(replayed["content"]) < REPLAYED_ANSWER_CHARS + 100 and "more characters left out" in replayed["content"]


def test_a_graph_too_large_for_a_prompt_is_refused_before_asking():
    from csg.vlm.prompts import MAX_PROMPT_CHARS

    # every field within its own limit, the whole too long for one prompt
    data = GRAPH.to_dict()
    extra = [{"id": f"x{k}", "name": f"detail {k}", "current_value": "plain", "description": "a portrait " * 90}
             for k in range(MAX_PROMPT_CHARS // 900)]
    wordy = CausalGraph.from_dict({**data, "concepts": data["concepts"] + extra})
    with VLMServer(lambda request: completion("{}")) as server:
        with pytest.raises(InputError, match=f"more than the {MAX_PROMPT_CHARS:,} a VLM prompt may have"):
            propose_interventions(backend(server), scene_image(load_scene("portrait")), wordy)
        with pytest.raises(InputError, match="prompt would have"):
            propagate_intervention(backend(server), scene_image(load_scene("portrait")), wordy, "c1", "old")
    assert server.requests == []


def test_unusable_answers_end_in_an_error_naming_the_stage_and_quoting_the_answer():
    with VLMServer(lambda request: completion("I cannot help with causal graphs today.")) as server:
        with pytest.raises(VLMOutputError) as caught:
            extract_graph(backend(server), scene_image(load_scene("street")), caption="a street", max_attempts=3)
    error = caught.value
    assert len(server.requests) == 3
    assert error.stage == "concept extraction" and error.output == "I cannot help with causal graphs today."
    assert "3 attempt(s)" in str(error) and "no valid JSON" in str(error) and "causal graphs today" in str(error)


def test_a_stage_that_found_no_usable_answer_asks_again_on_a_rerun(tmp_path):
    """Rejected answers are dropped from the cache, so a rerun does not replay them."""
    with VLMServer(lambda request: completion("I cannot help with causal graphs today.")) as server:
        for run in (1, 2):
            with pytest.raises(VLMOutputError):
                extract_graph(backend(server, tmp_path / "cache"), scene_image(load_scene("street")),
                              caption="a street", max_attempts=2)
            assert len(server.requests) == 2 * run
    assert not list((tmp_path / "cache").rglob("*.json"))


def test_a_lighting_concept_is_sent_back():
    scene = load_scene("street")
    lit = json.loads(json.dumps(scene["extraction"]))
    lit["concepts"].append({"id": "c9", "name": "street lighting", "current_value": "dim", "description": "x"})
    answers = iter([json.dumps(lit), json.dumps(scene["extraction"])])
    with VLMServer(lambda request: completion(next(answers))) as server:
        extraction = extract_graph(backend(server), scene_image(scene), caption="a street")
    assert "c9" not in extraction.graph.ids
    assert "street lighting" in server.requests[1].messages[-1]["content"]


# -- the proposer's own checks, without HTTP ------------------------------------------------------

GRAPH = CausalGraph.from_dict(load_scene("portrait")["extraction"])


def proposal(target, value, k=1):
    return {"id": f"intervention_{k}", "target_concept_id": target, "new_value": value, "propagated_changes": []}


def test_proposals_need_three_different_targets():
    with pytest.raises(VLMOutputError, match="Only 2 intervention"):
        parse_proposals(GRAPH, json.dumps({"interventions": [proposal("c1", "old"), proposal("c1", "young"),
                                                             proposal("c4", "male")]}))
    with pytest.raises(GraphError, match="changes nothing"):
        parse_proposals(GRAPH, json.dumps({"interventions": [proposal("c1", "Middle-aged")]}))
    with pytest.raises(GraphError, match="not in the graph"):
        parse_proposals(GRAPH, json.dumps({"interventions": [proposal("c42", "x")]}))


def test_proposals_accept_a_bare_list_and_renumber_duplicate_ids():
    items = [proposal("c1", "old", 1), proposal("gender", "male", 1), proposal("c9", "serious", 1),
             proposal("c6", "chef", 4)]
    chosen = parse_proposals(GRAPH, json.dumps(items))
    assert [c.target_concept_id for c in chosen] == ["c1", "c4", "c9"]
    assert [c.id for c in chosen] == ["intervention_1", "intervention_2", "intervention_3"]


# -- the hand-written path: no VLM ---------------------------------------------------------------

def test_manual_intervention_changes_the_target_alone():
    intervention = manual_intervention(GRAPH, "Hair Color", "black hair", generation_prompt=" a portrait ")
    assert intervention.target_concept_id == "c2" and intervention.original_value == "light brown"
    assert intervention.propagated_changes == () and intervention.violations == ()
    assert [t.prompt for t in intervention.edit_concepts(GRAPH)] == ["black hair"]
    assert intervention.generation_prompt == "a portrait"
    with pytest.raises(GraphError, match="No concept has the id or name 'eye color'"):
        manual_intervention(GRAPH, "eye color", "blue")
    with pytest.raises(InputError, match="already is"):
        manual_intervention(GRAPH, "c1", "middle-aged")
    with pytest.raises(InputError, match="empty"):
        manual_intervention(GRAPH, "c1", "  ")


# -- the judge's own checks, without HTTP ---------------------------------------------------------

ITEMS = [("age", "old woman"), ("hair color", "gray hair")]


def judge_answer(checks, verdict="partial"):
    return json.dumps({"intervention_id": "i1", "verdict": verdict, "reasoning": "r", "concept_checks": checks})


def test_judge_matches_by_name_then_by_position_and_feeds_metrics():
    from csg.metrics import vlm_effectiveness
    from csg.vlm.judge import parse_judgement

    by_name = parse_judgement("i1", ITEMS, judge_answer([{"concept_name": "Hair Color", "present": "no"},
                                                         {"concept_name": "age", "present": True}]))
    assert [c.present for c in by_name.concept_checks] == [True, False] and by_name.score == 0.5
    by_position = parse_judgement("i1", ITEMS, judge_answer([{"concept_name": "x", "present": "YES"},
                                                             {"concept_name": "y", "present": "yes"}], "Success"))
    assert by_position.verdict == "success" and by_position.score == 1.0
    assert vlm_effectiveness([by_name, by_position]) == pytest.approx((by_name.score + by_position.score) / 2)
    assert vlm_effectiveness([by_name.to_dict()]) == by_name.score


@pytest.mark.parametrize("answer, fragment", [
    (judge_answer([{"concept_name": "age", "present": "yes"}]), 'No answer for the checklist line "hair color'),
    (judge_answer([{"concept_name": "age", "present": "maybe"}, {"concept_name": "hair color", "present": "no"}]),
     "present='maybe'"),
    (judge_answer([], "great"), '"verdict" must be one of'),
    (judge_answer("yes"), '"concept_checks" must be a list'),
])
def test_judge_answers_that_are_sent_back(answer, fragment):
    from csg.vlm.judge import parse_judgement

    with pytest.raises(VLMOutputError, match=fragment):
        parse_judgement("i1", ITEMS, answer)
