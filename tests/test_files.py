"""The guarded readers (csg/files.py) and the inputs they guard: whatever bytes or file types a reader is
given, only the pack's typed errors come out, quickly and in bounded memory; and both CLIs exit 2, without
a traceback, for each class of bad input."""

import csv
import io
import json
import os
import struct
import time
import tracemalloc
import zlib
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from csg import evaluate
from csg.cli import main
from csg.counterfactual import load_image
from csg.errors import InputError
from csg.evaluation.datasets import DatasetSpec, load_items, load_plans
from csg.files import (
    MAX_CAPTION_CHARS,
    check_sdxl_checkpoint,
    check_sdxl_folder,
    json_depth,
    open_image,
    read_csv,
    read_json,
)
from csg.graph import read_graph, read_interventions
from csg.images import eight_bit
from tests.test_cli import GRAPH, INTERVENTION, PORTRAIT, ROOT


def write_dataset(folder: Path, kind: str, raw: bytes) -> DatasetSpec:
    """A dataset of ``kind`` whose captions file (a CelebA-HQ caption) holds ``raw``."""
    PORTRAIT_COPY = folder / "images" / "1.png"
    PORTRAIT_COPY.parent.mkdir(parents=True, exist_ok=True)
    PORTRAIT_COPY.write_bytes(PORTRAIT.read_bytes())
    if kind == "celebahq":
        (folder / "captions").mkdir(exist_ok=True)
        (folder / "captions" / "1.txt").write_bytes(raw)
        return DatasetSpec.parse(f"d=celebahq:{folder / 'captions'}@{folder / 'images'}")
    name = {"folder-json": "captions.json", "folder-csv": "captions.csv", "coco": "captions_val.json"}[kind]
    (folder / name).write_bytes(raw)
    return DatasetSpec.parse(f"d={kind.split('-')[0]}:{folder / name}@{folder / 'images'}")


def checkpoint(path: Path, names: list[str]) -> Path:
    save_file({name: torch.zeros(2, 2) for name in names}, str(path))
    return path


SDXL_NAMES = ["model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.input_blocks.0.0.weight",
              "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
              "conditioner.embedders.1.model.ln_final.weight"]
SD15_NAMES = ["model.diffusion_model.input_blocks.0.0.weight",
              "cond_stage_model.transformer.text_model.final_layer_norm.weight"]

# Every reader, called on one path; each must either succeed or raise InputError.
READERS = {
    "json": lambda p: read_json(p, "test file"),
    "csv": lambda p: read_csv(p, "test file", 2**20),
    "image": open_image,
    "image-rgb": load_image,
    "graph": read_graph,
    "interventions": read_interventions,
    "plans-json": lambda p: load_plans(p.rename(p.with_suffix(".json"))),
    "plans-csv": lambda p: load_plans(p.rename(p.with_suffix(".csv"))),
    "checkpoint": check_sdxl_checkpoint,
    "sdxl-config": lambda p: check_sdxl_folder(p.parent) if p.rename(p.parent / "model_index.json") else None,
}
DATASETS = ("folder-json", "folder-csv", "coco", "celebahq")


def only_typed_errors(call, *args) -> None:
    tracemalloc.start()
    started = time.monotonic()
    try:
        call(*args)
    except InputError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.monotonic() - started < 5 and peak < 64 * 2**20, (time.monotonic() - started, peak)


RANDOM_INPUT = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SOME_BYTES = st.one_of(st.binary(max_size=600), st.text(max_size=300).map(str.encode),
                       st.sampled_from([b"[" * 100_000, b'{"a": ' * 5000, b'"' + b"x" * 200_000, b"\xef\xbb\xbf{}",
                                        PORTRAIT.read_bytes()[:300], GRAPH.read_bytes(), b"a,b\n\"x,y\n1,2\n"]))


@pytest.mark.parametrize("reader", READERS)
@RANDOM_INPUT
@given(raw=SOME_BYTES)
def test_any_bytes_give_a_typed_error_at_most(reader, raw, tmp_path_factory):
    path = tmp_path_factory.mktemp("bytes") / "input.bin"
    path.write_bytes(raw)
    only_typed_errors(READERS[reader], path)


@pytest.mark.parametrize("kind", DATASETS)
@RANDOM_INPUT
@given(raw=SOME_BYTES)
def test_any_captions_file_gives_a_typed_error_at_most(kind, raw, tmp_path_factory):
    only_typed_errors(load_items, write_dataset(tmp_path_factory.mktemp("dataset"), kind, raw))


def special_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "input.bin"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # a reader that opened it would wait for a writer forever
    elif kind == "zero":
        path.symlink_to("/dev/zero")  # a reader without a bound would read until memory runs out
    elif kind == "urandom":
        path.symlink_to("/dev/urandom")  # endless, and binary
    elif kind == "null":
        path.symlink_to("/dev/null")
    elif kind == "dangling":
        path.symlink_to(tmp_path / "gone")
    return path


SPECIAL = ("folder", "fifo", "zero", "urandom", "null", "dangling", "missing")


# The plans readers' wrappers rename the file first, so it must exist; the SDXL folder check is tested on folders.
@pytest.mark.parametrize(("reader", "kind"), [(reader, kind) for reader in READERS for kind in SPECIAL
                                              if not reader.startswith("sdxl")
                                              and not (reader.startswith("plans") and kind == "missing")])
def test_no_reader_opens_a_folder_device_or_fifo(reader, kind, tmp_path):
    path = special_file(tmp_path, kind)
    with pytest.raises(InputError, match=r"is a folder|a pipe|a device|does not exist"):
        READERS[reader](path)


@pytest.mark.parametrize("kind", SPECIAL)
@pytest.mark.parametrize("dataset", DATASETS)
def test_no_captions_file_is_a_device_or_fifo(dataset, kind, tmp_path):
    spec = write_dataset(tmp_path, dataset, b"")
    target = spec.path / "1.txt" if dataset == "celebahq" else spec.path
    target.unlink()
    special = special_file(tmp_path, kind)
    if kind != "missing":
        special.rename(target)
    only_typed_errors(load_items, spec)
    with pytest.raises(InputError):
        load_items(spec)


# -- captions ------------------------------------------------------------------------------------------------------


def coco(tmp_path: Path, images: list, annotations: list) -> DatasetSpec:
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / "1.png").write_bytes(PORTRAIT.read_bytes())
    path = tmp_path / "captions_val.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return DatasetSpec.parse(f"c=coco:{path}@{tmp_path / 'images'}")


GOOD_IMAGE, GOOD_NOTE = {"id": 1, "file_name": "1.png"}, {"id": 5, "image_id": 1, "caption": "a face"}


@pytest.mark.parametrize("images, annotations, message", [
    ([{"file_name": "1.png"}], [GOOD_NOTE], "'id' must be a whole number"),
    ([GOOD_IMAGE], [{"id": 5, "caption": "x"}], "'image_id' must be a whole number"),
    ([GOOD_IMAGE], [{**GOOD_NOTE, "id": "5"}], "'id' must be a whole number"),
    ([GOOD_IMAGE], [{**GOOD_NOTE, "id": True}], "'id' must be a whole number"),
    ([GOOD_IMAGE], [{"id": 5, "image_id": 1}], "the caption is missing"),
    ([GOOD_IMAGE], [{**GOOD_NOTE, "caption": 5}], "the caption is a int"),
    ([GOOD_IMAGE], [{**GOOD_NOTE, "caption": ["x"]}], "the caption is a list"),
    ([{"id": 1, "file_name": None}], [GOOD_NOTE], "'file_name' is missing"),
    (["1.png"], [GOOD_NOTE], "'id' must be a whole number"),
    ([GOOD_IMAGE], [{**GOOD_NOTE, "caption": "x" * (MAX_CAPTION_CHARS + 1)}], "more than the 1,000 allowed"),
])
def test_coco_records_of_the_wrong_shape_are_named(images, annotations, message, tmp_path):
    with pytest.raises(InputError, match=message):
        load_items(coco(tmp_path, images, annotations))


@pytest.mark.parametrize("content, message", [
    ('image,caption\n1.png,"a face\n1.png,a second record\n', "a quote .* is never closed"),
    (f"image,caption\n1.png,{'x' * 131_073}\n", "longer than 131,072 characters"),
    ("image,caption\n1.png,a face,extra\n", "3 fields under a header of 2"),
    ("image,caption\n1.png\n", "the caption is empty|the caption has|not text"),
    (f"image,caption\n1.png,{'x' * 10_000}\n", "more than the 1,000 allowed"),
])
def test_csv_captions_that_would_swallow_or_clip_records_are_refused(content, message, tmp_path):
    spec = write_dataset(tmp_path, "folder-csv", content.encode())
    try:
        load_items(spec)
    except InputError as exc:
        assert any(__import__("re").search(m, str(exc)) for m in message.split("|")), exc
    else:
        assert message.startswith("the caption is empty")  # an empty caption is a caption, if a poor one


@pytest.mark.parametrize("captions, message", [
    ({"1.png": None}, "the caption is missing"), ({"1.png": 5}, "the caption is a int"),
    ([{"image": "1.png"}], "the caption is missing"), ([{"image": 1, "caption": "x"}], "'image' is a int"),
])
def test_json_captions_that_are_not_text_are_refused(captions, message, tmp_path):
    with pytest.raises(InputError, match=message):
        load_items(write_dataset(tmp_path, "folder-json", json.dumps(captions).encode()))


def test_a_folder_named_like_an_image_is_not_taken_for_it(tmp_path):
    spec = write_dataset(tmp_path, "folder-json", json.dumps({"2.jpg": "a face"}).encode())
    (tmp_path / "images" / "2.jpg").mkdir()
    with pytest.raises(InputError, match="is a folder, not an image"):
        load_items(spec)
    spec = write_dataset(tmp_path, "celebahq", b"a face")
    (tmp_path / "images" / "1.png").unlink()
    (tmp_path / "images" / "1.jpg").mkdir()
    with pytest.raises(InputError, match="has no image 1"):
        load_items(spec)


def test_celebahq_images_sharing_a_stem_are_refused_not_picked_by_directory_order(tmp_path):
    spec = write_dataset(tmp_path, "celebahq", b"a face\n")
    (tmp_path / "images" / "1.jpg").write_bytes(PORTRAIT.read_bytes())
    with pytest.raises(InputError, match="fits several images: 1.jpg, 1.png"):
        load_items(spec)


def test_a_plans_row_given_twice_is_refused(tmp_path):
    (tmp_path / "g.json").write_text(GRAPH.read_text())
    plans = tmp_path / "plans.csv"
    plans.write_text("item,graph\nd/1,g.json\nd/1,g.json\n")
    with pytest.raises(InputError, match="names the item 'd/1' twice .rows 1 and 2."):
        load_plans(plans)
    plans = tmp_path / "plans.json"
    plans.write_text('{"d/1": {"graph": "g.json"}, "d/1": {"graph": "g.json"}}')
    with pytest.raises(InputError, match="the key 'd/1' appears twice"):
        load_plans(plans)


@pytest.mark.parametrize("content", [b"\x00\x01binary", b"root:x:0:0:root:/root:/bin/bash\n", b"[]",
                                     b'{"concepts": 1}'])
def test_a_broken_hand_written_graph_fails_when_the_captions_are_read(content, tmp_path):
    """Before any weights load, not when the item's turn comes."""
    (tmp_path / "g.json").write_bytes(content)
    spec = write_dataset(tmp_path, "folder-csv", b"image,caption,graph\n1.png,a face,g.json\n")
    with pytest.raises(InputError, match="record 1: The graph file .*g.json"):
        load_items(spec)


# -- images --------------------------------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"  # 40000 x 40000 RGB, header only: 4.8 GB once decoded
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
                     + png_chunk(b"IEND", b""))
    with pytest.raises(InputError, match="megapixels"):
        load_image(bomb)


def test_a_huge_text_chunk_is_refused(tmp_path):
    raw = io.BytesIO()
    Image.new("RGB", (4, 4)).save(raw, "PNG")
    head, tail = raw.getvalue()[:33], raw.getvalue()[33:]  # signature and IHDR, then the rest
    ztxt = png_chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"\0" * 80 * 2**20, 9))  # 80 MB once inflated
    path = tmp_path / "ztxt.png"
    path.write_bytes(head + ztxt + tail)
    only_typed_errors(load_image, path)
    with pytest.raises(InputError, match="Could not read the image"):
        load_image(path)


def test_deep_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    ramp16 = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp16).save(path)  # a 16-bit greyscale PNG
    grey = np.asarray(load_image(path))[..., 0].astype(int)
    np.testing.assert_allclose(grey.ravel(), np.linspace(0, 255, 256), atol=1)  # neither all white nor clipped
    as_float = Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16))
    np.testing.assert_allclose(np.asarray(eight_bit(as_float)).ravel(), np.linspace(0, 255, 256), atol=1)
    as_int32 = Image.fromarray(np.linspace(0, 2**31 - 1, 256).astype(np.int32).reshape(16, 16))
    np.testing.assert_allclose(np.asarray(eight_bit(as_int32)).ravel(), np.linspace(0, 255, 256), atol=1)


# -- weight files --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_configs(tmp_path_factory, tiny_components):
    """The tiny SDXL's configs and tokenizers, as ``hf download ... --include '*.json' '*.txt'`` gives."""
    folder = tmp_path_factory.mktemp("configs")
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        getattr(tiny_components, sub).save_pretrained(folder / sub)
    for sub in ("tokenizer", "tokenizer_2"):  # the hub's SDXL repo has the slow files too, which the check looks for
        model = json.loads((folder / sub / "tokenizer.json").read_text())["model"]
        (folder / sub / "vocab.json").write_text(json.dumps(model["vocab"]))
        merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
        (folder / sub / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "EulerDiscreteScheduler"}))
    return folder


def weight_file(tmp_path: Path, kind: str) -> Path:
    if kind == "random":
        path = tmp_path / "model.safetensors"
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "truncated":
        path = checkpoint(tmp_path / "model.safetensors", SDXL_NAMES)
        path.write_bytes(path.read_bytes()[:-20])
    elif kind == "pickle":
        path = tmp_path / "model.ckpt"
        torch.save({"state_dict": {}}, path)
    elif kind == "pickle-renamed":
        path = tmp_path / "model.safetensors"
        torch.save({"state_dict": {}}, path)
    elif kind == "sd15":
        path = checkpoint(tmp_path / "v1-5-pruned.safetensors", SD15_NAMES)
    else:
        path = checkpoint(tmp_path / "model.safetensors", ["first_stage_model.decoder.conv_in.weight"])
    return path


@pytest.mark.parametrize("kind, message", [
    ("random", "not a readable safetensors file"), ("truncated", "not a readable safetensors file"),
    ("pickle", "is a pickle checkpoint"), ("pickle-renamed", "is a pickle checkpoint"),
    ("sd15", "Stable Diffusion 1.x/2.x"), ("vae-only", "not a Stable Diffusion checkpoint"),
])
def test_a_bad_single_file_sdxl_exits_2_before_anything_loads(kind, message, sdxl_configs, tmp_path, capsys):
    path = weight_file(tmp_path, kind)
    code = main([str(PORTRAIT), "--graph-json", str(GRAPH), "--intervention-json", str(INTERVENTION), "--sdxl",
                 str(path), "--sdxl-config", str(sdxl_configs), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and str(path) in err and "Traceback" not in err, err


def test_an_sdxl_checkpoint_passes_the_check(tmp_path, sdxl_configs):
    check_sdxl_checkpoint(checkpoint(tmp_path / "sd_xl_base_1.0.safetensors", SDXL_NAMES))
    check_sdxl_folder(sdxl_configs)


def test_a_scheduler_config_that_is_not_json_exits_2(sdxl_configs, tmp_path, capsys):
    broken = tmp_path / "configs"
    for path in sdxl_configs.rglob("*"):
        if path.is_file():
            (broken / path.relative_to(sdxl_configs)).parent.mkdir(parents=True, exist_ok=True)
            (broken / path.relative_to(sdxl_configs)).write_bytes(path.read_bytes())
    (broken / "scheduler" / "scheduler_config.json").write_text("{'beta_start': 0.00085,")
    code = main([str(PORTRAIT), "--graph-json", str(GRAPH), "--intervention-json", str(INTERVENTION), "--sdxl",
                 str(checkpoint(tmp_path / "sd_xl_base_1.0.safetensors", SDXL_NAMES)), "--sdxl-config", str(broken)])
    err = capsys.readouterr().err
    assert code == 2 and "scheduler_config.json is not valid JSON" in err and "Traceback" not in err, err


# -- limits and messages -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [str(2**70), "-1", "1.5"])
def test_a_seed_torch_cannot_take_is_a_usage_error(seed, capsys):
    for cli in (main, evaluate.main):
        with pytest.raises(SystemExit) as exited:
            cli(["--seed", seed] if cli is evaluate.main else [str(PORTRAIT), "--seed", seed])
        assert exited.value.code == 2 and "--seed" in capsys.readouterr().err


def test_a_caption_over_the_limit_is_refused(tmp_path, capsys):
    code = main([str(PORTRAIT), "--graph-json", str(GRAPH), "--intervention-json", str(INTERVENTION), "--caption",
                 "x" * (MAX_CAPTION_CHARS + 1), "--out", str(tmp_path / "out")])
    assert code == 2 and "more than the 1,000 allowed" in capsys.readouterr().err


@pytest.mark.parametrize("content", [
    b"[" * 100_000, b"image,caption\n1.png," + b"x" * 131_073 + b"\n", b'{"1.png": 5}', b'{"1.png": "a", "1.png": "b"}',
])
def test_csg_evaluate_exits_2_on_a_bad_captions_file(content, tmp_path, capsys):
    spec = write_dataset(tmp_path, "folder-csv" if content.startswith(b"image") else "folder-json", content)
    code = evaluate.main(["--dataset", f"d=folder:{spec.path}@{spec.images}", "--vlm-url", "http://127.0.0.1:9/v1",
                          "--vlm-name", "m", "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and str(spec.path) in err and "Traceback" not in err, err


def test_csg_evaluate_exits_2_on_a_negative_per_dataset(tmp_path, capsys):
    spec = write_dataset(tmp_path, "folder-json", b'{"1.png": "a face"}')
    code = evaluate.main(["--dataset", f"d=folder:{spec.path}@{spec.images}", "--per-dataset", "-1", "--vlm-url",
                          "http://127.0.0.1:9/v1", "--vlm-name", "m", "--out", str(tmp_path / "out")])
    assert code == 2 and "--per-dataset must be at least 1" in capsys.readouterr().err


def test_every_download_hint_names_a_command_the_installed_hub_has():
    commands = {e.name for e in entry_points(group="console_scripts") if e.value.startswith("huggingface_hub")}
    assert "hf" in commands, commands
    hinted = set()
    for path in [*ROOT.glob("csg/**/*.py"), *ROOT.glob("nodes/*.py"), *ROOT.glob("docs/*.md"), ROOT / "README.md"]:
        text = path.read_text(encoding="utf-8")
        hinted |= {word for word in ("huggingface-cli", "hf") if f"{word} download" in text}
    assert hinted == {"hf"}
    from huggingface_hub.cli.hf import main as hf_main  # the entry point the hint runs

    assert callable(hf_main)


def test_csv_module_bound_is_what_the_messages_say():
    assert csv.field_size_limit() == 131_072


def depth(value):
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(alphabet=' "\\[]{}\nab\u00e9\ud800'),
                           lambda inner: st.lists(inner) | st.dictionaries(st.text(alphabet='"[{\\a'), inner),
                           max_leaves=30)


@given(json_values, st.booleans())
@settings(max_examples=300, deadline=None)
def test_json_depth_is_the_depth_json_loads_would_recurse_to(value, indent):
    assert json_depth(json.dumps(value, indent=2 if indent else None, ensure_ascii=False)) == depth(value)
