"""The counterfactual API on a tiny random SDXL: the whole chain, batching, parameters, image input."""

import pytest
import torch
from PIL import Image

from csg.counterfactual import (
    CSGParams,
    baseline_counterfactual,
    counterfactual,
    counterfactuals,
    edit_spec,
    fit_to_model,
    load_image,
    parse_concept_scales,
)
from csg.errors import InputError
from csg.graph import CausalGraph, Intervention, check_intervention
from tests.sdxl_fixtures import sample_image

FAST = dict(num_steps=8, warmup=2)


@pytest.fixture(scope="module")
def graph():
    return CausalGraph.from_dict({
        "scene_summary": "a photo of a man in a garden on a sunny day",
        "concepts": [
            {"id": "c1", "name": "weather", "current_value": "sunny"},
            {"id": "c2", "name": "sky", "current_value": "blue sky"},
            {"id": "c3", "name": "person", "current_value": "man"},
        ],
        "relationships": [{"id": "r1", "cause_id": "c1", "effect_id": "c2"}],
    })


def rainy() -> Intervention:
    return Intervention.from_dict({
        "id": "i1", "target_concept_id": "c1", "new_value": "rainy",
        "propagated_changes": [
            {"concept_id": "c2", "new_value": "gray sky"},
            {"concept_id": "c3", "new_value": "woman", "reason": "the VLM overreached"},  # not a descendant
        ],
        "final_concept_states": {"c1": "rainy day", "c2": "gray sky"},
        "generation_prompt": "a photo of a man in a garden on a rainy day with a gray sky",
    })


def red_shirt() -> Intervention:
    return Intervention.from_dict({"id": "i2", "target_concept_id": "person", "new_value": "woman"})


def test_counterfactual_runs_the_whole_chain(tiny_host, graph):
    result = counterfactual(tiny_host, sample_image(), graph, rainy(), params=CSGParams(**FAST))
    assert result.image.size == (64, 64) and result.image.mode == "RGB"
    assert result.latent.shape == (1, 4, 32, 32) and torch.isfinite(result.latent).all()
    assert [c.concept_id for c in result.edit_concepts] == ["c1", "c2"]
    assert [c.prompt for c in result.edit_concepts] == ["rainy day", "gray sky"]
    assert [v.concept_id for v in result.intervention.violations] == ["c3"]  # stripped, and visible
    assert set(result.masks) == {"c1", "c2"}
    for mask in result.masks.values():
        assert mask.shape == (32, 32) and 0.0 <= mask.min() <= mask.max() <= 1.0 and mask.max() > 0
    assert result.mask_image("c2").size == (64, 64) and result.mask_image("c2").mode == "L"
    assert result.source_prompt == graph.scene_summary
    assert result.inversion.num_steps == 8
    assert (result.latent - result.inversion.x0).abs().mean() > 1e-4  # it edited


@pytest.mark.parametrize("source_prompt", ["a photo", ""])
def test_exact_mode_without_guidance_gives_back_the_input_latent(tiny_host, graph, source_prompt):
    """A zero-strength edit runs the inversion's own rows at its own batch size with its own encoded
    source prompt, one intervention or several, so it lands on x0 (the issue's bound: 1e-5)."""
    params = CSGParams(exact=True, scale=0.0, **FAST)
    alone = counterfactual(tiny_host, sample_image(), graph, rainy(), source_prompt=source_prompt, params=params)
    batched = counterfactuals(tiny_host, sample_image(), graph, [rainy(), red_shirt()], source_prompt=source_prompt,
                              params=params)
    for result in (alone, *batched):
        assert (result.latent - result.inversion.x0).abs().max().item() <= 1e-5


def test_batched_interventions_share_one_inversion_and_match_separate_runs(tiny_host, graph):
    params = CSGParams(**FAST)
    batched = counterfactuals(tiny_host, sample_image(), graph, [rainy(), red_shirt()], params=params)
    assert batched[0].inversion is batched[1].inversion
    for result, intervention in zip(batched, [rainy(), red_shirt()]):
        alone = counterfactual(tiny_host, sample_image(), graph, intervention, params=params,
                               inversion=batched[0].inversion)
        assert (alone.latent - result.latent).abs().max() <= 1e-5 * alone.latent.abs().max()  # relative
    assert list(batched[1].masks) == ["c3"]  # nothing downstream: the target alone


def test_params_reach_the_guidance_terms(graph):
    intervention = check_intervention(graph, rainy())
    params = CSGParams(scale=5.0, concept_scales={"sky": 2.0}, reverse=("c1",), non_descendant_protection=True,
                       threshold=0.6, warmup=3, cooldown=7)
    spec = edit_spec(graph, intervention, params)
    by_label = {t.label: t for t in spec.terms}
    assert by_label["c1"].reverse and by_label["c1"].prompt == "sunny" and by_label["c1"].scale == 5.0
    assert not by_label["c2"].reverse and by_label["c2"].scale == 2.0
    assert all(t.threshold == 0.6 and t.warmup == 3 and t.cooldown == 7 for t in spec.terms)
    assert spec.protect == ("man person",)  # the non-descendant's current value
    assert edit_spec(graph, intervention, CSGParams()).protect == ()
    with pytest.raises(InputError, match="concept_scales"):
        edit_spec(graph, intervention, CSGParams(concept_scales={"ocean": 1.0}))
    with pytest.raises(InputError, match="mask_mode"):
        CSGParams(mask_mode="union")


def test_concept_scales_parse_from_items_or_one_comma_separated_string():
    assert parse_concept_scales(["hair color=5", " c2 = 6.5 "]) == {"hair color": 5.0, "c2": 6.5}
    assert parse_concept_scales("c2=6.0, hair color=5\nsky=1") == {"c2": 6.0, "hair color": 5.0, "sky": 1.0}
    assert parse_concept_scales("") == {} and parse_concept_scales(" , ") == {}
    for bad in ("hair color", "=5", "sky=much"):
        with pytest.raises(InputError, match='concept_scales expects "concept=number"'):
            parse_concept_scales(bad, "concept_scales")


@pytest.mark.parametrize("settings, message", [
    (dict(threshold=1.5), "threshold"),
    (dict(scale=float("inf")), "finite"),
    (dict(concept_scales={"sky": float("nan")}), "The scale of 'sky'"),
    (dict(protect_threshold=2.0), "protect_threshold"),
])
def test_bad_settings_are_refused_when_the_params_are_made(settings, message):
    with pytest.raises(InputError, match=message):
        CSGParams(**settings)


def test_settings_that_need_the_steps_or_the_tokenizer_fail_before_the_inversion(tiny_host, graph):
    """A warm-up past the last step, or a value the tokenizer would truncate, costs no UNet call."""
    unet_calls = []
    hook = tiny_host.unet.register_forward_pre_hook(lambda module, args: unet_calls.append(1))
    wordy = Intervention.from_dict({"id": "i3", "target_concept_id": "c3", "new_value": " ".join(["woman"] * 80)})
    try:
        with pytest.raises(InputError, match="no step would be guided"):
            counterfactual(tiny_host, sample_image(), graph, red_shirt(), params=CSGParams(num_steps=4, warmup=10))
        with pytest.raises(InputError, match="Shorten"):
            counterfactual(tiny_host, sample_image(), graph, wordy, params=CSGParams(**FAST))
    finally:
        hook.remove()
    assert unet_calls == []
    assert CSGParams(num_steps=4, warmup=10).warmup == 10  # the baselines have no warm-up: allowed until CSG runs


def test_paper_defaults():
    p = CSGParams()
    assert (p.num_steps, p.skip, p.source_guidance, p.scale, p.threshold, p.warmup, p.mask_mode) == (
        100, 0.15, 3.5, 8.0, 0.7, 10, "intersect")
    assert p.to_dict()["concept_scales"] == {} and not p.non_descendant_protection


def test_images_are_loaded_as_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    flat = load_image(rgba)
    assert flat.mode == "RGB" and flat.getpixel((1, 1)) == (255, 255, 255) and flat.getpixel((0, 0)) == (0, 0, 255)
    gray = Image.new("L", (8, 8), 77)
    assert load_image(gray).getpixel((3, 3)) == (77, 77, 77)
    gray.save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png").mode == "RGB"
    assert load_image(str(tmp_path / "gray.png")).size == (8, 8)
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="Could not read"):
        load_image(tmp_path / "junk.png")


def test_odd_sizes_are_center_cropped_and_large_ones_downscaled():
    image = sample_image(67, 70, seed=3)  # H=67, W=70
    fitted = fit_to_model(image, 8, None)
    assert fitted.size == (64, 64)
    assert fitted.tobytes() == image.crop((3, 1, 67, 65)).tobytes()  # same pixels, no resampling
    already = sample_image(64, 64)
    assert fit_to_model(already, 8, None) is already  # untouched when it fits
    big = fit_to_model(sample_image(100, 130), 8, 64)  # 130x100 -> 64x49 -> 64x48
    assert big.size == (64, 48)
    with pytest.raises(InputError, match="at least 8 pixels"):
        fit_to_model(sample_image(5, 40), 8, None)


def test_counterfactual_accepts_a_path_with_an_odd_size(tiny_host, graph, tmp_path):
    sample_image(67, 70).convert("RGBA").save(tmp_path / "odd.png")
    result = counterfactual(tiny_host, tmp_path / "odd.png", graph, red_shirt(), params=CSGParams(**FAST))
    assert result.image.size == result.source_image.size == (64, 64)


def test_baselines_guide_with_the_generation_prompt(tiny_host):
    for method in ("ddpm", "ddim"):
        result = baseline_counterfactual(tiny_host, sample_image(), rainy(), method=method, source_prompt="a photo",
                                         params=CSGParams(num_steps=4))
        assert result.image.size == (64, 64) and result.target_prompt == rainy().generation_prompt
        assert result.inversion.method == method
    with pytest.raises(InputError, match="generation_prompt"):
        baseline_counterfactual(tiny_host, sample_image(), red_shirt())
    with pytest.raises(InputError, match="finite"):
        baseline_counterfactual(tiny_host, sample_image(), rainy(), guidance_scale=float("nan"))


def test_bad_calls_get_clear_errors(tiny_host, graph):
    with pytest.raises(InputError, match="No intervention"):
        counterfactuals(tiny_host, sample_image(), graph, [])
    first = counterfactual(tiny_host, sample_image(), graph, red_shirt(), params=CSGParams(**FAST))
    with pytest.raises(InputError, match="Invert this image"):
        counterfactual(tiny_host, sample_image(32, 32), graph, red_shirt(), params=CSGParams(**FAST),
                       inversion=first.inversion)
