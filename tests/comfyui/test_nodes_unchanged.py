"""Behaviour unchanged: the pack's nodes give the latents recorded before the solver refactor.

The recording is tests/fixtures/behaviour_comfyui.safetensors, made by
``COMFYUI_PATH=... comfy-venv/bin/python tools/record_behaviour.py comfyui`` (which defines the runs: the
Causal Inversion node in reference and exact mode, the all-in-one and the batched Causal
Counterfactual(s) nodes, Baseline Edit with both methods; it refuses to record unless two runs agree
bit for bit). The inversion and CSG's prediction keep their arithmetic, so they must match bit for
bit. Baseline Edit's DDPM and DDIM used to be their own loop and now run through the one sampling
loop shared with CSG (and through ComfyUI's sampler), which groups the float32 operations of a step
differently, so their latents may differ by float32 rounding: within 1e-6 of the latent's largest value
(random weights make these latents reach a few hundred, where one float32 step is ~3e-5).
"""

import pytest
import torch
from safetensors.torch import load_file

REORDERED = 1e-6  # relative to the latent's largest value: one loop replaces two, see the module docstring


@pytest.fixture(scope="module")
def runs():
    from tools.record_behaviour import comfyui_runs

    return comfyui_runs()


@pytest.fixture(scope="module")
def recorded():
    from tools.record_behaviour import COMFYUI_FIXTURE

    return load_file(str(COMFYUI_FIXTURE))


def test_the_recording_holds_every_run(runs, recorded):
    assert sorted(runs) == sorted(recorded)


@pytest.mark.parametrize("name", ["inversion_reference_x_T", "inversion_reference_noise_maps", "inversion_exact_x_T",
                                  "inversion_exact_noise_maps", "counterfactual_reference_latent",
                                  "counterfactual_reference_masks", "counterfactual_exact_latent",
                                  "counterfactual_exact_masks", "counterfactuals_exact_latent"])
def test_inversion_and_csg_are_bit_identical(runs, recorded, name):
    assert torch.equal(runs[name], recorded[name])


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_baseline_edit_is_unchanged_up_to_float_rounding(runs, recorded, method):
    latent, before = runs[f"baseline_{method}_latent"], recorded[f"baseline_{method}_latent"]
    assert (latent - before).abs().max().item() <= REORDERED * before.abs().max().item()
