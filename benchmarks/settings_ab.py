"""Engine settings that change only how the executor plans, against the defaults, runs interleaved in one process.

    python benchmarks/settings_ab.py [--reps 6] [--layers 8] [--resident 0.25] [--cases a,b,c,b4k]
        [--modes default,adapting,whole,split,warm,nolag,inturn,noteam,nowatch,gain20,gain10,gain05,eagerexperts,
                 prefetch1,prefetch2,noprefetch,prefetchsmall]
        [--one-lag]

One engine (the Mixtral-8x7B-geometry slice, bf16, with its defaults and this machine's calibration; one model, so
32 layers fit a 128 GB host), the cases of `interleave.CASES`: a (prompt 32, 64 new tokens, greedy: decode tok/s), c
(beam width 4: output tok/s), b and b4k (prompts of 1024 and 4096 tokens, 8 new tokens: the time to the first token,
TTFT). Each round runs every mode once per case, in an order that rotates from round to round. Modes:

- default:  the engine's defaults;
- adapting: `engine.adapt_costs: on`, a fresh tracker for each run, so each run learns from its own first layer
            calls as a job does;
- whole:    `engine.split_experts: false` (every expert whole; splits are on by default);
- split:    `engine.split_experts: true` (the default since splits send data one way; kept for the logs of
            the calls that ran it against the defaults of their time);
- nolag:    `engine.cpu_lag: off` (plans start the CPU with the link; the others plan with the CPU's start lag
            that their own warm-up measured);
- inturn:   the CPU's first product of a layer call computed after the layer's GPU work is queued, not started
            ahead of it on the own kernel's helper team (`HybridExecutor.cpu_ahead`);
- noteam:   as inturn, and every product of the own kernel on an OpenMP team of the calling thread's instead of the
            kernel's helper team and the calling thread (`cpugemv.TEAM`): the kernel as it ran before the team;
- nowatch:  the kernel's helper sleeps as soon as its queue is empty instead of watching it for 200 us first
            (`cpugemv.watch_empty_queue(0)`);
- gain20, gain10, gain05: the least predicted gain of a split at 20%, 10% and 5% in every layer
            (`planner.SPLIT_MIN_GAIN` and `SPLIT_MIN_GAIN_FEW`; the defaults: 20% beside two or more other
            off-GPU experts, 5% beside one or none);
- eagerexperts: `engine.expert_graphs: false` (the GPU's whole experts in small calls launched one kernel at a
            time instead of replayed as CUDA graphs);
- prefetch1, prefetch2: `engine.prefetch_experts` 1 and 2 (the next layer's experts copied ahead, into the default 4
            staging slots: in a prefill the first ones the next layer's plan for the guessed counts copies; 1 is
            the default since the main stream's copies no longer queue behind a prefetch);
- noprefetch: `engine.prefetch_experts: 0` (no prefetch, the default before);
- prefetchsmall: `engine.prefetch_small_steps: true` (one expert prefetched in decode and beam-search steps too);
- warm:     the defaults planning on a calibration that timed one expert again and again (warm in the CPU's caches,
            as calibrations did before they read experts in turn). With this mode every mode plans on a full
            calibration made at the start, the others on one that reads experts in turn.

Prints every run as it ends (the CPU expert's mean time, the experts on the CPU, copied and split, the prefetches
issued and used, and with `adapting` the tracker's scales), then per case the medians, the ratio to the first mode and
the slowest run as a share of the median.
"""

from __future__ import annotations

from interleave import CASES, LABEL, METRIC, arguments, metrics, print_summary, rounds, slice_engine

from fiddler_batch.assets import cost_model_for
from fiddler_batch.bench.scenarios import generate_once, prompt_ids
from fiddler_batch.engine import cpugemv, planner
from fiddler_batch.engine.adaptive import StartLag
from fiddler_batch.engine.costmodel import calibrate

MODES = {
    "default": {},
    "adapting": {"adapt_costs": "on"},
    "whole": {"split_experts": False},
    "split": {"split_experts": True},
    "warm": {},
    "nolag": {"cpu_lag": "off"},
    "inturn": {"cpu_ahead": False},
    "noteam": {"cpu_ahead": False},
    "nowatch": {},
    "gain20": {},
    "gain10": {},
    "gain05": {},
    "eagerexperts": {"expert_graphs": None},
    "prefetch1": {"prefetch_experts": 1},
    "prefetch2": {"prefetch_experts": 2},
    "noprefetch": {"prefetch_experts": 0},
    "prefetchsmall": {"prefetch_experts": 1, "prefetch_small_steps": True},
}
SPLIT_GAINS = {"gain20": 0.20, "gain10": 0.10, "gain05": 0.05}
"""The planner's least gain of a split, in every layer, in the modes that set it (the others keep the defaults)."""


def main() -> None:
    parser = arguments(6, "a,c", MODES)
    parser.add_argument(
        "--one-lag",
        action="store_true",
        help="every mode plans with the CPU start lag the first mode's warm-up measured (for modes that change only "
        "plans, so that the lag's measurement does not differ between them)",
    )
    args = parser.parse_args()
    modes = args.modes.split(",")
    engine, _ = slice_engine(args.layers, args.resident, calibrated=False)  # its calibration is chosen below
    model = engine.model
    executor = engine.executor
    costs = {}
    if "warm" in modes:
        cost = engine.measure_cost_model()
        first = executor.layers[0]
        costs["warm"] = calibrate(
            first.layout, first.module, engine.device, executor.cpu_threads, hosts=engine.calibration_experts()[:1]
        )
        print(f"warm calibration: cpu(1) {costs['warm'].fastest_cpu(1):.2f} ms, {costs['warm'].meta}")
    else:
        cost = cost_model_for(engine, engine.spec)
    cases = args.cases.split(",")
    inputs = {case: (prompt_ids(CASES[case][0], model.config.vocab_size, 0), *CASES[case][1:]) for case in cases}
    results = {(mode, case): [] for mode in modes for case in cases}
    defaults = {key: getattr(executor, key) for mode in MODES.values() for key in mode}
    lags: dict[str, tuple[StartLag, StartLag]] = {}
    default_gains = (planner.SPLIT_MIN_GAIN, planner.SPLIT_MIN_GAIN_FEW)

    def use(mode: str) -> None:
        for key, value in {**defaults, **MODES[mode]}.items():
            setattr(executor, key, value)
        cpugemv.TEAM = mode != "noteam"
        cpugemv.watch_empty_queue(0 if mode == "nowatch" else cpugemv.WATCH_US)
        gain = SPLIT_GAINS.get(mode)  # both in the executor's plan cache key
        planner.SPLIT_MIN_GAIN, planner.SPLIT_MIN_GAIN_FEW = default_gains if gain is None else (gain, gain)
        # Each mode measures its own CPU start, or with --one-lag every mode takes the first one's.
        skip = len(executor.layers)  # as the executor's own: each leaves out its first forward pass
        executor.lags = lags.setdefault(modes[0] if args.one_lag else mode, (StartLag(skip=skip), StartLag(skip=skip)))
        engine.set_cost_model(costs.get(mode, cost))  # a fresh tracker (adapting) or none

    print(
        f"calibration: cpu(1) {cost.cpu(1):.2f} ms (own kernel {cost.cpu_gemv_ms and cost.cpu_gemv_ms[0]}), copy "
        f"{cost.copy_ms:.2f} ms, contention CPU {cost.cpu_contention:.2f} copy {cost.copy_contention:.2f}; {cost.meta}"
    )
    for mode in modes:  # warm-up: a whole run of each case in each mode
        use(mode)
        for case in cases:
            generate_once(engine, *inputs[case])
    for round_, order in rounds(modes, args.reps):
        for mode in order:
            for case in cases:
                use(mode)
                engine.reset_stats()
                value = metrics(generate_once(engine, *inputs[case]))[METRIC[case]]
                stats = engine.stats()
                results[(mode, case)].append(value)
                cpu_ms = 1e3 * stats["cpu_compute_s"] / max(1, stats["experts_cpu"])
                print(
                    f"round {round_} {case} {mode:<9} {LABEL[METRIC[case]]} {value:.4g}, "
                    f"CPU experts {stats['experts_cpu']} "
                    f"({cpu_ms:.2f} ms each), copied {stats['experts_copied']}, split {stats['experts_split']}, "
                    f"experts {stats['forward_s']:.3f} s (planned {stats['predicted_s']:.3f}), "
                    f"graphed {stats['graph_replays']} (captured {stats['graph_captures']}), "
                    f"prefetched {stats['prefetch_issued']} (used {stats['prefetch_hits']}), "
                    f"products ahead {stats.get('products_ahead', 0)}; "
                    f"{stats.get('cost_scales', '')} lag {stats.get('cpu_lag', 'off')}",
                    flush=True,
                )
    print_summary(args, cases, modes, results, 9)


if __name__ == "__main__":
    main()
