"""The GPU run's script (benchmarks/gpu/run.sh), dry-run on the CPU with --size tiny, so that it cannot rot while
no GPU is lent: both calls run their real benchmarks, and the summary has every target with a verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("speed-up over diffusers LEDITS++", "over its bare-UNet floor", "peak memory", "batched / three separate",
           "host syncs", "ComfyUI node / SamplerCustomAdvanced")


def test_both_calls_dry_run_on_the_cpu_and_summarise_every_target(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)  # COMFYUI_PATH is set, or conftest skips this test
    for call in ("1", "2"):
        done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--call", call, "--out", str(tmp_path),
                               "--size", "tiny"], env=env, capture_output=True, text=True, timeout=480)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "targets (from every call's results" in done.stdout
    for step in ("call1-memory-model", "call1-diffusers", "call2-compiled", "call2-comfyui"):
        assert (tmp_path / f"{step}.log").stat().st_size > 0
        assert json.loads((tmp_path / f"{step}.json").read_text())
    targets = json.loads((tmp_path / "summary.json").read_text())["targets"]
    for name in TARGETS:
        assert any(name in row["target"] for row in targets), name
    for row in targets:  # every row runs, and a CPU run never claims a GPU verdict; only CUDA has a peak to read
        cuda_only = row["target"].startswith("peak memory")
        assert row["verdict"].startswith("NOT RUN (CUDA only)" if cuda_only else "dry run"), row
    assert "| target | value | limit | verdict | note |" in (tmp_path / "summary.md").read_text()


def test_call_2_without_comfyui_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/run.py"), "--call", "2", "--out", str(tmp_path),
                           "--size", "tiny", "--comfyui", str(tmp_path / "nowhere")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "prepare.sh" in done.stderr and "COMFYUI_PATH" in done.stderr
