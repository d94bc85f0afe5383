"""``DiffusionHost`` for a diffusers SDXL UNet, its two CLIP text encoders and its VAE.

Prompt encoding is SDXL's: the penultimate hidden states of both text encoders concatenated
(768 + 1280 = 2048 wide), the pooled projection of the second encoder, and for the empty prompt
all zeros (``force_zeros_for_empty_prompt``). The micro-conditioning ``time_ids`` are
(H, W, 0, 0, H, W) in pixels, height first. diffusers' LEDITS++ SDXL pipeline passes (W, H)
there, which is wrong for non-square images; we derive (H, W) from the latent shape.

Cross-attention capture: only while a call to ``predict_noise`` carries an ``AttentionRequest``,
the attn2 layers at latent/4 resolution in the down and up blocks get a processor that computes
the layer's normal output with SDPA and, on the side, softmax(q k^T * scale) for the requested
rows only, reduced at once to the summed token columns and averaged over heads. Those maps are
summed over layers on the device and averaged at the end. The layers' own processors are put
back when the call returns, even when it raises; every other layer is never touched.

Compiled UNet (opt-in, ``compile_unet=``): eager stays the default and the fallback. With
``compile_unet`` set to "default", "reduce-overhead" (CUDA graphs) or "max-autotune", the UNet
call ``_unet_forward`` is wrapped once in ``torch.compile(fullgraph=True, dynamic=False)``. For the
compiled graph to stay the same across steps, nothing is swapped per call: the capturing processor
is installed on the latent/4 attn2 layers for the host's lifetime (it reproduces their default
SDPA output exactly), and a capture request enters as tensors (row indices and a 0/1 column
selector). With no request the processor skips the capture, so each input shape has at most two
graphs, "with" and "without" capture. An edit loop uses two: its unguided steps (warm-up) call
the base rows without capture, its guided steps all rows with capture. Per step there is no
``.item()``, no host copy and no branch on tensor values. ``use_compiled_unet(None)`` goes back to
eager and restores the layers' processors.

GPU memory: the UNet's fp16 weights (4.8 GiB) are the floor; the text encoders (1.5 GiB) are only
needed for a moment per ``encode_prompts`` and SDXL's VAE decodes at full resolution. So
``offload_text_encoders`` parks the encoders' weights in pinned CPU memory and lends them to the GPU
for each encoding (about 30 ms of PCIe per call, no copy back), and ``sdxl_vae_dtype`` runs the VAE
in bfloat16 on GPUs that have it (fp16 overflows in SDXL's VAE; bf16 has fp32's range, and ComfyUI
decodes SDXL in bf16 too), which halves the decoder's activations. ``benchmarks/memory_model.py``
shows the effect per phase.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .attention import ATTENTION_LEVEL, attention_map_size, selected_attention, token_selector
from .errors import CSGError, InputError, WeightsMissingError
from .host import AttentionRequest
from .weights import SDXL_CONFIG_FILES, SDXL_SUBFOLDERS

SDXL_DOWNLOAD_HINT = (
    "Download the SDXL base 1.0 model in diffusers format, e.g. "
    "`hf download stabilityai/stable-diffusion-xl-base-1.0 --local-dir {folder}`"
)


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                                 num_train_timesteps: int = 1000) -> torch.Tensor:
    """SDXL's training noise schedule (diffusers' "scaled_linear"), float32 like diffusers computes it."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sdxl_vae_dtype(dtype: torch.dtype, device: str | torch.device) -> torch.dtype:
    """The dtype for SDXL's VAE next to a UNet in ``dtype``: fp16 overflows in it, so an fp16 run
    decodes in bfloat16 where the device supports it and in float32 elsewhere."""
    if dtype != torch.float16:
        return dtype
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _same_kind(like: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    return torch.nn.Parameter(data, requires_grad=False) if isinstance(like, torch.nn.Parameter) else data


class ParkedWeights:
    """A module whose weights live in CPU memory (pinned when ``device`` is CUDA) between calls.

    ``lent()`` puts copies on ``device`` into the module for the duration of a block (non-blocking
    from pinned memory) and afterwards puts the CPU tensors back, so nothing is copied back and the
    device copies are freed. Tensors are swapped in the modules' parameter and buffer tables, which
    works between any two devices (``.data`` assignment does not, e.g. for meta tensors).
    """

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        pin = device.type == "cuda" and torch.cuda.is_available()
        parked: dict[int, torch.Tensor] = {}  # by the original tensor, so a shared weight is parked once
        self.slots: list[tuple[dict, str, torch.Tensor]] = []  # (parameter or buffer table, name, CPU tensor)
        for submodule in module.modules():
            for table in (submodule._parameters, submodule._buffers):
                for name, tensor in table.items():
                    if tensor is None:
                        continue
                    if id(tensor) not in parked:
                        cpu = tensor.detach().to("cpu")
                        parked[id(tensor)] = _same_kind(tensor, cpu.pin_memory() if pin else cpu)
                    table[name] = parked[id(tensor)]
                    self.slots.append((table, name, parked[id(tensor)]))

    @contextmanager
    def lent(self) -> Iterator[None]:
        on_device: dict[int, torch.Tensor] = {}
        try:
            for table, name, cpu in self.slots:
                if id(cpu) not in on_device:
                    on_device[id(cpu)] = _same_kind(cpu, cpu.detach().to(self.device, non_blocking=True))
                table[name] = on_device[id(cpu)]
            yield
        finally:
            for table, name, cpu in self.slots:
                table[name] = cpu


@dataclass(frozen=True)
class SDXLConditioning:
    prompt_embeds: torch.Tensor  # (B, 77, 2048)
    pooled_embeds: torch.Tensor  # (B, 1280)

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]


def request_tensors(request: AttentionRequest, key_length: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (R,) and a 0/1 column selector (R, key_length) for one request."""
    rows = torch.tensor(request.rows, dtype=torch.long).to(device)
    return rows, token_selector(request.token_columns, key_length, device)


class _AttentionCapture:
    """Sums ``csg.attention.selected_attention`` of the requested rows over the layers it is installed on."""

    def __init__(self, rows: torch.Tensor, selector: torch.Tensor) -> None:
        self.rows, self.selector = rows, selector
        self.total: torch.Tensor | None = None
        self.layers = 0

    def add(self, query: torch.Tensor, key: torch.Tensor, heads: int, scale: float) -> None:
        """``query`` (B, Q, heads * d) and ``key`` (B, L, heads * d) of every row; only ``rows`` are captured."""
        selected = selected_attention(query.index_select(0, self.rows), key.index_select(0, self.rows), heads,
                                      self.selector, scale)
        self.total = selected if self.total is None else self.total + selected
        self.layers += 1


class _CaptureSlot:
    """Where the capturing processors find the current call's capture; None: just attention."""

    def __init__(self) -> None:
        self.capture: _AttentionCapture | None = None


class _CapturingCrossAttention:
    """SDXL cross-attention (attn2) with SDPA output plus probability capture for a few rows.

    The capture comes from ``slot`` at call time, so the same processor objects can stay installed
    across calls (the compiled path) and capture only when a call asks for it.
    """

    def __init__(self, slot: _CaptureSlot) -> None:
        self.slot = slot

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        batch = hidden_states.shape[0]
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(context), attn.to_v(context)
        if self.slot.capture is not None:
            self.slot.capture.add(query, key, attn.heads, attn.scale)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def is_plain_cross_attention(attn: Attention) -> bool:
    """True when ``_CapturingCrossAttention`` reproduces the layer exactly (as for every SDXL attn2)."""
    extras = (attn.spatial_norm, attn.group_norm, attn.norm_q, attn.norm_k)
    return all(x is None for x in extras) and not attn.residual_connection


def latent4_cross_attention_layers(unet: UNet2DConditionModel) -> dict[str, Attention]:
    """The attn2 modules at latent/4 resolution: down block 2 and the mirrored up block (mid excluded)."""
    levels = len(unet.config.block_out_channels)
    depth = ATTENTION_LEVEL.bit_length() - 1  # 4 = 2**2: two downsamplings
    prefixes = (f"down_blocks.{depth}.", f"up_blocks.{levels - 1 - depth}.")
    return {name: module for name, module in unet.named_modules()
            if isinstance(module, Attention) and name.endswith("attn2") and name.startswith(prefixes)}


PROMPT_CACHE_SIZE = 64  # prompts, ~0.3 MiB each at SDXL size in fp16
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


class DiffusersSDXLHost:
    """A ``csg.host.DiffusionHost`` over diffusers SDXL components (epsilon prediction).

    ``compile_unet``: None (eager, the default) or one of ``COMPILE_MODES``, the ``torch.compile``
    mode of the UNet call; ``compile_backend`` is torch.compile's backend ("inductor"; "cudagraphs"
    captures CUDA graphs of the eager kernels without inductor; "aot_eager" for tests). A mode other
    than "default" needs inductor. Each new input shape compiles once (minutes for full SDXL with
    inductor), so warm up before timing. See the module docstring.

    ``offload_text_encoders``: keep the text encoders' weights in CPU memory and lend them to the
    device for each ``encode_prompts`` (saves their 1.5 GiB of GPU memory for the whole run). The
    host then owns those modules: it moves them to the CPU. ``from_pretrained`` and
    ``from_single_file`` turn it on for CUDA devices.

    Build one with ``from_pretrained`` (a diffusers folder) or ``from_single_file`` (a checkpoint).

    Args:
        unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2, vae: the SDXL components.
        alphas_cumprod: the noise schedule's cumulative alphas.
        compile_unet, compile_backend, offload_text_encoders: as above.

    Raises:
        InputError: an unknown compile mode or backend, or components that are not SDXL's.
    """

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                 text_encoder_2: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer, tokenizer_2: CLIPTokenizer,
                 vae: AutoencoderKL, alphas_cumprod: torch.Tensor | None = None, *,
                 offload_text_encoders: bool = False, compile_unet: str | None = None,
                 compile_backend: str | Callable = "inductor") -> None:
        self.unet, self.vae = unet, vae
        self.text_encoders = (text_encoder, text_encoder_2)
        self.tokenizers = (tokenizer, tokenizer_2)
        self.device, self.dtype = unet.device, unet.dtype
        self.offload_text_encoders = offload_text_encoders
        self._text_encoders_on_device = [ParkedWeights(e, self.device).lent for e in self.text_encoders] \
            if offload_text_encoders else [nullcontext, nullcontext]
        if alphas_cumprod is None:
            alphas_cumprod = scaled_linear_alphas_cumprod()
        self.alphas_cumprod = alphas_cumprod.to(self.device, torch.float32)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_multiple = 2 ** (len(unet.config.block_out_channels) - 1)
        self.capture_layers = latent4_cross_attention_layers(unet)
        self._time_ids: dict[tuple[int, int], torch.Tensor] = {}
        self._prompt_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._request_cache: tuple[object, tuple[torch.Tensor, torch.Tensor] | None] = (None, None)
        self._slot = _CaptureSlot()
        self._processor = _CapturingCrossAttention(self._slot)
        self._saved_processors: dict[str, object] | None = None  # the layers' own, while ours stay installed
        self._compiled = None
        self.compile_unet: str | None = None
        self.compile_backend = compile_backend
        self.use_compiled_unet(compile_unet, compile_backend)

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def from_components(cls, components, alphas_cumprod: torch.Tensor | None = None,
                        **options) -> DiffusersSDXLHost:
        """From anything with unet, text_encoder(_2), tokenizer(_2) and vae attributes (e.g. SDXLComponents).
        Keywords: ``offload_text_encoders``, ``compile_unet``, ``compile_backend``."""
        c = components
        return cls(c.unet, c.text_encoder, c.text_encoder_2, c.tokenizer, c.tokenizer_2, c.vae, alphas_cumprod,
                   **options)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, **options) -> DiffusersSDXLHost:
        """Load a diffusers-format SDXL folder from local files only (never downloads).

        The VAE gets ``sdxl_vae_dtype``; on CUDA the text encoders are offloaded unless
        ``offload_text_encoders=False`` is passed."""
        folder = Path(folder)
        missing = [sub for sub in SDXL_SUBFOLDERS if not (folder / sub).is_dir()]
        if missing:
            raise WeightsMissingError(
                f"The SDXL folder {folder} lacks {', '.join(s + '/' for s in missing)}. "
                + SDXL_DOWNLOAD_HINT.format(folder=folder) + "."
            )
        local = dict(local_files_only=True)
        try:
            unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype, **local)
            vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=sdxl_vae_dtype(dtype, device), **local)
            text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype, **local)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", dtype=dtype,
                                                                         **local)
            tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", **local)
            tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2", **local)
        except OSError as exc:
            raise WeightsMissingError(
                f"Could not load SDXL from {folder}: {exc}. " + SDXL_DOWNLOAD_HINT.format(folder=folder) + "."
            ) from None
        alphas_cumprod = None
        scheduler_config = folder / "scheduler" / "scheduler_config.json"
        if scheduler_config.is_file():
            config = json.loads(scheduler_config.read_text())
            if config.get("beta_schedule", "scaled_linear") != "scaled_linear":
                raise InputError(f"{scheduler_config}: only SDXL's 'scaled_linear' beta schedule is supported.")
            alphas_cumprod = scaled_linear_alphas_cumprod(config.get("beta_start", 0.00085),
                                                          config.get("beta_end", 0.012),
                                                          config.get("num_train_timesteps", 1000))
        modules = [unet, vae, text_encoder, text_encoder_2]
        for m in modules:
            m.to(device).requires_grad_(False).eval()
        options.setdefault("offload_text_encoders", torch.device(device).type == "cuda")
        return cls(unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2, vae, alphas_cumprod, **options)

    @classmethod
    def from_single_file(cls, path: str | Path, config_folder: str | Path, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32, **options) -> DiffusersSDXLHost:
        """Load an SDXL checkpoint file (.safetensors, as ComfyUI uses) from local files only.

        A single file holds weights but no tokenizers or configs, so ``config_folder`` must be a
        diffusers-format SDXL folder holding at least the JSON configs and both tokenizers. VAE dtype
        and text-encoder offloading as in ``from_pretrained``.
        """
        path, config_folder = Path(path), Path(config_folder)
        if not path.is_file():
            raise WeightsMissingError(
                f"The SDXL checkpoint {path} does not exist. Put an SDXL base checkpoint there, e.g. "
                "sd_xl_base_1.0.safetensors from stabilityai/stable-diffusion-xl-base-1.0."
            )
        missing = [n for n in SDXL_CONFIG_FILES if not (config_folder / n).is_file()]
        if missing:
            raise WeightsMissingError(
                f"The SDXL config folder {config_folder} lacks {', '.join(missing)}. Get the configs and tokenizers "
                "(no weights needed) with `hf download stabilityai/stable-diffusion-xl-base-1.0 "
                f"--include '*.json' '*.txt' --local-dir {config_folder}`."
            )
        from diffusers import StableDiffusionXLPipeline  # only this path needs the pipeline's converters

        pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config_folder), torch_dtype=dtype,
                                                          local_files_only=True)
        for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            m.to(device).requires_grad_(False).eval()
        pipe.vae.to(sdxl_vae_dtype(dtype, device))
        options.setdefault("offload_text_encoders", torch.device(device).type == "cuda")
        return cls(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2, pipe.vae,
                   pipe.scheduler.alphas_cumprod if hasattr(pipe.scheduler, "alphas_cumprod") else None, **options)

    # -- text ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> SDXLConditioning:
        """SDXL's text conditioning per row; "" is the all-zero unconditional row.

        Each distinct prompt is encoded on its own (batch 1) and kept for reuse
        (``PROMPT_CACHE_SIZE`` prompts, least recently used first out). So a prompt's conditioning is
        the same bits in every batch: the CLIP encoders' rounding depends on the batch size (3.6e-7
        in the pooled embedding), and exact mode only gives back x0 when the edit's source row is
        the inversion's. It also spares the repeated rows ("" and the source prompt, once per
        intervention) and, with offloading, lending the encoders to the device on a cache hit.
        The cache assumes the text encoders' weights stay as they are; ``forget_prompts`` after
        changing them.
        """
        prompts = list(prompts)
        distinct = list(dict.fromkeys(prompts))
        rows = {p: self._prompt_cache[p] for p in distinct if p in self._prompt_cache}
        missing = [p for p in distinct if p not in rows]
        if missing:
            hidden: dict[str, list[torch.Tensor]] = {p: [] for p in missing}
            pooled: dict[str, torch.Tensor] = {}
            for tokenizer, encoder, on_device in zip(self.tokenizers, self.text_encoders,
                                                     self._text_encoders_on_device):
                with on_device():  # offloaded: one encoder's weights on the device at a time
                    for prompt in missing:
                        ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                                        truncation=True, return_tensors="pt").input_ids.to(self.device)
                        out = encoder(ids, output_hidden_states=True)
                        hidden[prompt].append(out.hidden_states[-2])
                        if encoder is self.text_encoders[1]:
                            pooled[prompt] = out.text_embeds  # SDXL pools the second encoder's projection
            for prompt in missing:
                row = (torch.cat(hidden[prompt], dim=-1).to(self.dtype), pooled[prompt].to(self.dtype))
                rows[prompt] = tuple(torch.zeros_like(t) for t in row) if prompt == "" else row
        for prompt in rows:
            self._prompt_cache[prompt] = rows[prompt]
            self._prompt_cache.move_to_end(prompt)
        while len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return SDXLConditioning(torch.cat([rows[p][0] for p in prompts]), torch.cat([rows[p][1] for p in prompts]))

    def forget_prompts(self) -> None:
        """Drop the cached prompt encodings (after the text encoders' weights changed, e.g. a LoRA)."""
        self._prompt_cache.clear()

    def token_indices(self, prompt: str) -> list[int]:
        lengths = set()
        for tokenizer in self.tokenizers:
            ids = tokenizer(prompt, truncation=False).input_ids  # [BOS, tokens..., EOS]
            if len(ids) > tokenizer.model_max_length:
                raise InputError(
                    f"The prompt {prompt!r} has {len(ids) - 2} tokens; the text encoder takes at most "
                    f"{tokenizer.model_max_length - 2}. Shorten it."
                )
            lengths.add(len(ids) - 2)
        if len(lengths) != 1:
            raise InputError(f"The two SDXL tokenizers split {prompt!r} differently; they must share a vocabulary.")
        return list(range(1, lengths.pop() + 1))

    # -- denoiser ------------------------------------------------------------------------------------

    def _time_ids_for(self, latent_height: int, latent_width: int) -> torch.Tensor:
        size = (latent_height * self.vae_scale_factor, latent_width * self.vae_scale_factor)
        if size not in self._time_ids:
            original, crop, target = size, (0, 0), size
            self._time_ids[size] = torch.tensor([[*original, *crop, *target]], dtype=self.dtype).to(self.device)
        return self._time_ids[size]

    def _check_capture_layers(self, processors: dict[str, object]) -> None:
        """Raise unless every latent/4 attn2 layer can run our capturing processor faithfully."""
        if not self.capture_layers:
            raise CSGError("This UNet has no cross-attention at latent/4 resolution, so CSG's attention masks "
                           "cannot be computed. Use an SDXL-shaped UNet or the 'noise' mask mode.")
        for name, processor in processors.items():
            if type(processor) not in (AttnProcessor2_0, AttnProcessor, _CapturingCrossAttention):
                raise CSGError(f"The UNet layer {name} uses a custom attention processor ({type(processor).__name__}); "
                               "CSG can only capture attention on the default processors.")
            if not is_plain_cross_attention(self.capture_layers[name]):
                raise CSGError(f"The UNet layer {name} uses attention features SDXL's cross-attention does not "
                               "(spatial/group/query-key norms or a residual); CSG cannot capture it faithfully.")

    def _request_tensors(self, request: AttentionRequest, key_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._request_cache[0] != (request, key_length):  # a loop repeats one request every step
            self._request_cache = ((request, key_length), request_tensors(request, key_length, self.device))
        return self._request_cache[1]

    @contextmanager
    def _capturing(self, request: AttentionRequest | None) -> Iterator[None]:
        """Eager path: our processor on the latent/4 attn2 layers for this call only (when it captures)."""
        if request is None:
            yield
            return
        saved = {name: module.processor for name, module in self.capture_layers.items()}
        self._check_capture_layers(saved)
        try:
            for module in self.capture_layers.values():
                module.processor = self._processor
            yield
        finally:
            for name, module in self.capture_layers.items():
                module.processor = saved[name]

    def use_compiled_unet(self, mode: str | None, backend: str | Callable | None = None) -> None:
        """Switch between eager (``mode=None``) and a ``torch.compile`` mode of the UNet call.

        Compiled, our capturing processor stays installed on the latent/4 attn2 layers (the layers'
        own processors are kept and put back when switching to eager). Raises ``InputError`` for an
        unknown mode and ``CSGError`` when those layers cannot be captured faithfully.
        """
        if mode is not None and mode not in COMPILE_MODES:
            raise InputError(f"compile_unet must be None or one of {', '.join(COMPILE_MODES)}, got {mode!r}.")
        backend = backend or self.compile_backend
        if mode is not None and mode != "default" and backend != "inductor":
            raise InputError(f"The compile mode {mode!r} needs the inductor backend, not {backend!r}.")
        if self._saved_processors is not None:  # back to the layers' own processors first
            for name, module in self.capture_layers.items():
                module.processor = self._saved_processors[name]
            self._saved_processors = None
        self._compiled, self.compile_unet, self.compile_backend = None, None, backend
        if mode is None:
            return
        saved = {name: module.processor for name, module in self.capture_layers.items()}
        self._check_capture_layers(saved)
        for module in self.capture_layers.values():
            module.processor = self._processor
        self._saved_processors = saved
        options = {} if mode == "default" else {"mode": mode}
        self._compiled = torch.compile(self._unet_forward, backend=backend, fullgraph=True, dynamic=False, **options)
        self.compile_unet = mode

    def _ensure_installed(self) -> None:
        """Compiled path: put our processor back if something (e.g. another pipeline) replaced it."""
        if any(module.processor is not self._processor for module in self.capture_layers.values()):
            current = {name: module.processor for name, module in self.capture_layers.items()}
            self._check_capture_layers(current)
            for module in self.capture_layers.values():
                module.processor = self._processor

    def _unet_forward(self, latents: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor,
                      pooled_embeds: torch.Tensor, time_ids: torch.Tensor, rows: torch.Tensor | None,
                      selector: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float32 eps and, when ``rows`` is given, the (R, Q) capture averaged over layers.

        The one function both paths run (compiled as a whole when ``compile_unet`` is set). No
        branch depends on tensor values; ``rows is None`` selects one of two static graphs.
        """
        capture = None if rows is None else _AttentionCapture(rows, selector)
        self._slot.capture = capture
        added = {"text_embeds": pooled_embeds, "time_ids": time_ids}
        eps = self.unet(latents, timestep, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added,
                        return_dict=False)[0]
        self._slot.capture = None
        maps = None if capture is None else capture.total / capture.layers
        return eps.float(), maps

    @torch.no_grad()
    def predict_noise(self, latents: torch.Tensor, timestep: int | torch.Tensor, conditioning: SDXLConditioning,
                      attention: AttentionRequest | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, _, height, width = latents.shape
        if len(conditioning) != batch:
            raise InputError(f"{batch} latent rows but {len(conditioning)} conditioning rows; they must match.")
        if attention is not None and not self.capture_layers:
            self._check_capture_layers({})  # raises: no layer to capture
        rows, selector = (None, None) if attention is None else \
            self._request_tensors(attention, conditioning.prompt_embeds.shape[1])
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(timestep, device=self.device)
        args = (latents.to(self.dtype), timestep, conditioning.prompt_embeds, conditioning.pooled_embeds,
                self._time_ids_for(height, width).expand(batch, -1), rows, selector)
        if self._compiled is None:
            with self._capturing(attention):
                eps, maps = self._unet_forward(*args)
        else:
            self._ensure_installed()
            if self.compile_unet in ("reduce-overhead", "max-autotune") or self.compile_backend == "cudagraphs":
                torch.compiler.cudagraph_mark_step_begin()  # the previous call's outputs are no longer read
            eps, maps = self._compiled(*args)
            # CUDA-graph outputs live in memory the next replay overwrites; the caller may keep them.
            eps, maps = eps.clone(), None if maps is None else maps.clone()
        if maps is not None:
            maps = maps.view(len(attention.rows), *attention_map_size(height, width))
        return eps, maps

    # -- pixels --------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images.to(self.device, self.vae.dtype) * 2.0 - 1.0)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return latents.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        pixels = self.vae.decode(latents.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0)
