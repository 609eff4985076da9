"""`fiddler-batch calibrate` and `fiddler-batch profile` on the demo model, and a run that uses their files."""

from __future__ import annotations

import json
from pathlib import Path

from fiddler_batch.engine.costmodel import CostModel
from jobhelpers import cli, read_jsonl, write_job

RECORDS = [{"id": f"r{i}", "prompt": f"prompt number {i} " * (1 + i % 5)} for i in range(12)]


def test_calibrate_writes_a_cost_model_that_a_run_then_uses(tmp_path: Path, demo_path: Path) -> None:
    calibration = tmp_path / "cost.json"
    job = write_job(tmp_path, RECORDS, engine={"device": "cpu", "resident_experts": 0.25})
    done = cli("calibrate", str(job), "--quick", "--output", str(calibration))
    assert done.returncode == 0, done.stderr
    assert f"wrote {calibration}" in done.stdout
    cost = CostModel.load(calibration)
    assert cost.meta["quick"] and len(cost.cpu_ms) == len(cost.ladder) and cost.copy_ms > 0

    run = cli("run", str(job), "--set", f"engine.calibration={calibration}")
    assert run.returncode == 0, run.stderr
    assert "measuring a quick one" not in run.stderr  # it read the file instead
    stats = [r["engine_stats"] for r in read_jsonl(tmp_path / "out" / "results.jsonl")]
    assert sum(s["experts_cpu"] + s["experts_copied"] for s in stats) > 0  # 3 of 4 experts live off the device


def test_profile_counts_routing_and_places_popular_experts(tmp_path: Path, demo_path: Path) -> None:
    job = write_job(tmp_path, RECORDS, output={"path": "out/res.v2.jsonl"})
    done = cli("profile", str(job), "--sample", "6", "--max-new-tokens", "3")
    assert done.returncode == 0, done.stderr
    path = tmp_path / "out" / "res.v2.profile.json"  # STEM.profile.json beside the output
    profile = json.loads(path.read_text())
    counts = profile["counts"]
    assert profile["requests"] == 6 and len(counts) == 4 and all(len(row) == 8 for row in counts)
    assert sum(map(sum, counts)) == profile["tokens_routed"] > 0

    run = cli("run", str(job), "--set", f"engine.profile={path}", "--set", "engine.resident_experts=0.25")
    assert run.returncode == 0, run.stderr
    assert "8 of 32 experts resident" in run.stderr
