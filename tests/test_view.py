"""The graph view the frontend draws in a node: plain JSON with render.py's layout and the checked intervention."""

import json

from csg.graph import CausalGraph, Intervention
from csg.render import layout_graph
from csg.view import graph_view
from tests.test_render import make_graph, rain, street


def test_the_view_is_json_with_the_pictures_layout():
    graph = street()
    view = graph_view(graph)
    assert json.loads(json.dumps(view)) == view
    assert view["graph"] == graph.to_dict() and view["intervention"] is None
    assert {cid: tuple(position) for cid, position in view["layout"]["concepts"].items()} == layout_graph(graph)
    assert [(e["cause_id"], e["effect_id"]) for e in view["layout"]["edges"]] == [
        (r.cause_id, r.effect_id) for r in graph.relationships]
    assert view["descendants"] == {cid: graph.descendants(cid) for cid in graph.ids}


def test_an_edge_that_skips_a_row_bends_through_a_waypoint_on_it():
    view = graph_view(make_graph(3, [(0, 1), (1, 2), (0, 2)]))
    skipping = next(e for e in view["layout"]["edges"] if (e["cause_id"], e["effect_id"]) == ("c0", "c2"))
    assert [row for _, row in skipping["waypoints"]] == [1.0]
    assert all(not e["waypoints"] for e in view["layout"]["edges"] if e is not skipping)


def test_the_intervention_arrives_checked_with_its_violations():
    graph = street()
    rogue = rain(extra_changes=[{"concept_id": "c5", "new_value": "on"}])  # street lights do not follow the weather
    shown = graph_view(graph, rogue)["intervention"]
    assert [c["concept_id"] for c in shown["propagated_changes"]] == ["c1"]
    assert [(v["concept_id"], v["new_value"]) for v in shown["violations"]] == [("c5", "on")]
    assert Intervention.from_dict(shown).target_concept_id == "c0"
    assert CausalGraph.from_dict(graph_view(graph, rogue)["graph"]) == graph
