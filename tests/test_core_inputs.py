"""What the core does with bad input, and what the diffusers host promises (encoding, attention
processors left as found, loading from local files only)."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from csg.abduction import invert, invert_latents
from csg.diffusers_host import DiffusersSDXLHost
from csg.errors import CSGError, InputError, WeightsMissingError
from csg.guidance import ConceptTerm, EditSpec, GuidanceParams, check_specs
from csg.host import AttentionRequest, DiffusionHost
from csg.images import image_to_tensor
from csg.prediction import edit
from tests.sdxl_fixtures import sample_image


@pytest.fixture(scope="module")
def inversion(tiny_host):
    return invert_latents(tiny_host, torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)),
                          num_steps=6)


# -- images ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(70, 64), (64, 52), (100, 100)])
def test_sides_not_divisible_are_refused_with_a_valid_size(tiny_host, size):
    with pytest.raises(InputError, match=r"divisible by 8.*e\.g\. to"):
        invert(tiny_host, sample_image(*size), num_steps=4)


def test_grayscale_is_converted_to_rgb():
    gray = sample_image().convert("L")
    expected = image_to_tensor(gray.convert("RGB"))
    assert torch.equal(image_to_tensor(gray), expected)
    assert torch.equal(image_to_tensor(expected[0, :1]), expected)


def test_opaque_rgba_drops_alpha_and_transparent_rgba_goes_onto_white():
    rgb = sample_image()
    opaque = rgb.convert("RGBA")
    assert torch.equal(image_to_tensor(opaque), image_to_tensor(rgb))
    assert torch.equal(image_to_tensor(torch.cat([image_to_tensor(rgb)[0], torch.ones(1, 64, 64)])),
                       image_to_tensor(rgb))
    transparent = opaque.copy()
    transparent.putpixel((3, 3), (0, 0, 0, 0))
    assert torch.equal(image_to_tensor(transparent)[0, :, 3, 3], torch.ones(3))
    assert torch.equal(image_to_tensor(torch.zeros(4, 64, 64)), torch.ones(1, 3, 64, 64))


@pytest.mark.parametrize("bad, message", [
    (torch.rand(2, 3, 64, 64), "one image"),
    (torch.rand(5, 64, 64), "channels"),
    (torch.rand(3, 64, 64) * 255, r"\[0, 1\]"),
    ("image.png", "PIL image or a torch tensor"),
])
def test_malformed_tensors_are_refused(bad, message):
    with pytest.raises(InputError, match=message):
        image_to_tensor(bad)


def test_invert_accepts_a_grayscale_image(tiny_host):
    inversion = invert(tiny_host, sample_image().convert("L"), num_steps=4)
    assert inversion.x0.shape == (1, 4, 32, 32) and inversion.image_size == (64, 64)


# -- edits -----------------------------------------------------------------------------------------


def test_empty_intervention_list_and_empty_concept_list_are_refused(tiny_host, inversion):
    with pytest.raises(InputError, match="at least one EditSpec"):
        edit(tiny_host, inversion, [])
    with pytest.raises(InputError, match="no concept to guide"):
        edit(tiny_host, inversion, [EditSpec(())])
    with pytest.raises(InputError, match="empty prompt"):
        ConceptTerm("  ", warmup=0)
    with pytest.raises(InputError, match="empty protected phrase"):
        edit(tiny_host, inversion, [EditSpec((ConceptTerm("black hair", warmup=0),), protect=(" ",))])


def test_prompt_the_tokenizer_would_truncate_is_refused(tiny_host, inversion):
    long_prompt = " ".join(["black hair"] * 60)
    with pytest.raises(InputError, match="at most 75"):
        tiny_host.token_indices(long_prompt)
    with pytest.raises(InputError, match="Shorten"):
        edit(tiny_host, inversion, [EditSpec((ConceptTerm(long_prompt, warmup=0),))])
    with pytest.raises(InputError, match="Shorten"):  # before any inversion, given the host
        check_specs([EditSpec((ConceptTerm("black hair", warmup=0),), protect=(long_prompt,))], 6, host=tiny_host)


def test_fewer_steps_than_warmup_is_refused(tiny_host, inversion):
    with pytest.raises(InputError, match=r"no step would be guided.*warm-up \(10 steps\).*the end \(6 steps\)"):
        edit(tiny_host, inversion, [EditSpec((ConceptTerm("black hair", warmup=10),))])
    with pytest.raises(InputError, match=r"no step would be guided.*the cool-down \(step 3\)"):
        edit(tiny_host, inversion, [EditSpec((ConceptTerm("black hair", warmup=3, cooldown=3),))])


@pytest.mark.parametrize("settings, message", [
    (dict(threshold=1.5), "threshold must be in"),
    (dict(threshold=float("nan")), "threshold must be in"),
    (dict(scale=float("nan")), "finite"),
    (dict(warmup=-1), "non-negative"),
    (dict(cooldown=-2), "non-negative"),
])
def test_bad_term_settings_are_refused_when_the_term_is_made(settings, message):
    with pytest.raises(InputError, match=f"'black hair'.*{message}"):
        ConceptTerm("black hair", **settings)


@pytest.mark.parametrize("settings, message", [
    (dict(mask_mode="union"), "mask_mode"),
    (dict(protect_threshold=-0.1), "protect_threshold"),
])
def test_bad_guidance_params_are_refused_when_made(settings, message):
    with pytest.raises(InputError, match=message):
        GuidanceParams(**settings)


# -- the diffusers host ------------------------------------------------------------------------------


def test_host_implements_the_protocol(tiny_host):
    assert isinstance(tiny_host, DiffusionHost)
    assert tiny_host.vae_scale_factor == 2 and tiny_host.latent_multiple == 4


def test_prompt_encoding_is_sdxl_style(tiny_host, tiny_components):
    cond = tiny_host.encode_prompts(["", "black hair"])
    assert cond.prompt_embeds.shape == (2, 77, 32 + 64) and cond.pooled_embeds.shape == (2, 32)
    assert cond.prompt_embeds[0].abs().max() == 0 and cond.pooled_embeds[0].abs().max() == 0
    ids = tiny_components.tokenizer_2("black hair", padding="max_length", max_length=77, return_tensors="pt").input_ids
    out = tiny_components.text_encoder_2(ids, output_hidden_states=True)
    # each prompt is encoded on its own, so the bits are those of a batch of one
    assert torch.equal(cond.prompt_embeds[1, :, 32:], out.hidden_states[-2][0])
    assert torch.equal(cond.pooled_embeds[1], out.text_embeds[0])


def test_a_prompt_is_encoded_once_and_the_same_in_every_batch(tiny_components):
    """Exact mode needs the edit's source row to be the inversion's: the text encoders' rounding
    depends on the batch size, so every distinct prompt is encoded alone and kept."""
    host = DiffusersSDXLHost.from_components(tiny_components)
    forwards = []
    hooks = [e.register_forward_hook(lambda m, i, o: forwards.append(i[0].shape[0])) for e in host.text_encoders]
    try:
        alone = host.encode_prompts(["a photo"])
        assert forwards == [1, 1]
        mixed = host.encode_prompts(["", "a photo", "black hair", "", "a photo", "smiling"])
        assert forwards == [1, 1] + [1] * 6  # "", "black hair", "smiling" through both encoders, once each
        for row in (1, 4):
            assert torch.equal(mixed.prompt_embeds[row], alone.prompt_embeds[0])
            assert torch.equal(mixed.pooled_embeds[row], alone.pooled_embeds[0])
        assert mixed.prompt_embeds[[0, 3]].abs().max() == 0 and mixed.pooled_embeds[[0, 3]].abs().max() == 0
        host.encode_prompts(["smiling", "a photo"])
        assert len(forwards) == 8  # all cached
        host.forget_prompts()
        host.encode_prompts(["a photo"])
        assert len(forwards) == 10
    finally:
        for hook in hooks:
            hook.remove()


def test_token_indices_are_the_real_tokens(tiny_host, tiny_components):
    ids = tiny_components.tokenizer("black hair, smiling").input_ids
    assert tiny_host.token_indices("black hair, smiling") == list(range(1, len(ids) - 1))
    assert tiny_host.token_indices("hair") == [1]


def test_time_ids_are_height_first(tiny_host):
    assert tiny_host._time_ids_for(32, 48).tolist() == [[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]]


def test_capture_layers_are_the_latent4_cross_attentions(tiny_host):
    names = sorted(tiny_host.capture_layers)
    assert names and all(n.endswith("attn2") for n in names)
    assert {n.split(".attentions")[0] for n in names} == {"down_blocks.2", "up_blocks.0"}


def test_attention_maps_are_probabilities(tiny_host):
    cond = tiny_host.encode_prompts(["", "black hair", "smiling"])
    latents = torch.randn(3, 4, 32, 24)
    everything = AttentionRequest((1, 2), (tuple(range(77)), tuple(range(77))))
    _, maps = tiny_host.predict_noise(latents, 500, cond, everything)
    assert maps.shape == (2, 8, 6) and torch.allclose(maps, torch.ones_like(maps), atol=1e-5)
    real = AttentionRequest((1,), (tuple(tiny_host.token_indices("black hair")),))
    eps_plain, none = tiny_host.predict_noise(latents, 500, cond)
    eps, maps = tiny_host.predict_noise(latents, 500, cond, real)
    assert none is None and torch.allclose(eps, eps_plain, atol=1e-5)
    assert maps.shape == (1, 8, 6) and 0 < maps.min() and maps.max() < 1


def test_attention_processors_are_left_as_found(tiny_host, tiny_components, inversion):
    unet = tiny_components.unet
    before = dict(unet.attn_processors)
    assert all(isinstance(p, AttnProcessor2_0) for p in before.values())
    seen = {}

    def record(name):
        def hook(module, args):
            seen.setdefault(name, set()).add(type(module.processor).__name__)
        return hook

    hooks = [module.register_forward_pre_hook(record(name))
             for name, module in unet.named_modules() if name.endswith(("attn1", "attn2"))]
    try:
        edit(tiny_host, inversion, [EditSpec((ConceptTerm("black hair", warmup=0),))])
    finally:
        for hook in hooks:
            hook.remove()
    swapped = {n for n, kinds in seen.items() if kinds != {"AttnProcessor2_0"}}
    assert swapped == set(tiny_host.capture_layers)  # only latent/4 attn2 ever ran our processor
    assert unet.attn_processors == before
    cond = tiny_host.encode_prompts(["", "hair"])
    with pytest.raises(InputError):  # a failing call restores them too
        tiny_host.predict_noise(torch.randn(3, 4, 32, 32), 10, cond, AttentionRequest((1,), ((1,),)))
    with pytest.raises(RuntimeError):
        tiny_host.predict_noise(torch.randn(2, 4, 30, 30), 10, cond, AttentionRequest((1,), ((1,),)))
    assert unet.attn_processors == before


def test_custom_processors_are_not_silently_replaced(tiny_components):
    host = DiffusersSDXLHost.from_components(tiny_components)
    name, layer = next(iter(host.capture_layers.items()))
    original = layer.processor
    layer.processor = object.__new__(type("IPAdapterLike", (), {}))
    try:
        with pytest.raises(CSGError, match="custom attention processor"):
            host.predict_noise(torch.randn(1, 4, 32, 32), 10, host.encode_prompts([""]),
                               AttentionRequest((0,), ((1,),)))
    finally:
        layer.processor = original


def test_from_pretrained_loads_local_files(tiny_components, tiny_host, tmp_path):
    c = tiny_components
    for sub, part in [("unet", c.unet), ("vae", c.vae), ("text_encoder", c.text_encoder),
                      ("text_encoder_2", c.text_encoder_2), ("tokenizer", c.tokenizer), ("tokenizer_2", c.tokenizer_2)]:
        part.save_pretrained(tmp_path / sub)
    loaded = DiffusersSDXLHost.from_pretrained(tmp_path)
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    cond_a, cond_b = tiny_host.encode_prompts(["", "black hair"]), loaded.encode_prompts(["", "black hair"])
    assert torch.allclose(cond_a.prompt_embeds, cond_b.prompt_embeds, atol=1e-6)
    eps_a, _ = tiny_host.predict_noise(latents, 300, cond_a)
    eps_b, _ = loaded.predict_noise(latents, 300, cond_b)
    assert torch.allclose(eps_a, eps_b, atol=1e-5)


def test_missing_weights_name_what_to_get_and_where(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(WeightsMissingError, match=r"vae/.*text_encoder/.*hf download"):
        DiffusersSDXLHost.from_pretrained(tmp_path)
    with pytest.raises(WeightsMissingError, match="sd_xl_base_1.0.safetensors"):
        DiffusersSDXLHost.from_single_file(tmp_path / "sdxl.safetensors", tmp_path)
    checkpoint = tmp_path / "sdxl.safetensors"
    checkpoint.write_bytes(b"")
    with pytest.raises(WeightsMissingError, match=r"model_index\.json.*--include"):
        DiffusersSDXLHost.from_single_file(checkpoint, tmp_path)


def test_non_square_images_edit_end_to_end(tiny_host):
    inversion = invert(tiny_host, sample_image(64, 96), "a photo", num_steps=6)
    assert inversion.image_size == (64, 96) and inversion.x0.shape == (1, 4, 32, 48)
    result = edit(tiny_host, inversion, [EditSpec((ConceptTerm("black hair", warmup=1),))])
    assert result.latents.shape == (1, 4, 32, 48) and result.masks[0].shape == (1, 32, 48)
    assert tiny_host.decode_latents(result.latents).shape == (1, 3, 64, 96)


# -- the random SDXL builder ---------------------------------------------------------------------------


def test_tiny_components_are_deterministic_under_a_seed():
    from tools.random_sdxl import build_sdxl_components

    a, b, c = (build_sdxl_components("tiny", seed=s).text_encoder_2.state_dict() for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_full_size_configs_are_sdxl_base():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from tools.random_sdxl import clip_tokenizer, text_configs, unet_config, vae_config

    tokenizer = clip_tokenizer("full")
    config_1, config_2 = text_configs("full", len(tokenizer))
    with torch.device("meta"):
        parts = [UNet2DConditionModel(**unet_config("full")), CLIPTextModel(config_1),
                 CLIPTextModelWithProjection(config_2), AutoencoderKL(**vae_config("full"))]
    millions = [round(sum(p.numel() for p in m.parameters()) / 1e6) for m in parts]
    assert len(tokenizer) == 49408 and millions == [2567, 123, 695, 84]
