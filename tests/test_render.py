"""The graph picture: layout (cause above effect, no overlaps, few crossings) and the rendering itself."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csg.errors import InputError
from csg.graph import MAX_CONCEPTS, MAX_RELATIONSHIPS, CausalGraph, Intervention
from csg.render import (
    CHANGED,
    COLUMN_GAP,
    TARGET,
    VIOLATION,
    WAYPOINT_WIDTH,
    layout_graph,
    layout_with_routes,
    render_graph,
)


def make_graph(n, edges, names=None, values=None, summary=""):
    names, values = names or {}, values or {}
    return CausalGraph.from_dict({
        "concepts": [{"id": f"c{i}", "name": names.get(i, f"Concept {i}"), "current_value": values.get(i, f"value {i}")}
                     for i in range(n)],
        "relationships": [{"id": f"r{k}", "cause_id": f"c{a}", "effect_id": f"c{b}"} for k, (a, b) in enumerate(edges)],
        "scene_summary": summary,
    })


def largest_graph():
    """The most layout work the limits allow: a chain through every concept, so each sits on a row of its own, and
    the longest skip edges that fit in the rest, so the edges bend through as many waypoints as they can (32,125)."""
    chain = [(i, i + 1) for i in range(MAX_CONCEPTS - 1)]
    skips = sorted(((a, b) for a in range(MAX_CONCEPTS) for b in range(a + 2, MAX_CONCEPTS)), key=lambda e: e[0] - e[1])
    return make_graph(MAX_CONCEPTS, chain + skips[:MAX_RELATIONSHIPS - len(chain)])


def colours(image):
    return {tuple(c) for c in np.asarray(image).reshape(-1, 3)}


def street():
    return make_graph(6, [(0, 1), (1, 2), (0, 3), (4, 5)],
                      names={0: "Weather", 1: "Road wetness", 2: "Reflections", 3: "Umbrellas", 4: "Time of day",
                             5: "Street lights"},
                      values={0: "sunny", 1: "dry", 2: "none", 3: "none", 4: "afternoon", 5: "off"},
                      summary="A city street.")


def rain(extra_changes=()):
    return Intervention.from_dict({
        "id": "i1", "target_concept_id": "c0", "new_value": "heavy rain", "intervention_description": "Make it rain.",
        "propagated_changes": [{"concept_id": "c1", "new_value": "soaked"}, *extra_changes],
    })


GRAPHS = {
    "one node": make_graph(1, []),
    "chain of 8": make_graph(8, [(i, i + 1) for i in range(7)]),
    "fan-out of 10": make_graph(11, [(0, i) for i in range(1, 11)]),
    "long labels": make_graph(3, [(0, 1), (0, 2), (1, 2)],
                              names={0: "An exceptionally long concept name that keeps going and going",
                                     1: "Pneumonoultramicroscopicsilicovolcanoconiosis"},
                              values={2: "a value phrase far too long to fit on a single line of any reasonable box"}),
    "street": street(),
}


# -- layout ------------------------------------------------------------------------------------------

def assert_sound_layout(graph):
    pos = layout_graph(graph)
    assert set(pos) == set(graph.ids)
    for r in graph.relationships:
        assert pos[r.cause_id][1] < pos[r.effect_id][1], f"{r.cause_id} is not above {r.effect_id}"
    rows = {}
    for x, y in pos.values():
        assert x >= 0.5 - 1e-9 and y == int(y)
        rows.setdefault(y, []).append(x)
    for xs in rows.values():
        xs.sort()
        for left, right in zip(xs, xs[1:]):
            assert right - left >= 1 + COLUMN_GAP - 1e-9, "boxes on one row overlap"
    return pos


@pytest.mark.parametrize("name", GRAPHS)
def test_layout_puts_every_cause_above_its_effect(name):
    assert_sound_layout(GRAPHS[name])


def test_rows_are_topological_generations():
    graph = make_graph(5, [(0, 1), (1, 2), (0, 2), (3, 4)])
    pos = layout_graph(graph)
    assert {cid: pos[cid][1] for cid in graph.ids} == {"c0": 0, "c1": 1, "c2": 2, "c3": 0, "c4": 1}
    for name, graph in GRAPHS.items():  # a concept's row is its longest path from a concept without causes
        rows = {cid: y for cid, (_, y) in layout_graph(graph).items()}
        for cid in graph.ids:
            parents = graph.parents(cid)
            assert rows[cid] == (max(rows[p] for p in parents) + 1 if parents else 0), (name, cid)


def test_chain_is_a_straight_column_and_fan_out_is_centred():
    chain = layout_graph(GRAPHS["chain of 8"])
    assert len({round(x, 6) for x, _ in chain.values()}) == 1
    assert sorted(y for _, y in chain.values()) == list(range(8))
    fan = layout_graph(GRAPHS["fan-out of 10"])
    children = [fan[f"c{i}"][0] for i in range(1, 11)]
    assert fan["c0"][0] == pytest.approx(sum(children) / len(children))


def test_declaration_order_crossing_is_undone():
    # c0 -> c3 and c1 -> c2: in declaration order the two edges cross.
    pos = layout_graph(make_graph(4, [(0, 3), (1, 2)]))
    assert (pos["c0"][0] - pos["c1"][0]) * (pos["c3"][0] - pos["c2"][0]) > 0


def test_edges_that_skip_rows_do_not_run_through_boxes():
    # c0 -> c2 skips row 1; its waypoint on row 1 keeps c1's box clear of the straight line.
    pos = layout_graph(make_graph(3, [(0, 1), (1, 2), (0, 2)]))
    assert pos["c0"][1] == 0 and pos["c1"][1] == 1 and pos["c2"][1] == 2


@st.composite
def random_dag(draw):
    n = draw(st.integers(1, 8))
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    edges = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=12)) if pairs else []
    order = draw(st.permutations(range(n)))
    return make_graph(n, [(order[a], order[b]) for a, b in edges])


@settings(max_examples=40, deadline=None)
@given(random_dag())
def test_layout_is_sound_for_random_dags(graph):
    assert_sound_layout(graph)


def test_the_largest_graph_the_limits_allow_is_laid_out_whole():
    graph = largest_graph()
    positions, routes = layout_with_routes(graph)
    assert_sound_layout(graph)
    assert {cid: row for cid, (_, row) in positions.items()} == {f"c{i}": i for i in range(MAX_CONCEPTS)}
    assert [(e["cause_id"], e["effect_id"]) for e in routes] == [(r.cause_id, r.effect_id) for r in graph.relationships]
    on_row = {}
    for route in routes:  # one waypoint on each row an edge skips, and none on the rows of its ends
        rows = [row for _, row in route["waypoints"]]
        assert rows == list(range(int(positions[route["cause_id"]][1]) + 1, int(positions[route["effect_id"]][1])))
        for x, row in route["waypoints"]:
            on_row.setdefault(row, []).append((x, WAYPOINT_WIDTH))
    assert sum(map(len, on_row.values())) == 32_125
    for x, row in positions.values():
        on_row.setdefault(row, []).append((x, 1.0))
    for row, items in on_row.items():  # boxes and the edges passing them keep their gaps: no edge runs through a box
        items.sort()
        for (left, left_width), (right, right_width) in zip(items, items[1:]):
            assert right - left >= (left_width + right_width) / 2 + COLUMN_GAP - 1e-9, f"row {row} overlaps"


# -- rendering ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", GRAPHS)
def test_renders_an_rgb_image_of_sensible_size(name):
    graph = GRAPHS[name]
    image = render_graph(graph)
    assert image.mode == "RGB"
    pos = layout_graph(graph)
    columns = max(x for x, _ in pos.values()) + 0.5
    rows = max(y for _, y in pos.values()) + 1
    assert columns * 150 <= image.width <= columns * 250 + 600
    assert rows * 60 <= image.height <= rows * 400 + 400
    assert len(colours(image)) > 20  # boxes, text and edges were drawn, not a blank canvas


def test_canvas_grows_with_the_graph():
    one, chain, fan = (render_graph(GRAPHS[k]) for k in ("one node", "chain of 8", "fan-out of 10"))
    assert chain.height > 4 * one.height
    assert fan.width > 4 * one.width


def test_width_scales_the_drawing():
    natural = render_graph(street())
    image = render_graph(street(), rain(), width=500)
    assert image.width == 500 and image.mode == "RGB"
    assert render_graph(street(), width=2 * natural.width).height == pytest.approx(2 * natural.height, abs=4)


@pytest.mark.parametrize("width", [10, 0, -5, 300.5, "wide"])
def test_bad_width_is_an_input_error(width):
    with pytest.raises(InputError, match="width"):
        render_graph(street(), width=width)


def test_without_intervention_nothing_is_highlighted():
    seen = colours(render_graph(street()))
    assert TARGET.fill not in seen and CHANGED.fill not in seen


def test_intervention_highlights_target_and_changed_descendants():
    seen = colours(render_graph(street(), rain()))
    assert TARGET.fill in seen and CHANGED.fill in seen
    assert VIOLATION not in seen


def test_stripped_changes_are_marked_even_when_given_an_unchecked_intervention():
    clean = render_graph(street(), rain())
    flagged = render_graph(street(), rain([{"concept_id": "c5", "new_value": "on"},
                                           {"concept_id": "c99", "new_value": "fog"}]))
    assert VIOLATION in colours(flagged)
    assert flagged.height > clean.height  # the reasons are listed under the graph
