"""Finding model weights on this machine: SDXL base and a Qwen-VL model, never downloaded.

Looked up in this order: the path the user gave, the Hugging Face cache (read through
``huggingface_hub``'s cache API, so its layout of refs, snapshots and blobs stays its own), then
ComfyUI's models folder. A miss raises ``WeightsMissingError`` with what to get and where to put it.

``SDXL_SUBFOLDERS`` and ``SDXL_CONFIG_FILES`` are SDXL's diffusers layout, shared with
``csg.diffusers_host``, which loads what is found here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import WeightsMissingError
from .files import check_sdxl_checkpoint, check_sdxl_folder

SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_WEIGHT_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")
SDXL_SUBFOLDERS = (*SDXL_WEIGHT_SUBFOLDERS, "tokenizer", "tokenizer_2")
# what a single-file checkpoint needs beside it: the configs and the tokenizers, no weights
SDXL_CONFIG_FILES = ("model_index.json", *(f"{s}/config.json" for s in SDXL_WEIGHT_SUBFOLDERS),
                     "tokenizer/vocab.json", "tokenizer_2/vocab.json")
VLM_REPOS = ("Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-30B-A3B-Instruct",
             "Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct",
             "Qwen/Qwen2.5-VL-32B-Instruct", "Qwen/Qwen2.5-VL-72B-Instruct")  # preference order
VLM_FAMILIES = ("qwen3-vl", "qwen2.5-vl", "qwen2_5-vl", "qwen2_5_vl")  # folder-name marks, preference order


def hf_hub_cache() -> Path:
    # read at call time: huggingface_hub.constants fixes the folder when it is first imported
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def hf_snapshots(repo_id: str) -> list[Path]:
    """Local snapshot folders of ``repo_id`` in the Hugging Face cache, the one ``refs/main`` names first."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(hf_hub_cache())
    except CacheNotFound:
        return []
    revisions = [revision for repo in cache.repos if repo.repo_id == repo_id and repo.repo_type == "model"
                 for revision in repo.revisions]
    revisions.sort(key=lambda r: ("main" not in r.refs, r.commit_hash))
    return [revision.snapshot_path for revision in revisions]


def comfyui_root(explicit: str | None) -> Path | None:
    root = explicit or os.environ.get("COMFYUI_PATH")
    return Path(root).expanduser() if root else None


def has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def is_sdxl_diffusers_folder(folder: Path) -> bool:
    return all((folder / p / "config.json").is_file() and has_weights(folder / p) for p in SDXL_WEIGHT_SUBFOLDERS) \
        and all((folder / t).is_dir() for t in ("tokenizer", "tokenizer_2"))


def is_sdxl_config_folder(folder: Path) -> bool:
    return all((folder / n).is_file() for n in SDXL_CONFIG_FILES)


@dataclass(frozen=True)
class SDXLWeights:
    path: Path  # a diffusers folder or a single checkpoint file
    config: Path | None = None  # the diffusers config folder a single file needs

    def check(self) -> SDXLWeights:
        """These weights, once their configs parse and their safetensors headers read (a single file: that it
        is SDXL base): a broken download is named before minutes of loading."""
        if self.config is None:
            check_sdxl_folder(self.path)
        else:
            check_sdxl_checkpoint(self.path)
            check_sdxl_folder(self.config)
        return self

    def load(self, device, dtype):
        """The diffusers host of these weights."""
        from .diffusers_host import DiffusersSDXLHost

        if self.config is None:
            return DiffusersSDXLHost.from_pretrained(self.path, device=device, dtype=dtype)
        return DiffusersSDXLHost.from_single_file(self.path, self.config, device=device, dtype=dtype)


def sdxl_get_message(comfy: Path | None) -> str:
    cache = hf_hub_cache()
    lines = [
        "SDXL base 1.0 weights were not found on this machine (nothing is downloaded automatically). Either:",
        f"  * download the diffusers folder: hf download {SDXL_REPO}   (lands in {cache}), "
        "or pass its folder with --sdxl DIR;",
        "  * or use a single checkpoint, e.g. sd_xl_base_1.0.safetensors from the same repository: "
        + (f"put it in {comfy / 'models' / 'checkpoints'}" if comfy else "pass it with --sdxl FILE, or put it in "
           "<ComfyUI>/models/checkpoints and pass --comfyui-root <ComfyUI> (or set COMFYUI_PATH)")
        + ". A single file also needs SDXL's configs and tokenizers (no weights): hf download "
        f"{SDXL_REPO} --include '*.json' '*.txt'   (or pass such a folder with --sdxl-config DIR).",
    ]
    return "\n".join(lines)


def config_folder_for_single_file(explicit: str | None) -> Path:
    if explicit:
        folder = Path(explicit).expanduser()
        if not is_sdxl_config_folder(folder):
            raise WeightsMissingError(
                f"--sdxl-config {folder} is not an SDXL diffusers config folder (it needs model_index.json, "
                "unet/, vae/, text_encoder/, text_encoder_2/ configs and tokenizer/, tokenizer_2/). Get one with "
                f"hf download {SDXL_REPO} --include '*.json' '*.txt' --local-dir {folder}")
        return folder
    for snapshot in hf_snapshots(SDXL_REPO):
        if is_sdxl_config_folder(snapshot):
            return snapshot
    raise WeightsMissingError(
        "A single-file SDXL checkpoint needs SDXL's configs and tokenizers (about 3 MB, no weights), which were "
        f"not found in {hf_hub_cache()}. Get them with: hf download {SDXL_REPO} "
        "--include '*.json' '*.txt'   or pass such a folder with --sdxl-config DIR.")


def comfyui_checkpoints(comfy: Path | None) -> list[Path]:
    """SDXL-looking checkpoints in ComfyUI's models folder, SDXL base first."""
    if comfy is None:
        return []
    files = sorted((comfy / "models" / "checkpoints").rglob("*.safetensors"))
    rank = lambda p: (0 if "sd_xl_base" in p.name.lower() else 1 if "xl" in p.name.lower() else 2, p.name)  # noqa: E731
    return [p for p in sorted(files, key=rank) if rank(p)[0] < 2]


def find_sdxl(explicit: str | None, config: str | None, comfy: Path | None) -> SDXLWeights:
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_dir():
            if not is_sdxl_diffusers_folder(path):
                raise WeightsMissingError(
                    f"--sdxl {path} is not a complete SDXL diffusers folder (it needs unet/, vae/, text_encoder/, "
                    "text_encoder_2/ with weights, and tokenizer/, tokenizer_2/).\n" + sdxl_get_message(comfy))
            return SDXLWeights(path)
        if path.is_file():
            return SDXLWeights(path, config_folder_for_single_file(config))
        raise WeightsMissingError(f"--sdxl {path} does not exist.\n" + sdxl_get_message(comfy))
    for snapshot in hf_snapshots(SDXL_REPO):
        if is_sdxl_diffusers_folder(snapshot):
            return SDXLWeights(snapshot)
    checkpoints = comfyui_checkpoints(comfy)
    if checkpoints:
        return SDXLWeights(checkpoints[0], config_folder_for_single_file(config))
    raise WeightsMissingError(sdxl_get_message(comfy))


def is_vlm_folder(folder: Path) -> bool:
    from .vlm.transformers_backend import missing_model_files

    return folder.is_dir() and not missing_model_files(folder)


def vlm_get_message(comfy: Path | None) -> str:
    where = f"{comfy / 'models' / 'LLM'}/<name>" if comfy else "<ComfyUI>/models/LLM/<name> (with --comfyui-root)"
    return (
        "This run needs a vision-language model (to extract the graph, propose or propagate the intervention), "
        "and none was found locally (nothing is downloaded automatically). Either:\n"
        f"  * download one: hf download {VLM_REPOS[0]}   (lands in {hf_hub_cache()}), or put it in "
        f"{where}, or pass its folder with --vlm-model DIR;\n"
        "  * or use an OpenAI-compatible server: --vlm-url http://host:port/v1 --vlm-name MODEL "
        "[--api-key-env VAR];\n"
        "  * or skip the VLM: --graph-json FILE --intervention-json FILE (see csg/examples/).")


def find_vlm(explicit: str | None, comfy: Path | None) -> Path:
    if explicit:
        from .vlm import check_model_folder

        return check_model_folder(explicit)  # names what the folder lacks
    for repo in VLM_REPOS:
        for snapshot in hf_snapshots(repo):
            if is_vlm_folder(snapshot):
                return snapshot
    if comfy is not None:
        folders = sorted((comfy / "models" / "LLM").glob("*/"))
        for family in VLM_FAMILIES:
            for folder in folders:
                if family in folder.name.lower() and is_vlm_folder(folder):
                    return folder
    raise WeightsMissingError(vlm_get_message(comfy))
