"""``csg-counterfactual`` end to end on tiny random SDXL weights saved in diffusers format, weight
discovery on real folder layouts, the missing-weights message, and the benchmark's smoke mode."""

import json
import runpy
from pathlib import Path

import pytest
from PIL import Image

from csg.cli import SDXL_REPO, find_sdxl, find_vlm, main
from csg.errors import WeightsMissingError
from tests.test_vlm_stages import load_scene, scene_server

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
    for name in ("original.png", "counterfactual.png", "mask_c1.png", "mask_c2.png", "mask_c3.png"):
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
    assert not (out / "mask_c6.png").exists()
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
    assert f"huggingface-cli download {SDXL_REPO}" in err and "models/checkpoints" in err
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
    code = main([str(PORTRAIT), "--graph-json", str(GRAPH), "--intervention-json", str(path), "--sdxl", str(sdxl_folder),
                 "--out", str(tmp_path / "out"), *FAST])
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
