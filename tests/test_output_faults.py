"""Results that survive faults and a second process (``csg.output``): real ``csg-evaluate`` and
``csg-counterfactual`` processes, the tiny random SDXL, and small tmpfs mounts to fill up or make
read-only. Mounting needs root (or CAP_SYS_ADMIN); without it those tests skip and say so."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from csg.errors import OutputError
from csg.evaluation.results import ResultsWriter, load_results
from csg.output import write_text
from tests.evaluation_fixtures import evaluation_server
from tests.test_cli import FAST as CLI_FAST
from tests.test_cli import GRAPH, INTERVENTION, PORTRAIT, no_local_models, sdxl_folder  # noqa: F401 (fixtures)
from tests.test_evaluate import command, datasets, evaluate_process  # noqa: F401 (fixtures)
from tests.test_metrics import random_parts, weight_files  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
PAGE = 4096  # tmpfs hands out space in pages


@contextmanager
def tmpfs(folder: Path, size: str, *options: str):
    """A tmpfs of ``size`` mounted on ``folder`` (made if missing) for the block; skips the test where that
    cannot be done."""
    folder.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("needs Linux's mount for a small tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs",
                              str(folder)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"needs a small tmpfs, and mounting one failed ({mounted.stderr.strip()}); run as root "
                    "(as CI does) or in a container with CAP_SYS_ADMIN")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def fill(disk: Path, leave: int = 0) -> None:
    """Fill the tmpfs ``disk`` until ``leave`` bytes are free."""
    stats = os.statvfs(disk)
    with open(disk / "filler", "wb") as handle:
        handle.write(bytes(stats.f_bavail * stats.f_frsize - leave))
    stats = os.statvfs(disk)
    assert stats.f_bavail * stats.f_frsize == leave


def leftovers(folder: Path) -> list[str]:
    """Temporary files of interrupted writes (``csg.output`` names them ``.NAME.<random>.tmp``)."""
    return sorted(p.name for p in folder.rglob("*.tmp"))


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def counterfactual_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "csg.cli", str(PORTRAIT), "--graph-json", str(GRAPH),
                             "--intervention-json", str(INTERVENTION), *CLI_FAST, *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# -- one writer per folder ---------------------------------------------------------------------------

def test_a_second_evaluation_is_refused_naming_the_first_and_a_killed_one_leaves_no_lock(
        datasets, sdxl_folder, weight_files, tmp_path):  # noqa: F811 (fixtures)
    out = tmp_path / "eval"
    lock = out / ".csg-evaluate.lock"
    with evaluation_server(delay=120) as stalled, evaluation_server() as server:
        first = evaluate_process(command(datasets[:1], out, stalled, sdxl_folder, weight_files, "--methods", "csg",
                                         "--per-dataset", "1"))
        deadline = time.monotonic() + 120
        while not (lock.is_file() and f'"pid": {first.pid},' in lock.read_text()):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never took the folder"
            time.sleep(0.05)
        # the same items, another VLM server (the settings do not name it): without the lock both would do them
        args = command(datasets[:1], out, server, sdxl_folder, weight_files, "--methods", "csg", "--per-dataset", "1")
        code, err = finish(evaluate_process(args))
        assert code == 2, err
        assert f"is in use by csg-evaluate (pid {first.pid} on host " in err and "Traceback" not in err
        assert "running since" in err and "Wait until it ends, or choose another folder" in err
        assert not server.requests and not list(out.glob("results.*.jsonl"))  # refused before any work
        first.send_signal(signal.SIGKILL)
        first.wait()
        code, err = finish(evaluate_process(args))  # a killed holder holds nothing
    assert code == 0, err
    [record] = load_results(out).records
    assert record["rank"] == 0 and "error" not in record
    assert (out / "report.html").is_file() and not leftovers(out)


# -- --out that cannot be written --------------------------------------------------------------------

def test_an_out_that_is_a_file_lies_under_one_or_is_read_only_exits_2_for_both_clis(
        datasets, sdxl_folder, weight_files, tmp_path):  # noqa: F811 (fixtures)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    with tmpfs(tmp_path / "read-only", "1m", "ro") as read_only:
        cases = {"a file": (a_file, "is a file, not a folder"), "under a file": (a_file / "eval", "is a file"),
                 "read-only": (read_only / "eval", "is not writable"),
                 "read-only itself": (read_only, "is not writable")}
        with evaluation_server() as server:
            runs = {(name, cli): process for name, (out, _) in cases.items() for cli, process in (
                ("csg-evaluate", evaluate_process(command(datasets[:1], out, server, sdxl_folder, weight_files))),
                ("csg-counterfactual", counterfactual_process("--sdxl", str(sdxl_folder), "--out", str(out))))}
            results = {key: finish(process) for key, process in runs.items()}
            assert not server.requests
    for (name, cli), (code, err) in results.items():
        out, message = cases[name]
        assert code == 2, (name, cli, err)
        assert err.startswith(f"{cli}: --out {out}") and message in err and "Traceback" not in err, (name, cli, err)
    assert a_file.read_text() == "not a folder"


# -- a full disk ---------------------------------------------------------------------------------------

def test_a_write_on_a_full_disk_keeps_the_old_file_whole(tmp_path):
    with tmpfs(tmp_path / "disk", "256k") as disk:
        report = write_text(disk / "report.html", "<p>the old report</p>")
        fill(disk)
        with pytest.raises(OutputError, match=r"report\.html \(No space left on device\)\. Free some space"):
            write_text(report, "<p>a new report</p>" * 10_000)
        assert report.read_text() == "<p>the old report</p>" and not leftovers(disk)
        with ResultsWriter(disk / "results.0.jsonl") as writer, pytest.raises(OutputError, match="results.0.jsonl"):
            writer.append({"item_id": "a", "caption": "x" * 10_000})
        assert load_results(disk).records == []  # at most a torn line, which the next run redoes


def test_a_full_disk_while_the_report_is_written_leaves_the_report_whole(
        datasets, sdxl_folder, weight_files, tmp_path):  # noqa: F811 (fixtures)
    with tmpfs(tmp_path / "disk", "8m") as disk, evaluation_server() as server:
        out = disk / "eval"
        args = command(datasets[:1], out, server, sdxl_folder, weight_files, "--methods", "csg", "--per-dataset", "1")
        code, err = finish(evaluate_process(args))
        assert code == 0, err
        report = (out / "report.html").read_bytes()
        fill(disk, leave=PAGE)  # room for the small tables, not for the report with its images
        code, err = finish(evaluate_process(args))  # nothing left to do but the report
        assert code == 2, err
        assert f"Could not write {out / 'report.html'} (No space left on device)" in err and "Traceback" not in err
        assert f"The results are saved: rerun the same command, or python -m csg.report {out}" in err
        # checked while the tmpfs is mounted: once unmounted, out is the empty folder under it
        # whole or not at all: the earlier report, never a cut one, and no temporary file left
        assert (out / "report.html").read_bytes() == report and not leftovers(out)
        assert len(load_results(out).records) == 1
        (disk / "filler").unlink()  # space again: the report the error names is written
        written = subprocess.run([sys.executable, "-m", "csg.report", str(out)], cwd=ROOT, capture_output=True,
                                 text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert written.returncode == 0, written.stderr
        assert (out / "report.html").read_bytes() == report and not leftovers(out)


def test_csg_counterfactual_on_a_full_disk_exits_2_and_keeps_what_it_wrote(sdxl_folder, tmp_path):  # noqa: F811
    with tmpfs(tmp_path / "full", "256k") as full, tmpfs(tmp_path / "disk", "256k") as disk:
        fill(full)
        # room for graph.json and intervention.json (under a page each), written before SDXL loads; none for images
        fill(disk, leave=2 * PAGE)
        runs = {folder: counterfactual_process("--sdxl", str(sdxl_folder), "--out", str(folder / "out"))
                for folder in (full, disk)}
        (code, err), (late_code, late_err) = (finish(p) for p in runs.values())
        assert code == 2, err
        assert f"Could not write {full / 'out' / 'graph.json'} (No space left on device)" in err
        assert "Traceback" not in err and not leftovers(full)
        assert late_code == 2, late_err
        out = disk / "out"
        assert f"Could not write {out / 'original.png'} (No space left on device)" in late_err
        replay = f"--graph-json {out / 'graph.json'} --intervention-json {out / 'intervention.json'}"
        assert f"rerun with {replay}" in late_err
        assert "Traceback" not in late_err and not leftovers(disk)
        assert json.loads((out / "graph.json").read_text())["concepts"]
        assert json.loads((out / "intervention.json").read_text())["new_value"] == "old"
        (disk / "filler").unlink()  # space again: the plan it kept replays
        rerun = subprocess.run([sys.executable, "-m", "csg.cli", str(PORTRAIT), "--graph-json", str(out / "graph.json"),
                                "--intervention-json", str(out / "intervention.json"), *CLI_FAST, "--sdxl",
                                str(sdxl_folder), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        assert (out / "counterfactual.png").is_file()
