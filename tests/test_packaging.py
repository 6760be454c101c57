"""The installed package: names, console script, backend selection, the kernel benchmark."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longcot.kernels as K
from longcot.kernels import _backend

# The console script installed beside this interpreter (the venv may not be on PATH).
LONGCOT = str(Path(sys.executable).with_name("longcot"))


@pytest.mark.parametrize("name", ["kernels", "engine", "bench"])
def test_bare_top_level_names_are_not_importable(tmp_path, name):
    proc = subprocess.run(
        [sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr


def test_console_script_lists_subcommands():
    proc = subprocess.run([LONGCOT, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "bench" in proc.stdout


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LONGCOT_KERNELS", "fast")
    with pytest.raises(ValueError, match="LONGCOT_KERNELS: expected one of auto, reference, cpu, triton"):
        K.kl_penalty(torch.zeros(2), torch.zeros(2))


@pytest.mark.parametrize(
    "env, device, cpu, triton, expected",
    [
        ("auto", "cpu", True, False, "cpu"),
        ("auto", "cpu", False, False, "reference"),
        ("auto", "cuda", True, True, "triton"),
        ("auto", "cuda", True, False, "reference"),
        ("reference", "cpu", True, True, "reference"),
        ("cpu", "cuda", True, True, "cpu"),
        ("triton", "cpu", True, True, "triton"),
        ("triton", "cpu", True, False, "reference"),
    ],
)
def test_select(monkeypatch, env, device, cpu, triton, expected):
    monkeypatch.setenv("LONGCOT_KERNELS", env)
    assert _backend.select(torch.device(device), cpu=cpu, triton=triton) == expected


def test_bench_kernels_small_runs_and_writes_json(tmp_path):
    out = tmp_path / "k.json"
    proc = subprocess.run(
        [LONGCOT, "bench", "kernels", "--small", "--json", str(out)],
        capture_output=True, text=True, env={**os.environ, "LONGCOT_KERNELS": "auto"},
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    ops = {row["op"] for row in data["rows"]}
    assert {"repetition_mask", "discounted_returns", "gae"} <= ops
    assert all(row["baseline_s"] > 0 and row["longcot_s"] > 0 for row in data["rows"])
    assert "repetition_mask" in proc.stdout and "ratio" in proc.stdout
