"""The CLI's single-file path: an SDXL checkpoint from ComfyUI's models folder, read by diffusers.

``DiffusersSDXLHost.from_single_file`` is what ``csg-counterfactual --sdxl model.safetensors`` uses.
Here it reads the random-weight test checkpoint, which ComfyUI wrote with ``save_checkpoint`` and
so has exactly the key layout of a real SDXL file, next to a diffusers config folder describing the
same architecture (as ``hf download ... --include '*.json' '*.txt'`` gives for the real
model). It must predict what ComfyUI predicts after CheckpointLoaderSimple loaded the same file.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tools.comfy_sdxl import VAE_CONFIG, pack_module

SIZE = 64
DIFFUSERS_UNET = dict(  # the test checkpoint's UNet (tools/sdxl_checkpoint.py) in diffusers' terms
    _class_name="UNet2DConditionModel", sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 320, 320],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 5, 5], cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SCHEDULER = dict(  # SDXL base's scheduler config
    _class_name="EulerDiscreteScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
)
PIPELINE = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"]}


def write_config_folder(folder: Path) -> Path:
    """SDXL's configs and tokenizers without weights, for the test checkpoint's architecture."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    def write(relative: str, content: dict) -> None:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(json.dumps(content))

    write("model_index.json", PIPELINE)
    write("unet/config.json", DIFFUSERS_UNET)
    write("vae/config.json", {"_class_name": "AutoencoderKL", **VAE_CONFIG,
                              "down_block_types": list(VAE_CONFIG["down_block_types"]),
                              "up_block_types": list(VAE_CONFIG["up_block_types"]),
                              "block_out_channels": list(VAE_CONFIG["block_out_channels"])})
    write("scheduler/scheduler_config.json", SCHEDULER)
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu", projection_dim=768, pad_token_id=49407,
                   architectures=["CLIPTextModel"], **common).save_pretrained(folder / "text_encoder")
    CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280, pad_token_id=0,
                   architectures=["CLIPTextModelWithProjection"], **common).save_pretrained(folder / "text_encoder_2")
    vocabulary = Path(sys.modules["comfy.sd1_clip"].__file__).parent / "sd1_tokenizer"  # CLIP's real BPE files
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        CLIPTokenizer(str(vocabulary / "vocab.json"), str(vocabulary / "merges.txt"), pad_token=pad,
                      model_max_length=77).save_pretrained(folder / name)
        for bpe_file in ("vocab.json", "merges.txt"):  # the hub's SDXL folders ship these, not tokenizer.json alone
            shutil.copy(vocabulary / bpe_file, folder / name / bpe_file)
    return folder


@pytest.fixture(scope="module")
def hosts(comfyui, sdxl_checkpoint, tmp_path_factory):
    import comfy.sd1_clip  # noqa: F401  (its folder holds the tokenizer files)
    import folder_paths

    loaded = comfyui.run({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sdxl_checkpoint}}},
                         outputs=["1"])
    model, clip, vae = loaded.outputs["1"]
    comfy_host = pack_module("nodes.comfy_host").ComfySDXLHost(model, clip, vae)
    config = write_config_folder(tmp_path_factory.mktemp("sdxl-config"))
    path = folder_paths.get_full_path("checkpoints", sdxl_checkpoint)
    single_file_host = pack_module("csg.diffusers_host").DiffusersSDXLHost.from_single_file(path, config)
    return comfy_host, single_file_host


def test_a_comfyui_checkpoint_file_predicts_in_diffusers_what_it_predicts_in_comfyui(hosts):
    comfy_host, single_file_host = hosts
    prompts = ["", "black hair", "a photo of a man with black hair"]
    ours, theirs = single_file_host.encode_prompts(prompts), comfy_host.encode_prompts(prompts)
    assert single_file_host.token_indices("black hair") == comfy_host.token_indices("black hair")
    latents = torch.randn(3, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(3))
    request = pack_module("csg.host").AttentionRequest((1,), (tuple(comfy_host.token_indices("black hair")),))
    with comfy_host.loaded(latents.shape):
        for t in (1, 501, 981):
            eps, maps = single_file_host.predict_noise(latents, t, ours, request)
            comfy_eps, comfy_maps = comfy_host.predict_noise(latents, t, theirs, request)
            # same weights through two loaders and two attention kernels: rounding only
            assert (eps - comfy_eps.cpu()).abs().max() < 1e-4 * comfy_eps.abs().max()
            assert (maps - comfy_maps.cpu()).abs().max() < 1e-5
    assert (single_file_host.alphas_cumprod.cpu() - comfy_host.alphas_cumprod.cpu()).abs().max() < 1e-6
    pixels = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(single_file_host.encode_image(pixels), comfy_host.encode_image(pixels).cpu(),
                               rtol=1e-4, atol=1e-4)
