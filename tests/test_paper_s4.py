"""`longcot replicate s4`: the arms' configs and a quick run's files."""

from __future__ import annotations

import json
import struct

import pytest

from longcot.bench import paper_s4
from longcot.bench.paper_s4 import ARMS, BASELINE, arm_config_path, config_differences


def test_every_arm_has_a_config_and_the_baseline_comes_first():
    assert ARMS[0].name == BASELINE and ARMS[0].partner is None
    names = [a.name for a in ARMS]
    for arm in ARMS:
        assert arm_config_path(arm.name).is_file()
        assert arm.partner is None or names.index(arm.partner) < names.index(arm.name)


@pytest.mark.parametrize("arm", [a for a in ARMS if a.partner], ids=lambda a: a.name)
def test_each_arm_differs_from_its_partner_only_in_the_intended_keys(arm):
    diffs = config_differences(arm_config_path(arm.name), arm_config_path(arm.partner))
    assert diffs, f"{arm.name} is the same run as {arm.partner}"
    stray = [d for d in diffs if not any(d == c or d.startswith(c + ".") for c in arm.changes)]
    assert not stray, f"{arm.name} differs from {arm.partner} in {stray}, beyond {arm.changes}"
    for change in arm.changes:
        assert any(d == change or d.startswith(change + ".") for d in diffs), f"{change} is not changed"


def test_config_differences_sees_a_changed_list_entry(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("reward: {channels: [{reward: cosine}, {reward: repetition, gamma: 0.99}]}\n")
    b.write_text("reward: {channels: [{reward: cosine}, {reward: repetition, gamma: 1.0}]}\n")
    assert config_differences(a, b) == ["reward.channels.1.gamma"]


def test_a_finished_run_is_reused_only_with_the_same_settings(tmp_path):
    import yaml

    for name, lr in (("20260101-000000-seed0", 1e-4), ("20260102-000000-seed0", 5e-5)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": lr}}))
        (run / "summary.json").write_text("{}")
    assert paper_s4._finished_run(tmp_path, {"optim": {"lr": 1e-4}}) == tmp_path / "20260101-000000-seed0"
    assert paper_s4._finished_run(tmp_path, {"optim": {"lr": 5e-5}}) == tmp_path / "20260102-000000-seed0"
    assert paper_s4._finished_run(tmp_path, {"optim": {"lr": 2e-5}}) is None


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_quick_run_writes_every_file(tmp_path, capsys):
    from longcot.engine.cli import main

    out = tmp_path / "s4"
    assert main(["replicate", "s4", "--quick", "--out", str(out)]) == 0  # one seed by default
    raw = json.loads((out / "runs.json").read_text())
    assert sorted(r["arm"] for r in raw["runs"]) == sorted(a.name for a in ARMS)
    for r in raw["runs"]:
        assert r["series"]["step"] == [1, 2]
        assert [e["step"] for e in r["evals"]] == [0, 1, 2]
        assert set(r["sampled"]) == {"sft", "final"}
        assert set(paper_s4.AUDIT_KEYS) <= set(r["sampled"]["final"]["lines"])
    # The SFT policy's pass@1 is made once per budget (tight and long), shared by the arms.
    assert sorted(p.name for p in (out / "sft" / "seed0").glob("sampled-*.json")) == ["sampled-256.json",
                                                                                      "sampled-64.json"]
    by_budget = {}
    for r in raw["runs"]:
        by_budget.setdefault(r["arm"] in ("cosine_tight", "classic_tight"), []).append(r["sampled"]["sft"])
    assert all(all(x == group[0] for x in group) for group in by_budget.values())
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {a.name for a in ARMS}
    assert set(summary["findings"]) == {"a", "b", "c", "d"}
    assert all(isinstance(f["reproduced"], bool) and f["rule"] for f in summary["findings"].values())
    trade = summary["tradeoff"]
    for key in ("observed/with_reflection/accuracy", "observed/without_reflection/length",
                "forced/with_reflection/accuracy", "one_shot_line_wrong", "check_line_wrong"):
        assert key in trade
    table = (out / "table.md").read_text()
    assert all(a.label in table for a in ARMS) and "(d)" in table and "| arm | checking |" in table
    for name in (*paper_s4.FIGURES, "heldout_accuracy"):
        w, h = _png_size(out / "figures" / f"{name}.png")
        assert w > 100 and h > 100
    # A second start reuses every finished run (no new run folders).
    before = sorted(p for p in (out / "runs").rglob("summary.json"))
    assert paper_s4.run(seeds=1, quick=True, out=str(out), jobs=2) == 0
    assert sorted(p for p in (out / "runs").rglob("summary.json")) == before
    assert "paper_s4: 5 runs" in capsys.readouterr().out


def test_cli_rejects_bad_counts(capsys):
    from longcot.engine.cli import main

    with pytest.raises(SystemExit, match="--seeds"):
        main(["replicate", "s4", "--seeds", "0"])


def test_line_audit_counts_checks_and_their_mistakes():
    texts = ["6+7+3+8=23 c2\nwait 6+7=13 13+3=16 16+8=23 c2\n\\boxed{23}",  # a check copying the slip
             "6+7+3+8=24 c2\n\\boxed{24}",
             "1+2+3+4=11 c1\nwait 1+2=3 3+3=6 6+4=10 c1\n\\boxed{10}"]  # a slip caught
    lines = paper_s4.line_audit(texts)
    assert lines["checking"] == pytest.approx(2 / 3)
    assert lines["one_shot_wrong"] == pytest.approx(2 / 3) and lines["check_wrong"] == pytest.approx(1 / 2)
    assert (lines["lines"], lines["checks"]) == (3, 2)
