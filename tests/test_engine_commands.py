"""`fiddler-batch calibrate` and `fiddler-batch profile` on the demo model, and a run that uses their files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fiddler_batch.assets import load_cost_model
from fiddler_batch.batching import plan_batches
from fiddler_batch.engine import Engine
from fiddler_batch.generation import GRAPH_MIN_NEW_TOKENS, generate_batch
from fiddler_batch.io.readers import read_records
from fiddler_batch.io.requests import to_requests
from fiddler_batch.jobfile import load_job
from fiddler_batch.profiling import profile_job
from fiddler_batch.prompts import prepare

from jobhelpers import cli, read_jsonl, write_job

RECORDS = [{"id": f"r{i}", "prompt": f"prompt number {i} " * (1 + i % 5)} for i in range(12)]


def test_calibrate_writes_a_cost_model_that_a_run_then_uses(tmp_path: Path, demo_path: Path) -> None:
    calibration = tmp_path / "cost.json"
    job = write_job(tmp_path, RECORDS, engine={"device": "cpu", "resident_share": 0.25})
    done = cli("calibrate", str(job), "--quick", "--output", str(calibration))
    assert done.returncode == 0, done.stderr
    assert f"wrote {calibration}" in done.stdout
    assert "host memory read" in done.stdout and "GB/s" in done.stdout
    cost = load_cost_model(calibration)
    assert cost.meta["quick"] and len(cost.cpu_ms) == len(cost.ladder) and cost.copy_ms > 0

    run = cli("run", str(job), "--set", f"engine.calibration={calibration}")
    assert run.returncode == 0, run.stderr
    assert "measuring a quick one" not in run.stderr  # it read the file instead
    stats = [r["engine_stats"] for r in read_jsonl(tmp_path / "out" / "results.jsonl")]
    assert sum(s["experts_cpu"] + s["experts_copied"] for s in stats) > 0  # 3 of 4 experts live off the device


def test_a_bf16_calibration_measures_packed_experts_and_the_kernel_that_a_run_then_uses(
    tmp_path: Path, demo_path: Path
) -> None:
    calibration = tmp_path / "cost.json"
    job = write_job(tmp_path, RECORDS, engine={"device": "cpu", "resident_share": 0.25})
    bf16 = ("--set", "model.dtype=bfloat16")
    done = cli("calibrate", str(job), "--quick", "--output", str(calibration), *bf16)
    assert done.returncode == 0, done.stderr
    assert "cpu packed ms" in done.stdout and "CPU experts from weights packed for oneDNN" in done.stdout
    assert "cpu own ms" in done.stdout and "CPU experts from the own kernel" in done.stdout
    cost = load_cost_model(calibration)
    assert len(cost.cpu_packed_ms) == len(cost.ladder) and 0 < len(cost.cpu_gemv_ms) < len(cost.ladder)

    run = cli("run", str(job), *bf16, "--set", f"engine.calibration={calibration}", "--set", "engine.cpu_packed=on")
    assert run.returncode == 0, run.stderr
    stats = [r["engine_stats"] for r in read_jsonl(tmp_path / "out" / "results.jsonl")]
    assert sum(s["experts_cpu_packed"] for s in stats) == sum(s["experts_cpu"] for s in stats) > 0
    assert sum(s["experts_cpu_gemv"] for s in stats) == 0  # packed asked for outright, the kernel left on auto

    # The own kernel asked for: the CPU experts of up to 32 tokens use it (those of the prefills' larger batches
    # do not), and none with it off.
    for setting, used in (("on", True), ("off", False)):
        run = cli(
            "run", str(job), *bf16, "--set", f"engine.calibration={calibration}", "--set", f"engine.cpu_gemv={setting}"
        )
        assert run.returncode == 0, run.stderr
        stats = [r["engine_stats"] for r in read_jsonl(tmp_path / "out" / "results.jsonl")]
        gemv, cpu = sum(s["experts_cpu_gemv"] for s in stats), sum(s["experts_cpu"] for s in stats)
        assert (0 < gemv <= cpu) if used else (gemv == 0 < cpu), (setting, gemv, cpu)


def test_profile_counts_routing_and_places_popular_experts(tmp_path: Path, demo_path: Path) -> None:
    job = write_job(tmp_path, RECORDS, output={"path": "out/res.v2.jsonl"})
    done = cli("profile", str(job), "--sample", "6", "--max-new-tokens", "3")
    assert done.returncode == 0, done.stderr
    path = tmp_path / "out" / "res.v2.profile.json"  # STEM.profile.json beside the output
    profile = json.loads(path.read_text())
    counts = profile["counts"]
    assert profile["requests"] == 6 and len(counts) == 4 and all(len(row) == 8 for row in counts)
    assert sum(map(sum, counts)) == profile["tokens_routed"] > 0

    run = cli("run", str(job), "--set", f"engine.profile={path}", "--set", "engine.resident_share=0.25")
    assert run.returncode == 0, run.stderr
    assert "8 of 32 experts resident" in run.stderr


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic-cache", "static-cache"])
def test_profile_counts_real_tokens_only(
    engine: Any, tmp_path: Path, static_cache: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two prompts of 26 and 64 tokens in one batch: the shorter one's 38 pads count for nothing. Also with
    the static KV cache that CUDA graphs use (transformers then passes the prefill a 4-D mask)."""
    new = GRAPH_MIN_NEW_TOKENS if static_cache else 2
    if static_cache:
        monkeypatch.setattr(Engine, "static_cache", property(lambda self: True))
    records = [{"id": "short", "prompt": "s" * 25}, {"id": "long", "prompt": "l" * 63}]  # + BOS: 26 and 64 tokens
    spec = load_job(write_job(tmp_path, records, generation={"max_new_tokens": new}))
    profile = profile_job(spec, sample=2, max_new_tokens=new, engine=engine)
    requests, _ = to_requests(enumerate(read_records(spec.input)), spec.input, spec.generation)
    items, _ = prepare(requests, engine.tokenizer, engine.max_context)
    assert sorted(item.prompt_tokens for item in items) == [26, 64]
    [batch] = plan_batches(items, spec.batching)
    lengths = [len(c.token_ids) for c in generate_batch(engine, batch).completions]
    decode_tokens = sum(n - 1 for n in lengths)  # a row runs a decode step for each token after its first
    per_layer = 2 * (26 + 64 + decode_tokens)  # top-2 routing per real token
    assert [sum(row) for row in profile["counts"]] == [per_layer] * 4
    assert per_layer < 2 * 2 * 64  # what counting the padded rectangle gave
