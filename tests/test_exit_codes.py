"""Both CLIs, as real processes, on every bad-input case of issue 19 (docs/reliability.md's table): each
exits 2 with a message naming the problem, never a traceback. Bad input is refused before any weights
load, so no case needs a model: the SDXL cases give weight files whose headers are wrong. The output
faults (--out read-only or under a file, a full disk, a second csg-evaluate) are in test_output_faults."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.test_cli import GRAPH, INTERVENTION, PORTRAIT, ROOT
from tests.test_files import SDXL_NAMES, checkpoint, png_chunk, sdxl_configs, weight_file  # noqa: F401 (fixture)

DATASET_ARGS = ["--vlm-url", "http://127.0.0.1:9/v1", "--vlm-name", "m", "--device", "cpu"]  # port 9: nothing answers


def images(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(PORTRAIT.read_bytes())
    return folder


def folder_dataset(folder: Path, captions_name: str, content: bytes | str, name: str = "d") -> list[str]:
    """--dataset for a folder dataset of one image, 1.png, whose captions file holds ``content``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / captions_name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return ["--dataset", f"{name}=folder:{path}@{images(folder / 'images', '1.png')}"]


def good_dataset(folder: Path) -> list[str]:
    return folder_dataset(folder, "captions.json", json.dumps({"1.png": "a face"}))


def coco_dataset(folder: Path, images_records: list, annotations: list) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "captions_val.json"
    path.write_text(json.dumps({"images": images_records, "annotations": annotations}))
    return ["--dataset", f"c=coco:{path}@{images(folder / 'images', '1.png')}"]


def celebahq_dataset(folder: Path, caption: Path | bytes, *image_names: str) -> list[str]:
    (folder / "captions").mkdir(parents=True, exist_ok=True)
    target = folder / "captions" / "1.txt"
    if isinstance(caption, Path):
        target.symlink_to(caption)
    else:
        target.write_bytes(caption)
    return ["--dataset", f"f=celebahq:{folder / 'captions'}@{images(folder / 'images', *image_names)}"]


def symlink(folder: Path, name: str, target: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).symlink_to(target)
    return folder / name


def fifo(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / name)  # a reader that opened it would wait for a writer forever
    return folder / name


def written(folder: Path, name: str, content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(content)
    return folder / name


def bomb(folder: Path) -> Path:
    """40000 x 40000 RGB, header only: 4.8 GB once decoded."""
    header = png_chunk(b"IHDR", (40000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0]))
    return written(folder, "bomb.png", b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IEND", b""))


def huge_text_chunk(folder: Path) -> Path:
    import zlib

    raw = PORTRAIT.read_bytes()  # signature and IHDR (33 bytes), an 80 MB zTXt once inflated, then the rest
    ztxt = png_chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"\0" * 80 * 2**20, 9))
    return written(folder, "ztxt.png", raw[:33] + ztxt + raw[33:])


def plans(folder: Path, graph: bytes, table: str = "") -> list[str]:
    written(folder, "g.json", graph)
    if table:
        return ["--plans", str(written(folder, "plans.csv", table.encode()))]
    return ["--plans", str(written(folder, "plans.json", json.dumps({"d/1": {"graph": "g.json"}}).encode()))]


def broken_scheduler(configs: Path, folder: Path) -> Path:
    for path in configs.rglob("*"):
        if path.is_file():
            written((folder / path.relative_to(configs)).parent, path.name, path.read_bytes())
    written(folder / "scheduler", "scheduler_config.json", b"{'beta_start': 0.00085,")
    return folder


def sdxl(kind: str):
    """--sdxl FILE of ``kind`` (tests.test_files.weight_file) with the tiny SDXL's configs."""
    return lambda tmp, configs: ["--sdxl", str(weight_file(tmp, kind)), "--sdxl-config", str(configs)]


# (issue item, what is wrong, args after the CLI's own good ones, a phrase of the message)
COUNTERFACTUAL = [
    ("3", "a decompression-bomb PNG", lambda tmp, _: ["--image", str(bomb(tmp))], "megapixels"),
    ("3", "a PNG with an 80 MB zTXt chunk", lambda tmp, _: ["--image", str(huge_text_chunk(tmp))],
     "Could not read the image"),
    ("3", "--sdxl FILE of random bytes", sdxl("random"), "not a readable safetensors file"),
    ("3", "--sdxl FILE cut off", sdxl("truncated"), "not a readable safetensors file"),
    ("3", "--sdxl FILE a pickle .ckpt", sdxl("pickle"), "is a pickle checkpoint"),
    ("3", "--sdxl FILE of SD 1.5", sdxl("sd15"), "Stable Diffusion 1.x/2.x"),
    ("3", "--sdxl FILE not a UNet", sdxl("vae-only"), "not a Stable Diffusion checkpoint"),
    ("3", "a scheduler_config.json that is not JSON",
     lambda tmp, configs: ["--sdxl", str(checkpoint(tmp / "sd_xl_base_1.0.safetensors", SDXL_NAMES)),
                           "--sdxl-config", str(broken_scheduler(configs, tmp / "configs"))],
     "scheduler_config.json is not valid JSON"),
    ("4", "the image a symlink to /dev/zero", lambda tmp, _: ["--image", str(symlink(tmp, "i.png", "/dev/zero"))],
     "is a device, not a file"),
    ("4", "the graph a symlink to /dev/urandom",
     lambda tmp, _: ["--graph-json", str(symlink(tmp, "g.json", "/dev/urandom"))], "is a device, not a file"),
    ("4", "the graph a FIFO", lambda tmp, _: ["--graph-json", str(fifo(tmp, "g.json"))], "a pipe (FIFO)"),
    ("4", "the image a folder", lambda tmp, _: ["--image", str(images(tmp / "i.png"))], "is a folder, not a file"),
    ("5", "the graph /etc/passwd", lambda tmp, _: ["--graph-json", "/etc/passwd"], "is not valid JSON"),
    ("5", "the graph binary", lambda tmp, _: ["--graph-json", str(written(tmp, "g.json", b"\x00\x01\xff"))],
     "is not UTF-8 text"),
    ("5", "the interventions not JSON",
     lambda tmp, _: ["--intervention-json", str(written(tmp, "i.json", b"{'id': 1"))], "is not valid JSON"),
    ("2", "the graph nested 100,000 deep", lambda tmp, _: ["--graph-json", str(written(tmp, "g.json", b"[" * 100_000))],
     "nested too deeply"),
    ("7", "--seed 2**70", lambda tmp, _: ["--seed", str(2**70)], "--seed"),
    ("7", "a caption over 1,000 characters", lambda tmp, _: ["--caption", "x" * 2000], "more than the 1,000 allowed"),
    ("10", "--out a file", lambda tmp, _: ["--out", str(written(tmp, "notes.txt", b"x"))], "is a file, not a folder"),
]

EVALUATE = [
    ("3", "COCO image records without ids",
     lambda tmp, _: coco_dataset(tmp, [{"file_name": "1.png"}], [{"id": 5, "image_id": 1, "caption": "a"}]),
     "'id' must be a whole number"),
    ("3", "a COCO caption of the wrong type",
     lambda tmp, _: coco_dataset(tmp, [{"id": 1, "file_name": "1.png"}], [{"id": 5, "image_id": 1, "caption": 5}]),
     "the caption is a int"),
    ("3", "captions JSON nested 100,000 deep", lambda tmp, _: folder_dataset(tmp, "captions.json", "[" * 100_000),
     "nested too deeply"),
    ("3", "a CSV field over 131,072 characters",
     lambda tmp, _: folder_dataset(tmp, "captions.csv", f"image,caption\n1.png,{'x' * 131_073}\n"),
     "longer than 131,072 characters"),
    ("3", "--per-dataset -1", lambda tmp, _: [*good_dataset(tmp), "--per-dataset", "-1"],
     "--per-dataset must be at least 1"),
    ("3", "--sdxl FILE of random bytes", lambda tmp, configs: [*good_dataset(tmp), *sdxl("random")(tmp, configs)],
     "not a readable safetensors file"),
    ("3", "--sdxl FILE a pickle .ckpt", lambda tmp, configs: [*good_dataset(tmp), *sdxl("pickle")(tmp, configs)],
     "is a pickle checkpoint"),
    ("6", "an SD 1.5 --sdxl FILE", lambda tmp, configs: [*good_dataset(tmp), *sdxl("sd15")(tmp, configs)],
     "Stable Diffusion 1.x/2.x"),
    ("4", "a captions file that is a symlink to /dev/zero",
     lambda tmp, _: ["--dataset", f"d=folder:{symlink(tmp, 'captions.json', '/dev/zero')}@{images(tmp, '1.png')}"],
     "is a device, not a file"),
    ("4", "a CelebA-HQ caption that is a symlink to /dev/urandom",
     lambda tmp, _: celebahq_dataset(tmp, Path("/dev/urandom"), "1.png"), "is a device, not a file"),
    ("4", "a captions file that is a FIFO",
     lambda tmp, _: ["--dataset", f"d=folder:{fifo(tmp, 'captions.json')}@{images(tmp / 'i', '1.png')}"],
     "a pipe (FIFO)"),
    ("5", "a captions file's graph that is /etc/passwd",
     lambda tmp, _: folder_dataset(tmp, "captions.csv", "image,caption,graph\n1.png,a face,/etc/passwd\n"),
     "The graph file /etc/passwd"),
    ("5", "a --plans graph that is binary", lambda tmp, _: [*good_dataset(tmp), *plans(tmp / "p", b"\x00\x01\xff")],
     "is not UTF-8 text"),
    ("5", "a --plans graph that is not JSON", lambda tmp, _: [*good_dataset(tmp), *plans(tmp / "p", b"{'c1'")],
     "is not valid JSON"),
    ("6", "a missing caption", lambda tmp, _: folder_dataset(tmp, "captions.json", '{"1.png": null}'),
     "the caption is missing"),
    ("6", "a caption that is a list", lambda tmp, _: folder_dataset(tmp, "captions.json", '{"1.png": ["x"]}'),
     "the caption is a list"),
    ("6", "an unterminated CSV quote",
     lambda tmp, _: folder_dataset(tmp, "captions.csv", 'image,caption\n1.png,"a face\n1.png,more\n'), "never closed"),
    ("6", "two CelebA-HQ images with one stem", lambda tmp, _: celebahq_dataset(tmp, b"a face\n", "1.png", "1.jpg"),
     "fits several images: 1.jpg, 1.png"),
    ("6", "a folder named like the image",
     lambda tmp, _: folder_dataset(images(tmp / "images" / "2.jpg").parent.parent, "captions.json",
                                   '{"2.jpg": "a face"}'), "is a folder, not an image"),
    ("6", "a plans row given twice",
     lambda tmp, _: [*good_dataset(tmp), *plans(tmp / "p", GRAPH.read_bytes(), "item,graph\nd/1,g.json\nd/1,g.json\n")],
     "twice"),
    ("7", "--seed 2**70", lambda tmp, _: [*good_dataset(tmp), "--seed", str(2**70)], "--seed"),
    ("7", "a 10 MB caption",
     lambda tmp, _: folder_dataset(tmp, "captions.json", json.dumps({"1.png": "x" * 10 * 2**20})),
     "more than the 1,000 allowed"),
    ("7", "a dataset name with |",
     lambda tmp, _: folder_dataset(tmp, "captions.json", '{"1.png": "a"}', name="a|b"), "line breaks"),
    ("7", "a dataset name with a line break",
     lambda tmp, _: folder_dataset(tmp, "captions.json", '{"1.png": "a"}', name="a\nb"), "line breaks"),
]

CASES = [("csg-counterfactual", *case) for case in COUNTERFACTUAL] + [("csg-evaluate", *case) for case in EVALUATE]


def command(cli: str, extra: list[str], tmp: Path) -> list[str]:
    """The CLI's good arguments, with ``extra`` replacing the options it names (last one wins in argparse)."""
    if cli == "csg-counterfactual":
        image = str(PORTRAIT)
        if extra[:1] == ["--image"]:  # the image is the positional argument
            image, extra = extra[1], extra[2:]
        return ["-m", "csg.cli", image, "--graph-json", str(GRAPH), "--intervention-json", str(INTERVENTION),
                "--out", str(tmp / "out"), *extra]
    return ["-m", "csg.evaluate", "--out", str(tmp / "eval"), *DATASET_ARGS, *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sdxl_configs):  # noqa: F811 (the fixture)
    """Every case's (exit code, stderr), the processes run a few at a time."""
    home = tmp_path_factory.mktemp("hf_home")  # no weight search finds the machine's own caches
    env = {**{k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "COMFYUI_PATH")},
           "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

    def run(case):
        cli, _, wrong, make, _ = case
        tmp = tmp_path_factory.mktemp("case")
        done = subprocess.run([sys.executable, *command(cli, make(tmp, sdxl_configs), tmp)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        return done.returncode, done.stderr

    with ThreadPoolExecutor(4) as pool:
        return dict(zip([case[:3] for case in CASES], pool.map(run, CASES)))


@pytest.mark.parametrize("cli, item, wrong, make, message", CASES, ids=[f"{c[0]}: {c[2]}" for c in CASES])
def test_bad_input_exits_2_naming_the_problem(runs, cli, item, wrong, make, message):
    code, err = runs[cli, item, wrong]
    assert code == 2 and message in err, (code, err)
    assert "Traceback" not in err and (err.startswith(f"{cli}: ") or "usage:" in err), err
