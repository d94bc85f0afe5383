"""A local Qwen-VL model (Qwen3-VL, Qwen2.5-VL) run with transformers, from a folder on disk only.

The model loads on first use and ``unload()`` gives its memory back, so SDXL can have the GPU
after the VLM has spoken. A ``Placement`` puts the loaded model on its device before each answer:
by default it simply moves there, while a host with a memory manager (ComfyUI) passes one that asks
the manager for room first. ``memory_needed`` tells from the checkpoint's headers, without loading
it, how much memory the model will take, and ``check_fits`` refuses a device too small for it.
``on_token(done, budget)`` is called after every generated token; a host shows progress with it and
cancels by raising from it (any exception stops generation and propagates unchanged).

Given a stage's JSON Schema, decoding is constrained to it with llguidance: before each token, the
tokens that cannot continue a schema-valid answer are masked out, so the answer parses and fits
the schema on the first try. The grammar for each schema is compiled once per model and copied for
each answer. So that ``max_tokens`` does not cut a valid answer off, decoding hurries to its end
once the tokens left come down to the schema's closing reserve: then only tokens that close a
string, list or object may come where the grammar allows one (a long answer ends with shorter texts
and fewer items, never cut off). The reserve is the length of the longest-tokenized shortest answer
the schema allows, which bounds what closing takes from any point.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from .. import devices
from ..errors import InputError, VLMError, WeightsError, WeightsMissingError
from ..files import MAX_CONFIG_BYTES, read_json, tensor_shapes
from .protocol import MAX_IMAGE_SIDE, Turn, image_for_vlm
from .schemas import ANY_OBJECT, Schema, check_mode

log = logging.getLogger("csg.vlm")

GREEDY_BELOW = 1e-3  # temperatures under this mean "no sampling": argmax decoding
DOWNLOAD_HINT = "hf download Qwen/Qwen3-VL-8B-Instruct --local-dir {folder}"

TokenCallback = Callable[[int, int], None]

GIB = 2**30
# Memory to generate with, beyond the weights: the vision tower's activations for one image of at most
# MAX_IMAGE_SIDE pixels a side and the KV cache of a few thousand tokens (about 1 GiB for Qwen3-VL-8B).
WORKING_MEMORY_BASE = GIB
WORKING_MEMORY_SHARE = 0.1  # of the weights: bigger models have wider activations and caches
SMALLER_MODELS = "Qwen2.5-VL-3B-Instruct or Qwen3-VL-4B-Instruct (about 9 and 10 GiB in bfloat16)"
# The config.json model_type of the models this backend runs, and how to name them to a user.
SUPPORTED_MODEL_TYPES = {"qwen3_vl": "Qwen3-VL", "qwen3_vl_moe": "Qwen3-VL-MoE", "qwen2_5_vl": "Qwen2.5-VL"}
SUPPORTED = "a Qwen3-VL or Qwen2.5-VL instruct model (e.g. Qwen/Qwen3-VL-8B-Instruct)"


# -- the folder ------------------------------------------------------------------------------------


def _indexed_shards(index: Path) -> list[str]:
    """The weight files a model.safetensors.index.json names."""
    return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))


def missing_model_files(folder: Path) -> list[str]:
    """What a complete Hugging Face VLM snapshot lacks here; empty when nothing is missing."""
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = _indexed_shards(index)
        except (ValueError, KeyError, TypeError, AttributeError):
            shards = []
            missing.append("a readable model.safetensors.index.json")
        missing += [shard for shard in shards if not (folder / shard).is_file()]
    elif not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        missing.append("the weights (*.safetensors)")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        missing.append("the tokenizer (tokenizer.json)")
    if not (folder / "preprocessor_config.json").is_file():
        missing.append("the image processor (preprocessor_config.json)")
    return missing


def check_model_folder(folder: str | Path) -> Path:
    path = Path(folder).expanduser()
    hint = DOWNLOAD_HINT.format(folder=path)
    if not path.is_dir():
        raise WeightsMissingError(f"There is no VLM model folder at {path}. Put a Qwen3-VL (or Qwen2.5-VL) instruct "
                                  f"model there, e.g. with: {hint}")
    missing = missing_model_files(path)
    if missing:
        raise WeightsMissingError(f"The VLM model folder {path} is incomplete: it lacks {', '.join(missing)}. It must "
                                  "hold a whole Hugging Face snapshot of the model; download it again, "
                                  f"e.g. with: {hint}")
    check_model_files(path)
    return path


def check_model_files(folder: Path) -> None:
    """Every JSON file of the folder parses to an object, config.json names a model this backend runs, and
    every safetensors file's header reads: a broken or foreign file is named now, not by a traceback from
    deep inside transformers after minutes of loading."""
    hint = f"Download the model snapshot again, e.g. with: {DOWNLOAD_HINT.format(folder=folder)}"
    for path in sorted(folder.glob("*.json")):
        data = read_json(path, "VLM model file", MAX_CONFIG_BYTES, WeightsError)
        if not isinstance(data, dict):
            raise WeightsError(f"The VLM model file {path} holds a JSON {type(data).__name__}, not an object. {hint}")
    model_type = read_json(folder / "config.json", "VLM config", MAX_CONFIG_BYTES, WeightsError).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        named = f"a {model_type!r} model" if isinstance(model_type, str) else "a config without a model_type"
        raise WeightsError(f"The VLM model folder {folder} holds {named}, which the local backend does not run: it "
                           f"runs {SUPPORTED} (config.json model_type {', '.join(SUPPORTED_MODEL_TYPES)}). Point it "
                           "at such a folder, or serve other models with an OpenAI-compatible server.")
    for path in _safetensors_files(folder):
        tensor_shapes(path, "VLM weight file")


def _safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's files: the shards its index names, else every *.safetensors in the folder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / shard for shard in _indexed_shards(index)]
    return sorted(folder.glob("*.safetensors"))


# -- memory ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryNeed:
    """What a VLM takes on its device: its weights in the dtype it runs in, plus memory to generate with."""

    parameters: int
    dtype: torch.dtype
    working: int  # bytes: WORKING_MEMORY_BASE + WORKING_MEMORY_SHARE of the weights

    @property
    def weights(self) -> int:
        return self.parameters * self.dtype.itemsize

    @property
    def total(self) -> int:
        return self.weights + self.working

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"about {self.total / GIB:.1f} GiB in {dtype}: {self.parameters / 1e9:.2f} B parameters x "
                f"{self.dtype.itemsize} bytes = {self.weights / GIB:.1f} GiB of weights, plus "
                f"{self.working / GIB:.1f} GiB to generate with")


def memory_needed(folder: str | Path, dtype: torch.dtype) -> MemoryNeed | None:
    """The memory the model in ``folder`` needs in ``dtype``, counted from its safetensors headers (no weight is read).

    None for a checkpoint without safetensors files (pickled *.bin weights), whose shapes cannot be
    read without loading them.
    """
    from safetensors import safe_open

    files = _safetensors_files(check_model_folder(folder))
    if not files:
        return None
    parameters = 0
    for path in files:
        with safe_open(path, framework="pt") as checkpoint:
            parameters += sum(math.prod(checkpoint.get_slice(name).get_shape()) for name in checkpoint.keys())
    weights = parameters * dtype.itemsize
    return MemoryNeed(parameters, dtype, WORKING_MEMORY_BASE + int(WORKING_MEMORY_SHARE * weights))


def check_fits(need: MemoryNeed, device_total: int, device: Any, model: str) -> None:
    """Refuse a model that needs more than the device's whole memory, naming what would fit."""
    if need.total <= device_total:
        return
    fixes = [f"a smaller model, e.g. {SMALLER_MODELS}"]
    if need.dtype == torch.float32:
        fixes.append("dtype bfloat16, which halves the weights")
    if torch.device(device).type != "cpu":
        fixes.append("device cpu (slower, in system memory)")
    raise InputError(f"The VLM {model} cannot fit on {device}: it needs {need}, but {device} has "
                     f"{device_total / GIB:.1f} GiB in all. Use {', or '.join(fixes)}.")


# the VLM's device and dtype: the pack's one choice, with Qwen-VL's bf16 for "auto"
resolve_device_dtype = partial(devices.resolve_device_dtype, model="vlm")


# -- the processor -----------------------------------------------------------------------------------


class ImageOnlyProcessor:
    """The image half of a Qwen-VL processor, composed from the folder's tokenizer and image processor.

    Why it exists: from transformers 5 on, ``AutoProcessor`` builds the Qwen-VL processors with a
    video processor that imports torchvision, so without torchvision it fails although we never send
    video. This does for images what those processors do: expand each image placeholder to
    grid_t·grid_h·grid_w / merge² copies, and mark image tokens in ``mm_token_type_ids`` when the
    model takes them (its multimodal rotary positions need them).
    """

    def __init__(self, tokenizer: Any, image_processor: Any, image_token_id: int, mark_image_tokens: bool):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(image_token_id)
        self.mark_image_tokens = mark_image_tokens

    @classmethod
    def from_folder(cls, folder: Path, image_token_id: int, mark_image_tokens: bool) -> ImageOnlyProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = _folder_chat_template(folder)
        image_processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        return cls(tokenizer, image_processor, image_token_id, mark_image_tokens)

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def __call__(self, text: list[str], images: list[Image.Image] | None = None, return_tensors: str = "pt"):
        from transformers import BatchFeature

        [prompt] = text
        features: dict[str, Any] = {}
        pieces = prompt.split(self.image_token)
        count = len(images or [])
        if len(pieces) - 1 != count:
            raise VLMError(f"The chat template wrote {len(pieces) - 1} image placeholder(s) for {count} image(s); "
                           "the model folder's chat template does not fit a Qwen-VL model.")
        if images:
            features.update(self.image_processor(images=images, return_tensors=return_tensors))
            merge = self.image_processor.merge_size ** 2
            counts = [int(grid.prod()) // merge for grid in features["image_grid_thw"]]
            prompt = pieces[0] + "".join(self.image_token * n + piece for n, piece in zip(counts, pieces[1:]))
        encoded = self.tokenizer([prompt], return_tensors=return_tensors)
        features.update(encoded)
        if self.mark_image_tokens:
            features["mm_token_type_ids"] = (encoded["input_ids"] == self.image_token_id).long()
        return BatchFeature(features)

    def batch_decode(self, sequences: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(sequences, **kwargs)


def _folder_chat_template(folder: Path) -> str:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    packed = folder / "chat_template.json"
    if packed.is_file():
        return json.loads(packed.read_text(encoding="utf-8"))["chat_template"]
    raise WeightsMissingError(f"The VLM model folder {folder} has no chat template (chat_template.jinja or "
                              "chat_template.json); download the model snapshot again.")


def load_processor(folder: Path, model: Any) -> Any:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except ImportError as exc:  # see ImageOnlyProcessor for why
        log.info("AutoProcessor unavailable (%s); composing the image processor and tokenizer directly",
                 " ".join(str(exc).split())[:200])
        image_token_id = getattr(model.config, "image_token_id", None)
        if image_token_id is None:
            raise VLMError(f"The model in {folder} names no image_token_id in its config; it is not a Qwen-VL "
                           "model. Use a Qwen3-VL or Qwen2.5-VL instruct model.") from None
        marks = "mm_token_type_ids" in inspect.signature(model.forward).parameters
        return ImageOnlyProcessor.from_folder(folder, image_token_id, marks)


# -- generation --------------------------------------------------------------------------------------


def _token_callback(on_token: TokenCallback, prompt_length: int, budget: int):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class ReportEachToken(StoppingCriteria):
        """Never stops generation itself; tells the host how far along it is (the host may raise)."""

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
            on_token(int(input_ids.shape[-1]) - prompt_length, budget)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([ReportEachToken()])


# JSON as models write it (", " and ": "), and no other whitespace: a weak model could pad forever.
JSON_LAYOUT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
_BIT = torch.arange(8, dtype=torch.uint8)


CLOSERS, OPENERS = set('"]}'), set("[{\\")  # a token that ends a text, list or object, and what disqualifies one
RESERVE_MARGIN = 8  # tokens beyond the closing reserve: a string's closing quote and rounding in the tokenization


class Grammars:
    """The llguidance grammar of each schema, compiled once for one tokenizer; ``matcher`` gives a fresh copy
    and ``reserve`` the tokens its answers keep for closing."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]):
        import llguidance.hf

        self.vocab_size = vocab_size
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_token_ids)
        texts = [tokenizer.decode([token]) for token in range(len(tokenizer))]
        self.closing = torch.zeros(vocab_size, dtype=torch.bool)
        self.closing[:len(texts)] = torch.tensor([bool(CLOSERS & set(text)) and not OPENERS & set(text)
                                                  for text in texts])
        self._compiled: dict[str, tuple[Any, int]] = {}

    def _compiled_schema(self, schema: Schema) -> tuple[Any, int]:
        import llguidance

        key = json.dumps(schema, sort_keys=True)
        if key not in self._compiled:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
            compiled = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
            if compiled.is_error():
                raise VLMError(f"llguidance cannot compile the answer's JSON Schema: {compiled.get_error()}")
            self._compiled[key] = compiled, self._shortest_answer(compiled.deep_copy()) + RESERVE_MARGIN
        return self._compiled[key]

    def matcher(self, schema: Schema) -> Any:
        return self._compiled_schema(schema)[0].deep_copy()

    def reserve(self, schema: Schema) -> int:
        return self._compiled_schema(schema)[1]

    def _shortest_answer(self, matcher: Any) -> int:
        """Tokens of the shortest answer the grammar allows, spelt with the lowest-numbered tokens it allows (single
        bytes, the longest spelling), hurrying as ``hurried`` does: what closing can take from any point."""
        tokens = 0
        while not matcher.is_stopped():
            choice = self.hurried(matcher).nonzero()
            if not len(choice) or not matcher.consume_token(int(choice[0])):
                raise VLMError(f"llguidance found no shortest answer of the JSON Schema: {matcher.get_error()}")
            tokens += 1
        return tokens

    def allowed(self, matcher: Any) -> torch.Tensor:
        """The tokens that may come next, as a boolean mask over the vocabulary."""
        words = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.uint8)
        return ((words.unsqueeze(-1) >> _BIT) & 1).bool().flatten()[:self.vocab_size]

    def hurried(self, matcher: Any) -> torch.Tensor:
        """The allowed tokens that close a text, list or object, where there are any; else every allowed token."""
        allowed = self.allowed(matcher)
        closing = allowed & self.closing
        return closing if closing.any() else allowed


def _constraint(grammars: Grammars, schema: Schema, prompt_length: int, max_tokens: int):
    from transformers import LogitsProcessor, LogitsProcessorList

    matcher = grammars.matcher(schema)
    hurry_from = max_tokens - grammars.reserve(schema)  # generated tokens after which the answer closes

    class FollowSchema(LogitsProcessor):
        """Masks every token that would leave the schema (or, near the budget's end, not close it); runs before
        temperature and top-k/top-p."""

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            generated = input_ids.shape[-1] - prompt_length
            if generated and not matcher.consume_token(int(input_ids[0, -1])):
                raise VLMError(f"The constrained decoder left the JSON Schema: {matcher.get_error()}")
            allowed = (grammars.hurried if generated >= hurry_from else grammars.allowed)(matcher).to(scores.device)
            return scores.masked_fill(~allowed[:scores.shape[-1]], float("-inf"))

    return LogitsProcessorList([FollowSchema()])


def qwen_messages(system: str, turns: Sequence[Turn], image_count: int) -> list[dict]:
    """Chat messages in the content-part form Qwen-VL chat templates read; images lead the first user turn."""
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}]
    pending = image_count
    for turn in turns:
        parts: list[dict] = []
        if turn.role == "user" and pending:
            parts = [{"type": "image"}] * pending
            pending = 0
        messages.append({"role": turn.role, "content": [*parts, {"type": "text", "text": turn.text}]})
    return messages


class Placement(Protocol):
    """Puts the loaded model on its device: ``place`` before every answer (a host's memory manager may have
    moved it away since the last one), ``release`` when ``TransformersVLM.unload`` drops it."""

    def place(self, model: torch.nn.Module) -> None: ...

    def release(self) -> None: ...


class MoveToDevice:
    """The placement without a memory manager: the model moves to the device and stays there until unloaded."""

    def __init__(self, device: torch.device):
        self.device = device

    def place(self, model: torch.nn.Module) -> None:
        model.to(self.device)

    def release(self) -> None:
        """Nothing to tell anyone: dropping the model frees it."""


class TransformersVLM:
    """A local Qwen-VL instruct model, loaded with ``AutoModelForImageTextToText`` from ``folder`` only.

    ``placement`` puts it on ``device`` (default: ``MoveToDevice``); the processor's tensors go to ``device``.

    Args:
        folder: the model folder (config, processor and safetensors files).
        device: "auto", "cpu", "cuda", ...
        dtype: "auto" or a torch dtype.
        on_token: called per generated token (progress).
        max_image_side: longer side images are downscaled to before asking; None: never.
        placement: how the weights are placed (``MoveToDevice`` by default).
        structured: how answers are held to their stage's JSON Schema: "auto" and "schema" constrain
            decoding to it, "json" to any JSON object, "off" not at all.

    Raises:
        WeightsMissingError: ``folder`` is not a model folder (the message says how to download one).
        VLMError: the model cannot be loaded.
    """

    def __init__(self, folder: str | Path, *, device: Any = "auto", dtype: Any = "auto",
                 on_token: TokenCallback | None = None, max_image_side: int | None = MAX_IMAGE_SIDE,
                 placement: Placement | None = None, structured: str = "auto"):
        self.folder = Path(folder).expanduser()
        self.structured = check_mode(structured)
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.on_token = on_token
        self.max_image_side = max_image_side
        self.placement = placement or MoveToDevice(self.device)
        self._model: Any = None
        self._processor: Any = None
        self._grammars: Grammars | None = None

    def __repr__(self) -> str:
        state = "loaded" if self.loaded else "not loaded"
        return f"TransformersVLM(folder={str(self.folder)!r}, device={str(self.device)!r}, dtype={self.dtype}, {state})"

    @property
    def identity(self) -> str:
        return f"transformers:{self.folder.resolve()}"

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load the model and processor if they are not loaded, and place the model on its device.

        ``generate`` does this before every answer.
        """
        if not self.loaded:
            self._model, self._processor = self._read_folder()
        self.placement.place(self._model)

    def _read_folder(self) -> tuple[Any, Any]:
        from transformers import AutoModelForImageTextToText

        folder = check_model_folder(self.folder)
        log.info("loading VLM from %s for %s (%s)", folder, self.device, self.dtype)
        try:
            model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                                dtype=self.dtype)
            model.eval()
            return model, load_processor(folder, model)
        except (torch.OutOfMemoryError, VLMError):
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
            # The files parse (check_model_folder), so they do not fit each other: weights of other shapes
            # than config.json says, or a tokenizer or image processor of another layout.
            problem = " ".join(f"{type(exc).__name__}: {exc}".split())[:600]
            if "mismatched_sizes" in problem:  # transformers logs the shapes and raises "see the report above"
                problem = "the weights' shapes are not the ones config.json describes"
            raise WeightsError(f"transformers could not load the VLM in {folder} ({problem}). Its files do not fit "
                               f"together: it needs {SUPPORTED}, whole, and a transformers version that knows it "
                               "(Qwen3-VL needs transformers >= 4.57). Download the snapshot again, e.g. with: "
                               f"{DOWNLOAD_HINT.format(folder=folder)}") from exc

    def unload(self) -> None:
        """Free the model's memory (and the CUDA cache) so other models can use it; reloads on next use."""
        self.placement.release()
        self._model = None
        self._processor = None
        self._grammars = None
        gc.collect()
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def grammars(self) -> Grammars:
        """The compiled grammars of the loaded model's tokenizer (built on first use)."""
        self.load()
        if self._grammars is None:
            tokenizer = getattr(self._processor, "tokenizer", self._processor)
            eos = self._model.generation_config.eos_token_id
            eos = [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])
            self._grammars = Grammars(tokenizer, self._model.config.get_text_config().vocab_size, eos)
        return self._grammars

    def generate(self, system: str, turns: Sequence[Turn], images: Sequence[Image.Image], *,
                 temperature: float, max_tokens: int, schema: Schema | None = None) -> str:
        self.load()
        pictures = [image_for_vlm(image, self.max_image_side) for image in images]
        prompt = self._processor.apply_chat_template(qwen_messages(system, turns, len(pictures)), tokenize=False,
                                                     add_generation_prompt=True)
        inputs = self._processor(text=[prompt], images=pictures or None, return_tensors="pt").to(self.device)
        prompt_length = int(inputs["input_ids"].shape[-1])
        options: dict[str, Any] = {"max_new_tokens": int(max_tokens)}
        if temperature >= GREEDY_BELOW:
            options.update(do_sample=True, temperature=float(temperature))
        else:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.on_token is not None:
            options["stopping_criteria"] = _token_callback(self.on_token, prompt_length, int(max_tokens))
        if schema is not None and self.structured != "off":
            held_to = ANY_OBJECT if self.structured == "json" else schema
            options["logits_processor"] = _constraint(self.grammars(), held_to, prompt_length, int(max_tokens))
        tokenizer = getattr(self._processor, "tokenizer", None)
        if getattr(tokenizer, "pad_token_id", None) is not None:
            options["pad_token_id"] = tokenizer.pad_token_id
        with torch.inference_mode():
            output = self._model.generate(**inputs, **options)
        return self._processor.batch_decode(output[:, prompt_length:], skip_special_tokens=True)[0]
