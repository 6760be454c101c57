"""bench/gpu_check.sh, the one call for a lent GPU, end to end in its CPU mode (GPU_CHECK_DEVICE=cpu:
Triton's interpreter, small sizes, a CPU training run), on a copy of the repository so that its
editable install and build never touch this checkout."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from longcot.bench import gpu_check

REPO = Path(__file__).resolve().parent.parent


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "LONGCOT_"))}
    env.update(OUT=str(tmp_path / "out"), GPU_CHECK_DEVICE="cpu", GPU_CHECK_PYTHON=sys.executable,
               GPU_CHECK_VENV=str(tmp_path / "venv"), GPU_CHECK_WORK=str(tmp_path / "work"),
               GPU_CHECK_VENDOR=str(tmp_path / "no-vendor"))
    env.update(extra)
    return env


@pytest.mark.slow
def test_cpu_mode_end_to_end(tmp_path):
    # What a GPU machine gets: the tracked files, no build outputs (no C++ extension), no .venv.
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "out", "build", "*.egg-info", "__pycache__", "*.so", ".pytest_cache",
        ".hypothesis", ".ruff_cache", ".benchmarks"))
    # The two benchmarks take minutes on 2 cores: here they only have to start (their JSONs'
    # merge is tested below); a stage that runs out of time is stopped and the next one runs.
    env = _env(tmp_path, GPU_CHECK_TIMEOUT_KERNELS="25", GPU_CHECK_TIMEOUT_COMPILE="15")
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=400)
    out = tmp_path / "out"
    record = json.loads((out / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in record["stages"]}
    assert list(stages) == list(gpu_check.STAGES), proc.stdout + proc.stderr
    for s in record["stages"]:
        assert {"command", "rc", "seconds", "status", "tail", "timed_out"} <= set(s), s
        assert Path(s["log"]).is_file() and Path(s["log"]).parent == out / "logs"
    assert record["mode"] == "cpu" and record["env"]["modules"]["torch"]
    assert stages["env"]["status"] == "ok"
    # No pybind11 at build time (CI) -> the repository through links, no C++ extension; with it,
    # the editable install. Either way longcot imports for the stages after it.
    setup = record["setup"]
    assert setup["install"] in ("editable", "links") and isinstance(setup["extension"], bool)
    assert stages["setup"]["steps"][-1]["rc"] == 0, stages["setup"]  # the probe: longcot imports
    assert stages["pytest"]["status"] == "ok", stages["pytest"]["tail"]
    counts = record["results"]["pytest"]["counts"]
    assert counts.get("skipped", 0) > 0 and not counts.get("failed")  # no CUDA: the gpu tests skip
    assert "bench kernels --device cuda --json" in stages["kernels"]["command"] and "--small" in stages["kernels"]["command"]
    assert stages["kernels"]["status"] in ("ok", "failed", "timeout")
    assert stages["train"]["status"] == "ok", stages["train"]["tail"]
    train = record["results"]["train"]
    assert [r["step"] for r in train["rl_rows"]] == [1, 2] and train["summary"]["steps"] == 2
    assert "model.device=cpu" in stages["train"]["command"] and (out / "train" / "metrics.jsonl").is_file()
    assert stages["compile"]["status"] == "timeout" and stages["compile"]["rc"] != 0
    assert "bench compile --json" in stages["compile"]["command"]
    assert "stage" in proc.stdout and "gpu_check.json" in proc.stdout  # the summary table
    assert proc.returncode == 1  # some stage did not pass


def test_results_merge_budget_and_timeouts(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("GPU_CHECK_WORK", str(tmp_path / "work"))
    check = gpu_check.Check(out, "cpu", 60, ["kernels", "compile"])
    # the benchmarks' JSONs are merged (compile rows compacted)
    (out / "kernels-cuda.json").write_text(json.dumps({"suite": "kernels", "rows": [{"op": "gae"}]}))
    (out / "compile.json").write_text(json.dumps({"suite": "compile", "variants": 1, "failures": [],
                                                  "rows": [{"kernel": "_gae_kernel", "target": "sm_90", "regs": 30,
                                                            "spills": 0, "shared": 0, "uses": ["..."]}]}))
    monkeypatch.setattr(check, "run", lambda name, argv, timeout, env=None: {
        "command": " ".join(argv), "rc": 0, "seconds": 0.1, "timed_out": False, "tail": ""})
    assert check.main() == 0
    record = json.loads((out / "gpu_check.json").read_text())
    assert record["results"]["kernels"]["rows"] == [{"op": "gae"}]
    assert record["results"]["compile"]["rows"] == [{"kernel": "_gae_kernel", "target": "sm_90", "regs": 30,
                                                    "spills": 0, "shared": 0}]
    assert [s["status"] for s in record["stages"]] == ["ok", "ok"]

    # a stage past its timeout is stopped (its process group), the next one still runs; once the
    # budget is spent, the rest are skipped
    check = gpu_check.Check(out, "cpu", 6, ["env", "env"])
    monkeypatch.setenv("GPU_CHECK_TIMEOUT_ENV", "1")
    monkeypatch.setattr(check, "stage_env", lambda: check.run(
        "sleep", [sys.executable, "-c", "import time; time.sleep(30)"], check.timeout("env")))
    assert check.main() == 1
    record = json.loads((out / "gpu_check.json").read_text())
    first, second = record["stages"]
    assert first["status"] == "timeout" and first["seconds"] < 15
    assert second["status"] in ("timeout", "skipped")


def test_pytest_counts(tmp_path):
    log = tmp_path / "log"
    log.write_text("tests/a.py::t PASSED\n=== 3 failed, 10 passed, 2 skipped, 900 deselected, 1 warning in 12.34s ===\n")
    assert gpu_check._pytest_counts(log) == {"failed": 3, "passed": 10, "skipped": 2, "deselected": 900, "warning": 1}
    log.write_text("nothing\n")
    assert gpu_check._pytest_counts(log) == {}
