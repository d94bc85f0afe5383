"""Causal edit instructions (csg.instruction): what they say, for each editor style, and the checked VLM rewrite."""

from __future__ import annotations

import re

import pytest

from csg.errors import InputError
from csg.graph import CausalGraph, Concept, Intervention, PropagatedChange, Relationship
from csg.instruction import EDITOR_STYLES, edit_instruction, edit_instructions, missing_facts, rewrite_instruction
from csg.vlm import OpenAICompatibleVLM
from tests.vlm_server import VLMServer, completion

PRONOUNS = re.compile(r"\b(it|its|he|she|her|his|him|they|them|their)\b", re.IGNORECASE)


def graph_of(concepts: list[tuple[str, str, str]], edges: list[tuple[str, str]]) -> CausalGraph:
    return CausalGraph(tuple(Concept(cid, name, value) for cid, name, value in concepts),
                       tuple(Relationship(f"r{k}", cause, effect) for k, (cause, effect) in enumerate(edges, 1)),
                       "a test scene")


def chain() -> CausalGraph:
    """season -> tree foliage -> ground cover, and a street lamp beside them."""
    return graph_of([("c1", "season", "summer"), ("c2", "tree foliage", "green leaves"),
                     ("c3", "ground cover", "short grass"), ("c4", "street lamp", "iron post")],
                    [("c1", "c2"), ("c2", "c3")])


def fork() -> CausalGraph:
    """weather causes both the sky and the road surface; the car and the house are independent."""
    return graph_of([("c1", "weather", "sunny"), ("c2", "sky", "clear blue"), ("c3", "road surface", "dry asphalt"),
                     ("c4", "car color", "bright yellow"), ("c5", "house facade", "red brick")],
                    [("c1", "c2"), ("c1", "c3")])


def change(cid: str, name: str, old: str, new: str) -> PropagatedChange:
    return PropagatedChange(cid, name, old, new, "follows from the target")


def chain_winter() -> Intervention:
    # listed out of causal order on purpose, plus one change the graph forbids (c4 is no descendant)
    return Intervention("winter", "c1", "season", "make it winter", "summer", "winter",
                        (change("c3", "ground cover", "short grass", "deep snow"),
                         change("c2", "tree foliage", "green leaves", "bare branches"),
                         change("c4", "street lamp", "iron post", "neon pylon")))


def fork_rain() -> Intervention:
    return Intervention("rain", "c1", "weather", "make it rain", "sunny", "rainy",
                        (change("c2", "sky", "clear blue", "grey overcast"),
                         change("c3", "road surface", "dry asphalt", "wet shiny asphalt"),
                         change("c5", "house facade", "red brick", "white plaster")))


def leaf_only() -> Intervention:
    """On a concept with no descendants: only the target changes."""
    return Intervention("lamp", "c4", "street lamp", "", "iron post", "wooden pole")


@pytest.mark.parametrize("style", EDITOR_STYLES)
@pytest.mark.parametrize("case", ["chain", "fork", "no descendants"])
def test_instruction_names_every_change_and_every_kept_value_and_no_stripped_one(style, case):
    graph, intervention, changed, kept, stripped = {
        "chain": (chain(), chain_winter(), ["winter", "bare branches", "deep snow"], ["iron post"], ["neon pylon"]),
        "fork": (fork(), fork_rain(), ["rainy", "grey overcast", "wet shiny asphalt"],
                 ["bright yellow", "red brick"], ["white plaster"]),
        "no descendants": (chain(), leaf_only(), ["wooden pole"], ["summer", "green leaves", "short grass"], []),
    }[case]
    instruction = edit_instruction(graph, intervention, style)
    text = instruction.text.lower()
    positions = [text.index(value) for value in changed]
    assert positions == sorted(positions), f"not in causal order: {instruction.text}"
    assert all(value in text for value in kept), instruction.text
    assert not any(value in text for value in stripped), instruction.text
    assert not PRONOUNS.search(instruction.text), instruction.text
    assert [c.new_value for c in instruction.changed] == changed
    assert [k.value for k in instruction.kept] == kept
    assert instruction.changed_text().splitlines()[0].endswith(f"-> {changed[0]}")
    assert all(value in instruction.kept_text() for value in kept)
    assert list(instruction.forbidden) == stripped
    assert missing_facts(instruction, instruction.text) == []


@pytest.mark.parametrize("style", EDITOR_STYLES)
def test_the_kept_list_stops_at_the_limit_and_says_how_many_it_left_out(style):
    concepts = [("c0", "lighting", "daylight"), ("c1", "shadow length", "short shadows")]
    concepts += [(f"c{k}", f"object {k}", f"shade {k}") for k in range(2, 25)]  # 23 non-descendants
    graph = graph_of(concepts, [("c0", "c1")])
    intervention = Intervention("dusk", "c0", "lighting", "", "daylight", "dusk",
                                (change("c1", "shadow length", "short shadows", "long shadows"),))
    instruction = edit_instruction(graph, intervention, style, max_kept=5)
    assert [k.value for k in instruction.kept] == [f"shade {k}" for k in range(2, 7)]
    assert instruction.kept_left_out == 18
    assert "shade 6" in instruction.text and "shade 7" not in instruction.text
    assert "18 more" in instruction.kept_text()
    assert all(value in instruction.text for value in ("dusk", "long shadows"))
    none_kept = edit_instruction(graph, intervention, style, max_kept=0)
    assert none_kept.kept == () and "shade" not in none_kept.text and none_kept.kept_left_out == 23


def test_the_styles_differ_and_each_is_reproducible():
    texts = {style: edit_instruction(fork(), fork_rain(), style).text for style in EDITOR_STYLES}
    assert len(set(texts.values())) == len(EDITOR_STYLES)
    assert all(edit_instruction(fork(), fork_rain(), style).text == text for style, text in texts.items())
    assert texts["qwen-image-edit"].startswith("Change the weather to rainy;")
    assert "exactly as red brick" in texts["flux-kontext"]


def test_a_batch_gives_one_instruction_per_intervention_in_order():
    graph = chain()
    batch = edit_instructions(graph, [chain_winter(), leaf_only()], "flux-kontext")
    assert [i.intervention_id for i in batch] == ["winter", "lamp"]
    assert "deep snow" in batch[0].text and "wooden pole" in batch[1].text


def test_bad_style_limit_or_batch_is_refused_with_the_fix():
    with pytest.raises(InputError, match="generic, qwen-image-edit, flux-kontext"):
        edit_instruction(chain(), leaf_only(), "dalle")
    with pytest.raises(InputError, match="from 0 to 100"):
        edit_instruction(chain(), leaf_only(), max_kept=-1)
    with pytest.raises(InputError, match="at least one"):
        edit_instructions(chain(), [])


# -- the VLM rewrite, against a real HTTP server on 127.0.0.1 ---------------------------------------------

def rewriting_server(*answers: str) -> VLMServer:
    replies = iter(answers)
    return VLMServer(lambda request: completion(next(replies)))


def test_a_faithful_rewrite_is_taken():
    instruction = edit_instruction(fork(), fork_rain(), "flux-kontext")
    rewrite = ("Turn the weather rainy, so the sky becomes grey overcast and the road surface wet shiny asphalt, "
               "while the car color stays bright yellow and the house facade stays red brick.")
    with rewriting_server(rewrite) as server:
        result = rewrite_instruction(OpenAICompatibleVLM(server.base_url, "test-vlm"), instruction)
    assert result.text == rewrite and result.note == ""
    asked = server.requests[0].text()
    assert "wet shiny asphalt" in asked and "red brick" in asked and "white plaster" not in asked


def test_a_rewrite_that_drops_a_kept_value_is_sent_back_and_a_corrected_one_taken():
    instruction = edit_instruction(fork(), fork_rain(), "generic")
    dropped = "Make the weather rainy with a grey overcast sky and wet shiny asphalt; keep the car bright yellow."
    fixed = dropped + " Keep the house facade red brick."
    with rewriting_server(dropped, fixed) as server:
        result = rewrite_instruction(OpenAICompatibleVLM(server.base_url, "test-vlm"), instruction)
    assert result.text == fixed
    assert 'the kept value "red brick" of house facade' in server.requests[1].text()


def test_a_rewrite_that_never_keeps_the_facts_falls_back_with_a_note():
    instruction = edit_instruction(fork(), fork_rain(), "qwen-image-edit")
    smuggled = ("Change the weather to rainy, the sky to grey overcast, the road surface to wet shiny asphalt and "
                "the house facade to white plaster; keep the car bright yellow and the facade red brick.")
    with rewriting_server(smuggled, smuggled) as server:
        result = rewrite_instruction(OpenAICompatibleVLM(server.base_url, "test-vlm"), instruction, max_attempts=2)
    assert result.text == instruction.text
    assert "not used" in result.note and "white plaster" in result.note and "deterministic" in result.note
    assert len(server.requests) == 2
