"""Running the benchmark: build the model once, then place it as each baseline in turn and time every case.

Order, for economy: `accelerate` first, on the freshly built model; then the engine baselines, which reuse
the model and its pinned experts. The first engine placed is calibrated (full ladder, on the model's own
pinned experts) and every engine baseline shares that cost model. With skewed routing, the popularity
profile that places fiddler-rule's and fiddler-batch's resident experts is measured on short warm-up
prompts before any timed run.

Each case: a warm-up call, then `reps` timed calls (the slow baseline: shortened, see `Settings`); the
baseline that carries the bound (fiddler-batch, else fiddler-rule) records its routing during its first
timed call and is timed once more with the experts zeroed (see `bounds`). Results are saved after every case,
so a run cut short keeps what it measured.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fiddler_batch.bench.baselines import Placed, Unavailable, calibrate_on, gpu_budget, place_accelerate, place_engine
from fiddler_batch.bench.bounds import case_bound, experts_zeroed, rates, recording_routing
from fiddler_batch.bench.model import FIRST_WORD, MIXTRAL_8X7B, TINY, build_model, build_tokenizer
from fiddler_batch.bench.results import Results, load_cost_model
from fiddler_batch.bench.scenarios import (
    BATCHING,
    METRICS,
    PRIMARY,
    WARMUP_NEW,
    WARMUP_REQUESTS,
    generate_metrics,
    generate_once,
    prompt_ids,
    run_throughput,
    throughput_metrics,
    write_requests,
)
from fiddler_batch.bench.settings import BASELINE_TABLE, BASELINES, OURS, Case, Settings
from fiddler_batch.engine import Engine
from fiddler_batch.engine.budget import text_config
from fiddler_batch.engine.costmodel import cold_summary
from fiddler_batch.spec import MIN_KV_CACHE_TOKENS

GEOMETRIES = {"mixtral-8x7b": MIXTRAL_8X7B, "tiny": TINY}
KV_TOKENS = MIN_KV_CACHE_TOKENS
"""KV-cache tokens the engines plan GPU memory for in scenarios a-d (the budget every baseline shares)."""
PROFILE_PROMPTS, PROFILE_TOKENS, PROFILE_NEW = 8, 64, 8

SETTLE_CALLS = 12
"""Warm-up calls a case may run beyond the first while the CPU's start lag of its timed steps is measured, before the
one with the lag fixed (`Suite._warm_up`)."""

GRAPH_SETTLE_CALLS = 3
"""Warm-up calls a case may run beyond those while its last one still ran an expert's GPU work for the first time or
captured its graph (`Suite._warm_up`)."""

Log = Callable[[str], None]


def _graph_work(engine: Engine) -> int:
    """The executor's one-off graph work so far (`ExpertGraphs.unsettled`: first runs and captures), 0 without."""
    graphs = getattr(getattr(engine, "executor", None), "expert_graphs", None)
    return graphs.unsettled if graphs is not None else 0


def _step_slots(engine: Engine, case: Case) -> int:
    """Token slots (tokens x experts per token) a layer call of the case's timed steps routes: the prompt in a
    prefill (b), one token per beam in decode (a, c)."""
    top_k = getattr(text_config(engine.model.config), "num_experts_per_tok", None) or 1
    tokens = case.prompt if case.scenario == "b" else max(case.width, 1)
    return tokens * top_k


class Clock:
    """Times the session's parts, prints each as it ends, and keeps them in the session's timeline."""

    def __init__(self, session: dict[str, Any], log: Log):
        self.session, self.log = session, log
        self.start = time.perf_counter()
        self.depth = 0

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Time a part; parts inside another are recorded with their depth (1, 2, ...)."""
        start = time.perf_counter()
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            seconds = time.perf_counter() - start
            self.session["timeline"].append({"part": name, "seconds": round(seconds, 3), "depth": self.depth})
            self.log(f"[{time.perf_counter() - self.start:7.1f} s] {name}: {seconds:.1f} s")


class Suite:
    """One benchmark session over `settings`, appending to `results`."""

    def __init__(self, settings: Settings, results: Results, log: Log):
        self.settings = settings
        self.results = results
        self.log = log
        self.cost = load_cost_model(settings.calibration) if settings.calibration else None
        self.popularity: list[list[float]] | None = None
        self.bound_baseline = next((b for b in (OURS, "fiddler-rule") if b in settings.baselines), None)
        self.run_count = 0

    # -- the session ----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        s = self.settings
        self.session = self.results.new_session(s.to_json())
        self.clock = Clock(self.session, self.log)
        self.log(
            f"fiddler-batch bench: {s.variant}; cases {', '.join(c.scenario + ' ' + c.label for c in s.cases())}; "
            f"baselines {', '.join(b for b in BASELINES if b in s.baselines)}; {s.reps} timed run(s) each"
        )
        geometry = GEOMETRIES[s.geometry]
        with self.clock.part("build model"):
            started = time.perf_counter()
            self.model = build_model(layers=s.layers, seed=s.seed, skew=s.skew, geometry=geometry)
        self.vocab = self.model.config.vocab_size
        self.tokenizer = build_tokenizer(self.vocab)
        self.session["model"] = self._model_info(geometry, time.perf_counter() - started)
        self.budget = gpu_budget(self.model, s.resident, s.staging_slots, KV_TOKENS)
        self.session["budget"] = self.budget
        b = self.budget
        self.log(
            f"GPU budget {b['total_gb']} GB: weights {b['weights_bytes'] / 1e9:.2f} GB ({b['resident_experts']} "
            f"resident experts + {s.staging_slots} staging slots of {b['expert_bytes'] / 1e6:.0f} MB, non-expert "
            f"{b['non_expert_bytes'] / 1e9:.2f} GB) + KV cache {b['kv_cache_bytes'] / 1e9:.2f} GB + activations "
            f"{b['activation_bytes'] / 1e9:.2f} GB"
        )
        self.session["placements"] = {}
        self.session["popularity"] = {"how": "resident experts spread evenly over the layers (no profile)"}
        if self.cost is not None:
            self._record_cost()
        threads = torch.get_num_threads()  # engines change it for the process: each baseline starts from it
        try:
            with tempfile.TemporaryDirectory(prefix="fiddler-bench-") as tmp:
                self.tmp = Path(tmp)
                for name in BASELINES:
                    if name in s.baselines:
                        torch.set_num_threads(threads)
                        self.run_baseline(name)
        finally:
            torch.set_num_threads(threads)
        self.results.save()
        return self.session

    def _model_info(self, geometry: dict[str, Any], build_s: float) -> dict[str, Any]:
        s = self.settings
        name = "Mixtral-8x7B geometry" if s.geometry == "mixtral-8x7b" else "tiny Mixtral geometry"
        routing = (
            "random routers (near-uniform routing)"
            if s.skew == 0
            else f"skewed routing: router logits + {s.skew:g} x log(1/rank) per expert, ranks a random permutation "
            "per layer (Zipf)"
        )
        return {
            "description": f"{name}, {s.layers} layers, random bf16 weights (seed {s.seed}), {routing}",
            "geometry": {**geometry, "num_hidden_layers": s.layers},
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "build_s": round(build_s, 3),
        }

    def _record_cost(self) -> None:
        cfg = self.model.config
        self.session["cost_model"] = self.cost.to_json()
        self.session["rates"] = rates(self.cost, self.budget["expert_bytes"], cfg.hidden_size, cfg.intermediate_size)
        r = self.session["rates"]
        self.log(
            f"cost model: CPU {r['cpu_gb_per_s']:.1f} GB/s (cpu(1) {self.cost.cpu(1):.2f} ms), PCIe "
            f"{r['pcie_gb_per_s']:.1f} GB/s (copy {self.cost.copy_ms:.2f} ms), GPU {r['gpu_tflop_per_s']:.1f} "
            f"TFLOP/s; crossover {self.cost.crossover()} tokens"
        )
        meta = self.cost.meta
        if "host_read_gb_per_s" in meta:
            self.log(
                f"host memory read {meta['host_read_gb_per_s']} GB/s: the CPU expert at 1 token reads at "
                f"{meta['cpu_share_of_read']:.0%} of it, its timed runs {meta['cpu_spread']:.0%} apart"
            )
        if cold := cold_summary(meta):
            self.log(cold)
        if self.cost.cpu_packed_ms:
            ladder = ", ".join(
                f"{n}: {a:.2f}/{b:.2f}" for n, a, b in zip(self.cost.ladder, self.cost.cpu_ms, self.cost.cpu_packed_ms)
            )
            self.log(f"CPU expert ms as stored / packed for oneDNN, by tokens: {ladder}")
        if self.cost.cpu_gemv_ms:
            ladder = ", ".join(
                f"{n}: {a:.2f}/{b:.2f}" for n, a, b in zip(self.cost.ladder, self.cost.cpu_ms, self.cost.cpu_gemv_ms)
            )
            self.log(
                f"CPU expert ms as stored / own kernel, by tokens: {ladder} (the own kernel reads at "
                f"{meta.get('cpu_gemv_share_of_read', 0):.0%} of the host's read rate at 1 token)"
            )

    # -- baselines ------------------------------------------------------------------------------------

    def place(self, name: str) -> Placed:
        s = self.settings
        baseline = BASELINE_TABLE[name]
        if baseline.placement == "accelerate":
            placed = place_accelerate(self.model, self.tokenizer, self.budget, s.device)
            info = placed.info
            self.log(
                f"accelerate: {info['decoder_layers_on_gpu']} decoder layers on the GPU, "
                f"{info['decoder_layers_offloaded']} offloaded; max_memory[0] = "
                f"{self.budget['weights_bytes'] / 1e9:.2f} GB; {info['gpu_allocated_gb']} GB allocated"
            )
            return placed
        if baseline.resident and s.skew > 0 and self.popularity is None:
            self.measure_popularity()
        placed = self._place_engine(name)
        if not baseline.resident and s.skew > 0 and self.popularity is None:
            self.measure_popularity(placed)
        report = placed.info["placement"]
        self.log(
            f"{name}: {report['resident_experts']} of {report['total_experts']} experts resident "
            f"({report['placed_by']}), {placed.info['staging_slots']} staging slots, "
            f"CPU threads {placed.info['cpu_threads']}"
        )
        return placed

    def _place_engine(self, name: str) -> Placed:
        s = self.settings
        placed = place_engine(
            name,
            self.model,
            self.tokenizer,
            device=s.device,
            share=s.resident,
            staging_slots=s.staging_slots,
            cpu_threads=s.cpu_threads,
            kv_tokens=KV_TOKENS,
            cost=self.cost,
            popularity=self.popularity,
        )
        if self.cost is None:
            with self.clock.part("calibrate (full ladder)"):
                self.cost = calibrate_on(placed.engine)
            placed.info.update(placed.engine.describe())
            self._record_cost()
        return placed

    def measure_popularity(self, placed: Placed | None = None) -> None:
        """Tokens routed to each (layer, expert) over short profile prompts, on a placement with no resident
        experts (`placed`, fresh, or one made for it)."""
        own = placed is None
        if own:
            placed = self._place_engine("cpu-experts")
        with self.clock.part("profile expert popularity"):
            engine = placed.engine
            ids = torch.randint(
                FIRST_WORD,
                self.vocab,
                (PROFILE_PROMPTS, PROFILE_TOKENS),
                generator=torch.Generator().manual_seed(self.settings.seed + 7),
            ).to(engine.device)
            engine.set_kind("prefill_heavy")
            with torch.inference_mode():
                engine.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=PROFILE_NEW,
                    do_sample=False,
                    pad_token_id=0,
                )
            counts = engine.routed_counts()
        if own:
            placed.close()
        self.popularity = [[float(n) for n in row] for row in counts]
        self.session["popularity"] = {
            "how": f"fiddler-rule and fiddler-batch place resident experts by a popularity profile: tokens routed to "
            f"each expert over {PROFILE_PROMPTS} random prompts of {PROFILE_TOKENS} tokens + {PROFILE_NEW} "
            "generated, measured before any timed run",
            "counts": counts,
        }

    def run_baseline(self, name: str) -> None:
        cases = self.settings.cases()
        try:
            with self.clock.part(f"{name}: place"):
                placed = self.place(name)
        except Unavailable as exc:
            self.log(f"{name}: skipped ({exc})")
            for case in cases:
                self._record(name, case, status="skipped", reason=str(exc))
            return
        except Exception as exc:  # a baseline that cannot be placed must not cost the others
            reason = _failure(exc)
            self.log(f"{name}: placement failed: {reason}")
            for case in cases:
                self._record(name, case, status="failed", reason=f"placement failed: {reason}")
            return
        self.session["placements"][name] = placed.info
        try:
            if placed.slow:
                with self.clock.part(f"{name}: warm-up (one 1-token generate)"):
                    placed.engine.set_kind("decode_heavy")
                    generate_once(placed.engine, prompt_ids(32, self.vocab, self.settings.seed), 1)
        except Exception as exc:  # no case can run: record why, go on with the next baseline
            reason = _failure(exc)
            self.log(f"{name}: warm-up failed: {reason}")
            for case in cases:
                self._record(name, case, status="failed", reason=f"warm-up failed: {reason}")
            cases = []
        try:
            for case in cases:
                with self.clock.part(f"{name} {case.scenario} {case.label}"):
                    try:
                        self.run_case(placed, case)
                    except Exception as exc:  # one case failing (out of memory, say) must not cost the others
                        reason = _failure(exc)
                        self.log(f"{name} {case.scenario} {case.label}: failed: {reason}")
                        self._record(name, case, status="failed", reason=reason)
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
        finally:
            with self.clock.part(f"{name}: release"):
                placed.close()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # -- cases ----------------------------------------------------------------------------------------

    def run_case(self, placed: Placed, case: Case) -> None:
        s = self.settings
        engine = placed.engine
        shortened: dict[str, str] = {}
        reps = s.slow_reps if placed.slow else s.reps
        if placed.slow:
            shortened["timed runs"] = f"{reps} (protocol {s.reps})"
            shortened["warm-up"] = "one 1-token generate per placement"
        call, warm, metrics = self._calls(placed, case, shortened)
        warmup = None
        if not placed.slow:
            started = time.perf_counter()
            calls = self._warm_up(engine, case, warm)
            warmup = {"seconds": round(time.perf_counter() - started, 3), "calls": calls}
        reps_raw, calls = [], None
        for rep in range(reps):
            engine.reset_stats()
            if rep == 0 and placed.name == self.bound_baseline:
                with recording_routing(engine) as calls:
                    raw = call()
            else:
                raw = call()
            if case.scenario != "d":
                raw["engine_stats"] = engine.stats()
            raw["metrics"] = metrics(raw)
            reps_raw.append(raw)
        median = {}
        for metric in reps_raw[0]["metrics"]:
            values = [r["metrics"][metric] for r in reps_raw]
            if all(v is not None for v in values):
                median[metric] = statistics.median(values)
        self._record(
            placed.name, case, status="ok", reps=reps_raw, median=median, warmup=warmup, shortened=shortened or None
        )
        primary = PRIMARY[case.scenario]
        values = ", ".join(f"{r['metrics'][primary]:.4g}" for r in reps_raw)
        self.log(
            f"{placed.name} {case.scenario} {case.label}: {METRICS[primary][0]} "
            f"{median.get(primary, float('nan')):.4g} (median of {reps}: {values})"
        )
        if calls is not None:
            try:
                self._bound(placed, case, calls, call)
            except Exception as exc:  # the runs stand without their bound
                self.log(f"bound {case.scenario} {case.label}: failed: {_failure(exc)}")

    @staticmethod
    def _warm_up(engine: Engine, case: Case, warm: Callable[[], Any]) -> int:
        """Run the warm-up call until the plans of the case's timed steps are settled; return how many ran.

        The executor measures the CPU's start lag (`adaptive.StartLag`) over its first layer calls, then fixes it,
        and the plans change with it; the first call with the new plans runs slow (a 32-layer prefill's took 1.24x
        and 1.36x the median on two hosts: new CPU product shapes to set up). So while the lag of the case's timed
        steps is still being measured, the warm-up is repeated, at most `SETTLE_CALLS` more times, until it is
        fixed (or a call adds nothing to it: those steps' plans do not use it), and then once more, with the fixed
        lag's plans.

        Then, while the last call still ran an expert's GPU work for the first time or captured its graph (a key is
        captured the second time it is seen, `callgraphs.ExpertGraphs`), at most `GRAPH_SETTLE_CALLS` more: a
        beam search's first timed run after a single warm-up call captured 198-290 graphs at 32 layers and was the
        slowest of five, at 74% of the median on one host. Throughput jobs (d) mix step sizes and warm up once."""
        if case.scenario == "d":
            warm()
            return 1
        executor = getattr(engine, "executor", None)
        lag = None if executor is None else executor.lag_for(_step_slots(engine, case))
        settling = lag is not None and not lag.fixed
        calls = 0

        def call() -> int:
            """One warm-up call; returns the graph work it did."""
            nonlocal calls
            before = _graph_work(engine)
            warm()
            calls += 1
            return _graph_work(engine) - before

        fresh = call()
        while settling and not lag.fixed and calls <= SETTLE_CALLS:
            seen = lag.calls
            fresh = call()
            if lag.calls == seen:
                break
        if settling and lag.fixed:
            fresh = call()
        extra = 0
        while fresh and extra < GRAPH_SETTLE_CALLS:
            fresh = call()
            extra += 1
        return calls

    def _calls(self, placed: Placed, case: Case, shortened: dict[str, str]) -> tuple[Callable, Callable, Callable]:
        """(timed call, warm-up call, metrics of a raw result) for `case` on `placed`."""
        s, engine = self.settings, placed.engine
        if case.scenario == "d":
            count, cap = case.requests, None
            if placed.slow:
                count, cap = min(case.requests, s.slow_requests), s.slow_max_new
                shortened["requests"] = f"first {count} of {case.requests} (same mix)"
                shortened["max new tokens"] = f"at most {cap}"
            requests = self._requests(count, cap)
            warm_requests = self._requests(min(count, WARMUP_REQUESTS), WARMUP_NEW)

            def run(path: Path) -> Callable[[], dict[str, Any]]:
                def call() -> dict[str, Any]:
                    self.run_count += 1
                    return run_throughput(engine, path, self.tmp / "runs", f"{placed.name}-{self.run_count}")

                return call

            return run(requests), run(warm_requests), throughput_metrics

        engine.set_kind("prefill_heavy" if case.scenario == "b" else "decode_heavy")
        ids = prompt_ids(case.prompt, self.vocab, s.seed)
        new = case.new
        if placed.slow and case.scenario in ("a", "c") and new > s.slow_max_new:
            new = s.slow_max_new
            shortened["new tokens"] = f"{new} of {case.new}"
        # The warm-up is the timed call itself: after a 4-token one, the first engine baseline of a process ran its
        # first timed call at half the speed of the next ones, in every GPU session.
        call = lambda: generate_once(engine, ids, new, case.width)  # noqa: E731
        return call, call, lambda raw: generate_metrics(case, raw)

    def _requests(self, count: int, cap: int | None) -> Path:
        """The JSONL input of the first `count` requests of the mix (max_new_tokens capped at `cap`)."""
        path = self.tmp / f"requests-{count}-{cap or 'full'}.jsonl"
        if not path.is_file():
            written = write_requests(path, count, self.settings.mix, self.vocab, self.settings.seed, cap)
            workloads = self.session.setdefault("workloads", {"batching": BATCHING.model_dump()})
            workloads[path.name] = written
        return path

    def _bound(self, placed: Placed, case: Case, calls: list, call: Callable[[], dict[str, Any]]) -> None:
        """The case's physical bound, from the routing recorded on `placed` and the time outside the experts."""
        engine = placed.engine
        with experts_zeroed(engine.model):
            outside = call()
        outside.pop("engine_stats", None)
        resident = [layer.is_resident() for layer in engine.executor.layers]
        bound = case_bound(case, calls, outside, resident, self.cost, self.budget["expert_bytes"])
        self.results.bounds.append(
            {
                "session": self.session["id"],
                "variant": self.settings.variant,
                "scenario": case.scenario,
                "case": case.label,
                "traced_on": placed.name,
                **bound,
            }
        )
        self.results.save()
        primary = PRIMARY[case.scenario]
        self.log(
            f"bound {case.scenario} {case.label}: {METRICS[primary][0]} {bound['metrics'][primary]:.4g} "
            f"({bound['off_gpu_gb']:.1f} GB of off-GPU experts, {bound['expert_bound_s']:.3f} s expert bound)"
        )

    def _record(self, baseline: str, case: Case, **fields: Any) -> None:
        self.results.runs.append(
            {
                "session": self.session["id"],
                "variant": self.settings.variant,
                "scenario": case.scenario,
                "case": case.label,
                "case_params": {"prompt": case.prompt, "new": case.new, "width": case.width, "requests": case.requests},
                "description": case.describe(),
                "baseline": baseline,
                "status": fields.pop("status"),
                "reason": fields.pop("reason", None),
                "shortened": fields.pop("shortened", None),
                "warmup": fields.pop("warmup", None),
                "reps": fields.pop("reps", []),
                "median": fields.pop("median", {}),
            }
        )
        self.results.save()


def _failure(exc: BaseException) -> str:
    """One line naming an exception and where it was raised."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{where}"
