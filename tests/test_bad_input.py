"""Bad input, table-driven: every row ends with exit code 2 and ONE stderr line that names the
file and line, the path, or the config key, and never a traceback. Plus the faults a run goes on
through: prompts over the limit (skipped and counted) and a verifier that times out."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from longcot.engine import Trainer, cli
from longcot.engine.config import load_config

LONGCOT = str(Path(sys.executable).with_name("longcot"))

# A few seconds of training on a file task with a saved tiny model (no SFT data: RL only).
QUICK = [
    "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
    "rollout.max_new_tokens=8", "algorithm.mini_batch_size=4", "algorithm.micro_batch_size=4",
    "steps=1", "eval_size=2", "logging.progress=false", "logging.tensorboard=false",
    "logging.plots=false",
]
GOOD = "".join(json.dumps({"problem": f"{a}+{b}", "answer": str(a + b)}) + "\n"
               for a in range(1, 5) for b in range(1, 5))


@pytest.fixture
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


@pytest.fixture(scope="session")
def no_eos_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with the end-of-sequence token removed from its tokenizer's files."""
    import shutil

    path = tmp_path_factory.mktemp("no_eos") / "model"
    shutil.copytree(tiny_model_dir, path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = path / name
        if file.exists():
            config = json.loads(file.read_text())
            config.pop("eos_token", None)
            file.write_text(json.dumps(config))
    return path


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _line(**record) -> str:
    return json.dumps(record) + "\n"


TRAIN = ["train", "data.task=file", "model.path={model}", "data.path={tmp}/d.jsonl"]

# (id, files written into the test's folder, the command line, what the one line must contain).
# {tmp}, {model} and {noeos} are the test's folder and the two saved models.
CASES = [
    ("malformed JSON line", {"d.jsonl": GOOD + "{bad\n"}, TRAIN,
     "{tmp}/d.jsonl: line 17: malformed JSON"),
    ("JSON line that is not an object", {"d.jsonl": "[1, 2]\n"}, TRAIN,
     "{tmp}/d.jsonl: line 1: expected a JSON object"),
    ("missing question field", {"d.jsonl": GOOD + _line(answer="3")}, TRAIN,
     "{tmp}/d.jsonl: line 17: missing field 'problem'"),
    ("missing answer field", {"d.jsonl": _line(problem="1+2")}, TRAIN,
     "{tmp}/d.jsonl: line 1: missing field 'answer'"),
    ("empty prompt", {"d.jsonl": GOOD + _line(problem=" ", answer="3")}, TRAIN,
     "{tmp}/d.jsonl: line 17: field 'problem' is empty"),
    ("answer of the wrong type", {"d.jsonl": _line(problem="1+2", answer=[3])}, TRAIN,
     "{tmp}/d.jsonl: line 1: field 'answer' must be a string or an integer"),
    ("non-UTF-8 bytes", {"d.jsonl": GOOD.encode() + b'{"problem": "\xff"}\n'}, TRAIN,
     "{tmp}/d.jsonl: line 17: not valid UTF-8"),
    ("prompt over the limit, strict mode", {"d.jsonl": GOOD + _line(problem="1234+5678", answer="6912")},
     [*TRAIN, "data.max_prompt_tokens=5", "data.strict=true"],
     "{tmp}/d.jsonl: line 17: the prompt is 9 tokens, over data.max_prompt_tokens=5"),
    ("data file that does not exist", {}, TRAIN, "{tmp}/d.jsonl: file does not exist"),
    ("data file of an unknown format", {"d.csv": "problem,answer\n"},
     ["train", "data.task=file", "model.path={model}", "data.path={tmp}/d.csv"], "{tmp}/d.csv: unknown extension '.csv'"),
    ("SFT file without a response field", {"d.jsonl": GOOD, "s.jsonl": _line(prompt="1+2=")},
     [*TRAIN, "data.sft_path={tmp}/s.jsonl"], "{tmp}/s.jsonl: line 1: missing field 'response'"),
    ("model folder that does not exist", {"d.jsonl": GOOD},
     ["train", "data.task=file", "model.path={tmp}/nowhere", "data.path={tmp}/d.jsonl"],
     "{tmp}/nowhere: model folder does not exist"),
    ("tokenizer without an end-of-sequence token", {"d.jsonl": GOOD},
     ["train", "data.task=file", "model.path={noeos}", "data.path={tmp}/d.jsonl"], "{noeos}: "),
    ("unknown config key", {}, ["train", "optim.lrr=1e-4"], "optim.lrr: unknown key"),
    ("negative learning rate", {}, ["train", "optim.lr=-1e-4"], "optim.lr: expected a number > 0"),
    ("gamma outside [0, 1]", {}, ["train", "reward.channels.1.gamma=1.5"],
     "reward.channels.1.gamma: expected a number in [0, 1]"),
    ("channel gammas that differ with GAE lambda < 1", {}, ["train", "algorithm.lam=0.95"],
     "algorithm.lam: reward channels with different gammas"),
    ("unknown reward", {}, ["train", "reward.channels.0.reward=cosin"],
     "reward.channels[0].reward: unknown reward 'cosin'"),
    ("value of the wrong type", {}, ["train", "steps=many"], "steps: expected an integer, got 'many'"),
    ("early stop on a first occurrence", {}, ["train", "rollout.stop_on_repetition.min_repeats=1"],
     "rollout.stop_on_repetition.min_repeats: expected >= 2"),
    # cuda:99 exists on no machine, so these rows read the same with or without a GPU.
    ("CUDA device this machine does not have", {}, ["train", "model.device=cuda:99"],
     "model.device: cuda:99 requested but"),
    ("device that is not a device", {}, ["train", "model.device=gpu"],
     "model.device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("sft on a CUDA device this machine does not have", {}, ["sft", "model.device=cuda:99"],
     "model.device: cuda:99 requested but"),
    ("evaluation on a CUDA device this machine does not have", {},
     ["eval", "--model", "{model}", "--data", "math500", "device=cuda:99"], "device: cuda:99 requested but"),
    ("override without '='", {}, ["train", "steps"], "steps: expected an override of the form key.sub=value"),
    ("file task without a data path", {}, ["train", "data.task=file"], "data.path: required when task is 'file'"),
    ("file task without a model", {"d.jsonl": GOOD}, ["train", "data.task=file", "data.path={tmp}/d.jsonl"],
     "model.path: required when data.task is 'file'"),
    ("sft command without SFT data", {"d.jsonl": GOOD},
     ["sft", *QUICK, "output_dir={tmp}/runs", "data.task=file", "model.path={model}", "data.path={tmp}/d.jsonl"],
     "data.sft_path: no SFT examples"),
    ("evaluation file with no rows", {"e.jsonl": "\n"}, ["eval", "--model", "{model}", "--data", "{tmp}/e.jsonl"],
     "{tmp}/e.jsonl: no rows"),
    ("evaluation set that is neither a benchmark nor a file", {},
     ["eval", "--model", "{model}", "--data", "math5000"], "math5000: unknown dataset"),
    ("resume folder with no complete checkpoint",
     {"run/config.yaml": "steps: 3\n", "run/checkpoints/.step-000002.tmp-1234/state.json": "{"},
     ["train", "resume={tmp}/run"], "resume: {tmp}/run: no complete checkpoint"),
    ("resume folder that does not exist", {}, ["train", "resume={tmp}/gone"],
     "resume: {tmp}/gone: run folder does not exist"),
    ("config file that does not exist", {}, ["train", "--config", "{tmp}/nope.yaml"],
     "{tmp}/nope.yaml: config file not found"),
    ("config file that is not YAML", {"c.yaml": "steps: 3\nsft: [unclosed\n"},
     ["train", "--config", "{tmp}/c.yaml"], "{tmp}/c.yaml:3: invalid YAML"),
]


@pytest.mark.parametrize("files, argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(files, argv, expected, tmp_path, model_dir, no_eos_model_dir, capsys):
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        _write(tmp_path / name, content)
    where = {"tmp": str(tmp_path), "model": str(model_dir), "noeos": str(no_eos_model_dir)}
    argv = [a.format(**where) for a in argv]
    if argv[0] == "train" and "--config" not in argv and not argv[1].startswith("resume="):
        argv = [argv[0], *QUICK, f"output_dir={tmp_path / 'runs'}", *argv[1:]]
    code = cli.main(argv)
    err = capsys.readouterr().err
    # transformers' "Loading weights" bar may precede a model folder's error
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("longcot: error: ") and expected.format(**where) in lines[0], lines[0]
    assert "Traceback" not in err


def test_at_least_fifteen_rows():
    assert len(CASES) >= 15


def test_bad_input_through_the_console_script(tmp_path):
    """The same contract at the process level: exit status 2, one line, no traceback."""
    proc = subprocess.run([LONGCOT, "train", "optim.lr=-1"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["longcot: error: optim.lr: expected a number > 0, got -1.0"]


def test_long_prompts_are_skipped_and_counted(tmp_path, model_dir, capsys):
    data = _write(tmp_path / "d.jsonl", GOOD + _line(problem="1234+5678", answer="6912"))
    cfg = load_config(None, [*QUICK, f"output_dir={tmp_path}", "data.task=file", f"model.path={model_dir}",
                             f"data.path={data}", "data.max_prompt_tokens=5"])
    summary = Trainer(cfg).fit()
    assert summary["skipped_prompts"] == 1 and summary["steps"] == 1
    assert "skipped 1 prompts longer than data.max_prompt_tokens=5" in capsys.readouterr().err


def test_verifier_timeouts_are_counted_and_the_run_goes_on(tmp_path, monkeypatch):
    """Every response is replaced by LaTeX that sympy cannot finish: each distinct (reference,
    answer) pair times out, is scored wrong and counted, and the run completes."""
    import longcot.engine.trainer as trainer

    hangs = r"\boxed{9^{9^{9^{9}}}}"
    monkeypatch.setattr(trainer, "response_texts", lambda tok, rollout: [hangs] * len(rollout))
    cfg = load_config(None, [*QUICK, f"output_dir={tmp_path}",
                             "model.tiny.layers=1", "model.tiny.hidden=64", "model.tiny.heads=1",
                             "data.addition.digits=1", "data.addition.n_train=20",
                             "data.addition.n_heldout=4", "sft.enabled=false", "sft.eval_size=4",
                             "steps=2", "reward.verifier_timeout_s=0.2"])
    summary = Trainer(cfg).fit()
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if r["phase"] == "rl"]
    # two prompts a step with distinct answers (usually): one or two timeouts a step, all wrong
    assert all(r["verifier_timeouts"] >= 1 and r["accuracy"] == 0.0 for r in rl), rl


def test_a_packaged_benchmark_as_the_held_out_set(tmp_path, model_dir):
    """data.heldout_path takes a benchmark's name: the run's evaluations are on AIME 2024."""
    data = _write(tmp_path / "d.jsonl", GOOD)
    cfg = load_config(None, [*QUICK, f"output_dir={tmp_path}", "data.task=file", f"model.path={model_dir}",
                             f"data.path={data}", "data.heldout_path=aime24", "data.max_prompt_tokens=4096"])
    summary = Trainer(cfg).fit()
    assert [e["n"] for e in summary["evals"]] == [2, 2]  # eval_size=2: the first two problems
