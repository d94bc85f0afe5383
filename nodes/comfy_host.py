"""The core's ``DiffusionHost`` on ComfyUI's own MODEL, CLIP and VAE.

Noise predictions go through ``comfy.samplers.calc_cond_batch`` on the user's ModelPatcher, so
LoRAs and other model patches act as they do in any ComfyUI sampler. The core works in
discrete-time VP terms (integer t, alpha-bar_t, epsilon); ComfyUI's denoiser works in sigma space.
At this boundary, with sigma_t from the model's ``model_sampling``,

    alpha-bar_t = 1 / (1 + sigma_t^2),    x_k = x_vp / sqrt(alpha-bar_t) = x_vp sqrt(1 + sigma_t^2),
    calc_cond_batch(x_k, sigma_t) = x0_hat,    eps = (x_k - x0_hat) / sigma_t.

Rows. Every prompt row is its own ComfyUI cond (with its own uuid), so ComfyUI batches the rows,
or splits them over several UNet calls when memory is short. Rows of different interventions sit
on different latents, which one ``calc_cond_batch`` input cannot express; a model-function
wrapper therefore puts each chunk's own latent in, looked up through ``transformer_options``
uuids, and hands on to any wrapper the user's model already had.

Attention. CSG's masks need the cross-attention probabilities at latent/4 resolution (input and
output blocks, middle excluded). The host works on a ``clone()`` of the MODEL with an attn2
replace patch on exactly those transformer blocks, found from the model's own structure. The
patch computes the layer's usual output (ComfyUI's attention, or a replace patch the user already
had there) and, only while a request is open, softmax(q k^T / sqrt(d)) for the requested rows,
reduced at once to the summed token columns and averaged over heads. The user's MODEL is never
modified.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.sampler_helpers
import comfy.samplers
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

from ..csg.attention import ATTENTION_LEVEL, attention_map_size, selected_attention, token_selector
from ..csg.errors import CSGError, InputError
from ..csg.host import AttentionRequest

BlockKey = tuple[str, int, int]  # (block name, block number, transformer index), ComfyUI's patch key


# -- what the model must be ----------------------------------------------------------------------------


def check_sdxl_epsilon(model) -> None:
    """Raise ``InputError`` unless ``model`` (a ModelPatcher) is an SDXL epsilon-prediction model."""
    if not isinstance(model.model, comfy.model_base.SDXL):
        raise InputError(f"This node needs an SDXL model; the MODEL input is {type(model.model).__name__}. "
                         "Load an SDXL base checkpoint (e.g. sd_xl_base_1.0.safetensors) with Load Checkpoint.")
    sampling = model.get_model_object("model_sampling")
    plain_epsilon = isinstance(sampling, comfy.model_sampling.EPS) and not isinstance(
        sampling, (comfy.model_sampling.V_PREDICTION, comfy.model_sampling.X0))
    if not (plain_epsilon and isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete)):
        raise InputError(f"This node needs an epsilon-prediction model with a discrete schedule; this one samples with "
                         f"{type(sampling).__name__} (v-prediction, flow or continuous). Use an SDXL base model, "
                         "without a ModelSampling node that switches it to v-prediction.")
    if float(getattr(sampling, "sigma_data", 1.0)) != 1.0:
        raise InputError("This model's sampling uses sigma_data != 1; CSG supports SDXL's standard schedule only.")


def latent4_attention_blocks(diffusion_model) -> list[BlockKey]:
    """Patch keys of every cross-attention at latent/4 in the input and output blocks.

    The resolution of a block is read from the UNet itself: each Downsample in the input blocks
    halves it; in the output blocks a block's Upsample comes after its attention.
    """
    def keys(name: str, number: int, block) -> list[BlockKey]:
        return [(name, number, index) for module in block if isinstance(module, comfy_attention.SpatialTransformer)
                for index, layer in enumerate(module.transformer_blocks) if layer.attn2 is not None]

    found, scale = [], 1
    for number, block in enumerate(diffusion_model.input_blocks):
        scale *= 2 ** sum(isinstance(m, Downsample) for m in block)
        if scale == ATTENTION_LEVEL:
            found += keys("input", number, block)
    for number, block in enumerate(diffusion_model.output_blocks):
        if scale == ATTENTION_LEVEL:
            found += keys("output", number, block)
        scale //= 2 ** sum(isinstance(m, Upsample) for m in block)
    return found


def unet_downsampling(diffusion_model) -> int:
    """How much smaller the UNet's innermost level is than its input (latent sides must divide by it)."""
    return 2 ** sum(isinstance(m, Downsample) for block in diffusion_model.input_blocks for m in block)


# -- attention capture -----------------------------------------------------------------------------------


class _Collector:
    """``csg.attention.selected_attention`` of the requested rows, summed over the layers that saw each row.

    ComfyUI may split the rows over several UNet calls, so each layer sees only some of them: the
    rows present are found by cond uuid and each row counts its own layers.
    """

    def __init__(self, request: AttentionRequest, position_of_uuid: dict, device: torch.device) -> None:
        self.request, self.position_of_uuid, self.device = request, position_of_uuid, device
        self.selector: torch.Tensor | None = None  # (R, key length), built for the first layer's keys
        self.total: torch.Tensor | None = None  # (R, queries)
        self.layers = [0] * len(request.rows)

    def add(self, q: torch.Tensor, k: torch.Tensor, extra_options: dict) -> None:
        uuids = extra_options["uuids"]
        if q.shape[0] != len(uuids):
            raise CSGError(f"A UNet call mixed {q.shape[0]} rows over {len(uuids)} conds; the CSG host needs one "
                           "latent per cond. Another node's model wrapper may be batching differently.")
        picks = [(b, self.position_of_uuid[u]) for b, u in enumerate(uuids) if u in self.position_of_uuid]
        if not picks:
            return
        if self.selector is None:
            self.selector = token_selector(self.request.token_columns, k.shape[1], self.device)
            self.total = torch.zeros(len(self.request.rows), q.shape[1], device=self.device)
        batch = torch.tensor([b for b, _ in picks]).to(q.device)
        positions = torch.tensor([p for _, p in picks]).to(self.device)
        selected = selected_attention(q.index_select(0, batch), k.index_select(0, batch), extra_options["n_heads"],
                                      self.selector.index_select(0, positions))
        self.total.index_add_(0, positions, selected)
        for _, p in picks:
            self.layers[p] += 1

    def maps(self, height: int, width: int) -> torch.Tensor:
        """(R, h/4, w/4) for a latent of (height, width)."""
        if self.total is None or min(self.layers) == 0:
            raise CSGError("No cross-attention at latent/4 resolution saw the requested rows; CSG's attention masks "
                           "cannot be computed for this model. Use an SDXL model or the 'noise' mask mode.")
        layers = torch.tensor(self.layers, dtype=torch.float32).to(self.device)
        return (self.total / layers[:, None]).view(len(self.layers), *attention_map_size(height, width))


class CrossAttentionCapture:
    """Shared state of the attn2 replace patches: the open request, if any."""

    def __init__(self) -> None:
        self.collector: _Collector | None = None

    def layer_patch(self, previous: Callable | None) -> Callable:
        """The replace patch for one transformer block; ``previous`` is a replace patch the user had there."""

        def attn2(q, k, v, extra_options):
            if previous is not None:
                out = previous(q, k, v, extra_options)
            else:
                out = comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                                          attn_precision=extra_options.get("attn_precision"))
            if self.collector is not None:
                self.collector.add(q, k, extra_options)
            return out

        return attn2

    @contextmanager
    def collecting(self, request: AttentionRequest | None, position_of_uuid: dict,
                   device: torch.device) -> Iterator[_Collector | None]:
        self.collector = None if request is None else _Collector(request, position_of_uuid, device)
        try:
            yield self.collector
        finally:
            self.collector = None


def with_attention_capture(model, capture: CrossAttentionCapture):
    """A clone of ``model`` whose latent/4 cross-attention layers report to ``capture``."""
    patched = model.clone()
    blocks = latent4_attention_blocks(model.get_model_object("diffusion_model"))
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for name, number, index in blocks:
        previous = existing.get((name, number, index), existing.get((name, number)))
        patched.set_model_attn2_replace(capture.layer_patch(previous), name, number, index)
    return patched


# -- conditioning ------------------------------------------------------------------------------------------


@dataclass
class ComfyConditioning:
    """One ComfyUI cond per row (text embedding and pooled output), processed per latent size on demand."""

    embeddings: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per row: (1, 77, 2048), (1, 1280)
    _processed: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.embeddings)


def real_token_positions(clip, prompt: str) -> list[int]:
    """Positions of the prompt's real tokens (not start, end or padding) in both SDXL encoders' sequences."""
    tokens = clip.tokenize(prompt, return_word_ids=True)
    positions = set()
    for encoder, chunks in tokens.items():
        if len(chunks) > 1:
            raise InputError(f"The prompt {prompt!r} is longer than one 75-token chunk of the {encoder} text encoder; "
                             "CSG needs each concept prompt in one chunk. Shorten it.")
        positions.add(tuple(i for i, token in enumerate(chunks[0]) if token[2] != 0))
    if len(positions) != 1:
        raise InputError(f"The SDXL text encoders split {prompt!r} differently; they must share a vocabulary.")
    return list(positions.pop())


# -- the host ---------------------------------------------------------------------------------------------


@dataclass
class _Session:
    model: object  # comfy.model_base.BaseModel, loaded on the device
    model_options: dict


class ComfySDXLHost:
    """A ``csg.host.DiffusionHost`` over a ComfyUI SDXL MODEL, CLIP and (optionally) VAE.

    Noise predictions need a loaded model: run the core inside ``with host.loaded(shape):``, or,
    from inside a ComfyUI sampler, bind its model with ``with host.bound(model, model_options):``.
    ``on_prediction`` is called after every UNet evaluation (progress and Cancel).
    """

    def __init__(self, model, clip, vae=None, on_prediction: Callable[[], None] | None = None) -> None:
        check_sdxl_epsilon(model)
        if clip is None:
            raise InputError("The CLIP input is missing; connect the CLIP output of the SDXL checkpoint loader.")
        self.capture = CrossAttentionCapture()
        self.model = with_attention_capture(model, self.capture)
        self.clip, self.vae = clip, vae
        self.on_prediction = on_prediction
        diffusion_model = model.get_model_object("diffusion_model")
        self.latent_format = model.model.latent_format
        self.device = model.load_device
        self.dtype = model.model_dtype()
        self.sigmas = model.get_model_object("model_sampling").sigmas.detach().to(self.device, torch.float32)
        self.alphas_cumprod = 1.0 / (1.0 + self.sigmas**2)
        self.latent_multiple = unet_downsampling(diffusion_model)
        self.vae_scale_factor = self._vae_scale_factor(vae)
        self._session: _Session | None = None
        self._encoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # prompt -> (cond, pooled)

    @staticmethod
    def _vae_scale_factor(vae) -> int:
        if vae is None:
            return 8  # ComfyUI's own assumption for SDXL size conditioning when no VAE is at hand
        ratio = vae.downscale_ratio
        if not isinstance(ratio, int):
            raise InputError("The VAE input is not an image VAE with a fixed downscale ratio; connect the SDXL VAE.")
        return ratio

    # -- model lifetime ----------------------------------------------------------------------------------

    @contextmanager
    def loaded(self, noise_shape: Sequence[int]) -> Iterator[ComfySDXLHost]:
        """Load the patched model as a ComfyUI sampler does, for ``noise_shape`` (rows, C, h, w) of work."""
        model_options = comfy.model_patcher.create_model_options_clone(self.model.model_options)
        comfy.sampler_helpers.prepare_model_patcher(self.model, {}, model_options)
        inner, _, loaded = comfy.sampler_helpers.prepare_sampling(self.model, list(noise_shape), {}, model_options)
        try:
            self.model.pre_run()
            with self.bound(inner, model_options):
                yield self
        finally:
            self.model.cleanup()
            comfy.sampler_helpers.cleanup_models({}, loaded)
            self.model.restore_hook_patches()

    @contextmanager
    def bound(self, model, model_options: dict) -> Iterator[ComfySDXLHost]:
        """Predict with an already loaded ``model`` (a BaseModel) and sampler ``model_options``."""
        outer, self._session = self._session, _Session(model, model_options)
        try:
            yield self
        finally:
            self._session = outer

    # -- text -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> ComfyConditioning:
        """ComfyUI's SDXL text encoding per row; "" is the all-zero unconditional row (as SDXL/diffusers).

        Each prompt is encoded once per host: a plan's guided and base rows share the uncond (and the
        source prompt), and on a CPU one SDXL text encoding costs as much as several UNet rows.
        """
        for prompt in dict.fromkeys(prompts):
            if prompt not in self._encoded:
                cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True)
                if prompt == "":
                    cond, pooled = torch.zeros_like(cond), torch.zeros_like(pooled)
                self._encoded[prompt] = (cond, pooled)
        return ComfyConditioning(tuple(self._encoded[p] for p in prompts))

    def token_indices(self, prompt: str) -> list[int]:
        return real_token_positions(self.clip, prompt)

    # -- denoiser ---------------------------------------------------------------------------------------

    def _processed_rows(self, conditioning: ComfyConditioning, latent: torch.Tensor) -> tuple[list, dict]:
        """Per row a processed ComfyUI cond list for this latent size, and the row of each cond uuid."""
        height, width = latent.shape[-2:]
        key = (height, width)
        if key not in conditioning._processed:
            pixels = dict(height=height * self.vae_scale_factor, width=width * self.vae_scale_factor)
            rows, row_of_uuid = [], {}
            for row, (cond, pooled) in enumerate(conditioning.embeddings):
                options = dict(pooled_output=pooled, crop_w=0, crop_h=0, target_width=pixels["width"],
                               target_height=pixels["height"], **pixels)
                converted = comfy.sampler_helpers.convert_cond([[cond, options]])
                rows.append(comfy.samplers.encode_model_conds(self._session.model.extra_conds, converted, latent[:1],
                                                              self.device, "positive"))
                row_of_uuid[converted[0]["uuid"]] = row
            conditioning._processed[key] = (rows, row_of_uuid)
        return conditioning._processed[key]

    def _options_with_row_latents(self, latents: torch.Tensor, row_of_uuid: dict) -> dict:
        """Model options whose model-function wrapper feeds each cond its own row's latent."""
        options = dict(self._session.model_options)
        user_wrapper = options.get("model_function_wrapper")

        def row_latents(apply_model, args):
            uuids = args["c"]["transformer_options"]["uuids"]
            rows = torch.tensor([row_of_uuid[u] for u in uuids]).to(latents.device)
            args = {**args, "input": latents.index_select(0, rows)}
            if user_wrapper is not None:
                return user_wrapper(apply_model, args)
            return apply_model(args["input"], args["timestep"], **args["c"])

        options["model_function_wrapper"] = row_latents
        return options

    @torch.no_grad()
    def predict_noise(self, latents: torch.Tensor, timestep: int | torch.Tensor, conditioning: ComfyConditioning,
                      attention: AttentionRequest | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._session is None:
            raise CSGError("ComfySDXLHost.predict_noise needs a loaded model: use `with host.loaded(shape):`.")
        batch, _, height, width = latents.shape
        if len(conditioning) != batch:
            raise InputError(f"{batch} latent rows but {len(conditioning)} conditioning rows; they must match.")
        sigma = self.sigmas[timestep].reshape(1)
        x_k = latents.to(self.device, torch.float32) * (1.0 + sigma**2).sqrt()
        rows, row_of_uuid = self._processed_rows(conditioning, x_k)
        options = self._options_with_row_latents(x_k, row_of_uuid)
        position_of_row = {} if attention is None else {row: i for i, row in enumerate(attention.rows)}
        position_of_uuid = {u: position_of_row[r] for u, r in row_of_uuid.items() if r in position_of_row}
        with self.capture.collecting(attention, position_of_uuid, self.device) as collector:
            denoised = comfy.samplers.calc_cond_batch(self._session.model, rows, x_k[:1], sigma, options)
        eps = (x_k - torch.cat(denoised).float()) / sigma
        maps = None if collector is None else collector.maps(height, width)
        if self.on_prediction is not None:
            self.on_prediction()
        return eps, maps

    # -- pixels -----------------------------------------------------------------------------------------

    def _require_vae(self):
        if self.vae is None:
            raise InputError("The VAE input is missing; connect the VAE output of the SDXL checkpoint loader.")
        return self.vae

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] to the model's scaled latents."""
        latents = self._require_vae().encode(images.movedim(1, -1).cpu())
        return self.latent_format.process_in(latents.float()).to(self.device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents to (B, 3, H, W) RGB in [0, 1]."""
        pixels = self._require_vae().decode(self.latent_format.process_out(latents.float()))
        return pixels.float().movedim(-1, 1).clamp(0.0, 1.0).to(self.device)

    def comfy_latent(self, latents: torch.Tensor) -> dict:
        """A ComfyUI LATENT (unscaled, on the intermediate device) from scaled latents."""
        return {"samples": self.latent_format.process_out(latents.float()).to(
            comfy.model_management.intermediate_device())}
