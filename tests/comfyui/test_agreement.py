"""Agreement: on the same random SDXL weights, the ComfyUI host and the diffusers host give the same
counterfactual latent from the same image (abduction and CSG prediction, core code unchanged).

Tolerance. Both hosts compute the same function in float32 by different kernels: ComfyUI's CPU
attention vs SDPA, ComfyUI's float64-derived sigmas vs diffusers' float32 alphas_cumprod (they
differ by <5e-7), and the sigma-space round trip x_k = x sqrt(1 + sigma^2), eps = (x_k - x0_hat) /
sigma. A single prediction agrees to ~1e-6 relative (see test_csg_host). Over the chain the
differences are carried and scaled by the guidance: measured on this machine, the counterfactual
latents differ by 2e-6 (reference mode) and 4e-5 (exact mode, where the source prompt's CFG of 3.5
enters every step and the last step adds the stored residual) relative to the latent's magnitude.
A pixel sitting exactly on a mask's quantile could flip and break this; with these settings none
does. We allow 3e-4 of the latent's magnitude: several times the rounding we see, far below any
edit (the scale-8 terms move the latent by O(1) relative, asserted too).
"""

import pytest
import torch

from tools.comfy_sdxl import build_comfy_sdxl, diffusers_host_of, pack_module

TOLERANCE = 3e-4


@pytest.fixture(scope="module")
def hosts():
    torch.set_num_threads(1)
    small = build_comfy_sdxl(seed=0)
    comfy_host = pack_module("nodes.comfy_host").ComfySDXLHost(small.model, small.clip, small.vae)
    return comfy_host, diffusers_host_of(small)


def counterfactual_latent(host, pixels, exact: bool):
    abduction, guidance, prediction = (pack_module(f"csg.{m}") for m in ("abduction", "guidance", "prediction"))
    spec = guidance.EditSpec((guidance.ConceptTerm("black hair", warmup=2), guidance.ConceptTerm("black beard",
                                                                                                   warmup=3)))
    inversion = abduction.invert(host, pixels, "a photo of a man", num_steps=8, exact=exact)
    return inversion.x0.cpu(), prediction.edit(host, inversion, [spec]).latents.cpu()


@pytest.mark.parametrize("exact", [False, True], ids=["reference", "exact"])
def test_comfyui_and_diffusers_hosts_give_the_same_counterfactual(hosts, exact):
    comfy_host, diffusers_host = hosts
    pixels = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(5))
    with comfy_host.loaded((3, 4, 8, 8)):
        ours_x0, ours = counterfactual_latent(comfy_host, pixels, exact)
    theirs_x0, theirs = counterfactual_latent(diffusers_host, pixels, exact)
    gap = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    print(f"relative max gap ({'exact' if exact else 'reference'}): {gap:.2e}")
    assert (ours_x0 - theirs_x0).abs().max() < TOLERANCE * theirs_x0.abs().max()
    assert gap < TOLERANCE
    assert (ours - ours_x0).abs().max() > 100 * TOLERANCE * theirs.abs().max()  # the edit is far above the gap
