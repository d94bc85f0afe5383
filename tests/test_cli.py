"""``csg-counterfactual`` end to end on tiny random SDXL weights saved in diffusers format, weight
discovery on real folder layouts, the missing-weights message, and the benchmark's smoke mode."""

import json
import os
import re
import runpy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from csg.cli import main
from csg.commands.outputs import output_layout, plan_layout, save_plan, write_outputs
from csg.errors import WeightsMissingError
from csg.files import MAX_JSON_BYTES, read_json
from csg.graph import MAX_TEXT_CHARS, CausalGraph, Intervention, check_intervention
from csg.plan import Plan
from csg.weights import SDXL_REPO, find_sdxl, find_vlm
from tests.test_vlm_stages import load_scene, scene_server
from tests.vlm_server import Reply, VLMServer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "csg" / "examples"
PORTRAIT, GRAPH, INTERVENTION = (EXAMPLES / n for n in ("portrait.png", "portrait_graph.json",
                                                         "portrait_intervention.json"))
FAST = ["--steps", "6", "--warmup", "2", "--max-side", "64", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(autouse=True)
def no_local_models(tmp_path, monkeypatch):
    """Point every weight search at empty folders, so the machine's own caches never leak in."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory, tiny_components):
    """The tiny random SDXL written as a diffusers folder, loaded back through from_pretrained."""
    folder = tmp_path_factory.mktemp("sdxl")
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        getattr(tiny_components, sub).save_pretrained(folder / sub)
    return folder


def read_report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_hand_written_graph_and_intervention_run_end_to_end(sdxl_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MY_VLM_KEY", "sk-secret-never-written")
    out = tmp_path / "out"
    code = main([str(PORTRAIT), "--graph-json", str(GRAPH), "--intervention-json", str(INTERVENTION),
                 "--sdxl", str(sdxl_folder), "--out", str(out), *FAST])
    assert code == 0, capsys.readouterr().err
    for name in ("original.png", "counterfactual.png", "mask_1.png", "mask_2.png", "mask_3.png"):
        with Image.open(out / name) as image:
            assert image.size == (64, 64), name
    with Image.open(out / "counterfactual.png") as image:
        assert image.mode == "RGB"
    with Image.open(out / "graph.png") as image:
        assert image.width > 64
    report = read_report(out)
    assert report["graph"]["concepts"][0]["name"] == "age"
    [entry] = report["interventions"]
    assert entry["intervention"]["new_value"] == "old" and entry["stripped_changes"] == []
    assert [c["concept_id"] for c in entry["edit_concepts"]] == ["c1", "c2", "c3"]
    assert entry["files"]["masks"] == [{"concept_id": f"c{k}", "file": str(out / f"mask_{k}.png")} for k in (1, 2, 3)]
    assert report["parameters"]["num_steps"] == 6 and report["parameters"]["mask_mode"] == "intersect"
    assert report["source_prompt"].startswith("a portrait photo")
    assert report["models"]["sdxl"] == str(sdxl_folder) and report["models"]["vlm"] is None
    text = (out / "report.json").read_text()
    assert "sk-secret" not in text and "api_key" not in text


def test_vlm_server_propagates_a_user_intervention(sdxl_folder, tmp_path, monkeypatch, capsys):
    """The whole chain with an OpenAI-compatible VLM on 127.0.0.1: describe, extract, propagate, edit."""
    monkeypatch.setenv("MY_VLM_KEY", "sk-secret-never-written")
    out = tmp_path / "out"
    with scene_server(load_scene("portrait")) as server:
        code = main([str(PORTRAIT), "--do", "age=old", "--vlm-url", server.base_url, "--vlm-name", "fixture-vlm",
                     "--api-key-env", "MY_VLM_KEY", "--sdxl", str(sdxl_folder), "--out", str(out), *FAST])
    assert code == 0, capsys.readouterr().err
    assert all(r.headers.get("Authorization") == "Bearer sk-secret-never-written" for r in server.requests)
    report = read_report(out)
    [entry] = report["interventions"]
    assert entry["intervention"]["target_concept_id"] == "c1" and entry["intervention"]["new_value"] == "old"
    assert {c["concept_id"] for c in entry["edit_concepts"]} >= {"c1", "c2"}
    assert report["source_prompt"].startswith("a studio portrait photo")  # the VLM's description
    assert "fixture-vlm" in report["models"]["vlm"]
    for file in out.rglob("*"):
        if file.is_file():
            assert b"sk-secret" not in file.read_bytes(), file
    assert "sk-secret" not in capsys.readouterr().err


def test_target_only_edits_the_target_without_any_vlm(sdxl_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([str(PORTRAIT), "--graph-json", str(GRAPH), "--do", "hair color=gray hair", "--target-only",
                 "--sdxl", str(sdxl_folder), "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "VAE in float32" in err and "text encoders" not in err  # on the CPU: nothing to offload
    report = read_report(out)
    [entry] = report["interventions"]
    assert entry["intervention"]["target_concept_id"] == "c2" and entry["intervention"]["new_value"] == "gray hair"
    assert entry["intervention"]["propagated_changes"] == []
    assert [c["concept_id"] for c in entry["edit_concepts"]] == ["c2"] and report["models"]["vlm"] is None
    assert (out / "counterfactual.png").is_file()


def test_all_proposals_are_edited_in_one_run(sdxl_folder, tmp_path, capsys):
    out = tmp_path / "out"
    with scene_server(load_scene("portrait")) as server:
        code = main([str(PORTRAIT), "--pick", "all", "--caption", "a portrait photo of a woman astronaut",
                     "--vlm-url", server.base_url, "--vlm-name", "fixture-vlm", "--sdxl", str(sdxl_folder),
                     "--out", str(out), *FAST])
    assert code == 0, capsys.readouterr().err
    report = read_report(out)
    assert len(report["interventions"]) == 3 and report["source_prompt"] == "a portrait photo of a woman astronaut"
    for entry in report["interventions"]:
        with Image.open(entry["files"]["counterfactual"]) as image:
            assert image.size == (64, 64)
        assert Path(entry["files"]["graph"]).is_file()
    assert (out / "original.png").is_file()


def test_forbidden_changes_are_stripped_and_reported(sdxl_folder, tmp_path, capsys):
    intervention = json.loads(INTERVENTION.read_text())
    intervention["propagated_changes"].append(
        {"concept_id": "c6", "new_value": "moon base", "reason": "an overreaching VLM"})  # not a descendant of age
    path = tmp_path / "bad_intervention.json"
    path.write_text(json.dumps(intervention))
    out = tmp_path / "out"
    code = main([str(PORTRAIT), "--graph-json", str(GRAPH), "--intervention-json", str(path), "--sdxl",
                 str(sdxl_folder), "--out", str(out), "--mask-mode", "noise", "--concept-scale", "hair color=5",
                 "--reverse", "c3", *FAST])
    assert code == 0
    report = read_report(out)
    assert report["parameters"]["concept_scales"] == {"hair color": 5.0} and report["parameters"]["reverse"] == ["c3"]
    [entry] = report["interventions"]
    assert [v["concept_id"] for v in entry["stripped_changes"]] == ["c6"]
    assert "c6" not in [m["concept_id"] for m in entry["files"]["masks"]]
    assert "c6" in capsys.readouterr().err


def test_baseline_method_writes_the_counterfactual(sdxl_folder, tmp_path):
    out = tmp_path / "out"
    assert main([str(PORTRAIT), "--graph-json", str(GRAPH), "--intervention-json", str(INTERVENTION), "--sdxl",
                 str(sdxl_folder), "--out", str(out), "--method", "ddpm", *FAST]) == 0
    with Image.open(out / "counterfactual.png") as image:
        assert image.size == (64, 64)
    report = read_report(out)
    assert report["method"] == "ddpm" and report["parameters"]["guidance_scale"] == 7.5
    assert not list(out.glob("mask_*.png"))


def test_missing_sdxl_names_what_to_get_and_exits_2(tmp_path, capsys):
    code = main([str(PORTRAIT), "--graph-json", str(GRAPH), "--intervention-json", str(INTERVENTION),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"hf download {SDXL_REPO}" in err and "models/checkpoints" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # it stopped before doing anything


def test_missing_vlm_names_what_to_get_and_exits_2(sdxl_folder, tmp_path, capsys):
    code = main([str(PORTRAIT), "--do", "age=old", "--sdxl", str(sdxl_folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "Qwen/Qwen3-VL-8B-Instruct" in err and "--vlm-url" in err and "--graph-json" in err
    assert "Traceback" not in err


def test_single_checkpoint_without_configs_says_how_to_get_them(tmp_path, capsys):
    checkpoint = tmp_path / "sd_xl_base_1.0.safetensors"
    checkpoint.write_bytes(b"")
    code = main([str(PORTRAIT), "--graph-json", str(GRAPH), "--intervention-json", str(INTERVENTION),
                 "--sdxl", str(checkpoint)])
    err = capsys.readouterr().err
    assert code == 2 and "--include '*.json' '*.txt'" in err and "--sdxl-config" in err


@pytest.mark.parametrize("argv, message", [
    (["--do", "age"], "concept=value"),
    (["--pick", "zero"], "--pick"),
    (["--concept-scale", "hair color"], "concept=number"),
    (["--graph-json", str(GRAPH), "--intervention-json", str(INTERVENTION), "--device", "gpu0"], "Unknown device"),
    (["--graph-json", str(GRAPH), "--do", "ocean=blue"], "hair color"),  # lists the known concepts
    (["--graph-json", "missing.json", "--intervention-json", "missing.json"], "does not exist"),
    (["--do", "age=old", "--target-only"], "--target-only"),
    (["--do", "age=old", "--threshold", "1.5"], "threshold must be in [0, 1]"),  # before the VLM, which is not set up
    (["--do", "age=old", "--steps", "8"], "no step would be guided"),  # the default warm-up is 10
    (["--do", "age=old", "--steps", "8", "--method", "ddim"], "weights were not found"),  # no warm-up to check
    (["--do", "age=old", "--method", "ddpm", "--guidance-scale", "nan"], "guidance_scale must be a finite"),
    (["--do", "age=old", "--pick", "2"], "--pick chooses among"),
    (["--pick", "²"], "--pick expects"),  # a digit to str.isdigit, not to int()
    *[(["--do", "age=old", "--vlm-url", "http://127.0.0.1:9/v1", "--vlm-name", "m", option, value], message)
      for option, value, message in [("--vlm-timeout", "0", "--vlm-timeout must be"),
                                     ("--vlm-timeout", "-5", "--vlm-timeout must be"),
                                     ("--vlm-timeout", "nan", "--vlm-timeout must be"),
                                     ("--vlm-timeout", "inf", "--vlm-timeout must be"),
                                     ("--vlm-timeout", "1e300", "at most 3600"),
                                     ("--vlm-retries", "-1", "--vlm-retries must be"),
                                     ("--vlm-retries", "11", "from 0 to 10")]],
    (["--do", "age=old", "--vlm-timeout", "30"], "give its --vlm-url"),  # a local model has no timeout
    (["--graph-json", str(GRAPH), "--intervention-json", str(INTERVENTION), "--out", str(PORTRAIT)], "is a file"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    assert main([str(PORTRAIT), *argv]) == 2
    assert message in capsys.readouterr().err


def test_unknown_concept_in_a_setting_exits_2(sdxl_folder, tmp_path, capsys):
    code = main([str(PORTRAIT), "--graph-json", str(GRAPH), "--intervention-json", str(INTERVENTION), "--sdxl",
                 str(sdxl_folder), "--out", str(tmp_path / "out"), "--reverse", "ocean", *FAST])
    assert code == 2 and "ocean" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_intervention_json_that_changes_nothing_exits_2(sdxl_folder, tmp_path, capsys):
    """The new value equal to the current one used to edit with the leftover value phrase."""
    intervention = json.loads(INTERVENTION.read_text())
    current = next(c for c in json.loads(GRAPH.read_text())["concepts"] if c["id"] == intervention["target_concept_id"])
    path = tmp_path / "unchanged.json"
    path.write_text(json.dumps({**intervention, "new_value": current["current_value"].upper()}))
    code = main([str(PORTRAIT), "--graph-json", str(GRAPH), "--intervention-json", str(path),
                 "--sdxl", str(sdxl_folder), "--out", str(tmp_path / "out"), *FAST])
    assert code == 2 and "so this changes nothing" in capsys.readouterr().err


def test_unreadable_image_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope.png"), "--graph-json", str(GRAPH), "--intervention-json", str(INTERVENTION)]) == 2
    assert "does not exist" in capsys.readouterr().err


def fake_snapshot(cache: Path, repo: str, files: list[str], revision: str = "abc123") -> Path:
    """A Hugging Face cache entry laid out as huggingface_hub writes it (files empty)."""
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(revision)
    snapshot = base / "snapshots" / revision
    for name in files:
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(b"")
    return snapshot


SDXL_CONFIGS = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "text_encoder_2/config.json", "tokenizer/vocab.json", "tokenizer_2/vocab.json"]
SDXL_WEIGHTS = [f"{p}/diffusion_pytorch_model.safetensors" for p in ("unet", "vae")] + [
    f"{p}/model.safetensors" for p in ("text_encoder", "text_encoder_2")]
VLM_FILES = ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"]


def test_weights_are_found_in_the_hf_cache_and_comfyui(tmp_path, monkeypatch):
    cache = tmp_path / "hf_home" / "hub"
    comfy = tmp_path / "ComfyUI"
    # configs only in the cache: not a full folder, but it serves a ComfyUI checkpoint
    configs = fake_snapshot(cache, SDXL_REPO, SDXL_CONFIGS)
    for name in ("other_model.safetensors", "juggernautXL.safetensors", "sd_xl_base_1.0.safetensors"):
        (comfy / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
        (comfy / "models" / "checkpoints" / name).write_bytes(b"")
    found = find_sdxl(None, None, comfy)
    assert found.path.name == "sd_xl_base_1.0.safetensors" and found.config == configs
    # with weights in the cache, the diffusers folder wins
    full = fake_snapshot(cache, SDXL_REPO, SDXL_CONFIGS + SDXL_WEIGHTS)
    assert find_sdxl(None, None, comfy).path == full and find_sdxl(None, None, comfy).config is None

    with pytest.raises(WeightsMissingError, match="Qwen3-VL"):
        find_vlm(None, comfy)

    def llm_folder(name: str) -> None:
        (comfy / "models" / "LLM" / name).mkdir(parents=True)
        for file in VLM_FILES:
            (comfy / "models" / "LLM" / name / file).write_bytes(b"")

    llm_folder("Llama-3-8B")
    with pytest.raises(WeightsMissingError):  # a text-only model is never taken for the VLM
        find_vlm(None, comfy)
    llm_folder("Qwen2.5-VL-7B-Instruct")
    assert find_vlm(None, comfy).name == "Qwen2.5-VL-7B-Instruct"
    llm_folder("Qwen3-VL-4B-Instruct")
    assert find_vlm(None, comfy).name == "Qwen3-VL-4B-Instruct"  # the newer family first
    cached = fake_snapshot(cache, "Qwen/Qwen3-VL-8B-Instruct", VLM_FILES)
    assert find_vlm(None, comfy) == cached  # the HF cache comes first


def test_benchmark_smoke_mode_runs(capsys):
    module = runpy.run_path(str(ROOT / "benchmarks" / "benchmark.py"), run_name="benchmark")
    assert module["main"](["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--steps", "4"]) == 0
    table = capsys.readouterr().out
    for row in ("inversion", "edit, 1 concept", "edit, 3 concepts", "3 interventions, batched"):
        assert row in table


def test_an_interrupted_edit_keeps_the_vlms_work_for_a_rerun_without_it(sdxl_folder, tmp_path, monkeypatch, capsys):
    """Ctrl-C during sampling: exit 130, and the saved graph and intervention replay the run with no VLM."""
    from csg.diffusers_host import DiffusersSDXLHost

    calls = {"n": 0}
    predict = DiffusersSDXLHost.predict_noise

    def ctrl_c_at_the_fifth_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return predict(self, *args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(DiffusersSDXLHost, "predict_noise", ctrl_c_at_the_fifth_step)
    with scene_server(load_scene("portrait")) as server:
        code = main([str(PORTRAIT), "--do", "age=old", "--vlm-url", server.base_url, "--vlm-name", "fixture-vlm",
                     "--sdxl", str(sdxl_folder), "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert f"--graph-json {out / 'graph.json'} --intervention-json {out / 'intervention.json'}" in err
    assert not (out / "counterfactual.png").exists()
    monkeypatch.undo()

    rerun = tmp_path / "rerun"
    code = main([str(PORTRAIT), "--graph-json", str(out / "graph.json"), "--intervention-json",
                 str(out / "intervention.json"), "--caption", "a studio portrait photo", "--sdxl", str(sdxl_folder),
                 "--out", str(rerun), *FAST])
    assert code == 0, capsys.readouterr().err
    [entry] = read_report(rerun)["interventions"]
    assert entry["intervention"] == json.loads((out / "intervention.json").read_text())
    assert (rerun / "counterfactual.png").is_file() and read_report(rerun)["models"]["vlm"] is None


# -- hostile input: ids, files and options -------------------------------------------------------


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def proposals_scene(ids: list[str]) -> dict:
    scene = load_scene("portrait")
    for proposal, new_id in zip(scene["proposals"]["interventions"], ids):
        proposal["id"] = new_id
    return scene


@pytest.mark.parametrize("ids", [["..", ".", "int/1"], ["int 1", "int/1", "int_1"]])
def test_model_chosen_ids_never_decide_where_files_go(ids, sdxl_folder, tmp_path, capsys):
    """A VLM proposal id '..' used to put intervention.json (and then the images) beside --out, '.' into --out
    itself, and ids that slug alike into one folder. Folders are numbered; the report says which is which."""
    work = tmp_path / "work"
    out = work / "out"
    argv = [str(PORTRAIT), "--pick", "all", "--caption", "a portrait photo", "--vlm-name", "fixture-vlm",
            "--sdxl", str(sdxl_folder), "--out", str(out), *FAST]
    with scene_server(proposals_scene(ids)) as server:
        assert main([*argv, "--vlm-url", server.base_url]) == 0, capsys.readouterr().err
        written = files_under(work)
        first_report = read_report(out)
        assert main([*argv, "--vlm-url", server.base_url]) == 0  # a rerun writes the very same files
    assert files_under(work) == written and all(name.startswith("out/") for name in written)
    report = read_report(out)
    assert [e["intervention"]["id"] for e in report["interventions"]] == ids
    for number, (entry, first) in enumerate(zip(report["interventions"], first_report["interventions"]), start=1):
        folder = out / f"intervention_{number}"
        assert entry["files"] == first["files"] and entry["files"]["folder"] == str(folder)
        assert json.loads((folder / "intervention.json").read_text())["id"] == ids[number - 1]
        masks = [m["file"] for m in entry["files"]["masks"]]
        assert masks == [str(folder / f"mask_{k}.png") for k in range(1, len(entry["edit_concepts"]) + 1)]
        assert [m["concept_id"] for m in entry["files"]["masks"]] == [c["concept_id"] for c in entry["edit_concepts"]]
        assert {entry["files"]["counterfactual"], entry["files"]["graph"], *masks} <= {str(work / f) for f in written}


def test_concept_ids_that_slug_alike_get_a_mask_each(sdxl_folder, tmp_path, capsys):
    ids = ["c 1", "c/1", "c_1"]  # all three used to be written to mask_c_1.png
    graph = {"concepts": [{"id": cid, "name": f"part {k}", "current_value": f"value {k}"} for k, cid in enumerate(ids)],
             "relationships": [{"id": "r1", "cause_id": "c 1", "effect_id": "c/1"},
                               {"id": "r2", "cause_id": "c/1", "effect_id": "c_1"}]}
    intervention = {"id": "../../escape", "target_concept_id": "c 1", "new_value": "red",
                    "propagated_changes": [{"concept_id": "c/1", "new_value": "blue"},
                                           {"concept_id": "c_1", "new_value": "green"}]}
    (tmp_path / "graph.json").write_text(json.dumps(graph))
    (tmp_path / "intervention.json").write_text(json.dumps(intervention))
    out = tmp_path / "out"
    code = main([str(PORTRAIT), "--graph-json", str(tmp_path / "graph.json"), "--intervention-json",
                 str(tmp_path / "intervention.json"), "--sdxl", str(sdxl_folder), "--out", str(out), *FAST])
    assert code == 0, capsys.readouterr().err
    [entry] = read_report(out)["interventions"]
    assert entry["files"]["masks"] == [{"concept_id": cid, "file": str(out / f"mask_{k}.png")}
                                       for k, cid in enumerate(ids, start=1)]
    assert files_under(out) == {"original.png", "graph.json", "intervention.json", "report.json", "counterfactual.png",
                                "graph.png", "mask_1.png", "mask_2.png", "mask_3.png"}
    assert files_under(tmp_path) - {f"out/{name}" for name in files_under(out)} == {"graph.json", "intervention.json"}


GOOD_GRAPH_TEXT = GRAPH.read_text(encoding="utf-8").replace("light brown", "châtain")  # not ASCII


@pytest.mark.parametrize("content, message", [
    (GOOD_GRAPH_TEXT.encode("latin-1"), "is not UTF-8 text (byte"),
    (GOOD_GRAPH_TEXT.encode("utf-16"), "UTF-16 byte-order mark"),  # Notepad, PowerShell's Out-File
    (GOOD_GRAPH_TEXT.encode("utf-16-le"), "it holds NUL bytes"),  # no byte-order mark
    (bytes(range(256)) * 4, "is not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"concepts": [', "Fix the JSON syntax"),
    (b'{"concepts": ' + b"9" * 5_000 + b"}", "Shorten that value"),  # more digits than Python converts
], ids=["latin-1", "utf-16", "utf-16-le", "binary", "deep", "syntax", "huge-number"])
def test_graph_files_that_are_not_utf8_json_exit_2_naming_the_file(content, message, tmp_path, capsys):
    path = tmp_path / "graph.json"
    path.write_bytes(content)
    assert main([str(PORTRAIT), "--graph-json", str(path), "--intervention-json", str(INTERVENTION)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "Traceback" not in err
    if "UTF" in message:
        assert "Save it as UTF-8" in err


def test_json_files_that_cannot_be_read_exit_2(tmp_path, monkeypatch, capsys):
    huge = tmp_path / "huge.json"
    with huge.open("wb") as handle:
        handle.truncate(MAX_JSON_BYTES + 1)  # sparse: nothing is really written
    locked = tmp_path / "locked.json"
    locked.write_text(INTERVENTION.read_text())
    real_open = os.open

    def refuse_locked(path, *args, **kwargs):  # chmod does not stop root, who runs the CI
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_locked)
    for path, message in [(tmp_path, "is a folder"), (tmp_path / "missing.json", "does not exist"),
                          (huge, "larger than 1 MiB"), (locked, "cannot be read (Permission denied)")]:
        assert main([str(PORTRAIT), "--graph-json", str(GRAPH), "--intervention-json", str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(path) in err and "Traceback" not in err, err


def test_a_utf8_file_with_a_byte_order_mark_is_read(tmp_path, capsys):
    graph = tmp_path / "graph.json"
    graph.write_bytes(GOOD_GRAPH_TEXT.encode("utf-8-sig"))  # as Windows editors save "UTF-8 with BOM"
    assert main([str(PORTRAIT), "--graph-json", str(graph), "--intervention-json", str(INTERVENTION)]) == 2
    assert "weights were not found" in capsys.readouterr().err  # past both files, at the weights


def test_vlm_timeout_and_retries_reach_the_server(sdxl_folder, tmp_path, capsys):
    with VLMServer(lambda request: Reply(body="{}", delay=6.0)) as server:  # slower than the timeout
        started = time.monotonic()
        code = main([str(PORTRAIT), "--do", "age=old", "--vlm-url", server.base_url, "--vlm-name", "fixture-vlm",
                     "--vlm-timeout", "0.3", "--vlm-retries", "1", "--sdxl", str(sdxl_folder),
                     "--out", str(tmp_path / "out"), *FAST])
        elapsed = time.monotonic() - started
        assert code == 1 and len(server.requests) == 2  # the first try and one retry
    assert elapsed < 5.5, elapsed  # neither try waited for the 6 s answer
    assert "Traceback" not in capsys.readouterr().err


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_every_input_is_checked_before_the_weights_are_looked_for(tmp_path, capsys):
    """No --sdxl and nothing in the caches: each of these used to report the missing weights first."""
    portrait = json.loads(INTERVENTION.read_text())
    cases = [
        (write_json(tmp_path / "target.json", {**portrait, "target_concept_id": "c99"}), [],
         "targets 'c99', which is not in the graph"),
        (write_json(tmp_path / "null.json", {**portrait, "new_value": None}), [],
         "field 'new_value' is null. It must be a string"),
        (write_json(tmp_path / "list.json", [portrait]), [], 'expected one intervention'),
        (write_json(tmp_path / "three.json", {"interventions": [portrait] * 3}), ["--pick", "4"],
         "three.json holds only 3 intervention(s)"),
        (write_json(tmp_path / "empty.json", {"interventions": []}), [], "non-empty list"),
        (INTERVENTION, ["--reverse", "ocean"], "ocean"),
    ]
    for path, extra, message in cases:
        assert main([str(PORTRAIT), "--graph-json", str(GRAPH), "--intervention-json", str(path), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "weights" not in err, err


def test_an_interventions_file_from_the_proposal_stage_is_accepted_with_pick(sdxl_folder, tmp_path, capsys):
    portrait = json.loads(INTERVENTION.read_text())
    hair = {"id": "i2", "target_concept_id": "c2", "new_value": "black hair"}
    smile = {"id": "i3", "target_concept_id": "c4", "new_value": "serious"}
    path = write_json(tmp_path / "proposals.json", {"interventions": [portrait, hair, smile]})
    base = [str(PORTRAIT), "--graph-json", str(GRAPH), "--intervention-json", str(path), "--sdxl", str(sdxl_folder),
            *FAST]

    assert main([*base, "--out", str(tmp_path / "first")]) == 0
    assert "holds 3 interventions; editing the first" in capsys.readouterr().err
    assert [e["intervention"]["id"] for e in read_report(tmp_path / "first")["interventions"]] == ["i1"]

    assert main([*base, "--pick", "2", "--out", str(tmp_path / "second")]) == 0
    assert [e["intervention"]["id"] for e in read_report(tmp_path / "second")["interventions"]] == ["i2"]

    out = tmp_path / "all"
    assert main([*base, "--pick", "all", "--out", str(out)]) == 0
    assert [e["intervention"]["id"] for e in read_report(out)["interventions"]] == ["i1", "i2", "i3"]
    for number in (1, 2, 3):
        assert (out / f"intervention_{number}" / "counterfactual.png").is_file()


# -- output paths, for any ids a model or a file may choose ---------------------------------------

HOSTILE = ["..", ".", "/", "\\", "\0", "../..", "a/../../b", "C:\\Windows", "CON", "nul", "A", "a", "ß", "SS", "ss",
           "e\u0301", "\u00e9", "\u202egnp.exe", "\u05e9\u05dc\u05d5\u05dd", "😀", "\ud800", " ", "~", "$HOME",
           "intervention_1", "mask_1.png", "report.json", "x" * 10_000]  # the last four tempt collisions
hostile_text = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=20))
LAYOUT_OUT = Path(tempfile.gettempdir()) / "csg-layout" / "out"  # never written: output_layout only names paths


def written_paths(layout) -> list[Path]:
    return [layout.original, layout.graph_json, layout.report] + [
        path for item in layout.items for path in (item.intervention, item.counterfactual, item.graph,
                                                   *(mask for _, mask in item.masks))]


@settings(max_examples=2000, deadline=None)
@given(items=st.lists(st.tuples(hostile_text, st.lists(hostile_text, max_size=6)), min_size=1, max_size=5))
def test_output_paths_are_inside_out_distinct_and_stable_for_any_ids(items):
    layout = output_layout(LAYOUT_OUT, items)
    paths = written_paths(layout)
    root = LAYOUT_OUT.resolve()
    assert all(path.resolve().is_relative_to(root) and path.resolve() != root for path in paths)
    assert len({str(path.resolve()).casefold() for path in paths}) == len(paths)  # also on case-insensitive disks
    assert all(re.fullmatch(r"[a-z0-9_]+(\.png|\.json)?", part) for path in paths
               for part in path.relative_to(LAYOUT_OUT).parts)  # short, portable names
    renamed = [(f"id {k}", [f"concept {j}" for j in range(len(concepts))]) for k, (_, concepts) in enumerate(items)]
    assert written_paths(output_layout(LAYOUT_OUT, renamed)) == paths  # the ids never shape a path
    assert [(item.intervention_id, [cid for cid, _ in item.masks]) for item in layout.items] == \
        [(iid, list(concepts)) for iid, concepts in items]  # ... but the report can map each id to its files


@dataclass
class PaintedResult:
    """What write_outputs reads from a counterfactual result, with small real images."""

    image: Image.Image
    source_image: Image.Image
    masks: dict

    def mask_image(self, concept_id: str) -> Image.Image:
        return Image.new("L", (8, 8), self.masks[concept_id])


@st.composite
def hostile_plans(draw) -> Plan:
    """A chain graph c_1 -> c_2 -> ... and interventions that change a concept and all below it, every id hostile."""
    named = st.one_of(st.sampled_from(HOSTILE[:-1]), st.text(max_size=20)).filter(str.strip)  # names are drawn
    # a graph refuses ids over MAX_TEXT_CHARS (output_layout alone is tested with 10,000 characters)
    hostile_id = hostile_text.filter(lambda t: t.strip() and len(t) <= MAX_TEXT_CHARS)
    ids = draw(st.lists(hostile_id, min_size=1, max_size=4, unique_by=str.strip))
    names = draw(st.lists(named, min_size=len(ids), max_size=len(ids), unique_by=lambda t: t.strip().lower()))
    graph = CausalGraph.from_dict({
        "concepts": [{"id": cid, "name": name, "current_value": "now"} for cid, name in zip(ids, names)],
        "relationships": [{"id": f"r{k}", "cause_id": a, "effect_id": b}
                          for k, (a, b) in enumerate(zip(ids, ids[1:]))]})
    interventions = []
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.integers(0, len(ids) - 1))
        interventions.append(check_intervention(graph, Intervention.from_dict({
            "id": draw(hostile_id), "target_concept_id": ids[target], "new_value": draw(named),
            "propagated_changes": [{"concept_id": cid, "new_value": "then"} for cid in ids[target + 1:]]})))
    return Plan(graph, interventions, "a photo")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=hostile_plans())
def test_the_cli_writes_every_file_inside_out_once_and_the_same_on_a_rerun(plan):
    painted = Image.new("RGB", (8, 8), "gray")
    results = [PaintedResult(painted, painted,
                             {c.concept_id: 40 * k for k, c in enumerate(i.edit_concepts(plan.graph))})
               for i in plan.interventions]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        out = root / "runs" / "out"

        def run() -> dict[Path, bytes]:
            layout = plan_layout(out, plan)
            save_plan(layout, plan)
            write_outputs(layout, plan, results, {})
            return {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}

        written = run()
        assert all(path.resolve().is_relative_to(out.resolve()) for path in written)
        assert set(written) == set(written_paths(plan_layout(out, plan)))  # one file per item, none shared
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        for entry, intervention in zip(report["interventions"], plan.interventions):
            replayed = read_json(entry["files"]["intervention"], "intervention file")  # --intervention-json FILE
            assert replayed == intervention.to_dict() == entry["intervention"]
            assert [m["concept_id"] for m in entry["files"]["masks"]] == [c.concept_id for c in
                                                                           intervention.edit_concepts(plan.graph)]
        assert run() == written  # a rerun writes the same files, byte for byte
