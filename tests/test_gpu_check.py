"""The prepared GPU check (bench/gpu_check.py) in its CPU dry run: every part and variant runs at tiny shapes, so the
script cannot rot between GPU leases. Its numbers mean nothing on a CPU; what is checked is that each code path runs
and reports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_runs_every_part(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "report.json").read_text())
    parts = doc["parts"]
    assert list(parts) == ["env", "ops", "model", "gpu_tests", "attention", "nccl", "pairs", "train", "sample",
                           "profile"]  # fmt: skip
    assert parts["gpu_tests"] == dict(status="skipped", reason="needs CUDA (dry run)", seconds=0.0)
    for name, part in parts.items():
        if name != "gpu_tests":
            assert part["status"] == "ok", (name, part.get("error"))
    # Correctness parts compared the Triton ops (interpreter) and the model against float64, outputs and gradients.
    assert {r["op"] for r in parts["ops"]["data"]["rows"]} == {"attention", "layer_norm+residual", "bias_gelu"}
    assert {r["tensor"] for r in parts["model"]["data"]["rows"]} == {"loss", "gradients", "eval images"}
    # Every speed variant that needs no CUDA ran, with the official recipe as the base of the ratios.
    for kind in ("train", "sample"):
        rows = parts[kind]["data"]["rows"]
        assert [r["status"] for r in rows] == ["ok"] * 4
        assert rows[0]["variant"].startswith("official") and rows[0]["speedup"] == 1.0
        assert any("compiled" in r["variant"] for r in rows)
    assert [r["status"] for r in parts["pairs"]["data"]["rows"]] == ["ok"] * 5
    assert parts["nccl"]["data"]["backend"] == "gloo" and all(parts["nccl"]["data"]["outputs"].values())
    report = (tmp_path / "report.md").read_text()
    assert "| part | status | result | goals |" in report and "## train:" in report
    assert proc.stdout.rstrip().splitlines()[-1].startswith("report: ")


def test_unknown_part_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path),
                           "--parts", "env,speed"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "unknown part(s) ['speed']" in proc.stderr
