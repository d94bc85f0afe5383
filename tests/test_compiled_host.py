"""The opt-in compiled UNet path of ``DiffusersSDXLHost`` equals eager and compiles once per call shape.

On CPU with the tiny random SDXL and torch.compile's "aot_eager" backend (seconds to compile;
inductor takes ~90 s here). The same code runs under inductor / CUDA graphs on a GPU.
"""

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from csg.abduction import invert
from csg.diffusers_host import DiffusersSDXLHost
from csg.errors import InputError
from csg.guidance import ConceptTerm, EditSpec, GuidanceParams
from csg.prediction import edit
from tests.sdxl_fixtures import sample_image

NUM_STEPS = 6
SPECS = [EditSpec((ConceptTerm("black hair", warmup=2), ConceptTerm("old woman", warmup=3, reverse=True)))]


class CountingBackend:
    """aot_eager, counting the graphs it is asked to compile."""

    def __init__(self) -> None:
        self.graphs = 0
        self.inner = lookup_backend("aot_eager")

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


def run(host):
    inversion = invert(host, sample_image(), "a photo of a woman", num_steps=NUM_STEPS)
    return inversion, edit(host, inversion, SPECS, GuidanceParams(mask_mode="intersect"))


@pytest.fixture
def compiled(tiny_components):
    torch._dynamo.reset()
    backend = CountingBackend()
    host = DiffusersSDXLHost.from_components(tiny_components, compile_unet="default", compile_backend=backend)
    try:
        yield host, backend
    finally:
        host.use_compiled_unet(None)  # the shared UNet gets its own processors back
        torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_matches_eager_and_compiles_once_per_call_shape(tiny_host, tiny_components, compiled):
    eager_inversion, eager_edit = run(tiny_host)
    host, backend = compiled

    graphs_after_call = []  # graphs compiled so far, after each UNet call
    predict = host.predict_noise

    def counting_predict(*args, **kwargs):
        out = predict(*args, **kwargs)
        graphs_after_call.append(backend.graphs)
        return out

    host.predict_noise = counting_predict
    inversion, result = run(host)
    # Inversion (batch 2: uncond + source), the edit's warm-up (its base row alone, batch 1) and its
    # guided steps (batch 3, with capture) compile one graph each, at first use; nothing recompiles.
    warmup = min(term.warmup for term in SPECS[0].terms)
    assert len(graphs_after_call) == 2 * NUM_STEPS
    assert graphs_after_call == [1] * NUM_STEPS + [2] * warmup + [3] * (NUM_STEPS - warmup)
    with torch._dynamo.config.patch(error_on_recompile=True):  # a rerun reuses all three graphs
        again_inversion, again = run(host)
    assert backend.graphs == 3

    for ours, eager in [(inversion.x_T, eager_inversion.x_T), (inversion.noise_maps, eager_inversion.noise_maps),
                        (result.latents, eager_edit.latents), (again.latents, eager_edit.latents),
                        (again_inversion.noise_maps, eager_inversion.noise_maps)]:
        assert (ours - eager).abs().max().item() <= 1e-5
    for ours, eager in zip(result.masks + result.last_masks, eager_edit.masks + eager_edit.last_masks):
        assert (ours - eager).abs().max().item() <= 1e-5
    assert all(m.sum() > 0 for m in result.last_masks[0])  # the masks are real, not all zero


def test_compiled_host_keeps_its_processors_installed_and_restores_them(tiny_components):
    unet = tiny_components.unet
    before = dict(unet.attn_processors)
    host = DiffusersSDXLHost.from_components(tiny_components, compile_unet="default", compile_backend="aot_eager")
    try:
        installed = {name for name, p in unet.attn_processors.items() if p is not before[name]}
        assert installed == {f"{name}.processor" for name in host.capture_layers}
    finally:
        host.use_compiled_unet(None)
    assert unet.attn_processors == before
    assert host.compile_unet is None
    with pytest.raises(InputError, match="compile_unet"):
        host.use_compiled_unet("fastest")
    with pytest.raises(InputError, match="inductor"):
        host.use_compiled_unet("reduce-overhead", "aot_eager")
    assert unet.attn_processors == before
