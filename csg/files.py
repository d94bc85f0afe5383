"""Reading the files a user gives the pack: every such read goes through here, with one limit and one
set of errors per kind of file.

* Only regular files are read. A folder, a FIFO, or a symlink to ``/dev/zero`` is refused before a byte
  is read, and at most the kind's byte bound is read (``MAX_*_BYTES``), whatever the file grows to.
* Text must be UTF-8 (a byte-order mark is dropped). JSON nested deeper than ``MAX_JSON_DEPTH`` is
  refused before it is parsed, and so is an object that names one key twice (``json`` would keep the
  last one silently).
* CSV is read with strict quoting: an unterminated quote is an error naming its line, not a field that
  swallows every record after it. A field longer than the csv module's bound (131,072 characters),
  or a row with more fields than the header, is an error too.
* Images go through PIL with its limits as our errors: at most ``MAX_IMAGE_PIXELS`` (a decompression
  bomb is refused from its header) and PIL's bound on text chunks.
* Weight files: only safetensors are read, and only after their header checks out (``tensor_shapes``);
  a pickle (``.ckpt``, ``.bin``, ``.pt``) is refused unread, since loading one can run code.

Every problem is an ``InputError`` (``WeightsError`` for model files) that names the file and the fix,
raised from the library's own error.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
import stat
import warnings
from itertools import accumulate
from pathlib import Path
from typing import Any

from .errors import InputError, WeightsError, quote

MAX_JSON_BYTES = 2**20  # a graph or intervention file is a few kB; a bigger one is the wrong file
MAX_CAPTIONS_BYTES = 256 * 2**20  # a captions file: COCO's largest (captions_train2017.json) is 92 MB
MAX_CAPTION_FILE_BYTES = 64 * 2**10  # one CelebA-HQ caption file: ten lines of a sentence each
MAX_PLANS_BYTES = 64 * 2**20  # a plans file names two files per item
MAX_CONFIG_BYTES = 64 * 2**20  # a model's JSON files: Qwen3-VL's tokenizer.json is 11 MB, a config.json a few kB
MAX_IMAGE_BYTES = 256 * 2**20  # an image file; a 50-megapixel photo is a few tens of MB
MAX_IMAGE_PIXELS = 2**26  # 67 megapixels (8192 x 8192); the edit downscales to --max-side anyway
# Bracket levels, for every JSON the pack reads (files, VLM answers, the graph view's requests): a graph needs 4,
# a VLM answer 5, a model's tokenizer.json about 8. Checked before json.loads, which would overflow the stack.
MAX_JSON_DEPTH = 32
MAX_CAPTION_CHARS = 1000  # a caption is a source prompt, bounded like a graph's text fields (CLIP reads ~300)

_NOT_A_FILE = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a pipe (FIFO)", stat.S_IFCHR: "a device",
               stat.S_IFBLK: "a device", stat.S_IFSOCK: "a socket"}
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)  # to the end of the text if never closed
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_PICKLE_STARTS = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive, or a bare pickle (protocol 2 and later)


def _refuse_special(mode: int, path: Path, what: str, error: type[InputError]) -> None:
    kind = _NOT_A_FILE.get(stat.S_IFMT(mode))
    if kind is not None:
        raise error(f"The {what} {path} is {kind}, not a file. Give the file itself.")


def _too_big(path: Path, what: str, limit: int, error: type[InputError]) -> InputError:
    return error(f"The {what} {path} is larger than {limit / 2**20:g} MiB, far more than any {what} needs; is it "
                 "the right file?")


def read_bytes(path: str | Path, what: str, limit: int, error: type[InputError] = InputError) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; ``what`` names it in the error."""
    path = Path(path).expanduser()
    try:
        _refuse_special(os.stat(path).st_mode, path, what, error)  # a device is never even opened
        # O_NONBLOCK: a FIFO swapped in after the stat opens at once (and is refused) instead of waiting for a writer
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as handle:
            status = os.fstat(handle.fileno())
            _refuse_special(status.st_mode, path, what, error)
            if status.st_size > limit:
                raise _too_big(path, what, limit, error)
            # sized to the file, not the bound (a read of limit + 1 allocates that much at once); a file that grew
            # since fstat is read on, to the bound
            raw = handle.read(status.st_size + 1)
            if len(raw) > status.st_size:
                raw += handle.read(limit + 1 - len(raw))
    except FileNotFoundError as exc:
        raise error(f"The {what} {path} does not exist.") from exc
    except OSError as exc:
        raise error(f"The {what} {path} cannot be read ({exc.strerror}). Check its path and permissions.") from exc
    if len(raw) > limit:
        raise _too_big(path, what, limit, error)
    return raw


def utf8_text(raw: bytes, path: Path, what: str, error: type[InputError] = InputError) -> str:
    """``raw`` as text, a UTF-8 byte-order mark dropped; anything else is an error saying what it looks like."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        looks = "it starts with a UTF-16 byte-order mark, as Windows Notepad and PowerShell write"
    elif b"\0" in raw:  # text never holds a NUL byte: UTF-16 without a byte-order mark, or binary
        looks = "it holds NUL bytes, as UTF-16 text or a binary file does"
    else:
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            looks = f"byte {exc.start} is 0x{raw[exc.start]:02x}, as in Latin-1 or a binary file"
    raise error(f"The {what} {path} is not UTF-8 text ({looks}). Save it as UTF-8 (e.g. with your editor's \"Save "
                "with encoding\").")


def read_text(path: str | Path, what: str, limit: int, error: type[InputError] = InputError) -> str:
    path = Path(path).expanduser()
    return utf8_text(read_bytes(path, what, limit, error), path, what, error)


def json_depth(text: str) -> int:
    """How deeply the brackets of JSON ``text`` nest, brackets inside strings left out (a linear scan)."""
    brackets = _NOT_A_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise _DuplicateKey(f"the key {quote(twice, 60)} appears twice in one object. Give each key once")
    return out


def parse_json_text(text: str, path: Path, what: str, error: type[InputError] = InputError) -> Any:
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise error(f"The {what} {path} is JSON nested too deeply ({depth:,} levels; at most {MAX_JSON_DEPTH} are "
                    "allowed). Fix the brackets.")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise error(f"The {what} {path} is not valid JSON ({exc.msg}: line {exc.lineno}, column {exc.colno}). "
                    "Fix the JSON syntax.") from exc
    except _DuplicateKey as exc:
        raise error(f"The {what} {path} cannot be used: {exc}.") from exc
    except ValueError as exc:  # an integer of more digits than Python converts
        raise error(f"The {what} {path} cannot be read as JSON: {str(exc).split(';')[0]}. Shorten that value.") from exc


def read_json(path: str | Path, what: str, limit: int = MAX_JSON_BYTES, error: type[InputError] = InputError) -> Any:
    """The parsed JSON of a file (see the module docstring for what is refused)."""
    path = Path(path).expanduser()
    return parse_json_text(read_text(path, what, limit, error), path, what, error)


def read_csv(path: str | Path, what: str, limit: int) -> list[dict[str, str]]:
    """The records of a CSV file with a header row, each a dict by column; a missing trailing field is ""."""
    path = Path(path).expanduser()
    reader = csv.DictReader(io.StringIO(read_text(path, what, limit), newline=""), restval="", strict=True)
    rows, start = [], 1
    try:
        for row in reader:
            if None in row:  # DictReader files the fields beyond the header under None
                header = len(reader.fieldnames or [])
                raise InputError(f"The {what} {path}, line {start + 1}: {header + len(row[None])} fields under a "
                                 f'header of {header}. Quote a field that holds a comma ("a, b").')
            rows.append(row)
            start = reader.line_num
    except csv.Error as exc:
        if "end of data" in str(exc):
            fix = ('a quote (") opens a field there and is never closed. Close it, or write "" for a quote inside '
                   "a quoted field.")
        elif "field limit" in str(exc):
            fix = (f"a field there is longer than {csv.field_size_limit():,} characters. Is a quote left open, or a "
                   "caption far too long?")
        else:
            fix = f"{exc}."
        raise InputError(f"The {what} {path} is not valid CSV in the record from line {start + 1}: {fix}") from exc
    return rows


def open_image(path: str | Path, what: str = "image"):
    """The decoded PIL image in a file (not yet converted to RGB)."""
    from PIL import Image

    path = Path(path).expanduser()
    raw = read_bytes(path, what, MAX_IMAGE_BYTES)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL warns from 89 megapixels
            with Image.open(io.BytesIO(raw)) as opened:  # reads the header only
                width, height = opened.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise _too_many_pixels(path, what, width, height)
                opened.load()
                return opened.copy()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"The {what} {path} is larger than the {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels allowed "
                         f"({exc}). Downscale it.") from exc
    except Exception as exc:  # PIL's decoders raise many types (OSError, ValueError, SyntaxError, struct.error ...)
        raise InputError(f"Could not read the {what} {path} as an image ({type(exc).__name__}: {exc}). Give a PNG or "
                         "JPEG file.") from exc


def _too_many_pixels(path: Path, what: str, width: int, height: int) -> InputError:
    return InputError(f"The {what} {path} is {width}x{height} pixels ({width * height / 1e6:,.0f} megapixels), more "
                      f"than the {MAX_IMAGE_PIXELS / 1e6:.0f} allowed. Downscale it.")


def tensor_shapes(path: str | Path, what: str) -> dict[str, tuple[int, ...]]:
    """The tensors in a safetensors file, by name, with their shapes: from its header, no weight is read.

    A pickle is refused unread; random bytes or a file cut off (an interrupted download) fail with
    safetensors' own check, which covers the header and every tensor's extent."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    head = _head(path, what)
    if head.startswith(_PICKLE_STARTS) or path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
        raise WeightsError(f"The {what} {path} is a pickle checkpoint, which can run code when it is loaded, so it is "
                           "not read. Use the model's .safetensors file (SDXL base's is sd_xl_base_1.0.safetensors), "
                           "or convert a checkpoint you trust to safetensors.")
    try:
        with safe_open(str(path), framework="pt") as checkpoint:
            return {name: tuple(checkpoint.get_slice(name).get_shape()) for name in checkpoint.keys()}
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"The {what} {path} is not a readable safetensors file ({exc}): it may be cut off (an "
                           "interrupted download) or not a model at all. Download it again.") from exc


def _head(path: Path, what: str) -> bytes:
    """The first bytes of a regular file (any size)."""
    try:
        status = os.stat(path)
        _refuse_special(status.st_mode, path, what, WeightsError)
        with path.open("rb") as handle:
            return handle.read(8)
    except FileNotFoundError as exc:
        raise WeightsError(f"The {what} {path} does not exist.") from exc
    except OSError as exc:
        raise WeightsError(f"The {what} {path} cannot be read ({exc.strerror}). Check its path and "
                           "permissions.") from exc


def check_caption(caption: Any, where: str) -> str:
    """A caption as given, if it is a string of at most ``MAX_CAPTION_CHARS`` characters."""
    if not isinstance(caption, str):
        raise InputError(f"{where}: the caption is {'missing' if caption is None else f'a {type(caption).__name__}'}"
                         f", not text. Give each image its caption as a string.")
    if len(caption) > MAX_CAPTION_CHARS:
        raise InputError(f"{where}: the caption has {len(caption):,} characters, more than the {MAX_CAPTION_CHARS:,} "
                         f"allowed (CLIP reads about 300). Shorten it: {quote(caption, 80)}")
    return caption


SDXL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def check_sdxl_folder(folder: str | Path) -> None:
    """Every JSON config of an SDXL diffusers folder (or config folder) parses, and every safetensors weight
    file's header reads: a broken one is named now, before minutes of loading."""
    folder = Path(folder).expanduser()
    for path in [folder / "model_index.json", *(p for part in SDXL_PARTS for p in sorted((folder / part).glob("*")))]:
        if path.suffix == ".json" and path.exists():
            read_json(path, "SDXL config file", MAX_CONFIG_BYTES, WeightsError)
        elif path.suffix == ".safetensors":
            tensor_shapes(path, "SDXL weight file")


def check_sdxl_checkpoint(path: str | Path) -> None:
    """A single-file checkpoint (``--sdxl FILE``) is a readable safetensors file holding an SDXL base model,
    told from its tensor names before anything loads: SDXL's UNet has the size-conditioning embedding
    ``label_emb`` and a second text encoder (``conditioner.embedders.1``), which SD 1.x/2.x lack."""
    names = tensor_shapes(path, "SDXL checkpoint")
    unet = any(name.startswith("model.diffusion_model.") for name in names)
    sdxl = "model.diffusion_model.label_emb.0.0.weight" in names and any(
        name.startswith("conditioner.embedders.1.") for name in names)
    if sdxl:
        return
    if any(name.startswith("cond_stage_model.") for name in names):
        looks = "a Stable Diffusion 1.x/2.x checkpoint (one text encoder, no size conditioning)"
    elif unet:
        looks = "a UNet without SDXL's size conditioning and second text encoder (an SDXL refiner, or SD 1.x/2.x)"
    else:
        looks = f"not a Stable Diffusion checkpoint ({len(names)} tensors, none under model.diffusion_model.)"
    raise WeightsError(f"The SDXL checkpoint {Path(path).expanduser()} is {looks}. The pack runs SDXL base 1.0 (or a "
                       "fine-tune of it): use sd_xl_base_1.0.safetensors from "
                       "stabilityai/stable-diffusion-xl-base-1.0.")
