"""One small random-weight SDXL, held twice: as ComfyUI objects (MODEL, CLIP, VAE) and as diffusers modules.

The ComfyUI side is built with ComfyUI's own classes (``supported_models.SDXL`` -> ``get_model``,
``comfy.sd.CLIP`` with SDXL's clip target, ``comfy.sd.VAE`` from an AutoencoderKL state dict), with
every parameter initialised explicitly. The UNet is SDXL-shaped but narrow: three levels with
channels (64, 64, 128), cross-attention at latent/2 (1 layer) and latent/4 (2 layers), SDXL's
2048-wide context and 2816-wide pooled/size embedding. The text encoders are SDXL's (fixed
configs). The diffusers side receives the very same tensors: the UNet through ComfyUI's own
diffusers key map (``comfy.utils.unet_to_diffusers``), the CLIP encoders by their Hugging Face
names, the VAE from the state dict the ComfyUI VAE was made from, the tokenizers from the real
CLIP vocabulary shipped in ComfyUI. So the two hosts differ only in their code paths.

Imported by the ComfyUI tests and benchmarks/comfy_benchmark.py; nothing here is committed as weights,
and building takes about 20 s on one CPU core.
"""

from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from tools.comfyui_harness import import_comfy

REPO = Path(__file__).resolve().parents[1]
PACK_MODULE = "csg_comfy_pack"

UNET_CONFIG = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=64, num_res_blocks=[1, 1, 1],
    channel_mult=[1, 1, 2], transformer_depth=[0, 1, 2], transformer_depth_middle=2,
    transformer_depth_output=[0, 0, 1, 1, 2, 2], use_linear_in_transformer=True, context_dim=2048,
    use_temporal_attention=False,
)
DIFFUSERS_UNET_CONFIG = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 64, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 1, 2), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, latent_channels=4, scaling_factor=0.13025)


def pack_module(name: str):
    """A module of this pack (e.g. "nodes.comfy_host"), imported as ComfyUI imports the pack: as a package.

    When the ComfyUI harness has already loaded the pack as a custom node, its copy is reused, so
    types (Intervention, Inversion) are the same classes on both sides.
    """
    import_comfy()
    for loaded in list(sys.modules.values()):
        # a package only: pytest imports the repository's own __init__.py as a plain module named "__init__"
        if getattr(loaded, "__file__", None) == str(REPO / "__init__.py") and hasattr(loaded, "__path__"):
            return importlib.import_module(f"{loaded.__name__}.{name}")
    if PACK_MODULE not in sys.modules:
        package = types.ModuleType(PACK_MODULE)
        package.__path__ = [str(REPO)]
        package.__file__ = None
        sys.modules[PACK_MODULE] = package
    return importlib.import_module(f"{PACK_MODULE}.{name}")


def initialise(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops leave weights uninitialised: fill each one, fan-in scaled so activations stay O(1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.numel() == 0:
                continue
            noise = torch.randn(p.shape, generator=generator)
            if p.dim() >= 2:
                p.copy_(noise * p[0].numel() ** -0.5)
            elif name.endswith("weight"):  # normalisation gains
                p.copy_(1.0 + 0.02 * noise)
            else:
                p.copy_(0.02 * noise)


@dataclass
class SmallSDXL:
    model: object  # ModelPatcher
    clip: object  # comfy.sd.CLIP
    vae: object  # comfy.sd.VAE
    vae_state_dict: dict


def build_comfy_sdxl(seed: int = 0, unet_config: dict = UNET_CONFIG) -> SmallSDXL:
    """ComfyUI's SDXL model, CLIP and VAE with seeded random weights; the UNet shaped by ``unet_config``."""
    import_comfy()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    from diffusers import AutoencoderKL

    config = comfy.supported_models.SDXL(dict(unet_config))
    base = config.get_model({}, device="cpu")
    initialise(base, seed)
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    clip = comfy.sd.CLIP(config.clip_target({}), parameters=0)
    initialise(clip.cond_stage_model, seed + 1)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 2)
        vae_state_dict = AutoencoderKL(**VAE_CONFIG).state_dict()
    vae = comfy.sd.VAE(sd=dict(vae_state_dict))
    return SmallSDXL(model, clip, vae, vae_state_dict)


def diffusers_host_of(small: SmallSDXL):
    """A DiffusersSDXLHost over the same weights (see the module docstring)."""
    import comfy.utils
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    host_module = pack_module("csg.diffusers_host")
    comfy_unet = small.model.model.diffusion_model.state_dict()
    key_map = comfy.utils.unet_to_diffusers(small.model.model.model_config.unet_config)
    unet = UNet2DConditionModel(**DIFFUSERS_UNET_CONFIG)
    wanted = unet.state_dict().keys()
    unet.load_state_dict({k: comfy_unet[v] for k, v in key_map.items() if k in wanted})  # strict: every key filled

    clip_model = small.clip.cond_stage_model
    vocabulary = Path(sys.modules["comfy.sd1_clip"].__file__).parent / "sd1_tokenizer"
    tokenizers = [CLIPTokenizer(str(vocabulary / "vocab.json"), str(vocabulary / "merges.txt"), pad_token=pad,
                                model_max_length=77) for pad in ("<|endoftext|>", "!")]
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    text_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768,
                                          pad_token_id=49407, **common))
    text_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                        num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                                                        pad_token_id=0, **common))
    for hf, comfy_encoder in ((text_l, clip_model.clip_l), (text_g, clip_model.clip_g)):
        wanted = hf.state_dict().keys()
        state = {}
        for key, value in comfy_encoder.transformer.state_dict().items():
            names = [n for n in (key, key.removeprefix("text_model."), f"text_model.{key}") if n in wanted]
            if names:  # CLIP-L's unused projection has no counterpart in CLIPTextModel
                state[names[0]] = value
        hf.load_state_dict(state)  # strict: every weight comes from the ComfyUI encoder
    vae = AutoencoderKL(**VAE_CONFIG)
    vae.load_state_dict(small.vae_state_dict)
    for m in (unet, text_l, text_g, vae):
        m.requires_grad_(False).eval()
    return host_module.DiffusersSDXLHost(unet, text_l, text_g, tokenizers[0], tokenizers[1], vae)


def node_output(output) -> tuple:
    """The values of a V3 ``io.NodeOutput``."""
    return tuple(output.args)


def write_random_lpips_weights(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Random VGG16 and LPIPS heads in ``folder``, saved as torchvision and the lpips package ship them."""
    metrics = pack_module("csg.metrics")
    torch.manual_seed(seed)
    features, heads = metrics.vgg16_features(), metrics.lpips_heads()
    with torch.no_grad():
        for head in heads:  # LPIPS heads are non-negative channel weights
            head.weight.abs_()
    folder.mkdir(parents=True, exist_ok=True)
    vgg = {f"features.{k}": v for k, v in features.state_dict().items()}
    vgg["classifier.6.bias"] = torch.zeros(1000)  # a full torchvision checkpoint also holds the classifier
    torch.save(vgg, folder / metrics.VGG16_FILE)
    torch.save({f"lin{k}.model.1.weight": h.weight.detach().clone() for k, h in enumerate(heads)},
               folder / metrics.LPIPS_HEADS_FILE)
    return folder / metrics.VGG16_FILE, folder / metrics.LPIPS_HEADS_FILE
