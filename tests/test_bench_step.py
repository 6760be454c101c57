"""`longcot bench step --small`: every side runs in its own process and the JSON has the columns."""

import json

from longcot.bench import step


def test_bench_step_small_writes_every_side(tmp_path):
    path = tmp_path / "step.json"
    assert step.run(small=True, lengths=[48], json_path=str(path), threads=1) == 0
    result = json.loads(path.read_text())
    rows = {r["side"]: r for r in result["rows"]}
    assert set(rows) == set(step.SIDES)
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 and 0 <= r["padding_share"] < 1
        assert r["valid_tokens"] == rows["padded"]["valid_tokens"]  # the same inputs on every side
    # Sorted, trimmed micro-batches pad less than 4 rows at the batch's width.
    assert rows["budget"]["padding_share"] < rows["padded"]["padding_share"]
    assert "budget_speedup_at_48" in result["checks"]
