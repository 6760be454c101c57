"""One call for a lent GPU: set up from what is installed, run every GPU check, write one JSON.

    bash bench/gpu_check.sh            # on the GPU machine, from the repository root
    GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh   # the same stages on a CPU (tests)

A GPU machine is lent briefly, without network and without vLLM, with torch and Triton installed.
This driver (standard library only: it runs before anything is installed) goes through the
stages below, each a subprocess in its own process group with its own timeout (cut to what is
left of the whole budget), continuing after one fails or hangs. After every stage it writes
``$OUT/gpu_check.json``: per stage the command, exit code, seconds, status and the tail of its
output, plus the merged results (pytest counts, the kernel-benchmark and compile JSONs, the
training run's summary). Full logs are in ``$OUT/logs/``.

Stages (``GPU_CHECK_STAGES``, a comma list, picks some: e.g. to rerun one on a warm machine):

- ``env``: what is installed (python, torch, CUDA, the GPU, Triton, the project's dependencies);
- ``setup``: a venv with ``--system-site-packages`` (plus a .pth naming the starting
  interpreter's site-packages, in case that is itself a venv) and ``pip install --no-deps
  --no-build-isolation --no-index -e .``, which builds the C++ extension from csrc/ (it needs
  pybind11 and setuptools >= 77 at build time). If that fails, the stages still run, with the
  repository put on ``PYTHONPATH`` through a ``longcot`` folder of links and without the C++
  extension; the JSON's ``setup`` says which and why. A venv that already imports this
  repository's ``longcot`` (a rerun) is reused;
- ``pytest``: ``pytest -m gpu`` on the test modules that have gpu tests (compiled Triton against
  the references on the GPU, a training step on CUDA);
- ``kernels``: ``longcot bench kernels --device cuda`` (the GPU speed and memory rows);
- ``train``: a 2-step ``longcot train`` on the device with HF rollouts (no SFT);
- ``compile``: ``longcot bench compile`` (every launch variant for sm_80/89/90 with the
  installed Triton).

``GPU_CHECK_DEVICE=cpu`` runs the same stages on a CPU: Triton's interpreter
(``TRITON_INTERPRET=1``), ``--small`` benchmarks, a CPU training run with small sizes.

Environment: ``OUT`` (results; default bench/out/gpu_check), ``GPU_CHECK_DEVICE`` (cuda | cpu),
``GPU_CHECK_BUDGET`` (seconds for everything, default 450), ``GPU_CHECK_TIMEOUT_<STAGE>``
(seconds for one stage), ``GPU_CHECK_STAGES``, ``GPU_CHECK_VENV`` (default
$TMPDIR/longcot-gpu-check-venv), ``GPU_CHECK_TRAIN_ARGS`` (more ``key=value`` overrides for the
training run), ``GPU_CHECK_VENDOR`` (default bench/out/gpu-vendor when it exists: pure-Python
packages made by ``python bench/gpu_check.py vendor DIR``: its ``site/`` goes last on the venv's
path, for what the machine lacks (pytest, hypothesis), and its ``build/`` first during the
install (pybind11, setuptools: without pybind11 the C++ extension cannot be built)).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("env", "setup", "pytest", "kernels", "train", "compile")
# Seconds per stage, each also cut to what is left of BUDGET (the whole run inside 8 minutes on
# an H100/H200, with room to spare). Guesses for a GPU machine, not yet measured on one: env ~10,
# setup ~40 (the C++ build), pytest 60-120 (Triton compiles each kernel on first use), kernels
# 60-90, train 30-40, compile 60-90. Measured here in CPU mode (2 cores, interpreter, --small):
# env 11, setup 25, pytest 19, kernels 78, train 41, compile 146.
TIMEOUTS = {"env": 60, "setup": 150, "pytest": 150, "kernels": 120, "train": 120, "compile": 120}
BUDGET = 450
TAIL_LINES = 40
REPO = Path(__file__).resolve().parent.parent

# What the stages import, for the env stage's report (module name -> what it is for).
MODULES = {
    "torch": "everything", "triton": "GPU kernels", "transformers": "models", "tokenizers": "models",
    "safetensors": "checkpoints", "numpy": "C++ kernels' buffers", "yaml": "config", "tqdm": "progress",
    "math_verify": "verifier", "pyarrow": "Parquet data", "matplotlib": "plots", "pytest": "pytest stage",
    "hypothesis": "tests' conftest", "pybind11": "building the C++ extension",
    "setuptools": "building the C++ extension", "pip": "the editable install", "vllm": "vLLM rollouts",
}

_PROBE = r"""
import importlib, json, os, platform, subprocess, sys
mods = json.loads(sys.argv[1])
info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
        "cpus": os.cpu_count(), "modules": {}}
for name in mods:
    try:
        m = importlib.import_module(name)
        info["modules"][name] = str(getattr(m, "__version__", "installed"))
    except Exception as exc:
        info["modules"][name] = None
        info.setdefault("missing", {})[name] = f"{type(exc).__name__}: {exc}"[:200]
try:
    import torch
    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["capability"] = list(torch.cuda.get_device_capability())
except Exception as exc:
    info["cuda_error"] = str(exc)[:200]
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                        timeout=20).stdout.strip()
except Exception as exc:
    info["nvidia_smi"] = f"unavailable: {type(exc).__name__}"
print("GPU_CHECK_ENV " + json.dumps(info))
"""


class Check:
    def __init__(self, out: Path, mode: str, budget: float, stages: list[str]) -> None:
        self.out, self.mode, self.stages = out, mode, stages
        self.start = time.monotonic()
        self.deadline = self.start + budget
        self.budget = budget
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work = Path(os.environ.get("GPU_CHECK_WORK") or tempfile.mkdtemp(prefix="longcot-gpu-check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        default_venv = Path(tempfile.gettempdir()) / "longcot-gpu-check-venv"
        self.venv = Path(os.environ.get("GPU_CHECK_VENV") or default_venv)
        vendor = os.environ.get("GPU_CHECK_VENDOR") or str(REPO / "bench" / "out" / "gpu-vendor")
        self.vendor = Path(vendor) if Path(vendor).is_dir() else None
        self.python = sys.executable  # replaced by the venv's once set up
        self.pythonpath: list[str] = []  # the links folder when the editable install failed
        self.record: dict = {
            "suite": "gpu_check",
            "mode": mode,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "repo": str(REPO),
            "out": str(out),
            "budget_s": budget,
            "stages": [],
            "results": {},
        }

    # -- running one command ------------------------------------------------------------------

    def env(self, **extra: str | None) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("LONGCOT_KERNELS", None)
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        env.setdefault("HF_HUB_OFFLINE", "1")  # no network there: fail fast instead of retrying
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env["PYTHONUNBUFFERED"] = "1"
        if self.mode == "cpu":
            env["TRITON_INTERPRET"] = "1"
        else:
            env.pop("TRITON_INTERPRET", None)
        paths = self.pythonpath + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
        for key, value in extra.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def run(self, name: str, argv: list[str], timeout: float, env: dict[str, str] | None = None,
            cwd: Path = REPO) -> dict:
        """Run ``argv`` in its own process group, output to logs/<name>.log; kill the group after
        ``timeout`` seconds."""
        log = self.logs / f"{name}.log"
        started = time.monotonic()
        timed_out = False
        with open(log, "w") as fh:
            fh.write("$ " + " ".join(argv) + "\n")
            fh.flush()
            try:
                proc = subprocess.Popen(argv, cwd=cwd, env=env or self.env(), stdout=fh, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as exc:
                fh.write(f"could not start: {exc}\n")
                return {"command": " ".join(argv), "rc": None, "seconds": 0.0, "timed_out": False,
                        "tail": f"could not start: {exc}", "log": str(log)}
            try:
                rc = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                rc = proc.returncode
        return {"command": " ".join(argv), "rc": rc, "seconds": round(time.monotonic() - started, 1),
                "timed_out": timed_out, "tail": _tail(log), "log": str(log)}

    def timeout(self, stage: str) -> float:
        own = float(os.environ.get(f"GPU_CHECK_TIMEOUT_{stage.upper()}", TIMEOUTS[stage]))
        return min(own, self.deadline - time.monotonic())

    def longcot(self, *args: str) -> list[str]:
        return [self.python, "-m", "longcot.engine.cli", *args]

    # -- the stages ---------------------------------------------------------------------------

    def stage_env(self) -> dict:
        res = self.run("env", [self.python, "-c", _PROBE, json.dumps(list(MODULES))], self.timeout("env"))
        info = _marked_json(Path(res["log"]), "GPU_CHECK_ENV ")
        if info is not None:
            self.record["env"] = info
            if self.mode == "cuda" and not info.get("cuda_available"):
                res["note"] = "CUDA is not available to torch: the GPU stages will fail or skip"
        return res

    def stage_setup(self) -> dict:
        setup: dict = {"venv": str(self.venv), "install": None, "extension": False}
        self.record["setup"] = setup
        vpy = self.venv / "bin" / "python"
        steps = []
        if vpy.exists() and self._imports_this_repo(vpy):
            setup["install"] = "reused"
        else:
            if not vpy.exists():
                steps.append(self.run("setup-venv", [sys.executable, "-m", "venv", "--system-site-packages",
                                                     "--without-pip", str(self.venv)], self.timeout("setup")))
            if vpy.exists():
                self._link_site_packages(vpy)
                pip = self.run("setup-pip", [str(vpy), "-m", "pip", "--version"], self.timeout("setup"))
                if pip["rc"] != 0:
                    steps.append(pip)
                    steps.append(self.run("setup-ensurepip", [str(vpy), "-m", "ensurepip", "--default-pip"],
                                          self.timeout("setup")))
                build_path = [str(self.vendor / "build")] if self.vendor and (self.vendor / "build").is_dir() else []
                env = self.env(PYTHONPATH=os.pathsep.join(build_path) or None)
                install = self.run("setup-install", [str(vpy), "-m", "pip", "install", "--no-deps",
                                                     "--no-build-isolation", "--no-index", "-e", str(REPO)],
                                   self.timeout("setup"), env=env)
                steps.append(install)
                if install["rc"] == 0:
                    setup["install"] = "editable"
            else:
                setup["venv"] = None
        if setup["install"] in ("editable", "reused"):
            self.python = str(vpy)
        else:
            if vpy.exists():
                self.python = str(vpy)
            self.pythonpath = [str(self._links())]
            setup["install"] = "links"
            setup["reason"] = ("the editable install failed (see its tail); the repository is on PYTHONPATH "
                               "through a longcot folder of links, without the C++ extension")
        probe = self.run("setup-probe", [self.python, "-c", "import longcot.engine.cli, longcot.kernels as K; "
                                         "print('GPU_CHECK_EXT', K.has_cpu_extension())"], self.timeout("setup"))
        steps.append(probe)
        setup["extension"] = "GPU_CHECK_EXT True" in Path(probe["log"]).read_text()
        setup["python"] = self.python
        setup["pythonpath"] = self.pythonpath
        # The stage's result: the last step that failed, else the probe (longcot imports).
        main = next((s for s in steps if s["rc"] != 0 and s is not probe), probe)
        if probe["rc"] != 0:
            main = probe
        return {**main, "seconds": round(sum(s["seconds"] for s in steps), 1),
                "steps": [{k: s[k] for k in ("command", "rc", "seconds", "timed_out")} | {"tail": s["tail"][-1500:]}
                          for s in steps],
                "ok": probe["rc"] == 0, "note": f"install: {setup['install']}, C++ extension: {setup['extension']}"}

    def _imports_this_repo(self, vpy: Path) -> bool:
        try:
            proc = subprocess.run([str(vpy), "-c", "import longcot.engine; print(longcot.engine.__file__)"],
                                  capture_output=True, text=True, timeout=60, env=self.env(PYTHONPATH=None))
        except (OSError, subprocess.TimeoutExpired):
            return False
        return proc.returncode == 0 and Path(proc.stdout.strip()).resolve().parent == (REPO / "engine").resolve()

    def _link_site_packages(self, vpy: Path) -> None:
        """A .pth in the venv naming the starting interpreter's site-packages (a venv's
        --system-site-packages sees only the base interpreter's) and the vendored packages."""
        proc = subprocess.run([str(vpy), "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, timeout=60)
        target = Path(proc.stdout.strip())
        paths = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).is_dir()]
        if self.vendor is not None and (self.vendor / "site").is_dir():
            paths.append(str(self.vendor / "site"))
        if proc.returncode == 0 and target.is_dir():
            (target / "_longcot_gpu_check.pth").write_text("".join(p + "\n" for p in paths))

    def _links(self) -> Path:
        root = self.work / "links"
        pkg = root / "longcot"
        pkg.mkdir(parents=True, exist_ok=True)
        for name in ("engine", "kernels", "bench"):
            link = pkg / name
            if not link.exists():
                link.symlink_to(REPO / name, target_is_directory=True)
        return root

    def stage_pytest(self) -> dict:
        xml = self.out / "pytest-gpu.xml"
        # Only the modules with gpu tests: the others cost collection time, and some import the C++
        # extension at the top (a collection error when the install fell back to links).
        files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                       if "mark.gpu" in p.read_text(errors="replace")) or ["tests"]
        res = self.run("pytest", [self.python, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider",
                                  "--continue-on-collection-errors", f"--junitxml={xml}", *files],
                       self.timeout("pytest"))
        counts = _pytest_counts(Path(res["log"]))
        failed = [line.split(" ", 1)[1].split(" - ")[0] for line in Path(res["log"]).read_text(errors="replace").splitlines()
                  if line.startswith(("FAILED ", "ERROR "))]
        self.record["results"]["pytest"] = {"counts": counts, "failed": failed[:50], "junit": str(xml)}
        res["note"] = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no summary line"
        return res

    def stage_kernels(self) -> dict:
        path = self.out / "kernels-cuda.json"
        args = ["bench", "kernels", "--device", "cuda", "--json", str(path)] + (["--small"] if self.mode == "cpu" else [])
        res = self.run("kernels", self.longcot(*args), self.timeout("kernels"))
        data = _load_json(path)
        self.record["results"]["kernels"] = data
        if isinstance(data, dict):
            rows = (data.get("rows") or []) + (data.get("memory_rows") or [])
            missed = [r.get("op") for r in rows if False in (r.get("met"), r.get("time_met"), r.get("mem_met"))]
            res["note"] = f"{len(rows)} rows" + (f", targets missed: {', '.join(missed)}" if missed else "")
        return res

    def stage_compile(self) -> dict:
        path = self.out / "compile.json"
        args = ["bench", "compile", "--json", str(path)] + (["--small"] if self.mode == "cpu" else [])
        res = self.run("compile", self.longcot(*args), self.timeout("compile"))
        data = _load_json(path)
        if isinstance(data, dict) and isinstance(data.get("rows"), list):
            keep = ("kernel", "variant", "target", "regs", "spills", "shared", "warps_per_sm", "error")
            data = {**data, "rows": [{k: r.get(k) for k in keep if k in r} for r in data["rows"]]}
            res["note"] = f"{data.get('variants')} variants, {len(data.get('failures') or [])} failures"
        self.record["results"]["compile"] = data
        return res

    def stage_train(self) -> dict:
        runs = self.work / "runs"
        shutil.rmtree(runs, ignore_errors=True)
        overrides = ["steps=2", "seed=0", "sft.enabled=false", "rollout.backend=hf", "logging.progress=false",
                     "logging.tensorboard=false", "logging.plots=false", "checkpoint.every=0", f"output_dir={runs}"]
        if self.mode == "cpu":
            overrides += ["model.device=cpu", "model.tiny.layers=1", "model.tiny.hidden=64", "model.tiny.heads=1",
                          "eval_size=4", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
                          "rollout.max_new_tokens=32", "algorithm.mini_batch_size=8"]
        else:
            overrides += ["model.device=cuda", "eval_size=64"]
        overrides += os.environ.get("GPU_CHECK_TRAIN_ARGS", "").split()
        res = self.run("train", self.longcot("train", *overrides), self.timeout("train"))
        result: dict = {"overrides": overrides}
        run_dirs = sorted(p for p in runs.glob("*") if p.is_dir()) if runs.is_dir() else []
        if run_dirs:
            run_dir = run_dirs[-1]
            dest = self.out / "train"
            dest.mkdir(exist_ok=True)
            for name in ("summary.json", "metrics.jsonl", "config.yaml"):
                if (run_dir / name).is_file():
                    shutil.copy2(run_dir / name, dest / name)
            result["summary"] = _load_json(run_dir / "summary.json")
            metrics = run_dir / "metrics.jsonl"
            if metrics.is_file():
                rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
                result["rl_rows"] = [r for r in rows if r.get("phase") == "rl"]
        self.record["results"]["train"] = result
        steps = len(result.get("rl_rows") or [])
        res["note"] = f"{steps} RL steps logged"
        if res["rc"] == 0 and steps < 2:
            res["ok"] = False
        return res

    # -- the whole run ------------------------------------------------------------------------

    def write(self) -> None:
        self.record["seconds"] = round(time.monotonic() - self.start, 1)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.record, indent=2, default=str) + "\n")
        tmp.replace(self.out / "gpu_check.json")

    def main(self) -> int:
        print(f"gpu_check: mode {self.mode}, budget {self.budget:.0f} s, stages {', '.join(self.stages)}; "
              f"results in {self.out}", flush=True)
        for name in self.stages:
            left = self.deadline - time.monotonic()
            if left < 5:
                rec = {"command": None, "rc": None, "seconds": 0.0, "timed_out": False, "tail": "",
                       "status": "skipped", "note": "the budget is spent"}
            else:
                print(f"gpu_check: {name} (up to {self.timeout(name):.0f} s) ...", flush=True)
                try:
                    rec = getattr(self, f"stage_{name}")()
                except Exception as exc:  # a bug in a stage must not lose the others' results
                    rec = {"command": None, "rc": None, "seconds": 0.0, "timed_out": False,
                           "tail": f"{type(exc).__name__}: {exc}", "status": "error"}
                if "status" not in rec:
                    ok = rec.pop("ok", rec["rc"] == 0)
                    rec["status"] = "timeout" if rec["timed_out"] else ("ok" if ok and rec["rc"] == 0 else "failed")
                rec.pop("ok", None)
            self.record["stages"].append({"name": name, **rec})
            print(f"gpu_check: {name}: {rec['status']} (rc {rec['rc']}, {rec['seconds']} s)"
                  + (f"; {rec['note']}" if rec.get("note") else ""), flush=True)
            self.write()
        self.record["ok"] = all(s["status"] == "ok" for s in self.record["stages"])
        self.write()
        print()
        print(f"{'stage':<10} {'status':<9} {'rc':>5} {'seconds':>8}  note")
        for s in self.record["stages"]:
            print(f"{s['name']:<10} {s['status']:<9} {str(s['rc']):>5} {s['seconds']:>8}  {s.get('note', '')}")
        print(f"\nwrote {self.out / 'gpu_check.json'} ({self.record['seconds']} s)")
        return 0 if self.record["ok"] else 1


# ---------------------------------------------------------------------------------------------
# Helpers


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(log: Path, lines: int = TAIL_LINES) -> str:
    text = log.read_text(errors="replace")
    return "\n".join(text.splitlines()[-lines:])[-6000:]


def _marked_json(log: Path, marker: str) -> dict | None:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith(marker):
            try:
                return json.loads(line[len(marker):])
            except json.JSONDecodeError:
                return None
    return None


def _load_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)")


def _pytest_counts(log: Path) -> dict[str, int]:
    """The counts of pytest's closing line ("3 passed, 2 skipped, 900 deselected in 12.3s")."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if re.search(r"\bin [\d.]+s\b", line) and _COUNT.search(line):
            return {kind: int(n) for n, kind in _COUNT.findall(line)}
    return {}


# ---------------------------------------------------------------------------------------------
# vendor: pure-Python packages for a GPU machine that lacks them


VENDOR_SITE = ("pytest", "pluggy", "iniconfig", "packaging", "hypothesis", "sortedcontainers", "attrs",
               "exceptiongroup", "tomli", "pygments")
VENDOR_BUILD = ("pybind11", "setuptools")


def vendor(dest: Path, download: bool) -> int:
    """Copy the installed pure-Python distributions the GPU check may need into dest/site (test
    tools) and dest/build (build tools); with ``download``, fetch a pure-Python wheel with pip for
    each one that is missing here or has native code (hypothesis >= 6.16x), and unpack it there.
    Carry the folder to the GPU machine (bench/out/ is ignored by git: name it in `carry`)."""
    from importlib import metadata

    report = {}
    for sub, names in (("site", VENDOR_SITE), ("build", VENDOR_BUILD)):
        target = dest / sub
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            try:
                dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                dist = None
            files = list(dist.files or []) if dist else []
            if dist and files and not any(str(f).endswith((".so", ".pyd")) for f in files):
                for f in files:
                    src = Path(dist.locate_file(f))
                    rel = Path(str(f))
                    if rel.parts and rel.parts[0] == ".." or not src.is_file() or rel.suffix == ".pyc":
                        continue
                    (target / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target / rel)
                report[name] = f"copied {dist.version}"
            elif download:
                report[name] = _download_wheel(name, target)
            else:
                why = "not installed here" if dist is None else "installed with native code"
                report[name] = f"{why} (--download fetches a pure-Python wheel)"
    for name, what in report.items():
        print(f"{name:<18} {what}")
    print(f"vendored into {dest}; carry it to the GPU machine (GPU_CHECK_VENDOR, default bench/out/gpu-vendor)")
    return 0


def _download_wheel(name: str, target: Path) -> str:
    import zipfile

    with tempfile.TemporaryDirectory() as tmp:
        # the newest py3-none-any wheel (any Python >= 3.10, no native code)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--python-version", "3.10", "--implementation", "py", "--abi", "none",
                               "--platform", "any", "-d", tmp, name], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            return "download failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(target)
        return f"downloaded {wheels[0].name}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["vendor"]:
        rest = [a for a in argv[1:] if a != "--download"]
        if len(rest) != 1:
            raise SystemExit("usage: python bench/gpu_check.py vendor DIR [--download]")
        return vendor(Path(rest[0]), "--download" in argv)
    if argv and argv != ["run"]:
        raise SystemExit("usage: bash bench/gpu_check.sh  (or: python bench/gpu_check.py [run | vendor DIR])")
    mode = os.environ.get("GPU_CHECK_DEVICE", "cuda").strip().lower()
    if mode not in ("cuda", "cpu"):
        raise SystemExit(f"GPU_CHECK_DEVICE: expected cuda or cpu, got {mode!r}")
    stages = [s.strip() for s in os.environ.get("GPU_CHECK_STAGES", ",".join(STAGES)).split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"GPU_CHECK_STAGES: unknown {', '.join(unknown)}; expected some of {', '.join(STAGES)}")
    out = Path(os.environ.get("OUT") or REPO / "bench" / "out" / "gpu_check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = float(os.environ.get("GPU_CHECK_BUDGET", BUDGET))
    return Check(out, mode, budget, stages).main()


if __name__ == "__main__":
    sys.exit(main())
