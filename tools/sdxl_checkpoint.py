"""A random-weight checkpoint that ComfyUI's CheckpointLoaderSimple detects and loads as SDXL.

Built once with ComfyUI's own classes and written with ``comfy.sd.save_checkpoint``, so the file
has exactly the layout of a real SDXL checkpoint. The UNet keeps everything SDXL detection looks
at (320 channels, transformer depths [0, 0, 2, 2, 10, 10], 2048-wide context, 2816-wide pooled and
size embedding, linear projections) but does not widen its channels with depth
(``channel_mult=[1, 1, 1]``), which brings it from 2.6 B to about 283 M parameters. The two text
encoders have SDXL's fixed shapes (about 820 M parameters) and the VAE is SDXL's.

Every parameter is set explicitly (ComfyUI's ops leave weights uninitialised), fan-in scaled so
activations stay O(1) through the depth, and the VAE comes from diffusers' AutoencoderKL init.
The file lives in a cache folder outside the repository and is reused across runs; its name
carries a version, so a change to the recipe builds a new file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tools.comfy_sdxl import build_comfy_sdxl

CHECKPOINT_NAME = "csg-test-sdxl-random-v1.safetensors"

SMALL_SDXL_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    channel_mult=[1, 1, 1], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_linear_in_transformer=True, context_dim=2048,
    num_head_channels=64, use_temporal_attention=False, use_temporal_resblock=False,
)


def cache_folder() -> Path:
    """$CSG_TEST_CACHE, else ~/.cache/csg-tests."""
    return Path(os.environ.get("CSG_TEST_CACHE") or Path.home() / ".cache" / "csg-tests").expanduser()


def build_checkpoint(path: Path, seed: int = 0) -> None:
    """Write the checkpoint to ``path`` (atomically: a half-written file is never seen)."""
    import comfy.model_management
    import comfy.sd

    small = build_comfy_sdxl(seed, SMALL_SDXL_UNET)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        comfy.sd.save_checkpoint(str(partial), small.model, small.clip, small.vae)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    del small
    comfy.model_management.unload_all_models()


def ensure_checkpoint() -> Path:
    """The cached checkpoint, built first if missing (about a minute on two CPU cores)."""
    path = cache_folder() / CHECKPOINT_NAME
    if not path.is_file():
        started = time.perf_counter()
        build_checkpoint(path)
        print(f"\nbuilt the random SDXL test checkpoint {path} in {time.perf_counter() - started:.0f} s")
    return path
