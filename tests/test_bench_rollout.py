"""`longcot bench rollout --small`: the half-looping policy is built (and cached), rollouts run with
and without the early stop, and the JSON holds both with consistent numbers."""

import json

import torch

from longcot.bench import early_stop


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
    assert [(r["temperature"], r["early_stop"]) for r in result["rows"]] == [
        (0.0, False), (0.0, True), (early_stop.TEMPERATURE, False), (early_stop.TEMPERATURE, True)]
    for r in result["rows"]:
        assert r["responses"] == responses and r["seconds"] > 0
        assert responses <= r["tokens"] <= responses * s["max_new_tokens"]
        assert r["stopped_repeating"] == 0 or r["early_stop"]
    checks = result["checks"]
    assert checks["greedy_unstopped_identical"] is True
    assert checks["false_stops_greedy"] == 0 and checks["time_ratio_greedy"] > 0
    # The policy is cached: a second run loads it instead of training again.
    cached = tmp_path / "loop-policy-small" / "settings.json"
    assert cached.exists()
    stamp = cached.stat().st_mtime_ns
    assert early_stop.run(small=True, json_path=str(path), threads=1) == 0
    assert cached.stat().st_mtime_ns == stamp


def test_loop_demonstrations_cycle_without_an_end():
    from longcot.engine.data import addition

    odd, even = addition.make_problem((31, 4)), addition.make_problem((21, 4))
    assert early_stop._demonstration(even, 5) == even.demonstration
    cycle = early_stop._demonstration(odd, 5)
    first = odd.demonstration.splitlines()[0]
    assert cycle == (first + "\n") * 5 and "boxed" not in cycle
