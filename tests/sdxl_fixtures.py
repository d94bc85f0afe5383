"""Tiny random-weight SDXL pieces for tests, importable as ``from tests.sdxl_fixtures import ...``.

``tests/conftest.py`` wraps the expensive ones as session fixtures (``tiny_components``,
``tiny_host``). The reference pipeline here is diffusers' LEditsPPPipelineStableDiffusionXL; it
is a test oracle only and never imported by product code.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from transformers import CLIPTokenizer

from csg.diffusers_host import DiffusersSDXLHost
from tools.random_sdxl import EOS, TOKENIZER_2_PAD, SDXLComponents, build_sdxl_components, clip_vocabulary

IMAGE_SIZE = 64  # pixels; the tiny VAE halves it, so latents are 32x32 and attention maps 8x8


def tiny_components(seed: int = 0) -> SDXLComponents:
    return build_sdxl_components("tiny", seed=seed)


def tiny_host(components: SDXLComponents) -> DiffusersSDXLHost:
    return DiffusersSDXLHost.from_components(components)


def sample_image(height: int = IMAGE_SIZE, width: int = IMAGE_SIZE, seed: int = 0) -> Image.Image:
    """A smooth synthetic RGB picture (a few colored blobs on a gradient), deterministic under ``seed``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    pixels = np.stack([xx, yy, 1 - xx], axis=-1) * 0.5
    for _ in range(4):
        cy, cx, radius = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.25)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / radius**2)[..., None]
        pixels = pixels * (1 - blob) + blob * rng.uniform(0, 1, size=3)
    return Image.fromarray((pixels.clip(0, 1) * 255).astype(np.uint8))


class RealLengthCLIPTokenizer(CLIPTokenizer):
    """CLIP tokenizer whose ``length`` counts real tokens (the attention-mask sum), not padding.

    diffusers' LEDITS++ takes ``length - 2`` as the number of edit tokens; under transformers 5
    ``length`` is the padded length, so the oracle needs this to average over the real tokens.
    """

    def __call__(self, *args, **kwargs):
        out = super().__call__(*args, **kwargs)
        if kwargs.get("return_length"):
            out["length"] = torch.as_tensor(out["attention_mask"]).sum(-1)
        return out


def real_length_tokenizers() -> tuple[RealLengthCLIPTokenizer, RealLengthCLIPTokenizer]:
    vocab, merges = clip_vocabulary("tiny")
    make = lambda pad: RealLengthCLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=77)  # noqa: E731
    return make(EOS), make(TOKENIZER_2_PAD)


def reference_pipeline(components: SDXLComponents):
    """diffusers' LEDITS++ SDXL pipeline over the same modules, with SDXL's scheduler settings."""
    from diffusers import DPMSolverMultistepScheduler, LEditsPPPipelineStableDiffusionXL

    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            steps_offset=1, algorithm_type="sde-dpmsolver++", solver_order=2)
    tokenizer, tokenizer_2 = real_length_tokenizers()
    c = components
    pipe = LEditsPPPipelineStableDiffusionXL(vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
                                             tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=c.unet,
                                             scheduler=scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def restored_attention_processors(unet):
    """The reference pipeline replaces every attention processor and never restores them; we do."""
    saved = unet.attn_processors
    try:
        yield
    finally:
        unet.set_attn_processor(saved)
