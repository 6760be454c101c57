"""`longcot bench peers --small`: longcot's GRPO and TRL's GRPOTrainer each run in their own process
from one SFT folder, and the JSON holds both sides with sane numbers."""

import importlib.util
import json

import pytest

from longcot.bench import peers

# find_spec, not importorskip: importing TRL here would cost the test process seconds and
# hundreds of MB (it pulls in vLLM's modules when vLLM is installed) for nothing.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                                reason="trl is not installed (the dev extra installs it)")


def test_bench_peers_small_runs_both_sides(tmp_path):
    path = tmp_path / "peers.json"
    assert peers.run(small=True, json_path=str(path), threads=1) == 0
    result = json.loads(path.read_text())
    steps = result["settings"]["steps"]
    rows = {r["side"]: r for r in result["rows"]}
    assert set(rows) == set(peers.SIDES)
    for r in rows.values():
        assert r["steps"] == steps and r["measured_steps"] == f"2..{steps}"
        assert r["s_per_step"] > 0 and r["first_step_seconds"] > 0
        assert r["tokens_per_s"] > 0 and r["generated_tokens"] > 0
        assert 0 < r["import_rss_bytes"] < r["peak_rss_bytes"]
        assert 0 <= r["accuracy_before"] <= 1 and 0 <= r["accuracy_after"] <= 1
        assert r["heldout"] == result["settings"]["heldout"]
        assert r["torch_threads"] == 1
        phases = r["phase_seconds"]
        assert all(phases[p] >= 0 for p in peers.PHASES)
        assert sum(phases[p] for p in peers.PHASES) <= r["s_per_step"] * (1 + 1e-6)
        assert phases["rollout"] > 0 and phases["update"] > 0
        for key in ("step_seconds", "tokens", "lr", "train_accuracy"):
            assert len(r["per_step"][key]) == steps, key
    # One starting point, scored once: both sides' "before" is the SFT folder's accuracy.
    assert rows["longcot"]["accuracy_before"] == rows["trl"]["accuracy_before"] == result["sft"]["accuracy"]["accuracy"]
    # With one update per rollout and beta = 0, TRL runs no old-policy or reference forward.
    assert all(p["experience"] == 0 for p in rows["trl"]["per_step"]["phases"])
    assert result["checks"]["lr_schedules_equal"] is True
    assert result["checks"]["longcot_fit_eval_matches"] is True
    assert rows["trl"]["versions"]["trl"] == peers.TRL_VERSION

    # A second run reuses the cached SFT folder.
    cached = peers.cached_sft(peers.settings(True, None, 0, 1), tmp_path / "peers-sft-seed0-small")
    assert cached["cached"] is True and cached["model"] == result["sft"]["model"]
