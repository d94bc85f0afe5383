"""The benchmark's axes beyond the paper (csg.axes): composition, reversibility, and the VLM minimality judge."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from csg.axes import (
    composition,
    counterfactual_graph,
    csg_reconstruction,
    inverse_intervention,
    judge_minimality,
    reversibility,
    vae_round_trip,
)
from csg.metrics import LPIPS, lpips_heads, vgg16_features
from csg.vlm import OpenAICompatibleVLM
from tests.sdxl_fixtures import sample_image
from tests.test_instruction import fork, fork_rain
from tests.vlm_server import VLMServer, completion


@pytest.fixture(scope="module")
def lpips_model() -> LPIPS:
    """LPIPS with a random backbone (the real VGG16 weights are never downloaded); non-negative heads as LPIPS's."""
    torch.manual_seed(0)
    features, heads = vgg16_features(), lpips_heads()
    with torch.no_grad():
        for head in heads:
            head.weight.abs_()
    return LPIPS(features, heads)


def test_csg_in_exact_mode_composes_at_the_vae_round_trips_floor(tiny_host, lpips_model):
    image = sample_image()
    reconstruction = csg_reconstruction(tiny_host, image, "a photo", num_steps=20, exact=True)
    score = composition(lpips_model, image, reconstruction, vae_round_trip(tiny_host, image))
    assert score.floor > 0.0, "a random VAE loses something, so the floor is above 0"
    assert abs(score.excess) <= 1e-4, score


def test_the_reference_inversion_does_not_sit_at_the_floor(tiny_host, lpips_model):
    image = sample_image()
    reconstruction = csg_reconstruction(tiny_host, image, "a photo", num_steps=20)  # zeroes the last noise maps
    score = composition(lpips_model, image, reconstruction, vae_round_trip(tiny_host, image))
    # random weights decide the sign (here its blurred last step lands nearer the original than the VAE does)
    assert abs(score.excess) > 1e-3, score


def test_the_inverse_intervention_sets_every_changed_concept_back():
    graph, intervention = fork(), fork_rain()
    world, inverse = inverse_intervention(graph, intervention)
    assert [c.current_value for c in world.concepts] == ["rainy", "grey overcast", "wet shiny asphalt",
                                                         "bright yellow", "red brick"]
    assert (inverse.original_value, inverse.new_value) == ("rainy", "sunny")
    assert {c.concept_id: c.new_value for c in inverse.propagated_changes} == {"c2": "clear blue", "c3": "dry asphalt"}
    assert inverse.violations == ()
    assert counterfactual_graph(world, inverse) == graph


def test_reversibility_is_zero_for_a_method_that_returns_its_input(lpips_model):
    calls = []

    def unchanged(image, graph, intervention):
        calls.append((graph, intervention.id))
        return image

    score = reversibility(lpips_model, unchanged, sample_image(), fork(), fork_rain())
    assert score.distance == 0.0
    assert [call[1] for call in calls] == ["rain", "rain_inverse"]
    assert calls[1][0].concept("c1").current_value == "rainy", "the inverse acts in the counterfactual world"


def test_reversibility_is_positive_for_a_method_that_does_not_undo(lpips_model):
    def darken(image, graph, intervention):
        return Image.eval(image, lambda value: value // 2)

    assert reversibility(lpips_model, darken, sample_image(), fork(), fork_rain()).distance > 0.0


@pytest.mark.parametrize("answer, score", [({"other_changes": [], "reasoning": "only the weather"}, 1.0),
                                           ({"other_changes": ["the car turned blue"], "reasoning": "x"}, 0.0)])
def test_the_minimality_judge_sees_both_images_and_the_changed_concepts(answer, score):
    with VLMServer(lambda request: completion(json.dumps(answer))) as server:
        judgement = judge_minimality(OpenAICompatibleVLM(server.base_url, "test-vlm"), sample_image(),
                                     sample_image(seed=1), fork(), fork_rain())
    assert judgement.score == score and judgement.other_changes == tuple(answer["other_changes"])
    request = server.requests[0]
    assert len(request.image_urls()) == 2
    assert "wet shiny asphalt" in request.text() and "white plaster" not in request.text()


def test_a_malformed_minimality_answer_is_asked_again():
    replies = iter([completion('{"other_changes": "none"}'), completion('{"other_changes": []}')])
    with VLMServer(lambda request: next(replies)) as server:
        judgement = judge_minimality(OpenAICompatibleVLM(server.base_url, "test-vlm"), sample_image(),
                                     sample_image(), fork(), fork_rain())
    assert judgement.score == 1.0 and len(server.requests) == 2
