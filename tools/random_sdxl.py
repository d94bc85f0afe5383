"""SDXL-shaped diffusers components with random weights, built from configs (no downloads).

Two sizes:

* ``"tiny"``: for CPU tests. Three UNet levels, so cross-attention exists at latent/4 in both the
  down path (``down_blocks.2``) and the up path (``up_blocks.0``), exactly where SDXL has it; two
  transformer layers there, so averaging over layers is exercised. The VAE downsamples by 2, so a
  64x64 image gives a 32x32 latent and 8x8 attention maps. Text encoders are 2-3 layers wide enough
  to be told apart. The tokenizer is a CLIP BPE tokenizer over a made-up vocabulary (all 256
  byte symbols, their end-of-word forms, whole-word merges for a small word list, and CLIP's
  start/end tokens last), so BOS/EOS/padding behave as CLIP's do and common words are one token.
* ``"full"``: the SDXL base 1.0 architecture (DESIGN.md section 7), for GPU timing. UNet weight
  matrices are scaled by 0.5 so fp16 activations stay finite. The tokenizer vocabulary is made up
  but has CLIP's 49,408 entries.

``build_sdxl_components(size, seed)`` is deterministic for a given seed and device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from csg.diffusers_host import sdxl_vae_dtype

Size = Literal["tiny", "full"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TOKENIZER_2_PAD = "!"  # SDXL's second tokenizer pads with "!" (id 0), the first with end-of-text

# Words that become single tokens in the tiny vocabulary (everything else splits into bytes).
TINY_WORDS = (
    "a an the of in on with and photo portrait man woman person child dog cat car street garden "
    "hair black blond brown red blue green white gray yellow eyes eye smiling smile sad old young "
    "beard glasses hat sunny rainy snowy night day sky wet dry wearing shirt dress face tree house"
).split()


@dataclass
class SDXLComponents:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    vae: AutoencoderKL


def clip_vocabulary(size: Size) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A made-up CLIP BPE vocabulary and merge list; start/end-of-text get the two highest ids."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    if size == "tiny":
        for word in TINY_WORDS:
            left = word[0]
            for i, ch in enumerate(word[1:], start=1):
                right = ch + "</w>" if i == len(word) - 1 else ch
                merges.append((left, right))
                left = left + right
        merges = list(dict.fromkeys(merges))  # words sharing a prefix share its merges
    else:
        # Fill up to CLIP's 49,408 entries with pairs of byte symbols.
        wanted = 49408 - 2 - len(tokens)
        pairs = ((a, b) for a in symbols for b in symbols + [s + "</w>" for s in symbols])
        merges = [next(pairs) for _ in range(wanted)]
    tokens += [a + b for a, b in merges]
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(size: Size, pad_token: str = EOS) -> CLIPTokenizer:
    vocab, merges = clip_vocabulary(size)
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def unet_config(size: Size) -> dict:
    common = dict(
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True,
        addition_embed_type="text_time",
    )
    if size == "full":
        return common | dict(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    return common | dict(
        sample_size=32,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 2, 4),
        norm_num_groups=8,
        cross_attention_dim=32 + 64,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )


def text_configs(size: Size, vocab_size: int) -> tuple[CLIPTextConfig, CLIPTextConfig]:
    ids = dict(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=vocab_size - 2,
               eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    if size == "full":
        one = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             hidden_act="quick_gelu", projection_dim=768, **ids)
        two = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                             hidden_act="gelu", projection_dim=1280, **ids)
    else:
        one = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             hidden_act="quick_gelu", projection_dim=32, **ids)
        two = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                             hidden_act="gelu", projection_dim=32, **ids)
    return one, two


def vae_config(size: Size) -> dict:
    if size == "full":
        blocks = (128, 256, 512, 512)
        return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=blocks, layers_per_block=2,
                    latent_channels=4, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                norm_num_groups=8, latent_channels=4, sample_size=64, scaling_factor=0.13025, force_upcast=False)


def build_sdxl_components(size: Size = "tiny", seed: int = 0, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32) -> SDXLComponents:
    """Random-weight SDXL components; the same seed on the same device gives the same weights."""
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    tokenizer = clip_tokenizer(size)
    tokenizer_2 = clip_tokenizer(size, pad_token=TOKENIZER_2_PAD)
    config_1, config_2 = text_configs(size, len(tokenizer))
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config(size))
        text_encoder = CLIPTextModel(config_1)
        text_encoder_2 = CLIPTextModelWithProjection(config_2)
        vae = AutoencoderKL(**vae_config(size))
    if size == "full":
        with torch.no_grad():
            for p in unet.parameters():
                if p.dim() >= 2:
                    p.mul_(0.5)
    models = [unet, text_encoder, text_encoder_2, vae]
    for m in models:
        m.requires_grad_(False).eval()
    vae_dtype = sdxl_vae_dtype(dtype, device) if vae.config.force_upcast else dtype
    for m, wanted in ((unet, dtype), (text_encoder, dtype), (text_encoder_2, dtype), (vae, vae_dtype)):
        if m.dtype != wanted:
            m.to(dtype=wanted)
    return SDXLComponents(unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2, vae)
