"""``csg-evaluate`` end to end on the CPU: three datasets in their real layouts, the tiny random
SDXL, random-weight LPIPS files and a 127.0.0.1 OpenAI-compatible VLM as extractor, manipulator
and judge; the results file, the table and the HTML report."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from csg.errors import InputError
from csg.evaluate import main
from csg.evaluation.datasets import DatasetSpec, load_items, sample_items, select
from csg.evaluation.results import load_results
from tests.evaluation_fixtures import (
    EXAMPLES,
    evaluation_server,
    write_celebahq_dataset,
    write_coco_dataset,
    write_folder_dataset,
)
from tests.test_cli import no_local_models, sdxl_folder  # noqa: F401 (fixtures)
from tests.test_metrics import random_parts, weight_files  # noqa: F401 (fixtures)
from tests.test_vlm_stages import load_scene, stage_of

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "4", "--warmup", "1", "--max-side", "64", "--device", "cpu", "--dtype", "float32",
        "--vlm-concurrency", "3"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return [f"faces=celebahq:{write_celebahq_dataset(root / 'celeba')}",
            f"coco=coco:{write_coco_dataset(root / 'coco')}",
            f"mine=folder:{write_folder_dataset(root / 'mine')}"]


def command(datasets, out, server, sdxl, weights, *extra):
    return [*(a for d in datasets for a in ("--dataset", d)), "--out", str(out), "--vlm-url", server.base_url,
            "--vlm-name", "test-vlm", "--api-key-env", "EVAL_TEST_KEY", "--sdxl", str(sdxl),
            "--lpips-vgg", str(weights[0]), "--lpips-heads", str(weights[1]), *FAST, *extra]


def write_plans(folder: Path) -> Path:
    """Hand-written plans for a CelebA-HQ item (graph and interventions) and a COCO item (the graph only,
    the one whose concept ids the test server's proposals use, so the VLM proposes over it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("portrait_graph.json", "portrait_intervention.json"):
        (folder / name).write_bytes((EXAMPLES / name).read_bytes())
    (folder / "scene_graph.json").write_text(json.dumps(load_scene("portrait")["extraction"]))
    path = folder / "plans.json"
    path.write_text(json.dumps({"faces/1": {"graph": "portrait_graph.json",
                                            "interventions": "portrait_intervention.json"},
                                "coco/102": {"graph": "scene_graph.json"}}))
    return path


@pytest.mark.slow
def test_three_layouts_end_to_end(datasets, sdxl_folder, weight_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EVAL_TEST_KEY", "sk-secret-never-written")
    out = tmp_path / "eval"
    plans = ["--plans", str(write_plans(tmp_path / "plans"))]
    with evaluation_server() as server:
        code = main(command(datasets, out, server, sdxl_folder, weight_files, *plans))
        requests = list(server.requests)
    err = capsys.readouterr().err
    assert code == 0, err
    assert all(r.headers.get("Authorization") == "Bearer sk-secret-never-written" for r in requests)
    loaded = load_results(out)
    assert loaded.torn == []
    ids = sorted(r["item_id"] for r in loaded.records)
    assert ids == ["coco/100", "coco/101", "coco/102", "faces/0", "faces/1", "faces/2",
                   "mine/img0", "mine/img1", "mine/img2"]
    by_id = {r["item_id"]: r for r in loaded.records}
    assert by_id["coco/101"]["caption"] == "a photo of a scene 1"  # the lowest annotation id, stripped
    assert by_id["faces/2"]["caption"] == "This woman has smile number 2."
    hand = by_id["mine/img0"]  # hand-written graph and intervention: one intervention, no VLM plan
    assert [i["id"] for i in hand["interventions"]] == ["i1"] and hand["graph"]["concepts"][0]["name"] == "age"
    # --plans, for the other layouts: faces/1 as mine/img0; coco/102 gets its graph and the VLM's proposals
    assert by_id["faces/1"]["interventions"] == hand["interventions"] and by_id["faces/1"]["graph"] == hand["graph"]
    scene = load_scene("portrait")["extraction"]
    assert [c["name"] for c in by_id["coco/102"]["graph"]["concepts"]] == [c["name"] for c in scene["concepts"]]
    assert len(by_id["coco/102"]["interventions"]) == 3
    stages = [stage_of(r) for r in requests]
    assert stages.count("extraction") == 9 - 3 and stages.count("proposals") == 9 - 2
    for record in loaded.records:
        assert set(record["methods"]) == {"csg", "ddpm", "ddim"}
        assert record["settings"]["versions"]["torch"] and record["settings"]["params"]["num_steps"] == 4
        assert record["settings"]["models"]["vlm"] == "test-vlm"
        for entries in record["methods"].values():
            assert len(entries) == len(record["interventions"])
            for entry in entries:
                assert 0 <= entry["vlm_effectiveness"] <= 1 and entry["lpips"] > 0, entry
                assert (out / entry["image"]).is_file()
                assert entry["masked_lpips"] is not None and entry["masked_lpips"] >= 0
                assert entry["judgement"]["concept_checks"]
    # The judge says "no" to values with a "y", so for the hand-written item: old woman yes, gray hair no,
    # wrinkled skin yes; and the three non-descendants (expression, outfit, background) kept their values.
    csg_entry = hand["methods"]["csg"][0]
    assert csg_entry["vlm_effectiveness"] == pytest.approx(2 / 3)
    assert csg_entry["causal_consistency"] == 0.5
    assert len(csg_entry["preservation_judgement"]["concept_checks"]) == 3 and csg_entry["preservation"] == 1.0
    # Table 1: per dataset and average, per method, with CIs and n; the report embeds every image.
    table = (out / "table.md").read_text()
    for text in ("CSG (Ours)", "DDPM Inversion", "DDIM Inversion", "faces VLM-Eff.", "Average LPIPS", "(n=9)"):
        assert text in table, text
    rows = list(csv.DictReader((out / "table.csv").open()))
    average = {(r["method"], r["metric"]): r for r in rows if r["dataset"] == "Average"}
    assert float(average[("CSG (Ours)", "lpips")]["ci_low"]) <= float(average[("CSG (Ours)", "lpips")]["mean"])
    assert float(average[("CSG (Ours)", "lpips")]["mean"]) <= float(average[("CSG (Ours)", "lpips")]["ci_high"])
    report = (out / "report.html").read_text()
    # per intervention, side by side: original, three counterfactuals, the edited region, the graph
    assert report.count("data:image/png;base64,") == sum(len(r["interventions"]) * 6 for r in loaded.records)
    assert "http" not in report.replace("http-equiv", "")
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".jsonl", ".md", ".csv", ".html"):
            assert "sk-secret" not in path.read_text()
    assert "sk-secret" not in err
    assert "ETA" in err, err
    # A rerun with the same settings does nothing; one with other settings is refused, naming the change.
    with evaluation_server() as server:
        assert main(command(datasets, out, server, sdxl_folder, weight_files, *plans)) == 0
        assert server.requests == []
        assert main(command(datasets, out, server, sdxl_folder, weight_files, *plans, "--scale", "5")) == 2
        err = capsys.readouterr().err
        assert "params.scale (8.0 -> 5.0)" in err and "--allow-mixed-settings" in err
        # An edited hand-written plan is not skipped as done: the rerun stops and names the item.
        graph_file = tmp_path / "plans" / "portrait_graph.json"
        graph_file.write_text(graph_file.read_text().replace('How old', 'How old, roughly,'))
        assert main(command(datasets, out, server, sdxl_folder, weight_files, *plans)) == 2
        assert server.requests == []
    err = capsys.readouterr().err
    assert "1 finished item(s)" in err and "now have another caption or hand-written graph" in err
    assert "faces/1." in err and "Use another --out folder, or delete their lines" in err


def test_layouts_and_seeded_sampling(tmp_path):
    csv_path = write_folder_dataset(tmp_path / "csv", n=5, fmt="csv")
    items = load_items(DatasetSpec.parse(f"c=folder:{csv_path}"))
    assert [i.id for i in items] == [f"c/img{k}" for k in range(5)]
    assert items[0].graph == csv_path.parent / "graph.json" and items[1].graph is None
    first = sample_items(items, 3, seed=7)
    assert first == sample_items(list(reversed(items)), 3, seed=7)  # the same draw whatever the order read
    assert len(set(first)) == 3 and sample_items(items, 3, seed=8) != first
    assert sample_items(items, 10, seed=7) == items


@pytest.mark.parametrize("text, fragment", [
    ("nokind", "NAME=KIND:PATH"), ("x=imagenet:/a", "unknown kind"), ("a/b=coco:/a", "may hold letters"),
    ("a|b=coco:/a", "may hold letters"), ("a\nb=coco:/a", "may hold letters"),  # they would break table.md
    ("x" * 61 + "=coco:/a", "at most 60"),
])
def test_bad_dataset_options_say_how_to_write_them(text, fragment):
    with pytest.raises(Exception, match=fragment):
        DatasetSpec.parse(text)


def test_plans_name_real_items_and_do_not_clash_with_the_captions_file(tmp_path):
    folder = f"mine=folder:{write_folder_dataset(tmp_path / 'mine', n=2)}"
    coco = f"coco=coco:{write_coco_dataset(tmp_path / 'coco', n=2)}"
    plans = write_plans(tmp_path / "plans")
    with pytest.raises(InputError, match=r"names items no --dataset has: coco/102, faces/1\. Item ids are NAME/"):
        select([DatasetSpec.parse(coco)], None, 0, plans)
    plans.write_text(json.dumps({"mine/img0": {"graph": "portrait_graph.json"}}))
    with pytest.raises(InputError, match="mine/img0 have hand-written files both in their captions file and in"):
        select([DatasetSpec.parse(folder)], None, 0, plans)
    (tmp_path / "plans" / "plans.csv").write_text("item,graph,interventions\ncoco/101,portrait_graph.json,\n")
    [first, second] = select([DatasetSpec.parse(coco)], None, 0, tmp_path / "plans" / "plans.csv")
    assert first.graph is None and second.graph == tmp_path / "plans" / "portrait_graph.json"
    assert second.interventions is None
    plans.write_text(json.dumps({"coco/101": {"graph": "missing.json"}}))
    with pytest.raises(InputError, match="item coco/101: The graph file .*missing.json does not exist"):
        select([DatasetSpec.parse(coco)], None, 0, plans)


def test_interventions_without_their_graph_are_refused_when_the_dataset_loads(tmp_path):
    path = write_folder_dataset(tmp_path, n=2)
    records = json.loads(path.read_text())
    records[0]["graph"] = ""
    path.write_text(json.dumps(records))
    with pytest.raises(Exception, match="record 1: hand-written interventions need the graph"):
        load_items(DatasetSpec.parse(f"d=folder:{path}"))


def test_missing_image_names_the_file_and_the_fix(tmp_path):
    path = write_folder_dataset(tmp_path, n=2, hand_written=False)
    (tmp_path / "img1.png").unlink()
    with pytest.raises(Exception, match=r"img1.png does not exist.*@IMAGES"):
        load_items(DatasetSpec.parse(f"d=folder:{path}"))


# -- crashes and reruns ------------------------------------------------------------------------------

def evaluate_process(args, env_key="sk-secret-never-written", launcher=(), **env_extra):
    env = {**os.environ, "EVAL_TEST_KEY": env_key, "PYTHONPATH": str(ROOT), **env_extra}
    return subprocess.Popen([*launcher,
                             *(["-m", "csg.evaluate"] if launcher else [sys.executable, "-m", "csg.evaluate"]),
                             *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished_ids(out):
    return sorted(r["item_id"] for r in load_results(out).records if "error" not in r)


@pytest.mark.slow
def test_sigkill_after_the_first_item_loses_nothing_finished(datasets, sdxl_folder, weight_files, tmp_path):
    out = tmp_path / "eval"
    with evaluation_server() as server:
        args = command(datasets[:2], out, server, sdxl_folder, weight_files, "--methods", "csg,ddpm")
        process = evaluate_process(args)
        results = out / "results.0.jsonl"
        deadline = time.monotonic() + 240
        while not (results.exists() and results.read_bytes().count(b"\n") >= 1):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no item finished in time"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        before = finished_ids(out)
        assert 1 <= len(before) < 6
        # A torn last line, as a kill in the middle of a write would leave one, is reported and redone.
        with results.open("ab") as handle:
            handle.write(b'{"item_id": "coco/999", "dataset": "co')
        process = evaluate_process(args)
        _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "unreadable lines in the results" in err and "results.0.jsonl:" in err
    assert f"{len(before)} already done" in err
    ids = [r["item_id"] for r in load_results(out).records]
    assert sorted(ids) == sorted(set(ids)) == ["coco/100", "coco/101", "coco/102", "faces/0", "faces/1", "faces/2"]
    assert load_results(out).torn == ["results.0.jsonl:2"]  # the torn text stays on a line of its own


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
MPI_AS_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}  # CI runs as root


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None,
                    reason="accelerate's --cpu launcher starts several processes through MPI: "
                           "apt-get install openmpi-bin")
def test_accelerate_shards_items_and_a_rerun_with_more_processes_does_nothing(datasets, sdxl_folder, weight_files,
                                                                              tmp_path):
    out = tmp_path / "eval"
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=4\n")
    # accelerate's own CPU launch (MPI underneath, one gloo group), then a rerun with 3 processes through its
    # torchrun launcher (the one --multi_gpu uses on GPUs), which finds nothing left to do.
    cpu = [*ACCELERATE, "--cpu", "--num_processes", "2", "--mpirun_hostfile", str(hosts)]
    torchrun = [*ACCELERATE, "--multi_gpu", "--num_processes", "3"]
    with evaluation_server() as server:
        args = command(datasets, out, server, sdxl_folder, weight_files, "--methods", "csg", "--per-dataset", "2")
        process = evaluate_process(args, launcher=cpu, **MPI_AS_ROOT)
        _, err = process.communicate(timeout=400)
        assert process.returncode == 0, err
        records = load_results(out).records
        assert {r["rank"] for r in records} == {0, 1}
        assert err.count("for this process (1 of 2)") == 1 and err.count("for this process (2 of 2)") == 1
        assert sorted(p.name for p in out.glob("results.*.jsonl")) == ["results.0.jsonl", "results.1.jsonl"]
        ids = [r["item_id"] for r in records]
        assert len(ids) == len(set(ids)) == 6
        assert (out / "report.html").is_file() and all(i in (out / "report.html").read_text() for i in ids)
        planned = len(server.requests)
        process = evaluate_process(args, launcher=torchrun)
        _, err = process.communicate(timeout=400)
        assert process.returncode == 0, err
        assert len(server.requests) == planned  # no new work
    assert err.count("6 already done, 0 for this process") == 3
    assert [r["item_id"] for r in load_results(out).records] == ids


@pytest.mark.parametrize("cpu_flag", [["--cpu"], []], ids=["cpu-without-mpi", "no-multi-gpu"])
def test_a_launch_that_started_one_of_several_processes_is_refused(datasets, tmp_path, cpu_flag):
    """Without MPI, accelerate's --cpu launcher starts one process however many were asked for; so does its
    plain launcher without --multi_gpu (here: no GPU)."""
    args = ["--dataset", datasets[0], "--out", str(tmp_path / "eval"), "--vlm-url", "http://127.0.0.1:9"]
    process = evaluate_process(args, launcher=[*ACCELERATE, *cpu_flag, "--num_processes", "2"])
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0, err  # csg-evaluate exits 2, accelerate's launcher then 1
    assert "csg-evaluate: accelerate launch was asked for several processes but started one" in err
    assert "--mpirun_hostfile" in err and "--multi_gpu" in err
    assert not (tmp_path / "eval").exists()


# -- the single-image CLI: --metrics and step progress -------------------------------------------------

@pytest.mark.parametrize("method", ["csg", "ddpm"])
def test_cli_metrics_and_step_progress(method, sdxl_folder, weight_files, tmp_path, capsys):
    from csg.cli import main as cli_main

    out = tmp_path / "out"
    with evaluation_server() as server:
        code = cli_main([str(EXAMPLES / "portrait.png"), "--graph-json", str(EXAMPLES / "portrait_graph.json"),
                         "--intervention-json", str(EXAMPLES / "portrait_intervention.json"),
                         "--sdxl", str(sdxl_folder),
                         "--out", str(out), "--method", method, "--metrics", "--lpips-vgg", str(weight_files[0]),
                         "--lpips-heads", str(weight_files[1]), "--vlm-url", server.base_url, "--vlm-name", "judge",
                         "--steps", "6", "--warmup", "2", "--max-side", "64", "--device", "cpu", "--dtype", "float32"])
        requests = list(server.requests)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert requests and all("<checklist>" in r.text() for r in requests)  # a hand-written plan: only the judge asks
    edit = "edit" if method == "csg" else "sampling 1/1"
    for phase in ("inversion", edit):
        assert f"{phase}: step 6/6" in captured.err and f"{phase}: step 3/6" in captured.err
    assert "ETA" in captured.err
    [entry] = json.loads((out / "report.json").read_text())["interventions"]
    scores = entry["metrics"]
    assert scores["vlm_effectiveness"] == pytest.approx(2 / 3) and scores["causal_consistency"] == 0.5
    assert scores["preservation"] == 1.0 and scores["lpips"] > 0
    assert (scores["masked_lpips"] is not None) == (method == "csg")
    assert "i1: vlm_effectiveness 0.667" in captured.out
