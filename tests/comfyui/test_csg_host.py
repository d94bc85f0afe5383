"""The ComfyUI host and the CSG nodes on a small random SDXL built with ComfyUI's own classes.

Covers: the host's predictions against the diffusers host on the same weights, nothing leaking
into the user's MODEL, a LoRA applied before our nodes still acting, the composable
guider/sampler path and the all-in-one node being one path (bit-identical latents, ComfyUI's
latent preview at every step, other nodes' sampling wrappers and post-CFG functions run, CFG
patches CSG cannot honour refused), batched interventions equal to single ones, and the errors a
user sees.
"""

import collections
import copy

import pytest
import torch

from tools.comfy_sdxl import build_comfy_sdxl, diffusers_host_of, node_output, pack_module
from tools.record_behaviour import comfyui_story

SIZE = 64  # pixels: an 8x8 latent, 2x2 attention maps at latent/4
STEPS = 6
WARMUP = 1


@pytest.fixture(scope="module")
def small():
    torch.set_num_threads(1)
    return build_comfy_sdxl(seed=0)


@pytest.fixture(scope="module")
def modules():
    return {name: pack_module(name) for name in ("nodes.comfy_host", "nodes.csg_nodes", "nodes.sampling_nodes",
                                                  "nodes.baseline_nodes", "nodes.csg_common", "csg.graph", "csg.errors",
                                                  "csg.host", "csg.prediction")}


@pytest.fixture(scope="module")
def story(modules):
    graph, hair, _ = comfyui_story(modules["csg.graph"])  # the story the behaviour record uses
    return graph, hair


@pytest.fixture(scope="module")
def image():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(1, SIZE, SIZE, 3, generator=generator)


@pytest.fixture(scope="module")
def inversion(small, modules, image):
    node = modules["nodes.csg_nodes"].CausalInversion
    return node_output(node.execute(small.model, small.clip, small.vae, image, "a photo of a man", STEPS, 0.15, 3.5,
                                    False, 3, 0))[0]


def counterfactual(modules, small, model, inversion, story, **overrides):
    graph, intervention = story
    settings = dict(scale=8.0, threshold=0.7, warmup=WARMUP, mask_mode="intersect", reverse=False,
                    protect_non_descendants=False) | overrides
    node = modules["nodes.csg_nodes"].CausalCounterfactual
    return node_output(node.execute(model, small.clip, small.vae, inversion, intervention, causal_graph=graph,
                                    **settings))


def test_host_predictions_match_the_diffusers_host_on_the_same_weights(small, modules):
    comfy_host = modules["nodes.comfy_host"].ComfySDXLHost(small.model, small.clip, small.vae)
    reference = diffusers_host_of(small)
    prompts = ["", "black hair", "a photo of a man"]
    ours, theirs = comfy_host.encode_prompts(prompts), reference.encode_prompts(prompts)
    assert comfy_host.token_indices("black hair") == reference.token_indices("black hair")
    latents = torch.randn(3, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
    request = modules["csg.host"].AttentionRequest((1, 2), ((1, 2), tuple(comfy_host.token_indices(prompts[2]))))
    with comfy_host.loaded(latents.shape):
        for t in (1, 501, 981):
            eps, maps = comfy_host.predict_noise(latents, t, ours, request)
            ref_eps, ref_maps = reference.predict_noise(latents, t, theirs, request)
            # Same weights, different kernels (ComfyUI's CPU attention vs SDPA, float32): rounding only.
            assert (eps - ref_eps).abs().max() < 1e-4 * ref_eps.abs().max()
            assert (maps - ref_maps).abs().max() < 1e-5
    assert (comfy_host.alphas_cumprod.cpu() - reference.alphas_cumprod.cpu()).abs().max() < 1e-6
    pixels = torch.rand(1, 3, SIZE, SIZE)
    assert torch.allclose(comfy_host.encode_image(pixels).cpu(), reference.encode_image(pixels), atol=1e-5)


def test_rows_map_to_concepts_when_comfyui_splits_the_batch(small, modules, monkeypatch):
    """With too little free memory ComfyUI evaluates conds one UNet call at a time; results must not move."""
    host = modules["nodes.comfy_host"].ComfySDXLHost(small.model, small.clip, small.vae)
    conditioning = host.encode_prompts(["", "black hair", "blue sky"])
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    request = modules["csg.host"].AttentionRequest((1, 2), ((1, 2), (1, 2)))
    with host.loaded(latents.shape):
        batched = host.predict_noise(latents, 601, conditioning, request)
        # ComfyUI batches as many conds as its memory estimate allows; an enormous estimate forces one per call.
        monkeypatch.setattr(small.model.model, "memory_required", lambda *args, **kwargs: float("inf"))
        split = host.predict_noise(latents, 601, conditioning, request)
    for a, b in zip(batched, split):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(split[0][1], split[0][2])  # different prompts and latents, different rows


def test_the_users_model_is_unpatched_after_every_node(small, modules, inversion, story):
    options, patches = copy.deepcopy(small.model.model_options), dict(small.model.patches)
    attention_classes = {name: type(m) for name, m in small.model.model.named_modules()}
    counterfactual(modules, small, small.model, inversion, story)
    sampling = modules["nodes.sampling_nodes"]
    node_output(sampling.CSGGuiderNode.execute(small.model, small.clip, inversion, story[1], 8.0, 0.7, WARMUP,
                                               "intersect", False, False, causal_graph=story[0]))
    assert small.model.model_options == options
    assert small.model.patches == patches
    assert {name: type(m) for name, m in small.model.model.named_modules()} == attention_classes


def test_counterfactual_outputs_and_masks(small, modules, inversion, story):
    image, latent, masks, preview = counterfactual(modules, small, small.model, inversion, story)
    assert image.shape == (1, SIZE, SIZE, 3) and latent["samples"].shape == (1, 4, SIZE // 8, SIZE // 8)
    assert masks.shape == (2, SIZE, SIZE) and preview.shape == (2, SIZE, SIZE, 3)  # hair and beard
    assert all(m.sum() > 0 for m in masks) and masks.max() <= 1.0
    unedited = counterfactual(modules, small, small.model, inversion, story, scale=0.0)[1]["samples"]
    assert not torch.allclose(latent["samples"], unedited)


def test_cooldown_and_concept_scales_reach_the_edit(small, modules, inversion, story):
    plain = counterfactual(modules, small, small.model, inversion, story)[1]["samples"]
    cooled = counterfactual(modules, small, small.model, inversion, story, cooldown=3)[1]["samples"]
    assert not torch.allclose(cooled, plain)  # no guidance from step 3 on
    to_the_end = counterfactual(modules, small, small.model, inversion, story, cooldown=0)[1]["samples"]
    assert torch.equal(to_the_end, plain)  # 0: no cool-down
    same = counterfactual(modules, small, small.model, inversion, story, concept_scales="c1=8, beard=8")
    assert torch.equal(same[1]["samples"], plain)  # by id and by name, the default scale written out
    hair_alone = counterfactual(modules, small, small.model, inversion, story, concept_scales="beard=0")
    assert not torch.allclose(hair_alone[1]["samples"], plain)


@pytest.mark.parametrize("text, message", [
    ("ocean=3", "concept_scales: No concept has the id or name 'ocean'"),
    ("hair color", 'concept_scales expects "concept=number"'),
])
def test_a_bad_concept_scales_string_names_the_problem(small, modules, inversion, story, text, message):
    errors = modules["csg.errors"]
    with pytest.raises(errors.InputError, match=message):
        counterfactual(modules, small, small.model, inversion, story, concept_scales=text)
    guider = modules["nodes.sampling_nodes"].CSGGuiderNode
    with pytest.raises(errors.InputError, match=message):
        guider.execute(small.model, small.clip, inversion, story[1], 8.0, 0.7, WARMUP, "intersect", False, False,
                       causal_graph=story[0], concept_scales=text)


def test_a_lora_applied_before_our_nodes_changes_the_counterfactual(small, modules, inversion, story):
    import comfy.sd

    key = "lora_unet_input_blocks_5_1_transformer_blocks_0_attn2_to_k"
    to_k = small.model.model.diffusion_model.input_blocks[5][1].transformer_blocks[0].attn2.to_k.weight
    generator = torch.Generator().manual_seed(3)
    lora = {f"{key}.lora_up.weight": torch.randn(to_k.shape[0], 4, generator=generator),
            f"{key}.lora_down.weight": torch.randn(4, to_k.shape[1], generator=generator) * 0.05,
            f"{key}.alpha": torch.tensor(4.0)}
    lora_model, _ = comfy.sd.load_lora_for_models(small.model, None, lora, 1.0, 0.0)
    assert lora_model.patches  # the LoRA is a weight patch, applied when ComfyUI loads the model
    plain = counterfactual(modules, small, small.model, inversion, story)[1]["samples"]
    with_lora = counterfactual(modules, small, lora_model, inversion, story)[1]["samples"]
    again = counterfactual(modules, small, small.model, inversion, story)[1]["samples"]
    assert (with_lora - plain).abs().max() > 1e-3
    assert (again - plain).abs().max() < 1e-5 * plain.abs().max()  # and the LoRA did not stay behind


def test_guider_and_sampler_in_sampler_custom_advanced_match_the_all_in_one_node(small, modules, inversion, story):
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced

    sampling = modules["nodes.sampling_nodes"]
    sigmas, noise, latent = node_output(sampling.InversionSigmasAndNoise.execute(small.model, inversion))
    guider = node_output(sampling.CSGGuiderNode.execute(small.model, small.clip, inversion, story[1], 8.0, 0.7,
                                                        WARMUP, "intersect", False, False,
                                                        causal_graph=story[0]))[0]
    sampler = node_output(sampling.EditFriendlySampler.execute(inversion))[0]
    assert sigmas.shape == (STEPS + 1,) and sigmas[-1] == 0.0
    output = SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)[0]["samples"]
    expected = counterfactual(modules, small, small.model, inversion, story)[1]["samples"]
    assert torch.equal(output, expected)  # one sampling path, not two that agree


def test_comfyuis_sampler_retraces_the_cores_chain_bit_for_bit_in_exact_mode(small, modules, image, story):
    """Exact mode needs the sampler to redo the inversion's arithmetic to the last bit (its source guidance
    amplifies any rounding to percent of the latent within a few steps): the node, sampling through
    guider.sample, gives the very latent of the core's own loop (csg.prediction.edit) on the same host."""
    common, prediction = modules["nodes.csg_common"], modules["csg.prediction"]
    node = modules["nodes.csg_nodes"].CausalInversion
    exact = node_output(node.execute(small.model, small.clip, small.vae, image, "a photo of a man", STEPS, 0.15, 3.5,
                                     True, 0, 0))[0]
    settings = common.edit_settings(8.0, 0.7, WARMUP, "intersect", False)
    spec = common.spec_for(story[1], story[0], settings, False)
    host = modules["nodes.comfy_host"].ComfySDXLHost(small.model, small.clip, small.vae)
    with host.loaded((4, 4, SIZE // 8, SIZE // 8)):
        core = prediction.edit(host, exact, [spec], settings.guidance_params()).latents
    output = counterfactual(modules, small, small.model, exact, story)[1]["samples"]
    assert torch.equal(output, small.model.model.latent_format.process_out(core.cpu()))


def test_a_zero_strength_exact_edit_gives_back_the_input_latent_through_comfyuis_sampler(small, modules, image,
                                                                                          story):
    """Zero-scale terms guide nothing and are not evaluated, so every step runs the inversion's own
    [uncond, source] batch with its own encoded prompts: the counterfactual is x0 to float precision."""
    node = modules["nodes.csg_nodes"].CausalInversion
    exact = node_output(node.execute(small.model, small.clip, small.vae, image, "a photo of a man", STEPS, 0.15, 3.5,
                                     True, 0, 0))[0]
    output = counterfactual(modules, small, small.model, exact, story, scale=0.0)[1]["samples"]
    x0 = small.model.model.latent_format.process_out(exact.x0.float().cpu())
    assert (output - x0).abs().max().item() <= 1e-5 * max(1.0, x0.abs().max().item())


@pytest.fixture
def latent2rgb_previews(monkeypatch):
    """ComfyUI's own preview path observed: latent2rgb chosen as a user would (--preview-method latent2rgb),
    the shapes its previewer decodes, and what reaches the progress hook the server forwards to the browser."""
    import comfy.cli_args
    import comfy.utils
    import latent_preview

    monkeypatch.setattr(comfy.cli_args.args, "preview_method", comfy.cli_args.LatentPreviewMethod.Latent2RGB)
    decoded, hooked = [], []
    real_decode = latent_preview.Latent2RGBPreviewer.decode_latent_to_preview
    monkeypatch.setattr(latent_preview.Latent2RGBPreviewer, "decode_latent_to_preview",
                        lambda self, x0: decoded.append(tuple(x0.shape)) or real_decode(self, x0))
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: hooked.append((value, total, preview)))
    return decoded, hooked


def assert_a_preview_per_step(hooked: list, steps: int) -> None:
    previews = [(value, total, preview) for value, total, preview in hooked if preview is not None]
    assert [(value, total) for value, total, _ in previews] == [(i + 1, steps) for i in range(steps)]
    assert all(preview[0] == "JPEG" and preview[1].size == (SIZE // 8, SIZE // 8) for _, _, preview in previews)


@pytest.mark.parametrize("batched", [False, True], ids=["one intervention", "two interventions"])
def test_the_latent_preview_shows_every_step_of_the_all_in_one_node(small, modules, inversion, story,
                                                                     latent2rgb_previews, batched):
    decoded, hooked = latent2rgb_previews
    graph, intervention = story
    interventions = [intervention, intervention] if batched else [intervention]
    node = modules["nodes.csg_nodes"].CausalCounterfactuals
    node_output(node.execute(small.model, small.clip, small.vae, inversion, interventions, 8.0, 0.7, WARMUP,
                             "intersect", False, False, causal_graph=graph))
    assert decoded == [(len(interventions), 4, SIZE // 8, SIZE // 8)] * STEPS
    assert_a_preview_per_step(hooked, STEPS)


def test_the_inversion_previews_every_step(small, modules, image, latent2rgb_previews):
    decoded, hooked = latent2rgb_previews
    node = modules["nodes.csg_nodes"].CausalInversion
    node_output(node.execute(small.model, small.clip, small.vae, image, "a photo of a man", STEPS, 0.15, 3.5, False,
                             3, 0))
    assert decoded == [(1, 4, SIZE // 8, SIZE // 8)] * STEPS
    assert_a_preview_per_step(hooked, STEPS)


def test_other_nodes_sampling_wrappers_run_for_the_counterfactual(small, modules, inversion, story):
    import comfy.patcher_extension

    mp = comfy.patcher_extension.WrappersMP
    kinds = (mp.OUTER_SAMPLE, mp.PREPARE_SAMPLING, mp.SAMPLER_SAMPLE, mp.PREDICT_NOISE, mp.CALC_COND_BATCH,
             mp.APPLY_MODEL, mp.DIFFUSION_MODEL)
    calls = collections.Counter()

    def counting(kind):
        def wrapper(executor, *args, **kwargs):
            calls[kind] += 1
            return executor(*args, **kwargs)
        return wrapper

    wrapped = small.model.clone()
    for kind in kinds:
        wrapped.add_wrapper_with_key(kind, "counting-test", counting(kind))
    plain = counterfactual(modules, small, small.model, inversion, story)[1]["samples"]
    output = counterfactual(modules, small, wrapped, inversion, story)[1]["samples"]
    per_sampling = {mp.OUTER_SAMPLE: 1, mp.PREPARE_SAMPLING: 1, mp.SAMPLER_SAMPLE: 1}
    per_step = {mp.PREDICT_NOISE: STEPS, mp.CALC_COND_BATCH: STEPS}
    assert {kind: calls[kind] for kind in (*per_sampling, *per_step)} == per_sampling | per_step
    assert calls[mp.APPLY_MODEL] == calls[mp.DIFFUSION_MODEL] >= STEPS  # one per UNet call, ComfyUI may split rows
    assert torch.equal(output, plain)  # pass-through wrappers change nothing


def test_post_cfg_functions_are_replayed_after_csg(small, modules, inversion, story):
    from comfy_extras.nodes_eps import EpsilonScaling

    seen = []

    def observe(args):
        seen.append((args["cond_scale"], tuple(args["uncond_denoised"].shape),
                     args["cond_denoised"] is args["denoised"]))
        return args["denoised"]

    observed = small.model.clone()
    observed.set_model_sampler_post_cfg_function(observe)
    plain = counterfactual(modules, small, small.model, inversion, story)[1]["samples"]
    assert torch.equal(counterfactual(modules, small, observed, inversion, story)[1]["samples"], plain)
    assert seen == [(1.0, (1, 4, SIZE // 8, SIZE // 8), True)] * STEPS
    scaled = node_output(EpsilonScaling.execute(small.model, 1.2))[0]  # a core post-CFG node
    output = counterfactual(modules, small, scaled, inversion, story)[1]["samples"]
    assert torch.isfinite(output).all() and (output - plain).abs().max() > 1e-3


def test_cfg_patches_csg_cannot_honour_are_refused_by_name(small, modules, inversion, story):
    from comfy_extras.nodes_model_advanced import RescaleCFG

    errors = modules["csg.errors"]
    rescaled = RescaleCFG().patch(small.model, 0.7)[0]  # a sampler_cfg_function
    with pytest.raises(errors.InputError, match="sampler_cfg_function .*rescale_cfg.*before the node"):
        counterfactual(modules, small, rescaled, inversion, story)
    with pytest.raises(errors.InputError, match="sampler_cfg_function .*rescale_cfg"):
        modules["nodes.sampling_nodes"].CSGGuiderNode.execute(rescaled, small.clip, inversion, story[1], 8.0, 0.7,
                                                              WARMUP, "intersect", False, False)
    pre_cfg = small.model.clone()
    pre_cfg.set_model_sampler_pre_cfg_function(lambda args: args["conds_out"])
    with pytest.raises(errors.InputError, match="sampler_pre_cfg_function"):
        counterfactual(modules, small, pre_cfg, inversion, story)
    asks_for_cond = small.model.clone()
    asks_for_cond.set_model_sampler_post_cfg_function(lambda args: args["denoised"] + 0 * args["cond"][0])
    with pytest.raises(errors.InputError, match="asked for args\\['cond'\\]"):
        counterfactual(modules, small, asks_for_cond, inversion, story)


def test_batched_interventions_equal_separate_runs(small, modules, inversion, story):
    graph, intervention = story
    other = modules["csg.graph"].Intervention.from_dict({
        "id": "i2", "target_concept_id": "c3", "target_concept_name": "sky", "intervention_description": "grey sky",
        "original_value": "blue", "new_value": "gray", "final_concept_states": {"c3": "gray sky"},
        "generation_prompt": "a photo of a man under a gray sky"})
    node = modules["nodes.csg_nodes"].CausalCounterfactuals
    images, latents, masks, previews = node_output(node.execute(
        small.model, small.clip, small.vae, inversion, [intervention, other], 8.0, 0.7, WARMUP, "intersect", False,
        False, causal_graph=graph))
    assert images.shape == (2, SIZE, SIZE, 3) and masks.shape == (3, SIZE, SIZE) and previews.shape[0] == 3
    single = counterfactual(modules, small, small.model, inversion, story)[1]["samples"]
    assert (latents["samples"][:1] - single).abs().max() < 1e-5 * single.abs().max()  # rows are independent


def test_baseline_edit_runs_both_methods(small, modules, image, story):
    node = modules["nodes.baseline_nodes"].BaselineEdit
    for method in ("DDPM inversion (edit-friendly)", "DDIM inversion"):
        out_image, latent = node_output(node.execute(small.model, small.clip, small.vae, image, story[1], method,
                                                     "a photo of a man", 4, 0.15, 3.5, 7.5, 0))
        assert out_image.shape == (1, SIZE, SIZE, 3) and torch.isfinite(latent["samples"]).all()


def tiny_sd15_model():
    """A Stable Diffusion 1.x MODEL (not SDXL), tiny; its weights are never used."""
    import comfy.model_patcher
    import comfy.supported_models

    config = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                  adm_in_channels=None, in_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
                  transformer_depth=[1, 1], transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1],
                  use_linear_in_transformer=False, context_dim=768, num_heads=8, use_temporal_attention=False,
                  use_temporal_resblock=False)
    base = comfy.supported_models.SD15(config).get_model({}, device="cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device="cpu", offload_device="cpu")


def test_clear_errors_for_a_non_sdxl_model_v_prediction_and_bad_sizes(small, modules, image, story):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    errors = modules["csg.errors"]
    inversion_node = modules["nodes.csg_nodes"].CausalInversion
    v_model = ModelSamplingDiscrete().patch(small.model, "v_prediction", False)[0]
    with pytest.raises(errors.InputError, match="epsilon-prediction"):
        inversion_node.execute(v_model, small.clip, small.vae, image, "", STEPS, 0.15, 3.5, False, 3, 0)
    with pytest.raises(errors.InputError, match="needs an SDXL model"):
        inversion_node.execute(tiny_sd15_model(), small.clip, small.vae, image, "", STEPS, 0.15, 3.5, False, 3, 0)
    with pytest.raises(errors.InputError, match="divisible by 32"):
        inversion_node.execute(small.model, small.clip, small.vae, image[:, :48], "", STEPS, 0.15, 3.5, False, 3, 0)
    with pytest.raises(errors.InputError, match="one image"):
        inversion_node.execute(small.model, small.clip, small.vae, image.expand(2, -1, -1, -1), "", STEPS, 0.15,
                               3.5, False, 3, 0)
