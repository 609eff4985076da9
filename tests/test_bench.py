"""The benchmark suite: its CPU smoke run writes a results JSON, a markdown table and a PNG chart; pieces merge;
the size syntax, the request mix and the bound's arithmetic. Nothing here asserts anything about speed."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from fiddler_batch.bench import report
from fiddler_batch.bench.bounds import layer_ms, split_ms, throughput_bound
from fiddler_batch.bench.cli import bench
from fiddler_batch.bench.model import build_tokenizer
from fiddler_batch.bench.scenarios import request_mix, write_requests
from fiddler_batch.bench.settings import (
    BASELINE_TABLE,
    BASELINES,
    DEFAULT_BASELINES,
    PROTOCOL_SIZES,
    SCENARIOS,
    Case,
    Mix,
    Settings,
    parse_sizes,
)
from fiddler_batch.bench.suite import GRAPH_SETTLE_CALLS, SETTLE_CALLS, Suite
from fiddler_batch.engine.adaptive import StartLag
from fiddler_batch.engine.costmodel import CostModel
from fiddler_batch.spec import EngineSpec

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _table_rows(markdown: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in markdown.splitlines()
        if line.startswith("| ") and not line.startswith("| scenario")
    ]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke run of every scenario and baseline (those that run only when named too), once for the module."""
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("bench")
    result = CliRunner().invoke(bench, ["--smoke", "--baselines", ",".join(BASELINES), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_variants_of_ours_run_only_when_named() -> None:
    assert DEFAULT_BASELINES == ("accelerate", "cpu-experts", "fiddler-rule", "fiddler-batch")
    assert Settings().baselines == DEFAULT_BASELINES
    variants = {
        "fiddler-prefetch",
        "fiddler-prefetch-1",
        "fiddler-whole",
        "fiddler-worker",
        "fiddler-eager",
        "fiddler-packed",
        "fiddler-linear",
        "fiddler-adapt",
        "fiddler-noprefetch",
    }
    assert set(BASELINES) - set(DEFAULT_BASELINES) == variants
    assert all(BASELINE_TABLE[name].engine for name in BASELINES if name not in DEFAULT_BASELINES)
    default = next(p for p in bench.params if p.name == "baselines").default
    assert default == ",".join(DEFAULT_BASELINES)


def test_smoke_writes_json_markdown_and_png(smoke: Path) -> None:
    data = json.loads((smoke / "results.json").read_text())
    assert data["format"] == "fiddler-batch-bench/1"
    [session] = data["sessions"]
    for key in (
        "id",
        "date",
        "command",
        "host",
        "card",
        "versions",
        "settings",
        "model",
        "budget",
        "cost_model",
        "rates",
        "placements",
        "timeline",
    ):
        assert key in session
    assert session["card"] is None and session["versions"]["torch"]
    placements = session["placements"]
    assert placements["fiddler-prefetch"]["prefetch_experts"] == 2
    assert placements["fiddler-batch"]["prefetch_experts"] == EngineSpec().prefetch_experts
    assert placements["fiddler-noprefetch"]["prefetch_experts"] == 0 < EngineSpec().prefetch_experts
    assert {(r["scenario"], r["baseline"]) for r in data["runs"]} == {(s, b) for s in SCENARIOS for b in BASELINES}
    for run in data["runs"]:
        if run["baseline"] == "accelerate":
            assert run["status"] == "skipped" and "CPU" in run["reason"]
            continue
        assert run["status"] == "ok", run
        assert len(run["reps"]) == 1 and run["median"] and run["warmup"]
        if run["scenario"] != "d":  # the CPU plans without the CPU's start lag: one warm-up call settles them
            assert run["warmup"]["calls"] == 1
        assert run["reps"][0]["engine_stats"]["layer_calls"] > 0
    assert {b["scenario"] for b in data["bounds"]} == set(SCENARIOS)
    assert all(b["traced_on"] == "fiddler-batch" and b["metrics"] for b in data["bounds"])

    rows = _table_rows((smoke / "results.md").read_text())
    assert {(row[0].split()[0], row[2]) for row in rows} == {(s, b) for s in SCENARIOS for b in BASELINES}
    assert len(rows) == len(SCENARIOS) * len(BASELINES)
    assert (smoke / "results.png").read_bytes()[:8] == PNG_MAGIC


def test_the_report_gives_both_bounds_and_marks_older_free_only_ones(smoke: Path) -> None:
    from fiddler_batch.bench.report import table_rows
    from fiddler_batch.bench.results import Results
    from fiddler_batch.bench.scenarios import METRICS

    data = json.loads((smoke / "results.json").read_text())
    assert all(set(b["free"]) == {"metrics", "expert_bound_s"} and "contention" in b for b in data["bounds"])
    shares = {}
    for old in (False, True):
        copy = json.loads(json.dumps(data))
        for bound in copy["bounds"]:
            if old:  # as a results file from before the shared bound recorded it
                bound["metrics"] = bound.pop("free")["metrics"]
            else:  # a contended bound, slower than the free one: half the speed (twice the time)
                free = bound["free"]["metrics"]
                bound["metrics"] = {k: v * (0.5 if METRICS[k][1] else 2.0) for k, v in free.items()}
        rows = [r for r in table_rows(Results(copy)) if r["baseline"] == "fiddler-batch" and r["share"]]
        assert rows
        shares[old] = {(r["scenario"], r["case"]): (r["share"], r["free_share"], r["free_only"]) for r in rows}
    for key, (share, free_share, free_only) in shares[False].items():
        assert share == pytest.approx(2 * free_share) and not free_only
        assert shares[True][key] == (pytest.approx(free_share), pytest.approx(free_share), True)


def test_the_report_keeps_a_baseline_recorded_under_a_retired_name(smoke: Path) -> None:
    from fiddler_batch.bench.report import table_rows
    from fiddler_batch.bench.results import Results

    data = json.loads((smoke / "results.json").read_text())
    for run in data["runs"]:
        if run["baseline"] == "fiddler-whole":
            run["baseline"] = "fiddler-old-name"  # as results recorded before a baseline was renamed
    rows = table_rows(Results(data))
    for scenario in SCENARIOS:
        names = [r["baseline"] for r in rows if r["scenario"] == scenario]
        assert names == [b for b in BASELINES if b != "fiddler-whole"] + ["fiddler-old-name"]
        old = next(r for r in rows if r["scenario"] == scenario and r["baseline"] == "fiddler-old-name")
        assert old["status"] == "ok" and old["value"] and old["ratio"]


def test_smoke_records_its_command(smoke: Path) -> None:
    command = json.loads((smoke / "results.json").read_text())["sessions"][0]["command"]
    assert command.startswith("fiddler-batch bench --smoke ") and "--sizes a=8x8" in command


def test_pieces_append_and_merge(smoke: Path, tmp_path: Path) -> None:
    piece = tmp_path / "piece"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fiddler_batch.bench",
            "--smoke",
            "--scenario",
            "b",
            "--baselines",
            "cpu-experts,fiddler-batch",
            "--out",
            str(piece),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[-1].startswith("b 64 ")  # the table is printed last

    merged = tmp_path / "merged"
    result = CliRunner().invoke(
        bench, ["--merge", str(smoke / "results.json"), "--merge", str(piece / "results.json"), "--out", str(merged)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads((merged / "results.json").read_text())
    assert len(data["sessions"]) == 2
    assert len(data["runs"]) == len(SCENARIOS) * len(BASELINES) + 2
    rows = _table_rows((merged / "results.md").read_text())
    b_rows = {row[2]: row for row in rows if row[0].startswith("b ")}
    # b's rows come from the newer session that ran fiddler-batch; baselines it did not run are marked.
    assert "from session" in b_rows["fiddler-rule"][-1] and b_rows["fiddler-rule"][6] == "-"
    assert b_rows["cpu-experts"][6].endswith("x")
    assert (merged / "results.png").read_bytes()[:8] == PNG_MAGIC


class _LagEngine:
    """An engine whose warm-up call feeds the CPU's start lag of the case's steps `per_call` layer calls."""

    def __init__(self, samples: int, per_call: int, top_k: int = 2, skip: int = 0):
        self.lag = StartLag(samples=samples, skip=skip)
        self.per_call = per_call
        self.asked: list[int] = []
        self.calls = 0
        self.model = SimpleNamespace(config=SimpleNamespace(num_experts_per_tok=top_k))
        self.executor = SimpleNamespace(lag_for=self._lag_for)

    def _lag_for(self, slots: int) -> StartLag:
        self.asked.append(slots)
        return self.lag

    def warm(self) -> None:
        self.calls += 1
        for _ in range(self.per_call):
            self.lag.observe(1.0)


@pytest.mark.parametrize(
    ("samples", "skip", "per_call", "calls"),
    [
        (64, 32, 32, 4),  # a 32-layer prefill as the executor measures it: one left out, two, then one with it
        (64, 8, 8, 10),  # an 8-layer one: one left out, eight, then one
        (64, 0, 32, 3),  # with nothing left out: fixed by the second call
        (64, 0, 64, 2),  # fixed by the first call, which planned without it
        (1000, 8, 8, 1 + SETTLE_CALLS),  # never fixed: at most SETTLE_CALLS more, none with the lag's plans
        (64, 8, 0, 2),  # plans that never use the lag (no copies beside the CPU): one more call finds it unused
    ],
)
def test_the_warm_up_repeats_until_the_cpus_start_lag_of_the_timed_steps_is_fixed_then_runs_with_it(
    samples: int, skip: int, per_call: int, calls: int
) -> None:
    engine = _LagEngine(samples, per_call, skip=skip)
    assert Suite._warm_up(engine, Case("b", prompt=512), engine.warm) == calls == engine.calls
    assert engine.asked == [1024]  # the prompt's tokens x 2 experts per token: the prefill's lag
    # A later case whose steps use the same lag warms up once where it is fixed by now.
    assert engine.lag.fixed == (skip + samples <= per_call * calls)
    assert (Suite._warm_up(engine, Case("b", prompt=1024), engine.warm) == 1) == engine.lag.fixed


def test_the_warm_up_asks_for_the_decode_steps_lag_and_runs_a_throughput_job_once() -> None:
    engine = _LagEngine(64, 64)
    assert Suite._warm_up(engine, Case("a", prompt=32, new=64), engine.warm) == 2
    assert Suite._warm_up(engine, Case("c", prompt=32, new=64, width=8), engine.warm) == 1
    assert engine.asked == [2, 16]
    engine = _LagEngine(1000, 8)
    assert Suite._warm_up(engine, Case("d", requests=64), engine.warm) == 1 and engine.asked == []


class _GraphEngine(_LagEngine):
    """A `_LagEngine` whose warm-up calls do `work[i]` one-off expert graph work (first runs and captures) in call i,
    none after the list."""

    def __init__(self, work: list[int], samples: int = 64, per_call: int = 64):
        super().__init__(samples, per_call)
        self.work = work
        self.executor.expert_graphs = SimpleNamespace(unsettled=0)

    def warm(self) -> None:
        if self.calls < len(self.work):
            self.executor.expert_graphs.unsettled += self.work[self.calls]
        super().warm()


@pytest.mark.parametrize(
    ("work", "calls"),
    [
        ([40, 40, 0], 3),  # first runs, then their captures, then a call with none: the timed runs replay
        ([40, 0], 2),  # the lag's call after the fix did none: nothing more
        ([0, 0], 2),  # no graph work at all
        ([40] * 10, 2 + GRAPH_SETTLE_CALLS),  # never settles: at most GRAPH_SETTLE_CALLS more
    ],
)
def test_the_warm_up_repeats_while_its_last_call_ran_or_captured_expert_graphs(work: list[int], calls: int) -> None:
    engine = _GraphEngine(work)  # a decode case whose lag its first call fixes, so two calls before the graphs' turn
    assert Suite._warm_up(engine, Case("a", prompt=32, new=64), engine.warm) == calls == engine.calls


def test_the_warm_up_of_a_case_whose_lag_is_fixed_repeats_for_the_graphs_alone() -> None:
    engine = _GraphEngine([0, 0, 30, 12, 0])
    assert Suite._warm_up(engine, Case("a", prompt=32, new=64), engine.warm) == 2
    # The next case (its lag fixed) starts new graph keys: its first call ran them, the second captured them.
    assert Suite._warm_up(engine, Case("c", prompt=32, new=64, width=4), engine.warm) == 3
    assert engine.calls == 5
    # A throughput job warms up once, whatever its graphs did.
    engine = _GraphEngine([50, 50])
    assert Suite._warm_up(engine, Case("d", requests=64), engine.warm) == 1


def _reps(times: list[float], cpu: list[float], cpu_experts: list[int]) -> list[dict]:
    return [
        {
            "metrics": {"ttft_s": t},
            "engine_stats": {"experts_cpu": n, "experts_copied": 9, "experts_split": 0, "cpu_compute_s": c},
        }
        for t, c, n in zip(times, cpu, cpu_experts, strict=True)
    ]


def test_the_report_gives_the_slowest_run_and_what_set_it_apart() -> None:
    steady = {"reps": _reps([1.0, 1.1, 0.95, 1.05, 1.0], [0.5] * 5, [4] * 5)}
    assert report._slowest(steady, "ttft_s") == (pytest.approx(1.0 / 1.1), "")
    slow_cpu = {"reps": _reps([1.0, 1.0, 1.3, 1.0, 1.0], [0.5, 0.5, 0.75, 0.5, 0.5], [4] * 5)}
    share, note = report._slowest(slow_cpu, "ttft_s")
    assert share == pytest.approx(1.0 / 1.3) and share < report.STEADY
    assert note == (
        "slowest run (run 3 of 5) 77% of the median: the others' counts of CPU, copied and split experts, its CPU "
        "experts 1.50x their median time"
    )
    new_plans = {"reps": _reps([1.4, 1.0, 1.0], [0.5] * 3, [3, 4, 4])}
    assert "run 1 of 3" in report._slowest(new_plans, "ttft_s")[1]
    assert "other expert counts than theirs, its CPU experts 1.00x" in report._slowest(new_plans, "ttft_s")[1]
    speeds = {"reps": [{"metrics": {"decode_tok_s": v}} for v in (10.0, 7.0, 10.0)]}  # higher is better
    assert report._slowest(speeds, "decode_tok_s") == (pytest.approx(0.7), "slowest run (run 2 of 3) 70% of the median")
    assert report._slowest({"reps": _reps([1.0], [0.5], [4])}, "ttft_s") == (None, "")


def test_sizes() -> None:
    sizes = parse_sizes(("a=32x64,128x128", "c=8", "d=300"), {})
    assert sizes["a"] == (Case("a", prompt=32, new=64), Case("a", prompt=128, new=128))
    assert sizes["c"] == (Case("c", prompt=32, new=64, width=8),)
    assert sizes["d"] == (Case("d", requests=300),)
    assert parse_sizes(("full",), {}) == PROTOCOL_SIZES
    assert parse_sizes(("b=all",), {})["b"] == PROTOCOL_SIZES["b"]
    # The grid benchmarks/PROTOCOL.md lists (the paper's): a 4 x 4, b four prompts, c four widths.
    assert {(c.prompt, c.new) for c in PROTOCOL_SIZES["a"]} == {
        (p, n) for p in (32, 64, 128, 256) for n in (64, 128, 256, 512)
    }
    assert [c.prompt for c in PROTOCOL_SIZES["b"]] == [512, 1024, 2048, 4096]
    assert [c.width for c in PROTOCOL_SIZES["c"]] == [4, 8, 12, 16]
    for bad in ("a=32", "b=0", "e=1", "c"):
        with pytest.raises(ValueError):
            parse_sizes((bad,), {})


def test_request_mix_keeps_its_proportions_in_every_prefix(tmp_path: Path) -> None:
    mix = Mix(chat_words=(4, 8), chat_new=3, doc_every=4, doc_words=(20, 30), doc_new=2)
    records = request_mix(12, mix, seed=1)
    assert [r["kind"] for r in records[:4]] == ["chat", "chat", "chat", "doc"]
    assert records[:8] == request_mix(8, mix, seed=1)
    written = write_requests(tmp_path / "r.jsonl", 8, mix, vocab_size=512, seed=1, max_new=2)
    assert (written["chats"], written["documents"]) == (6, 2)
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    tokenizer = build_tokenizer(512)
    for line, record in zip(lines, records):
        assert line["max_new_tokens"] == min(record["new"], 2)
        if "prompt" in line:
            assert len(tokenizer(line["prompt"])["input_ids"]) == record["words"] + 1  # BOS
        else:
            text = tokenizer.apply_chat_template(line["messages"], tokenize=False, add_generation_prompt=True)
            assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == record["words"] + 3


def test_split_bound() -> None:
    # Equal experts: the CPU and the link share them at their combined rate.
    cpu_ms, copy_ms = 4.0, 6.0
    assert split_ms([cpu_ms] * 3, copy_ms) == pytest.approx(3 / (1 / cpu_ms + 1 / copy_ms))
    # An expert cheap on the CPU goes there first; the rest go over the link.
    assert split_ms([1.0, 100.0, 100.0], 5.0) == pytest.approx(1.0 + ((2 * 5.0 - 1.0) / (100.0 + 5.0)) * 100.0)
    assert split_ms([], 5.0) == 0.0


def test_shared_bound_charges_the_cpu_and_the_link_their_contention() -> None:

    free = CostModel(ladder=(1, 8), cpu_ms=(4.0, 4.0), gpu_ms=(0.1, 0.1), copy_ms=6.0)
    shared = replace(free, cpu_contention=1.5, copy_contention=1.2)
    one_off = ([1, 0, 1, 0], [False, True, True, True])  # one expert off the GPU, one resident
    two_off = ([1, 1, 0, 0], [False, False, True, True])
    assert layer_ms(*one_off, free) == pytest.approx(1 / (1 / 4.0 + 1 / 6.0))
    assert layer_ms(*one_off, shared, shared=False) == layer_ms(*one_off, free)  # the free bound ignores it
    # Both at work, each at its shared rate: 1 / (1/6 + 1/7.2); still faster than the CPU alone (4 ms).
    assert layer_ms(*one_off, shared) == pytest.approx(1 / (1 / 6.0 + 1 / 7.2))
    assert layer_ms(*two_off, shared) == pytest.approx(2 / (1 / 6.0 + 1 / 7.2))
    # Contention so strong that sharing loses: the CPU alone serves the expert.
    assert layer_ms(*one_off, replace(free, cpu_contention=3.0, copy_contention=3.0)) == pytest.approx(4.0)
    # A link much faster than the CPU: the link alone.
    fast_link = replace(free, copy_ms=0.5, cpu_contention=4.0, copy_contention=4.0)
    assert layer_ms(*two_off, fast_link) == pytest.approx(1.0)
    # Never below the GPU's time for every routed expert.
    busy_gpu = replace(shared, gpu_ms=(5.0, 5.0))
    assert layer_ms(*one_off, busy_gpu) == pytest.approx(10.0)
    # Without contention measured (a CPU-only calibration) both bounds agree.
    assert layer_ms(*two_off, free) == layer_ms(*two_off, free, shared=False)


def _throughput_run(requests: int, kv_cache_tokens: int) -> dict:
    cost = {
        "ladder": [1, 8, 32, 128, 512],
        "cpu_ms": [5.0, 5.0, 6.0, 15.0, 50.0],
        "gpu_ms": [0.1, 0.1, 0.1, 0.2, 0.3],
        "copy_ms": 6.0,
        "meta": {"expert_bytes": 1000},
    }
    return {
        "cost_model": cost,
        "placement": {"total_experts": 16, "resident_experts": 4, "kv_cache_tokens": kv_cache_tokens},
        "moe": {"layers": 2, "experts_per_layer": 8, "top_k": 2},
        "requests": requests,
        "prompt_tokens": 100 * requests,
        "completion_tokens": 100 * requests,
        "generate_s": 10.0,
        "completion_tok_s": 10.0 * requests,
        "engine_stats": {"forward_s": 8.0},
        "steps": {"total": 100},
    }


def test_throughput_bound_charges_the_cpu_at_the_steps_tokens_per_expert() -> None:
    outside = 0.02  # a step's time outside the experts: (10 s generate - 8 s in the experts) / 100 steps
    # 4 rows in flight: one token per expert, the CPU at its one-token rate; both definitions agree. 396 decode rows
    # (400 tokens, 4 of them from the prefills) need 99 steps of 4 rows, as many as the longest completion's 99.
    few = throughput_bound(_throughput_run(4, 800), [{"max_new_tokens": 100}] * 4)
    assert few["rows_in_flight"] == 4 and few["tokens_per_expert"] == 1 and few["decode_rows"] == 396
    layer_ms = 6 / (1 / 5.0 + 1 / 6.0)  # 6 off-GPU experts per layer, CPU and link sharing them
    assert few["stream_s_per_step"] == pytest.approx(2 * layer_ms / 1e3)
    assert few["steps"] == 99 and few["stream_s"] == pytest.approx(99 * 2 * layer_ms / 1e3)
    assert few["seconds"] == pytest.approx(99 * (outside + 2 * layer_ms / 1e3))
    assert few["completion_tok_s"] == pytest.approx(few["optimistic_cpu"]["completion_tok_s"])
    assert few["free"]["completion_tok_s"] == pytest.approx(few["completion_tok_s"])  # no contention measured
    run = _throughput_run(4, 800)
    run["cost_model"] |= {"cpu_contention": 1.5, "copy_contention": 1.2}
    contended = throughput_bound(run, [{"max_new_tokens": 100}] * 4)
    assert contended["stream_s_per_step"] == pytest.approx(2 * 6 / (1 / 7.5 + 1 / 7.2) / 1e3)
    assert contended["free"]["stream_s"] == pytest.approx(few["stream_s"])
    assert contended["share_reached"] > contended["free"]["share_reached"]
    # 512 rows: 128 tokens per expert cost the CPU 15 ms each, so the CPU serves fewer of them than at one
    # token; the optimistic definition keeps charging 5 ms and promises more.
    many = throughput_bound(_throughput_run(512, 512 * 200), [{"max_new_tokens": 100}] * 512)
    assert many["tokens_per_expert"] == 128 and many["least_rows"] == 512
    assert many["stream_s_per_step"] == pytest.approx(2 * 6 / (1 / 15.0 + 1 / 6.0) / 1e3)
    assert many["seconds"] == pytest.approx(99 * (outside + many["stream_s_per_step"]))
    assert many["completion_tok_s"] < many["optimistic_cpu"]["completion_tok_s"]
    assert many["share_reached"] == pytest.approx(5120.0 / many["completion_tok_s"])
    # The KV cache holds 64 rows of 200 tokens: 50,688 decode rows need 792 steps.
    limited = throughput_bound(_throughput_run(512, 64 * 200), [{"max_new_tokens": 100}] * 512)
    assert limited["rows_in_flight"] == 64 and limited["steps"] == 792
    assert limited["stream_s"] == pytest.approx(792 * limited["stream_s_per_step"])


def test_throughput_bound_is_below_every_mix_of_step_sizes() -> None:
    """Whatever rows the steps carry (at most the rows in flight, the decode rows in all, each completion's steps),
    the bound's experts time is at most theirs: here against steps that empty as their requests finish, with a
    prefetch's copies overlapping the time outside the experts."""
    records = [{"max_new_tokens": 20 + 10 * (i % 12)} for i in range(480)]  # 20 to 130 new tokens, 40 of each
    run = _throughput_run(480, 10**6) | {"completion_tokens": sum(r["max_new_tokens"] for r in records)}
    run["engine_stats"] = {"forward_s": 8.0, "bytes_prefetched": 1000 * 50}  # 50 experts prefetched
    bound = throughput_bound(run, records)
    assert bound["rows_in_flight"] == 480 and bound["overlap_s"] == pytest.approx(50 * 6.0 / 1e3)
    assert bound["steps"] == 129 and bound["outside_s"] == pytest.approx(129 * 0.02)
    assert bound["seconds"] == pytest.approx(129 * 0.02 + bound["stream_s"] - bound["overlap_s"])
    cost = CostModel.from_json(run["cost_model"])
    step_s = {
        r: 2 * layer_ms([max(1, round(r * 2 / 8))] * 8, [e >= 6 for e in range(8)], cost) / 1e3 for r in range(1, 481)
    }
    # All start together; each request leaves after its own tokens, the first of them from its prefill.
    rows_per_step = [sum(1 for r in records if r["max_new_tokens"] - 1 > step) for step in range(129)]
    assert sum(rows_per_step) == bound["decode_rows"] and rows_per_step[-1] == 40
    actual_s = sum(step_s[rows] for rows in rows_per_step)
    assert bound["stream_s"] <= actual_s
    # The first definition charged each of the longest completion's steps at the full batch: more than these took.
    assert 129 * step_s[480] > actual_s


@pytest.mark.parametrize("sparse", [False, True])
def test_benchmark_checkpoints_load_like_the_model_they_describe(tmp_path: Path, sparse: bool) -> None:
    from fiddler_batch.assets import load_engine
    from fiddler_batch.bench.checkpoints import write_checkpoint
    from fiddler_batch.bench.model import TINY
    from fiddler_batch.spec import EngineSpec, ModelSpec

    written = write_checkpoint(tmp_path, layers=2, seed=3, sparse_experts=sparse, geometry=TINY)
    on_disk = sum(p.stat().st_blocks * 512 for p in tmp_path.glob("*.safetensors"))
    assert written["bytes_on_disk"] < written["bytes"] if sparse else written["bytes_on_disk"] == written["bytes"]
    assert on_disk < written["bytes"] if sparse else on_disk >= written["bytes"]
    engine = load_engine(ModelSpec(path=str(tmp_path)), EngineSpec(device="cpu"), calibrate=False)
    experts = engine.model.model.layers[0].mlp.experts.gate_up_proj
    assert experts.dtype == torch.bfloat16 and (experts.abs().sum().item() == 0) == sparse
    assert engine.model.model.layers[1].input_layernorm.weight.eq(1).all()
    ids = engine.tokenizer("w5 w6 w7", return_tensors="pt")["input_ids"]
    assert engine.model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, ids.shape[1] + 3)


def test_a_smoke_run_never_writes_beside_the_committed_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fiddler_batch.bench import cli as bench_cli

    monkeypatch.chdir(tmp_path)
    seen: list[Path] = []
    monkeypatch.setattr(bench_cli, "_write_report", lambda results, out, name: seen.append(out))
    CliRunner().invoke(bench, ["--smoke", "--scenario", "a", "--baselines", "fiddler-batch"])
    assert seen == [bench_cli.SMOKE_OUT] and bench_cli.SMOKE_OUT != bench_cli.RESULTS_OUT
    assert not (tmp_path / "benchmarks" / "results").exists() and (tmp_path / "out" / "bench-smoke").is_dir()
