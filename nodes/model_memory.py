"""Our own torch models (a local VLM, LPIPS's VGG16) under ComfyUI's memory manager.

ComfyUI frees device memory only for models it knows of: those wrapped in a ModelPatcher and
loaded with ``comfy.model_management.load_models_gpu``. A model moved to the GPU by hand is
invisible to it, so SDXL would stay resident beside it and the two may not fit together. Loaded
through the manager, ours get room (ComfyUI evicts SDXL to its offload device if it must, and
reloads it when the sampler next needs it) and may be evicted the same way in turn.
"""

from __future__ import annotations

import comfy.model_management
import comfy.model_patcher
import torch

from ..csg.errors import InputError


def node_device(choice: str) -> torch.device:
    """The device widget of a node that runs one of our models: auto is ComfyUI's device; cuda must be
    there. Under --novram ComfyUI loads every model only partly (``load_models_gpu`` ignores
    ``force_full_load`` there), which our plain torch layers cannot run with (``load_for_use``)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("device is cuda, but torch sees no CUDA GPU here; choose auto or cpu.")
    device = comfy.model_management.get_torch_device() if choice == "auto" else torch.device(choice)
    if device.type != "cpu" and comfy.model_management.vram_state == comfy.model_management.VRAMState.NO_VRAM:
        raise InputError(f"ComfyUI runs with --novram, so it keeps model weights off {device}, and this node's model "
                         "runs only with all its weights there. Set the node's device to cpu, or start ComfyUI with "
                         "--lowvram instead of --novram.")
    return device


class HeldModule(torch.nn.Module):
    """One module held for a ModelPatcher, which records its bookkeeping (``device``, loaded bytes) as
    attributes of the module it wraps: transformers models expose ``device`` read-only, and our core
    modules are kept free of ComfyUI's attributes."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module


def managed(module: torch.nn.Module, load_device: torch.device) -> comfy.model_patcher.ModelPatcher:
    """A patcher that ComfyUI loads onto ``load_device`` and offloads, as its text encoders, to system memory
    (unless ComfyUI runs with --gpu-only)."""
    return comfy.model_patcher.ModelPatcher(HeldModule(module), load_device=load_device,
                                            offload_device=comfy.model_management.text_encoder_offload_device())


def held(patcher: comfy.model_patcher.ModelPatcher) -> torch.nn.Module:
    return patcher.model.module


def load_for_use(patcher: comfy.model_patcher.ModelPatcher, working_memory: int) -> None:
    """Make room for the model's weights plus ``working_memory`` bytes, then put the whole model on its device."""
    # Our modules are plain torch layers, not ComfyUI's casting ops: they run only with every weight on
    # the device, so the manager must not load them partially.
    comfy.model_management.load_models_gpu([patcher], memory_required=working_memory, force_full_load=True)


class ManagedPlacement:
    """A local VLM's placement (``csg.vlm`` Placement) through ComfyUI's memory manager.

    Before each answer the manager makes room for the model and puts it on its device, or finds it
    still there; between answers it may move it to the offload device for another model. ``release``
    forgets the patcher: the manager holds only weak references, so once the VLM drops the model,
    ComfyUI's finalizer takes it off the loaded-model list.
    """

    def __init__(self, device: torch.device, working_memory: int):
        self.device = device
        self.working_memory = working_memory
        self.patcher: comfy.model_patcher.ModelPatcher | None = None

    def place(self, model: torch.nn.Module) -> None:
        if self.patcher is None or held(self.patcher) is not model:
            self.patcher = managed(model, self.device)
        load_for_use(self.patcher, self.working_memory)

    def release(self) -> None:
        self.patcher = None
