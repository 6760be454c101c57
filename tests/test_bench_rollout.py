"""`longcot bench rollout --small`: the half-looping policy is built (and cached), rollouts run with
and without the early stop on both backends (vLLM in a child process, when installed), and the
JSON holds every row with consistent numbers."""

import json

import torch

from longcot.bench import early_stop
from longcot.engine.rollout import vllm_available


def test_bench_rollout_small(tmp_path):
    path = tmp_path / "rollout.json"
    threads = torch.get_num_threads()
    assert early_stop.run(small=True, json_path=str(path), threads=threads + 1) == 0
    # The caller's thread count is restored: a test process runs on with what it had (a leaked
    # count changed later tests' float rounding).
    assert torch.get_num_threads() == threads
    result = json.loads(path.read_text())
    s = result["settings"]
    responses = s["prompts"] * s["samples"]
    settings = [(0.0, False), (0.0, True), (early_stop.TEMPERATURE, False), (early_stop.TEMPERATURE, True)]
    backends = ["hf", "vllm"] if vllm_available() else ["hf"]
    assert [(r["backend"], r["temperature"], r["early_stop"]) for r in result["rows"]] == [
        (b, *setting) for b in backends for setting in settings]
    for r in result["rows"]:
        assert r["responses"] == responses and r["seconds"] > 0
        assert responses <= r["tokens"] <= responses * s["max_new_tokens"]
        assert r["stopped_repeating"] == 0 or r["early_stop"]
    checks = result["checks"]
    for prefix in ("vllm_",) * (len(backends) - 1) + ("",):
        assert checks[f"{prefix}greedy_unstopped_identical"] is True
        assert checks[f"{prefix}false_stops_greedy"] == 0 and checks[f"{prefix}time_ratio_greedy"] > 0
    if vllm_available():
        # Greedy with the rule on, both backends: the same responses (the policy is tiny and fp32).
        assert checks["greedy_hf_vllm_identical"] == 1.0
        by = {(r["backend"], r["temperature"], r["early_stop"]): r for r in result["rows"]}
        assert by[("vllm", 0.0, True)]["tokens"] == by[("hf", 0.0, True)]["tokens"]
        assert by[("vllm", 0.0, True)]["stopped_repeating"] == by[("hf", 0.0, True)]["stopped_repeating"]
    else:
        assert checks["vllm_skipped"]
    # The policy is cached: a second run loads it instead of training again.
    cached = tmp_path / "loop-policy-small" / "settings.json"
    assert cached.exists()
    stamp = cached.stat().st_mtime_ns
    assert early_stop.run(small=True, json_path=str(path), threads=1, vllm=False) == 0
    assert cached.stat().st_mtime_ns == stamp


def test_loop_demonstrations_cycle_without_an_end():
    from longcot.engine.data import addition

    odd, even = addition.make_problem((31, 4)), addition.make_problem((21, 4))
    assert early_stop._demonstration(even, 5) == even.demonstration
    cycle = early_stop._demonstration(odd, 5)
    first = odd.demonstration.splitlines()[0]
    assert cycle == (first + "\n") * 5 and "boxed" not in cycle
